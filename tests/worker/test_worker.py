"""The worker, in-process, on every JobStore adapter: outcomes, leases, shutdown."""

from __future__ import annotations

import hashlib
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import structlog

from jobflow import Job, JobStatus, UploadPolicy
from jobflow.errors import ConfigurationError, JobCancelled, PermanentJobError
from jobflow.models import Event
from jobflow.worker import (
    HANDLER_TIMEOUT,
    INVALID_RESULT,
    OBJECT_CHANGED,
    AttemptAbandoned,
    JobContext,
    Worker,
)
from tests.worker.conftest import PATIENCE, FlowFactory, queue_job, running, wait_for

# Long enough that nothing expires by accident in a test that does not want it to.
CALM = {"lease_seconds": 30.0, "poll_interval": 0.02, "reconcile_interval": 60.0}


def events(flow: Any, job_id: str) -> list[Event]:
    return [row.event for row in flow.history(job_id)]


def test_the_handler_gets_the_verified_object_and_its_result_is_kept(
        make_flow: FlowFactory) -> None:
    flow = make_flow()
    data = b"\x00\x00\x00\x18ftypmp42 some video bytes"
    job_id = queue_job(flow, data, params={"title": "clip"})

    def digest(job: Job, ctx: JobContext) -> dict[str, Any]:
        with ctx.open() as stream:
            streamed = stream.read()
        copy = ctx.download()
        return {"title": job.params["title"], "attempt": ctx.attempt,
                "sha256": hashlib.sha256(streamed).hexdigest(),
                "downloaded_equal": copy.read_bytes() == streamed}

    Worker(flow, digest, **CALM).run(until_idle=True)

    job = flow.get(job_id)
    assert job.status is JobStatus.DONE
    assert job.result == {"title": "clip", "attempt": 1,
                          "sha256": hashlib.sha256(data).hexdigest(), "downloaded_equal": True}
    assert job.attempts == 1 and job.lease_token is None
    assert events(flow, job_id)[-2:] == [Event.CLAIM, Event.SUCCEED]


def test_a_failing_handler_is_retried_later_with_backoff(make_flow: FlowFactory) -> None:
    flow = make_flow(UploadPolicy(backoff_seconds=40, max_attempts=3))
    job_id = queue_job(flow)

    def broken(job: Job, ctx: JobContext) -> None:
        raise ConnectionResetError("transcoder went away")

    Worker(flow, broken, **CALM).run(until_idle=True)

    job = flow.get(job_id)
    assert job.status is JobStatus.QUEUED
    assert job.attempts == 1
    assert job.error_code == "handler_error"
    assert job.error_message == "ConnectionResetError: transcoder went away"
    retry = flow.history(job_id)[-1]
    assert retry.event is Event.RETRY
    assert retry.detail["error_code"] == "handler_error"
    # Exponential backoff with jitter: somewhere in the upper half of the delay.
    assert 20 <= retry.detail["retry_in_seconds"] <= 40
    assert job.run_at == retry.at + timedelta(seconds=retry.detail["retry_in_seconds"])
    # Not due yet: another pass claims nothing.
    Worker(flow, broken, **CALM).run(until_idle=True)
    assert flow.get(job_id).attempts == 1


def test_retries_stop_at_max_attempts(make_flow: FlowFactory) -> None:
    flow = make_flow(UploadPolicy(backoff_seconds=0.01, max_attempts=3))
    job_id = queue_job(flow)
    seen: list[int] = []

    def broken(job: Job, ctx: JobContext) -> None:
        seen.append(ctx.attempt)
        raise ValueError(f"bad frame in attempt {ctx.attempt}")

    with running(Worker(flow, broken, **CALM)):
        wait_for(lambda: flow.get(job_id).status is JobStatus.FAILED, "the job to fail")

    job = flow.get(job_id)
    assert seen == [1, 2, 3]
    assert job.attempts == 3
    assert job.error_message == "ValueError: bad frame in attempt 3"
    assert events(flow, job_id)[-6:] == [Event.CLAIM, Event.RETRY, Event.CLAIM, Event.RETRY,
                                         Event.CLAIM, Event.FAIL]


def test_backoff_jitter_spreads_retries(make_flow: FlowFactory) -> None:
    worker = Worker(make_flow(UploadPolicy(backoff_seconds=10)), lambda job, ctx: None)
    delays = {worker.retry_delay(2).total_seconds() for _ in range(50)}
    assert all(10 <= d <= 20 for d in delays)  # the policy says 20 s after attempt 2
    assert len(delays) > 1


