"""structlog set-up for the ``jobflow`` command. The library itself never calls this.

Log lines go to stderr, so a command's output on stdout stays machine-readable:
JSON when stderr is not a terminal, aligned key=value lines when it is. Before
rendering, every value passes through :func:`redact`, so a presigned URL's
signature, a credential or a database password never reaches a log.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, Literal, TextIO

import structlog

LogFormat = Literal["auto", "json", "console"]
LOG_FORMATS: tuple[LogFormat, ...] = ("auto", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")

REDACTED = "<redacted>"

# Query parameters and form fields of presigned S3 URLs that carry secrets.
_SECRET_PARAMETER = re.compile(
    r"(?i)\b(X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|Signature|"
    r"AWSAccessKeyId|x-amz-signature|policy)=([^&\s'\"]+)")
# user:password@ in URLs (database URLs, endpoints with credentials).
_URL_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^:/@\s]+):([^@/\s]+)@")
_SECRET_KEYS = re.compile(r"(?i)(password|secret|signature|credential|authorization|"
                          r"security.?token|access.?key|policy)")


def redact(text: str) -> str:
    """``text`` with signatures, credentials and URL passwords replaced."""
    text = _SECRET_PARAMETER.sub(lambda m: f"{m.group(1)}={REDACTED}", text)
    return _URL_PASSWORD.sub(lambda m: f"{m.group(1)}:{REDACTED}@", text)


def _redacted(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: REDACTED if isinstance(k, str) and _SECRET_KEYS.search(k) else _redacted(v)
                for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redacted(v) for v in value]
    return value


def redact_secrets(logger: Any, method_name: str,
                   event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A structlog processor applying :func:`redact` to every value."""
    for key, value in list(event_dict.items()):
        if _SECRET_KEYS.search(key):
            event_dict[key] = REDACTED
        else:
            event_dict[key] = _redacted(value)
    return event_dict


def wants_json(log_format: LogFormat, stream: TextIO) -> bool:
    if log_format == "auto":
        return not stream.isatty()
    return log_format == "json"


def configure_logging(*, level: str = "info", log_format: LogFormat = "auto",
                      stream: TextIO | None = None) -> None:
    """Route structlog (and the standard library's warnings) to ``stream``."""
    stream = stream or sys.stderr
    level_number = logging.getLevelNamesMapping()[level.upper()]
    as_json = wants_json(log_format, stream)
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if as_json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty()))
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if as_json:
        shared.append(structlog.processors.dict_tracebacks)
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
