"""jobflow's tables, described once for SQLAlchemy and compared against the migrations.

``jobflow_jobs`` holds one row per job; ``jobflow_job_events`` its history.
The database itself enforces the invariants that do not need the object
store: a job outside ``awaiting_upload``/``failed`` has a verified upload,
attempts stay within ``0..max_attempts``, a running job holds a lease.

The partial indexes match the hot queries: claiming due ``queued`` jobs in
``(run_at, id)`` order, reconcile's scans of waiting uploads and of running
jobs' lease deadlines, monitoring's recent failures, and retention's
scans of finished jobs; and every status has one, so that monitoring counts
each status through its own index. Their predicates compare the status with a
literal (see :func:`status_is`) so that a query written the same way can use
them even when the database plans it generically.

This module is the one description of the schema; the migrations in
:mod:`jobflow.migrations` create the same thing, which the test suite checks.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect

from jobflow.errors import InvalidInput
from jobflow.models import Event, JobStatus

JOBS_TABLE = "jobflow_jobs"
EVENTS_TABLE = "jobflow_job_events"
#: The PostgreSQL enum type of job statuses; its labels are in JobStatus order.
STATUS_TYPE = "jobflow_job_status"
EVENT_TYPE = "jobflow_job_event"

metadata = sa.MetaData(naming_convention={
    "pk": "pk_%(table_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ix": "ix_%(table_name)s_%(column_0_name)s",
})


class UTCDateTime(sa.TypeDecorator[datetime]):
    """A timestamp stored in UTC and always read back as an aware UTC datetime.

    PostgreSQL keeps ``timestamptz``; SQLite keeps naive UTC text, whose
    fixed-width format sorts and compares in time order.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise InvalidInput(f"timestamps must be timezone-aware, got {value!r}")
        in_utc = value.astimezone(UTC)
        return in_utc if dialect.name == "postgresql" else in_utc.replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def _values(enum_class: type[JobStatus] | type[Event]) -> list[str]:
    return [member.value for member in enum_class]


def status_type(*, create_constraint: bool) -> sa.Enum:
    """The status column type: a native enum on PostgreSQL, text (+ CHECK) elsewhere."""
    return sa.Enum(JobStatus, name=STATUS_TYPE, values_callable=_values, length=32,
                   create_constraint=create_constraint, validate_strings=True)


def status_is(status: JobStatus, column: sa.ColumnElement[Any] | None = None
              ) -> sa.ColumnElement[bool]:
    """``status = '<status>'`` with the label inline, never a bound parameter.

    A partial index ``WHERE status = 'queued'`` is usable only when the planner
    can see that the query's predicate implies it; a parameter hides that.
    """
    target = jobs.c.status if column is None else column
    return target == sa.literal_column(f"'{status.value}'")


