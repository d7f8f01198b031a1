"""Outages are not job failures: an attempt whose object store is unavailable,
or whose handler raises RetryLater, is deferred, and the worker slows down."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import pytest
import structlog

from jobflow import Job, JobFlow, JobStatus, UploadPolicy
from jobflow.adapters.memory import InMemoryObjectStore
from jobflow.errors import (
    ConfigurationError,
    RetryLater,
    StoragePermissionDenied,
    StorageUnavailable,
)
from jobflow.models import Event, JobEvent
from jobflow.worker import JobContext, Worker
from tests.worker.conftest import FlowFactory, queue_job, running, wait_for

CALM = {"lease_seconds": 30.0, "poll_interval": 0.02, "reconcile_interval": 60.0}
#: Deferrals and pauses short enough for a test to watch several.
BRISK = UploadPolicy(defer_seconds=0.01, defer_max_seconds=0.05, max_attempts=1,
                     max_deferrals=3)


def objects_of(flow: JobFlow) -> InMemoryObjectStore:
    """The in-memory store under the flow's (timed) object store."""
    objects = getattr(flow.objects, "inner", flow.objects)
    assert isinstance(objects, InMemoryObjectStore)
    return objects


def download(job: Job, ctx: JobContext) -> dict[str, Any]:
    return {"size": ctx.download().stat().st_size}


def defers(flow: JobFlow, job_id: str) -> list[JobEvent]:
    return [row for row in flow.history(job_id) if row.event is Event.DEFER]


def test_an_unavailable_object_store_defers_the_attempt_and_keeps_it(
        make_flow: FlowFactory) -> None:
    flow = make_flow(UploadPolicy(defer_seconds=0.05, max_attempts=1))
    job_id = queue_job(flow)
    objects_of(flow).unavailable = True

    Worker(flow, download, **CALM).run(until_idle=True)

    job = flow.get(job_id)
    assert (job.status, job.attempts, job.deferrals) == (JobStatus.QUEUED, 0, 1)
    assert job.error_code == "storage_unavailable"
    assert job.error_message == "StorageUnavailable: InMemoryObjectStore is unavailable"
    [defer] = defers(flow, job_id)
    assert defer.to_status is JobStatus.QUEUED and defer.detail["deferrals"] == 1
    # The policy's deferral backoff, with jitter in its upper half.
    assert 0.025 <= defer.detail["retry_in_seconds"] <= 0.05
    assert job.run_at == defer.at + timedelta(seconds=defer.detail["retry_in_seconds"])

    objects_of(flow).unavailable = False
    time.sleep(0.05)
    Worker(flow, download, **CALM).run(until_idle=True)
    job = flow.get(job_id)
    assert (job.status, job.attempts, job.deferrals) == (JobStatus.DONE, 1, 1)


def test_an_outage_spends_deferrals_never_attempts_then_fails_for_good(
        make_flow: FlowFactory) -> None:
    """max_attempts=1, yet four attempts run: three deferred, the fourth fails
    once max_deferrals (3) are spent, with the outage's own error code."""
    flow = make_flow(BRISK)
    job_id = queue_job(flow)
    objects_of(flow).unavailable = True
    worker = Worker(flow, download, storage_pause=0.01, storage_pause_max=0.02, **CALM)

    with running(worker):
        wait_for(lambda: flow.get(job_id).status is JobStatus.FAILED, "the budget to run out")

    job = flow.get(job_id)
    assert (job.error_code, job.attempts, job.deferrals) == ("storage_unavailable", 1, 3)
    assert [row.to_status for row in defers(flow, job_id)] == [JobStatus.QUEUED] * 3 + [
        JobStatus.FAILED]
    assert [row.attempt for row in flow.history(job_id) if row.event is Event.CLAIM] == [1] * 4


