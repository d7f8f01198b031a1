"""The ``jobflow`` command: run workers and operate jobs from a terminal.

Built on click. Every option also reads a ``JOBFLOW_*`` environment variable,
named in ``--help``. Errors are one line on stderr with a distinct exit code
(see :class:`ExitCode`); ``--debug`` adds the traceback.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import importlib
import json
import math
import mimetypes
import os
import signal
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar, cast

import attrs
import click
import structlog

from jobflow import states
from jobflow.adapters.sqlalchemy.engine import DatabaseTimeouts
from jobflow.config import (
    StoreSettings,
    make_engine,
    migrate,
    missing_sqlite_file,
    open_flow,
    schema_revision,
)
from jobflow.errors import (
    ConfigurationError,
    ContentTypeNotAllowed,
    InvalidInput,
    InvalidTransition,
    JobflowError,
    JobNotFound,
    LeaseLost,
    ObjectChanged,
    PermanentStorageError,
    StorageUnavailable,
    UploadError,
)
from jobflow.flow import (
    MAX_LEASE_SECONDS,
    MAX_RECONCILE_BUDGET,
    RECONCILE_BUDGET_SECONDS,
    JobFlow,
)
from jobflow.logconfig import LOG_FORMATS, LOG_LEVELS, LogFormat, configure_logging, redact
from jobflow.models import DEFAULT_CONTENT_TYPES, Job, JobStatus, UploadPolicy, media_type
from jobflow.reporting import (
    StatusReport,
    dumps,
    event_as_json,
    history_lines,
    job_as_json,
    job_lines,
    job_list_as_json,
    job_list_lines,
    list_jobs,
    purge_lines,
    reconcile_lines,
    requeue_lines,
)
from jobflow.worker import MAX_CONCURRENCY

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

F = TypeVar("F", bound=Callable[..., Any])


class ExitCode(enum.IntEnum):
    """What the ``jobflow`` command's exit status means."""

    OK = 0
    INTERNAL_ERROR = 1  # a bug: please report it with the --debug traceback
    CONFIGURATION = 2  # bad usage, option, URL, handler, schema, permissions
    JOB_NOT_FOUND = 3
    REFUSED = 4  # invalid transition for the job's status, or lease lost
    STORAGE_UNAVAILABLE = 5  # database or object store unreachable or failing
    UPLOAD_PROBLEM = 6  # upload missing, rejected, expired or refused by the store
    ALERT = 7  # `status` found more stuck uploads or failures than allowed; `health`: stale


EXIT_CODES_HELP = """\b
Exit codes:
  0  success
  1  internal error (a bug; rerun with --debug for the traceback)
  2  usage or configuration error (options, database URL, handler, schema,
     storage permissions, missing bucket, a database error that retrying
     cannot fix, a malformed job id or a prefix matching several jobs)
  3  job not found
  4  refused: the job's status does not allow this, or the lease was lost
  5  storage unavailable (database or object store); safe to retry
  6  upload missing, rejected, expired, or refused by the object store
  7  status: more stuck uploads or failures than --max-stuck/--max-failed;
     health: the worker's health file is stale or missing
  130, 143  worker stopped at once by a second SIGINT/SIGTERM
"""


def exit_code_for(exc: BaseException) -> ExitCode:
    """The exit status for an error that ended a command."""
    if isinstance(exc, JobNotFound):
        return ExitCode.JOB_NOT_FOUND
    if isinstance(exc, InvalidTransition | LeaseLost):
        return ExitCode.REFUSED
    if isinstance(exc, StorageUnavailable):
        return ExitCode.STORAGE_UNAVAILABLE
    if isinstance(exc, UploadError | ObjectChanged):
        return ExitCode.UPLOAD_PROBLEM
    if isinstance(exc, ConfigurationError | InvalidInput | PermanentStorageError):
        return ExitCode.CONFIGURATION
    return ExitCode.INTERNAL_ERROR


@attrs.define
class Invocation:
    """Settings of one run of the command, shared with ``main``'s error handling."""

    debug: bool = False


def env_option(*decls: str, envvar: str, **kwargs: Any) -> Callable[[F], F]:
    """A click option that also reads ``envvar`` and names it in ``--help``."""
    return click.option(*decls, envvar=envvar, show_envvar=True, **kwargs)


def _apply(options: Sequence[Callable[[F], F]], command: F) -> F:
    for option in reversed(options):
        command = option(command)
    return command


#: The longest duration an option takes (ten years): longer waits overflow the
#: platform's timers; "inf" and "nan" are refused too.
MAX_SECONDS = 10 * 365 * 24 * 3600.0


class Seconds(click.FloatRange):
    """A finite number of seconds within a range."""

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number of seconds", param, ctx)
        return number


seconds = Seconds(min=0, min_open=True, max=MAX_SECONDS)
seconds_or_zero = Seconds(min=0, max=MAX_SECONDS)

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


