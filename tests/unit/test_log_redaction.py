"""Log lines carry no secrets, and the library logs through the host's set-up."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from jobflow.logconfig import (
    REDACTED,
    LogFormat,
    configure_logging,
    library_logger,
    redact,
    redact_secrets,
)

SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


# -- redact: each known shape ----------------------------------------------------------


@pytest.mark.parametrize("key_id", ["AKIAIOSFODNN7EXAMPLE", "ASIAY34FZKBOKMUTVV7A"])
def test_aws_access_key_ids_are_redacted(key_id: str) -> None:
    assert redact(f"using {key_id} for s3") == f"using {REDACTED} for s3"
    assert redact(f"key={key_id},") == f"key={REDACTED},"


def test_strings_that_only_look_like_key_ids_stay() -> None:
    for text in ("AKIAshort", "XAKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPLEX",
                 "akiaiosfodnn7example"):
        assert redact(text) == text


@pytest.mark.parametrize("text", [
    f"aws_secret_access_key={SECRET_KEY}",
    f"AWS_SECRET_ACCESS_KEY = {SECRET_KEY}",
    f'{{"SecretAccessKey": "{SECRET_KEY}", "Expiration": "2030-01-01"}}',
    f"{{'aws_secret_access_key': '{SECRET_KEY}'}}",
    f"credentials(secret_key={SECRET_KEY})",
    f'"SessionToken": "{SECRET_KEY}"',
    f"aws_session_token={SECRET_KEY}",
])
def test_aws_secret_keys_and_session_tokens_are_redacted(text: str) -> None:
    redacted = redact(text)
    assert SECRET_KEY not in redacted
    assert REDACTED in redacted


def test_what_follows_a_secret_assignment_stays() -> None:
    assert (redact(f'{{"SecretAccessKey": "{SECRET_KEY}", "Expiration": "2030-01-01"}}')
            == f'{{"SecretAccessKey": "{REDACTED}", "Expiration": "2030-01-01"}}')


@pytest.mark.parametrize("parameter", ["X-Amz-Signature", "X-Amz-Credential",
                                       "X-Amz-Security-Token", "Signature", "AWSAccessKeyId",
                                       "x-amz-signature"])
def test_presigned_query_parameters_are_redacted(parameter: str) -> None:
    url = f"https://b.s3.amazonaws.com/k?Expires=1893456000&{parameter}=s3cr3t%2Bv4lue&x=1"
    assert redact(url) == (f"https://b.s3.amazonaws.com/k?Expires=1893456000"
                           f"&{parameter}={REDACTED}&x=1")


def test_a_presigned_url_inside_an_encoded_url_is_redacted() -> None:
    redirect = ("https://app.example/next?to=https%3A%2F%2Fb.s3.amazonaws.com%2Fk"
                "%3FX-Amz-Signature%3Ddeadbeef%26X-Amz-Date%3D20300101T000000Z")
    redacted = redact(redirect)
    assert "deadbeef" not in redacted
    assert redacted.endswith(f"X-Amz-Signature%3D{REDACTED}%26X-Amz-Date%3D20300101T000000Z")


@pytest.mark.parametrize(("url", "expected"), [
    ("postgresql://app:hunter2@db/jobs", f"postgresql://app:{REDACTED}@db/jobs"),
    ("postgresql+psycopg://app:hunter2@db:5432/jobs",
     f"postgresql+psycopg://app:{REDACTED}@db:5432/jobs"),
    ("redis://:hunter2@cache:6379/0", f"redis://:{REDACTED}@cache:6379/0"),
    ("amqp://app:hun@ter2@mq/vhost", f"amqp://app:{REDACTED}@mq/vhost"),
    ("connect to 'postgresql://app:hunter2@db/jobs' failed",
     f"connect to 'postgresql://app:{REDACTED}@db/jobs' failed"),
])
def test_url_passwords_are_redacted(url: str, expected: str) -> None:
    assert redact(url) == expected


@pytest.mark.parametrize("text", [
    "no secrets here: job 6d1c queued",
    "http://localhost:9000/bucket?X-Amz-Date=20300101T000000Z&X-Amz-Expires=900",
    "https://user@host/path",
    "http://minio:9000/uploads",
    "mailto user@example.com at 12:30",
])
def test_safe_text_stays_as_it_is(text: str) -> None:
    assert redact(text) == text


# -- redact_secrets: wherever a value is ---------------------------------------------------


class Endpoint:
    def __init__(self, url: str) -> None:
        self.url = url

    def __repr__(self) -> str:
        return f"Endpoint({self.url!r})"


def test_every_value_of_an_event_is_redacted_nested_ones_included() -> None:
    event = redact_secrets(None, "info", {
        "event": "connect postgresql://app:hunter2@db/jobs",
        "api_key": "sk_live_abc",
        "nested": {"urls": ["https://b/k?Signature=abc", ("AKIAIOSFODNN7EXAMPLE", 3)],
                   "Authorization": "Bearer abc", "size": 3},
        "endpoint": Endpoint("s3://AKIAIOSFODNN7EXAMPLE@bucket"),
        "plain": Endpoint("s3://bucket"),
        "count": 7, "ratio": 0.5, "flag": True, "missing": None,
    })
    assert event["event"] == f"connect postgresql://app:{REDACTED}@db/jobs"
    assert event["api_key"] == REDACTED
    assert event["nested"] == {"urls": [f"https://b/k?Signature={REDACTED}", [REDACTED, 3]],
                               "Authorization": REDACTED, "size": 3}
    assert event["endpoint"] == f"Endpoint('s3://{REDACTED}@bucket')"
    assert isinstance(event["plain"], Endpoint)
    assert (event["count"], event["ratio"], event["flag"], event["missing"]) == (7, 0.5, True,
                                                                                 None)


# -- the command's tracebacks: no locals unless asked, redacted text -----------------------


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Whatever a test configures (structlog, the root logger) is undone after it."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    was_configured, config = structlog.is_configured(), structlog.get_config()
    try:
        yield
    finally:
        structlog.reset_defaults()
        if was_configured:
            structlog.configure(**config)
        root.handlers, root.level = handlers, level


def fail_with_a_secret_local() -> None:
    api_key = "sk_live_" + "0123456789abcdef"
    attempt_number = 3
    raise RuntimeError(f"attempt {attempt_number} of postgresql://app:hunter2@db/jobs "
                       f"with {api_key[:3]}")


def log_a_failure(log_format: LogFormat, *, log_locals: bool = False) -> str:
    stream = io.StringIO()
    configure_logging(level="info", log_format=log_format, stream=stream, log_locals=log_locals)
    try:
        fail_with_a_secret_local()
    except RuntimeError as exc:
        structlog.get_logger("jobflow.test").warning("handler.finished", exc_info=exc)
    try:
        fail_with_a_secret_local()
    except RuntimeError:
        logging.getLogger("botocore.test").error("retry failed", exc_info=True)
    return stream.getvalue()


@pytest.mark.usefixtures("restore_logging")
def test_json_tracebacks_carry_no_locals_by_default() -> None:
    text = log_a_failure("json")
    assert "sk_live_" not in text and "hunter2" not in text
    for entry in map(json.loads, text.splitlines()):
        [exception] = entry["exception"]
        assert exception["exc_value"] == ("attempt 3 of postgresql://app:<redacted>@db/jobs "
                                          "with sk_")
        assert "fail_with_a_secret_local" in [frame["name"] for frame in exception["frames"]]
        assert all("locals" not in frame for frame in exception["frames"])


@pytest.mark.usefixtures("restore_logging")
def test_json_tracebacks_carry_locals_on_request_with_secret_names_hidden() -> None:
    text = log_a_failure("json", log_locals=True)
    assert "sk_live_" not in text and "hunter2" not in text
    for entry in map(json.loads, text.splitlines()):
        [exception] = entry["exception"]
        frame = next(f for f in exception["frames"] if f["name"] == "fail_with_a_secret_local")
        assert frame["locals"] == {"api_key": REDACTED, "attempt_number": "3"}


@pytest.mark.usefixtures("restore_logging")
def test_console_tracebacks_carry_no_locals_by_default() -> None:
    text = log_a_failure("console")
    assert text.count("Traceback (most recent call last):") == 2
    assert "in fail_with_a_secret_local" in text
    assert "RuntimeError: attempt 3 of postgresql://app:<redacted>@db/jobs with sk_" in text
    assert "sk_live_" not in text and "hunter2" not in text
    assert "attempt_number = " not in text


@pytest.mark.usefixtures("restore_logging")
def test_console_tracebacks_carry_locals_on_request_with_secret_names_hidden() -> None:
    text = log_a_failure("console", log_locals=True)
    assert "attempt_number = 3" in text
    assert f"api_key = {REDACTED}" in text
    assert "sk_live_" not in text and "hunter2" not in text


# -- the library's loggers ---------------------------------------------------------------


@pytest.fixture
def unconfigured(restore_logging: None) -> None:
    """structlog as a host that never configured it leaves it."""
    structlog.reset_defaults()


@pytest.mark.usefixtures("unconfigured")
def test_an_unconfigured_host_sees_no_info_lines_and_gets_warnings_through_logging(
        capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    log = library_logger("jobflow").bind(worker_id="w-1")
    log.info("job.queued", job_id="6d1c")
    log.warning("upload.delete_failed", job_id="6d1c",
                error="postgresql://app:hunter2@db/jobs unreachable")

    assert capsys.readouterr().out == ""
    [record] = caplog.records
    assert (record.name, record.levelno) == ("jobflow", logging.WARNING)
    assert record.getMessage() == (
        "upload.delete_failed worker_id=w-1 job_id=6d1c "
        "error='postgresql://app:<redacted>@db/jobs unreachable'")
    assert not log.is_enabled_for(logging.INFO)
    assert log.is_enabled_for(logging.WARNING)


@pytest.mark.usefixtures("unconfigured")
def test_a_host_that_configured_logging_gets_info_lines_through_its_handlers(
        capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="jobflow")
    library_logger("jobflow.worker").info("job.claimed", job_id="6d1c")
    assert capsys.readouterr().out == ""
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [
        ("jobflow.worker", logging.INFO, "job.claimed job_id=6d1c")]


@pytest.mark.usefixtures("unconfigured")
def test_an_exception_reaches_logging_once_redacted_and_without_locals(
        caplog: pytest.LogCaptureFixture) -> None:
    try:
        fail_with_a_secret_local()
    except RuntimeError:
        library_logger("jobflow.worker").exception("worker.supervision_failed")
    [record] = caplog.records
    assert record.levelno == logging.ERROR and record.exc_info is None
    message = record.getMessage()
    assert message.startswith("worker.supervision_failed\nTraceback (most recent call last):")
    assert "RuntimeError: attempt 3 of postgresql://app:<redacted>@db/jobs with sk_" in message
    assert "sk_live_" not in message
    assert "attempt_number = " not in message
    assert (record.funcName, record.filename) == (
        "test_an_exception_reaches_logging_once_redacted_and_without_locals",
        "test_log_redaction.py")


@pytest.mark.usefixtures("unconfigured")
def test_loggers_made_before_capture_logs_are_captured() -> None:
    log: Any = library_logger("jobflow").bind(worker_id="w-1")
    with structlog.testing.capture_logs() as logs:
        log.info("job.claimed", job_id="6d1c")
        log.bind(attempt=2).warning("job.lease_lost")
    assert logs == [
        {"event": "job.claimed", "log_level": "info", "worker_id": "w-1", "job_id": "6d1c"},
        {"event": "job.lease_lost", "log_level": "warning", "worker_id": "w-1", "attempt": 2},
    ]


@pytest.mark.usefixtures("unconfigured")
def test_a_host_that_configured_structlog_gets_the_lines_through_it() -> None:
    stream = io.StringIO()
    log = library_logger("jobflow").bind(worker_id="w-1")
    structlog.configure(processors=[structlog.processors.JSONRenderer()],
                        logger_factory=structlog.PrintLoggerFactory(stream))
    log.info("job.claimed", job_id="6d1c")
    assert json.loads(stream.getvalue()) == {"event": "job.claimed", "worker_id": "w-1",
                                             "job_id": "6d1c"}


def test_making_a_library_logger_resolves_nothing() -> None:
    log: Any = library_logger("jobflow")
    assert log._structlog is None and log._stdlib is None
    assert log.try_unbind("x").bind(a=1).new(b=2).unbind("b")._context == {}
