"""Every statement the monitoring sends reads an index on PostgreSQL: the
snapshot behind the Prometheus gauges, and each page of the dashboard.

A table of a million jobs would take minutes to fill here. Instead the table
holds tens of thousands, is analyzed, and each statement is planned as a
prepared statement (the generic plan psycopg's prepared statements end up
with) with ``enable_seqscan = off``: where no index serves a query the
planner still has to scan the table and the plan says ``Seq Scan``, so the
check fails exactly when a query lacks its index, whatever the table's size.
A full scan of an unrelated index would get past that, so the plans must
also name the index each part of a statement is meant to read.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from jobflow import JobFlow
from jobflow.adapters.memory import InMemoryObjectStore
from jobflow.adapters.sqlalchemy import SqlAlchemyJobStore
from jobflow.dashboard import Dashboard
from jobflow.metrics import JobflowMetrics
from jobflow.monitoring import take_snapshot
from tests.integration.test_pg_query_plans import generic_plan_of

pytestmark = pytest.mark.postgres

Statement = tuple[str, Any]
INDEXES = {status: f"ix_jobflow_jobs_{name}" for status, name in [
    ("awaiting_upload", "awaiting_upload_expires_at"), ("queued", "queued_run_at"),
    ("quick_running", "running_lease_expires_at"), ("done", "done_finished_at"),
    ("failed", "failed_finished_at")]}

#: 40,000 done, 5,000 failed in the last hour (five error codes), 2,000 each
#: waiting and queued, 1,000 running, spread over the last seven hours.
SEED = """
INSERT INTO jobflow_jobs (
    id, owner_id, status, params, bucket, object_key, content_type, created_at, updated_at,
    upload_expires_at, run_at, max_attempts, attempts, upload_verified_at, object_size,
    object_etag, lease_token, lease_owner, lease_expires_at, started_at, finished_at,
    error_code, error_message, history_length)
SELECT gen_random_uuid(), 'owner-' || (n %% 97), s.status, '{"preset": "720p"}', 'videos',
       'uploads/' || n, 'video/mp4', t, t, t + interval '1 hour', t,
       3, CASE WHEN s.status = 'awaiting_upload' THEN 0 ELSE 1 END,
       CASE WHEN s.status <> 'awaiting_upload' THEN t END, 1024, 'etag',
       CASE WHEN s.status = 'quick_running' THEN 'token-' || n END,
       CASE WHEN s.status = 'quick_running' THEN 'worker' END,
       CASE WHEN s.status = 'quick_running' THEN t + interval '1 minute' END,
       CASE WHEN s.status IN ('quick_running', 'done', 'failed') THEN t END,
       CASE WHEN s.status IN ('done', 'failed') THEN t + interval '1 second' END,
       CASE WHEN s.status = 'failed' THEN 'code_' || (n %% 5) END,
       CASE WHEN s.status = 'failed' THEN 'broken' END, 3
FROM generate_series(1, 50000) AS n,
     LATERAL (SELECT now() - n * interval '0.5 seconds' AS t) AS at,
     LATERAL (SELECT CAST(CASE WHEN n <= 5000 THEN 'failed'
                               WHEN n <= 7000 THEN 'awaiting_upload'
                               WHEN n <= 9000 THEN 'queued'
                               WHEN n <= 10000 THEN 'quick_running'
                               ELSE 'done' END AS jobflow_job_status) AS status) AS s
"""


@pytest.fixture
def seeded(pg_engine: sa.Engine) -> sa.Engine:
    with pg_engine.begin() as conn:
        conn.exec_driver_sql(SEED)
    with pg_engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM ANALYZE jobflow_jobs")
    return pg_engine


@pytest.fixture
def executed(seeded: sa.Engine) -> Iterator[list[Statement]]:
    """Every statement sent from now on that reads jobflow's tables, with its
    parameters (``SET`` and the store clock's reading of the server's time aside)."""
    statements: list[Statement] = []

    def record(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any,
               executemany: bool) -> None:
        if "jobflow_" in statement and not statement.lstrip().upper().startswith("SET "):
            statements.append((statement, parameters))

    sa.event.listen(seeded, "before_cursor_execute", record)
    yield statements
    sa.event.remove(seeded, "before_cursor_execute", record)


def flow_on(engine: sa.Engine) -> JobFlow:
    return JobFlow(store=SqlAlchemyJobStore(engine), objects=InMemoryObjectStore(),
                   metrics=JobflowMetrics(None))


def plan_of(engine: sa.Engine, statement: Statement) -> str:
    """The generic plan of a statement with parameters, the plan of one without."""
    if statement[1]:
        return generic_plan_of(engine, statement)
    with engine.connect() as conn:
        conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
        plan = "\n".join(conn.exec_driver_sql(f"EXPLAIN {statement[0]}").scalars())
        conn.rollback()
    return plan


def scans(plan: str) -> set[str]:
    """The indexes a plan reads."""
    return set(re.findall(r"(?:Scan (?:Backward )?using|Bitmap Index Scan on) (\w+)", plan))


def test_the_snapshot_reads_each_status_from_its_own_index(seeded: sa.Engine,
                                                           executed: list[Statement]) -> None:
    snapshot = take_snapshot(flow_on(seeded))
    assert snapshot.counts["done"] == 40_000 and snapshot.failed_recently == 5_000
    [statement] = executed
    plan = plan_of(seeded, statement)
    assert "Seq Scan" not in plan, plan
    assert scans(plan) == set(INDEXES.values()), plan


def test_every_dashboard_page_reads_indexes_only(seeded: sa.Engine,
                                                 executed: list[Statement]) -> None:
    flow = flow_on(seeded)
    with seeded.connect() as conn:
        some_job = str(conn.execute(sa.text(
            "SELECT id FROM jobflow_jobs WHERE status = 'failed' LIMIT 1")).scalar_one())
    executed.clear()
    pages = ["/", "/failures?code=code_3", "/failures?code=unknown", f"/job/{some_job}",
             f"/search?q={some_job[:6]}", f"/search?q={some_job}",
             *(f"/jobs?status={status}" for status in INDEXES)]
    transport = httpx.WSGITransport(app=Dashboard(flow))
    with httpx.Client(transport=transport, base_url="http://dashboard") as http:
        for page in pages:
            assert http.get(page).status_code in (200, 302), page
    sent = list(executed)  # planning them sends statements too
    assert len(sent) >= len(pages)
    read: set[str] = set()
    for statement in sent:
        plan = plan_of(seeded, statement)
        assert "Seq Scan" not in plan, (statement[0], plan)
        assert scans(plan), (statement[0], plan)
        read |= scans(plan)
    assert read == {*INDEXES.values(), "pk_jobflow_jobs", "pk_jobflow_job_events"}
