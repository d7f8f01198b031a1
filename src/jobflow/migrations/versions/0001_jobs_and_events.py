"""Jobs and their history.

Revision: 0001
Revises: (none)

``jobflow_jobs`` with the database-enforced invariants (a job outside
``awaiting_upload``/``failed`` has a verified upload; attempts within
``0..max_attempts``; a running job holds a lease) and the partial indexes of
claim, reconcile and monitoring; ``jobflow_job_events`` with one row per transition.
On PostgreSQL the status is the native enum ``jobflow_job_status``, its
labels in the order of the state machine; on SQLite a CHECK constraint.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

STATUS_TYPE = "jobflow_job_status"
STATUSES = ("awaiting_upload", "queued", "quick_running", "done", "failed")
EVENTS = ("created", "verify_upload", "reject_upload", "expire_upload", "claim", "heartbeat",
          "succeed", "retry", "fail", "rescue", "release", "cancel", "requeue")


def _quoted(labels: tuple[str, ...]) -> str:
    return ", ".join(f"'{label}'" for label in labels)


def _on_postgres() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def _status_type() -> sa.types.TypeEngine[str]:
    if _on_postgres():
        return postgresql.ENUM(*STATUSES, name=STATUS_TYPE, create_type=False)
    return sa.String(32)


def _status_check() -> list[sa.CheckConstraint]:
    """SQLite has no enum type: the labels are a CHECK on the jobs' status."""
    if _on_postgres():
        return []
    return [sa.CheckConstraint(f"status IN ({_quoted(STATUSES)})",
                               name=op.f("ck_jobflow_jobs_jobflow_job_status"))]


def _utc() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    if _on_postgres():
        postgresql.ENUM(*STATUSES, name=STATUS_TYPE).create(op.get_bind())
    op.create_table(
        "jobflow_jobs",
        sa.Column("id", sa.Uuid(as_uuid=False), nullable=False),
        sa.Column("owner_id", sa.Text(), nullable=False),
        sa.Column("status", _status_type(), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("bucket", sa.Text(), nullable=False),
        sa.Column("object_key", sa.Text(), nullable=False),
        sa.Column("content_type", sa.Text(), nullable=False),
        sa.Column("expected_sha256", sa.String(64), nullable=True),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("updated_at", _utc(), nullable=False),
        sa.Column("upload_expires_at", _utc(), nullable=False),
        sa.Column("run_at", _utc(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("upload_verified_at", _utc(), nullable=True),
        sa.Column("object_size", sa.BigInteger(), nullable=True),
        sa.Column("object_etag", sa.Text(), nullable=True),
        sa.Column("object_version_id", sa.Text(), nullable=True),
        sa.Column("object_sha256", sa.Text(), nullable=True),
        sa.Column("lease_token", sa.Text(), nullable=True),
        sa.Column("lease_owner", sa.Text(), nullable=True),
        sa.Column("lease_expires_at", _utc(), nullable=True),
        sa.Column("started_at", _utc(), nullable=True),
        sa.Column("finished_at", _utc(), nullable=True),
        sa.Column("error_code", sa.Text(), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("history_length", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobflow_jobs")),
        sa.CheckConstraint(
            "upload_verified_at IS NOT NULL OR status IN ('awaiting_upload', 'failed')",
            name=op.f("ck_jobflow_jobs_upload_verified_unless_waiting_or_failed")),
        sa.CheckConstraint("attempts >= 0 AND attempts <= max_attempts",
                           name=op.f("ck_jobflow_jobs_attempts_within_max")),
        sa.CheckConstraint("max_attempts >= 1", name=op.f("ck_jobflow_jobs_max_attempts_positive")),
        sa.CheckConstraint(
            "status <> 'quick_running' OR "
            "(lease_token IS NOT NULL AND lease_expires_at IS NOT NULL)",
            name=op.f("ck_jobflow_jobs_running_holds_lease")),
        sa.CheckConstraint("history_length >= 1", name=op.f("ck_jobflow_jobs_history_not_empty")),
        *_status_check(),
    )
    for name, columns, status in (
        ("ix_jobflow_jobs_queued_run_at", ["run_at", "id"], "queued"),
        ("ix_jobflow_jobs_awaiting_upload_expires_at", ["upload_expires_at", "id"],
         "awaiting_upload"),
        ("ix_jobflow_jobs_running_lease_expires_at", ["lease_expires_at", "id"],
         "quick_running"),
        ("ix_jobflow_jobs_failed_finished_at", ["finished_at", "id"], "failed"),
    ):
        where = sa.text(f"status = '{status}'")
        op.create_index(op.f(name), "jobflow_jobs", columns,
                        postgresql_where=where, sqlite_where=where)
    op.create_table(
        "jobflow_job_events",
        sa.Column("job_id", sa.Uuid(as_uuid=False), nullable=False),
        sa.Column("seq", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("from_status", _status_type(), nullable=True),
        sa.Column("to_status", _status_type(), nullable=False),
        sa.Column("at", _utc(), nullable=False),
        sa.Column("worker_id", sa.Text(), nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("job_id", "seq", name=op.f("pk_jobflow_job_events")),
        sa.ForeignKeyConstraint(["job_id"], ["jobflow_jobs.id"], ondelete="CASCADE",
                                name=op.f("fk_jobflow_job_events_job_id")),
        sa.CheckConstraint("seq >= 1", name=op.f("ck_jobflow_job_events_seq_positive")),
        sa.CheckConstraint(f"event IN ({_quoted(EVENTS)})",
                           name=op.f("ck_jobflow_job_events_jobflow_job_event")),
    )


def downgrade() -> None:
    op.drop_table("jobflow_job_events")
    for name in ("ix_jobflow_jobs_failed_finished_at", "ix_jobflow_jobs_running_lease_expires_at",
                 "ix_jobflow_jobs_awaiting_upload_expires_at", "ix_jobflow_jobs_queued_run_at"):
        op.drop_index(op.f(name), table_name="jobflow_jobs")
    op.drop_table("jobflow_jobs")
    if _on_postgres():
        postgresql.ENUM(name=STATUS_TYPE).drop(op.get_bind())
