"""A :class:`~jobflow.ports.JobStore` in PostgreSQL or SQLite, through SQLAlchemy 2 Core.

Every write is one compare-and-set on the job row plus its history row, in
one transaction:

* On PostgreSQL every call is a single statement, run as its own transaction
  (one round trip): a data-modifying CTE updates the job and inserts its
  history row, numbered from the job row it locked. ``claim`` takes a batch of
  due jobs with ``FOR UPDATE SKIP LOCKED`` from the partial index of queued
  jobs, so concurrent claimers on many hosts never wait for, nor share, a job.
  ``commit_many`` sends a whole batch of changes as text values (one per
  field the batch shares, one array literal per field that varies) and
  applies them in one statement, still a compare-and-set and a history row
  per job.
  A write that makes a job ``queued`` also sends ``NOTIFY`` on
  :data:`NOTIFY_CHANNEL` (payload: the job id), delivered at commit.
  The statements are built and compiled by SQLAlchemy once; on the store's
  own connections they are then sent straight to psycopg 3 on a connection
  taken from the engine's pool, past SQLAlchemy's Connection and execution
  layer (about a third of a millisecond of processor time per statement,
  comparable to the database's own work on a small claim). An engine that
  logs statements (``echo``) or has listeners for statements, their errors
  (``handle_error``) or new Connections (``engine_connect``) gets them
  through SQLAlchemy's execution layer, as does a store bound to the host's
  transaction. :meth:`SqlAlchemyJobStore.claim_pipeline` gives
  :meth:`~jobflow.flow.JobFlow.claim_loop` a :class:`PostgresClaimPipeline`:
  its finish-and-claim statements go in libpq's pipeline mode on one
  connection, each still its own transaction.
* On SQLite each write runs inside ``BEGIN IMMEDIATE`` (one writer at a time;
  others wait up to the busy timeout). File databases are switched to WAL so
  that readers never block the writer.

The database enforces the invariants that need no object store (see
:mod:`jobflow.adapters.sqlalchemy_schema`); :mod:`jobflow.migrations`
creates the tables.

Driver errors are translated here: a lost, refused or locked connection
raises :class:`~jobflow.errors.StorageUnavailable`, a missing table
:class:`~jobflow.errors.ConfigurationError`, a row the database's constraints
refuse :class:`~jobflow.errors.InvalidInput`.
"""

from __future__ import annotations

import copy
import functools
import json
import operator
import re
import selectors
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn, Protocol

import attrs
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session
from sqlalchemy.pool import PoolProxiedConnection

from jobflow.adapters.sqlalchemy_schema import UTCDateTime, events, jobs, status_is
from jobflow.errors import (
    ConfigurationError,
    InvalidInput,
    JobflowError,
    JobNotFound,
    StorageUnavailable,
)
from jobflow.models import (
    JOB_FIELDS,
    Change,
    Claim,
    Event,
    Job,
    JobEvent,
    JobStatus,
    check_batch,
    job_values,
)

#: The PostgreSQL channel notified (payload: the job id) when a job becomes
#: ``queued``. The job may still be due later (``run_at``); listeners should
#: simply try to claim.
NOTIFY_CHANNEL = "jobflow_jobs_queued"

SUPPORTED_DIALECTS = frozenset({"postgresql", "sqlite"})

#: How many times the store runs a PostgreSQL statement that PostgreSQL rolled
#: back to break a deadlock (each statement is its own transaction).
DEADLOCK_TRIES = 3
_DEADLOCK_DETECTED = "40P01"  # SQLSTATE

# Job attributes stored under another column name.
_COLUMN_OF_FIELD = {"key": "object_key"}
_FIELD_OF_COLUMN = {column: field for field, column in _COLUMN_OF_FIELD.items()}
# The row's columns in the order of Job's fields (Job takes them positionally).
_ROW_COLUMNS = tuple(_COLUMN_OF_FIELD.get(name, name) for name in JOB_FIELDS)
_STATUS_INDEX = JOB_FIELDS.index("status")
# A history row's columns but job_id and seq: JobEvent's fields, in the order of
# Change.history_values.
_EVENT_COLUMNS = tuple(field.name for field in attrs.fields(JobEvent))[2:]
_EVENT_PARAMS = tuple(f"event_{name}" for name in _EVENT_COLUMNS)
_JOB_PARAMS = tuple(f"job_{column}" for column in _ROW_COLUMNS)


# -- rows and domain objects ------------------------------------------------------------


@attrs.frozen
class _Rows:
    """A statement's rows, kept column by column: each column's type processing
    runs over the whole column, and jobs are built from the columns by
    position, with no dict per row (a claim of 100 jobs reads 2,800 values)."""

    names: tuple[str, ...]
    columns: tuple[Sequence[Any], ...]

    @classmethod
    def of(cls, names: Sequence[str], rows: Sequence[Sequence[Any]]) -> _Rows:
        return cls(tuple(names), tuple(zip(*rows, strict=True)) if rows
                   else tuple(() for _ in names))

    @classmethod
    def of_result(cls, result: sa.CursorResult[Any]) -> _Rows:
        """The rows of a statement run through SQLAlchemy's execution layer."""
        return cls.of(tuple(result.keys()), result.all())

    def __len__(self) -> int:
        return len(self.columns[0]) if self.columns else 0

    def __getitem__(self, name: str) -> Sequence[Any]:
        """One column's values."""
        return self.columns[self.names.index(name)]

    def mappings(self) -> list[dict[str, Any]]:
        return [dict(zip(self.names, row, strict=True)) for row in zip(*self.columns, strict=True)]

    def jobs(self) -> list[Job]:
        """The one place database rows become :class:`Job` snapshots."""
        values = [self[column] for column in _ROW_COLUMNS]
        values[_STATUS_INDEX] = list(map(_STATUS_OF.get, values[_STATUS_INDEX]))
        return list(map(Job, *values))


# A status as the database returns it (a label or a JobStatus) to its JobStatus.
_STATUS_OF: dict[str, JobStatus] = {status.value: status for status in JobStatus}


def _event_from_row(row: Mapping[Any, Any]) -> JobEvent:
    return JobEvent(
        job_id=row["job_id"], seq=row["seq"], event=Event(row["event"]),
        from_status=JobStatus(row["from_status"]) if row["from_status"] is not None else None,
        to_status=JobStatus(row["to_status"]), at=row["at"], worker_id=row["worker_id"],
        attempt=row["attempt"], detail=row["detail"])


def _job_params(job: Job) -> dict[str, Any]:
    """The ``job_<column>`` parameters that store ``job`` (every column but
    ``history_length``, which the database counts)."""
    return dict(zip(_JOB_PARAMS, job_values(job), strict=True))


def _event_params(change: Change) -> dict[str, Any]:
    """The ``event_<column>`` parameters of ``change``'s history row, but its ``seq``."""
    return dict(zip(_EVENT_PARAMS, change.history_values(), strict=True))


