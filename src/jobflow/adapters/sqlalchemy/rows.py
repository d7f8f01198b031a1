"""Between rows and domain objects: the one place database rows become
:class:`~jobflow.models.Job` and :class:`~jobflow.models.JobEvent` snapshots,
and a :class:`~jobflow.models.Change` becomes the parameters of the statements
in :mod:`jobflow.adapters.sqlalchemy.queries`.

Parameter names follow the statements: ``job_<column>`` for a job row's
values, ``event_<column>`` for its history row's, ``expected_<column>`` for
what a compare-and-set expects to find, ``batch_<field>`` for a PostgreSQL
batch (text values and array literals, see :func:`batch_params`).
"""

from __future__ import annotations

import functools
import json
import operator
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import attrs

from jobflow.adapters.sqlalchemy.schema import events, jobs
from jobflow.errors import InvalidInput
from jobflow.models import JOB_FIELDS, Change, Claim, Event, Job, JobEvent, JobStatus, job_values

# Job attributes stored under another column name.
_COLUMN_OF_FIELD = {"key": "object_key"}
_FIELD_OF_COLUMN = {column: field for field, column in _COLUMN_OF_FIELD.items()}
#: The job row's columns in the order of Job's fields (Job takes them positionally).
ROW_COLUMNS = tuple(_COLUMN_OF_FIELD.get(name, name) for name in JOB_FIELDS)
#: The columns a job's values are stored in: all but ``history_length``, which
#: the database counts.
JOB_COLUMNS = tuple(column for column in jobs.c if column.name != "history_length")
# A history row's columns: JobEvent's fields, in the order JobEvent takes them.
_EVENT_FIELDS = tuple(field.name for field in attrs.fields(JobEvent))
#: A history row's columns but ``job_id`` and ``seq``, in the order of
#: :meth:`Change.history_values`.
EVENT_COLUMNS = _EVENT_FIELDS[2:]
_JOB_PARAMS = tuple(f"job_{column}" for column in ROW_COLUMNS)
_EVENT_PARAMS = tuple(f"event_{name}" for name in EVENT_COLUMNS)


# -- rows -> domain objects ------------------------------------------------------------


def job_from_row(row: Mapping[Any, Any]) -> Job:
    """The job snapshot of a job row (its columns' types give each value its
    Python type: statuses come back as :class:`JobStatus`, times aware in UTC)."""
    return Job(*(row[column] for column in ROW_COLUMNS))


def event_from_row(row: Mapping[Any, Any]) -> JobEvent:
    """The history record of a history row."""
    return JobEvent(*(row[name] for name in _EVENT_FIELDS))


def claims_from_rows(rows: Sequence[Mapping[Any, Any]]) -> list[Claim]:
    """The claims of the job rows a claim statement returned, oldest ``run_at``
    first, then id."""
    claimed = sorted(map(job_from_row, rows), key=operator.attrgetter("run_at", "id"))
    return [Claim(job, job.lease_token) for job in claimed]  # type: ignore[arg-type]


# -- a change -> its parameters ----------------------------------------------------------


def job_params(job: Job) -> dict[str, Any]:
    """The ``job_<column>`` parameters that store ``job``."""
    return dict(zip(_JOB_PARAMS, job_values(job), strict=True))


def event_params(change: Change) -> dict[str, Any]:
    """The ``event_<column>`` parameters of ``change``'s history row, but its ``seq``."""
    return dict(zip(_EVENT_PARAMS, change.history_values(), strict=True))


def create_params(change: Change) -> dict[str, Any]:
    """The parameters that insert a new job and its first history row."""
    return {**job_params(change.after), **event_params(change)}


def commit_params(change: Change) -> dict[str, Any]:
    """The parameters of one compare-and-set: the new job values, the history
    row, and the id, status, lease token and cancel request the job must still have."""
    before = change.before
    assert before is not None
    return {**job_params(change.after), **event_params(change), "expected_id": before.id,
            "expected_status": before.status, "expected_token": before.lease_token,
            "expected_cancel_requested_at": before.cancel_requested_at}


def claim_params(*, worker_id: str, limit: int, now: datetime,
                 lease_seconds: float) -> dict[str, Any]:
    """The parameters of a claim: the claim edge's effects and its history row."""
    expires = now + timedelta(seconds=lease_seconds)
    return {"now": now, "limit": limit, "worker_id": worker_id,
            "lease_expires_at": expires, "claimed_status": JobStatus.QUICK_RUNNING,
            "event_event": Event.CLAIM, "event_from_status": JobStatus.QUEUED,
            "event_to_status": JobStatus.QUICK_RUNNING, "event_at": now,
            "event_worker_id": worker_id,
            "event_detail": {"lease_expires_at": expires.isoformat()}}


