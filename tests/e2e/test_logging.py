"""The ``jobflow`` command's logs: JSON off a terminal, and never a secret."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from jobflow.logconfig import configure_logging, redact
from tests.e2e import secret_handlers
from tests.e2e.conftest import Deployment

PRESIGNED = ("https://uploads.s3.amazonaws.com/uploads/6d1c?X-Amz-Algorithm=AWS4-HMAC-SHA256"
             "&X-Amz-Credential=AKIAEXAMPLE%2F20300101%2Fus-east-1%2Fs3%2Faws4_request"
             "&X-Amz-Date=20300101T000000Z&X-Amz-Expires=900&X-Amz-SignedHeaders=host"
             "&X-Amz-Signature=0123456789abcdef0123456789abcdef")


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """The command's logging set up on a string buffer, and undone afterwards."""
    stream = io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    configure_logging(level="info", log_format="auto", stream=stream)
    try:
        yield stream
    finally:
        structlog.reset_defaults()
        root.handlers, root.level = handlers, level


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_logs_off_a_terminal_are_json_lines_without_secrets(log_stream: io.StringIO) -> None:
    log = structlog.get_logger("jobflow.test").bind(worker_id="w-1")
    log.info("upload.ticket", url=PRESIGNED, detail={"password": "hunter2", "size": 3},
             database="postgresql://app:hunter2@db.internal/jobs")
    logging.getLogger("botocore.test").warning("retrying %s", PRESIGNED)

    entry, stdlib_entry = lines(log_stream)
    text = log_stream.getvalue()
    for secret in ("0123456789abcdef0123456789abcdef", "AKIAEXAMPLE", "hunter2"):
        assert secret not in text
    assert entry["event"] == "upload.ticket" and entry["worker_id"] == "w-1"
    assert entry["level"] == "info" and "timestamp" in entry
    assert entry["detail"] == {"password": "<redacted>", "size": 3}
    assert str(entry["url"]).startswith("https://uploads.s3.amazonaws.com/uploads/6d1c?")
    assert stdlib_entry["level"] == "warning"


def test_redact_keeps_what_is_safe_to_read() -> None:
    assert redact("no secrets here: job 6d1c queued") == "no secrets here: job 6d1c queued"
    assert redact("postgresql://app:pw@host/db") == "postgresql://app:<redacted>@host/db"
    assert "X-Amz-Signature=<redacted>" in redact(PRESIGNED)


def test_a_failing_handler_is_logged_with_its_traceback_but_without_its_secrets(
        sqlite_deployment: Deployment) -> None:
    job_id = sqlite_deployment.queue_job()
    run = sqlite_deployment.cli("worker", "--handler", "tests.e2e.secret_handlers:charge",
                                "--burst")
    assert run.returncode == 0, run.stderr

    entries = [json.loads(line) for line in run.stderr.splitlines()]
    [failure] = [e for e in entries if e["event"] == "handler.finished"
                 and e.get("job_id") == job_id]
    assert failure["level"] == "warning" and failure["outcome"] == "error"
    [exception] = failure["exception"]
    assert exception["exc_type"] == "RuntimeError"
    assert "charge" in [frame["name"] for frame in exception["frames"]]
    # No frame carries its local variables unless the command is asked to.
    assert all("locals" not in frame for frame in exception["frames"])
    assert "X-Amz-Signature=<redacted>" in exception["exc_value"]
    assert "postgresql://billing:<redacted>@db.internal/billing" in exception["exc_value"]
    for secret in (secret_handlers.API_KEY, secret_handlers.SIGNATURE,
                   secret_handlers.ACCESS_KEY_ID, secret_handlers.DB_PASSWORD):
        assert secret not in run.stderr
        assert secret not in run.stdout