def test_a_permanent_error_fails_the_job_at_once(make_flow: FlowFactory) -> None:
    flow = make_flow(UploadPolicy(max_attempts=5))
    job_id = queue_job(flow)

    def refuse(job: Job, ctx: JobContext) -> None:
        raise PermanentJobError("not a video", error_code="unsupported_format")

    Worker(flow, refuse, **CALM).run(until_idle=True)

    job = flow.get(job_id)
    assert (job.status, job.attempts, job.error_code) == (
        JobStatus.FAILED, 1, "unsupported_format")
    assert job.error_message == "not a video"
    last = flow.history(job_id)[-1]
    assert last.event is Event.FAIL and last.detail["error_code"] == "unsupported_format"


def test_a_result_that_is_not_a_json_object_fails_the_job(make_flow: FlowFactory) -> None:
    flow = make_flow()
    job_id = queue_job(flow)
    Worker(flow, lambda job, ctx: ["not", "an", "object"], **CALM).run(until_idle=True)
    job = flow.get(job_id)
    assert (job.status, job.error_code, job.attempts) == (JobStatus.FAILED, INVALID_RESULT, 1)


def test_an_object_replaced_after_verification_is_never_processed(
        make_flow: FlowFactory) -> None:
    flow = make_flow()
    job_id = queue_job(flow, b"the verified bytes")
    flow.objects.put(flow.get(job_id).key, b"swapped bytes", content_type="video/mp4")

    def read(job: Job, ctx: JobContext) -> dict[str, Any]:
        with ctx.open() as stream:
            return {"read": stream.read().decode()}

    Worker(flow, read, **CALM).run(until_idle=True)
    job = flow.get(job_id)
    assert (job.status, job.error_code, job.result) == (JobStatus.FAILED, OBJECT_CHANGED, None)


def test_a_handler_past_its_timeout_fails_the_attempt(make_flow: FlowFactory) -> None:
    flow = make_flow(UploadPolicy(max_attempts=1))
    job_id = queue_job(flow)
    let_go = threading.Event()
    abandoned: list[bool] = []

    def stuck(job: Job, ctx: JobContext) -> dict[str, Any]:
        let_go.wait(PATIENCE)
        abandoned.append(ctx.abandoned)
        return {"finished": "too late"}

    worker = Worker(flow, stuck, job_timeout=0.2, **CALM)
    with running(worker):
        wait_for(lambda: flow.get(job_id).status is JobStatus.FAILED, "the timeout")
        let_go.set()
        wait_for(lambda: worker.busy == 0, "the stuck handler to return")

    job = flow.get(job_id)
    assert (job.status, job.error_code, job.result) == (JobStatus.FAILED, HANDLER_TIMEOUT, None)
    assert job.error_message == "handler did not finish within 0.2 s"
    assert abandoned == [True]
    assert Event.SUCCEED not in events(flow, job_id)


def test_heartbeats_keep_the_lease_of_a_long_handler(make_flow: FlowFactory) -> None:
    flow = make_flow()
    job_id = queue_job(flow)
    started = threading.Event()
    let_go = threading.Event()

    def long_running(job: Job, ctx: JobContext) -> dict[str, Any]:
        started.set()
        let_go.wait(PATIENCE)
        return {"ok": True}

    worker = Worker(flow, long_running, lease_seconds=1.0, heartbeat_interval=0.2,
                    poll_interval=0.02, reconcile_interval=60.0)
    rescued: list[str] = []
    with running(worker):
        assert started.wait(PATIENCE)
        # Outlive several leases while something else keeps reconciling.
        heartbeats = 0
        while heartbeats < 8:
            rescued += flow.reconcile().rescued
            heartbeats = events(flow, job_id).count(Event.HEARTBEAT)
        let_go.set()
        wait_for(lambda: flow.get(job_id).status is JobStatus.DONE, "the job to finish")

    assert rescued == []
    job = flow.get(job_id)
    assert job.attempts == 1 and job.result == {"ok": True}
    assert Event.RESCUE not in events(flow, job_id)


