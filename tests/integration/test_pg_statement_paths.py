"""On its own connections the PostgreSQL store sends its statements straight to
psycopg. When the engine logs statements or has statement event listeners,
they go through SQLAlchemy's execution layer instead, so that those see every
statement. Either way the store reads and writes the same jobs and histories."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from datetime import UTC
from typing import Any

import pytest
import sqlalchemy as sa

from jobflow import Job, JobFlow, JobStatus
from jobflow.adapters.memory import InMemoryObjectStore
from jobflow.adapters.sqlalchemy import SqlAlchemyJobStore
from jobflow.errors import InvalidInput
from jobflow.models import Change, Event
from tests.integration.conftest import flow_on

pytestmark = pytest.mark.postgres


@pytest.fixture
def watched(pg_engine: sa.Engine) -> Iterator[tuple[sa.Engine, list[str]]]:
    """A second engine on the run's database, and the statements its listener saw."""
    engine = sa.create_engine(pg_engine.url)
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
        seen.append(statement)

    sa.event.listen(engine, "before_cursor_execute", record)
    yield engine, seen
    engine.dispose()


def queue_jobs(flow: JobFlow, objects: InMemoryObjectStore, count: int) -> list[str]:
    job_ids = []
    for _ in range(count):
        ticket = flow.initiate_upload("alice", {"n": len(job_ids)}, content_type="video/mp4")
        objects.put(ticket.key, b"0123456789", content_type="video/mp4")
        flow.complete_upload(ticket.job_id, owner_id="alice")
        job_ids.append(ticket.job_id)
    return job_ids


def test_statement_listeners_see_every_call_of_the_store(
        watched: tuple[sa.Engine, list[str]], objects: InMemoryObjectStore) -> None:
    engine, seen = watched
    flow = flow_on(SqlAlchemyJobStore(engine), objects)
    first, second = queue_jobs(flow, objects, 2)
    assert len(seen) == 6, "twice: initiate_upload (a write), complete_upload (a read, a write)"
    [held] = flow.claim("w1")
    calls: list[Callable[[], object]] = [
        lambda: flow.succeed_and_claim([(held, None)], "w1"), lambda: flow.get(first),
        lambda: flow.history(second), lambda: flow.counts(), lambda: flow.reconcile(),
    ]
    for call in calls:
        before = len(seen)
        call()
        assert len(seen) > before
    assert flow.counts()[JobStatus.DONE] == 1


def test_sqlalchemys_statement_log_sees_the_store(
        pg_engine: sa.Engine, objects: InMemoryObjectStore,
        caplog: pytest.LogCaptureFixture) -> None:
    engine = sa.create_engine(pg_engine.url, echo=True)
    try:
        flow = flow_on(SqlAlchemyJobStore(engine), objects)
        with caplog.at_level(logging.INFO, logger="sqlalchemy.engine"):
            queue_jobs(flow, objects, 1)
            flow.claim("w1")
    finally:
        engine.dispose()
    logged = [record.getMessage() for record in caplog.records]
    assert any("FOR UPDATE SKIP LOCKED" in message for message in logged)


def test_both_ways_read_and_write_the_same_jobs(
        pg_engine: sa.Engine, watched: tuple[sa.Engine, list[str]],
        objects: InMemoryObjectStore) -> None:
    direct = flow_on(SqlAlchemyJobStore(pg_engine), objects)
    through_sqlalchemy = flow_on(SqlAlchemyJobStore(watched[0]), objects)
    job_ids = queue_jobs(direct, objects, 4)
    # Each way finishes a job the other way claimed.
    first, second = direct.claim("w1", limit=2)
    [done], [third] = through_sqlalchemy.succeed_and_claim([(first, {"ok": 1})], "w2")
    [also_done] = direct.succeed_many([(third, {"ok": 3})])
    assert [first.job.id, second.job.id, third.job.id] == job_ids[:3]
    assert isinstance(done, Job) and isinstance(also_done, Job)
    assert (done.status, also_done.status) == (JobStatus.DONE, JobStatus.DONE)
    for job_id in job_ids:
        job = direct.get(job_id)
        assert job == through_sqlalchemy.get(job_id)
        assert job.created_at.tzinfo is UTC and job.updated_at.tzinfo is UTC
        assert isinstance(job.status, JobStatus)
        assert job.params == {"n": job_ids.index(job_id)}
        assert direct.history(job_id) == through_sqlalchemy.history(job_id)
    assert [direct.get(job_id).status for job_id in job_ids] == [
        JobStatus.DONE, JobStatus.QUICK_RUNNING, JobStatus.DONE, JobStatus.QUEUED]
    assert direct.get(job_ids[2]).result == {"ok": 3}
    assert direct.counts() == through_sqlalchemy.counts()


