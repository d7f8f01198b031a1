"""Every statement :class:`~jobflow.adapters.sqlalchemy.SqlAlchemyJobStore`
sends, each one named, with the SQL it renders in its docstring.

Statements are SQLAlchemy Core constructs built once, at import, or by a
cached builder for the few that vary (by the columns a batch writes, by a
claim's batch size): building one costs more than running it. Parameters are
named as in :mod:`jobflow.adapters.sqlalchemy.rows`, which makes them.

Status predicates compare with an inline label (``status = 'queued'``, see
:func:`~jobflow.adapters.sqlalchemy.schema.status_is`) so that PostgreSQL can
use the partial indexes even in a plan made once for every call.
"""

from __future__ import annotations

import functools
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.sql.dml import ReturningDelete

from jobflow.adapters.sqlalchemy.rows import EVENT_COLUMNS, JOB_COLUMNS, BatchShape, batch_fields
from jobflow.adapters.sqlalchemy.schema import events, jobs, status_is
from jobflow.models import JobStatus

#: The PostgreSQL channel notified (payload: the job id) when a job becomes
#: ``queued``. The job may still be due later (``run_at``); listeners should
#: simply try to claim.
NOTIFY_CHANNEL = "jobflow_jobs_queued"


def _param(name: str, column: sa.Column[Any]) -> sa.BindParameter[Any]:
    return sa.bindparam(name, type_=column.type)


def _cast_param(name: str, column: sa.Column[Any]) -> sa.ColumnElement[Any]:
    """A parameter cast to the column's type, which ``INSERT ... SELECT`` needs on PostgreSQL."""
    return sa.cast(_param(name, column), column.type)


_NOW = _param("now", jobs.c.updated_at)
_LIMIT = sa.bindparam("limit", type_=sa.Integer)
_EVENT_VALUES = {n: _param(f"event_{n}", events.c[n]) for n in EVENT_COLUMNS}


