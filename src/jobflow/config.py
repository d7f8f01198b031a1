"""Building a :class:`~jobflow.JobFlow` from the ``jobflow`` command's settings.

The embedded defaults need no server: a SQLite file (``jobflow.sqlite3``) and
a local object folder (``jobflow-objects/``) in the working directory, the
SQLite schema migrated on first use. A PostgreSQL URL selects PostgreSQL
(migrated explicitly with ``jobflow db upgrade``); an S3 bucket selects S3.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from jobflow.adapters.sqlalchemy.engine import DatabaseTimeouts, create_engine
from jobflow.errors import ConfigurationError, JobflowError, StorageUnavailable
from jobflow.flow import JobFlow
from jobflow.models import UploadPolicy

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from jobflow.adapters.sqlalchemy import SqlAlchemyJobStore
    from jobflow.ports import ObjectStore

DEFAULT_DATABASE_FILE = "jobflow.sqlite3"
DEFAULT_OBJECTS_DIR = "jobflow-objects"

# Spellings of PostgreSQL URLs that mean "use psycopg 3", jobflow's driver.
_POSTGRES_SCHEMES = ("postgres://", "postgresql://")


@attrs.frozen
class StoreSettings:
    """Where jobs and objects live. None/empty values mean the embedded defaults."""

    database_url: str | None = None
    objects_dir: Path | None = None
    s3_bucket: str | None = None
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_prefix: str = ""
    s3_upload_method: str = "PUT"
    #: Limits on every wait for PostgreSQL (ignored on SQLite).
    timeouts: DatabaseTimeouts = attrs.field(factory=DatabaseTimeouts)
    workdir: Path = attrs.field(factory=Path.cwd)

    def resolved_database_url(self) -> str:
        """The SQLAlchemy URL to use, psycopg 3 made explicit for PostgreSQL."""
        if not self.database_url:
            return f"sqlite:///{self.workdir / DEFAULT_DATABASE_FILE}"
        url = self.database_url
        for scheme in _POSTGRES_SCHEMES:
            if url.startswith(scheme):
                return "postgresql+psycopg://" + url[len(scheme):]
        return url

    def resolved_objects_dir(self) -> Path:
        return self.objects_dir or self.workdir / DEFAULT_OBJECTS_DIR

    @property
    def uses_s3(self) -> bool:
        return bool(self.s3_bucket)


def make_engine(url: str, timeouts: DatabaseTimeouts | None = None) -> Engine:
    """A SQLAlchemy engine for ``url`` whose PostgreSQL connections have
    ``timeouts`` (default: :class:`DatabaseTimeouts`'s); a bad URL or a missing
    driver is a :class:`ConfigurationError`. Nothing connects yet."""
    try:
        parsed = sa.make_url(url)
    except sa_exc.ArgumentError as exc:
        raise ConfigurationError(f"invalid database URL: {exc}") from exc
    if parsed.get_backend_name() not in ("postgresql", "sqlite"):
        raise ConfigurationError(
            f"unsupported database {parsed.get_backend_name()!r}: use a postgresql:// URL or "
            "a sqlite:/// file")
    _check_sqlite_folder(parsed)
    try:
        return create_engine(parsed, timeouts=timeouts)
    except ImportError as exc:
        raise ConfigurationError(
            f"the database driver is not installed ({exc}); for PostgreSQL install "
            "jobflow[postgres]") from exc
    except sa_exc.ArgumentError as exc:
        raise ConfigurationError(f"invalid database URL: {exc}") from exc


def _check_sqlite_folder(url: sa.URL) -> None:
    """A SQLite file must be in a folder that exists: SQLite would fail on first
    use with "unable to open database file", which is configuration, not an
    outage."""
    database = url.database or ""
    if (url.get_backend_name() != "sqlite" or database in ("", ":memory:")
            or database.startswith("file:") or "mode=memory" in str(url)):
        return
    folder = Path(database).parent
    if not folder.is_dir():
        raise ConfigurationError(
            f"the folder of the SQLite database {database} does not exist: create it or "
            "point --database-url elsewhere")


def _driver_failure(action: str, exc: Exception) -> JobflowError:
    detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
    if isinstance(exc, sa_exc.ProgrammingError):
        return ConfigurationError(f"cannot {action}: {detail}")
    return StorageUnavailable(f"cannot {action}: {detail}")


def schema_revision(engine: Engine) -> str | None:
    """The jobflow migration the database is at (None before the first)."""
    from jobflow import migrations

    try:
        return migrations.current(engine)
    except (sa_exc.DBAPIError, sa_exc.OperationalError) as exc:
        raise _driver_failure("read the database's schema version", exc) from exc


def migrate(engine: Engine, revision: str = "head", *, down: bool = False) -> None:
    """Run jobflow's migrations, translating driver errors."""
    from jobflow import migrations

    try:
        if down:
            migrations.downgrade(engine, revision)
        else:
            migrations.upgrade(engine, revision)
    except sa_exc.DBAPIError as exc:
        raise _driver_failure("migrate the database", exc) from exc


def ensure_schema(engine: Engine, *, migrate_sqlite: bool = True) -> None:
    """SQLite: migrate to the newest schema on first use (unless
    ``migrate_sqlite`` is False). Otherwise refuse to run on a schema that is
    not the newest (``jobflow db upgrade`` fixes it)."""
    from jobflow import migrations

    newest = migrations.head()
    found = schema_revision(engine)
    if found == newest:
        return
    if migrate_sqlite and engine.dialect.name == "sqlite":
        try:
            migrate(engine)
        except JobflowError:
            # Another process may have migrated the same file a moment ago.
            if schema_revision(engine) != newest:
                raise
        return
    raise ConfigurationError(
        f"the database schema is at revision {found or 'none'}, this jobflow needs {newest}: "
        "run `jobflow db upgrade`")


def missing_sqlite_file(engine: Engine) -> Path | None:
    """The SQLite file of ``engine`` when there is none yet (an empty file, which
    connecting alone leaves behind, counts as none); None otherwise."""
    from jobflow.adapters.sqlalchemy import sqlite_file

    path = sqlite_file(engine)
    if path is None or (path.exists() and path.stat().st_size > 0):
        return None
    return path


def open_job_store(settings: StoreSettings, *, create: bool = True,
                   read_only: bool = False) -> SqlAlchemyJobStore:
    """The job store the settings describe, its schema checked (SQLite: created).

    With ``create=False`` a SQLite file that does not exist yet is a
    :class:`ConfigurationError` instead of a new, empty database. With
    ``read_only`` (commands that only look) nothing is created or migrated
    either: a schema that is not the newest is a :class:`ConfigurationError`.
    """
    from jobflow.adapters.sqlalchemy import SqlAlchemyJobStore

    engine = make_engine(settings.resolved_database_url(), settings.timeouts)
    missing = None if create and not read_only else missing_sqlite_file(engine)
    if missing is not None:
        raise ConfigurationError(
            f"no jobflow database at {missing}: nothing has created jobs here yet "
            "(a worker, `jobflow upload` or `jobflow db upgrade` creates it; "
            "--database-url points elsewhere)")
    ensure_schema(engine, migrate_sqlite=not read_only)
    return SqlAlchemyJobStore(engine)


def open_object_store(settings: StoreSettings, *, create: bool = True) -> ObjectStore:
    """The object store the settings describe; with ``create=False`` a local
    folder that does not exist is not created."""
    if settings.uses_s3:
        from jobflow.adapters.s3 import S3ObjectStore

        assert settings.s3_bucket is not None
        method = settings.s3_upload_method.upper()
        if method not in ("PUT", "POST"):
            raise ConfigurationError(f"the S3 upload method must be PUT or POST, got {method!r}")
        return S3ObjectStore(bucket=settings.s3_bucket, endpoint_url=settings.s3_endpoint_url,
                             region=settings.s3_region, prefix=settings.s3_prefix,
                             upload_method="POST" if method == "POST" else "PUT")
    from jobflow.adapters.localfs import LocalObjectStore

    return LocalObjectStore(settings.resolved_objects_dir(), create=create)


def open_flow(settings: StoreSettings, policy: UploadPolicy,
              clock: Callable[[], datetime] | None = None, *, create: bool = True,
              read_only: bool = False) -> JobFlow:
    """The JobFlow the settings describe, its schema checked (or, on SQLite,
    created unless ``create=False``; neither created nor migrated with
    ``read_only``: see :func:`open_job_store`)."""
    return JobFlow(store=open_job_store(settings, create=create, read_only=read_only),
                   objects=open_object_store(settings, create=not read_only), policy=policy,
                   clock=clock)