class Duration(click.ParamType[timedelta, Any]):
    """A duration: seconds, or a number with a unit s, m, h or d (``90``, ``15m``, ``2d``)."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> timedelta:
        if isinstance(value, timedelta):
            return value
        text = str(value).strip().lower()
        unit = _UNITS.get(text[-1:])
        number = text[:-1] if unit is not None else text
        try:
            amount = float(number) * (unit or 1.0)
        except ValueError:
            amount = math.nan
        if not math.isfinite(amount) or not 0 <= amount <= MAX_SECONDS:
            self.fail(f"{value!r} is not a duration such as 90, 90s, 15m, 2h or 7d",
                      param, ctx)
        return timedelta(seconds=amount)

_DEFAULT_TIMEOUTS = DatabaseTimeouts()
DATABASE_OPTIONS = [
    env_option("--database-url", envvar="JOBFLOW_DATABASE_URL", metavar="URL",
               help="Job database: postgresql://user:password@host/db or sqlite:///path. "
                    "Default: the SQLite file jobflow.sqlite3 in the working directory, "
                    "created and migrated on first use."),
    env_option("--db-connect-timeout", envvar="JOBFLOW_DB_CONNECT_TIMEOUT", type=seconds,
               default=_DEFAULT_TIMEOUTS.connect_seconds, show_default=True,
               help="PostgreSQL: seconds to open a connection (whole seconds, at least 2)."),
    env_option("--db-statement-timeout", envvar="JOBFLOW_DB_STATEMENT_TIMEOUT",
               type=seconds_or_zero, default=_DEFAULT_TIMEOUTS.statement_seconds,
               show_default=True,
               help="PostgreSQL: seconds one statement may run before the server cancels it; "
                    "0: no limit (db upgrade and downgrade have none)."),
    env_option("--db-tcp-timeout", envvar="JOBFLOW_DB_TCP_TIMEOUT", type=seconds,
               default=_DEFAULT_TIMEOUTS.tcp_seconds, show_default=True,
               help="PostgreSQL: seconds the server's host may stay silent before a "
                    "connection is dropped (TCP keepalives and tcp_user_timeout)."),
]

OBJECT_STORE_LOCATION_OPTIONS = [
    env_option("--objects-dir", envvar="JOBFLOW_OBJECTS_DIR",
               type=click.Path(file_okay=False, path_type=Path),
               help="Local folder holding uploads (the default object store). "
                    "Default: jobflow-objects/ in the working directory."),
    env_option("--s3-bucket", envvar="JOBFLOW_S3_BUCKET",
               help="Keep uploads in this S3 bucket instead of a local folder. Credentials "
                    "come from the usual AWS sources (AWS_* variables, profiles, roles)."),
    env_option("--s3-endpoint-url", envvar="JOBFLOW_S3_ENDPOINT_URL", metavar="URL",
               help="Endpoint of an S3-compatible store. Default: AWS."),
    env_option("--s3-region", envvar="JOBFLOW_S3_REGION", help="The bucket's region."),
    env_option("--s3-prefix", envvar="JOBFLOW_S3_PREFIX", default="", show_default=True,
               help="Prefix of jobflow's keys inside the bucket."),
]

OBJECT_STORE_OPTIONS = [
    *OBJECT_STORE_LOCATION_OPTIONS,
    env_option("--s3-upload-method", envvar="JOBFLOW_S3_UPLOAD_METHOD",
               type=click.Choice(["PUT", "POST"], case_sensitive=False), default="PUT",
               show_default=True,
               help="Upload tickets as a presigned PUT URL or a presigned POST form (whose "
                    "policy also pins the size range)."),
]

_DEFAULT_POLICY = UploadPolicy()
POLICY_OPTIONS = [
    env_option("--content-types", envvar="JOBFLOW_CONTENT_TYPES", metavar="TYPE,...",
               default=",".join(sorted(DEFAULT_CONTENT_TYPES)), show_default=True,
               help="Content types an upload may have."),
    env_option("--min-bytes", envvar="JOBFLOW_MIN_BYTES", type=click.IntRange(min=1),
               default=_DEFAULT_POLICY.min_bytes, show_default=True,
               help="Smallest acceptable upload."),
    env_option("--max-bytes", envvar="JOBFLOW_MAX_BYTES", type=click.IntRange(min=1),
               default=_DEFAULT_POLICY.max_bytes, show_default=True,
               help="Largest acceptable upload."),
    env_option("--upload-ttl", envvar="JOBFLOW_UPLOAD_TTL", type=seconds,
               default=_DEFAULT_POLICY.upload_ttl_seconds, show_default=True,
               help="Seconds a new job waits for its upload before it expires."),
    env_option("--max-attempts", envvar="JOBFLOW_MAX_ATTEMPTS", type=click.IntRange(min=1),
               default=_DEFAULT_POLICY.max_attempts, show_default=True,
               help="Attempts a new job gets."),
    env_option("--backoff", envvar="JOBFLOW_BACKOFF", type=seconds,
               default=_DEFAULT_POLICY.backoff_seconds, show_default=True,
               help="Seconds before the first retry; doubled after each failed attempt."),
    env_option("--backoff-max", envvar="JOBFLOW_BACKOFF_MAX", type=seconds,
               default=_DEFAULT_POLICY.backoff_max_seconds, show_default=True,
               help="Longest wait between two attempts, in seconds."),
    env_option("--adopt-after", envvar="JOBFLOW_ADOPT_AFTER", type=seconds_or_zero,
               default=_DEFAULT_POLICY.adopt_after_seconds, show_default=True,
               help="Seconds after which reconcile verifies an upload whose client never "
                    "called complete."),
    env_option("--max-deferrals", envvar="JOBFLOW_MAX_DEFERRALS", type=click.IntRange(min=0),
               default=_DEFAULT_POLICY.max_deferrals, show_default=True,
               help="Attempts a job may give back because the object store was unavailable "
                    "(or its handler raised RetryLater) before it fails."),
    env_option("--defer-backoff", envvar="JOBFLOW_DEFER_BACKOFF", type=seconds,
               default=_DEFAULT_POLICY.defer_seconds, show_default=True,
               help="Seconds a deferred job waits; doubled after each deferral."),
    env_option("--defer-backoff-max", envvar="JOBFLOW_DEFER_BACKOFF_MAX", type=seconds,
               default=_DEFAULT_POLICY.defer_max_seconds, show_default=True,
               help="Longest wait of a deferred job, in seconds."),
    env_option("--delete-rejected-uploads/--keep-rejected-uploads",
               envvar="JOBFLOW_DELETE_REJECTED_UPLOADS",
               default=_DEFAULT_POLICY.delete_rejected_uploads, show_default=True,
               help="Delete the object of a rejected or expired upload."),
]

_STORE_FIELDS = ("database_url", "objects_dir", "s3_bucket", "s3_endpoint_url", "s3_region",
                 "s3_prefix", "s3_upload_method")
_POLICY_FIELDS = ("content_types", "min_bytes", "max_bytes", "upload_ttl", "max_attempts",
                  "backoff", "backoff_max", "adopt_after", "delete_rejected_uploads",
                  "max_deferrals", "defer_backoff", "defer_backoff_max")


@attrs.frozen
class FlowOptions:
    """The store and policy options of a command, turned into a JobFlow on demand."""

    store: StoreSettings
    policy: UploadPolicy

    def open(self, *, create: bool = True, read_only: bool = False) -> JobFlow:
        """The JobFlow; with ``create=False`` (commands about jobs that must
        exist already) a missing SQLite file is an error, not a new database;
        with ``read_only`` (commands that only look) nothing is created or
        migrated, the objects folder included."""
        return open_flow(self.store, self.policy, create=create, read_only=read_only)


def _store_settings(values: dict[str, Any]) -> StoreSettings:
    statement = values.pop("db_statement_timeout")
    timeouts = DatabaseTimeouts(connect_seconds=values.pop("db_connect_timeout"),
                                statement_seconds=statement or None,
                                tcp_seconds=values.pop("db_tcp_timeout"))
    return StoreSettings(timeouts=timeouts,
                         **{name: values.pop(name) for name in _STORE_FIELDS if name in values})


def _policy(values: dict[str, Any]) -> UploadPolicy:
    given = {name: values.pop(name) for name in _POLICY_FIELDS}
    content_types = frozenset(t.strip().lower() for t in given["content_types"].split(",")
                              if t.strip())
    return UploadPolicy(
        allowed_content_types=content_types, min_bytes=given["min_bytes"],
        max_bytes=given["max_bytes"], upload_ttl_seconds=given["upload_ttl"],
        max_attempts=given["max_attempts"], backoff_seconds=given["backoff"],
        backoff_max_seconds=given["backoff_max"], adopt_after_seconds=given["adopt_after"],
        delete_rejected_uploads=given["delete_rejected_uploads"],
        max_deferrals=given["max_deferrals"], defer_seconds=given["defer_backoff"],
        defer_max_seconds=given["defer_backoff_max"])


def flow_options(command: Callable[..., int]) -> Callable[..., int]:
    """Add the database, object store and policy options; pass them as ``options``."""

    @functools.wraps(command)
    def with_options(**values: Any) -> int:
        options = FlowOptions(store=_store_settings(values), policy=_policy(values))
        return command(options=options, **values)

    return _apply([*DATABASE_OPTIONS, *OBJECT_STORE_OPTIONS, *POLICY_OPTIONS], with_options)


def store_options(command: Callable[..., int]) -> Callable[..., int]:
    """Add the database and object store location options only, for commands
    that look at jobs or only cancel them: the upload policy does not matter
    to them (its defaults apply). Pass them as ``options``."""

    @functools.wraps(command)
    def with_options(**values: Any) -> int:
        options = FlowOptions(store=_store_settings(values), policy=_DEFAULT_POLICY)
        return command(options=options, **values)

    return _apply([*DATABASE_OPTIONS, *OBJECT_STORE_LOCATION_OPTIONS], with_options)


def database_options(command: Callable[..., int]) -> Callable[..., int]:
    """Add the database option; pass it as ``settings``."""

    @functools.wraps(command)
    def with_options(**values: Any) -> int:
        return command(settings=_store_settings(values), **values)

    return _apply(DATABASE_OPTIONS, with_options)


json_option = env_option("--json", "as_json", envvar="JOBFLOW_JSON", is_flag=True,
                         help="Print JSON instead of text.")


def _print(text: str) -> None:
    click.echo(text)


# -- the command group --------------------------------------------------------------------


@click.group(epilog=EXIT_CODES_HELP,
             context_settings={"help_option_names": ["-h", "--help"],
                               "max_content_width": 100})
@click.version_option(package_name="jobflow", prog_name="jobflow")
@env_option("--debug", envvar="JOBFLOW_DEBUG", is_flag=True,
            help="Show the traceback of an error.")
@env_option("--log-level", envvar="JOBFLOW_LOG_LEVEL", type=click.Choice(LOG_LEVELS),
            help="Lowest level logged to stderr. Default: info (error for demo).")
@env_option("--log-format", envvar="JOBFLOW_LOG_FORMAT", type=click.Choice(LOG_FORMATS),
            default="auto", show_default=True,
            help="Log lines as JSON or for a terminal; auto: JSON unless stderr is a terminal.")
@env_option("--log-locals", envvar="JOBFLOW_LOG_LOCALS", is_flag=True,
            help="Include each frame's local variables in logged tracebacks (debugging only: "
                 "a local can hold a secret; secret-looking names are still redacted).")
@click.pass_context
def cli(ctx: click.Context, debug: bool, log_level: str | None, log_format: str,
        log_locals: bool) -> None:
    """Upload-first jobs: run workers and operate the queue.

    With no options jobflow uses embedded defaults in the working directory:
    a SQLite database (jobflow.sqlite3) and a folder of uploads
    (jobflow-objects/). Use --database-url for PostgreSQL and --s3-bucket for S3.
    """
    ctx.ensure_object(Invocation).debug = debug
    quiet_by_default = ctx.invoked_subcommand == "demo"
    configure_logging(level=log_level or ("error" if quiet_by_default else "info"),
                      log_format=cast(LogFormat, log_format), log_locals=log_locals)


# -- worker --------------------------------------------------------------------------------


def load_handler(spec: str) -> Callable[..., Any]:
    """``module:function`` -> the function. The working directory is importable,
    as with ``python -m``."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ConfigurationError(f"--handler must look like module:function, got {spec!r}")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"cannot import the handler module {module_name!r}: "
                                 f"{exc}") from exc
    target: Any = module
    for name in attribute.split("."):
        try:
            target = getattr(target, name)
        except AttributeError:
            raise ConfigurationError(
                f"module {module_name!r} has no attribute {attribute!r}") from None
    if not callable(target):
        raise ConfigurationError(f"handler {spec!r} is not callable")
    handler: Callable[..., Any] = target
    return handler


