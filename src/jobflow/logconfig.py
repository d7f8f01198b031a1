"""Logging: the ``jobflow`` command's structlog set-up, the library's loggers,
and the redaction every log line passes through.

The library never configures logging. Its loggers come from
:func:`library_logger`: they log through structlog when the host (or the
``jobflow`` command, via :func:`configure_logging`) configured structlog, and
otherwise through the standard library's :mod:`logging`, so a host that set up
nothing sees only warnings and errors (on stderr, through logging's last
resort) and never a line on stdout.

The command's log lines go to stderr, so its output on stdout stays
machine-readable: JSON when stderr is not a terminal, aligned key=value lines
when it is. Before rendering, every value (tracebacks included) passes through
:func:`redact`, so a presigned URL's signature, an AWS key, a credential or a
database password never reaches a log. Tracebacks carry no local variables
unless asked for (``log_locals``): a local may hold a secret of any shape.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import traceback
from collections.abc import MutableMapping
from typing import Any, Literal, TextIO, cast

import structlog
from structlog.tracebacks import ExceptionDictTransformer
from structlog.typing import (
    EventDict,
    ExceptionTransformer,
    ExcInfo,
    FilteringBoundLogger,
    Processor,
)

LogFormat = Literal["auto", "json", "console"]
LOG_FORMATS: tuple[LogFormat, ...] = ("auto", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")

REDACTED = "<redacted>"

# Query parameters and form fields of presigned S3 URLs that carry secrets, also
# when the URL is itself URL-encoded (``%3D`` for ``=``, ``%26`` for ``&``).
_SECRET_PARAMETER = re.compile(
    r"(?i)\b(X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|Signature|"
    r"AWSAccessKeyId|policy)(=|%3D)((?:(?!%26)[^&\s'\"<>])+)")
# Secret assignments in text: ``aws_secret_access_key = ...``,
# ``"SecretAccessKey": "..."``, ``AWS_SESSION_TOKEN=...``.
_SECRET_ASSIGNMENT = re.compile(
    r"(?i)\b((?:aws_?)?secret_?(?:access_?)?key|(?:aws_?)?session_?token)"
    r"(['\"]?\s*[:=]\s*['\"]?)([^\s'\"&,;)}\]]+)")
# AWS access key ids: long-term (AKIA) and temporary (ASIA).
_AWS_ACCESS_KEY_ID = re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Z0-9])")
# user:password@ in URLs (database URLs, endpoints with credentials); the user
# may be empty (redis://:password@host).
_URL_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^:/@\s'\"]*):([^\s'\"/?#]*)@")
# Names (dictionary keys, event fields, local variables) whose value is a secret.
_SECRET_KEYS = re.compile(r"(?i)(password|passwd|secret|signature|credential|authorization|"
                          r"security.?token|session.?token|access.?token|refresh.?token|"
                          r"auth.?token|access.?key|api.?key|private.?key|policy)")
# A local variable in a traceback formatted with its locals: ``    name = value``.
_LOCAL_LINE = re.compile(r"(?m)^(\s+)(\w+)( = )(.*)$")
# Values rendered as they are; anything else may show a secret in its repr.
_PLAIN = (int, float, bool, type(None))


def redact(text: str) -> str:
    """``text`` with signatures, AWS keys, credentials and URL passwords replaced."""
    text = _SECRET_PARAMETER.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)
    text = _SECRET_ASSIGNMENT.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)
    text = _AWS_ACCESS_KEY_ID.sub(REDACTED, text)
    return _URL_PASSWORD.sub(lambda m: f"{m.group(1)}:{REDACTED}@", text)


def _redacted(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, dict):
        return {k: REDACTED if isinstance(k, str) and _SECRET_KEYS.search(k) else _redacted(v)
                for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_redacted(v) for v in value]
    # An object is rendered by its repr; replace it only when that shows a secret.
    shown = repr(value)
    hidden = redact(shown)
    return value if hidden == shown else hidden


def redact_secrets(logger: Any, method_name: str,
                   event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A structlog processor applying :func:`redact` to every value, nested ones
    and rendered tracebacks included, and hiding values under secret names."""
    for key, value in list(event_dict.items()):
        if _SECRET_KEYS.search(key):
            event_dict[key] = REDACTED
        else:
            event_dict[key] = _redacted(value)
    return event_dict