# -- a batch of changes -> the parameters of one PostgreSQL statement ------------------------


@attrs.frozen
class BatchShape:
    """What a PostgreSQL batch statement is built for: the job columns it writes,
    and which of its fields (:func:`batch_fields`) vary from change to change
    (one array each); the others are the same for the whole batch (one value each)."""

    columns: tuple[str, ...]
    varying: frozenset[str]


@functools.lru_cache(maxsize=256)
def batch_fields(columns: tuple[str, ...]) -> tuple[tuple[str, Any], ...]:
    """The fields of a PostgreSQL batch that writes ``columns``, and their types:
    the job id, the new values of ``columns``, the history row's ``event_*``
    values, and the expected status, lease token and cancel request."""
    return (("job_id", jobs.c.id.type),
            *((f"job_{name}", jobs.c[name].type) for name in columns),
            *((f"event_{name}", events.c[name].type) for name in EVENT_COLUMNS),
            ("expected_status", jobs.c.status.type),
            ("expected_token", jobs.c.lease_token.type),
            ("expected_cancel_requested_at", jobs.c.cancel_requested_at.type))


def batch_params(changes: Sequence[Change]) -> tuple[BatchShape, dict[str, Any]]:
    """The shape of a batch and the ``batch_<field>`` parameters of its
    statement, as text: a field that varies is one array literal of the
    changes' values in job id order (so that batches over the same jobs lock
    them alike), a field every change shares is its one value."""
    columns = _changed_columns(changes)
    ordered = sorted(changes, key=lambda change: change.after.id)
    rows = [_batch_values(change, columns) for change in ordered]
    params: dict[str, Any] = {}
    varying = set()
    for (name, _), values in zip(batch_fields(columns), zip(*rows, strict=True), strict=True):
        if _all_same(values):
            params[f"batch_{name}"] = _as_text(values[0])
        else:
            varying.add(name)
            params[f"batch_{name}"] = array_literal([_as_text(value) for value in values])
    return BatchShape(columns, frozenset(varying)), params


def _changed_columns(changes: Sequence[Change]) -> tuple[str, ...]:
    """The job columns any of ``changes`` writes, in table order (``updated_at`` always)."""
    # Field by field: each field's values before and after, compared as tuples.
    before = zip(*(job_values(change.before) for change in changes), strict=True)
    after = zip(*(job_values(change.after) for change in changes), strict=True)
    fields = {"updated_at", *(name for name, old, new in zip(JOB_FIELDS, before, after, strict=True)
                              if old != new)}
    return tuple(c.name for c in JOB_COLUMNS
                 if _FIELD_OF_COLUMN.get(c.name, c.name) in fields and c.name != "id")


def _batch_values(change: Change, columns: tuple[str, ...]) -> list[object]:
    """``change``'s values for the fields of :func:`batch_fields`, in their order."""
    before, after = change.before, change.after
    assert before is not None
    return [after.id, *(getattr(after, _FIELD_OF_COLUMN.get(name, name)) for name in columns),
            *change.history_values(), before.status, before.lease_token,
            before.cancel_requested_at]


def _all_same(values: Sequence[object]) -> bool:
    """Whether every value would travel as the same text as the first (no field
    of a batch holds both booleans and integers, whose equal values differ)."""
    first = values[0]
    if isinstance(first, (dict, list)) and first:  # {"n": 1} == {"n": True}, yet they differ
        text = _as_text(first)
        return all(_as_text(value) == text for value in values)
    return values.count(first) == len(values)


def _as_text(value: object) -> str | None:
    """How one value of a PostgreSQL batch travels: as text (or NULL), which the
    statement casts to its column's type."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise InvalidInput(f"timestamps must be timezone-aware, got {value!r}")
        return value.astimezone(UTC).isoformat()
    if isinstance(value, int):
        return str(value)
    return json.dumps(value, allow_nan=False)


def array_literal(values: Sequence[str | None]) -> str:
    """A PostgreSQL array literal of text values (None as NULL), every element
    quoted: one text parameter that the statement casts to an array. The
    driver's own adaptation of a list costs several times as much."""
    quoted = ("NULL" if value is None
              else '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"' for value in values)
    return "{" + ",".join(quoted) + "}"


__all__ = [
    "EVENT_COLUMNS", "JOB_COLUMNS", "ROW_COLUMNS", "BatchShape", "array_literal",
    "batch_fields", "batch_params", "claim_params", "claims_from_rows", "commit_params",
    "create_params", "event_from_row", "event_params", "job_from_row", "job_params",
]