@pytest.mark.parametrize("raised", [
    StorageUnavailable("S3 answered 503 SlowDown"),
    StoragePermissionDenied("cannot read s3://videos/x: S3 answered 403 AccessDenied"),
])
def test_storage_errors_a_handler_lets_through_are_deferred(make_flow: FlowFactory,
                                                            raised: Exception) -> None:
    """A permission error may clear (credentials rotate, a policy is fixed): it
    is deferred like an outage, within the same budget."""
    flow = make_flow(UploadPolicy(max_attempts=1))
    job_id = queue_job(flow)

    def handler(job: Job, ctx: JobContext) -> None:
        raise raised

    Worker(flow, handler, **CALM).run(until_idle=True)

    job = flow.get(job_id)
    assert (job.status, job.attempts, job.deferrals) == (JobStatus.QUEUED, 0, 1)
    assert job.error_code == "storage_unavailable"
    assert job.error_message == f"{type(raised).__name__}: {raised}"


def test_retry_later_defers_for_the_delay_the_handler_asked(make_flow: FlowFactory) -> None:
    flow = make_flow(UploadPolicy(max_attempts=1))
    plain, coded = queue_job(flow), queue_job(flow)

    def handler(job: Job, ctx: JobContext) -> None:
        if job.id == plain:
            raise RetryLater(120, reason="the transcoding service is rate limiting us")
        raise RetryLater(timedelta(minutes=5), error_code="quota_exceeded")

    Worker(flow, handler, concurrency=2, **CALM).run(until_idle=True)

    job = flow.get(plain)
    [defer] = defers(flow, plain)
    assert (job.status, job.attempts, job.deferrals) == (JobStatus.QUEUED, 0, 1)
    assert (job.error_code, job.error_message) == (
        "retry_later", "the transcoding service is rate limiting us")
    assert job.run_at == defer.at + timedelta(seconds=120)
    other = flow.get(coded)
    assert other.error_code == "quota_exceeded"
    assert other.run_at == defers(flow, coded)[0].at + timedelta(minutes=5)


@pytest.mark.parametrize("delay", [-1, float("nan"), timedelta(days=400), "soon", True])
def test_a_retry_later_with_a_bad_delay_is_an_ordinary_error(make_flow: FlowFactory,
                                                             delay: Any) -> None:
    flow = make_flow()
    job_id = queue_job(flow)

    def handler(job: Job, ctx: JobContext) -> None:
        raise RetryLater(delay)

    Worker(flow, handler, **CALM).run(until_idle=True)

    job = flow.get(job_id)
    assert (job.status, job.attempts, job.deferrals) == (JobStatus.QUEUED, 1, 0)
    assert job.error_code == "handler_error" and "RetryLater needs a delay" in (
        job.error_message or "")


@pytest.mark.parametrize("make_store", ["memory"], indirect=True)
def test_claiming_pauses_while_the_store_fails_and_resumes_after_a_success(
        make_flow: FlowFactory) -> None:
    """Without the pause a worker would try (and defer) all ten jobs at once;
    with it, it tries one, waits 0.2 s, one, waits 0.4 s, ... The pause is
    logged when its length changes, not per attempt."""
    flow = make_flow(UploadPolicy(defer_seconds=60))
    job_ids = [queue_job(flow) for _ in range(10)]
    objects_of(flow).unavailable = True
    worker = Worker(flow, download, storage_pause=0.2, storage_pause_max=0.4, **CALM)

    with structlog.testing.capture_logs() as logs, running(worker):
        time.sleep(1.0)
        tried = [job_id for job_id in job_ids if flow.get(job_id).deferrals]
        assert 2 <= len(tried) <= 5, "the worker did not slow its claiming"
        objects_of(flow).unavailable = False
        # A deferred job waits a minute; the others run once claiming resumes.
        wait_for(lambda: sum(flow.get(j).status is JobStatus.DONE for j in job_ids)
                 == len(job_ids) - len(tried), "the untried jobs to run")

    paused = [entry["seconds"] for entry in logs if entry["event"] == "worker.claims_paused"]
    assert paused == [0.2, 0.4]
    assert [entry["event"] for entry in logs].count("worker.claims_resumed") == 1
    assert all(flow.get(job_id).status is JobStatus.QUEUED for job_id in tried)


@pytest.mark.parametrize("settings", [
    {"storage_pause": 0}, {"storage_pause_max": -1},
    {"storage_pause": 5, "storage_pause_max": 1},
])
def test_nonsense_pause_settings_are_refused(make_flow: FlowFactory,
                                             settings: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        Worker(make_flow(), download, **settings)
