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

An asyncio app passes its ``AsyncEngine`` or an async URL
(``postgresql+psycopg_async://...``, ``sqlite+aiosqlite:///...``) just the
same: the migrations then run through the async driver, as ``run_sync`` runs
them. From code that is not in an event loop (a deploy script) call
:func:`upgrade`, which runs one and closes the engine's idle connections
afterwards (they belong to that loop); inside a running loop (an app's
lifespan) ``await`` :func:`upgrade_async` instead::

    await jobflow.migrations.upgrade_async(async_engine)
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from jobflow.adapters.sqlalchemy.schema import table_names
from jobflow.errors import ConfigurationError

#: The table where jobflow records which of its migrations ran.
VERSION_TABLE = "jobflow_alembic_version"
#: The folder holding ``env.py`` and ``versions/``.
SCRIPT_LOCATION = Path(__file__).resolve().parent

Database = str | sa.URL | Engine | Connection | AsyncEngine | AsyncConnection

_T = TypeVar("_T")


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


def _url(database: str | sa.URL) -> sa.URL:
    try:
        return sa.make_url(database)
    except sa_exc.ArgumentError as exc:
        raise ConfigurationError(f"invalid database URL: {exc}") from exc


def _is_async(database: object) -> bool:
    """Whether ``database`` is reached through an asyncio driver."""
    if isinstance(database, AsyncEngine | AsyncConnection):
        return True
    if isinstance(database, str | sa.URL):
        try:
            return bool(_url(database).get_dialect().is_async)
        except sa_exc.NoSuchModuleError as exc:
            raise ConfigurationError(f"unknown database in the URL: {exc}") from exc
    if isinstance(database, Engine | Connection):
        return False
    raise ConfigurationError(
        f"jobflow's migrations take a database URL, an Engine or Connection, or an "
        f"AsyncEngine or AsyncConnection, not {type(database).__name__}")


def _run(database: Database, work: Callable[[Connection], _T]) -> _T:
    """``work`` on a connection to ``database``, committed afterwards (unless the
    caller gave its own connection)."""
    if not _is_async(database):
        with _connection(database) as conn:
            return work(conn)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_run_async(database, work, dispose=True))
    raise ConfigurationError(
        "jobflow.migrations was called with an async database from inside a running event "
        "loop, which it would have to block: await jobflow.migrations.upgrade_async() "
        "(or current_async, downgrade_async) there instead")


async def _run_async(database: Database, work: Callable[[Connection], _T], *,
                     dispose: bool = False) -> _T:
    """``work`` run by ``run_sync`` on an async connection to ``database``; a
    synchronous database is worked on in a thread, so the loop goes on.
    ``dispose``: close the engine's idle connections afterwards (the loop they
    belong to is about to close)."""
    if not _is_async(database):
        return await asyncio.to_thread(_run, database, work)
    if isinstance(database, AsyncConnection):
        return await database.run_sync(work)
    if isinstance(database, AsyncEngine):
        engine = database
    else:
        assert isinstance(database, str | sa.URL)
        dispose = True
        try:
            engine = create_async_engine(_url(database))
        except ImportError as exc:
            raise ConfigurationError(
                f"the database driver is not installed ({exc}): install jobflow[postgres] "
                f"for PostgreSQL, jobflow[sqlite-async] for aiosqlite") from exc
    try:
        async with engine.connect() as conn:
            result = await conn.run_sync(work)
            await conn.commit()
            return result
    finally:
        if dispose:
            await engine.dispose()


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
    assert isinstance(database, str | sa.URL)
    engine = sa.create_engine(database)
    try:
        with engine.connect() as conn:
            yield conn
            conn.commit()
    finally:
        engine.dispose()


def _upgrade(revision: str) -> Callable[[Connection], None]:
    return lambda conn: command.upgrade(config(conn), revision)


def _downgrade(revision: str) -> Callable[[Connection], None]:
    return lambda conn: command.downgrade(config(conn), revision)


def _current(conn: Connection) -> str | None:
    context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
    return context.get_current_revision()


def upgrade(database: Database, revision: str = "head") -> None:
    """Apply jobflow's migrations up to ``revision`` (default: the newest)."""
    _run(database, _upgrade(revision))


def downgrade(database: Database, revision: str) -> None:
    """Revert jobflow's migrations down to ``revision`` (``"base"``: drop everything)."""
    _run(database, _downgrade(revision))


def current(database: Database) -> str | None:
    """The revision the database is at, or None when no jobflow migration ran."""
    return _run(database, _current)


async def upgrade_async(database: Database, revision: str = "head") -> None:
    """:func:`upgrade` from inside a running event loop."""
    await _run_async(database, _upgrade(revision))


async def downgrade_async(database: Database, revision: str) -> None:
    """:func:`downgrade` from inside a running event loop."""
    await _run_async(database, _downgrade(revision))


async def current_async(database: Database) -> str | None:
    """:func:`current` from inside a running event loop."""
    return await _run_async(database, _current)


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
    "SCRIPT_LOCATION", "VERSION_TABLE", "config", "current", "current_async", "downgrade",
    "downgrade_async", "head", "is_jobflow_table", "skip_jobflow_tables", "upgrade",
    "upgrade_async",
]