def run_until_signalled(worker: Any, *, until_idle: bool = False) -> None:
    """Run ``worker`` (until idle, if asked) in a thread, turning SIGTERM/SIGINT into
    a graceful stop and a second one into an immediate exit (the leases then
    expire and jobs are rescued).

    The worker does not run in the main thread because Python runs signal handlers
    there: the handler must never wait for a lock the interrupted code holds.
    """
    log = structlog.get_logger("jobflow.worker").bind(worker_id=worker.worker_id)
    received: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if received:
            log.warning("worker.forced_exit", signal=name)
            sys.stderr.flush()
            os._exit(128 + signum)
        received.append(signum)
        log.info("worker.signal", signal=name, grace=worker.shutdown_grace)
        worker.stop()

    failure: list[BaseException] = []

    def run() -> None:
        try:
            worker.run(until_idle=until_idle)
        except BaseException as exc:
            failure.append(exc)

    previous = {signum: signal.signal(signum, on_signal)
                for signum in (signal.SIGTERM, signal.SIGINT)}
    thread = threading.Thread(target=run, name="jobflow-worker")
    try:
        thread.start()
        while thread.is_alive():
            thread.join(0.5)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if failure:
        raise failure[0]


@cli.command()
@env_option("--handler", envvar="JOBFLOW_HANDLER", required=True, metavar="MODULE:FUNCTION",
            help="The function run for each job: handler(job, ctx), returning a JSON object.")
@env_option("--concurrency", "-c", envvar="JOBFLOW_CONCURRENCY",
            type=click.IntRange(1, MAX_CONCURRENCY),
            default=1, show_default=True,
            help="Jobs run at once (one reused handler thread each); claims and finishing "
                 "writes go in batches of up to this many jobs.")
@env_option("--lease-seconds", envvar="JOBFLOW_LEASE_SECONDS",
            type=Seconds(min=0, min_open=True, max=MAX_LEASE_SECONDS),
            default=_DEFAULT_POLICY.lease_seconds, show_default=True,
            help="How long a claim holds without a heartbeat; a dead worker's jobs are "
                 "rescued after it.")
@env_option("--heartbeat-interval", envvar="JOBFLOW_HEARTBEAT_INTERVAL", type=seconds,
            help="Seconds between lease renewals. Default: a third of the lease.")
@env_option("--poll-interval", envvar="JOBFLOW_POLL_INTERVAL", type=seconds, default=1.0,
            show_default=True, help="Seconds an idle worker waits before looking for jobs.")
@env_option("--listen/--no-listen", envvar="JOBFLOW_LISTEN", default=True, show_default=True,
            help="On PostgreSQL, wake up at once on NOTIFY when a job is queued.")
