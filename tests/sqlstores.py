"""Fresh SQL job stores for the test suite, cheap enough to make once per
Hypothesis example: the schema is migrated once, then each new store gets a
copy of a migrated SQLite file, or an emptied PostgreSQL database."""

from __future__ import annotations

import collections
import itertools
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import sqlalchemy as sa

import jobflow.migrations
from jobflow.adapters.sqlalchemy import SqlAlchemyJobStore
from jobflow.adapters.sqlalchemy.schema import events, jobs


def migrated_sqlite_file(path: Path) -> Path:
    """A SQLite file at ``path`` with jobflow's schema, in WAL mode, fully checkpointed."""
    engine = sa.create_engine(f"sqlite:///{path}")
    try:
        jobflow.migrations.upgrade(engine)
        with engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA journal_mode = WAL")
    finally:
        engine.dispose()  # the last connection to close checkpoints and removes the WAL
    return path


class SQLiteStores:
    """Each call: a new file copied from a migrated template, and a store on it."""

    def __init__(self, template: Path, folder: Path) -> None:
        self._template = template
        self._folder = folder
        self._numbers = itertools.count(1)
        self._engines: list[sa.Engine] = []

    def __call__(self) -> SqlAlchemyJobStore:
        # Stores from earlier calls stay usable; only their idle connections close.
        self.dispose()
        path = self._folder / f"jobs-{next(self._numbers)}.sqlite3"
        shutil.copyfile(self._template, path)
        engine = sa.create_engine(f"sqlite:///{path}")
        self._engines.append(engine)
        return SqlAlchemyJobStore(engine)

    def dispose(self) -> None:
        for engine in self._engines:
            engine.dispose()


def empty_tables(engine: sa.Engine) -> None:
    """Delete every job and event (cheaper than TRUNCATE for small tables)."""
    with engine.begin() as conn:
        conn.execute(sa.delete(events))
        conn.execute(sa.delete(jobs))


class PostgresStores:
    """Each call: the run's migrated database emptied, and a store on it.

    Stores from earlier calls share that database, so a test that needs two
    independent PostgreSQL stores at once must make its own databases.
    """

    def __init__(self, engine: sa.Engine) -> None:
        self._engine = engine

    def __call__(self) -> SqlAlchemyJobStore:
        empty_tables(self._engine)
        return SqlAlchemyJobStore(self._engine)


class StatementLog:
    """What the statement listeners of an engine saw: every statement sent
    (with its parameters), every one that came back, every error."""

    def __init__(self) -> None:
        self.sent: collections.deque[tuple[str, Any]] = collections.deque(maxlen=100)
        self.started = self.finished = self.failed = 0

    def before(self, conn: sa.Connection, cursor: Any, statement: str, parameters: Any,
               context: Any, executemany: bool) -> None:
        self.sent.append((statement, parameters))
        self.started += 1

    def after(self, conn: sa.Connection, cursor: Any, statement: str, parameters: Any,
              context: Any, executemany: bool) -> None:
        self.finished += 1

    def error(self, context: sa.engine.ExceptionContext) -> None:
        self.failed += 1

    @property
    def unaccounted(self) -> int:
        """Statements that neither came back nor failed (none, between calls)."""
        return self.started - self.finished - self.failed


class ListenedEngine(NamedTuple):
    engine: sa.Engine
    log: StatementLog


def listened_engine(url: sa.URL, **options: Any) -> ListenedEngine:
    """An engine on ``url`` with statement listeners attached, as tracing
    instrumentation attaches them, and what they saw."""
    engine = sa.create_engine(url, **options)
    log = StatementLog()
    sa.event.listen(engine, "before_cursor_execute", log.before)
    sa.event.listen(engine, "after_cursor_execute", log.after)
    sa.event.listen(engine, "handle_error", log.error)
    return ListenedEngine(engine, log)
