"""Fixtures of the contract suites: a fresh store of every kind, a manual clock,
an in-memory object store and a JobFlow over them."""

from __future__ import annotations

import pytest

from jobflow import JobFlow
from jobflow.adapters.memory import InMemoryObjectStore
from jobflow.ports import JobStore
from tests.conftest import QUIET_LOGGER, ManualClock, StoreFactory
from tests.strategies import POLICY


@pytest.fixture
def store(make_store: StoreFactory) -> JobStore:
    return make_store()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def objects() -> InMemoryObjectStore:
    return InMemoryObjectStore(bucket="videos")


@pytest.fixture
def flow(store: JobStore, objects: InMemoryObjectStore, clock: ManualClock) -> JobFlow:
    return JobFlow(store=store, objects=objects, clock=clock, policy=POLICY, logger=QUIET_LOGGER)
