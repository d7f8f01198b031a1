"""Runnable examples of host applications built on jobflow."""
