"""The PostgreSQL store sends every statement through SQLAlchemy's execution
layer, whatever the engine has attached: its statement log (``echo``) and its
listeners (as tracing instrumentation attaches them) see each statement with
its parameters, and an engine with listeners reads and writes exactly what a
plain one does."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa

from jobflow import Event, Job, JobFlow, JobStatus, Succeeded
from jobflow import states as core
from jobflow.adapters.memory import InMemoryObjectStore
from jobflow.adapters.sqlalchemy import SqlAlchemyJobStore
from jobflow.errors import InvalidInput
from jobflow.keys import upload_key
from jobflow.models import Change, Claim
from tests.integration.conftest import flow_on
from tests.sqlstores import ListenedEngine, listened_engine
from tests.strategies import POLICY

pytestmark = pytest.mark.postgres


@pytest.fixture
def listened(pg_engine: sa.Engine) -> Iterator[ListenedEngine]:
    """A second engine on the run's database, with statement listeners."""
    listened = listened_engine(pg_engine.url)
    yield listened
    listened.engine.dispose()


def queue_jobs(flow: JobFlow, objects: InMemoryObjectStore, count: int) -> list[str]:
    job_ids = []
    for _ in range(count):
        ticket = flow.initiate_upload("alice", {"n": len(job_ids)}, content_type="video/mp4")
        objects.put(ticket.key, b"0123456789", content_type="video/mp4")
        flow.complete_upload(ticket.job_id, owner_id="alice")
        job_ids.append(ticket.job_id)
    return job_ids


def succeeded(claim: Claim, now: datetime) -> Change:
    return core.apply(claim.job, Event.SUCCEED, core.Evidence(
        now=now, token=claim.token, result={"job": claim.job.id}))


def test_each_call_of_the_store_is_one_statement_its_listeners_see(
        listened: ListenedEngine, objects: InMemoryObjectStore) -> None:
    engine, log = listened
    store = SqlAlchemyJobStore(engine)
    first, _, _ = queue_jobs(flow_on(store, objects), objects, 3)
    now = datetime.now(UTC)
    claims: list[Claim] = []
    job_id = str(uuid.uuid4())
    created = core.new_job(job_id=job_id, owner_id="bob", params={}, bucket="videos",
                           key=upload_key(job_id), content_type="video/mp4",
                           expected_sha256=None, now=now, policy=POLICY)
    calls: list[tuple[str, Callable[[], object]]] = [
        ("INSERT INTO jobflow_jobs", lambda: store.create(created)),
        ("FOR UPDATE SKIP LOCKED", lambda: claims.extend(
            store.claim(worker_id="w1", limit=3, now=now, lease_seconds=60))),
        ("UPDATE jobflow_jobs", lambda: store.commit(succeeded(claims[0], now))),
        ("unnest(", lambda: store.commit_many([succeeded(c, now) for c in claims[1:]])),
        ("FROM jobflow_jobs", lambda: store.get(first)),
        ("FROM jobflow_job_events", lambda: store.history(first)),
        ("GROUP BY jobflow_jobs.status", store.counts),
        ("'awaiting_upload'", lambda: store.awaiting_uploads(limit=10)),
        ("'quick_running'", lambda: store.expired_leases(now=now, limit=10)),
        ("'failed'", lambda: store.failed_since(since=now, limit=10)),
    ]
    for fragment, call in calls:
        started = log.started
        call()
        assert log.started == started + 1, fragment
        assert log.unaccounted == 0, fragment
        assert fragment in log.sent[-1][0], fragment
    assert len(claims) == 3
    assert store.counts()[JobStatus.DONE] == 3


def test_statement_listeners_see_each_statements_parameters(
        listened: ListenedEngine, objects: InMemoryObjectStore) -> None:
    """What tracing instrumentation reads in ``before_cursor_execute``."""
    engine, log = listened
    flow = flow_on(SqlAlchemyJobStore(engine), objects)
    first, second = queue_jobs(flow, objects, 2)
    flow.get(first)
    assert log.sent[-1][1]["job_id"] == first
    claims = flow.claim("w1", limit=2)
    statement, parameters = log.sent[-1]
    assert "SKIP LOCKED" in statement and parameters["worker_id"] == "w1"
    flow.finish_many([Succeeded(claim, {"ok": 1}) for claim in claims])
    statement, parameters = log.sent[-1]
    assert "unnest(" in statement
    low, high = sorted([first, second])
    assert parameters["batch_job_id"] == f'{{"{low}","{high}"}}'  # an array literal


