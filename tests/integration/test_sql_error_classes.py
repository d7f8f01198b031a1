"""Each driver error says whether retrying can help (design invariant 9): the
outside world failing (a lost connection, a timeout, a deadlock, a lock still
held) is StorageUnavailable; a setup or programming error never is.

Real errors are provoked where a database can be made to raise them; the
shapes that are hard to provoke are translated from constructed driver errors
carrying the SQLSTATE or SQLite result code the driver would give."""

from __future__ import annotations

import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import psycopg.errors
import pytest
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

import jobflow.migrations
from jobflow import JobFlow, JobStatus
from jobflow.adapters.memory import InMemoryObjectStore
from jobflow.adapters.sqlalchemy import SqlAlchemyJobStore
from jobflow.adapters.sqlalchemy.errors import driver_errors, is_deadlock, translate
from jobflow.errors import (
    ConfigurationError,
    InvalidInput,
    JobflowError,
    PermanentStorageError,
    StorageUnavailable,
)
from tests.integration.conftest import SQL_KINDS, flow_on

SOME_JOB = "00000000-0000-4000-8000-000000000000"
#: The application name of the connections a test kills or locks out.
DOOMED = "jobflow-test-error-classes"


def test_the_non_retryable_error_is_not_a_storage_unavailable() -> None:
    assert issubclass(PermanentStorageError, JobflowError)
    assert not issubclass(PermanentStorageError, StorageUnavailable)
    assert not issubclass(StorageUnavailable, PermanentStorageError)
    assert not issubclass(ConfigurationError, StorageUnavailable)


# -- constructed driver errors ---------------------------------------------------------


def postgres_error(sqlstate: str | None, message: str = "boom",
                   invalidated: bool = False) -> sa_exc.DBAPIError:
    """The SQLAlchemy error wrapping the psycopg error a server gives for ``sqlstate``
    (None: a client-side failure, which psycopg raises without a SQLSTATE)."""
    orig = (psycopg.OperationalError(message) if sqlstate is None
            else psycopg.errors.lookup(sqlstate)(message))
    wrapped = sa_exc.DBAPIError.instance("SELECT 1", {}, orig, psycopg.Error,
                                         connection_invalidated=invalidated)
    assert isinstance(wrapped, sa_exc.DBAPIError)
    return wrapped


def sqlite_error(errorname: str | None, message: str,
                 kind: type[sqlite3.Error] = sqlite3.OperationalError) -> sa_exc.DBAPIError:
    """The SQLAlchemy error wrapping a pysqlite error with SQLite's result code name."""
    orig = kind(message)
    if errorname is not None:
        orig.sqlite_errorname = errorname
    wrapped = sa_exc.DBAPIError.instance("SELECT 1", {}, orig, sqlite3.Error)
    assert isinstance(wrapped, sa_exc.DBAPIError)
    return wrapped


class Psycopg2Error(Exception):
    """A driver error of another PostgreSQL driver: the SQLSTATE is ``pgcode``."""

    def __init__(self, message: str, pgcode: str) -> None:
        super().__init__(message)
        self.pgcode = pgcode


RETRYABLE_SQLSTATES = {
    "08000": "connection exception",
    "08003": "connection does not exist",
    "08006": "connection failure",
    "08001": "unable to establish connection",
    "57P01": "terminating connection due to administrator command",
    "57P02": "terminating connection due to crash of another server process",
    "57P03": "the database system is starting up",
    "40001": "could not serialize access due to concurrent update",
    "40P01": "deadlock detected",
    "55P03": "could not obtain lock on row in relation \"jobflow_jobs\"",
    "57014": "canceling statement due to statement timeout",
    "53000": "insufficient resources",
    "53100": "could not extend file: No space left on device",
    "53200": "out of memory",
    "53300": "sorry, too many clients already",
    "58030": "could not read block 0: I/O error",
}