@env_option("--listen-poll-interval", envvar="JOBFLOW_LISTEN_POLL_INTERVAL", type=seconds,
            default=10.0, show_default=True,
            help="Poll interval while NOTIFY wake-ups work (only delayed retries need it).")
@env_option("--reconcile-interval", envvar="JOBFLOW_RECONCILE_INTERVAL", type=seconds,
            default=30.0, show_default=True,
            help="Seconds between reconcile passes (expire, adopt, rescue).")
@env_option("--shutdown-grace", envvar="JOBFLOW_SHUTDOWN_GRACE",
            type=seconds_or_zero, default=25.0, show_default=True,
            help="On SIGTERM/SIGINT, seconds running jobs get to finish before they are "
                 "handed back to the queue.")
@env_option("--job-timeout", envvar="JOBFLOW_JOB_TIMEOUT", type=seconds,
            help="Fail an attempt that runs longer than this (error code handler_timeout). "
                 "Default: no limit.")
@env_option("--flush-interval", envvar="JOBFLOW_FLUSH_INTERVAL", type=seconds, default=0.005,
            show_default=True,
            help="Seconds a finished job's outcome may wait to be written with others, and a "
                 "free slot to be claimed with others.")
@env_option("--storage-pause", envvar="JOBFLOW_STORAGE_PAUSE", type=seconds, default=1.0,
            show_default=True,
            help="Seconds claiming stops after a job met an unavailable object store; "
                 "doubled while the outage lasts.")
@env_option("--storage-pause-max", envvar="JOBFLOW_STORAGE_PAUSE_MAX", type=seconds,
            default=30.0, show_default=True,
            help="Longest pause of claiming during an object store outage, in seconds.")
@env_option("--worker-id", envvar="JOBFLOW_WORKER_ID",
            help="Name in job histories. Default: host:pid:random.")
@env_option("--burst", envvar="JOBFLOW_BURST", is_flag=True,
            help="Reconcile once, run the jobs that are due, and exit 0 when none is left.")
@env_option("--metrics-port", envvar="JOBFLOW_METRICS_PORT", type=click.IntRange(0, 65535),
            help="Serve this process's Prometheus metrics on this port (/metrics; 0: any "
                 "free port, logged). Default: not served.")
@env_option("--metrics-host", envvar="JOBFLOW_METRICS_HOST", default="0.0.0.0",
            show_default=True, help="The address the metrics are served on.")
@env_option("--health-file", envvar="JOBFLOW_HEALTH_FILE",
            type=click.Path(dir_okay=False, path_type=Path),
            help="Touch this file every second while the claim loop and the lease renewals "
                 "make progress (see `jobflow health`); removed when the worker stops.")
@flow_options
def worker(options: FlowOptions, handler: str, concurrency: int, lease_seconds: float,
           heartbeat_interval: float | None, poll_interval: float, listen: bool,
           listen_poll_interval: float, reconcile_interval: float, shutdown_grace: float,
           job_timeout: float | None, flush_interval: float, storage_pause: float,
           storage_pause_max: float, worker_id: str | None, burst: bool,
           metrics_port: int | None, metrics_host: str, health_file: Path | None) -> int:
    """Run a worker until SIGTERM or SIGINT (with --burst: until the queue is empty).

    The first signal stops claiming, lets running jobs finish within the grace
    period, hands the rest back to the queue (no attempt spent), writes every
    finished job's outcome and exits 0. A second signal exits at once.
    """
    from jobflow.wakeup import PollingWakeup, wakeup_for
    from jobflow.worker import Worker

    function = load_handler(handler)
    flow = options.open()
    running = Worker(
        flow, function, worker_id=worker_id, concurrency=concurrency,
        lease_seconds=lease_seconds, heartbeat_interval=heartbeat_interval,
        poll_interval=poll_interval, listen_poll_interval=listen_poll_interval,
        reconcile_interval=reconcile_interval, shutdown_grace=shutdown_grace,
        job_timeout=job_timeout, flush_interval=flush_interval, storage_pause=storage_pause,
        storage_pause_max=storage_pause_max,
        wakeup=wakeup_for(flow.store) if listen else PollingWakeup(), health_file=health_file)
    with process_metrics_served(metrics_host, metrics_port):
        run_until_signalled(running, until_idle=burst)
    return ExitCode.OK


@cli.command()
@env_option("--file", "path", envvar="JOBFLOW_HEALTH_FILE", required=True,
            type=click.Path(dir_okay=False, path_type=Path),
            help="The --health-file of the worker to check.")
@env_option("--max-age", envvar="JOBFLOW_HEALTH_MAX_AGE", type=seconds, default=60.0,
            show_default=True,
            help="Seconds since the file was last touched beyond which the worker is "
                 "unhealthy.")
def health(path: Path, max_age: float) -> int:
    """Exit 0 if a worker's health file is fresh, 7 with a message if it is stale
    or missing: a liveness probe for an orchestrator (an exec probe).

    The worker touches the file every second while its claim loop and its lease
    renewals make progress; it goes stale when either is stuck (a database that
    hangs) for longer than the worker's heartbeat interval. Only reads the
    file: no database is opened.
    """
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        click.echo(f"jobflow: unhealthy: no health file {path} (the worker is not running, "
                   "has not started yet, or has no --health-file)", err=True)
        return ExitCode.ALERT
    except OSError as exc:
        click.echo(f"jobflow: unhealthy: cannot read the health file {path}: {exc}", err=True)
        return ExitCode.ALERT
    if age > max_age:
        click.echo(f"jobflow: unhealthy: the health file {path} was last touched {age:.0f} s "
                   f"ago, more than --max-age {max_age:g} s: the worker's claim loop or its "
                   "lease renewals are stuck", err=True)
        return ExitCode.ALERT
    _print(f"healthy: {path} touched {age:.1f} s ago")
    return ExitCode.OK


# -- database ------------------------------------------------------------------------------


@cli.group()
def db() -> None:
    """jobflow's database schema (its migrations ship with the package)."""


def _engine(settings: StoreSettings, *, migrating: bool = False) -> Engine:
    """The engine of a ``db`` command; migrations may run long: no statement timeout."""
    timeouts = settings.timeouts
    if migrating:
        timeouts = attrs.evolve(timeouts, statement_seconds=None)
    return make_engine(settings.resolved_database_url(), timeouts)


@db.command()
@env_option("--revision", envvar="JOBFLOW_REVISION", default="head", show_default=True,
            help="Migrate up to this revision.")
@database_options
def upgrade(settings: StoreSettings, revision: str) -> int:
    """Create or update jobflow's tables."""
    engine = _engine(settings, migrating=True)
    migrate(engine, revision)
    _print(f"database at revision {schema_revision(engine) or 'none'}")
    return ExitCode.OK


