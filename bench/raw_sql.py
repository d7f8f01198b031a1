"""The raw-SQL limit: jobflow's claim and finish writes in a tight psycopg loop.

The same tables, the same effects as jobflow's PostgreSQL store, with no
Python library in between: the claim takes a batch with ``FOR UPDATE SKIP
LOCKED`` from the partial index of queued jobs, updates the rows and appends
their ``claim`` history rows; the finish does the compare-and-set to ``done``
(status and lease token) for the whole batch and appends the ``succeed``
history rows. Each statement is its own committed transaction.

As in the store, the batch size is written into the claiming statements
(PostgreSQL plans a LIMIT parameter for a tenth of the rows, and a prepared
statement would then be planned again at every call), and one held job is
finished through scalar parameters rather than one-element arrays (planned
once for every call, too).

Two variants:

* ``finish="with the next claim"``: one statement finishes the batch held and
  claims the next one: one statement and one commit per batch (jobflow's
  public API has no such call; kept as a reference for what it would give);
* ``finish="separately"``: a claiming statement, then a finishing statement,
  as ``JobFlow.claim`` and ``JobFlow.finish_many`` send them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg

CLAIM = """
WITH claimed AS (
    UPDATE jobflow_jobs AS job
    SET status = 'quick_running', lease_token = gen_random_uuid()::text,
        lease_owner = %(worker)s, lease_expires_at = now() + interval '60 seconds',
        attempts = job.attempts + 1, started_at = now(), updated_at = now(),
        history_length = job.history_length + 1
    WHERE job.id = ANY(ARRAY(
        SELECT id FROM jobflow_jobs
        WHERE status = 'queued' AND run_at <= now() AND attempts < max_attempts
          AND upload_verified_at IS NOT NULL
        ORDER BY run_at, id
        LIMIT {limit}
        FOR UPDATE SKIP LOCKED))
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

_FINISHED = """
finished AS (
    UPDATE jobflow_jobs AS job
    SET status = 'done', lease_token = NULL, lease_owner = NULL, lease_expires_at = NULL,
        finished_at = now(), updated_at = now(), result = '{}',
        history_length = job.history_length + 1
    FROM {held} AS held(id, token)
    WHERE job.id = held.id AND job.status = 'quick_running' AND job.lease_token = held.token{by_key}
    RETURNING job.id, job.history_length, job.attempts, held.token
), finish_logged AS (
    INSERT INTO jobflow_job_events (
        job_id, seq, event, from_status, to_status, at, worker_id, attempt, detail)
    SELECT id, history_length, 'succeed', 'quick_running', 'done', now(), %(worker)s, attempts,
           '{}'::json
    FROM finished
    RETURNING job_id
)"""

FINISH = f"WITH {_FINISHED}\nSELECT count(*) FROM finish_logged"
FINISH_AND_CLAIM = CLAIM.replace("WITH claimed AS", f"WITH {_FINISHED}, claimed AS", 1)


#: The held jobs a finishing statement reads: one job as scalars, more as arrays
#: (then also matched by primary key, as the store does: a plan made once for
#: every call cannot see how long the arrays are).
_ONE_HELD = ("(VALUES (%(id)s::uuid, %(token)s::text))", "")
_HELD = ("unnest(%(ids)s::uuid[], %(tokens)s::text[])", " AND job.id = ANY(%(ids)s::uuid[])")


def _finishing(statement: str, held: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """``statement`` reading the jobs ``held``, and their parameters."""
    if len(held) == 1:
        (source, by_key), params = _ONE_HELD, {"id": held[0]["id"],
                                               "token": held[0]["lease_token"]}
    else:
        (source, by_key), params = _HELD, {"ids": [job["id"] for job in held],
                                           "tokens": [job["lease_token"] for job in held]}
    return statement.replace("{held}", source).replace("{by_key}", by_key), params


#: Runs of a statement PostgreSQL rolled back to break a deadlock, as jobflow's store does.
DEADLOCK_TRIES = 3


def _run(connection: psycopg.Connection[Any], statement: str,
         params: dict[str, Any]) -> list[dict[str, Any]]:
    """One committed statement; its rows. Concurrent finish-and-claim statements
    can deadlock; PostgreSQL rolls one back, which then runs again."""
    for tries in range(1, DEADLOCK_TRIES + 1):
        try:
            with connection.cursor() as cursor:
                rows = cursor.execute(statement, params).fetchall()
                names = [column.name for column in cursor.description or ()]
            return [dict(zip(names, row, strict=True)) for row in rows]
        except psycopg.errors.DeadlockDetected:
            if tries == DEADLOCK_TRIES:
                raise
    raise AssertionError("unreachable")


def claim(connection: psycopg.Connection[Any], batch: int, worker: str,
          finishing: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Claim up to ``batch`` jobs in one committed statement; the claimed rows.
    With ``finishing``, the same statement first moves those held jobs to ``done``."""
    statement, held = _finishing(FINISH_AND_CLAIM, finishing) if finishing else (CLAIM, {})
    return _run(connection, statement.replace("{limit}", str(int(batch))),
                {"worker": worker, **held})


def finish(connection: psycopg.Connection[Any], held: list[dict[str, Any]], worker: str) -> None:
    """Move the claimed jobs ``held`` to ``done`` in one committed statement."""
    statement, params = _finishing(FINISH, held)
    _run(connection, statement, {**params, "worker": worker})


def drain(settings: dict[str, Any], wait_for_start: Callable[[], None]) -> None:
    """Claim ``batch`` at a time and finish them (``finish``: "with the next claim"
    or "separately")."""
    batch: int = settings["batch"]
    together = settings["finish"] == "with the next claim"
    worker = f"raw-{settings['worker_index']}"
    with psycopg.connect(settings["conninfo"], autocommit=True) as connection:
        wait_for_start()
        held = claim(connection, batch, worker)
        while held:
            if together:
                held = claim(connection, batch, worker, finishing=held)
            else:
                finish(connection, held, worker)
                held = claim(connection, batch, worker)
