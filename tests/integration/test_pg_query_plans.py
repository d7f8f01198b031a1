"""The hot PostgreSQL queries can use their partial indexes: claiming queued jobs
and the scans of reconcile and monitoring never need to read finished jobs,
retention's scans read only the finished jobs of one status, and a batch write
finds its jobs by primary key."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa
from psycopg.sql import Literal

from jobflow import Event, JobStatus
from jobflow import states as core
from jobflow.adapters.sqlalchemy import SqlAlchemyJobStore
from jobflow.models import Change, Claim

NOW = datetime(2030, 1, 1, tzinfo=UTC)
NOW_ID = "00000000-0000-4000-8000-000000000000"
Statement = tuple[str, Any]


@pytest.fixture
def executed(pg_engine: sa.Engine) -> Iterator[list[Statement]]:
    """Every statement the engine sends, with its parameters."""
    statements: list[Statement] = []

    def record(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any,
               executemany: bool) -> None:
        statements.append((statement, parameters))

    sa.event.listen(pg_engine, "before_cursor_execute", record)
    yield statements
    sa.event.remove(pg_engine, "before_cursor_execute", record)


def generic_plan_of(engine: sa.Engine, statement: Statement, *, seqscan: bool = False) -> str:
    """The plan PostgreSQL uses for the statement prepared once and run with any
    parameters (a generic plan, as for psycopg's prepared statements); unless
    ``seqscan``, when scanning the whole table is not an option."""
    sql, parameters = statement
    names = list(dict.fromkeys(re.findall(r"%\((\w+)\)s", sql)))
    numbered = re.sub(r"%\((\w+)\)s", lambda m: f"${names.index(m[1]) + 1}", sql)
    with engine.connect() as conn:
        driver = conn.connection.dbapi_connection
        arguments = ", ".join(Literal(parameters[name]).as_string(driver) for name in names)
        if not seqscan:
            conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
        conn.exec_driver_sql("SET LOCAL plan_cache_mode = force_generic_plan")
        conn.exec_driver_sql(f"PREPARE scan AS {numbered}")
        plan = "\n".join(conn.exec_driver_sql(f"EXPLAIN EXECUTE scan({arguments})").scalars())
        # Prepared statements outlive transactions; psycopg's rollback may also
        # deallocate them all, so let go of this one before rolling back.
        conn.exec_driver_sql("DEALLOCATE scan")
        conn.rollback()
    return plan


@pytest.mark.postgres
@pytest.mark.parametrize(("call", "index"), [
    (lambda store: store.claim(worker_id="w", limit=10, now=NOW, lease_seconds=60),
     "ix_jobflow_jobs_queued_run_at"),
    (lambda store: store.awaiting_uploads(limit=10),
     "ix_jobflow_jobs_awaiting_upload_expires_at"),
    (lambda store: store.expired_leases(now=NOW, limit=10),
     "ix_jobflow_jobs_running_lease_expires_at"),
    (lambda store: store.failed_since(since=NOW, limit=10),
     "ix_jobflow_jobs_failed_finished_at"),
    (lambda store: store.purge_finished(status=JobStatus.DONE, finished_before=NOW, limit=10),
     "ix_jobflow_jobs_done_finished_at"),
    (lambda store: store.purge_finished(status=JobStatus.FAILED, finished_before=NOW,
                                        limit=10),
     "ix_jobflow_jobs_failed_finished_at"),
    (lambda store: store.count_finished(status=JobStatus.DONE, finished_before=NOW),
     "ix_jobflow_jobs_done_finished_at"),
    (lambda store: store.failed_after(error_code="x", after=(NOW, NOW_ID), limit=10),
     "ix_jobflow_jobs_failed_finished_at"),
], ids=["claim", "awaiting_uploads", "expired_leases", "failed_since", "purge_done",
        "purge_failed", "count_finished", "failed_after"])
def test_each_scan_uses_its_partial_index(
        pg_engine: sa.Engine, executed: list[Statement],
        call: Callable[[SqlAlchemyJobStore], object], index: str) -> None:
    call(SqlAlchemyJobStore(pg_engine))
    [statement] = executed
    assert index in generic_plan_of(pg_engine, statement)


QUEUED_JOBS = 5_000
SEED_QUEUED = """
INSERT INTO jobflow_jobs (
    id, owner_id, status, params, bucket, object_key, content_type, created_at, updated_at,
    upload_expires_at, run_at, max_attempts, attempts, upload_verified_at, object_size,
    object_etag, history_length)
SELECT gen_random_uuid(), 'alice', 'queued', '{}', 'b', 'uploads/' || n, 'video/mp4',
       t, t, t, t + n * interval '1 second', 3, 0, t, 10, 'etag', 2
FROM generate_series(1, %(count)s) AS n, (SELECT timestamptz '2029-12-01' AS t) AS at
"""


def succeeded(claims: list[Claim]) -> list[Change]:
    return [core.apply(claim.job, Event.SUCCEED, core.Evidence(
        now=NOW, token=claim.token, result={"n": index})) for index, claim in enumerate(claims)]


def seed_queue(engine: sa.Engine, count: int) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql(SEED_QUEUED, {"count": count})
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("ANALYZE jobflow_jobs")


@pytest.mark.postgres
def test_claims_and_batch_writes_reach_jobs_through_indexes_whatever_the_batch_size(
        pg_engine: sa.Engine, executed: list[Statement]) -> None:
    """A plan made once for every batch size must not scan the whole table to
    find the jobs it writes: a claim goes through the partial index of queued
    jobs and then by primary key (a join on the picked ids let it hash the
    whole table), a batch write by primary key (the planner cannot see how long
    its arrays are)."""
    seed_queue(pg_engine, QUEUED_JOBS)
    store = SqlAlchemyJobStore(pg_engine)
    claims = store.claim(worker_id="w", limit=100, now=NOW, lease_seconds=60)
    finished = succeeded(claims)
    assert store.commit_many(finished) == [change.after for change in finished]
    *_, claiming, batch_write = executed  # after the seeding
    assert "SKIP LOCKED" in claiming[0] and "unnest(" in batch_write[0]
    for statement in (claiming, batch_write):
        plan = generic_plan_of(pg_engine, statement, seqscan=True)
        assert "Seq Scan on jobflow_jobs" not in plan, plan
    assert "ix_jobflow_jobs_queued_run_at" in generic_plan_of(pg_engine, claiming)
    assert "pk_jobflow_jobs" in generic_plan_of(pg_engine, batch_write, seqscan=True)


PREPARED_PLANS = """
SELECT generic_plans, custom_plans FROM pg_prepared_statements
WHERE strpos(statement, 'SKIP LOCKED') > 0 OR strpos(statement, 'WITH changed AS') > 0
ORDER BY prepare_time
"""


@pytest.mark.postgres
@pytest.mark.parametrize("batch", [1, 10])
def test_prepared_claims_and_finishes_are_not_planned_again_at_every_call(
        pg_engine: sa.Engine, batch: int) -> None:
    """psycopg prepares a statement from its fifth run on; PostgreSQL then tries
    five custom plans before it settles on one plan for every call. With a
    long queue it must still settle, for a claim and for the write that
    finishes what it took (one commit, or a batch write): planning these
    statements costs about as much as running them."""
    seed_queue(pg_engine, 20_000)
    engine = sa.create_engine(pg_engine.url, pool_size=1, max_overflow=0)
    try:
        store = SqlAlchemyJobStore(engine)
        calls = 20
        for _ in range(calls):
            finished = succeeded(store.claim(worker_id="w", limit=batch, now=NOW,
                                             lease_seconds=60))
            assert store.commit_many(finished) == [change.after for change in finished]
        with engine.connect() as conn:  # the pool's one connection: its prepared statements
            plans = conn.exec_driver_sql(PREPARED_PLANS).all()
    finally:
        engine.dispose()
    assert len(plans) == 2
    for generic, custom in plans:
        assert custom <= 5 and generic == calls - 5 - custom, (generic, custom)