def test_driver_errors_keep_the_parameters_hidden_when_the_engine_does(
        pg_engine: sa.Engine, objects: InMemoryObjectStore) -> None:
    engine = sa.create_engine(pg_engine.url, hide_parameters=True)
    try:
        flow = flow_on(SqlAlchemyJobStore(engine), objects)
        job = flow.get(flow.initiate_upload("alice", content_type="video/mp4").job_id)
        forged = Change(event=Event.VERIFY_UPLOAD, before=job,
                        after=job.evolve(status=JobStatus.QUEUED))
        with pytest.raises(InvalidInput, match="upload_verified_unless_waiting_or_failed") as info:
            flow.store.commit(forged)
    finally:
        engine.dispose()
    cause = str(info.value.__cause__)
    assert "hidden due to hide_parameters=True" in cause and "[parameters:" not in cause


def test_the_pool_gets_its_connections_back_as_it_lent_them(
        pg_engine: sa.Engine, objects: InMemoryObjectStore) -> None:
    """The store runs each statement in autocommit on a pooled connection; a
    host sharing the engine must still get transactions that roll back, after
    a statement of the store succeeded and after one failed."""
    engine = sa.create_engine(pg_engine.url, pool_size=1, max_overflow=0)
    flow = flow_on(SqlAlchemyJobStore(engine), objects)
    job_id = flow.initiate_upload("alice", content_type="video/mp4").job_id

    def host_deletes_the_history_and_rolls_back() -> None:
        with engine.connect() as host:
            host.execute(sa.text("DELETE FROM jobflow_job_events WHERE job_id = :id"),
                         {"id": job_id})
            host.rollback()

    try:
        job = flow.get(job_id)
        host_deletes_the_history_and_rolls_back()
        assert len(flow.history(job_id)) == 1, "after a statement that succeeded"
        forged = Change(event=Event.VERIFY_UPLOAD, before=job,
                        after=job.evolve(status=JobStatus.QUEUED))
        with pytest.raises(InvalidInput):
            flow.store.commit(forged)
        host_deletes_the_history_and_rolls_back()
        assert len(flow.history(job_id)) == 1, "after a statement the database refused"
    finally:
        engine.dispose()


@pytest.mark.parametrize("event", ["handle_error", "engine_connect"])
def test_error_and_connection_listeners_see_the_store_through_sqlalchemy(
        pg_engine: sa.Engine, objects: InMemoryObjectStore, event: str) -> None:
    engine = sa.create_engine(pg_engine.url)
    heard: list[object] = []
    sa.event.listen(engine, event, lambda *args: heard.append(args))
    try:
        flow = flow_on(SqlAlchemyJobStore(engine), objects)
        job = flow.get(flow.initiate_upload("alice", content_type="video/mp4").job_id)
        forged = Change(event=Event.VERIFY_UPLOAD, before=job,
                        after=job.evolve(status=JobStatus.QUEUED))
        heard.clear()
        with pytest.raises(InvalidInput):
            flow.store.commit(forged)
    finally:
        engine.dispose()
    assert heard, f"the {event} listener heard the refused commit"