PERMANENT_SQLSTATES = {
    "25P02": "current transaction is aborted, commands ignored until end of "
             "transaction block",
    "25001": "SET TRANSACTION ISOLATION LEVEL must be called before any query",
    "42601": "syntax error at or near \"SELEC\"",
    "42804": "column \"attempts\" is of type integer but expression is of type text",
    "0A000": "LISTEN is not supported in this context",
    "XX000": "could not find block containing chunk",
    "XX001": "invalid page in block 3 of relation base/16384/16385",
    "2F005": "control reached end of function without RETURN",
}

SETUP_SQLSTATES = {
    "42P01": "relation \"jobflow_jobs\" does not exist",
    "42703": "column \"attempts\" does not exist",
    "3F000": "schema \"jobflow\" does not exist",
    "42501": "permission denied for table jobflow_jobs",
    "3D000": "database \"jobs\" does not exist",
    "28P01": "password authentication failed for user \"jobflow\"",
}


@pytest.mark.parametrize("sqlstate", sorted(RETRYABLE_SQLSTATES))
def test_outages_timeouts_and_conflicts_may_be_retried(sqlstate: str) -> None:
    error = translate(postgres_error(sqlstate, RETRYABLE_SQLSTATES[sqlstate]), "claim", None)
    assert type(error) is StorageUnavailable
    assert RETRYABLE_SQLSTATES[sqlstate] in str(error)


@pytest.mark.parametrize("sqlstate", sorted(PERMANENT_SQLSTATES))
def test_programming_errors_are_not_retryable(sqlstate: str) -> None:
    error = translate(postgres_error(sqlstate, PERMANENT_SQLSTATES[sqlstate]), "read", SOME_JOB)
    assert type(error) is PermanentStorageError
    assert PERMANENT_SQLSTATES[sqlstate] in str(error), "the message names the cause"
    assert SOME_JOB in str(error)


@pytest.mark.parametrize("sqlstate", sorted(SETUP_SQLSTATES))
def test_setup_errors_are_configuration_errors(sqlstate: str) -> None:
    error = translate(postgres_error(sqlstate, SETUP_SQLSTATES[sqlstate]), "read", SOME_JOB)
    assert type(error) is ConfigurationError
    assert SETUP_SQLSTATES[sqlstate] in str(error)


def test_an_aborted_host_transaction_says_to_roll_back() -> None:
    error = translate(postgres_error("25P02", PERMANENT_SQLSTATES["25P02"]), "create", SOME_JOB)
    assert isinstance(error, PermanentStorageError)
    assert "roll it back" in str(error)


@pytest.mark.parametrize(("sqlstate", "expected"), [
    ("23505", InvalidInput), ("23514", InvalidInput), ("23503", InvalidInput),
    ("22003", InvalidInput), ("22P02", InvalidInput),
])
def test_refused_rows_and_values_are_invalid_input(
        sqlstate: str, expected: type[JobflowError]) -> None:
    assert type(translate(postgres_error(sqlstate), "create", SOME_JOB)) is expected


def test_a_duplicate_job_is_invalid_input_naming_it() -> None:
    error = translate(postgres_error("23505", "duplicate key value violates unique "
                                              "constraint \"jobflow_jobs_pkey\""),
                      "create", SOME_JOB)
    assert isinstance(error, InvalidInput)
    assert str(error) == f"job {SOME_JOB} already exists"


@pytest.mark.parametrize("message", [
    "connection failed: connection to server at \"127.0.0.1\", port 1 failed: "
    "Connection refused",
    "consuming input failed: server closed the connection unexpectedly",
    "connection timeout expired",
    "the connection is closed",
])
def test_client_side_connection_failures_may_be_retried(message: str) -> None:
    error = translate(postgres_error(None, message), "read", SOME_JOB)
    assert type(error) is StorageUnavailable
    assert message in str(error)


@pytest.mark.parametrize("message", [
    "connection failed: FATAL:  password authentication failed for user \"jobflow\"",
    "connection failed: FATAL:  role \"nobody\" does not exist",
    "connection failed: FATAL:  database \"nowhere\" does not exist",
])
def test_connection_failures_that_are_setup_errors_are_not_retryable(message: str) -> None:
    assert type(translate(postgres_error(None, message), "read", SOME_JOB)) is ConfigurationError


