"""The ``request_cancel`` event, and an index of done jobs for retention.

Revision: 0004
Revises: 0003

``jobflow_job_events.event`` accepts ``request_cancel``: someone asked a
running job to stop (its ``cancel_requested_at``, revision 0003). Its CHECK
is recreated with the new name; the list only grows, so every existing row
satisfies it.

``ix_jobflow_jobs_done_finished_at`` indexes ``done`` jobs by
``(finished_at, id)``, as ``ix_jobflow_jobs_failed_finished_at`` does failed
ones, so that a purge of finished jobs reads only the jobs it deletes. On
PostgreSQL it is built ``CONCURRENTLY`` (outside a transaction), so that
workers keep finishing jobs while a large table is indexed.

Downgrading refuses while a history still holds a ``request_cancel`` row (the
old CHECK does not accept it).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

EVENTS_0001 = ("created", "verify_upload", "reject_upload", "expire_upload", "claim",
               "heartbeat", "succeed", "retry", "fail", "rescue", "release", "cancel",
               "requeue")
EVENTS = (*EVENTS_0001, "request_cancel")
EVENT_CHECK = "ck_jobflow_job_events_jobflow_job_event"
DONE_INDEX = "ix_jobflow_jobs_done_finished_at"


def _events(labels: tuple[str, ...]) -> str:
    return "event IN (" + ", ".join(f"'{label}'" for label in labels) + ")"


def _on_postgres() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def _set_event_check(labels: tuple[str, ...]) -> None:
    with op.batch_alter_table("jobflow_job_events") as batch:
        batch.drop_constraint(op.f(EVENT_CHECK), type_="check")
        batch.create_check_constraint(op.f(EVENT_CHECK), _events(labels))


def upgrade() -> None:
    _set_event_check(EVENTS)
    where = sa.text("status = 'done'")
    if _on_postgres():
        with op.get_context().autocommit_block():
            op.create_index(op.f(DONE_INDEX), "jobflow_jobs", ["finished_at", "id"],
                            postgresql_where=where, postgresql_concurrently=True)
    else:
        op.create_index(op.f(DONE_INDEX), "jobflow_jobs", ["finished_at", "id"],
                        sqlite_where=where)


def downgrade() -> None:
    op.drop_index(op.f(DONE_INDEX), table_name="jobflow_jobs")
    _set_event_check(EVENTS_0001)
