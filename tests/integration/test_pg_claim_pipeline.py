"""The claim loop's pipeline on PostgreSQL: statements sent ahead of their
rows on one pooled connection, which goes back to the pool as it was lent,
or is dropped when the pipeline broke."""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa

from jobflow import Event, JobFlow, JobStatus
from jobflow.adapters.memory import InMemoryObjectStore
from jobflow.adapters.sqlalchemy import PostgresClaimPipeline, SqlAlchemyJobStore
from jobflow.errors import StorageUnavailable
from tests.integration.conftest import flow_on

pytestmark = pytest.mark.postgres


def queue(flow: JobFlow, objects: InMemoryObjectStore, count: int) -> set[str]:
    job_ids = set()
    for _ in range(count):
        ticket = flow.initiate_upload("alice", content_type="video/mp4")
        objects.put(ticket.key, b"0123456789", content_type="video/mp4")
        job_ids.add(flow.complete_upload(ticket.job_id).id)
    return job_ids


def test_statements_are_in_flight_together_and_come_back_in_order(
        pg_engine: sa.Engine, objects: InMemoryObjectStore) -> None:
    engine = sa.create_engine(pg_engine.url, pool_size=1, max_overflow=0)
    store = SqlAlchemyJobStore(engine)
    flow = flow_on(store, objects)
    job_ids = queue(flow, objects, 3)
    pipeline = store.claim_pipeline(worker_id="w1", limit=2, lease_seconds=60)
    assert isinstance(pipeline, PostgresClaimPipeline)
    for token in ("first", "second"):
        pipeline.send(token, [], now=flow.now())
    assert pipeline.in_flight == 2
    first, second = pipeline.receive(), pipeline.receive()
    pipeline.close()
    assert [first[0], second[0]] == ["first", "second"]
    assert (len(first[2]), len(second[2])) == (2, 1)
    assert {claim.job.id for claim in first[2] + second[2]} == job_ids
    assert engine.pool.checkedout() == 0
    with engine.connect() as conn:  # the connection came back out of autocommit
        conn.execute(sa.text("DELETE FROM jobflow_job_events"))
        conn.rollback()
        assert conn.execute(sa.text("SELECT count(*) FROM jobflow_job_events")).scalar() == 9
    engine.dispose()


def test_engines_whose_statements_are_watched_get_no_pipeline(pg_engine: sa.Engine) -> None:
    engine = sa.create_engine(pg_engine.url)
    sa.event.listen(engine, "before_cursor_execute", lambda *args: None)
    assert SqlAlchemyJobStore(engine).claim_pipeline(worker_id="w1", limit=1,
                                                     lease_seconds=60) is None
    engine.dispose()


def test_a_connection_lost_mid_loop_raises_storage_unavailable(
        pg_engine: sa.Engine, objects: InMemoryObjectStore) -> None:
    engine = sa.create_engine(pg_engine.url, connect_args={"application_name": "lost-loop"})
    flow = flow_on(SqlAlchemyJobStore(engine), objects)
    job_ids = queue(flow, objects, 4)
    with (pytest.raises(StorageUnavailable, match="in a pipeline"),
          flow.claim_loop("w1", limit=1) as loop):
        [claim] = next(loop)
        with pg_engine.connect() as admin:
            admin.execute(sa.text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'lost-loop'"))
        loop.succeed([(claim, None)])
        next(loop)
    assert engine.pool.checkedout() == 0
    statuses = {flow.get(job_id).status for job_id in job_ids}  # the pool recovered
    assert statuses <= {JobStatus.QUEUED, JobStatus.QUICK_RUNNING, JobStatus.DONE}
    engine.dispose()


def deadlock_a_batch(flow: JobFlow, objects: InMemoryObjectStore, pg_engine: sa.Engine,
                     which: int) -> bool:
    """Lock job ``which`` (in id order) of a batch of three; once the pipeline's
    finishing statement waits for it, holding another job of the batch, ask
    for that one. False when the statement waited before holding any other
    job (no deadlock), or when PostgreSQL rolled back the other transaction
    instead (whichever side's deadlock check runs first gives way)."""
    lock = "SELECT id FROM jobflow_jobs WHERE id = :id FOR UPDATE"
    job_ids = queue(flow, objects, 3)
    other_waited: list[bool] = []
    with flow.claim_loop("w1", limit=3) as loop, pg_engine.connect() as other:
        claims = next(loop)
        others = sorted(claim.job.id for claim in claims)
        locked = others.pop(which)
        other.execute(sa.text(lock), {"id": locked})
        loop.succeed([(claim, None) for claim in claims])
        with pg_engine.connect() as watcher:
            while not watcher.execute(sa.text(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = "
                    "'deadlock-loop' AND wait_event_type = 'Lock'")).scalar():
                watcher.rollback()
        held = []  # the batch's jobs the pipeline's statement holds while it waits
        for job_id in others:
            other.execute(sa.text("SAVEPOINT probe"))
            try:
                other.execute(sa.text(lock + " NOWAIT"), {"id": job_id})
            except sa.exc.OperationalError:
                held.append(job_id)
            other.execute(sa.text("ROLLBACK TO SAVEPOINT probe"))
        if not held:
            other.rollback()
            assert list(loop) == []
            return False

        def take_a_held_job() -> None:
            try:
                other.execute(sa.text("UPDATE jobflow_jobs SET updated_at = updated_at "
                                      "WHERE id = :id"), {"id": held[0]})
                other_waited.append(True)
            except sa.exc.OperationalError:  # this side was rolled back
                other_waited.append(False)
            finally:
                other.rollback()

        taker = threading.Thread(target=take_a_held_job)
        taker.start()
        assert list(loop) == []
        taker.join()
    for job_id in job_ids:
        assert flow.get(job_id).status is JobStatus.DONE
        assert [row.event for row in flow.history(job_id)].count(Event.SUCCEED) == 1
    return other_waited == [True]


def test_a_statement_rolled_back_by_a_deadlock_is_sent_again(
        pg_engine: sa.Engine, objects: InMemoryObjectStore) -> None:
    """PostgreSQL rolls the pipeline's statement back (it waited first), and
    the pipeline sends it again. The statement takes a batch's jobs in its
    plan's order; a batch where it waits before holding any other job cannot
    deadlock, and the test tries a new one."""
    engine = sa.create_engine(pg_engine.url, connect_args={"application_name": "deadlock-loop"})
    flow = flow_on(SqlAlchemyJobStore(engine), objects)
    assert any(deadlock_a_batch(flow, objects, pg_engine, which)
               for which in (1, 2, 0, 1, 2, 0)), "the pipeline's statement was never rolled back"
    engine.dispose()
