"""${message}

Revision: ${up_revision}
Revises: ${down_revision | comma,n}
Created: ${create_date}

Migrations never import jobflow's models: they describe the schema as it was
when they were written. Guard dialect-specific steps with
``op.get_bind().dialect.name``; PostgreSQL steps that cannot run in a
transaction (``ALTER TYPE ... ADD VALUE``) go in
``op.get_context().autocommit_block()``.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
${imports if imports else ""}

revision = ${repr(up_revision)}
down_revision = ${repr(down_revision)}
branch_labels = ${repr(branch_labels)}
depends_on = ${repr(depends_on)}


def upgrade() -> None:
    ${upgrades if upgrades else "pass"}


def downgrade() -> None:
    ${downgrades if downgrades else "pass"}
