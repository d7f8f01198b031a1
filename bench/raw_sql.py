"""The raw-SQL limit: jobflow's claim and finish writes in a tight psycopg loop.

The same tables, the same effects as jobflow's PostgreSQL store, with no
Python library in between: one statement claims a batch with ``FOR UPDATE
SKIP LOCKED`` from the partial index of queued jobs, updates the rows and
appends their ``claim`` history rows; one statement per finish does the
compare-and-set to ``done`` (status and lease token) and appends the
``succeed`` history row. Each statement is its own committed transaction.

Two variants:

* ``finish="batch"``: the whole claimed batch is finished by one statement,
  the ceiling for a store that batches its finishing writes;
* ``finish="each"``: one finishing statement per job, as jobflow's
  ``JobFlow.succeed`` does (``JobFlow.succeed_many`` finishes a batch in one).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg

CLAIM = """
WITH picked AS (
    SELECT id FROM jobflow_jobs
    WHERE status = 'queued' AND run_at <= now() AND attempts < max_attempts
      AND upload_verified_at IS NOT NULL
    ORDER BY run_at, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE jobflow_jobs AS job
    SET status = 'quick_running', lease_token = gen_random_uuid()::text,
        lease_owner = %(worker)s, lease_expires_at = now() + interval '60 seconds',
        attempts = job.attempts + 1, started_at = now(), updated_at = now(),
        history_length = job.history_length + 1
    FROM picked WHERE job.id = picked.id
    RETURNING job.*
), logged AS (
    INSERT INTO jobflow_job_events (
        job_id, seq, event, from_status, to_status, at, worker_id, attempt, detail)
    SELECT id, history_length, 'claim', 'queued', 'quick_running', now(), %(worker)s,
           attempts, json_build_object('lease_expires_at', lease_expires_at)
    FROM claimed
)
SELECT * FROM claimed
"""

FINISH = """
WITH finished AS (
    UPDATE jobflow_jobs AS job
    SET status = 'done', lease_token = NULL, lease_owner = NULL, lease_expires_at = NULL,
        finished_at = now(), updated_at = now(), result = '{}',
        history_length = job.history_length + 1
    FROM unnest(%(ids)s::uuid[], %(tokens)s::text[]) AS held(id, token)
    WHERE job.id = held.id AND job.status = 'quick_running' AND job.lease_token = held.token
    RETURNING job.id, job.history_length, job.attempts, held.token
)
INSERT INTO jobflow_job_events (
    job_id, seq, event, from_status, to_status, at, worker_id, attempt, detail)
SELECT id, history_length, 'succeed', 'quick_running', 'done', now(), %(worker)s, attempts,
       '{}'::json
FROM finished
"""


def claim(connection: psycopg.Connection[Any], batch: int, worker: str) -> list[dict[str, Any]]:
    """Claim up to ``batch`` jobs in one committed statement; the claimed rows."""
    with connection.cursor() as cursor:
        rows = cursor.execute(CLAIM, {"limit": batch, "worker": worker}).fetchall()
        names = [column.name for column in cursor.description or ()]
    return [dict(zip(names, row, strict=True)) for row in rows]


def finish(connection: psycopg.Connection[Any], held: list[dict[str, Any]], worker: str) -> None:
    """Move the claimed jobs ``held`` to ``done`` in one committed statement."""
    connection.execute(FINISH, {"ids": [job["id"] for job in held],
                                "tokens": [job["lease_token"] for job in held],
                                "worker": worker})


def drain(settings: dict[str, Any], wait_for_start: Callable[[], None]) -> None:
    """Claim ``batch`` at a time and finish them (``finish``: "batch" or "each")."""
    batch: int = settings["batch"]
    finish_each = settings["finish"] == "each"
    worker = f"raw-{settings['worker_index']}"
    with psycopg.connect(settings["conninfo"], autocommit=True) as connection:
        wait_for_start()
        while held := claim(connection, batch, worker):
            for group in ([job] for job in held) if finish_each else [held]:
                finish(connection, group, worker)