@db.command()
@click.argument("revision")
@database_options
def downgrade(settings: StoreSettings, revision: str) -> int:
    """Revert jobflow's migrations down to REVISION ("base" drops jobflow's tables)."""
    engine = _engine(settings, migrating=True)
    migrate(engine, revision, down=True)
    _print(f"database at revision {schema_revision(engine) or 'none'}")
    return ExitCode.OK


@db.command()
@database_options
def current(settings: StoreSettings) -> int:
    """Print the revision the database is at, and whether it is the newest."""
    from jobflow import migrations

    engine = _engine(settings)
    newest = migrations.head()
    missing = missing_sqlite_file(engine)
    if missing is not None:  # connecting would create it
        _print(f"none (no jobflow database at {missing}; jobflow db upgrade creates it)")
        return ExitCode.OK
    found = schema_revision(engine)
    note = "(newest)" if found == newest else f"(newest is {newest}: run jobflow db upgrade)"
    _print(f"{found or 'none'} {note}")
    return ExitCode.OK


# -- operating jobs -----------------------------------------------------------------------


@cli.command()
@env_option("--stuck-after", envvar="JOBFLOW_STUCK_AFTER", type=seconds_or_zero,
            default=60.0, show_default=True,
            help="Minutes in awaiting_upload after which an upload counts as stuck.")
@env_option("--failed-window", envvar="JOBFLOW_FAILED_WINDOW", type=seconds, default=60.0,
            show_default=True, help="Count failures of the last this many minutes.")
@env_option("--max-stuck", envvar="JOBFLOW_MAX_STUCK", type=click.IntRange(min=0),
            help="Exit 7 when more uploads than this are stuck.")
@env_option("--max-failed", envvar="JOBFLOW_MAX_FAILED", type=click.IntRange(min=0),
            help="Exit 7 when more jobs than this failed within the window.")
@json_option
@store_options
def status(options: FlowOptions, stuck_after: float, failed_window: float,
           max_stuck: int | None, max_failed: int | None, as_json: bool) -> int:
    """Jobs per status, stuck uploads and recent failures; can drive an alert."""
    report = StatusReport.collect(options.open(read_only=True),
                                  stuck_after=timedelta(minutes=stuck_after),
                                  failure_window=timedelta(minutes=failed_window))
    alerts = report.alerts(max_stuck=max_stuck, max_failed=max_failed)
    if as_json:
        _print(dumps(report.as_json(alerts)))
    else:
        _print("\n".join(report.lines()))
    for alert in alerts:
        click.echo(f"jobflow: alert: {alert}", err=True)
    return ExitCode.ALERT if alerts else ExitCode.OK


@cli.command()
@env_option("--budget", envvar="JOBFLOW_RECONCILE_BUDGET",
            type=Seconds(min=0, max=MAX_RECONCILE_BUDGET), default=RECONCILE_BUDGET_SECONDS,
            show_default=True,
            help="Seconds the pass may spend checking waiting uploads in the object store "
                 "(rescuing expired leases comes first and needs none).")
@json_option
@flow_options
def reconcile(options: FlowOptions, budget: float, as_json: bool) -> int:
    """Rescue jobs of dead workers and settle waiting uploads, once.

    An upload is queued only when the object store shows a valid object for it;
    one past its deadline without a valid object fails as expired. An
    unavailable object store stops the upload checks (nothing is expired on
    its account): exit 5.
    """
    report = options.open(create=False).reconcile(budget_seconds=budget)
    if as_json:
        _print(dumps(attrs.asdict(report)))
    else:
        _print("\n".join(reconcile_lines(report)))
    return ExitCode.STORAGE_UNAVAILABLE if report.unavailable else ExitCode.OK


#: The shortest job id prefix the job commands resolve (the demo prints 8).
MIN_PREFIX = 4
#: How many ids an ambiguous prefix lists.
AMBIGUOUS_LISTED = 10


class AmbiguousJobId(InvalidInput):
    """A job id prefix matches more than one job."""


def _job_id_text(ctx: click.Context | None, param: click.Parameter | None,
                 value: str | None) -> str | None:
    """Check a JOB_ID argument's form: a full UUID, or a prefix of at least
    :data:`MIN_PREFIX` hex digits (hyphens allowed). Anything else is a usage
    error, before any database is opened."""
    if value is None:
        return None
    text = value.strip().lower()
    with contextlib.suppress(ValueError):
        return str(uuid.UUID(text))
    digits = text.replace("-", "")
    if not (MIN_PREFIX <= len(digits) < 32 and all(c in "0123456789abcdef" for c in digits)):
        shown = value if len(value) <= 64 else value[:61] + "..."
        raise click.BadParameter(
            f"{shown!r} is not a job id: expected a UUID or at least {MIN_PREFIX} of its "
            "leading hex digits", ctx=ctx, param=param)
    return digits


def job_id_argument(name: str = "job_id") -> Callable[[F], F]:
    return click.argument(name, metavar="JOB_ID", callback=_job_id_text)


def resolve_job_id(flow: JobFlow, given: str) -> str:
    """The full id of the one job whose id is, or starts with, ``given`` (checked
    by :func:`_job_id_text`); :class:`JobNotFound` if none,
    :class:`AmbiguousJobId` if several."""
    if len(given) == 36:  # a full id: the store looks it up
        return given
    engine = getattr(flow.store, "engine", None)
    if engine is None:
        raise ConfigurationError("job id prefixes need a SQL job store: give the full id")
    from jobflow.reporting import job_ids_starting_with

    found = job_ids_starting_with(engine, given, limit=AMBIGUOUS_LISTED + 1)
    if not found:
        raise JobNotFound(given, f"no job id starts with {given!r}")
    if len(found) > 1:
        listed = ", ".join(found[:AMBIGUOUS_LISTED])
        more = " and more" if len(found) > AMBIGUOUS_LISTED else ""
        raise AmbiguousJobId(f"job id prefix {given!r} is ambiguous: it matches {listed}"
                             f"{more}; give more digits")
    return found[0]


@cli.command()
@job_id_argument()
@json_option
@store_options
def show(options: FlowOptions, job_id: str, as_json: bool) -> int:
    """Print a job and its full history. JOB_ID may be a unique prefix of the id
    (at least 4 hex digits), as status and the demo print."""
    flow = options.open(read_only=True)
    job = flow.get(resolve_job_id(flow, job_id))
    history = flow.history(job.id)
    if as_json:
        _print(dumps({"job": job_as_json(job), "history": [event_as_json(e) for e in history]}))
    else:
        _print("\n".join([*job_lines(job), "", "history", *history_lines(history)]))
    return ExitCode.OK


def _print_job(job: Job, as_json: bool, before: str | None = None) -> None:
    if as_json:
        _print(dumps(job_as_json(job)))
    elif before is not None:
        _print(f"job {job.id}: {before} -> {job.status.value}")
    else:
        _print("\n".join(job_lines(job)))