def _as_text(value: object) -> str | None:
    """How one value of a PostgreSQL batch travels: as text (or NULL), which the
    statement casts to its column's type (see :func:`_postgres_batch_write`)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise InvalidInput(f"timestamps must be timezone-aware, got {value!r}")
        return value.astimezone(UTC).isoformat()
    if isinstance(value, int):
        return str(value)
    return json.dumps(value, allow_nan=False)


def _array_literal(values: Sequence[str | None]) -> str:
    """A PostgreSQL array literal of text values (None as NULL), every element
    quoted: one text parameter that the statement casts to an array. psycopg's
    adaptation of a list costs about ten times as much (1.4 us a value)."""
    quoted = ("NULL" if value is None
              else '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"' for value in values)
    return "{" + ",".join(quoted) + "}"


def _changed_columns(changes: Sequence[Change]) -> tuple[str, ...]:
    """The job columns any of ``changes`` writes, in table order (``updated_at`` always)."""
    # Field by field: each field's values before and after, compared as tuples.
    before = zip(*(job_values(change.before) for change in changes), strict=True)
    after = zip(*(job_values(change.after) for change in changes), strict=True)
    fields = {"updated_at", *(name for name, old, new in zip(JOB_FIELDS, before, after, strict=True)
                              if old != new)}
    return tuple(c.name for c in _JOB_COLUMNS
                 if _FIELD_OF_COLUMN.get(c.name, c.name) in fields and c.name != "id")


@functools.lru_cache(maxsize=256)
def _batch_fields(columns: tuple[str, ...]) -> tuple[tuple[str, Any], ...]:
    """The fields of a PostgreSQL batch that writes ``columns``, and their types:
    the job id, the new values of ``columns``, the history row's ``event_*``
    values, and the expected status and lease token."""
    return (("job_id", jobs.c.id.type),
            *((f"job_{name}", jobs.c[name].type) for name in columns),
            *((f"event_{name}", events.c[name].type) for name in _EVENT_COLUMNS),
            ("expected_status", jobs.c.status.type),
            ("expected_token", jobs.c.lease_token.type))


def _batch_values(change: Change, columns: tuple[str, ...]) -> list[object]:
    """``change``'s values for the fields of :func:`_batch_fields`, in their order."""
    before, after = change.before, change.after
    assert before is not None
    return [after.id, *_values_getter(columns)(after), *change.history_values(),
            before.status, before.lease_token]


@functools.lru_cache(maxsize=256)
def _values_getter(columns: tuple[str, ...]) -> Callable[[Job], tuple[object, ...]]:
    """A job's values of ``columns`` (always a tuple, even for one column)."""
    getter = operator.attrgetter(*(_FIELD_OF_COLUMN.get(name, name) for name in columns))
    return getter if len(columns) > 1 else lambda job: (getter(job),)


def _all_same(values: Sequence[object]) -> bool:
    """Whether every value would travel as the same text as the first (no field
    of a batch holds both booleans and integers, whose equal values differ)."""
    first = values[0]
    if isinstance(first, (dict, list)) and first:  # {"n": 1} == {"n": True}, yet they differ
        text = _as_text(first)
        return all(_as_text(value) == text for value in values)
    return values.count(first) == len(values)


@attrs.frozen
class _BatchShape:
    """What a PostgreSQL batch statement is built for: the job columns it writes,
    and which fields vary from change to change (one array each, unnested);
    the others are the same for the whole batch (one value each)."""

    columns: tuple[str, ...]
    varying: frozenset[str]


def _change_records(changes: Sequence[Change]) -> tuple[_BatchShape, dict[str, Any]]:
    """The shape of a batch and the parameters of its statement, as text: the
    changes in job id order (so that batches over the same jobs lock them alike)."""
    columns = _changed_columns(changes)
    ordered = sorted(changes, key=lambda change: change.after.id)
    rows = [_batch_values(change, columns) for change in ordered]
    params: dict[str, Any] = {}
    varying = set()
    for (name, _), values in zip(_batch_fields(columns), zip(*rows, strict=True), strict=True):
        if not _all_same(values):
            varying.add(name)
            params[f"batch_{name}"] = _array_literal([_as_text(value) for value in values])
        else:
            params[f"batch_{name}"] = _as_text(values[0])
    return _BatchShape(columns, frozenset(varying)), params


_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _canonical_job_id(job_id: str) -> str | None:
    """``job_id`` if it is a job id in canonical form (a lowercase UUID), else None."""
    if isinstance(job_id, str) and _CANONICAL_UUID.fullmatch(job_id):
        return job_id
    return None


def _check_same_job(change: Change) -> None:
    """A change must write the job it was decided on."""
    if change.before is not None and change.before.id != change.after.id:
        raise InvalidInput(f"a change cannot turn job {change.before.id} "
                           f"into job {change.after.id}")


def _batch(changes: Sequence[Change]) -> list[Change]:
    """Check a batch of changes; the ones whose job id can name a job at all
    (a job id that is not a canonical UUID names no job: that change loses)."""
    check_batch(changes)
    for change in changes:
        _check_same_job(change)
    return [change for change in changes if _canonical_job_id(change.after.id) is not None]


def _claim_params(*, worker_id: str, limit: int, now: datetime,
                  lease_seconds: float) -> dict[str, Any]:
    """The parameters of the claim statements: the claim edge's effects and history row."""
    expires = now + timedelta(seconds=lease_seconds)
    return {"now": now, "limit": limit, "worker_id": worker_id,
            "lease_expires_at": expires, "claimed_status": JobStatus.QUICK_RUNNING,
            "event_event": Event.CLAIM, "event_from_status": JobStatus.QUEUED,
            "event_to_status": JobStatus.QUICK_RUNNING, "event_at": now,
            "event_worker_id": worker_id,
            "event_detail": {"lease_expires_at": expires.isoformat()}}


def _claims(rows: _Rows) -> list[Claim]:
    """The claims among ``rows`` (the rows with a lease token), oldest ``run_at``
    first, then id."""
    claimed = sorted((job for job in rows.jobs() if job.lease_token is not None),
                     key=_CLAIM_ORDER)
    return [Claim(job, job.lease_token) for job in claimed]  # type: ignore[arg-type]


_CLAIM_ORDER = operator.attrgetter("run_at", "id")


def _finish_and_claim(known: Sequence[Change], params: dict[str, Any],
                      limit: int) -> sa.Select[Any] | sa.CompoundSelect[Any]:
    """PostgreSQL: the statement that writes ``known`` (checked by :func:`_batch`)
    and claims up to ``limit`` jobs; adds the batch's values to ``params``
    (those of :func:`_claim_params`). Without changes, the claim alone."""
    if not known:
        return _postgres_claim(limit)
    shape, batch = _change_records(known)
    params.update(batch)
    return _postgres_commit_and_claim(shape, limit)


def _written_ids(rows: _Rows) -> set[str]:
    """The ids of the jobs a finish-and-claim statement wrote (none for a claim)."""
    if "written" not in rows.names:
        return set()
    return {job_id for ids in rows["written"] if ids for job_id in ids}


def _outcomes(changes: Sequence[Change], written: set[str]) -> list[Job | None]:
    return [change.after if change.after.id in written else None for change in changes]


# -- statements, built once (building them per call costs more than running them) -------------


def _param(name: str, column: sa.Column[Any]) -> sa.BindParameter[Any]:
    return sa.bindparam(name, type_=column.type)


