"""Driver errors, translated at the store's boundary into jobflow's error tree.

Each jobflow error says whether retrying can help; it is raised ``from`` the
SQLAlchemy error, so the driver's own error stays at hand.

* :class:`~jobflow.errors.StorageUnavailable`, retrying may help: the
  connection lost, refused or timed out (SQLSTATE class 08, 57P01 to 57P03,
  57P05, a disconnect SQLAlchemy detects, the pool's timeout); a
  serialization failure (40001), a deadlock (40P01), a lock not available
  (55P03), a statement timeout or cancel (57014), insufficient resources
  (class 53), an I/O error (58030); on SQLite a database still busy or
  locked after the busy timeout, an I/O error, a full disk, a file that
  cannot be opened.
* :class:`~jobflow.errors.InvalidInput`: a row the database's constraints
  refuse (class 23), a value it refuses (class 22).
* :class:`~jobflow.errors.ConfigurationError`: a missing table, column or
  schema (42P01, 42703, 3F000; SQLite's "no such table", "no such column"):
  run the migrations; a
  missing privilege (42501), a read-only SQLite file, a wrong password, role
  or database name.
* :class:`~jobflow.errors.PermanentStorageError`, anything else: SQLAlchemy
  usage errors (a closed connection, a transaction to roll back first, one
  already begun), a transaction the database aborted (25P02), SQL or a
  feature it rejects, its internal errors, an error not known as transient.

Deadlocks and serialization failures of the store's own single statements are
run again by the store (a bounded number of times) before they surface.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import exc as sa_exc

from jobflow.errors import (
    ConfigurationError,
    InvalidInput,
    JobflowError,
    PermanentStorageError,
    StorageUnavailable,
)

# SQLSTATEs (PostgreSQL appendix A), and classes by their first two characters.
_DEADLOCK_DETECTED = "40P01"
_SERIALIZATION_FAILURE = "40001"
_UNIQUE_VIOLATION = "23505"
_IN_FAILED_TRANSACTION = "25P02"
#: The statement was rolled back as a whole and may simply run again.
_RERUNNABLE = frozenset({_DEADLOCK_DETECTED, _SERIALIZATION_FAILURE})
_TRANSIENT_CLASSES = frozenset({
    "08",  # connection exception
    "53",  # insufficient resources: disk full, out of memory, too many connections
})
_TRANSIENT = _RERUNNABLE | {
    "55P03",  # lock not available (lock_timeout, NOWAIT)
    "57014",  # query canceled (statement_timeout, pg_cancel_backend)
    "57P01",  # admin shutdown (pg_terminate_backend, fast shutdown)
    "57P02",  # crash shutdown
    "57P03",  # cannot connect now (starting up, recovering)
    "57P05",  # idle session timeout
    "58030",  # I/O error
}
_SCHEMA_MISSING = frozenset({
    "42P01",  # undefined table
    "42703",  # undefined column
    "42883",  # undefined function
    "42704",  # undefined object (a type, an index)
    "3F000",  # invalid schema name
})
_SETUP = {
    "42501": "the database user lacks a privilege",
    "28000": "the database refused the credentials",
    "28P01": "the database refused the password",
    "3D000": "the database does not exist",
}

# SQLite's primary result codes (the name without its extended suffix).
_SQLITE_TRANSIENT = frozenset({
    "SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_IOERR", "SQLITE_FULL", "SQLITE_CANTOPEN",
    "SQLITE_NOMEM", "SQLITE_PROTOCOL",
})
_SQLITE_SETUP = {
    "SQLITE_READONLY": "the SQLite database is read-only to this process",
    "SQLITE_PERM": "the SQLite database refused access",
    "SQLITE_AUTH": "the SQLite database refused access",
    "SQLITE_NOTADB": "the file is not a SQLite database",
}
#: The messages of the transient SQLite errors, for a driver without result codes.
_SQLITE_TRANSIENT_MESSAGES = (
    "database is locked", "database table is locked", "database schema is locked",
    "disk i/o error", "database or disk is full", "unable to open database file",
)
#: Messages of connection failures that no retry fixes (psycopg gives them no SQLSTATE).
_CONNECT_SETUP_MESSAGES = {
    "password authentication failed": "the database refused the password",
    "no password supplied": "the database asked for a password",
    "role \"": "the database does not know the user",
    "database \"": "the database does not exist",
}


def is_deadlock(exc: sa_exc.DBAPIError) -> bool:
    """Whether PostgreSQL rolled the statement back to break a deadlock or a
    serialization conflict: it wrote nothing, and as a transaction of its own
    it may simply run again."""
    return _sqlstate(exc) in _RERUNNABLE


def _sqlstate(exc: sa_exc.StatementError) -> str | None:
    """The SQLSTATE of the driver's error: psycopg's ``sqlstate``, psycopg2's ``pgcode``."""
    orig = exc.orig
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    return code if isinstance(code, str) else None


def _sqlite_code(exc: sa_exc.StatementError) -> str | None:
    """SQLite's primary result code name (``SQLITE_BUSY`` for ``SQLITE_BUSY_SNAPSHOT``)."""
    name = getattr(exc.orig, "sqlite_errorname", None)
    if not isinstance(name, str):
        return None
    return "_".join(name.split("_")[:2])


def _constraint_name(exc: sa_exc.IntegrityError) -> str:
    diag = getattr(exc.orig, "diag", None)
    name = getattr(diag, "constraint_name", None)
    if name:
        return str(name)
    message = str(exc.orig)
    return message.split(":", 1)[1].strip() if ":" in message else message


