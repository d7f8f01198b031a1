"""Per-job fault policy: a cancel request for a running job, and deferrals.

Revision: 0003
Revises: 0002

``jobflow_jobs.cancel_requested_at`` records that someone asked a running job
to stop: the job keeps its lease until its worker sees the request (through
the lease renewal) and ends the attempt.

``jobflow_jobs.deferrals`` counts the attempts that ended because something
outside the job failed (the object store was unavailable, or the handler
asked to be retried later): they give their attempt back, so an outage does
not spend ``max_attempts``, and are bounded by a budget of their own.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobflow_jobs") as batch:
        batch.add_column(sa.Column("cancel_requested_at", sa.DateTime(timezone=True),
                                   nullable=True))
        batch.add_column(sa.Column("deferrals", sa.Integer(), nullable=False,
                                   server_default=sa.text("0")))
        batch.create_check_constraint(op.f("ck_jobflow_jobs_deferrals_not_negative"),
                                      "deferrals >= 0")


def downgrade() -> None:
    with op.batch_alter_table("jobflow_jobs") as batch:
        batch.drop_constraint(op.f("ck_jobflow_jobs_deferrals_not_negative"), type_="check")
        batch.drop_column("deferrals")
        batch.drop_column("cancel_requested_at")