def _cast_param(name: str, column: sa.Column[Any]) -> sa.ColumnElement[Any]:
    """A parameter cast to the column's type, which ``INSERT ... SELECT`` needs on PostgreSQL."""
    return sa.cast(_param(name, column), column.type)


_JOB_COLUMNS = [column for column in jobs.c if column.name != "history_length"]
_NOW = _param("now", jobs.c.updated_at)
_LIMIT = sa.bindparam("limit", type_=sa.Integer)


def _compare_and_set(*, token_is_null: bool) -> sa.Update:
    """Write the ``job_*`` values if the job still has the expected status and lease token."""
    token = (jobs.c.lease_token.is_(None) if token_is_null
             else jobs.c.lease_token == _param("expected_token", jobs.c.lease_token))
    return (sa.update(jobs)
            .where(jobs.c.id == _param("expected_id", jobs.c.id),
                   jobs.c.status == _param("expected_status", jobs.c.status), token)
            .values({c.name: _param(f"job_{c.name}", c) for c in _JOB_COLUMNS if c.name != "id"})
            .values(history_length=jobs.c.history_length + 1)
            .returning(jobs.c.id, jobs.c.history_length))


def _notify(job_id: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
    """PostgreSQL: NOTIFY :data:`NOTIFY_CHANNEL` with the job id, delivered at commit."""
    return sa.func.pg_notify(sa.literal_column(f"'{NOTIFY_CHANNEL}'"), sa.cast(job_id, sa.Text))


def _logged(written: sa.CTE, *, notify: bool) -> sa.Select[Any]:
    """PostgreSQL: append the ``event_*`` history row for the job row ``written``
    returned (none when the compare-and-set lost), and NOTIFY when asked."""
    logged = (
        sa.insert(events)
        .from_select(["job_id", "seq", *_EVENT_COLUMNS],
                     sa.select(written.c.id, written.c.history_length,
                               *(_cast_param(f"event_{n}", events.c[n]) for n in _EVENT_COLUMNS)))
        .returning(events.c.job_id, events.c.seq)
        .cte("logged"))
    if notify:
        return sa.select(logged.c.seq, _notify(logged.c.job_id))
    return sa.select(logged.c.seq)


_TEXT_ARRAY = postgresql.ARRAY(sa.Text)
_UUID_ARRAY = postgresql.ARRAY(sa.Uuid(as_uuid=False))


def _postgres_batch_write(shape: _BatchShape) -> sa.CTE:
    """PostgreSQL: a compare-and-set per element of the batch's arrays (see
    :func:`_change_records`) writing ``shape.columns``, and each winner's
    history row. The CTE returns the history rows written (``job_id``,
    ``to_status``). Values travel as text and are cast to their column's type.
    A batch of one change has no arrays: its job is found by primary key in
    the plan PostgreSQL makes once for every call, as a single commit's is."""
    fields = _batch_fields(shape.columns)
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
               jobs.c.lease_token.is_not_distinct_from(value["expected_token"]))
        .values({name: value[f"job_{name}"] for name in shape.columns})
        .values(history_length=jobs.c.history_length + 1)
        .returning(jobs.c.id, jobs.c.history_length,
                   *(value[f"event_{n}"].label(f"event_{n}") for n in _EVENT_COLUMNS))
        .cte("changed"))
    return (
        sa.insert(events)
        .from_select(["job_id", "seq", *_EVENT_COLUMNS],
                     sa.select(changed.c.id, changed.c.history_length,
                               *(changed.c[f"event_{n}"] for n in _EVENT_COLUMNS)))
        .returning(events.c.job_id, events.c.to_status)
        .cte("logged"))


def _notify_if_queued(logged: sa.CTE) -> sa.ColumnElement[Any]:
    """NOTIFY for a history row that made its job ``queued`` (NULL otherwise)."""
    return sa.case((status_is(JobStatus.QUEUED, logged.c.to_status),
                    sa.cast(_notify(logged.c.job_id), sa.Text)))


@functools.lru_cache(maxsize=256)
def _postgres_commit_many(shape: _BatchShape) -> sa.Select[Any]:
    """PostgreSQL, one statement: the batch write, and a NOTIFY for every job
    the batch makes ``queued``. One statement per shape of batch."""
    logged = _postgres_batch_write(shape)
    return sa.select(logged.c.job_id, _notify_if_queued(logged))


def _due(limit: int | None = None) -> sa.Select[Any]:
    """Claimable jobs (the guards of the claim edge), oldest ``run_at`` first, then
    id: at most ``limit`` written into the statement, or the ``limit`` parameter."""
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


def _postgres_claimed(limit: int) -> tuple[sa.CTE, sa.CTE]:
    """Lock a batch of up to ``limit`` due jobs (skipping locked ones), take them,
    log them: the CTE of the claimed job rows, and the CTE of their history rows.

    The batch size is written into the statement, one statement per size.
    PostgreSQL plans a LIMIT it cannot see for a tenth of the rows: once the
    queue was large, the generic plan of a prepared claim with a LIMIT
    parameter looked dearer than planning anew, which it then did at every
    call (measured: 0.3 ms of the server's time per call with 20,000 queued
    jobs)."""
    # id = ANY(ARRAY(...)): the locked ids are collected once, then the jobs are
    # found by primary key. A join on the picked ids would let a plan made once
    # for all batch sizes (a prepared statement's) hash the whole table instead.
    picked = sa.func.array(_due(limit).with_for_update(skip_locked=True).scalar_subquery())
    claimed = (sa.update(jobs).where(jobs.c.id == sa.any_(picked))
               .values(**_CLAIM_EFFECTS, lease_token=sa.cast(sa.func.gen_random_uuid(), sa.Text))
               .returning(*jobs.c)
               .cte("claimed"))
    claim_logged = (
        sa.insert(events)
        .from_select(["job_id", "seq", "attempt", *(n for n in _EVENT_COLUMNS if n != "attempt")],
                     sa.select(claimed.c.id, claimed.c.history_length, claimed.c.attempts,
                               *(_cast_param(f"event_{n}", events.c[n])
                                 for n in _EVENT_COLUMNS if n != "attempt")))
        .returning(events.c.seq)
        .cte("claim_logged"))
    return claimed, claim_logged


@functools.lru_cache(maxsize=256)
def _postgres_claim(limit: int) -> sa.Select[Any]:
    """PostgreSQL, one statement: claim a batch; the rows are the claimed jobs."""
    claimed, claim_logged = _postgres_claimed(limit)
    return sa.select(claimed).add_cte(claim_logged)


@functools.lru_cache(maxsize=256)
def _postgres_commit_and_claim(shape: _BatchShape, limit: int) -> sa.CompoundSelect[Any]:
    """PostgreSQL, one statement: the batch write of :func:`_postgres_commit_many`
    and a claim. Each claimed job is one row (``written`` NULL); one more row
    holds the ids the batch wrote in ``written`` (its job columns NULL).
    The two never touch the same row: the batch writes jobs that were not
    ``queued`` when the statement started, the claim takes only ``queued`` ones."""
    logged = _postgres_batch_write(shape)
    claimed, claim_logged = _postgres_claimed(limit)
    claims: sa.Select[Any] = sa.select(sa.cast(sa.null(), _TEXT_ARRAY).label("written"), claimed)
    # The HAVING clause is always true: it sends the NOTIFYs, one per row.
    written: sa.Select[Any] = sa.select(  # type: ignore[assignment]
        sa.func.array_agg(sa.cast(logged.c.job_id, sa.Text)), *(sa.null() for _ in claimed.c)
    ).having(sa.func.count(_notify_if_queued(logged)) >= 0)
    return sa.union_all(claims, written).add_cte(claim_logged)