def test_progress_reports_renew_the_lease_and_land_in_the_history(
        make_flow: FlowFactory) -> None:
    flow = make_flow()
    job_id = queue_job(flow)

    def staged(job: Job, ctx: JobContext) -> None:
        ctx.heartbeat(stage="probe", progress=0.25)
        ctx.heartbeat(stage="thumbnail", progress=0.75, frames=12)

    Worker(flow, staged, **CALM).run(until_idle=True)

    beats = [row.detail for row in flow.history(job_id) if row.event is Event.HEARTBEAT]
    assert [(b["stage"], b["progress"]) for b in beats] == [("probe", 0.25), ("thumbnail", 0.75)]
    assert beats[1]["frames"] == 12
    assert flow.get(job_id).status is JobStatus.DONE


@pytest.mark.parametrize("finish_by", ["returning", "reporting progress"])
def test_a_worker_whose_job_was_rescued_cannot_finish_it(
        make_flow: FlowFactory, finish_by: str) -> None:
    offset = [timedelta(0)]
    flow = make_flow(clock=lambda: datetime.now(UTC) + offset[0])
    job_id = queue_job(flow)
    first_started = threading.Event()
    let_go = threading.Event()
    outcomes: list[str] = []

    def handler(job: Job, ctx: JobContext) -> dict[str, Any]:
        if ctx.attempt == 1:
            first_started.set()
            let_go.wait(PATIENCE)
            if finish_by == "reporting progress":
                try:
                    ctx.heartbeat(stage="late")
                except AttemptAbandoned:
                    outcomes.append("told to stop")
                    raise
        return {"finished_in_attempt": ctx.attempt}

    # One slot, so the rescued job waits until the paused handler gives up its slot.
    worker = Worker(flow, handler, concurrency=1, **CALM)
    with running(worker):
        assert first_started.wait(PATIENCE)
        offset[0] = timedelta(hours=1)  # as if the worker had been paused for an hour
        assert flow.reconcile().rescued == (job_id,)
        let_go.set()
        wait_for(lambda: flow.get(job_id).status is JobStatus.DONE, "the retried job")

    job = flow.get(job_id)
    assert job.result == {"finished_in_attempt": 2}
    history = events(flow, job_id)
    assert history.count(Event.SUCCEED) == 1
    assert history[-4:] == [Event.RESCUE, Event.CLAIM, Event.HEARTBEAT, Event.SUCCEED] or (
        history[-3:] == [Event.RESCUE, Event.CLAIM, Event.SUCCEED])
    assert outcomes == (["told to stop"] if finish_by == "reporting progress" else [])


# Renewed often, so that a cancel request reaches the handler quickly.
BRISK = {"lease_seconds": 5.0, "heartbeat_interval": 0.1, "poll_interval": 0.02,
         "reconcile_interval": 60.0}


@pytest.mark.parametrize("notices_by", ["polling the flag", "reporting progress"])
def test_a_running_job_asked_to_stop_is_told_and_ends_cancelled(
        make_flow: FlowFactory, notices_by: str) -> None:
    flow = make_flow(UploadPolicy(max_attempts=3))
    job_id = queue_job(flow)
    started = threading.Event()
    seen: list[str] = []

    def long_running(job: Job, ctx: JobContext) -> dict[str, Any]:
        started.set()
        give_up = time.monotonic() + PATIENCE
        while time.monotonic() < give_up:
            if notices_by == "polling the flag":
                if ctx.cancel_requested:
                    seen.append("flag")
                    ctx.check()  # raises JobCancelled
            else:
                try:
                    ctx.heartbeat(stage="working")
                except JobCancelled:
                    seen.append("heartbeat raised")
                    raise
            time.sleep(0.02)
        return {"never": "told"}

    worker = Worker(flow, long_running, **BRISK)
    with running(worker):
        assert started.wait(PATIENCE)
        asked = flow.cancel(job_id)
        assert asked.status is JobStatus.QUICK_RUNNING and asked.cancel_requested_at
        wait_for(lambda: flow.get(job_id).status is JobStatus.FAILED, "the job to end")

    job = flow.get(job_id)
    assert (job.error_code, job.attempts) == ("cancelled", 1), "cancelled, never retried"
    assert job.error_message == f"job {job_id} was asked to stop"
    assert seen == (["flag"] if notices_by == "polling the flag" else ["heartbeat raised"])
    history = flow.history(job_id)
    events_after = [row.event for row in history[[r.event for r in history].index(
        Event.REQUEST_CANCEL):]]
    assert events_after[0] is Event.REQUEST_CANCEL and events_after[-1] is Event.FAIL
    assert set(events_after[1:-1]) <= {Event.HEARTBEAT}
    assert history[-1].worker_id == worker.worker_id
    assert history[-1].detail["error_code"] == "cancelled"


