"""A :class:`~jobflow.ports.JobStore` in PostgreSQL or SQLite, through SQLAlchemy 2 Core.

Every write is one compare-and-set on the job row plus its history row, in
one transaction, and every statement goes through SQLAlchemy's
``Connection.execute``, so an engine's statement log (``echo``) and its
event listeners (``before_cursor_execute``, ``handle_error``, tracing
instrumentation) see each one, with its parameters:

* On PostgreSQL every call is a single statement, run as its own transaction
  (``AUTOCOMMIT``, one round trip): a data-modifying CTE updates the job and
  inserts its history row, numbered from the job row it locked. ``claim``
  takes a batch of due jobs with ``FOR UPDATE SKIP LOCKED`` from the partial
  index of queued jobs, so concurrent claimers on many hosts never wait for,
  nor share, a job. ``commit_many`` sends a whole batch of changes as text
  values (one per field the batch shares, one array literal per field that
  varies) and applies them in one statement, still a compare-and-set and a
  history row per job. A write that makes a job ``queued`` also sends
  ``NOTIFY`` on :data:`NOTIFY_CHANNEL` (payload: the job id), delivered at
  commit. A statement PostgreSQL rolled back to break a deadlock runs again.
* On SQLite each write runs inside ``BEGIN IMMEDIATE`` (one writer at a time;
  others wait up to the busy timeout). File databases are switched to WAL so
  that readers never block the writer.
* A store from :meth:`SqlAlchemyJobStore.bind` runs the same statements in
  the host's transaction, and never commits.

The package, by what each module holds:

* :mod:`~jobflow.adapters.sqlalchemy.schema`: the tables, their types and
  constraints (the database enforces the invariants that need no object
  store); :mod:`jobflow.migrations` creates the same thing.
* :mod:`~jobflow.adapters.sqlalchemy.queries`: every statement the store
  sends, named, with its SQL.
* :mod:`~jobflow.adapters.sqlalchemy.rows`: rows to jobs and history
  records, changes to statement parameters.
* :mod:`~jobflow.adapters.sqlalchemy.transactions`: where statements run.
* :mod:`~jobflow.adapters.sqlalchemy.errors`: driver errors translated: a
  lost, refused or locked connection raises
  :class:`~jobflow.errors.StorageUnavailable`, a missing table
  :class:`~jobflow.errors.ConfigurationError`, a row the database's
  constraints refuse :class:`~jobflow.errors.InvalidInput`, any other driver
  or SQLAlchemy error :class:`~jobflow.errors.PermanentStorageError` (never
  worth retrying).
* :mod:`~jobflow.adapters.sqlalchemy.store`: :class:`SqlAlchemyJobStore`.
* :mod:`~jobflow.adapters.sqlalchemy.aio`: :class:`AsyncSqlAlchemyJobStore`,
  the same store on an ``AsyncEngine`` (psycopg 3's async driver, aiosqlite)
  for :class:`~jobflow.AsyncJobFlow`.
* :mod:`~jobflow.adapters.sqlalchemy.clock`: the database's time, the clock
  of lease decisions on PostgreSQL (the store's ``clock``).
* :mod:`~jobflow.adapters.sqlalchemy.engine`: :func:`create_engine` and
  :class:`DatabaseTimeouts`: PostgreSQL connections that never wait forever.
"""

from __future__ import annotations

from jobflow.adapters.sqlalchemy.aio import AsyncSqlAlchemyJobStore
from jobflow.adapters.sqlalchemy.engine import DatabaseTimeouts, create_engine, with_timeouts
from jobflow.adapters.sqlalchemy.queries import NOTIFY_CHANNEL
from jobflow.adapters.sqlalchemy.store import SUPPORTED_DIALECTS, SqlAlchemyJobStore
from jobflow.adapters.sqlalchemy.transactions import sqlite_file

__all__ = ["NOTIFY_CHANNEL", "SUPPORTED_DIALECTS", "AsyncSqlAlchemyJobStore", "DatabaseTimeouts",
           "SqlAlchemyJobStore", "create_engine", "sqlite_file", "with_timeouts"]