def _sqlite_claim() -> sa.Update:
    """Take the due jobs; run inside BEGIN IMMEDIATE, so no other writer interleaves."""
    return (sa.update(jobs).where(jobs.c.id.in_(_due().scalar_subquery()))
            .values(**_CLAIM_EFFECTS,
                    lease_token=sa.func.lower(sa.func.hex(sa.func.randomblob(16))))
            .returning(*jobs.c))


_INSERT_JOB = sa.insert(jobs).values(
    {c.name: _param(f"job_{c.name}", c) for c in _JOB_COLUMNS}).values(history_length=1)
_INSERT_EVENT = sa.insert(events).values(
    {n: _param(f"event_{n}", events.c[n]) for n in _EVENT_COLUMNS}).values(
    job_id=_param("event_job_id", events.c.job_id), seq=_param("event_seq", events.c.seq))
_COMPARE_AND_SET = {token_is_null: _compare_and_set(token_is_null=token_is_null)
                    for token_is_null in (False, True)}
_POSTGRES_CREATE = _logged(_INSERT_JOB.returning(jobs.c.id, jobs.c.history_length).cte("created"),
                           notify=False)
_POSTGRES_COMMIT = {
    (token_is_null, notify): _logged(_COMPARE_AND_SET[token_is_null].cte("changed"), notify=notify)
    for token_is_null in (False, True) for notify in (False, True)}
_SQLITE_CLAIM = _sqlite_claim()
_GET = sa.select(jobs).where(jobs.c.id == _param("job_id", jobs.c.id))
_EXISTS = sa.select(jobs.c.id).where(jobs.c.id == _param("job_id", jobs.c.id))
_HISTORY = (sa.select(events).where(events.c.job_id == _param("job_id", events.c.job_id))
            .order_by(events.c.seq))
_AWAITING_UPLOADS = (sa.select(jobs).where(status_is(JobStatus.AWAITING_UPLOAD))
                     .order_by(jobs.c.upload_expires_at, jobs.c.id).limit(_LIMIT))
_EXPIRED_LEASES = (sa.select(jobs).where(status_is(JobStatus.QUICK_RUNNING),
                                         jobs.c.lease_expires_at <= _NOW)
                   .order_by(jobs.c.lease_expires_at, jobs.c.id).limit(_LIMIT))
_FAILED_SINCE = (sa.select(jobs).where(status_is(JobStatus.FAILED),
                                       jobs.c.finished_at >= _param("since", jobs.c.finished_at))
                 .order_by(jobs.c.finished_at.desc(), jobs.c.id).limit(_LIMIT))
_COUNTS = sa.select(jobs.c.status, sa.func.count().label("jobs")).group_by(jobs.c.status)


# -- driver errors --------------------------------------------------------------------------


def _constraint_name(exc: sa_exc.IntegrityError) -> str:
    diag = getattr(exc.orig, "diag", None)
    name = getattr(diag, "constraint_name", None)
    if name:
        return str(name)
    message = str(exc.orig)
    return message.split(":", 1)[1].strip() if ":" in message else message


def _is_duplicate_key(exc: sa_exc.IntegrityError) -> bool:
    return (getattr(exc.orig, "sqlstate", None) == "23505"
            or "UNIQUE constraint failed" in str(exc.orig))


def _translate(exc: sa_exc.StatementError, action: str, job_id: str | None) -> JobflowError:
    """The jobflow error for a driver error raised while doing ``action``."""
    orig = exc.orig
    if isinstance(orig, JobflowError):  # raised by one of our column types
        return orig
    detail = str(orig).strip().splitlines()[0] if orig is not None else str(exc)
    about = f" job {job_id}" if job_id else ""
    if isinstance(exc, sa_exc.IntegrityError):
        if action == "create" and _is_duplicate_key(exc):
            return InvalidInput(f"job {job_id} already exists")
        return InvalidInput(f"the database refused to {action}{about}: "
                            f"constraint {_constraint_name(exc)} failed")
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return StorageUnavailable(f"lost the database connection while trying to {action}"
                                  f"{about}: {detail}")
    missing_table = "no such table" in detail or getattr(orig, "sqlstate", None) == "42P01"
    if missing_table or isinstance(exc, sa_exc.ProgrammingError):
        return ConfigurationError(
            f"the database schema is not jobflow's ({detail}); run jobflow.migrations.upgrade")
    if isinstance(exc, sa_exc.DataError):
        return InvalidInput(f"the database refused a value while trying to {action}{about}: "
                            f"{detail}")
    return StorageUnavailable(f"the database failed while trying to {action}{about}: {detail}")


@contextmanager
def _driver_errors(action: str, job_id: str | None = None) -> Iterator[None]:
    try:
        yield
    except sa_exc.StatementError as exc:
        raise _translate(exc, action, job_id) from exc
    except (sa_exc.TimeoutError, sa_exc.DisconnectionError) as exc:
        raise StorageUnavailable(f"no database connection to {action}: {exc}") from exc


# -- statements sent straight to psycopg -----------------------------------------------------


@attrs.frozen
class _DriverStatement:
    """A PostgreSQL statement compiled once for psycopg's ``RawCursor`` (``$n``
    placeholders, so psycopg never parses its text), with the type processing
    SQLAlchemy would apply to its parameters and to its result columns."""

    sql: str
    #: Per ``$n``: the parameter's name, its value when the call gives none
    #: (``_REQUIRED``: the call must give one), and its processor.
    params: tuple[tuple[str, object, Callable[[Any], Any] | None], ...]
    columns: tuple[str, ...]
    #: Per result column that needs it: its index, and its processor of a whole column.
    results: tuple[tuple[int, Callable[[Sequence[Any]], list[Any]]], ...]

    def arguments(self, params: Mapping[str, Any]) -> list[Any]:
        """The driver's values of the ``$n`` placeholders."""
        args = []
        for name, default, process in self.params:
            value = params.get(name, default)
            if value is _REQUIRED:
                raise sa_exc.InvalidRequestError(f"a value is required for parameter {name!r}")
            args.append(value if process is None else process(value))
        return args

    def rows(self, rows: Sequence[Sequence[Any]]) -> _Rows:
        """The driver's rows, with SQLAlchemy's result processing."""
        result = _Rows.of(self.columns, rows)
        if not rows or not self.results:
            return result
        columns = list(result.columns)
        for index, process in self.results:
            columns[index] = process(columns[index])
        return _Rows(result.names, tuple(columns))


_REQUIRED = object()


def _in_utc(column: Sequence[datetime | None]) -> list[datetime | None]:
    """:class:`UTCDateTime`'s result processing for psycopg, which reads every
    ``timestamptz`` as an aware datetime: the same values, without the wrapper."""
    return [None if value is None else value.astimezone(UTC) for value in column]