def _hide_secret_locals(text: str) -> str:
    return _LOCAL_LINE.sub(
        lambda m: m.group(0) if not _SECRET_KEYS.search(m.group(2))
        else f"{m.group(1)}{m.group(2)}{m.group(3)}{REDACTED}", text)


def text_traceback(show_locals: bool = False) -> ExceptionTransformer:
    """An exception formatter for :class:`structlog.processors.ExceptionRenderer`:
    the standard traceback text, with each frame's locals only if asked for."""
    def format_exception(exc_info: ExcInfo) -> str:
        text = "".join(traceback.TracebackException(
            *exc_info, capture_locals=show_locals).format()).rstrip("\n")
        return _hide_secret_locals(text) if show_locals else text
    return format_exception


def exception_processor(*, as_json: bool, show_locals: bool = False) -> Processor:
    """Turns ``exc_info`` into an ``exception`` value before redaction: a list of
    dicts for JSON, the traceback's text for the console; locals only on request."""
    if as_json:
        return structlog.processors.ExceptionRenderer(
            ExceptionDictTransformer(show_locals=show_locals))
    return structlog.processors.ExceptionRenderer(text_traceback(show_locals))


def wants_json(log_format: LogFormat, stream: TextIO) -> bool:
    if log_format == "auto":
        return not stream.isatty()
    return log_format == "json"


def configure_logging(*, level: str = "info", log_format: LogFormat = "auto",
                      stream: TextIO | None = None, log_locals: bool = False) -> None:
    """Route structlog (and the standard library's warnings) to ``stream``.

    ``log_locals`` adds each frame's local variables to logged tracebacks, for
    debugging only: values under secret-looking names and known secret shapes
    are still redacted, but a local can hold a secret of any shape.
    """
    stream = stream or sys.stderr
    level_number = logging.getLevelNamesMapping()[level.upper()]
    as_json = wants_json(log_format, stream)
    # Tracebacks are formatted (and then redacted) before the renderer sees
    # them, so the console renderer's own formatter (rich or better-exceptions
    # when installed, both showing locals) is never used.
    renderer: Processor = (
        structlog.processors.JSONRenderer() if as_json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty(),
                                           exception_formatter=structlog.dev.plain_traceback))
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        exception_processor(as_json=as_json, show_locals=log_locals),
    ]
    structlog.configure(
        processors=[*shared, redact_secrets, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level_number),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )
    # Libraries that log through the standard library (alembic, botocore):
    # their warnings only, in the same format. Alembic's INFO lines are noise
    # for every command, and botocore's debug output would carry signed requests.
    handler = logging.StreamHandler(stream)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    redact_secrets, renderer]))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.WARNING)


# -- the library's loggers ---------------------------------------------------------------


def _stdlib_value(value: Any) -> str:
    if isinstance(value, str) and value and not set(value) & {" ", "\t", "=", "\n", '"', "'"}:
        return value
    return repr(value)


def render_to_stdlib_message(logger: Any, method_name: str,
                             event_dict: EventDict) -> tuple[tuple[str], dict[str, Any]]:
    """The last processor of a library logger on the standard library: the event,
    its key=value pairs and any traceback as one message for ``logging``."""
    event = event_dict.pop("event", "")
    exception = event_dict.pop("exception", None)
    pairs = " ".join(f"{key}={_stdlib_value(value)}" for key, value in event_dict.items())
    message = f"{event} {pairs}" if pairs else str(event)
    if exception:
        message = f"{message}\n{exception}"
    return (message,), {"stacklevel": _caller_level()}


