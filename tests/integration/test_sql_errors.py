"""Driver errors surface as jobflow errors: an unreachable or locked database is
StorageUnavailable (and the next call may succeed), a database without
jobflow's tables is a ConfigurationError, a row the database's constraints
refuse is InvalidInput. test_sql_error_classes covers every class of driver
error, PermanentStorageError (never retryable) included."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import attrs
import pytest
import sqlalchemy as sa

from jobflow import Job, JobFlow, JobStatus, Succeeded
from jobflow import states as core
from jobflow.adapters.memory import InMemoryObjectStore
from jobflow.adapters.sqlalchemy import SqlAlchemyJobStore
from jobflow.errors import (
    ConfigurationError,
    InvalidInput,
    JobNotFound,
    StorageUnavailable,
)
from jobflow.models import Change, Event
from tests.integration.conftest import flow_on
from tests.pgcluster import free_port

SOME_JOB = "00000000-0000-4000-8000-000000000000"
#: The application name of the connections a test kills.
DOOMED = "jobflow-test-doomed"


def every_call_is_unavailable(store: SqlAlchemyJobStore) -> None:
    flow = flow_on(store, InMemoryObjectStore())
    calls = [
        lambda: flow.initiate_upload("alice", content_type="video/mp4"),
        lambda: flow.get(SOME_JOB), lambda: flow.history(SOME_JOB),
        lambda: flow.claim("w1"), lambda: flow.counts(), lambda: flow.reconcile(),
    ]
    for call in calls:
        with pytest.raises(StorageUnavailable) as info:
            call()
        assert isinstance(info.value.__cause__, sa.exc.DBAPIError)


def test_an_unreachable_postgres_is_storage_unavailable() -> None:
    engine = sa.create_engine(f"postgresql+psycopg://jobflow@127.0.0.1:{free_port()}/jobflow",
                              connect_args={"connect_timeout": 5})
    try:
        every_call_is_unavailable(SqlAlchemyJobStore(engine))
    finally:
        engine.dispose()


def test_an_unopenable_sqlite_file_is_storage_unavailable(tmp_path: Path) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'missing-folder' / 'jobs.sqlite3'}")
    try:
        every_call_is_unavailable(SqlAlchemyJobStore(engine))
    finally:
        engine.dispose()


@pytest.fixture
def own_pg_engine(pg_engine: sa.Engine) -> Iterator[sa.Engine]:
    """An engine of its own on the run's database, so killing its connections
    cannot disturb other tests."""
    engine = sa.create_engine(pg_engine.url, connect_args={"application_name": DOOMED})
    yield engine
    engine.dispose()


@pytest.mark.postgres
@pytest.mark.parametrize("call", ["get", "claim"])
def test_a_dropped_connection_fails_one_call_and_the_next_reconnects(
        own_pg_engine: sa.Engine, pg_engine: sa.Engine, call: str) -> None:
    objects = InMemoryObjectStore()
    flow = flow_on(SqlAlchemyJobStore(own_pg_engine), objects)
    ticket = flow.initiate_upload("alice", content_type="video/mp4")
    objects.put(ticket.key, b"0123456789", content_type="video/mp4")
    flow.complete_upload(ticket.job_id)
    with pg_engine.connect() as admin:
        killed = admin.execute(sa.text(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = :doomed"), {"doomed": DOOMED}).scalar_one()
    assert killed >= 1
    read_or_claim = {"get": lambda: flow.get(ticket.job_id), "claim": lambda: flow.claim("w1")}
    with pytest.raises(StorageUnavailable, match="lost the database connection"):
        read_or_claim[call]()
    assert flow.get(ticket.job_id).status is JobStatus.QUEUED, "the claim was not written"
    [claim] = flow.claim("w1")
    assert claim.job.id == ticket.job_id


@pytest.mark.postgres
@pytest.mark.parametrize("listened", [False, True], ids=["plain", "with-listeners"])
def test_a_statement_postgres_rolls_back_to_break_a_deadlock_runs_again(
        pg_engine: sa.Engine, listened: bool) -> None:
    engine = sa.create_engine(pg_engine.url, connect_args={"application_name": DOOMED})
    if listened:
        sa.event.listen(engine, "before_cursor_execute", lambda *args: None)
        sa.event.listen(engine, "handle_error", lambda *args: None)
    objects = InMemoryObjectStore()
    flow = flow_on(SqlAlchemyJobStore(engine), objects)
    ticket = flow.initiate_upload("alice", content_type="video/mp4")
    objects.put(ticket.key, b"0123456789", content_type="video/mp4")
    flow.complete_upload(ticket.job_id)
    [held] = flow.claim("w1")
    job = {"job": held.job.id, "seq": len(flow.history(held.job.id)) + 1}
    try:
        with pg_engine.connect() as other, ThreadPoolExecutor(1) as pool:
            # Another transaction holds the history row the store's statement will
            # write next, then waits for the job row that statement locked.
            other.execute(sa.text(
                "INSERT INTO jobflow_job_events (job_id, seq, event, from_status, to_status, at,"
                " attempt, detail)"
                " VALUES (:job, :seq, 'heartbeat', 'quick_running', 'quick_running', now(), 1,"
                " '{}')"), job)
            finishing = pool.submit(flow.finish_many, [Succeeded(held, {"n": 1})])
            waiting = sa.text("SELECT count(*) FROM pg_stat_activity "
                              "WHERE application_name = :doomed AND wait_event_type = 'Lock'")
            deadline = time.monotonic() + 10
            while not other.execute(waiting, {"doomed": DOOMED}).scalar_one():
                assert time.monotonic() < deadline, "the store's statement never waited"
                time.sleep(0.01)
            # A deadlock: PostgreSQL rolls back the statement that waited first, the store's.
            other.execute(sa.text("UPDATE jobflow_jobs SET updated_at = updated_at "
                                  "WHERE id = :job"), job)
            other.rollback()
            [done] = finishing.result(timeout=30)
        assert isinstance(done, Job) and done.status is JobStatus.DONE
        assert done.result == {"n": 1}
        assert [row.event for row in flow.history(held.job.id)] == [
            Event.CREATED, Event.VERIFY_UPLOAD, Event.CLAIM, Event.SUCCEED]
    finally:
        engine.dispose()


@pytest.fixture
def sqlite_engines(sqlite_template: Path, tmp_path: Path) -> Iterator[tuple[sa.Engine, sa.Engine]]:
    """Two engines on one migrated SQLite file: jobflow's, and another writer's."""
    path = tmp_path / "jobs.sqlite3"
    path.write_bytes(sqlite_template.read_bytes())
    engine = sa.create_engine(f"sqlite:///{path}")
    other_writer = sa.create_engine(f"sqlite:///{path}")
    yield engine, other_writer
    engine.dispose()
    other_writer.dispose()


def test_a_locked_sqlite_database_is_storage_unavailable_until_released(
        sqlite_engines: tuple[sa.Engine, sa.Engine]) -> None:
    engine, other_writer = sqlite_engines
    flow = flow_on(SqlAlchemyJobStore(engine, busy_timeout_seconds=0.05), InMemoryObjectStore())
    with other_writer.connect() as conn:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
        with pytest.raises(StorageUnavailable, match="database is locked"):
            flow.initiate_upload("alice", content_type="video/mp4")
        assert flow.counts()[JobStatus.AWAITING_UPLOAD] == 0  # readers are not blocked
        conn.rollback()
    flow.initiate_upload("alice", content_type="video/mp4")
    assert flow.counts()[JobStatus.AWAITING_UPLOAD] == 1


def test_a_batch_write_that_fails_writes_none_of_its_changes(
        sql_flow: JobFlow, sql_store: SqlAlchemyJobStore) -> None:
    """One change the database refuses fails the whole batch, the changes
    before it included."""
    first, second = (sql_flow.get(sql_flow.initiate_upload("alice", content_type="video/mp4")
                                  .job_id) for _ in range(2))
    now = datetime.now(UTC)
    cancelled = core.apply(first, Event.CANCEL, core.Evidence(now=now))
    forged = Change(event=Event.VERIFY_UPLOAD, before=second,
                    after=attrs.evolve(second, status=JobStatus.QUEUED, updated_at=now))
    for batch in ([cancelled, forged], [forged, cancelled]):
        with pytest.raises(InvalidInput, match="upload_verified_unless_waiting_or_failed"):
            sql_store.commit_many(batch)
        for job in (first, second):
            assert sql_flow.get(job.id) == job
            assert len(sql_flow.history(job.id)) == 1
    also_cancelled = core.apply(second, Event.CANCEL, core.Evidence(now=now))
    assert sql_store.commit_many([cancelled, also_cancelled]) == [cancelled.after,
                                                                   also_cancelled.after]


def test_a_database_without_jobflow_tables_is_a_configuration_error(
        empty_database: sa.URL) -> None:
    engine = sa.create_engine(empty_database)
    try:
        flow = flow_on(SqlAlchemyJobStore(engine), InMemoryObjectStore())
        with pytest.raises(ConfigurationError, match=r"jobflow\.migrations\.upgrade"):
            flow.get(SOME_JOB)
        with pytest.raises(ConfigurationError):
            flow.initiate_upload("alice", content_type="video/mp4")
    finally:
        engine.dispose()


def test_only_postgres_and_sqlite_are_supported() -> None:
    mysql = sa.create_mock_engine("mysql://", executor=lambda *args, **kwargs: None)
    with pytest.raises(ConfigurationError, match="PostgreSQL and SQLite, not 'mysql'"):
        SqlAlchemyJobStore(mysql)  # type: ignore[arg-type]


def test_the_database_refuses_a_queued_job_without_a_verified_upload(
        sql_flow: JobFlow, sql_store: SqlAlchemyJobStore) -> None:
    """Invariant 1 holds even against a buggy caller that skips the state machine."""
    job = sql_flow.get(sql_flow.initiate_upload("alice", content_type="video/mp4").job_id)
    forged = Change(event=Event.VERIFY_UPLOAD, before=job,
                    after=attrs.evolve(job, status=JobStatus.QUEUED,
                                       updated_at=datetime.now(UTC)))
    with pytest.raises(InvalidInput, match="upload_verified_unless_waiting_or_failed"):
        sql_store.commit(forged)
    assert sql_flow.get(job.id) == job
    assert len(sql_flow.history(job.id)) == 1


def test_unknown_jobs_are_not_found_and_their_commits_lose(
        sql_flow: JobFlow, sql_store: SqlAlchemyJobStore) -> None:
    for job_id in (SOME_JOB, "not-a-uuid", SOME_JOB.upper()):
        with pytest.raises(JobNotFound):
            sql_store.get(job_id)
        with pytest.raises(JobNotFound):
            sql_store.history(job_id)
    job = sql_flow.get(sql_flow.initiate_upload("alice", content_type="video/mp4").job_id)
    ghost = attrs.evolve(job, id=SOME_JOB)
    cancelled = attrs.evolve(ghost, status=JobStatus.FAILED, error_code="cancelled")
    assert sql_store.commit(Change(event=Event.CANCEL, before=ghost, after=cancelled)) is None
    with pytest.raises(JobNotFound):
        sql_store.get(SOME_JOB)