def test_a_handler_that_finishes_despite_a_cancel_request_leaves_the_job_done(
        make_flow: FlowFactory) -> None:
    flow = make_flow()
    job_id = queue_job(flow)
    started = threading.Event()

    def finishes_anyway(job: Job, ctx: JobContext) -> dict[str, Any]:
        started.set()
        wait_for(lambda: ctx.cancel_requested, "the cancel request to reach the handler")
        return {"finished": "anyway"}

    with running(Worker(flow, finishes_anyway, **BRISK)):
        assert started.wait(PATIENCE)
        flow.cancel(job_id)
        wait_for(lambda: flow.get(job_id).status is JobStatus.DONE, "the job to finish")

    job = flow.get(job_id)
    assert job.result == {"finished": "anyway"} and job.cancel_requested_at is not None
    assert job.error_code is None


def test_a_job_claimed_ahead_and_asked_to_stop_never_starts(make_flow: FlowFactory) -> None:
    flow = make_flow()
    quick, slow, ahead = queue_job(flow), queue_job(flow), queue_job(flow)
    ran: list[str] = []
    let_go = threading.Event()

    def handler(job: Job, ctx: JobContext) -> None:
        ran.append(job.id)
        if job.id == slow:
            let_go.wait(PATIENCE)

    # The quick job makes handlers look short, so the worker claims one job ahead
    # while the slow one runs.
    worker = Worker(flow, handler, concurrency=1, **BRISK)
    with running(worker):
        wait_for(lambda: flow.get(ahead).status is JobStatus.QUICK_RUNNING,
                 "the third job to be claimed ahead")
        flow.cancel(ahead)
        wait_for(lambda: events(flow, ahead)[-1] is Event.HEARTBEAT,
                 "a lease renewal after the cancel request")
        let_go.set()
        wait_for(lambda: flow.get(ahead).status is JobStatus.FAILED, "the job to be cancelled")

    assert ran == [quick, slow]
    assert flow.get(ahead).error_code == "cancelled"


def test_a_job_asked_to_stop_whose_worker_vanished_is_not_run_again(
        make_flow: FlowFactory) -> None:
    offset = [timedelta(0)]
    flow = make_flow(clock=lambda: datetime.now(UTC) + offset[0])
    job_id = queue_job(flow)
    started = threading.Event()
    let_go = threading.Event()

    def paused(job: Job, ctx: JobContext) -> dict[str, Any]:
        started.set()
        let_go.wait(PATIENCE)
        return {"late": True}

    worker = Worker(flow, paused, **CALM)
    with running(worker):
        assert started.wait(PATIENCE)
        flow.cancel(job_id)
        offset[0] = timedelta(hours=1)  # as if the worker had been paused for an hour
        report = flow.reconcile()
        assert report.lease_failed == (job_id,) and report.rescued == ()
        let_go.set()
        wait_for(lambda: worker.busy == 0, "the paused handler to return")

    job = flow.get(job_id)
    assert (job.status, job.error_code, job.result) == (JobStatus.FAILED, "cancelled", None)
    assert events(flow, job_id).count(Event.CLAIM) == 1
    assert Event.SUCCEED not in events(flow, job_id), "the late result was fenced off"


def test_stop_hands_unfinished_jobs_back_without_spending_an_attempt(
        make_flow: FlowFactory) -> None:
    flow = make_flow()
    job_id = queue_job(flow)
    started = threading.Event()
    let_go = threading.Event()

    def ignores_shutdown(job: Job, ctx: JobContext) -> dict[str, Any]:
        started.set()
        let_go.wait(PATIENCE)
        return {"finished": "after release"}

    worker = Worker(flow, ignores_shutdown, shutdown_grace=0.2, **CALM)
    with running(worker) as thread:
        assert started.wait(PATIENCE)
        worker.stop()
        thread.join(PATIENCE)
        assert not thread.is_alive()
        released = flow.get(job_id)
        let_go.set()

    assert released.status is JobStatus.QUEUED
    assert released.attempts == 0 and released.lease_token is None
    last = flow.history(job_id)[-1]
    assert last.event is Event.RELEASE and last.detail == {"reason": "worker shutting down"}
    wait_for(lambda: worker.busy == 0, "the released handler to return")
    assert flow.get(job_id) == released  # its late result changed nothing


