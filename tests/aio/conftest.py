"""Fixtures of the async suite: an event loop per test, async stores of every
kind, and AsyncJobFlow over them.

The suite needs no pytest plugin: a test takes ``runner`` (an
:class:`asyncio.Runner`, closed after the test) and runs its coroutines with
``runner.run(...)``; fixtures that made async engines dispose of them on the
same loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobflow import AsyncJobFlow
from jobflow.adapters.memory import InMemoryObjectStore
from tests.aio.stores import AsyncStore, AsyncStores
from tests.conftest import QUIET_LOGGER, ManualClock
from tests.strategies import POLICY

ASYNC_KINDS = [pytest.param("memory"), pytest.param("sqlite"),
               pytest.param("postgres", marks=pytest.mark.postgres)]
SQL_KINDS = ASYNC_KINDS[1:]


@pytest.fixture
def runner() -> Iterator[asyncio.Runner]:
    with asyncio.Runner() as loop_runner:
        yield loop_runner


def _stores(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> AsyncStores:
    if kind == "sqlite":
        return AsyncStores(kind, sqlite_template=request.getfixturevalue("sqlite_template"),
                           folder=tmp_path)
    if kind == "postgres":
        return AsyncStores(kind, pg_engine=request.getfixturevalue("pg_engine"))
    return AsyncStores(kind)


@pytest.fixture(params=ASYNC_KINDS)
def async_stores(request: pytest.FixtureRequest, tmp_path: Path,
                 runner: asyncio.Runner) -> Iterator[AsyncStores]:
    """A factory of empty async stores: memory, SQLite (aiosqlite), PostgreSQL (psycopg)."""
    stores = _stores(request.param, request, tmp_path)
    yield stores
    runner.run(stores.dispose())


@pytest.fixture(params=SQL_KINDS)
def sql_async_stores(request: pytest.FixtureRequest, tmp_path: Path,
                     runner: asyncio.Runner) -> Iterator[AsyncStores]:
    """The same, SQL kinds only."""
    stores = _stores(request.param, request, tmp_path)
    yield stores
    runner.run(stores.dispose())


@pytest.fixture
def async_store(async_stores: AsyncStores) -> AsyncStore:
    return async_stores()


@pytest.fixture
def objects() -> InMemoryObjectStore:
    return InMemoryObjectStore(bucket="videos")


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def async_flow(async_store: AsyncStore, objects: InMemoryObjectStore,
               clock: ManualClock) -> AsyncJobFlow:
    return AsyncJobFlow(store=async_store, objects=objects, clock=clock, policy=POLICY,
                        logger=QUIET_LOGGER)
