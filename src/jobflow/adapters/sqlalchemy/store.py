"""The :class:`~jobflow.ports.JobStore` on PostgreSQL or SQLite: each call sends
the statements of :mod:`jobflow.adapters.sqlalchemy.queries` through
SQLAlchemy's ``Connection.execute``, in the transactions of
:mod:`jobflow.adapters.sqlalchemy.transactions`."""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

from jobflow.adapters.sqlalchemy import queries
from jobflow.adapters.sqlalchemy.clock import DatabaseClock, local_clock
from jobflow.adapters.sqlalchemy.errors import driver_errors, is_deadlock
from jobflow.adapters.sqlalchemy.rows import (
    batch_params,
    claim_params,
    claims_from_rows,
    commit_params,
    create_params,
    event_from_row,
    job_from_row,
)
from jobflow.adapters.sqlalchemy.transactions import (
    EngineTransactions,
    HostTransactions,
    SQLiteSetup,
    Transactions,
)
from jobflow.errors import ConfigurationError, InvalidInput, JobNotFound
from jobflow.models import (
    Change,
    Claim,
    Job,
    JobEvent,
    JobStatus,
    Purged,
    check_batch,
    check_finished_status,
)
from jobflow.ports import Clock

SUPPORTED_DIALECTS = frozenset({"postgresql", "sqlite"})

#: How many times the store runs a PostgreSQL statement that PostgreSQL rolled
#: back to break a deadlock (each statement is its own transaction).
DEADLOCK_TRIES = 3

_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

Rows = Sequence[sa.RowMapping]


def _canonical_job_id(job_id: str) -> str | None:
    """``job_id`` if it is a job id in canonical form (a lowercase UUID), else None."""
    if isinstance(job_id, str) and _CANONICAL_UUID.fullmatch(job_id):
        return job_id
    return None


def _check_same_job(change: Change) -> None:
    """A change must write the job it was decided on."""
    if change.before is not None and change.before.id != change.after.id:
        raise InvalidInput(f"a change cannot turn job {change.before.id} "
                           f"into job {change.after.id}")


_USE_THE_ASYNC_STORE = (
    "SqlAlchemyJobStore runs on a synchronous Engine and was given {given}: with "
    "create_async_engine and AsyncSession use "
    "jobflow.adapters.sqlalchemy.AsyncSqlAlchemyJobStore and jobflow.AsyncJobFlow")


def _dialect_name(name: str) -> str:
    if name not in SUPPORTED_DIALECTS:
        raise ConfigurationError(
            f"SqlAlchemyJobStore supports PostgreSQL and SQLite, not {name!r}")
    return name


