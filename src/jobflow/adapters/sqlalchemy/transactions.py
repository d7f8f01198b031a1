"""Where the store's statements run: on its own pooled connections, or in the
host's transaction.

* The store's own connections (:class:`EngineTransactions`): on PostgreSQL
  every call is a single statement, run with the ``AUTOCOMMIT`` isolation
  level: the statement is its own transaction and costs one round trip, with
  no ``BEGIN`` or ``COMMIT`` around it. On SQLite each write runs inside
  ``BEGIN IMMEDIATE`` (one writer at a time; others wait up to the busy
  timeout), and file databases are switched to WAL so that readers never
  block the writer.
* A store bound to the host's Connection or Session
  (:class:`HostTransactions`) runs in the host's transaction and never
  commits nor rolls back.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Protocol

from sqlalchemy.engine import Connection, Engine

from jobflow.greenlets import await_


class Transactions(Protocol):
    """Hands out a connection for one read or one atomic write."""

    #: Whether every PostgreSQL statement is a transaction of its own, so that
    #: one PostgreSQL rolled back (to break a deadlock) can simply run again.
    own_statements: bool

    def read(self) -> AbstractContextManager[Connection]: ...

    def write(self) -> AbstractContextManager[Connection]: ...


def sqlite_file(engine: Engine) -> Path | None:
    """The file of a SQLite engine's database; None for an in-memory database
    or another dialect."""
    database = engine.url.database or ""
    if engine.dialect.name != "sqlite" or database in ("", ":memory:") or (
            "mode=memory" in str(engine.url)):
        return None
    return Path(database)


class SQLiteSetup:
    """Per-connection SQLite settings, applied once to each pooled connection:
    ``PRAGMA busy_timeout``, ``PRAGMA foreign_keys = ON``, and for a file
    ``PRAGMA journal_mode = WAL``.

    The busy timeout is set first, so that switching to WAL waits too. It
    replaces the driver's own (pysqlite's ``timeout`` connect argument, 5 s
    unless the engine says otherwise): ``BEGIN IMMEDIATE`` waits up to it for
    another writer, and only a lock still held after it fails the call, as
    :class:`~jobflow.errors.StorageUnavailable`."""

    _DONE = "jobflow_sqlite_ready"

    def __init__(self, engine: Engine, busy_timeout_seconds: float) -> None:
        self.file_backed = sqlite_file(engine) is not None
        self.busy_timeout_ms = int(busy_timeout_seconds * 1000)

    def prepare(self, conn: Connection) -> None:
        info = conn.connection.info
        if info.get(self._DONE):
            return
        conn.exec_driver_sql(f"PRAGMA busy_timeout = {self.busy_timeout_ms}")
        conn.exec_driver_sql("PRAGMA foreign_keys = ON")
        if self.file_backed:
            conn.exec_driver_sql("PRAGMA journal_mode = WAL")
        conn.commit()
        info[self._DONE] = True


class EngineTransactions:
    """Each call on its own pooled connection of ``engine``, committed by jobflow:
    on PostgreSQL (``sqlite`` None) one statement in ``AUTOCOMMIT``, on SQLite
    a ``BEGIN IMMEDIATE`` transaction per write."""

    def __init__(self, engine: Engine, sqlite: SQLiteSetup | None) -> None:
        self._engine = engine
        self._sqlite = sqlite
        self.own_statements = sqlite is None
        # SQLite has one writer at a time: threads of this process queue here
        # rather than in SQLite's busy handler, which sleeps and polls. On an
        # asyncio driver the callers are tasks of one event loop instead.
        self._write_lock: AbstractContextManager[object] = (
            LoopLock() if engine.dialect.is_async else threading.Lock())

    @contextmanager
    def read(self) -> Iterator[Connection]:
        with self._connect() as conn:
            yield conn

    @contextmanager
    def write(self) -> Iterator[Connection]:
        if self._sqlite is None:
            with self._connect() as conn:
                yield conn
            return
        with self._write_lock, self._connect() as conn:
            # Take the write lock first: a deferred transaction that read before
            # writing could not be upgraded once another writer committed.
            conn.exec_driver_sql("BEGIN IMMEDIATE")
            yield conn
            conn.commit()

    @contextmanager
    def _connect(self) -> Iterator[Connection]:
        with self._engine.connect() as conn:
            if self._sqlite is None:
                # Set on the connection, not on a copy of the engine made once:
                # logging switched on for the engine later still sees it.
                conn.execution_options(isolation_level="AUTOCOMMIT")
            else:
                self._sqlite.prepare(conn)
            yield conn


class LoopLock:
    """A lock for the calls of a store on an asyncio driver (aiosqlite).

    Those calls run in greenlets on the event loop's thread (see
    :mod:`jobflow.aio`), and a call holding the write lock lets the loop run
    other tasks while it waits for the database: a ``threading.Lock`` would
    then block the loop's thread for good when a second task asked for it.
    This one waits on an :class:`asyncio.Lock` of the running loop instead.
    """

    def __init__(self) -> None:
        self._locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary())

    def _lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        lock = self._locks.get(loop)
        if lock is None:
            lock = self._locks[loop] = asyncio.Lock()
        return lock

    def __enter__(self) -> asyncio.Lock:
        lock = self._lock()
        await_(lock.acquire())
        return lock

    def __exit__(self, *exc_info: object) -> None:
        self._lock().release()


def _sqlite_in_transaction(conn: Connection) -> bool:
    """Whether SQLite has a transaction open on ``conn`` (pysqlite's connection
    says so itself; aiosqlite's answers through the connection it wraps)."""
    fairy = conn.connection
    for candidate in (fairy.dbapi_connection, fairy.driver_connection):
        found = getattr(candidate, "in_transaction", None)
        if isinstance(found, bool):
            return found
    return False


class HostTransactions:
    """Every call on the host's connection, inside the host's transaction; never commits."""

    own_statements = False

    def __init__(self, connection: Callable[[], Connection], sqlite: bool) -> None:
        self._connection = connection
        self._sqlite = sqlite

    @contextmanager
    def read(self) -> Iterator[Connection]:
        yield self._connection()

    @contextmanager
    def write(self) -> Iterator[Connection]:
        conn = self._connection()
        if not self._sqlite:
            yield conn  # every write is one statement: atomic by itself
            return
        if not _sqlite_in_transaction(conn):
            # pysqlite opens the real transaction lazily; a SAVEPOINT opened
            # outside one would commit on release, behind the host's back.
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        with conn.begin_nested():
            yield conn


__all__ = ["EngineTransactions", "HostTransactions", "LoopLock", "SQLiteSetup", "Transactions",
           "sqlite_file"]