def test_a_listener_that_rewrites_statements_is_obeyed(
        pg_engine: sa.Engine, objects: InMemoryObjectStore) -> None:
    """SQL commenters (tracing context in a comment) return the statement they send."""
    engine = sa.create_engine(pg_engine.url)
    commented: list[str] = []

    def comment(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any,
                executemany: bool) -> tuple[str, Any]:
        commented.append(statement)
        return f"{statement} /*traceparent='00-{uuid.uuid4().hex}-{'0' * 16}-01'*/", parameters

    sa.event.listen(engine, "before_cursor_execute", comment, retval=True)
    try:
        flow = flow_on(SqlAlchemyJobStore(engine), objects)
        job_ids = queue_jobs(flow, objects, 2)
        outcomes = flow.finish_many([Succeeded(claim) for claim in flow.claim("w1", limit=2)])
    finally:
        engine.dispose()
    assert [job.status for job in outcomes if isinstance(job, Job)] == [JobStatus.DONE] * 2
    assert {job.id for job in outcomes if isinstance(job, Job)} == set(job_ids)
    assert any("SKIP LOCKED" in statement for statement in commented)


def test_sqlalchemys_statement_log_sees_the_store(
        pg_engine: sa.Engine, objects: InMemoryObjectStore,
        caplog: pytest.LogCaptureFixture) -> None:
    engine = sa.create_engine(pg_engine.url, echo=True)
    try:
        flow = flow_on(SqlAlchemyJobStore(engine), objects)
        with caplog.at_level(logging.INFO, logger="sqlalchemy.engine"):
            queue_jobs(flow, objects, 2)
            flow.finish_many([Succeeded(claim) for claim in flow.claim("w1", limit=2)])
    finally:
        engine.dispose()
    logged = "\n".join(record.getMessage() for record in caplog.records)
    for fragment in ("INSERT INTO jobflow_jobs", "UPDATE jobflow_jobs", "FOR UPDATE SKIP LOCKED",
                     "unnest(", "'worker_id': 'w1'"):
        assert fragment in logged


def test_an_engine_with_listeners_reads_and_writes_what_a_plain_one_does(
        pg_engine: sa.Engine, listened: ListenedEngine,
        objects: InMemoryObjectStore) -> None:
    plain = flow_on(SqlAlchemyJobStore(pg_engine), objects)
    with_listeners = flow_on(SqlAlchemyJobStore(listened.engine), objects)
    job_ids = queue_jobs(plain, objects, 3) + queue_jobs(with_listeners, objects, 2)
    # Each finishes jobs the other claimed.
    first, second = plain.claim("w1", limit=2)
    third, fourth = with_listeners.claim("w2", limit=2)
    done = with_listeners.finish_many([Succeeded(first, {"ok": 1}), Succeeded(second)])
    also_done = plain.finish_many([Succeeded(third, {"ok": 3})])
    assert [claim.job.id for claim in (first, second, third, fourth)] == job_ids[:4]
    assert all(isinstance(job, Job) and job.status is JobStatus.DONE
               for job in [*done, *also_done])
    for job_id in job_ids:
        job = plain.get(job_id)
        assert job == with_listeners.get(job_id)
        assert job.created_at.tzinfo is UTC and job.updated_at.tzinfo is UTC
        assert isinstance(job.status, JobStatus)
        assert job.params == {"n": job_ids.index(job_id) % 3}
        assert plain.history(job_id) == with_listeners.history(job_id)
    assert [plain.get(job_id).status for job_id in job_ids] == [
        JobStatus.DONE, JobStatus.DONE, JobStatus.DONE, JobStatus.QUICK_RUNNING, JobStatus.QUEUED]
    assert plain.get(job_ids[2]).result == {"ok": 3}
    assert plain.counts() == with_listeners.counts()


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
def test_error_and_connection_listeners_hear_the_store(
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
