"""jobflow's database migrations (alembic), shipped inside the package.

They keep their own version table, ``jobflow_alembic_version``, so they never
touch a host application's ``alembic_version`` or its migration history::

    import jobflow.migrations
    jobflow.migrations.upgrade("postgresql+psycopg://app@db/app")   # or an Engine
    jobflow.migrations.current(engine)      # "0001", or None before the first upgrade
    jobflow.migrations.downgrade(engine, "base")

A host app with its own alembic setup runs jobflow's migrations next to its
own, not inside them: call :func:`upgrade` from its deploy step (or at the end
of its ``env.py``, with the engine), and pass :func:`skip_jobflow_tables` as
``include_name`` to its ``context.configure`` so that its autogenerate leaves
jobflow's tables alone. ``docs/migrations.md`` shows both, and how a future
migration adds a PostgreSQL enum label.

Give :func:`upgrade` an Engine or a URL rather than a Connection that is
already in a transaction: a migration that adds an enum label on PostgreSQL
needs to commit in the middle (an ``autocommit_block``), which an outer
transaction would forbid.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection, Engine

from jobflow.adapters.sqlalchemy.schema import table_names

#: The table where jobflow records which of its migrations ran.
VERSION_TABLE = "jobflow_alembic_version"
#: The folder holding ``env.py`` and ``versions/``.
SCRIPT_LOCATION = Path(__file__).resolve().parent

Database = str | sa.URL | Engine | Connection


def config(connection: Connection | None = None) -> Config:
    """An alembic :class:`~alembic.config.Config` for jobflow's migrations.

    With ``connection``, alembic commands run on it. Useful for alembic
    commands this module does not wrap (``history``, ``stamp``...).
    """
    cfg = Config()
    cfg.set_main_option("script_location", str(SCRIPT_LOCATION))
    cfg.set_main_option("path_separator", "os")
    cfg.set_main_option("version_locations", str(SCRIPT_LOCATION / "versions"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


@contextmanager
def _connection(database: Database) -> Iterator[Connection]:
    if isinstance(database, Connection):
        yield database
        return
    if isinstance(database, Engine):
        with database.connect() as conn:
            yield conn
            conn.commit()
        return
    engine = sa.create_engine(database)
    try:
        with engine.connect() as conn:
            yield conn
            conn.commit()
    finally:
        engine.dispose()


def upgrade(database: Database, revision: str = "head") -> None:
    """Apply jobflow's migrations up to ``revision`` (default: the newest)."""
    with _connection(database) as conn:
        command.upgrade(config(conn), revision)


def downgrade(database: Database, revision: str) -> None:
    """Revert jobflow's migrations down to ``revision`` (``"base"``: drop everything)."""
    with _connection(database) as conn:
        command.downgrade(config(conn), revision)


def current(database: Database) -> str | None:
    """The revision the database is at, or None when no jobflow migration ran."""
    with _connection(database) as conn:
        context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
        return context.get_current_revision()


def head() -> str:
    """The newest revision shipped with this version of jobflow."""
    revision = ScriptDirectory.from_config(config()).get_current_head()
    assert revision is not None, "jobflow ships at least one migration"
    return revision


def is_jobflow_table(name: str | None) -> bool:
    """Whether ``name`` is one of jobflow's tables or its version table."""
    return name == VERSION_TABLE or name in table_names()


def skip_jobflow_tables(name: str | None, type_: str, parent_names: object) -> bool:
    """An ``include_name`` hook for a host app's alembic ``env.py``: everything
    but jobflow's tables, so the host's autogenerate never drops or alters them."""
    return not (type_ == "table" and is_jobflow_table(name))


__all__ = [
    "SCRIPT_LOCATION", "VERSION_TABLE", "config", "current", "downgrade", "head",
    "is_jobflow_table", "skip_jobflow_tables", "upgrade",
]