def _notify(job_id: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
    """``pg_notify('jobflow_jobs_queued', CAST(job_id AS TEXT))``, delivered at commit."""
    return sa.func.pg_notify(sa.literal_column(f"'{NOTIFY_CHANNEL}'"), sa.cast(job_id, sa.Text))


def _logged(written: sa.CTE) -> sa.CTE:
    """PostgreSQL: ``logged AS (INSERT INTO jobflow_job_events (job_id, seq, event,
    ...) SELECT written.id, written.history_length, CAST(:event_event AS ...), ...
    FROM written RETURNING job_id, seq)``: the ``event_*`` history row of the job
    row ``written`` returned, none when its compare-and-set lost."""
    return (
        sa.insert(events)
        .from_select(["job_id", "seq", *EVENT_COLUMNS],
                     sa.select(written.c.id, written.c.history_length,
                               *(_cast_param(f"event_{n}", events.c[n]) for n in EVENT_COLUMNS)))
        .returning(events.c.job_id, events.c.seq)
        .cte("logged"))


# -- creating a job ------------------------------------------------------------------------

INSERT_JOB = sa.insert(jobs).values(
    {c.name: _param(f"job_{c.name}", c) for c in JOB_COLUMNS}).values(history_length=1)
"""SQLite: ``INSERT INTO jobflow_jobs (id, owner_id, ..., history_length)
VALUES (:job_id, :job_owner_id, ..., 1)``; :data:`INSERT_EVENT` follows in the
same transaction."""

INSERT_EVENT = sa.insert(events).values(_EVENT_VALUES).values(
    job_id=_param("event_job_id", events.c.job_id), seq=_param("event_seq", events.c.seq))
"""SQLite: ``INSERT INTO jobflow_job_events (job_id, seq, event, from_status,
to_status, at, worker_id, attempt, detail) VALUES (:event_job_id, :event_seq,
:event_event, ...)``: one history row, in the transaction of its job's write."""

POSTGRES_CREATE = sa.select(
    _logged(INSERT_JOB.returning(jobs.c.id, jobs.c.history_length).cte("created")).c.seq)
"""PostgreSQL, one statement: ``WITH created AS (INSERT INTO jobflow_jobs ...
RETURNING id, history_length), logged AS (INSERT INTO jobflow_job_events ...
SELECT ... FROM created RETURNING job_id, seq) SELECT logged.seq FROM logged``."""


# -- compare-and-set -------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def compare_and_set(*, leased: bool) -> sa.Update:
    """``UPDATE jobflow_jobs SET owner_id = :job_owner_id, ..., history_length =
    history_length + 1 WHERE id = :expected_id AND status = :expected_status AND
    lease_token = :expected_token AND cancel_requested_at IS NOT DISTINCT FROM
    :expected_cancel_requested_at RETURNING id, history_length`` (SQLite:
    ``cancel_requested_at IS :expected_cancel_requested_at``); ``lease_token IS
    NULL`` instead when the change expects no lease (not ``leased``). No row
    comes back when another writer got there first."""
    token = (jobs.c.lease_token == _param("expected_token", jobs.c.lease_token) if leased
             else jobs.c.lease_token.is_(None))
    return (sa.update(jobs)
            .where(jobs.c.id == _param("expected_id", jobs.c.id),
                   jobs.c.status == _param("expected_status", jobs.c.status), token,
                   jobs.c.cancel_requested_at.is_not_distinct_from(
                       _param("expected_cancel_requested_at", jobs.c.cancel_requested_at)))
            .values({c.name: _param(f"job_{c.name}", c) for c in JOB_COLUMNS if c.name != "id"})
            .values(history_length=jobs.c.history_length + 1)
            .returning(jobs.c.id, jobs.c.history_length))


@functools.lru_cache(maxsize=4)
def postgres_commit(*, leased: bool, notify: bool) -> sa.Select[Any]:
    """PostgreSQL, one statement: ``WITH changed AS (<compare_and_set>), logged AS
    (INSERT INTO jobflow_job_events ... SELECT ... FROM changed RETURNING job_id,
    seq) SELECT logged.seq[, pg_notify('jobflow_jobs_queued', CAST(logged.job_id
    AS TEXT))] FROM logged``: one row when the change won, none when it lost.
    With ``notify`` (the change makes its job ``queued``) the job id is sent on
    :data:`NOTIFY_CHANNEL` when the statement commits."""
    logged = _logged(compare_and_set(leased=leased).cte("changed"))
    if notify:
        return sa.select(logged.c.seq, _notify(logged.c.job_id))
    return sa.select(logged.c.seq)


_UUID_ARRAY = postgresql.ARRAY(sa.Uuid(as_uuid=False))


@functools.lru_cache(maxsize=256)
def postgres_commit_many(shape: BatchShape) -> sa.Select[Any]:
    """PostgreSQL, one statement for a whole batch of changes, each still its own
    compare-and-set with its own history row::

        WITH changed AS (
            UPDATE jobflow_jobs
            SET status = CAST(:batch_job_status AS jobflow_job_status),  -- shared
                result = batch.job_result, ...,                          -- varying
                history_length = history_length + 1
            FROM unnest(CAST(:batch_job_id AS UUID[]), CAST(:batch_job_result AS JSON[]), ...)
                 AS batch (job_id, job_result, ...)
            WHERE id = batch.job_id AND id = ANY(CAST(:batch_job_id AS UUID[]))
              AND status = batch.expected_status
              AND lease_token IS NOT DISTINCT FROM batch.expected_token
              AND cancel_requested_at IS NOT DISTINCT FROM
                  batch.expected_cancel_requested_at
            RETURNING id, history_length, batch.event_event, ...),
        logged AS (
            INSERT INTO jobflow_job_events (job_id, seq, event, ...)
            SELECT id, history_length, event_event, ... FROM changed
            RETURNING job_id, to_status)
        SELECT job_id, CASE WHEN to_status = 'queued'
                            THEN CAST(pg_notify('jobflow_jobs_queued', job_id) AS TEXT) END
        FROM logged

    Every value travels as text (see
    :func:`~jobflow.adapters.sqlalchemy.rows.batch_params`): a field the batch
    shares is one value cast to its column's type, a field that varies one
    array literal cast to an array of that type and unnested. A row comes back
    per change that won. One statement per shape of batch."""
    fields = batch_fields(shape.columns)
    params = {name: sa.bindparam(f"batch_{name}", type_=sa.Text) for name, _ in fields}
    value: dict[str, sa.ColumnElement[Any]] = {
        name: sa.cast(params[name], type_) for name, type_ in fields}
    found = [jobs.c.id == value["job_id"]]
    varying = [(name, type_) for name, type_ in fields if name in shape.varying]
    if varying:
        batch = (sa.func.unnest(*(sa.cast(params[name], postgresql.ARRAY(type_))
                                  for name, type_ in varying))
                 .table_valued(*(sa.column(name, type_) for name, type_ in varying))
                 .render_derived(name="batch"))
        value.update((name, batch.c[name]) for name, _ in varying)
        # The planner cannot see how long the arrays are when it plans once
        # for all calls; this lets it find the jobs by primary key.
        found = [jobs.c.id == batch.c.job_id,
                 jobs.c.id == sa.any_(sa.cast(params["job_id"], _UUID_ARRAY))]
    changed = (
        sa.update(jobs)
        .where(*found, jobs.c.status == value["expected_status"],
               jobs.c.lease_token.is_not_distinct_from(value["expected_token"]),
               jobs.c.cancel_requested_at.is_not_distinct_from(
                   value["expected_cancel_requested_at"]))
        .values({name: value[f"job_{name}"] for name in shape.columns})
        .values(history_length=jobs.c.history_length + 1)
        .returning(jobs.c.id, jobs.c.history_length,
                   *(value[f"event_{n}"].label(f"event_{n}") for n in EVENT_COLUMNS))
        .cte("changed"))
    logged = (
        sa.insert(events)
        .from_select(["job_id", "seq", *EVENT_COLUMNS],
                     sa.select(changed.c.id, changed.c.history_length,
                               *(changed.c[f"event_{n}"] for n in EVENT_COLUMNS)))
        .returning(events.c.job_id, events.c.to_status)
        .cte("logged"))
    notify_if_queued = sa.case((status_is(JobStatus.QUEUED, logged.c.to_status),
                                sa.cast(_notify(logged.c.job_id), sa.Text)))
    return sa.select(logged.c.job_id, notify_if_queued)


# -- claiming --------------------------------------------------------------------------------


def _due(limit: int | None = None) -> sa.Select[Any]:
    """``SELECT id FROM jobflow_jobs WHERE status = 'queued' AND run_at <= :now AND
    attempts < max_attempts AND upload_verified_at IS NOT NULL ORDER BY run_at, id
    LIMIT <limit>``: the claimable jobs (the guards of the claim edge), at most
    ``limit`` written into the statement, or the ``:limit`` parameter."""
    return (sa.select(jobs.c.id)
            .where(status_is(JobStatus.QUEUED), jobs.c.run_at <= _NOW,
                   jobs.c.attempts < jobs.c.max_attempts, jobs.c.upload_verified_at.is_not(None))
            .order_by(jobs.c.run_at, jobs.c.id)
            .limit(_LIMIT if limit is None else sa.literal_column(str(int(limit)))))


# The claim edge's effects (jobflow.states), applied by the database to each claimed row.
_CLAIM_EFFECTS: dict[str, Any] = {
    "status": _param("claimed_status", jobs.c.status),
    "lease_owner": _param("worker_id", jobs.c.lease_owner),
    "lease_expires_at": _param("lease_expires_at", jobs.c.lease_expires_at),
    "attempts": jobs.c.attempts + 1, "started_at": _NOW, "updated_at": _NOW,
    "history_length": jobs.c.history_length + 1,
}


@functools.lru_cache(maxsize=256)
def postgres_claim(limit: int) -> sa.Select[Any]:
    """PostgreSQL, one statement: take a batch of up to ``limit`` due jobs, skipping
    those another claimer has locked, and log each claim::

        WITH claimed AS (
            UPDATE jobflow_jobs SET status = :claimed_status, lease_owner = :worker_id,
                   lease_expires_at = :lease_expires_at, attempts = attempts + 1,
                   started_at = :now, updated_at = :now,
                   history_length = history_length + 1,
                   lease_token = CAST(gen_random_uuid() AS TEXT)
            WHERE id = ANY(ARRAY(SELECT id FROM jobflow_jobs WHERE status = 'queued' ...
                                 ORDER BY run_at, id LIMIT <limit>
                                 FOR UPDATE SKIP LOCKED))
            RETURNING *),
        claim_logged AS (
            INSERT INTO jobflow_job_events (job_id, seq, attempt, event, ...)
            SELECT id, history_length, attempts, CAST(:event_event AS ...), ...
            FROM claimed RETURNING seq)
        SELECT * FROM claimed

    The rows are the claimed jobs. ``id = ANY(ARRAY(...))`` collects the locked
    ids once, then finds the jobs by primary key; a join on the picked ids
    would let a plan made once for every call hash the whole table instead.

    The batch size is written into the statement, one statement per size.
    PostgreSQL plans a LIMIT it cannot see for a tenth of the rows: once the
    queue was large, the generic plan of a prepared claim with a LIMIT
    parameter looked dearer than planning anew, which it then did at every
    call (measured: 0.3 ms of the server's time per call with 20,000 queued
    jobs)."""
    picked = sa.func.array(_due(limit).with_for_update(skip_locked=True).scalar_subquery())
    claimed = (sa.update(jobs).where(jobs.c.id == sa.any_(picked))
               .values(**_CLAIM_EFFECTS, lease_token=sa.cast(sa.func.gen_random_uuid(), sa.Text))
               .returning(*jobs.c)
               .cte("claimed"))
    claim_logged = (
        sa.insert(events)
        .from_select(["job_id", "seq", "attempt", *(n for n in EVENT_COLUMNS if n != "attempt")],
                     sa.select(claimed.c.id, claimed.c.history_length, claimed.c.attempts,
                               *(_cast_param(f"event_{n}", events.c[n])
                                 for n in EVENT_COLUMNS if n != "attempt")))
        .returning(events.c.seq)
        .cte("claim_logged"))
    return sa.select(claimed).add_cte(claim_logged)


SQLITE_CLAIM = (sa.update(jobs).where(jobs.c.id.in_(_due().scalar_subquery()))
                .values(**_CLAIM_EFFECTS,
                        lease_token=sa.func.lower(sa.func.hex(sa.func.randomblob(16))))
                .returning(*jobs.c))
"""SQLite: ``UPDATE jobflow_jobs SET status = :claimed_status, ..., lease_token =
lower(hex(randomblob(16))) WHERE id IN (SELECT id FROM jobflow_jobs WHERE status =
'queued' ... ORDER BY run_at, id LIMIT :limit) RETURNING *``. Run inside
``BEGIN IMMEDIATE``, so no other writer interleaves; :data:`INSERT_EVENT` logs
each claimed job."""


# -- reads ---------------------------------------------------------------------------------

GET = sa.select(jobs).where(jobs.c.id == _param("job_id", jobs.c.id))
"""``SELECT * FROM jobflow_jobs WHERE id = :job_id``"""

EXISTS = sa.select(jobs.c.id).where(jobs.c.id == _param("job_id", jobs.c.id))
"""``SELECT id FROM jobflow_jobs WHERE id = :job_id``"""

HISTORY = (sa.select(events).where(events.c.job_id == _param("job_id", events.c.job_id))
           .order_by(events.c.seq))
"""``SELECT * FROM jobflow_job_events WHERE job_id = :job_id ORDER BY seq``"""

AWAITING_UPLOADS = (sa.select(jobs).where(status_is(JobStatus.AWAITING_UPLOAD))
                    .order_by(jobs.c.upload_expires_at, jobs.c.id).limit(_LIMIT))
"""``SELECT * FROM jobflow_jobs WHERE status = 'awaiting_upload' ORDER BY
upload_expires_at, id LIMIT :limit``"""

EXPIRED_LEASES = (sa.select(jobs).where(status_is(JobStatus.QUICK_RUNNING),
                                        jobs.c.lease_expires_at <= _NOW)
                  .order_by(jobs.c.lease_expires_at, jobs.c.id).limit(_LIMIT))
"""``SELECT * FROM jobflow_jobs WHERE status = 'quick_running' AND lease_expires_at
<= :now ORDER BY lease_expires_at, id LIMIT :limit``"""

FAILED_SINCE = (sa.select(jobs).where(status_is(JobStatus.FAILED),
                                      jobs.c.finished_at >= _param("since", jobs.c.finished_at))
                .order_by(jobs.c.finished_at.desc(), jobs.c.id).limit(_LIMIT))
"""``SELECT * FROM jobflow_jobs WHERE status = 'failed' AND finished_at >= :since
ORDER BY finished_at DESC, id LIMIT :limit``"""

COUNTS = sa.select(jobs.c.status, sa.func.count().label("jobs")).group_by(jobs.c.status)
"""``SELECT status, count(*) AS jobs FROM jobflow_jobs GROUP BY status``"""


# -- retention and bulk recovery -------------------------------------------------------------

_FINISHED_BEFORE = _param("finished_before", jobs.c.finished_at)


def _finished(status: JobStatus) -> list[sa.ColumnElement[bool]]:
    """``status = '<status>' AND finished_at < :finished_before``: the jobs a purge
    deletes, found through the partial index of ``status`` by finished_at."""
    return [status_is(status), jobs.c.finished_at < _FINISHED_BEFORE]


def _oldest_finished(status: JobStatus) -> sa.Select[Any]:
    """``SELECT id FROM jobflow_jobs WHERE status = '<status>' AND finished_at <
    :finished_before ORDER BY finished_at, id LIMIT :limit``"""
    return (sa.select(jobs.c.id).where(*_finished(status))
            .order_by(jobs.c.finished_at, jobs.c.id).limit(_LIMIT))


@functools.lru_cache(maxsize=2)
def postgres_purge(status: JobStatus) -> ReturningDelete[Any]:
    """PostgreSQL, one statement: delete a batch of the oldest jobs in ``status``
    (``done`` or ``failed``) finished before ``:finished_before``, skipping those
    another transaction holds locked::

        DELETE FROM jobflow_jobs
        WHERE id = ANY(ARRAY(SELECT id FROM jobflow_jobs WHERE status = '<status>'
                             AND finished_at < :finished_before
                             ORDER BY finished_at, id LIMIT :limit
                             FOR UPDATE SKIP LOCKED))
          AND status = '<status>' AND finished_at < :finished_before
        RETURNING *

    The rows locked by the inner select are checked again by the delete, so a
    job requeued meanwhile is never deleted. Their history goes with them,
    through the foreign key's ``ON DELETE CASCADE``; the returned rows'
    ``history_length`` says how many history rows that was."""
    picked = sa.func.array(
        _oldest_finished(status).with_for_update(skip_locked=True).scalar_subquery())
    return (sa.delete(jobs).where(jobs.c.id == sa.any_(picked), *_finished(status))
            .returning(*jobs.c))


@functools.lru_cache(maxsize=2)
def sqlite_purge_history(status: JobStatus) -> sa.Delete:
    """SQLite: ``DELETE FROM jobflow_job_events WHERE job_id IN (SELECT id FROM
    jobflow_jobs WHERE status = '<status>' AND finished_at < :finished_before
    ORDER BY finished_at, id LIMIT :limit)``: the history of the batch that
    :func:`sqlite_purge` deletes next, in the same ``BEGIN IMMEDIATE``
    transaction (deleted explicitly: a host's connection may not enforce
    foreign keys)."""
    return sa.delete(events).where(
        events.c.job_id.in_(_oldest_finished(status).scalar_subquery()))


@functools.lru_cache(maxsize=2)
def sqlite_purge(status: JobStatus) -> ReturningDelete[Any]:
    """SQLite: ``DELETE FROM jobflow_jobs WHERE id IN (SELECT id ... LIMIT :limit)
    AND status = '<status>' AND finished_at < :finished_before RETURNING *``,
    after :func:`sqlite_purge_history` in the same transaction, which holds the
    database's write lock: the batch is the same."""
    return (sa.delete(jobs)
            .where(jobs.c.id.in_(_oldest_finished(status).scalar_subquery()),
                   *_finished(status))
            .returning(*jobs.c))


@functools.lru_cache(maxsize=2)
def count_finished(status: JobStatus) -> sa.Select[Any]:
    """``SELECT count(*) AS jobs, coalesce(sum(history_length), 0) AS events FROM
    jobflow_jobs WHERE status = '<status>' AND finished_at < :finished_before``"""
    return (sa.select(sa.func.count().label("jobs"),
                      sa.func.coalesce(sa.func.sum(jobs.c.history_length), 0).label("events"))
            .where(*_finished(status)))


FAILED_AFTER = (
    sa.select(jobs)
    .where(status_is(JobStatus.FAILED),
           jobs.c.error_code == _param("error_code", jobs.c.error_code),
           sa.tuple_(jobs.c.finished_at, jobs.c.id)
           > sa.tuple_(_param("after_finished_at", jobs.c.finished_at),
                       _param("after_id", jobs.c.id)))
    .order_by(jobs.c.finished_at, jobs.c.id).limit(_LIMIT))
"""``SELECT * FROM jobflow_jobs WHERE status = 'failed' AND error_code = :error_code
AND (finished_at, id) > (:after_finished_at, :after_id) ORDER BY finished_at, id
LIMIT :limit``: one page of the failed jobs of one cause, through the partial
index of failed jobs by ``(finished_at, id)``."""


__all__ = [
    "AWAITING_UPLOADS", "COUNTS", "EXISTS", "EXPIRED_LEASES", "FAILED_AFTER", "FAILED_SINCE",
    "GET", "HISTORY", "INSERT_EVENT", "INSERT_JOB", "NOTIFY_CHANNEL", "POSTGRES_CREATE",
    "SQLITE_CLAIM", "compare_and_set", "count_finished", "postgres_claim", "postgres_commit",
    "postgres_commit_many", "postgres_purge", "sqlite_purge", "sqlite_purge_history",
]
