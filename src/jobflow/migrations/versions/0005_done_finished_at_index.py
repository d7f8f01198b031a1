"""The finished jobs are counted through an index too.

Revision: 0005
Revises: 0002

A partial index of the ``done`` jobs by ``(finished_at, id)``, like the one
the ``failed`` jobs have had since 0001. The monitoring snapshot (the
Prometheus gauges, ``jobflow dashboard``) counts every status through its own
partial index, never the whole table, and lists the jobs finished last; on a
table of a million finished jobs a count read from this index takes a small
part of a scan of the table. A job is written to it once, when it succeeds.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0002"
branch_labels = None
depends_on = None

INDEX = "ix_jobflow_jobs_done_finished_at"


def upgrade() -> None:
    where = sa.text("status = 'done'")
    op.create_index(op.f(INDEX), "jobflow_jobs", ["finished_at", "id"],
                    postgresql_where=where, sqlite_where=where)


def downgrade() -> None:
    op.drop_index(op.f(INDEX), table_name="jobflow_jobs")
