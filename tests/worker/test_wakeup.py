"""Wake-ups: LISTEN/NOTIFY on PostgreSQL, and what happens when it breaks."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
import structlog

from jobflow import JobFlow
from jobflow.adapters.memory import InMemoryJobStore, InMemoryObjectStore
from jobflow.adapters.sqlalchemy import NOTIFY_CHANNEL, SqlAlchemyJobStore
from jobflow.wakeup import PollingWakeup, PostgresNotifyWakeup, wakeup_for
from tests.worker.conftest import PATIENCE, queue_job, wait_for


class Wakes:
    """Counts calls of the wake callback."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            self.count += 1


@pytest.fixture
def listening(pg_engine: sa.Engine) -> Iterator[tuple[PostgresNotifyWakeup, Wakes]]:
    wakeup = PostgresNotifyWakeup.for_engine(pg_engine, NOTIFY_CHANNEL)
    wakes = Wakes()
    wakeup.start(wakes)
    try:
        wait_for(lambda: wakeup.listening, "LISTEN to be established")
        yield wakeup, wakes
    finally:
        wakeup.close()


@pytest.mark.postgres
def test_a_job_becoming_queued_wakes_the_listener(
        pg_engine: sa.Engine, listening: tuple[PostgresNotifyWakeup, Wakes]) -> None:
    _, wakes = listening
    flow = JobFlow(store=SqlAlchemyJobStore(pg_engine), objects=InMemoryObjectStore())
    ticket = flow.initiate_upload("owner", content_type="video/mp4")
    before = wakes.count  # created, not queued: no notification
    flow.objects.put(ticket.key, b"video", content_type="video/mp4")
    flow.complete_upload(ticket.job_id)
    wait_for(lambda: wakes.count > before, "the NOTIFY of the queued job")


@pytest.mark.postgres
def test_a_broken_listen_connection_falls_back_to_polling_and_reconnects(
        pg_engine: sa.Engine, listening: tuple[PostgresNotifyWakeup, Wakes]) -> None:
    wakeup, wakes = listening
    with structlog.testing.capture_logs() as logs:
        before = wakes.count
        with pg_engine.connect() as conn:
            conn.execute(sa.text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE query LIKE 'LISTEN %' AND pid <> pg_backend_pid()"))
        wait_for(lambda: any(e["event"] == "wakeup.listen_failed" for e in logs),
                 "the listener to notice")
        # The worker is told to look (a notification may have been lost)...
        wait_for(lambda: wakes.count > before, "a wake-up after the failure")
        # ...and listening resumes on a new connection.
        wait_for(lambda: wakeup.listening, "LISTEN to be re-established", timeout=PATIENCE)
    store = SqlAlchemyJobStore(pg_engine)
    flow = JobFlow(store=store, objects=InMemoryObjectStore())
    resumed = wakes.count
    queue_job(flow)
    wait_for(lambda: wakes.count > resumed, "a NOTIFY on the new connection")


def test_an_unreachable_listener_is_never_listening() -> None:
    def refuse() -> None:
        raise OSError("connection refused")

    wakeup = PostgresNotifyWakeup(refuse, NOTIFY_CHANNEL)
    wakes = Wakes()
    with structlog.testing.capture_logs() as logs:
        wakeup.start(wakes)
        wait_for(lambda: any(e["event"] == "wakeup.listen_failed" for e in logs),
                 "the failed attempt to be logged")
        assert not wakeup.listening
        wakeup.close()
    assert wakes.count == 0


@pytest.mark.postgres
def test_postgres_stores_listen_and_others_poll(pg_engine: sa.Engine) -> None:
    assert isinstance(wakeup_for(SqlAlchemyJobStore(pg_engine)), PostgresNotifyWakeup)
    assert isinstance(wakeup_for(InMemoryJobStore()), PollingWakeup)
    sqlite = sa.create_engine("sqlite://")
    assert isinstance(wakeup_for(SqlAlchemyJobStore(sqlite)), PollingWakeup)
    sqlite.dispose()
