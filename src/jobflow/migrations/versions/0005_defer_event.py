"""The ``defer`` event: an attempt given back because something outside the job failed.

Revision: 0005
Revises: 0004

A worker whose handler met an unavailable object store (or raised
``RetryLater``) writes ``defer``: the job goes back to ``queued`` without
spending an attempt, its ``deferrals`` count (revision 0003) grows, and
``failed`` follows once the deferral budget is spent. The history's CHECK on
event names is recreated with the new name. A downgrade below this revision
refuses to run while history rows use it: they could not be kept.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

CHECK = "ck_jobflow_job_events_jobflow_job_event"
OLD = ("created", "verify_upload", "reject_upload", "expire_upload", "claim", "heartbeat",
       "succeed", "retry", "fail", "rescue", "release", "cancel", "requeue", "request_cancel")
NEW = (*OLD, "defer")


def _events(names: tuple[str, ...]) -> str:
    return "event IN (" + ", ".join(f"'{name}'" for name in names) + ")"


def _recreate_check(names: tuple[str, ...]) -> None:
    with op.batch_alter_table("jobflow_job_events") as batch:
        batch.drop_constraint(op.f(CHECK), type_="check")
        batch.create_check_constraint(op.f(CHECK), _events(names))


def upgrade() -> None:
    _recreate_check(NEW)


def downgrade() -> None:
    deferred = op.get_bind().execute(sa.text(
        "SELECT count(*) FROM jobflow_job_events WHERE event = 'defer'")).scalar()
    if deferred:
        raise RuntimeError(
            f"{deferred} history rows record a 'defer' event, which revision 0004 does not "
            "know: a downgrade below 0005 would have to drop them")
    _recreate_check(OLD)