_OWN_FILES = (os.path.dirname(structlog.__file__), __file__)


def _caller_level() -> int:
    """The ``stacklevel`` that makes a record show where the library logged
    (module, function, line), not structlog's or this module's frames. The
    frame that calls the standard library's logger is two above this
    processor's caller."""
    frame = sys._getframe(3)
    level = 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_OWN_FILES):
        frame = frame.f_back
        level += 1
    return level


_STDLIB_PROCESSORS: list[Processor] = [
    structlog.stdlib.filter_by_level,  # first: nothing is formatted for a dropped line
    structlog.contextvars.merge_contextvars,
    exception_processor(as_json=False),
    redact_secrets,
    render_to_stdlib_message,
]


class LibraryLogger:
    """A lazy logger for the library, shaped like structlog's bound loggers.

    Each call looks whether structlog is configured (by the host, by the
    ``jobflow`` command, or by :func:`structlog.testing.capture_logs`) and then
    logs through structlog's configuration; otherwise through the standard
    library's ``logging.getLogger(name)``, whose levels and handlers the host
    controls. Nothing is resolved when the logger is made.
    """

    __slots__ = ("_context", "_name", "_stdlib", "_structlog")

    def __init__(self, name: str, context: dict[str, Any] | None = None) -> None:
        self._name = name
        self._context: dict[str, Any] = context or {}
        self._structlog: Any = None
        self._stdlib: Any = None

    def __repr__(self) -> str:
        return f"<LibraryLogger {self._name!r} context={self._context!r}>"

    def _target(self) -> Any:
        if structlog.is_configured():
            if self._structlog is None:
                self._structlog = structlog.get_logger(self._name, **self._context)
            return self._structlog
        if self._stdlib is None:
            self._stdlib = structlog.stdlib.BoundLogger(
                logging.getLogger(self._name), _STDLIB_PROCESSORS, dict(self._context))
        return self._stdlib

    # -- context

    def bind(self, **new_values: Any) -> LibraryLogger:
        return LibraryLogger(self._name, {**self._context, **new_values})

    def new(self, **new_values: Any) -> LibraryLogger:
        return LibraryLogger(self._name, dict(new_values))

    def unbind(self, *keys: str) -> LibraryLogger:
        missing = [key for key in keys if key not in self._context]
        if missing:
            raise KeyError(missing[0])
        return self.try_unbind(*keys)

    def try_unbind(self, *keys: str) -> LibraryLogger:
        return LibraryLogger(self._name, {k: v for k, v in self._context.items()
                                          if k not in keys})

    def is_enabled_for(self, level: int) -> bool:
        enabled = getattr(self._target(), "is_enabled_for", None)
        return True if enabled is None else bool(enabled(level))

    # -- logging

    def debug(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        return self._target().debug(event, *args, **kw)

    def info(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        return self._target().info(event, *args, **kw)

    def warning(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        return self._target().warning(event, *args, **kw)

    warn = warning

    def error(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        return self._target().error(event, *args, **kw)

    def critical(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        return self._target().critical(event, *args, **kw)

    def exception(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        # As error(): the standard library's Logger.exception would add the
        # traceback again, unredacted.
        kw.setdefault("exc_info", True)
        return self._target().error(event, *args, **kw)

    def log(self, level: int, event: str | None = None, *args: Any, **kw: Any) -> Any:
        return self._target().log(level, event, *args, **kw)

    def __getattr__(self, name: str) -> Any:
        # The rest of the bound logger's methods (msg, fatal, the async ones).
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self._target(), name)


def library_logger(name: str) -> FilteringBoundLogger:
    """The logger the library logs ``name``'s events with (see :class:`LibraryLogger`)."""
    return cast(FilteringBoundLogger, LibraryLogger(name))