def test_any_error_on_a_connection_sqlalchemy_saw_drop_may_be_retried() -> None:
    error = translate(postgres_error("XX000", "unexpected EOF", invalidated=True), "claim", None)
    assert type(error) is StorageUnavailable
    assert "lost the database connection" in str(error)


@pytest.mark.parametrize(("pgcode", "expected"), [
    ("40P01", StorageUnavailable), ("57014", StorageUnavailable), ("08006", StorageUnavailable),
    ("42P01", ConfigurationError), ("0A000", PermanentStorageError),
    ("42601", PermanentStorageError),
])
def test_another_postgres_driver_is_classified_by_its_pgcode(
        pgcode: str, expected: type[JobflowError]) -> None:
    base = {"4": sa_exc.ProgrammingError, "0": sa_exc.NotSupportedError}.get(
        pgcode[0], sa_exc.OperationalError)
    wrapped = base("SELECT 1", {}, Psycopg2Error("from the server", pgcode))
    assert type(translate(wrapped, "read", SOME_JOB)) is expected


@pytest.mark.parametrize(("errorname", "message"), [
    ("SQLITE_BUSY", "database is locked"),
    ("SQLITE_BUSY_SNAPSHOT", "database is locked"),
    ("SQLITE_BUSY_RECOVERY", "database is locked"),
    ("SQLITE_LOCKED", "database table is locked"),
    ("SQLITE_LOCKED_SHAREDCACHE", "database table is locked: jobflow_jobs"),
    ("SQLITE_IOERR_SHORT_READ", "disk I/O error"),
    ("SQLITE_FULL", "database or disk is full"),
    ("SQLITE_CANTOPEN", "unable to open database file"),
    (None, "database is locked"),
    (None, "database table is locked"),
])
def test_a_busy_or_failing_sqlite_may_be_retried(errorname: str | None, message: str) -> None:
    error = translate(sqlite_error(errorname, message), "claim", None)
    assert type(error) is StorageUnavailable
    assert message in str(error)


@pytest.mark.parametrize(("errorname", "message", "kind", "expected"), [
    ("SQLITE_ERROR", "no such table: jobflow_jobs", sqlite3.OperationalError,
     ConfigurationError),
    ("SQLITE_ERROR", "no such column: attempts", sqlite3.OperationalError, ConfigurationError),
    ("SQLITE_READONLY", "attempt to write a readonly database", sqlite3.OperationalError,
     ConfigurationError),
    ("SQLITE_NOTADB", "file is not a database", sqlite3.DatabaseError, ConfigurationError),
    ("SQLITE_ERROR", "cannot start a transaction within a transaction",
     sqlite3.OperationalError, PermanentStorageError),
    ("SQLITE_ERROR", "near \"SELEC\": syntax error", sqlite3.OperationalError,
     PermanentStorageError),
    ("SQLITE_CORRUPT", "database disk image is malformed", sqlite3.DatabaseError,
     PermanentStorageError),
    ("SQLITE_MISUSE", "bad parameter or other API misuse", sqlite3.InterfaceError,
     PermanentStorageError),
    (None, "cannot start a transaction within a transaction", sqlite3.OperationalError,
     PermanentStorageError),
    (None, "Cannot operate on a closed database.", sqlite3.ProgrammingError,
     PermanentStorageError),
    (None, "SQLite objects created in a thread can only be used in that same thread.",
     sqlite3.ProgrammingError, PermanentStorageError),
    ("SQLITE_CONSTRAINT_CHECK", "CHECK constraint failed: attempts_not_negative",
     sqlite3.IntegrityError, InvalidInput),
])
def test_sqlite_setup_and_programming_errors_are_not_retryable(
        errorname: str | None, message: str, kind: type[sqlite3.Error],
        expected: type[JobflowError]) -> None:
    error = translate(sqlite_error(errorname, message, kind), "read", SOME_JOB)
    assert type(error) is expected
    if expected is not InvalidInput:
        assert message in str(error)


