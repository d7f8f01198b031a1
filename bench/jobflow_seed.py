"""Fill jobflow's own tables (created by its migrations) quickly, in bulk.

The throughput benchmark measures claiming and finishing, so queued jobs are
inserted directly as *already verified* ``queued`` rows with their
``created`` and ``verify_upload`` history rows, one ``INSERT ... SELECT
generate_series`` statement. This bypasses ``initiate_upload`` and
``complete_upload`` (and the object store) on purpose; the database's own
CHECK constraints still hold for every row (a queued row has
``upload_verified_at``).

Finished jobs for the claim-latency figure are inserted the same way as
``done`` rows. Their history rows are left out: the claim query never reads
the history, and four million event rows would only slow the set-up.
"""

from __future__ import annotations

import psycopg

import jobflow.migrations

#: The status enum's name, for casts in the seeding statements.
_STATUS = "jobflow_job_status"

_SEED_QUEUED = f"""
WITH fresh AS (
    SELECT gen_random_uuid() AS id, n, now() - interval '1 hour' AS t
    FROM generate_series(1, %(count)s) AS n
), created AS (
    INSERT INTO jobflow_jobs (
        id, owner_id, status, params, bucket, object_key, content_type,
        created_at, updated_at, upload_expires_at, run_at, max_attempts, attempts,
        upload_verified_at, object_size, object_etag, history_length)
    SELECT id, 'bench-owner', 'queued', '{{}}', 'bench', 'uploads/' || id, 'video/mp4',
           t, t, t + interval '1 hour', t + n * interval '1 microsecond', 3, 0,
           t, 1024, 'bench-etag', 2
    FROM fresh
    RETURNING id, created_at, upload_verified_at
)
INSERT INTO jobflow_job_events (
    job_id, seq, event, from_status, to_status, at, worker_id, attempt, detail)
SELECT id, 1, 'created', NULL, 'awaiting_upload'::{_STATUS}, created_at, NULL, 0,
       '{{}}'::json
FROM created
UNION ALL
SELECT id, 2, 'verify_upload', 'awaiting_upload'::{_STATUS}, 'queued'::{_STATUS},
       upload_verified_at, NULL, 0, '{{"size": 1024, "etag": "bench-etag"}}'::json
FROM created
"""

_SEED_DONE = """
INSERT INTO jobflow_jobs (
    id, owner_id, status, params, bucket, object_key, content_type,
    created_at, updated_at, upload_expires_at, run_at, max_attempts, attempts,
    upload_verified_at, object_size, object_etag, started_at, finished_at, result,
    history_length)
SELECT id, 'bench-owner', 'done', '{}', 'bench', 'uploads/' || id, 'video/mp4',
       t, t, t + interval '1 hour', t, 3, 1, t, 1024, 'bench-etag', t, t, '{}', 4
FROM (SELECT gen_random_uuid() AS id, now() - interval '1 day' AS t
      FROM generate_series(1, %(count)s)) AS fresh
"""


def migrate(sqlalchemy_url: str) -> None:
    """Create jobflow's tables with its shipped migrations."""
    jobflow.migrations.upgrade(sqlalchemy_url)


def reset(conninfo: str) -> None:
    """Empty jobflow's tables and reclaim their space."""
    with psycopg.connect(conninfo, autocommit=True) as connection:
        connection.execute("TRUNCATE jobflow_job_events, jobflow_jobs")


def seed_queued(conninfo: str, count: int) -> None:
    """``count`` verified, due ``queued`` jobs, with their history."""
    with psycopg.connect(conninfo, autocommit=True) as connection:
        connection.execute(_SEED_QUEUED, {"count": count})


def seed_done(conninfo: str, count: int) -> None:
    """``count`` finished (``done``) jobs."""
    with psycopg.connect(conninfo, autocommit=True) as connection:
        connection.execute(_SEED_DONE, {"count": count})


def vacuum_analyze(conninfo: str) -> None:
    """Fresh statistics and visibility maps, as autovacuum would leave them."""
    with psycopg.connect(conninfo, autocommit=True) as connection:
        connection.execute("VACUUM ANALYZE jobflow_jobs")
        connection.execute("VACUUM ANALYZE jobflow_job_events")


def seed_and_vacuum(conninfo: str, count: int) -> None:
    """:func:`seed_queued`, then :func:`vacuum_analyze`: a queue ready to drain."""
    seed_queued(conninfo, count)
    vacuum_analyze(conninfo)


def count_done(conninfo: str) -> int:
    return count_status(conninfo, "done")


def count_status(conninfo: str, status: str) -> int:
    with psycopg.connect(conninfo) as connection:
        row = connection.execute("SELECT count(*) FROM jobflow_jobs WHERE status = %s",
                                 (status,)).fetchone()
    return int(row[0]) if row else 0
