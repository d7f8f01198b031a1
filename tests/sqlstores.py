"""Fresh SQL job stores for the test suite, cheap enough to make once per
Hypothesis example: the schema is migrated once, then each new store gets a
copy of a migrated SQLite file, or an emptied PostgreSQL database."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import sqlalchemy as sa

import jobflow.migrations
from jobflow.adapters.sqlalchemy import SqlAlchemyJobStore
from jobflow.adapters.sqlalchemy_schema import events, jobs


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