def _is_duplicate_key(exc: sa_exc.IntegrityError) -> bool:
    return _sqlstate(exc) == _UNIQUE_VIOLATION or "UNIQUE constraint failed" in str(exc.orig)


def _is_transient(exc: sa_exc.DBAPIError, detail: str) -> bool:
    """Whether the outside world failed: the same call may succeed later."""
    if exc.connection_invalidated:
        return True
    sqlstate = _sqlstate(exc)
    if sqlstate is not None:
        return sqlstate in _TRANSIENT or sqlstate[:2] in _TRANSIENT_CLASSES
    sqlite = _sqlite_code(exc)
    if sqlite is not None:
        return sqlite in _SQLITE_TRANSIENT
    if any(message in detail.lower() for message in _SQLITE_TRANSIENT_MESSAGES):
        return True
    if isinstance(exc.orig, sqlite3.Error):
        return False  # SQLite's own errors are known by their messages above
    # psycopg raises its connection failures (refused, closed, timed out) as an
    # OperationalError without a SQLSTATE: the server never answered.
    return isinstance(exc, sa_exc.OperationalError)


def _setup_problem(exc: sa_exc.DBAPIError, detail: str) -> str | None:
    """What is wrong with the setup, if that is what the error shows."""
    sqlstate = _sqlstate(exc)
    if sqlstate in _SETUP:
        return _SETUP[sqlstate]
    sqlite = _sqlite_code(exc)
    if sqlite in _SQLITE_SETUP:
        return _SQLITE_SETUP[sqlite]
    if sqlstate is None and sqlite is None and isinstance(exc, sa_exc.OperationalError):
        for message, problem in _CONNECT_SETUP_MESSAGES.items():
            if message in detail and (not message.endswith('"') or "does not exist" in detail):
                return problem
    return None


def _missing_schema(exc: sa_exc.DBAPIError, detail: str) -> bool:
    if _sqlstate(exc) in _SCHEMA_MISSING:
        return True
    return _sqlite_code(exc) in (None, "SQLITE_ERROR") and (
        "no such table" in detail or "no such column" in detail
        or " has no column named " in detail)


def translate(exc: sa_exc.SQLAlchemyError, action: str, job_id: str | None) -> JobflowError:
    """The jobflow error for a SQLAlchemy error raised while doing ``action``."""
    about = f" job {job_id}" if job_id else ""
    if isinstance(exc, sa_exc.TimeoutError | sa_exc.DisconnectionError):
        return StorageUnavailable(f"no database connection to {action}{about}: {exc}")
    if not isinstance(exc, sa_exc.StatementError):
        return _usage_error(exc, action, about)
    orig = exc.orig
    if isinstance(orig, JobflowError):  # raised by one of our column types
        return orig
    said = str(orig).strip() if orig is not None else ""
    detail = said.splitlines()[0] if said else str(exc)
    if not isinstance(exc, sa_exc.DBAPIError):
        # The statement never reached the database: a value SQLAlchemy could not bind.
        return PermanentStorageError(
            f"could not send the statement to {action}{about}: {type(orig).__name__}: {detail}")
    if isinstance(exc, sa_exc.IntegrityError):
        if action == "create" and _is_duplicate_key(exc):
            return InvalidInput(f"job {job_id} already exists")
        return InvalidInput(f"the database refused to {action}{about}: "
                            f"constraint {_constraint_name(exc)} failed")
    if exc.connection_invalidated:
        return StorageUnavailable(f"lost the database connection while trying to {action}"
                                  f"{about}: {detail}")
    if _missing_schema(exc, detail):
        return ConfigurationError(
            f"the database schema is not jobflow's ({detail}); run jobflow.migrations.upgrade")
    problem = _setup_problem(exc, detail)
    if problem is not None:
        return ConfigurationError(f"cannot {action}{about}: {problem} ({detail})")
    if _is_transient(exc, detail):
        return StorageUnavailable(f"the database failed while trying to {action}{about}: "
                                  f"{detail}")
    if isinstance(exc, sa_exc.DataError):
        return InvalidInput(f"the database refused a value while trying to {action}{about}: "
                            f"{detail}")
    if _sqlstate(exc) == _IN_FAILED_TRANSACTION:
        return PermanentStorageError(
            f"cannot {action}{about}: the bound connection's transaction was aborted by an "
            f"earlier error; roll it back first ({detail})")
    kind = type(orig).__name__ if orig is not None else type(exc).__name__
    return PermanentStorageError(
        f"the database refused to {action}{about}, and retrying will not help: "
        f"{kind}: {detail}")


def _usage_error(exc: sa_exc.SQLAlchemyError, action: str, about: str) -> JobflowError:
    """A SQLAlchemy error raised before any statement ran: the connection or the
    transaction is not in a state to run one."""
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, sa_exc.PendingRollbackError):
        cause = "the bound connection's transaction must be rolled back first"
    elif isinstance(exc, sa_exc.ResourceClosedError):
        cause = "the bound connection is closed"
    elif isinstance(exc, sa_exc.InvalidRequestError):
        cause = "SQLAlchemy refused the call"
    else:
        cause = "SQLAlchemy failed"
    return PermanentStorageError(f"cannot {action}{about}: {cause} ({type(exc).__name__}: "
                                 f"{detail})")


@contextmanager
def driver_errors(action: str, job_id: str | None = None) -> Iterator[None]:
    """Raise the SQLAlchemy errors of the block as jobflow errors (``action`` and
    ``job_id`` say what failed), chained to the original."""
    try:
        yield
    except sa_exc.SQLAlchemyError as exc:
        raise translate(exc, action, job_id) from exc


__all__ = ["driver_errors", "is_deadlock", "translate"]