class RequeueStopped(StorageUnavailable):
    """``jobflow requeue --error-code``: a store failed midway; the pass stopped."""


@cli.command()
@click.argument("job_id", metavar="[JOB_ID]", required=False, callback=_job_id_text)
@env_option("--error-code", envvar="JOBFLOW_REQUEUE_ERROR_CODE", metavar="CODE",
            help="Instead of one job: every failed job with this error code, oldest first.")
@env_option("--since", envvar="JOBFLOW_REQUEUE_SINCE", type=Duration(), metavar="DURATION",
            help="With --error-code: only jobs that failed at most this long ago "
                 "(seconds, or 15m, 2h, 7d). Default: whenever.")
@env_option("--batch-size", envvar="JOBFLOW_REQUEUE_BATCH_SIZE",
            type=click.IntRange(min=1, max=10_000), default=100, show_default=True,
            help="With --error-code: failed jobs read per page.")
@env_option("--limit", envvar="JOBFLOW_REQUEUE_LIMIT", type=click.IntRange(min=1),
            help="With --error-code: look at this many jobs at most. Default: all.")
@json_option
@flow_options
def requeue(options: FlowOptions, job_id: str | None, error_code: str | None,
            since: timedelta | None, batch_size: int, limit: int | None,
            as_json: bool) -> int:
    """Put a failed job back in the queue, after verifying its object again. JOB_ID
    may be a unique prefix of the id (at least 4 hex digits).

    With --error-code instead of JOB_ID: requeue every failed job of that cause,
    each verified again; a job whose object is missing or refused stays failed
    (exit 6). An outage midway stops the pass cleanly (exit 5): every job is
    either requeued or untouched, and running it again carries on.
    """
    if (job_id is None) == (error_code is None):
        raise click.UsageError("give either JOB_ID or --error-code")
    if error_code is None and (since is not None or limit is not None):
        raise click.UsageError("--since and --limit go with --error-code")
    flow = options.open(create=False)
    if error_code is not None:
        return _requeue_failed(flow, error_code, since, batch_size, limit, as_json)
    assert job_id is not None
    job_id = resolve_job_id(flow, job_id)
    before = flow.get(job_id).status.value
    _print_job(flow.requeue(job_id), as_json, before)
    return ExitCode.OK


def _requeue_failed(flow: JobFlow, error_code: str, since: timedelta | None,
                    batch_size: int, limit: int | None, as_json: bool) -> int:
    report = flow.requeue_failed(error_code, since=since, batch_size=batch_size, limit=limit)
    _print(dumps(attrs.asdict(report)) if as_json else "\n".join(requeue_lines(report)))
    if report.stopped is not None:
        raise RequeueStopped(f"stopped after requeuing {len(report.requeued)} jobs, a store "
                             f"is unavailable: {report.stopped}; run it again to carry on")
    return ExitCode.UPLOAD_PROBLEM if report.still_failing else ExitCode.OK


@cli.command()
@job_id_argument()
@json_option
@store_options
def cancel(options: FlowOptions, job_id: str, as_json: bool) -> int:
    """Fail a job that has not started (awaiting_upload or queued); ask a running
    one to stop (its worker ends it as cancelled at its next lease renewal).
    JOB_ID may be a unique prefix of the id (at least 4 hex digits)."""
    flow = options.open(create=False)
    job_id = resolve_job_id(flow, job_id)
    before = flow.get(job_id)
    job = flow.cancel(job_id)
    if as_json:
        _print(dumps(job_as_json(job)))
    elif job.status is JobStatus.QUICK_RUNNING:
        again = " already" if before.cancel_requested_at is not None else ""
        _print(f"job {job.id}: cancel{again} requested (quick_running; its worker "
               "stops it at its next lease renewal)")
    else:
        _print(f"job {job.id}: {before.status.value} -> {job.status.value} (cancelled)")
    return ExitCode.OK


@cli.command()
@env_option("--finished-before", envvar="JOBFLOW_PURGE_FINISHED_BEFORE", type=Duration(),
            metavar="DURATION", required=True,
            help="Delete the jobs that finished (done or failed) at least this long ago: "
                 "seconds, or 15m, 2h, 30d.")
@env_option("--batch-size", envvar="JOBFLOW_PURGE_BATCH_SIZE",
            type=click.IntRange(min=1, max=10_000), default=500, show_default=True,
            help="Jobs deleted per transaction.")
@env_option("--delete-objects/--keep-objects", envvar="JOBFLOW_PURGE_DELETE_OBJECTS",
            default=False, show_default=True,
            help="Also delete each purged job's object, once its row is gone.")
@env_option("--dry-run", envvar="JOBFLOW_PURGE_DRY_RUN", is_flag=True,
            help="Count what would be deleted; delete nothing.")
@json_option
@store_options
def purge(options: FlowOptions, finished_before: timedelta, batch_size: int,
          delete_objects: bool, dry_run: bool, as_json: bool) -> int:
    """Delete finished jobs and their history, in short batches; never a job that
    is not done or failed.

    With --delete-objects each job's object is deleted after its row: an object
    that cannot be deleted is listed and left for the bucket's lifecycle rules
    (exit 5), never a job left without its object.
    """
    flow = options.open(create=False)
    report = flow.purge(finished_before, batch_size=batch_size,
                        delete_objects=delete_objects, dry_run=dry_run)
    _print(dumps(attrs.asdict(report)) if as_json else "\n".join(purge_lines(report)))
    if report.objects_failed:
        click.echo(f"jobflow: warning: {len(report.objects_failed)} objects of purged jobs "
                   "could not be deleted", err=True)
        return ExitCode.STORAGE_UNAVAILABLE
    return ExitCode.OK


@cli.command()
@env_option("--status", "statuses", envvar="JOBFLOW_JOBS_STATUS", multiple=True,
            type=click.Choice([member.value for member in JobStatus]),
            help="Only jobs in this status (repeatable; the variable holds space-separated "
                 "statuses).")
@env_option("--owner", envvar="JOBFLOW_JOBS_OWNER", help="Only jobs of this owner id.")
@env_option("--error-code", envvar="JOBFLOW_JOBS_ERROR_CODE",
            help="Only jobs that failed with this error code (e.g. cancelled).")
@env_option("--older-than", envvar="JOBFLOW_JOBS_OLDER_THAN", type=Duration(),
            metavar="DURATION",
            help="Only jobs created at least this long ago: seconds, or 15m, 2h, 7d.")
@env_option("--newer-than", envvar="JOBFLOW_JOBS_NEWER_THAN", type=Duration(),
            metavar="DURATION",
            help="Only jobs created at most this long ago: seconds, or 15m, 2h, 7d.")
