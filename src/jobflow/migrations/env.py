"""Alembic environment for jobflow's own migrations.

Run through :mod:`jobflow.migrations` (which passes the connection in
``config.attributes``), never configured from an ini file. Versions are kept
in ``jobflow_alembic_version``; only jobflow's tables are looked at, so
autogenerate ignores whatever else lives in the same database.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context
from sqlalchemy.engine import Connection

from jobflow.adapters.sqlalchemy.schema import metadata
from jobflow.migrations import VERSION_TABLE, is_jobflow_table


def only_jobflow_tables(name: str | None, type_: str, parent_names: object) -> bool:
    return type_ != "table" or is_jobflow_table(name)


def run_on(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        include_name=only_jobflow_tables,
        # SQLite alters tables by copying them; PostgreSQL may commit inside
        # a migration (autocommit_block), so each migration is its own unit.
        render_as_batch=connection.dialect.name == "sqlite",
        transaction_per_migration=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_offline(url: str) -> None:
    context.configure(url=url, target_metadata=metadata, version_table=VERSION_TABLE,
                      literal_binds=True, transaction_per_migration=True)
    with context.begin_transaction():
        context.run_migrations()


def run() -> None:
    config = context.config
    connection = config.attributes.get("connection")
    url = config.get_main_option("sqlalchemy.url")
    if context.is_offline_mode():
        if url is None:
            raise RuntimeError("offline jobflow migrations need sqlalchemy.url")
        run_offline(url)
    elif connection is not None:
        run_on(connection)
    else:
        if url is None:
            raise RuntimeError("jobflow migrations need a connection or sqlalchemy.url")
        engine = sa.create_engine(url)
        try:
            with engine.connect() as conn:
                run_on(conn)
                conn.commit()
        finally:
            engine.dispose()


run()