def _column_processor(type_: Any, dialect: sa.Dialect
                      ) -> Callable[[Sequence[Any]], list[Any]] | None:
    if isinstance(type_, UTCDateTime):
        return _in_utc
    if isinstance(type_, sa.Uuid) and not type_.as_uuid:
        return None  # the store's cursor reads uuids as text (see _driver_cursor)
    process = type_.dialect_impl(dialect).result_processor(dialect, None)
    return None if process is None else functools.partial(_mapped, process)


def _mapped(process: Callable[[Any], Any], column: Sequence[Any]) -> list[Any]:
    return list(map(process, column))


@functools.lru_cache(maxsize=512)
def _driver_statement(statement: sa.Select[Any] | sa.CompoundSelect[Any],
                      dialect: sa.Dialect) -> _DriverStatement:
    numbered = PGDialect_psycopg(paramstyle="numeric_dollar")  # type: ignore[no-untyped-call]
    compiled = statement.compile(dialect=numbered)
    binds = {name: bind for bind, name in compiled.bind_names.items()}
    columns = list(statement.selected_columns)
    results = ((index, _column_processor(column.type, dialect))
               for index, column in enumerate(columns))
    return _DriverStatement(
        sql=compiled.string,
        params=tuple((name, _REQUIRED if binds[name].required else binds[name].effective_value,
                      binds[name].type.dialect_impl(dialect).bind_processor(dialect))
                     for name in compiled.positiontup or ()),
        columns=tuple(str(column.key) for column in columns),
        results=tuple((index, process) for index, process in results if process is not None))


# The engine events the direct path would not fire: its statements, and the
# SQLAlchemy Connection it does not make. Statement errors are dialect events.
_EXECUTION_EVENTS = ("before_execute", "after_execute", "before_cursor_execute",
                     "after_cursor_execute", "engine_connect")


def _watched(engine: Engine) -> bool:
    """Whether SQLAlchemy logs the statements run on ``engine`` or has listeners
    for its statements, their errors or its connections."""
    return engine._should_log_info() or bool(engine.dialect.dispatch.handle_error) or any(
        getattr(engine.dispatch, name) for name in _EXECUTION_EVENTS)


_CURSOR = "jobflow_raw_cursor"


def _driver_cursor(connection: PoolProxiedConnection) -> Any:
    """The psycopg ``RawCursor`` kept on a pooled connection: reused, it keeps
    the types it has looked up (a new one costs about 30 us per call)."""
    import psycopg  # only PostgreSQL needs it
    from psycopg.types.string import TextLoader

    driver = connection.driver_connection
    info = connection.info
    cursor = info.get(_CURSOR)
    if cursor is None or cursor.connection is not driver or cursor.closed:
        cursor = info[_CURSOR] = psycopg.RawCursor(driver)  # type: ignore[arg-type]
        # Job ids are text to jobflow: read them so, not as UUID objects made
        # only to be turned into text again.
        cursor.adapters.register_loader("uuid", TextLoader)
    return cursor


def _driver_execute(engine: Engine, prepared: _DriverStatement, args: list[Any]) -> list[Any]:
    """Run ``prepared`` as its own transaction on one of ``engine``'s pooled
    psycopg connections, past SQLAlchemy's Connection and execution layer;
    the driver's rows.

    The connection comes from the engine's pool (whose checkout and checkin
    events, pre-ping and recycling apply), is switched to autocommit for the
    statement, and goes back as it was found: a SQLAlchemy Connection with
    the AUTOCOMMIT isolation level does the same through its own machinery,
    for about 30 us more per call. Driver errors are raised as SQLAlchemy
    raises them, and a lost connection is invalidated as SQLAlchemy does."""
    dialect = engine.dialect
    connection = _checkout(engine)
    try:
        cursor = _driver_cursor(connection)
        cursor.execute(prepared.sql, args)
        return cursor.fetchall()  # type: ignore[no-any-return]
    except dialect.loaded_dbapi.Error as exc:
        invalidated = dialect.is_disconnect(exc, connection, None)
        if invalidated:
            connection.invalidate(exc)
        raise _driver_error(engine, exc, prepared.sql, args, invalidated=invalidated) from exc
    except BaseException:  # interrupted mid-statement: the connection's state is unknown
        connection.invalidate()
        raise
    finally:
        _give_back(engine, connection)


def _checkout(engine: Engine) -> PoolProxiedConnection:
    """One of ``engine``'s pooled psycopg connections, switched to autocommit;
    a failure is raised as SQLAlchemy raises it."""
    dialect = engine.dialect
    try:
        connection = engine.raw_connection()
    except dialect.loaded_dbapi.Error as exc:
        raise _driver_error(engine, exc, None, None,
                            invalidated=dialect.is_disconnect(exc, None, None)) from exc
    try:
        connection.driver_connection.autocommit = True  # type: ignore[union-attr]
    except dialect.loaded_dbapi.Error as exc:
        connection.invalidate(exc)
        connection.close()
        raise _driver_error(engine, exc, None, None, invalidated=True) from exc
    return connection


def _give_back(engine: Engine, connection: PoolProxiedConnection) -> None:
    """Return a connection from :func:`_checkout` to the pool as it was lent:
    out of autocommit (its statements were their own transactions, so none is
    left open), or invalidated if that fails."""
    if connection.is_valid:
        try:
            connection.driver_connection.autocommit = False  # type: ignore[union-attr]
        except engine.dialect.loaded_dbapi.Error as exc:
            connection.invalidate(exc)
    connection.close()


def _driver_error(engine: Engine, exc: Exception, statement: str | None, args: list[Any] | None,
                  *, invalidated: bool) -> sa_exc.StatementError:
    """A driver error as SQLAlchemy raises it."""
    return sa_exc.DBAPIError.instance(
        statement, args, exc, engine.dialect.loaded_dbapi.Error,
        hide_parameters=engine.hide_parameters, connection_invalidated=invalidated,
        dialect=engine.dialect)


# -- statements in pipeline mode ---------------------------------------------------------------

_PIPELINE_NAMES = "jobflow_pipeline_statements"
_PIPELINED = "finish and claim jobs in a pipeline"


@attrs.define(eq=False)
class _Sent:
    """A statement in flight: what it finishes (``token`` is the caller's)."""

    token: object
    changes: Sequence[Change]
    prepared: _DriverStatement
    args: Sequence[Any]
    tries: int = 1


