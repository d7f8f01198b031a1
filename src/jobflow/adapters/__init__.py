"""Adapters: implementations of the ports in :mod:`jobflow.ports`."""
