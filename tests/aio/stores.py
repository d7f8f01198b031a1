"""Fresh job stores for AsyncJobFlow, one kind per backend: the in-memory store,
SQLite through aiosqlite, PostgreSQL through psycopg 3's async driver.

The SQL stores are :class:`AsyncSqlAlchemyJobStore` on an ``AsyncEngine``;
their engines belong to the event loop that used them, so the test that made
them disposes of them in that loop (:meth:`AsyncStores.dispose`).
"""

from __future__ import annotations

import itertools
import shutil
import uuid
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from jobflow.adapters.memory import InMemoryJobStore
from jobflow.adapters.sqlalchemy import AsyncSqlAlchemyJobStore
from jobflow.ports import JobStore
from tests.sqlstores import empty_tables

AsyncStore = JobStore | AsyncSqlAlchemyJobStore


def async_url(url: sa.URL) -> sa.URL:
    """The same database through the asyncio driver of its dialect."""
    if url.get_backend_name() == "sqlite":
        return url.set(drivername="sqlite+aiosqlite")
    return url.set(drivername="postgresql+psycopg_async")


class AsyncStores:
    """Each call: an empty store of one kind ("memory", "sqlite", "postgres").

    SQLite stores are copies of a migrated template file in ``folder``;
    PostgreSQL stores share the run's migrated database, emptied first.
    """

    def __init__(self, kind: str, *, sqlite_template: Path | None = None,
                 folder: Path | None = None, pg_engine: sa.Engine | None = None) -> None:
        self.kind = kind
        self._template = sqlite_template
        self._folder = folder
        self._pg_engine = pg_engine
        self._numbers = itertools.count(1)
        self._prefix = uuid.uuid4().hex[:8]
        self.engines: list[AsyncEngine] = []

    def engine(self) -> AsyncEngine:
        """A new async engine on a new (SQLite) or emptied (PostgreSQL) database."""
        if self.kind == "sqlite":
            assert self._template is not None and self._folder is not None
            # A name of its own: a file left by an earlier factory is never reused.
            path = self._folder / f"async-jobs-{self._prefix}-{next(self._numbers)}.sqlite3"
            shutil.copyfile(self._template, path)
            url = sa.make_url(f"sqlite+aiosqlite:///{path}")
        else:
            assert self.kind == "postgres" and self._pg_engine is not None
            empty_tables(self._pg_engine)
            url = async_url(self._pg_engine.url)
        engine = create_async_engine(url)
        self.engines.append(engine)
        return engine

    def __call__(self) -> AsyncStore:
        if self.kind == "memory":
            return InMemoryJobStore()
        return AsyncSqlAlchemyJobStore(self.engine())

    async def dispose(self) -> None:
        """Close every engine made so far (from the loop that used them)."""
        engines, self.engines = self.engines, []
        for engine in engines:
            await engine.dispose()