class PostgresClaimPipeline:
    """PostgreSQL: claiming and finish-and-claim statements on one pooled
    connection in libpq's pipeline mode, each sent without waiting for the
    rows of the ones before it, so the database runs one while the caller
    works on the rows of another.

    Each statement is followed by a sync point: it is its own transaction, as
    on the store's other paths. Results come back in the order the statements
    were sent, except that a statement rolled back to break a deadlock is sent
    again (up to :data:`DEADLOCK_TRIES` runs) and comes back after those
    already in flight. Statements are prepared on the connection once (a
    prepared statement is planned as psycopg's own would be). Any other error
    breaks the pipeline: its connection is invalidated when it is closed, and
    the statements still in flight may or may not have run (each in full or
    not at all).
    """

    def __init__(self, engine: Engine, *, worker_id: str, limit: int,
                 lease_seconds: float) -> None:
        from psycopg.adapt import Transformer

        self._engine = engine
        self._worker_id, self._limit, self._lease_seconds = worker_id, limit, lease_seconds
        self._in_flight: deque[_Sent | None] = deque()  # None: a statement being prepared
        self._broken = False
        self._connection = _checkout(engine)
        try:
            driver: Any = self._connection.driver_connection
            self._transformer = Transformer.from_context(_driver_cursor(self._connection))
            self._pgconn = driver.pgconn
            names = self._connection.info.get(_PIPELINE_NAMES)
            if names is None or names[0] is not driver:
                names = self._connection.info[_PIPELINE_NAMES] = (driver, {})
            self._names: dict[str, bytes] = names[1]
            self._selector = selectors.DefaultSelector()
            self._selector.register(self._pgconn.socket, selectors.EVENT_READ)
            self._pgconn.enter_pipeline_mode()
        except engine.dialect.loaded_dbapi.Error as exc:
            self._connection.invalidate(exc)
            self._connection.close()
            raise _driver_error(engine, exc, None, None, invalidated=True) from exc

    @property
    def in_flight(self) -> int:
        """Statements sent whose results were not received yet."""
        return sum(sent is not None for sent in self._in_flight)

    def send(self, token: object, changes: Sequence[Change], *, now: datetime) -> None:
        """Send the statement that writes ``changes`` (each its own compare-and-set,
        as :meth:`SqlAlchemyJobStore.commit_and_claim`) and claims the next jobs;
        :meth:`receive` gives its outcome with ``token``."""
        from psycopg.adapt import PyFormat

        params = _claim_params(worker_id=self._worker_id, limit=self._limit, now=now,
                               lease_seconds=self._lease_seconds)
        prepared = _driver_statement(_finish_and_claim(_batch(changes), params, self._limit),
                                     self._engine.dialect)
        with _driver_errors(_PIPELINED):
            args = prepared.arguments(params)
            self._send(_Sent(token, changes, prepared,
                             self._transformer.dump_sequence(args, [PyFormat.TEXT] * len(args))))

    def receive(self) -> tuple[object, list[Job | None], list[Claim]]:
        """The outcome of the next statement to finish: its token, the jobs it
        wrote (None for a change that lost), and its claims."""
        with _driver_errors(_PIPELINED):
            return self._receive()

    def _receive(self) -> tuple[object, list[Job | None], list[Claim]]:
        from psycopg import pq

        while True:
            sent = self._in_flight[0]
            result = self._result()
            if sent is not None:  # read up to the statement's sync point
                while self._result().status != pq.ExecStatus.PIPELINE_SYNC:
                    pass
            self._in_flight.popleft()
            if result.status == pq.ExecStatus.FATAL_ERROR:
                self._statement_failed(result, sent)
                continue  # rolled back by a deadlock: sent again
            if sent is None:
                continue  # prepared
            self._transformer.set_pgresult(result)
            rows = sent.prepared.rows(self._transformer.load_rows(0, result.ntuples, tuple))
            return sent.token, _outcomes(sent.changes, _written_ids(rows)), _claims(rows)

    def close(self) -> None:
        """Leave pipeline mode and give the connection back to the pool (invalidated
        if the pipeline broke or statements are still in flight)."""
        connection = self._connection
        try:
            if self._broken or self._in_flight:
                connection.invalidate()
            else:
                self._pgconn.exit_pipeline_mode()
        except self._engine.dialect.loaded_dbapi.Error as exc:
            connection.invalidate(exc)
        finally:
            self._selector.close()
            _give_back(self._engine, connection)

    def _send(self, sent: _Sent) -> None:
        pgconn = self._pgconn
        try:
            name = self._names.get(sent.prepared.sql)
            if name is None:
                name = f"jobflow_{len(self._names)}".encode()
                pgconn.send_prepare(name, sent.prepared.sql.encode())
                self._names[sent.prepared.sql] = name
                self._in_flight.append(None)
            pgconn.send_query_prepared(name, sent.args)
            pgconn.pipeline_sync()
            self._in_flight.append(sent)
            while pgconn.flush():  # the server may be waiting for us to read
                self._wait(selectors.EVENT_READ | selectors.EVENT_WRITE)
        except self._engine.dialect.loaded_dbapi.Error as exc:
            self._lost(exc, sent)

    def _result(self) -> Any:
        """The next result (a PGresult) of the statements in flight."""
        pgconn = self._pgconn
        try:
            while True:
                pgconn.consume_input()
                while pgconn.is_busy():
                    self._wait(selectors.EVENT_READ)
                    pgconn.consume_input()
                result = pgconn.get_result()
                if result is not None:
                    return result
        except self._engine.dialect.loaded_dbapi.Error as exc:
            self._lost(exc, None)

    def _wait(self, events: int) -> None:
        self._selector.modify(self._pgconn.socket, events)
        self._selector.select()
        if events & selectors.EVENT_WRITE:
            self._pgconn.consume_input()

    def _statement_failed(self, result: Any, sent: _Sent | None) -> None:
        """Send a deadlocked statement again, or raise its error as SQLAlchemy would."""
        import psycopg
        from psycopg import pq

        sqlstate = (result.error_field(pq.DiagnosticField.SQLSTATE) or b"").decode()
        if sent is not None and sqlstate == _DEADLOCK_DETECTED and sent.tries < DEADLOCK_TRIES:
            sent.tries += 1
            self._send(sent)
            return
        self._broken = True
        message = (result.error_message or b"").decode(errors="replace").strip()
        try:
            error: Exception = psycopg.errors.lookup(sqlstate)(message)
        except KeyError:
            error = psycopg.DatabaseError(message)
        raise _driver_error(self._engine, error, sent.prepared.sql if sent else None, None,
                            invalidated=False) from error

    def _lost(self, exc: Exception, sent: _Sent | None) -> NoReturn:
        """The connection failed: the pipeline is broken."""
        self._broken = True
        raise _driver_error(self._engine, exc, sent.prepared.sql if sent else None, None,
                            invalidated=True) from exc


# -- where statements run ----------------------------------------------------------------------


class _Transactions(Protocol):
    """Hands out a connection for one read or one atomic write."""

    def read(self) -> AbstractContextManager[Connection]: ...

    def write(self) -> AbstractContextManager[Connection]: ...


def _sqlite_in_transaction(conn: Connection) -> bool:
    return bool(getattr(conn.connection.dbapi_connection, "in_transaction", False))


def sqlite_file(engine: Engine) -> Path | None:
    """The file of a SQLite engine's database; None for an in-memory database
    or another dialect."""
    database = engine.url.database or ""
    if engine.dialect.name != "sqlite" or database in ("", ":memory:") or (
            "mode=memory" in str(engine.url)):
        return None
    return Path(database)