@env_option("--limit", envvar="JOBFLOW_JOBS_LIMIT", type=click.IntRange(min=1, max=10_000),
            default=50, show_default=True, help="Jobs listed at most.")
@env_option("--after", envvar="JOBFLOW_JOBS_AFTER", metavar="JOB_ID", callback=_job_id_text,
            help="The next page: the jobs created after this one (the last one listed; "
                 "a unique prefix is enough).")
@json_option
@store_options
def jobs(options: FlowOptions, statuses: Sequence[str], owner: str | None,
         error_code: str | None, older_than: timedelta | None, newer_than: timedelta | None,
         limit: int, after: str | None, as_json: bool) -> int:
    """List jobs, oldest first, with filters; --after pages through them.

    Only reads: nothing is created, claimed or changed.
    """
    flow = options.open(read_only=True)
    engine = getattr(flow.store, "engine", None)
    if engine is None:
        raise ConfigurationError("listing jobs needs a SQL job store")
    cursor = None
    if after is not None:
        previous = flow.get(resolve_job_id(flow, after))
        cursor = (previous.created_at, previous.id)
    now: datetime = flow.now()
    found = list_jobs(
        engine, statuses=[JobStatus(s) for s in statuses], owner=owner,
        error_code=error_code,
        created_before=now - older_than if older_than is not None else None,
        created_after=now - newer_than if newer_than is not None else None,
        after=cursor, limit=limit)
    if as_json:
        _print(dumps(job_list_as_json(found, limit)))
    else:
        _print("\n".join(job_list_lines(found, limit)))
    return ExitCode.OK


def _json_or_text(value: str) -> Any:
    """``value`` as JSON when it is valid JSON (NaN and Infinity aside), else the text."""

    def refuse(constant: str) -> Any:
        raise ValueError(constant)

    try:
        return json.loads(value, parse_constant=refuse)
    except ValueError:
        return value


def _params(pairs: Sequence[str], text_pairs: Sequence[str] = ()) -> dict[str, Any]:
    """``--param`` values parsed as JSON when they are JSON, ``--param-str`` values
    kept as text (they win over a ``--param`` of the same key)."""
    params: dict[str, Any] = {}
    for option, given, parse in (("--param", pairs, True), ("--param-str", text_pairs, False)):
        for pair in given:
            key, sep, value = pair.partition("=")
            if not sep or not key:
                raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}",
                                         param_hint=option)
            params[key] = _json_or_text(value) if parse else value
    return params


@cli.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@env_option("--content-type", envvar="JOBFLOW_UPLOAD_CONTENT_TYPE",
            help="Declared content type. Default: guessed from the file name.")
@env_option("--owner", envvar="JOBFLOW_OWNER", default="jobflow-cli", show_default=True,
            help="Owner id of the job.")
@env_option("--param", "params", envvar="JOBFLOW_PARAMS", multiple=True, metavar="KEY=VALUE",
            help="A job parameter, its value read as JSON when it is JSON (10 is a number, "
                 "true a boolean, [\"a\"] a list), else as text (repeatable; the variable "
                 "holds space-separated pairs).")
@env_option("--param-str", "text_params", envvar="JOBFLOW_PARAMS_STR", multiple=True,
            metavar="KEY=VALUE",
            help="A job parameter whose value is always text (repeatable; the variable holds "
                 "space-separated pairs).")
@env_option("--checksum/--no-checksum", envvar="JOBFLOW_UPLOAD_CHECKSUM", default=False,
            show_default=True,
            help="Declare the file's SHA-256, so the store refuses different bytes.")
@json_option
@flow_options
def upload(options: FlowOptions, file: Path, content_type: str | None, owner: str,
           params: Sequence[str], text_params: Sequence[str], checksum: bool,
           as_json: bool) -> int:
    """Upload FILE as a client would and print the resulting job.

    Creates a job, sends the file through its upload ticket (a real HTTP request
    for S3), then completes the upload: an end-to-end check of a deployment.
    """
    import hashlib

    from jobflow.upload_client import UploadRefused, send_file

    job_params = _params(params, text_params)
    declared = content_type or mimetypes.guess_type(file.name)[0] or "application/octet-stream"
    _check_upload(file, declared, options.policy)  # a refused upload leaves no trace
    sha256 = None
    if checksum:
        digest = hashlib.sha256()
        with file.open("rb") as stream:
            while chunk := stream.read(1024 * 1024):
                digest.update(chunk)
        sha256 = digest.hexdigest()
    flow = options.open()
    ticket = flow.initiate_upload(owner, job_params, content_type=declared, sha256=sha256)
    try:
        send_file(ticket, file)
    except UploadRefused as exc:
        # Leave no job waiting for an upload that will never come.
        with contextlib.suppress(JobflowError):
            flow.cancel(ticket.job_id)
        if "NoSuchBucket" in exc.reason:  # configuration, not the file's fault
            raise ConfigurationError(f"the bucket {options.store.s3_bucket!r} does not "
                                     f"exist ({exc.reason}); the job was cancelled") from exc
        raise
    _print_job(flow.complete_upload(ticket.job_id), as_json)
    return ExitCode.OK


class FileRefused(UploadError):
    """``jobflow upload``: the upload policy refuses the file, so no job is created."""

    def __init__(self, file: Path, reason: str) -> None:
        super().__init__("", f"{file}: {reason}; no job was created")


def _check_upload(file: Path, content_type: str, policy: UploadPolicy) -> None:
    """Refuse, before anything is created, a file the policy would refuse."""
    if media_type(content_type) not in policy.allowed_content_types:
        raise ContentTypeNotAllowed(content_type, policy.allowed_content_types)
    size = file.stat().st_size
    if size == 0 and policy.min_bytes > 0:
        raise FileRefused(file, "the file is empty")
    if not policy.min_bytes <= size <= policy.max_bytes:
        raise FileRefused(file, f"the file is {size} bytes; the upload policy allows "
                                f"{policy.min_bytes} to {policy.max_bytes}")


@cli.command()
def diagram() -> int:
    """Print the job state machine as a Mermaid diagram, derived from the code."""
    click.echo(states.mermaid(), nl=False)
    return ExitCode.OK


@cli.command()
@env_option("--dir", "directory", envvar="JOBFLOW_DEMO_DIR",
            type=click.Path(file_okay=False, path_type=Path),
            help="Folder to run in. Default: a new temporary folder.")
def demo(directory: Path | None) -> int:
    """Show jobflow at work in seconds, with no server: uploads that succeed, one
    never uploaded, one rejected, one forgotten, a worker and reconcile."""
    from jobflow.demo import run_demo

    run_demo(directory, sys.stdout)
    return ExitCode.OK


# -- monitoring ----------------------------------------------------------------------------


