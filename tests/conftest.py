"""Shared fixtures. Every contract and property test takes ``make_store``,
so each runs against every JobStore adapter listed in ``STORE_KINDS``."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
import structlog
from hypothesis import HealthCheck, settings

import jobflow.migrations
from jobflow.adapters.memory import InMemoryJobStore
from jobflow.ports import JobStore
from tests.fake_aws import moto_server
from tests.pgcluster import DatabaseServer, PostgresCluster, PostgresUnavailable
from tests.sqlstores import (
    ListenedEngine,
    PostgresStores,
    SQLiteStores,
    empty_tables,
    listened_engine,
    migrated_sqlite_file,
)
from tests.strategies import START

# Read before any test runs: the autouse fixture below hides JOBFLOW_* from tests.
#: An already running PostgreSQL server to test against (a URL whose user may
#: create databases) instead of a throw-away cluster started for the run.
EXTERNAL_DATABASE_URL = os.environ.get("JOBFLOW_TEST_DATABASE_URL")
#: Under CI a PostgreSQL that cannot start fails the run; elsewhere its tests skip.
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# Hypothesis profiles: "ci" is the fixed, meaningful budget the test command uses.
settings.register_profile(
    "ci", max_examples=200, stateful_step_count=50, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev", max_examples=50, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

StoreFactory = Callable[[], JobStore]

#: A logger for flows whose transitions a test does not look at.
QUIET_LOGGER: structlog.typing.FilteringBoundLogger = structlog.wrap_logger(
    structlog.PrintLogger(), wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))


class ManualClock:
    """A clock that moves only when the test says so."""

    def __init__(self, now: datetime = START) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now

#: "postgres-listener": the same PostgreSQL database through an engine with
#: statement and error listeners attached, as tracing instrumentation attaches
#: them; the store must behave the same with and without.
STORE_KINDS = ["memory", "sqlite", "postgres", "postgres-listener"]


@pytest.fixture(autouse=True)
def _no_jobflow_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never see the caller's JOBFLOW_* configuration."""
    for name in list(os.environ):
        if name.startswith("JOBFLOW_"):
            monkeypatch.delenv(name)


@pytest.fixture(params=[
    pytest.param(kind, marks=[pytest.mark.postgres] if kind.startswith("postgres") else [])
    for kind in STORE_KINDS])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """A factory of fresh, empty job stores of one kind."""
    if request.param == "memory":
        yield InMemoryJobStore
    elif request.param == "sqlite":
        template = request.getfixturevalue("sqlite_template")
        stores = SQLiteStores(template, tmp_path)
        yield stores
        stores.dispose()
    elif request.param == "postgres":
        yield PostgresStores(request.getfixturevalue("pg_engine"))
    elif request.param == "postgres-listener":
        listened: ListenedEngine = request.getfixturevalue("pg_listened_engine")
        yield PostgresStores(listened.engine)
        assert listened.log.unaccounted == 0, "a statement neither came back nor failed"
    else:  # pragma: no cover - every kind above has a branch
        raise AssertionError(request.param)


# -- SQL databases -----------------------------------------------------------------------


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file that SQLite stores start as a copy of."""
    return migrated_sqlite_file(tmp_path_factory.mktemp("sqlite") / "template.sqlite3")


@pytest.fixture(scope="session")
def pg_server() -> Iterator[DatabaseServer]:
    """The PostgreSQL server of this run: JOBFLOW_TEST_DATABASE_URL, or a throw-away
    cluster started here and removed at the end."""
    cluster: PostgresCluster | None = None
    if EXTERNAL_DATABASE_URL:
        server = DatabaseServer(EXTERNAL_DATABASE_URL)
    else:
        try:
            cluster = PostgresCluster().start()
        except PostgresUnavailable as exc:
            if IN_CI:
                pytest.fail(f"PostgreSQL is required under CI and did not start: {exc}")
            pytest.skip(f"PostgreSQL unavailable: {exc}")
        server = DatabaseServer(cluster.url())
    try:
        yield server
    finally:
        try:
            server.drop_all()
        finally:
            if cluster is not None:
                cluster.stop()


@pytest.fixture(scope="session")
def pg_session_engine(pg_server: DatabaseServer) -> Iterator[sa.Engine]:
    """An engine on a database migrated once for the whole run."""
    engine = sa.create_engine(pg_server.create_database())
    jobflow.migrations.upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def pg_listened_engine(pg_session_engine: sa.Engine) -> Iterator[ListenedEngine]:
    """A second engine on the run's migrated database, with statement listeners."""
    listened = listened_engine(pg_session_engine.url)
    yield listened
    listened.engine.dispose()


@pytest.fixture
def pg_engine(pg_session_engine: sa.Engine) -> sa.Engine:
    """The run's migrated PostgreSQL database, emptied for this test."""
    empty_tables(pg_session_engine)
    return pg_session_engine


@pytest.fixture
def pg_url(pg_server: DatabaseServer) -> sa.URL:
    """A new, empty PostgreSQL database (no jobflow tables yet)."""
    return pg_server.create_database()


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    """moto's real HTTP server on a free port of 127.0.0.1, one per test module."""
    with moto_server() as endpoint:
        yield endpoint