class _SQLiteSetup:
    """Per-connection SQLite settings, applied once to each pooled connection."""

    _DONE = "jobflow_sqlite_ready"

    def __init__(self, engine: Engine, busy_timeout_seconds: float) -> None:
        self.file_backed = sqlite_file(engine) is not None
        self.busy_timeout_ms = int(busy_timeout_seconds * 1000)

    def prepare(self, conn: Connection) -> None:
        info = conn.connection.info
        if info.get(self._DONE):
            return
        conn.exec_driver_sql(f"PRAGMA busy_timeout = {self.busy_timeout_ms}")
        conn.exec_driver_sql("PRAGMA foreign_keys = ON")
        if self.file_backed:
            conn.exec_driver_sql("PRAGMA journal_mode = WAL")
        conn.commit()
        info[self._DONE] = True


class _EngineTransactions:
    """Each call on its own pooled connection, committed by jobflow.

    On PostgreSQL every call is a single statement (see the store's writes),
    so it runs in autocommit mode: the statement is its own transaction and
    costs one round trip, with no BEGIN or COMMIT around it.
    """

    def __init__(self, engine: Engine, sqlite: _SQLiteSetup | None) -> None:
        self._engine = engine
        self._sqlite = sqlite
        self._single_statements = (engine.execution_options(isolation_level="AUTOCOMMIT")
                                   if sqlite is None else engine)
        # SQLite has one writer at a time: threads of this process queue here
        # rather than in SQLite's busy handler, which sleeps and polls.
        self._write_lock = threading.Lock()

    @contextmanager
    def read(self) -> Iterator[Connection]:
        with self._single_statements.connect() as conn:
            if self._sqlite is not None:
                self._sqlite.prepare(conn)
            yield conn

    @contextmanager
    def write(self) -> Iterator[Connection]:
        if self._sqlite is None:
            with self._single_statements.connect() as conn:
                yield conn
            return
        with self._write_lock, self._engine.connect() as conn:
            self._sqlite.prepare(conn)
            # Take the write lock first: a deferred transaction that read before
            # writing could not be upgraded once another writer committed.
            conn.exec_driver_sql("BEGIN IMMEDIATE")
            yield conn
            conn.commit()


class _HostTransactions:
    """Every call on the host's connection, inside the host's transaction; never commits."""

    def __init__(self, connection: Callable[[], Connection], sqlite: bool) -> None:
        self._connection = connection
        self._sqlite = sqlite

    @contextmanager
    def read(self) -> Iterator[Connection]:
        yield self._connection()

    @contextmanager
    def write(self) -> Iterator[Connection]:
        conn = self._connection()
        if not self._sqlite:
            yield conn  # every write is one statement: atomic by itself
            return
        if not _sqlite_in_transaction(conn):
            # pysqlite opens the real transaction lazily; a SAVEPOINT opened
            # outside one would commit on release, behind the host's back.
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        with conn.begin_nested():
            yield conn


def _dialect_name(name: str) -> str:
    if name not in SUPPORTED_DIALECTS:
        raise ConfigurationError(
            f"SqlAlchemyJobStore supports PostgreSQL and SQLite, not {name!r}")
    return name


# -- the store ---------------------------------------------------------------------------------