@contextlib.contextmanager
def process_metrics_served(host: str, port: int | None) -> Iterator[None]:
    """Serve the process's Prometheus metrics on ``host:port`` while inside
    (nothing when ``port`` is None)."""
    if port is None:
        yield
        return
    import prometheus_client

    from jobflow.metrics import serve

    server = _listening(lambda: serve(prometheus_client.REGISTRY, host=host, port=port),
                        "metrics", host, port)
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


def _listening(start: Callable[[], Any], what: str, host: str, port: int) -> Any:
    """Start a server (``start()``); a port in use is a configuration error.
    Logs where it listens."""
    try:
        server = start()
    except OSError as exc:
        raise ConfigurationError(f"cannot serve the {what} on {host}:{port}: "
                                 f"{exc.strerror or exc}") from exc
    structlog.get_logger(f"jobflow.{what}").info(f"{what}.listening", host=host,
                                                 port=server.server_port)
    return server


def wait_for_signal() -> str:
    """Block until SIGTERM or SIGINT arrives; its name."""
    received: list[int] = []
    arrived = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        arrived.set()

    previous = {signum: signal.signal(signum, on_signal)
                for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not arrived.wait(0.5):
            pass
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return signal.Signals(received[0]).name


def _monitoring_flow(options: FlowOptions) -> JobFlow:
    """A flow that only reads, for an exporter: when the database does not answer
    at start, the exporter starts anyway and reports ``jobflow_up 0`` until it
    does (a bad URL or a missing SQLite file still stop it)."""
    try:
        return options.open(read_only=True)
    except StorageUnavailable as exc:
        from jobflow.adapters.sqlalchemy import SqlAlchemyJobStore
        from jobflow.config import open_object_store

        structlog.get_logger("jobflow.metrics").warning("metrics.database_unavailable",
                                                        error=str(exc))
        engine = make_engine(options.store.resolved_database_url())
        return JobFlow(store=SqlAlchemyJobStore(engine), policy=options.policy,
                       objects=open_object_store(options.store, create=False))


@cli.command()
@env_option("--port", envvar="JOBFLOW_METRICS_PORT", type=click.IntRange(0, 65535),
            default=9640, show_default=True,
            help="Serve the database gauges on this port (/metrics; 0: any free port, logged).")
@env_option("--host", envvar="JOBFLOW_METRICS_HOST", default="0.0.0.0", show_default=True,
            help="The address to listen on.")
@env_option("--cache-seconds", envvar="JOBFLOW_METRICS_CACHE_SECONDS", type=seconds_or_zero,
            default=5.0, show_default=True,
            help="Scrapes within this many seconds share one database query.")
@env_option("--query-timeout", envvar="JOBFLOW_METRICS_QUERY_TIMEOUT", type=seconds,
            default=2.0, show_default=True,
            help="A scrape waits this long for the database, then answers jobflow_up 0.")
@store_options
def metrics(options: FlowOptions, port: int, host: str, cache_seconds: float,
            query_timeout: float) -> int:
    """Serve the database's gauges to Prometheus until SIGTERM or SIGINT.

    Jobs by status, the oldest waiting upload and queued job, uploads past
    their deadline, expired leases, failures of the last hour by error code,
    and jobflow_up (0 while the database does not answer). One query per
    scrape, cached: run one per deployment. Workers serve their own process
    metrics (jobflow worker --metrics-port). Only reads.
    """
    from jobflow.metrics import metrics_registry, serve

    registry = metrics_registry(_monitoring_flow(options), registry=None,
                                cache_seconds=cache_seconds, timeout_seconds=query_timeout)
    server = _listening(lambda: serve(registry, host=host, port=port), "metrics", host, port)
    try:
        wait_for_signal()
    finally:
        server.shutdown()
        server.server_close()
    return ExitCode.OK


@cli.command()
@env_option("--host", envvar="JOBFLOW_DASHBOARD_HOST", default="127.0.0.1", show_default=True,
            help="The address to listen on; any but a loopback one needs --token.")
@env_option("--port", envvar="JOBFLOW_DASHBOARD_PORT", type=click.IntRange(0, 65535),
            default=8080, show_default=True, help="The port to listen on (0: any free port).")
@env_option("--token", envvar="JOBFLOW_DASHBOARD_TOKEN",
            help="Require this token on every request: the password of the browser's "
                 "login prompt (any user name), or an Authorization: Bearer header.")
@env_option("--failure-window", envvar="JOBFLOW_DASHBOARD_FAILURE_WINDOW", type=Duration(),
            default="24h", show_default=True, metavar="DURATION",
            help="How far back the front page groups failures: seconds, or 15m, 2h, 7d.")
@store_options
def dashboard(options: FlowOptions, host: str, port: int, token: str | None,
              failure_window: timedelta) -> int:
    """Serve a read-only web dashboard of the jobs until SIGTERM or SIGINT.

    Jobs by state on the state diagram, uploads waiting, the queue's age,
    recent failures by error code, each job with its history; find a job by
    its id or a unique prefix. It never changes a job.
    """
    from jobflow.dashboard import Dashboard, check_address, serve

    check_address(host, protected=bool(token))  # before anything is opened
    app = Dashboard(options.open(read_only=True), token=token or None,
                    failure_window=failure_window or timedelta(hours=24))
    server = _listening(lambda: serve(app, host=host, port=port), "dashboard", host, port)
    shown = f"[{host}]" if ":" in host else host
    _print(f"jobflow dashboard on http://{shown}:{server.server_port}/ (read-only; "
           "Ctrl-C stops it)")
    try:
        wait_for_signal()
    finally:
        server.shutdown()
        server.server_close()
    return ExitCode.OK


# -- entry point -----------------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return redact(text)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """The console script: run the command, turn errors into one line and an exit code."""
    invocation = Invocation(debug=os.environ.get("JOBFLOW_DEBUG", "").lower()
                            in ("1", "true", "yes", "on"))
    code: int
    try:
        result = cli.main(args=list(argv) if argv is not None else None, prog_name="jobflow",
                          standalone_mode=False, obj=invocation)
        code = result if isinstance(result, int) else ExitCode.OK
    except click.ClickException as exc:
        exc.show()
        code = ExitCode.CONFIGURATION if exc.exit_code == 2 else exc.exit_code
    except click.exceptions.Abort:
        click.echo("jobflow: aborted", err=True)
        code = 130
    except KeyboardInterrupt:
        code = 130
    except JobflowError as exc:
        if invocation.debug:
            traceback.print_exc()
        click.echo(f"jobflow: error: {_one_line(exc)}", err=True)
        code = exit_code_for(exc)
    except Exception as exc:
        if invocation.debug:
            traceback.print_exc()
        click.echo(f"jobflow: internal error: {type(exc).__name__}: {_one_line(exc)} "
                   "(rerun with --debug for the traceback)", err=True)
        code = ExitCode.INTERNAL_ERROR
    sys.stdout.flush()
    sys.exit(int(code))
