"""Real databases for the integration tests: SQLite files and the run's PostgreSQL."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from jobflow import JobFlow
from jobflow.adapters.memory import InMemoryObjectStore
from jobflow.adapters.sqlalchemy import SqlAlchemyJobStore
from tests.conftest import QUIET_LOGGER
from tests.strategies import POLICY

SQL_KINDS = [pytest.param("sqlite"), pytest.param("postgres", marks=pytest.mark.postgres)]



@pytest.fixture(params=SQL_KINDS)
def empty_database(request: pytest.FixtureRequest, tmp_path: Path) -> sa.URL:
    """The URL of a new database without any table, SQLite or PostgreSQL."""
    if request.param == "sqlite":
        return sa.make_url(f"sqlite:///{tmp_path / 'empty.sqlite3'}")
    url: sa.URL = request.getfixturevalue("pg_url")
    return url


@pytest.fixture(params=SQL_KINDS)
def sql_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sa.Engine]:
    """An engine on a migrated database holding no jobs, SQLite or PostgreSQL."""
    if request.param == "postgres":
        yield request.getfixturevalue("pg_engine")
        return
    path = tmp_path / "jobs.sqlite3"
    shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
    engine = sa.create_engine(f"sqlite:///{path}")
    yield engine
    engine.dispose()


@pytest.fixture
def sql_store(sql_engine: sa.Engine) -> SqlAlchemyJobStore:
    return SqlAlchemyJobStore(sql_engine)


@pytest.fixture
def objects() -> InMemoryObjectStore:
    return InMemoryObjectStore(bucket="videos")


def flow_on(store: SqlAlchemyJobStore, objects: InMemoryObjectStore) -> JobFlow:
    return JobFlow(store=store, objects=objects, policy=POLICY, logger=QUIET_LOGGER)


@pytest.fixture
def sql_flow(sql_store: SqlAlchemyJobStore, objects: InMemoryObjectStore) -> JobFlow:
    return flow_on(sql_store, objects)