class SqlAlchemyJobStore:
    """Jobs and their history in PostgreSQL (psycopg 3) or SQLite.

    ``engine`` is a SQLAlchemy 2 :class:`~sqlalchemy.engine.Engine`; its
    database must have been migrated with :func:`jobflow.migrations.upgrade`.
    Nothing connects until the first call. Each call runs in its own
    transaction, committed before it returns; use :meth:`bind` to run calls
    inside a transaction of your own instead.

    For SQLite use a file database (``sqlite:///path/jobs.sqlite3``): it is
    switched to WAL, each connection waits up to ``busy_timeout_seconds`` for
    the write lock, and the store is safe to share between threads and
    processes. An in-memory SQLite database is private to one connection.
    """

    def __init__(self, engine: Engine, *, busy_timeout_seconds: float = 30.0) -> None:
        self._dialect = _dialect_name(engine.dialect.name)
        self._engine = engine
        sqlite = (_SQLiteSetup(engine, busy_timeout_seconds)
                  if self._dialect == "sqlite" else None)
        self._transactions: _Transactions = _EngineTransactions(engine, sqlite)
        # On PostgreSQL every statement on the store's own connections is its
        # own transaction: one that lost a deadlock wrote nothing and runs again.
        self._own_statements = self._dialect == "postgresql"
        # There it sends them straight to psycopg 3 (see _statement).
        self._direct = self._own_statements and engine.dialect.driver == "psycopg"

    @property
    def engine(self) -> Engine:
        """The engine this store was made with."""
        return self._engine

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._engine.url.render_as_string(hide_password=True)!r})"

    def bind(self, connection: Connection | Session) -> SqlAlchemyJobStore:
        """A store that runs on ``connection`` (a Connection or ORM Session) and never
        commits nor rolls back: the host's transaction decides.

        A job created through it commits or rolls back together with the host's
        own rows, history included. On PostgreSQL its NOTIFY is delivered when
        the host commits. Claims made through it are held only once the host
        commits, so workers should use the unbound store.
        """
        if isinstance(connection, Session):
            session = connection
            dialect = session.get_bind().dialect.name

            def current() -> Connection:
                return session.connection()
        elif isinstance(connection, Connection):
            host = connection
            dialect = host.dialect.name

            def current() -> Connection:
                return host
        else:
            raise ConfigurationError(
                f"bind() takes a SQLAlchemy Connection or Session, not {type(connection).__name__}")
        bound = copy.copy(self)
        bound._dialect = _dialect_name(dialect)
        bound._transactions = _HostTransactions(current, sqlite=bound._dialect == "sqlite")
        bound._own_statements = bound._direct = False
        return bound

    @property
    def _postgres(self) -> bool:
        return self._dialect == "postgresql"

    def _statement(self, statement: sa.Select[Any] | sa.CompoundSelect[Any],
                   params: dict[str, Any], *, write: bool = True) -> _Rows:
        """Run one statement, a write (default) or a read, as its own transaction
        (or in the host's); its rows.

        On the store's own PostgreSQL connections it goes straight to psycopg,
        and a pooled connection is held only while the database runs it: its
        parameters are prepared before, its rows processed after. An engine
        that logs statements, or has listeners for statements, their errors
        or new Connections, gets the statement through SQLAlchemy's execution
        layer, so that they see every statement.

        Concurrent finish-and-claim statements can deadlock in PostgreSQL
        (seen "while locking updated version" of a job row: SKIP LOCKED does
        not skip every wait); PostgreSQL then rolls one back. When the
        statement was its own transaction it runs again, up to
        :data:`DEADLOCK_TRIES` times in all."""
        transaction = self._transactions.write if write else self._transactions.read
        tries = 1
        while True:
            try:
                if self._direct and not _watched(self._engine):
                    prepared = _driver_statement(statement, self._engine.dialect)
                    rows = _driver_execute(self._engine, prepared, prepared.arguments(params))
                    return prepared.rows(rows)
                with transaction() as conn:
                    return _Rows.of_result(conn.execute(statement, params))
            except sa_exc.DBAPIError as exc:
                deadlocked = getattr(exc.orig, "sqlstate", None) == _DEADLOCK_DETECTED
                if not (deadlocked and self._own_statements and tries < DEADLOCK_TRIES):
                    raise
                tries += 1

    # -- writes ------------------------------------------------------------------------

    def create(self, change: Change) -> Job:
        job = change.after
        if _canonical_job_id(job.id) is None:
            raise InvalidInput(f"job id {job.id!r} is not a canonical UUID")
        params = {**_job_params(job), **_event_params(change)}
        with _driver_errors("create", job.id):
            if self._postgres:
                self._statement(_POSTGRES_CREATE, params)
            else:
                with self._transactions.write() as conn:
                    conn.execute(_INSERT_JOB, params)
                    conn.execute(_INSERT_EVENT,
                                 {**params, "event_job_id": job.id, "event_seq": 1})
        return job

    def commit(self, change: Change) -> Job | None:
        before, after = change.before, change.after
        if before is None:
            raise InvalidInput("commit needs the snapshot the change was decided on")
        _check_same_job(change)
        if _canonical_job_id(before.id) is None:
            return None
        with _driver_errors(change.event.value, before.id):
            if not self._postgres:
                with self._transactions.write() as conn:
                    return after if self._sqlite_compare_and_set(conn, change) else None
            params = {**_job_params(after), **_event_params(change), "expected_id": before.id,
                      "expected_status": before.status, "expected_token": before.lease_token}
            statement = _POSTGRES_COMMIT[before.lease_token is None,
                                         after.status is JobStatus.QUEUED]
            return after if self._statement(statement, params) else None

    def commit_many(self, changes: Sequence[Change]) -> list[Job | None]:
        if len(changes) == 1:  # the single-change statement is the cheaper one
            return [self.commit(changes[0])]
        known = _batch(changes)
        if not known:
            return [None] * len(changes)
        with _driver_errors("commit a batch of changes"):
            if self._postgres:
                shape, batch = _change_records(known)
                written = set(self._statement(_postgres_commit_many(shape), batch)["job_id"])
            else:
                with self._transactions.write() as conn:
                    written = self._sqlite_commit_many(conn, known)
        return _outcomes(changes, written)

    def commit_and_claim(self, changes: Sequence[Change], *, worker_id: str, limit: int,
                         now: datetime, lease_seconds: float
                         ) -> tuple[list[Job | None], list[Claim]]:
        known = _batch(changes)
        params = _claim_params(worker_id=worker_id, limit=limit, now=now,
                               lease_seconds=lease_seconds)
        with _driver_errors("commit a batch of changes and claim"):
            if self._postgres:
                rows = self._statement(_finish_and_claim(known, params, limit), params)
                written = _written_ids(rows)
            else:
                with self._transactions.write() as conn:
                    written = self._sqlite_commit_many(conn, known)
                    rows = self._sqlite_claim(conn, params)
        return _outcomes(changes, written), _claims(rows)

    def claim_pipeline(self, *, worker_id: str, limit: int,
                       lease_seconds: float) -> PostgresClaimPipeline | None:
        """A :class:`PostgresClaimPipeline` on one of the store's own PostgreSQL
        connections; None where the store's statements go through SQLAlchemy's
        execution layer (SQLite, a bound store, an engine with listeners):
        the caller then makes its calls one at a time."""
        if not self._direct or _watched(self._engine):
            return None
        with _driver_errors("open a claim pipeline"):
            return PostgresClaimPipeline(self._engine, worker_id=worker_id, limit=limit,
                                 lease_seconds=lease_seconds)

    def _sqlite_commit_many(self, conn: Connection, changes: Sequence[Change]) -> set[str]:
        """SQLite, inside the caller's write transaction: the ids of the changes written."""
        return {change.after.id for change in changes
                if self._sqlite_compare_and_set(conn, change)}

    @staticmethod
    def _sqlite_compare_and_set(conn: Connection, change: Change) -> bool:
        """SQLite, inside the caller's write transaction: one change and its history row."""
        before = change.before
        assert before is not None
        params = {**_job_params(change.after), **_event_params(change), "expected_id": before.id,
                  "expected_status": before.status, "expected_token": before.lease_token}
        statement = _COMPARE_AND_SET[before.lease_token is None]
        written = conn.execute(statement, params).mappings().first()
        if written is None:
            return False
        conn.execute(_INSERT_EVENT, {**params, "event_job_id": before.id,
                                     "event_seq": written["history_length"]})
        return True

    @staticmethod
    def _sqlite_claim(conn: Connection, params: dict[str, Any]) -> _Rows:
        """SQLite, inside the caller's write transaction: take due jobs, log each claim."""
        rows = _Rows.of_result(conn.execute(_SQLITE_CLAIM, params))
        if rows:
            conn.execute(_INSERT_EVENT, [
                {**params, "event_job_id": job_id, "event_seq": seq, "event_attempt": attempt}
                for job_id, seq, attempt in zip(rows["id"], rows["history_length"],
                                                rows["attempts"], strict=True)])
        return rows

    def claim(self, *, worker_id: str, limit: int, now: datetime,
              lease_seconds: float) -> list[Claim]:
        if limit < 1:
            return []
        params = _claim_params(worker_id=worker_id, limit=limit, now=now,
                               lease_seconds=lease_seconds)
        with _driver_errors("claim"):
            if self._postgres:
                rows = self._statement(_postgres_claim(limit), params)
            else:
                with self._transactions.write() as conn:
                    rows = self._sqlite_claim(conn, params)
        return _claims(rows)

    # -- reads -------------------------------------------------------------------------

    def get(self, job_id: str) -> Job:
        if _canonical_job_id(job_id) is None:
            raise JobNotFound(job_id)
        with _driver_errors("read", job_id):
            rows = self._statement(_GET, {"job_id": job_id}, write=False)
        if not rows:
            raise JobNotFound(job_id)
        return rows.jobs()[0]

    def history(self, job_id: str) -> list[JobEvent]:
        if _canonical_job_id(job_id) is None:
            raise JobNotFound(job_id)
        with _driver_errors("read the history of", job_id):
            rows = self._statement(_HISTORY, {"job_id": job_id}, write=False)
            if not rows and not self._statement(_EXISTS, {"job_id": job_id}, write=False):
                raise JobNotFound(job_id)
        return [_event_from_row(row) for row in rows.mappings()]

    def awaiting_uploads(self, *, limit: int) -> list[Job]:
        return self._jobs(_AWAITING_UPLOADS, {"limit": limit})

    def expired_leases(self, *, now: datetime, limit: int) -> list[Job]:
        return self._jobs(_EXPIRED_LEASES, {"now": now, "limit": limit})

    def failed_since(self, *, since: datetime, limit: int) -> list[Job]:
        return self._jobs(_FAILED_SINCE, {"since": since, "limit": limit})

    def _jobs(self, query: sa.Select[Any], params: dict[str, Any]) -> list[Job]:
        if params["limit"] < 1:
            return []
        with _driver_errors("list jobs"):
            rows = self._statement(query, params, write=False)
        return rows.jobs()

    def counts(self) -> dict[JobStatus, int]:
        counts = dict.fromkeys(JobStatus, 0)
        with _driver_errors("count jobs"):
            rows = self._statement(_COUNTS, {}, write=False)
            counts.update(zip(map(JobStatus, rows["status"]), rows["jobs"], strict=True))
        return counts


__all__ = ["NOTIFY_CHANNEL", "SUPPORTED_DIALECTS", "SqlAlchemyJobStore", "sqlite_file"]
