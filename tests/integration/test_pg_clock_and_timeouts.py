"""On PostgreSQL, leases are judged by the database's clock, and no connection
waits without a limit."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa

from jobflow import JobFlow
from jobflow.adapters.memory import InMemoryObjectStore
from jobflow.adapters.sqlalchemy import DatabaseTimeouts, SqlAlchemyJobStore, create_engine
from jobflow.adapters.sqlalchemy.clock import local_clock
from jobflow.adapters.sqlalchemy.errors import driver_errors
from jobflow.errors import StorageUnavailable
from tests.pgcluster import free_port

pytestmark = pytest.mark.postgres

#: Generous: the test and the server share a busy host, and nothing else sets its clock.
CLOSE = timedelta(seconds=0.5)


def database_time(engine: sa.Engine) -> datetime:
    with engine.connect() as conn:
        found: datetime = conn.execute(sa.text("SELECT clock_timestamp()")).scalar_one()
    return found.astimezone(UTC)


def test_a_flow_given_no_clock_judges_time_by_the_database(pg_engine: sa.Engine) -> None:
    store = SqlAlchemyJobStore(pg_engine)
    flow = JobFlow(store=store, objects=InMemoryObjectStore())
    now = flow.now()
    assert now.tzinfo is UTC
    assert abs(now - database_time(pg_engine)) < CLOSE
    with pg_engine.connect() as conn:
        assert store.bind(conn).clock is store.clock  # a host's transactions: the same clock


def test_sqlite_keeps_the_hosts_clock(tmp_path: Path) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'jobs.sqlite3'}")
    try:
        assert SqlAlchemyJobStore(engine).clock is local_clock
    finally:
        engine.dispose()


def test_a_clock_that_never_read_the_database_is_unavailable() -> None:
    engine = create_engine(f"postgresql+psycopg://jobflow@127.0.0.1:{free_port()}/jobflow")
    flow = JobFlow(store=SqlAlchemyJobStore(engine), objects=InMemoryObjectStore())
    try:
        with pytest.raises(StorageUnavailable, match="clock"):
            flow.now()
        with pytest.raises(StorageUnavailable):
            flow.claim("worker-1")
    finally:
        engine.dispose()


def test_every_connection_made_from_the_engine_has_the_timeouts(pg_engine: sa.Engine) -> None:
    engine = create_engine(pg_engine.url, timeouts=DatabaseTimeouts(statement_seconds=0.25))
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SHOW statement_timeout").scalar_one() == "250ms"
            with pytest.raises(StorageUnavailable, match="statement timeout"), \
                    driver_errors("sleep"):
                conn.exec_driver_sql("SELECT pg_sleep(2)")
        # The worker's LISTEN connection is made from the engine's URL, as here.
        args, params = engine.dialect.create_connect_args(engine.url)
        with psycopg.connect(*args, **params, autocommit=True) as listen:
            assert listen.execute("SHOW statement_timeout").fetchone() == ("250ms",)
            given = listen.info.get_parameters()
            assert (given["connect_timeout"], given["keepalives"]) == ("5", "1")
    finally:
        engine.dispose()
