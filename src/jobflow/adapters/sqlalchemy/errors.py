"""Driver errors, translated at the store's boundary into jobflow's error tree.

A lost, refused or locked connection raises
:class:`~jobflow.errors.StorageUnavailable`, a missing table
:class:`~jobflow.errors.ConfigurationError`, a row the database's constraints
refuse :class:`~jobflow.errors.InvalidInput`; each is raised ``from`` the
SQLAlchemy error, so the driver's own error stays at hand.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import exc as sa_exc

from jobflow.errors import ConfigurationError, InvalidInput, JobflowError, StorageUnavailable

_DEADLOCK_DETECTED = "40P01"  # SQLSTATE
_UNIQUE_VIOLATION = "23505"
_UNDEFINED_TABLE = "42P01"


def is_deadlock(exc: sa_exc.DBAPIError) -> bool:
    """Whether PostgreSQL rolled the statement back to break a deadlock."""
    return _sqlstate(exc) == _DEADLOCK_DETECTED


def _sqlstate(exc: sa_exc.StatementError) -> str | None:
    return getattr(exc.orig, "sqlstate", None)


def _constraint_name(exc: sa_exc.IntegrityError) -> str:
    diag = getattr(exc.orig, "diag", None)
    name = getattr(diag, "constraint_name", None)
    if name:
        return str(name)
    message = str(exc.orig)
    return message.split(":", 1)[1].strip() if ":" in message else message


def _is_duplicate_key(exc: sa_exc.IntegrityError) -> bool:
    return _sqlstate(exc) == _UNIQUE_VIOLATION or "UNIQUE constraint failed" in str(exc.orig)


def translate(exc: sa_exc.StatementError, action: str, job_id: str | None) -> JobflowError:
    """The jobflow error for a driver error raised while doing ``action``."""
    orig = exc.orig
    if isinstance(orig, JobflowError):  # raised by one of our column types
        return orig
    detail = str(orig).strip().splitlines()[0] if orig is not None else str(exc)
    about = f" job {job_id}" if job_id else ""
    if isinstance(exc, sa_exc.IntegrityError):
        if action == "create" and _is_duplicate_key(exc):
            return InvalidInput(f"job {job_id} already exists")
        return InvalidInput(f"the database refused to {action}{about}: "
                            f"constraint {_constraint_name(exc)} failed")
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return StorageUnavailable(f"lost the database connection while trying to {action}"
                                  f"{about}: {detail}")
    missing_table = "no such table" in detail or _sqlstate(exc) == _UNDEFINED_TABLE
    if missing_table or isinstance(exc, sa_exc.ProgrammingError):
        return ConfigurationError(
            f"the database schema is not jobflow's ({detail}); run jobflow.migrations.upgrade")
    if isinstance(exc, sa_exc.DataError):
        return InvalidInput(f"the database refused a value while trying to {action}{about}: "
                            f"{detail}")
    return StorageUnavailable(f"the database failed while trying to {action}{about}: {detail}")


@contextmanager
def driver_errors(action: str, job_id: str | None = None) -> Iterator[None]:
    """Raise the driver errors of the block as jobflow errors (``action`` and
    ``job_id`` say what failed), chained to the original."""
    try:
        yield
    except sa_exc.StatementError as exc:
        raise translate(exc, action, job_id) from exc
    except (sa_exc.TimeoutError, sa_exc.DisconnectionError) as exc:
        raise StorageUnavailable(f"no database connection to {action}: {exc}") from exc


__all__ = ["driver_errors", "is_deadlock", "translate"]