def test_stop_lets_a_cooperative_handler_finish_within_the_grace_period(
        make_flow: FlowFactory) -> None:
    flow = make_flow()
    job_id = queue_job(flow)
    started = threading.Event()

    def cooperative(job: Job, ctx: JobContext) -> dict[str, Any]:
        started.set()
        wait_for(lambda: ctx.shutdown_requested, "the shutdown request")
        return {"stopped_cleanly": True}

    worker = Worker(flow, cooperative, shutdown_grace=PATIENCE, **CALM)
    with running(worker):
        assert started.wait(PATIENCE)
        worker.stop()

    job = flow.get(job_id)
    assert job.status is JobStatus.DONE and job.result == {"stopped_cleanly": True}


def test_claims_fill_free_capacity_only(make_flow: FlowFactory) -> None:
    flow = make_flow()
    job_ids = [queue_job(flow) for _ in range(5)]
    let_go = threading.Event()

    def waits(job: Job, ctx: JobContext) -> None:
        let_go.wait(PATIENCE)

    worker = Worker(flow, waits, concurrency=3, **CALM)
    with running(worker):
        wait_for(lambda: worker.busy == 3, "three running handlers")
        counts = flow.counts()
        let_go.set()
        wait_for(lambda: flow.counts()[JobStatus.DONE] == 5, "all jobs to finish")

    assert counts[JobStatus.QUICK_RUNNING] == 3 and counts[JobStatus.QUEUED] == 2
    assert all(flow.get(j).attempts == 1 for j in job_ids)


def test_periodic_reconcile_adopts_forgotten_uploads_and_rescues_dead_workers(
        make_flow: FlowFactory) -> None:
    flow = make_flow(UploadPolicy(adopt_after_seconds=0))
    forgotten = flow.initiate_upload("owner-1", content_type="video/mp4")
    flow.objects.put(forgotten.key, b"uploaded, never completed", content_type="video/mp4")
    orphan = queue_job(flow)
    [dead_claim] = flow.claim("worker-that-died", lease_seconds=0.05)
    assert dead_claim.job.id == orphan

    worker = Worker(flow, lambda job, ctx: {"ran": job.id}, lease_seconds=30.0,
                    poll_interval=0.02, reconcile_interval=0.05)
    with running(worker):
        wait_for(lambda: flow.counts()[JobStatus.DONE] == 2, "both jobs to be done")

    assert events(flow, forgotten.job_id)[:2] == [Event.CREATED, Event.VERIFY_UPLOAD]
    orphan_history = flow.history(orphan)
    assert [row.event for row in orphan_history][-4:-1] == [Event.CLAIM, Event.RESCUE,
                                                            Event.CLAIM]
    assert orphan_history[-4].worker_id == "worker-that-died"
    rescue = orphan_history[-3]
    assert (rescue.worker_id, rescue.detail) == (worker.worker_id,
                                                 {"lost_worker": "worker-that-died"})
    assert orphan_history[-2].worker_id == worker.worker_id


def test_each_handler_start_and_finish_is_logged_with_job_attempt_and_worker(
        make_flow: FlowFactory) -> None:
    flow = make_flow()
    job_id = queue_job(flow)
    worker = Worker(flow, lambda job, ctx: None, worker_id="w-logged", **CALM)
    with structlog.testing.capture_logs() as logs:
        worker.run(until_idle=True)

    mine = [(e["event"], e.get("outcome")) for e in logs if e.get("job_id") == job_id]
    assert ("handler.started", None) in mine
    assert ("handler.finished", "succeeded") in mine
    assert ("claim", None) in mine and ("succeed", None) in mine
    for entry in logs:
        if entry["event"].startswith("handler."):
            assert (entry["job_id"], entry["attempt"], entry["worker_id"]) == (
                job_id, 1, "w-logged")


@pytest.mark.parametrize("settings", [
    {"concurrency": 0},
    {"concurrency": 1025},
    {"concurrency": True},
    {"lease_seconds": 5.0, "heartbeat_interval": 5.0},
    {"poll_interval": 0.0},
    {"job_timeout": -1.0},
    {"shutdown_grace": -1.0},
])
def test_nonsense_settings_are_refused(make_flow: FlowFactory,
                                       settings: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        Worker(make_flow(), lambda job, ctx: None, **settings)