class SqlAlchemyJobStore:
    """Jobs and their history in PostgreSQL (psycopg 3) or SQLite.

    ``engine`` is a SQLAlchemy 2 :class:`~sqlalchemy.engine.Engine`; its
    database must have been migrated with :func:`jobflow.migrations.upgrade`.
    Nothing connects until the first call. Each call runs in its own
    transaction, committed before it returns; use :meth:`bind` to run calls
    inside a transaction of your own instead.

    For SQLite use a file database (``sqlite:///path/jobs.sqlite3``): it is
    switched to WAL, each connection waits up to ``busy_timeout_seconds`` for
    the write lock, and the store is safe to share between threads and
    processes. An in-memory SQLite database is private to one connection.

    :attr:`clock` is the time every lease decision should use, and the one a
    :class:`~jobflow.JobFlow` given no clock uses: on PostgreSQL the
    database server's (:class:`~jobflow.adapters.sqlalchemy.clock.DatabaseClock`),
    so that hosts whose clocks disagree still agree on when a lease ends; on
    SQLite, one file on one host, that host's clock.
    """

    def __init__(self, engine: Engine, *, busy_timeout_seconds: float = 30.0) -> None:
        if isinstance(engine, AsyncEngine):
            raise ConfigurationError(_USE_THE_ASYNC_STORE.format(given="an AsyncEngine"))
        self._dialect = _dialect_name(engine.dialect.name)
        self._engine = engine
        #: The clock of lease decisions; stores made by :meth:`bind` share it.
        self.clock: Clock = DatabaseClock(engine) if self._dialect == "postgresql" else local_clock
        sqlite = (SQLiteSetup(engine, busy_timeout_seconds)
                  if self._dialect == "sqlite" else None)
        self._transactions: Transactions = EngineTransactions(engine, sqlite)

    @property
    def engine(self) -> Engine:
        """The engine this store was made with."""
        return self._engine

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._engine.url.render_as_string(hide_password=True)!r})"

    def bind(self, connection: Connection | Session) -> SqlAlchemyJobStore:
        """A store that runs on ``connection`` (a Connection or ORM Session) and never
        commits nor rolls back: the host's transaction decides.

        A job created through it commits or rolls back together with the host's
        own rows, history included. On PostgreSQL its NOTIFY is delivered when
        the host commits. Claims made through it are held only once the host
        commits, so workers should use the unbound store. It shares this
        store's :attr:`clock`.
        """
        if isinstance(connection, Session):
            session = connection
            dialect = session.get_bind().dialect.name

            def current() -> Connection:
                return session.connection()
        elif isinstance(connection, Connection):
            host = connection
            dialect = host.dialect.name

            def current() -> Connection:
                return host
        elif isinstance(connection, AsyncSession | AsyncConnection):
            raise ConfigurationError(_USE_THE_ASYNC_STORE.format(
                given=f"an {type(connection).__name__}"))
        else:
            raise ConfigurationError(
                f"bind() takes a SQLAlchemy Connection or Session, not {type(connection).__name__}")
        bound = copy.copy(self)
        bound._dialect = _dialect_name(dialect)
        bound._transactions = HostTransactions(current, sqlite=bound._dialect == "sqlite")
        return bound

    @property
    def _postgres(self) -> bool:
        return self._dialect == "postgresql"

    def _rows(self, statement: sa.Executable, params: dict[str, Any], *,
              write: bool = True) -> Rows:
        """Run one statement, a write (default) or a read, as its own transaction
        (or in the host's); its rows.

        Concurrent writes can deadlock in PostgreSQL (two transactions each
        waiting for a row the other locked: a job row, or the history row
        numbered after it); PostgreSQL then rolls one back. When that was one
        of the store's own statements, its own transaction, it wrote nothing
        and runs again, up to :data:`DEADLOCK_TRIES` times in all. In the
        host's transaction the error is the host's to handle."""
        transaction = self._transactions.write if write else self._transactions.read
        tries = 1
        while True:
            try:
                with transaction() as conn:
                    return conn.execute(statement, params).mappings().all()
            except sa_exc.DBAPIError as exc:
                if not (self._transactions.own_statements and is_deadlock(exc)
                        and tries < DEADLOCK_TRIES):
                    raise
                tries += 1

    # -- writes ------------------------------------------------------------------------

    def create(self, change: Change) -> Job:
        job = change.after
        if _canonical_job_id(job.id) is None:
            raise InvalidInput(f"job id {job.id!r} is not a canonical UUID")
        params = create_params(change)
        with driver_errors("create", job.id):
            if self._postgres:
                self._rows(queries.POSTGRES_CREATE, params)
            else:
                with self._transactions.write() as conn:
                    conn.execute(queries.INSERT_JOB, params)
                    conn.execute(queries.INSERT_EVENT,
                                 {**params, "event_job_id": job.id, "event_seq": 1})
        return job

    def commit(self, change: Change) -> Job | None:
        before, after = change.before, change.after
        if before is None:
            raise InvalidInput("commit needs the snapshot the change was decided on")
        _check_same_job(change)
        if _canonical_job_id(before.id) is None:
            return None
        with driver_errors(change.event.value, before.id):
            if self._postgres:
                statement = queries.postgres_commit(
                    leased=before.lease_token is not None,
                    notify=after.status is JobStatus.QUEUED)
                written = bool(self._rows(statement, commit_params(change)))
            else:
                with self._transactions.write() as conn:
                    written = self._sqlite_compare_and_set(conn, change)
        return after if written else None

    def commit_many(self, changes: Sequence[Change]) -> list[Job | None]:
        if len(changes) == 1:  # the single-change statement is the cheaper one
            return [self.commit(changes[0])]
        check_batch(changes)
        for change in changes:
            _check_same_job(change)
        # A job id that is not a canonical UUID names no job: that change loses.
        known = [change for change in changes if _canonical_job_id(change.after.id) is not None]
        written: set[str] = set()
        if known:
            with driver_errors("commit a batch of changes"):
                if self._postgres:
                    shape, params = batch_params(known)
                    rows = self._rows(queries.postgres_commit_many(shape), params)
                    written = {row["job_id"] for row in rows}
                else:
                    with self._transactions.write() as conn:
                        written = {change.after.id for change in known
                                   if self._sqlite_compare_and_set(conn, change)}
        return [change.after if change.after.id in written else None for change in changes]

    @staticmethod
    def _sqlite_compare_and_set(conn: Connection, change: Change) -> bool:
        """SQLite, inside the caller's write transaction: one change and its history row."""
        before = change.before
        assert before is not None
        params = commit_params(change)
        statement = queries.compare_and_set(leased=before.lease_token is not None)
        written = conn.execute(statement, params).mappings().first()
        if written is None:
            return False
        conn.execute(queries.INSERT_EVENT, {**params, "event_job_id": before.id,
                                            "event_seq": written["history_length"]})
        return True

    def claim(self, *, worker_id: str, limit: int, now: datetime,
              lease_seconds: float) -> list[Claim]:
        if limit < 1:
            return []
        params = claim_params(worker_id=worker_id, limit=limit, now=now,
                              lease_seconds=lease_seconds)
        with driver_errors("claim"):
            if self._postgres:
                rows = self._rows(queries.postgres_claim(limit), params)
            else:
                with self._transactions.write() as conn:
                    rows = list(conn.execute(queries.SQLITE_CLAIM, params).mappings())
                    if rows:
                        conn.execute(queries.INSERT_EVENT, [
                            {**params, "event_job_id": row["id"],
                             "event_seq": row["history_length"], "event_attempt": row["attempts"]}
                            for row in rows])
        return claims_from_rows(rows)

    # -- reads -------------------------------------------------------------------------

    def get(self, job_id: str) -> Job:
        if _canonical_job_id(job_id) is None:
            raise JobNotFound(job_id)
        with driver_errors("read", job_id):
            rows = self._rows(queries.GET, {"job_id": job_id}, write=False)
        if not rows:
            raise JobNotFound(job_id)
        return job_from_row(rows[0])

    def history(self, job_id: str) -> list[JobEvent]:
        if _canonical_job_id(job_id) is None:
            raise JobNotFound(job_id)
        with driver_errors("read the history of", job_id):
            rows = self._rows(queries.HISTORY, {"job_id": job_id}, write=False)
            if not rows and not self._rows(queries.EXISTS, {"job_id": job_id}, write=False):
                raise JobNotFound(job_id)
        return [event_from_row(row) for row in rows]

    def awaiting_uploads(self, *, limit: int) -> list[Job]:
        return self._jobs(queries.AWAITING_UPLOADS, {"limit": limit})

    def expired_leases(self, *, now: datetime, limit: int) -> list[Job]:
        return self._jobs(queries.EXPIRED_LEASES, {"now": now, "limit": limit})

    def failed_since(self, *, since: datetime, limit: int) -> list[Job]:
        return self._jobs(queries.FAILED_SINCE, {"since": since, "limit": limit})

    def _jobs(self, query: sa.Select[Any], params: dict[str, Any]) -> list[Job]:
        if params["limit"] < 1:
            return []
        with driver_errors("list jobs"):
            rows = self._rows(query, params, write=False)
        return [job_from_row(row) for row in rows]

    # -- retention and bulk recovery -----------------------------------------------------

    def purge_finished(self, *, status: JobStatus, finished_before: datetime,
                       limit: int) -> Purged:
        check_finished_status(status)
        if limit < 1:
            return Purged()
        params = {"finished_before": finished_before, "limit": limit}
        with driver_errors("purge finished jobs"):
            if self._postgres:
                rows = self._rows(queries.postgres_purge(status), params)
            else:
                with self._transactions.write() as conn:
                    conn.execute(queries.sqlite_purge_history(status), params)
                    rows = conn.execute(queries.sqlite_purge(status), params).mappings().all()
        return Purged(jobs=tuple(job_from_row(row) for row in rows),
                      events=sum(row["history_length"] for row in rows))

    def count_finished(self, *, status: JobStatus, finished_before: datetime) -> tuple[int, int]:
        check_finished_status(status)
        with driver_errors("count finished jobs"):
            [row] = self._rows(queries.count_finished(status),
                               {"finished_before": finished_before}, write=False)
        return int(row["jobs"]), int(row["events"])

    def failed_after(self, *, error_code: str, after: tuple[datetime, str],
                     limit: int) -> list[Job]:
        after_finished_at, after_id = after
        return self._jobs(queries.FAILED_AFTER, {
            "error_code": error_code, "after_finished_at": after_finished_at,
            "after_id": after_id, "limit": limit})

    def counts(self) -> dict[JobStatus, int]:
        counts = dict.fromkeys(JobStatus, 0)
        with driver_errors("count jobs"):
            rows = self._rows(queries.COUNTS, {}, write=False)
        counts.update((row["status"], row["jobs"]) for row in rows)
        return counts


__all__ = ["DEADLOCK_TRIES", "SUPPORTED_DIALECTS", "SqlAlchemyJobStore"]