@pytest.mark.parametrize(("raised", "expected", "named"), [
    (sa_exc.TimeoutError("QueuePool limit of size 5 overflow 10 reached"), StorageUnavailable,
     "QueuePool limit"),
    (sa_exc.DisconnectionError("pre-ping failed"), StorageUnavailable, "pre-ping failed"),
    (sa_exc.InvalidRequestError("A transaction is already begun on this Connection"),
     PermanentStorageError, "already begun"),
    (sa_exc.PendingRollbackError("Can't reconnect until invalid transaction is rolled back"),
     PermanentStorageError, "rolled back first"),
    (sa_exc.ResourceClosedError("This Connection is closed"), PermanentStorageError,
     "connection is closed"),
    (sa_exc.NoSuchModuleError("Can't load plugin: sqlalchemy.dialects:postgresql.nope"),
     PermanentStorageError, "Can't load plugin"),
    (sa_exc.StatementError("(builtins.TypeError) unhashable", "SELECT 1", {},
                           TypeError("unhashable")), PermanentStorageError, "unhashable"),
])
def test_sqlalchemy_usage_errors_are_not_retryable_and_pool_timeouts_are(
        raised: sa_exc.SQLAlchemyError, expected: type[JobflowError], named: str) -> None:
    with pytest.raises(expected) as info, driver_errors("claim"):
        raise raised
    assert type(info.value) is expected
    assert named in str(info.value)
    assert info.value.__cause__ is raised


def test_the_store_runs_again_statements_postgres_rolled_back_whole() -> None:
    assert is_deadlock(postgres_error("40P01"))
    assert is_deadlock(postgres_error("40001"))
    for sqlstate in ("55P03", "57014", "08006", "23505"):
        assert not is_deadlock(postgres_error(sqlstate))


# -- real errors -----------------------------------------------------------------------


@pytest.fixture(params=SQL_KINDS)
def own_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sa.Engine]:
    """A migrated database of this test's own, SQLite or PostgreSQL, free to break."""
    if request.param == "sqlite":
        path = tmp_path / "jobs.sqlite3"
        shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
        engine = sa.create_engine(f"sqlite:///{path}")
    else:
        engine = sa.create_engine(request.getfixturevalue("pg_url"))
        jobflow.migrations.upgrade(engine)
    yield engine
    engine.dispose()


def test_a_missing_column_is_a_configuration_error(own_database: sa.Engine) -> None:
    flow = flow_on(SqlAlchemyJobStore(own_database), InMemoryObjectStore())
    job_id = flow.initiate_upload("alice", content_type="video/mp4").job_id
    with own_database.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE jobflow_jobs RENAME COLUMN owner_id TO owner")
    own_database.dispose()  # no statement cached against the old columns
    with pytest.raises(ConfigurationError, match=r"jobflow\.migrations\.upgrade") as info:
        flow.get(job_id)
    assert "owner_id" in str(info.value)
    with pytest.raises(ConfigurationError):
        flow.initiate_upload("alice", content_type="video/mp4")


def test_a_closed_bound_connection_is_not_retryable(own_database: sa.Engine) -> None:
    store = SqlAlchemyJobStore(own_database)
    conn = own_database.connect()
    bound = flow_on(store.bind(conn), InMemoryObjectStore())
    conn.close()
    for call in (lambda: bound.get(SOME_JOB),
                 lambda: bound.initiate_upload("alice", content_type="video/mp4")):
        with pytest.raises(PermanentStorageError, match="the bound connection is closed"):
            call()


