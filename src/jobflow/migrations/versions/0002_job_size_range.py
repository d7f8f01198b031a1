"""The upload policy travels with the job: its size range.

Revision: 0002
Revises: 0001

``jobflow_jobs.min_bytes`` and ``max_bytes`` keep the size range of the
policy a job was created under, so that every later verification (complete,
reconcile's adoption, requeue) binds to it, whichever process runs it. The
job's other limits were already stored: its content type, expected checksum,
upload deadline and maximum attempts. Jobs created before this revision keep
NULL: the verifying process's policy decides for them, as it did before.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobflow_jobs", sa.Column("min_bytes", sa.BigInteger(), nullable=True))
    op.add_column("jobflow_jobs", sa.Column("max_bytes", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    op.drop_column("jobflow_jobs", "max_bytes")
    op.drop_column("jobflow_jobs", "min_bytes")
