"""The claim loop's pipeline on PostgreSQL: statements sent ahead of their
rows on one pooled connection, which goes back to the pool as it was lent,
or is dropped when the pipeline broke."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from jobflow import JobFlow, JobStatus
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