@pytest.mark.postgres
def test_a_bound_connection_in_an_aborted_transaction_is_not_retryable(
        pg_engine: sa.Engine) -> None:
    with pg_engine.connect() as conn:
        with pytest.raises(sa_exc.DataError):
            conn.execute(sa.text("SELECT 1 / 0"))
        bound = flow_on(SqlAlchemyJobStore(pg_engine).bind(conn), InMemoryObjectStore())
        for call in (lambda: bound.get(SOME_JOB),
                     lambda: bound.initiate_upload("alice", content_type="video/mp4")):
            with pytest.raises(PermanentStorageError, match="roll it back") as info:
                call()
            assert not isinstance(info.value, StorageUnavailable)
        conn.rollback()
        ticket = bound.initiate_upload("alice", content_type="video/mp4")
        assert bound.get(ticket.job_id).status is JobStatus.AWAITING_UPLOAD
        conn.rollback()


@pytest.fixture
def doomed_engine(pg_engine: sa.Engine) -> Iterator[sa.Engine]:
    """An engine of its own on the run's database, whose connections a test may kill."""
    engine = sa.create_engine(pg_engine.url, connect_args={"application_name": DOOMED})
    yield engine
    engine.dispose()


def kill_doomed(admin_engine: sa.Engine) -> int:
    with admin_engine.connect() as admin:
        killed: int = admin.execute(sa.text(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = :doomed"), {"doomed": DOOMED}).scalar_one()
    return killed


@pytest.mark.postgres
def test_a_bound_connection_killed_mid_transaction_says_to_roll_back(
        doomed_engine: sa.Engine, pg_engine: sa.Engine) -> None:
    with doomed_engine.connect() as conn:
        bound = flow_on(SqlAlchemyJobStore(doomed_engine).bind(conn), InMemoryObjectStore())
        bound.initiate_upload("alice", content_type="video/mp4")
        # The host's connection, and the pooled one the store's clock read the time on.
        assert kill_doomed(pg_engine) == 2
        with pytest.raises(StorageUnavailable, match="lost the database connection"):
            bound.get(SOME_JOB)
        # The host's transaction is gone: the same call fails until the host rolls back.
        with pytest.raises(PermanentStorageError, match="rolled back first"):
            bound.get(SOME_JOB)
        conn.rollback()
        with pytest.raises(JobflowError) as info:
            bound.get(SOME_JOB)
        assert type(info.value).__name__ == "JobNotFound"


@pytest.mark.postgres
def test_a_connection_killed_between_calls_is_storage_unavailable(
        doomed_engine: sa.Engine, pg_engine: sa.Engine) -> None:
    flow = flow_on(SqlAlchemyJobStore(doomed_engine), InMemoryObjectStore())
    ticket = flow.initiate_upload("alice", content_type="video/mp4")
    assert kill_doomed(pg_engine) >= 1
    with pytest.raises(StorageUnavailable) as info:
        flow.get(ticket.job_id)
    assert isinstance(info.value.__cause__, sa_exc.DBAPIError)
    assert flow.get(ticket.job_id).status is JobStatus.AWAITING_UPLOAD


@pytest.mark.postgres
def test_a_statement_timeout_is_storage_unavailable(pg_engine: sa.Engine) -> None:
    with pg_engine.connect() as conn:
        conn.exec_driver_sql("SET statement_timeout = 1")
        with pytest.raises(sa_exc.DBAPIError) as info:
            conn.execute(sa.text("SELECT pg_sleep(1)"))
        conn.rollback()
    assert getattr(info.value.orig, "sqlstate", None) == "57014"
    error = translate(info.value, "claim", None)
    assert type(error) is StorageUnavailable
    assert "statement timeout" in str(error)


@pytest.mark.postgres
@pytest.mark.parametrize(("setting", "said"), [
    ("statement_timeout", "statement timeout"),
    ("lock_timeout", "lock timeout"),
])
def test_a_write_that_waits_past_a_timeout_is_storage_unavailable_and_changes_nothing(
        pg_engine: sa.Engine, setting: str, said: str) -> None:
    """The store's own statement, stuck behind a row another transaction holds,
    is cancelled by the server: nothing written, and the next call succeeds."""
    impatient = sa.create_engine(pg_engine.url,
                                 connect_args={"options": f"-c {setting}=200"})
    try:
        flow = flow_on(SqlAlchemyJobStore(impatient), InMemoryObjectStore())
        job_id = flow.initiate_upload("alice", content_type="video/mp4").job_id
        with pg_engine.connect() as other:
            other.execute(sa.text("SELECT id FROM jobflow_jobs WHERE id = :id FOR UPDATE"),
                          {"id": job_id})
            with pytest.raises(StorageUnavailable, match=said):
                flow.cancel(job_id)
            other.rollback()
        assert flow.get(job_id).status is JobStatus.AWAITING_UPLOAD
        assert flow.cancel(job_id).status is JobStatus.FAILED
    finally:
        impatient.dispose()


# -- SQLite write contention -----------------------------------------------------------


@pytest.fixture
def sqlite_path(sqlite_template: Path, tmp_path: Path) -> Path:
    path = tmp_path / "jobs.sqlite3"
    shutil.copyfile(sqlite_template, path)
    return path


def test_a_sqlite_write_waits_for_the_lock_beyond_the_drivers_own_timeout(
        sqlite_path: Path) -> None:
    """The store's busy timeout governs BEGIN IMMEDIATE, even on an engine whose
    driver was told not to wait at all."""
    engine = sa.create_engine(f"sqlite:///{sqlite_path}", connect_args={"timeout": 0})
    other_writer = sa.create_engine(f"sqlite:///{sqlite_path}")
    try:
        flow = flow_on(SqlAlchemyJobStore(engine, busy_timeout_seconds=30), InMemoryObjectStore())
        flow.counts()  # connected and set up before the lock is taken
        with other_writer.connect() as conn:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
            release = threading.Timer(0.5, conn.rollback)
            release.start()
            started = time.monotonic()
            ticket = flow.initiate_upload("alice", content_type="video/mp4")
            waited = time.monotonic() - started
            release.join()
        assert waited >= 0.4, "the write did not wait for the other writer"
        assert flow.get(ticket.job_id).status is JobStatus.AWAITING_UPLOAD
    finally:
        engine.dispose()
        other_writer.dispose()


WRITERS = 8
WRITES = 50


@pytest.mark.parametrize("stores", ["one-store", "a-store-per-thread"])
def test_concurrent_sqlite_writes_wait_instead_of_failing(sqlite_path: Path,
                                                          stores: str) -> None:
    """8 threads completing 50 uploads each on one SQLite file: every call succeeds.
    With a store per thread (as with processes) they queue in SQLite's busy
    handler, not in the store's lock."""
    objects = InMemoryObjectStore()
    engines = [sa.create_engine(f"sqlite:///{sqlite_path}")
               for _ in range(WRITERS if stores == "a-store-per-thread" else 1)]
    flows = [flow_on(SqlAlchemyJobStore(engine), objects) for engine in engines]
    try:
        job_ids = []
        for _ in range(WRITERS * WRITES):
            ticket = flows[0].initiate_upload("alice", content_type="video/mp4")
            objects.put(ticket.key, b"0123456789", content_type="video/mp4")
            job_ids.append(ticket.job_id)
        start = threading.Barrier(WRITERS)

        def complete(writer: int) -> list[JobStatus]:
            flow: JobFlow = flows[writer % len(flows)]
            start.wait()
            mine = job_ids[writer * WRITES:(writer + 1) * WRITES]
            statuses = []
            for job_id in mine:
                statuses.append(flow.complete_upload(job_id).status)
                flow.counts()  # a reader between the writes
            return statuses

        with ThreadPoolExecutor(WRITERS) as pool:
            done = [status for statuses in pool.map(complete, range(WRITERS))
                    for status in statuses]
        assert done == [JobStatus.QUEUED] * (WRITERS * WRITES)
        assert flows[0].counts()[JobStatus.QUEUED] == WRITERS * WRITES
    finally:
        for engine in engines:
            engine.dispose()