jobs = sa.Table(
    JOBS_TABLE, metadata,
    sa.Column("id", sa.Uuid(as_uuid=False), primary_key=True),
    sa.Column("owner_id", sa.Text, nullable=False),
    sa.Column("status", status_type(create_constraint=True), nullable=False),
    sa.Column("params", sa.JSON, nullable=False),
    sa.Column("bucket", sa.Text, nullable=False),
    sa.Column("object_key", sa.Text, nullable=False),
    sa.Column("content_type", sa.Text, nullable=False),
    sa.Column("expected_sha256", sa.String(64)),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.Column("upload_expires_at", UTCDateTime, nullable=False),
    sa.Column("run_at", UTCDateTime, nullable=False),
    sa.Column("max_attempts", sa.Integer, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
    sa.Column("upload_verified_at", UTCDateTime),
    sa.Column("object_size", sa.BigInteger),
    sa.Column("object_etag", sa.Text),
    sa.Column("object_version_id", sa.Text),
    sa.Column("object_sha256", sa.Text),
    sa.Column("lease_token", sa.Text),
    sa.Column("lease_owner", sa.Text),
    sa.Column("lease_expires_at", UTCDateTime),
    sa.Column("started_at", UTCDateTime),
    sa.Column("finished_at", UTCDateTime),
    sa.Column("error_code", sa.Text),
    sa.Column("error_message", sa.Text),
    sa.Column("result", sa.JSON(none_as_null=True)),
    # The size range of the policy the job was created under (revision 0002;
    # NULL for jobs created before it: the verifying process's policy decides).
    sa.Column("min_bytes", sa.BigInteger),
    sa.Column("max_bytes", sa.BigInteger),
    # A cancel request for a running job, and the attempts given back because
    # something outside the job failed (revision 0003).
    sa.Column("cancel_requested_at", UTCDateTime),
    sa.Column("deferrals", sa.Integer, nullable=False, server_default=sa.text("0")),
    # Rows in this job's history; the next event's seq is history_length + 1.
    # Kept on the job row so that the write holding the row lock numbers it.
    sa.Column("history_length", sa.Integer, nullable=False),
    sa.CheckConstraint(
        "upload_verified_at IS NOT NULL OR status IN ('awaiting_upload', 'failed')",
        name="upload_verified_unless_waiting_or_failed"),
    sa.CheckConstraint("attempts >= 0 AND attempts <= max_attempts",
                       name="attempts_within_max"),
    sa.CheckConstraint("max_attempts >= 1", name="max_attempts_positive"),
    sa.CheckConstraint(
        "status <> 'quick_running' OR (lease_token IS NOT NULL AND lease_expires_at IS NOT NULL)",
        name="running_holds_lease"),
    sa.CheckConstraint("history_length >= 1", name="history_not_empty"),
    sa.CheckConstraint("deferrals >= 0", name="deferrals_not_negative"),
)


def _partial_index(name: str, status: JobStatus, column: sa.Column[Any]) -> sa.Index:
    """An index of the jobs in ``status`` only, by ``(column, id)``."""
    return sa.Index(name, column, jobs.c.id,
                    postgresql_where=status_is(status), sqlite_where=status_is(status))


_partial_index("ix_jobflow_jobs_queued_run_at", JobStatus.QUEUED, jobs.c.run_at)
_partial_index("ix_jobflow_jobs_awaiting_upload_expires_at", JobStatus.AWAITING_UPLOAD,
               jobs.c.upload_expires_at)
_partial_index("ix_jobflow_jobs_running_lease_expires_at", JobStatus.QUICK_RUNNING,
               jobs.c.lease_expires_at)
_partial_index("ix_jobflow_jobs_failed_finished_at", JobStatus.FAILED, jobs.c.finished_at)
# Retention's scan of finished jobs, and monitoring's count of done jobs
# (revision 0004; failed ones use the index above).
_partial_index("ix_jobflow_jobs_done_finished_at", JobStatus.DONE, jobs.c.finished_at)

events = sa.Table(
    EVENTS_TABLE, metadata,
    sa.Column("job_id", sa.Uuid(as_uuid=False),
              sa.ForeignKey(jobs.c.id, ondelete="CASCADE"), primary_key=True),
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("event", sa.Enum(Event, name=EVENT_TYPE, values_callable=_values, length=32,
                               native_enum=False, create_constraint=True,
                               validate_strings=True), nullable=False),
    sa.Column("from_status", status_type(create_constraint=False)),
    sa.Column("to_status", status_type(create_constraint=False), nullable=False),
    sa.Column("at", UTCDateTime, nullable=False),
    sa.Column("worker_id", sa.Text),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("detail", sa.JSON, nullable=False),
    sa.CheckConstraint("seq >= 1", name="seq_positive"),
)

#: Every table jobflow owns (the migrations' version table aside).
TABLES: tuple[sa.Table, ...] = (jobs, events)


def table_names() -> frozenset[str]:
    return frozenset(t.name for t in TABLES)


__all__ = [
    "EVENTS_TABLE", "EVENT_TYPE", "JOBS_TABLE", "STATUS_TYPE", "TABLES", "UTCDateTime",
    "events", "jobs", "metadata", "status_is", "status_type", "table_names",
]
