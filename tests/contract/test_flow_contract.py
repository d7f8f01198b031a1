"""JobFlow's public contract (DESIGN.md §3), run against every JobStore."""

from __future__ import annotations

import os
import socket
import threading
from datetime import datetime, timedelta

import attrs
import pytest
import structlog

from jobflow import (
    Claim,
    Deferred,
    Event,
    Failed,
    Job,
    JobFlow,
    JobStatus,
    Released,
    Succeeded,
    states,
)
from jobflow.adapters.memory import InMemoryObjectStore
from jobflow.errors import (
    ConfigurationError,
    ContentTypeNotAllowed,
    InvalidInput,
    InvalidTransition,
    JobflowError,
    JobNotFound,
    LeaseLost,
    MalformedJobId,
    StorageUnavailable,
    UploadExpired,
    UploadMissing,
    UploadRejected,
)
from jobflow.ports import JobStore, ObjectStore
from tests.conftest import QUIET_LOGGER, ManualClock
from tests.strategies import POLICY, START


def queued_job(flow: JobFlow, objects: InMemoryObjectStore, owner: str = "alice") -> str:
    ticket = flow.initiate_upload(owner, {"w": 1}, content_type="video/mp4")
    objects.put(ticket.key, b"0123456789", content_type="video/mp4")
    flow.complete_upload(ticket.job_id, owner_id=owner)
    return ticket.job_id


def test_adapters_satisfy_the_ports(store: JobStore, objects: InMemoryObjectStore) -> None:
    assert isinstance(store, JobStore) and isinstance(objects, ObjectStore)


def test_the_whole_lifecycle(flow: JobFlow, objects: InMemoryObjectStore) -> None:
    ticket = flow.initiate_upload("alice", {"width": 640}, content_type="video/mp4")
    assert ticket.bucket == "videos" and ticket.method == "PUT"
    assert ticket.key == f"uploads/{ticket.job_id}"
    assert ticket.headers["Content-Type"] == "video/mp4"
    assert ticket.expires_at == START + timedelta(seconds=POLICY.upload_ttl_seconds)
    assert flow.claim("w1") == []  # not claimable before the upload is verified
    objects.put(ticket.key, b"0123456789", content_type="video/mp4")
    assert flow.claim("w1") == []  # an object alone is not enough: complete verifies it
    job = flow.complete_upload(ticket.job_id, owner_id="alice")
    assert job.status is JobStatus.QUEUED and job.object_size == 10
    [claim] = flow.claim("w1", limit=5)
    assert claim.job.id == ticket.job_id and claim.job.params == {"width": 640}
    claim = flow.heartbeat(claim, detail={"stage": "probe", "progress": 0.5})
    done = flow.succeed(claim, {"frames": 12})
    assert done.status is JobStatus.DONE and done.result == {"frames": 12}
    history = flow.history(ticket.job_id)
    assert [(r.event, r.from_status, r.to_status) for r in history] == [
        (Event.CREATED, None, JobStatus.AWAITING_UPLOAD),
        (Event.VERIFY_UPLOAD, JobStatus.AWAITING_UPLOAD, JobStatus.QUEUED),
        (Event.CLAIM, JobStatus.QUEUED, JobStatus.QUICK_RUNNING),
        (Event.HEARTBEAT, JobStatus.QUICK_RUNNING, JobStatus.QUICK_RUNNING),
        (Event.SUCCEED, JobStatus.QUICK_RUNNING, JobStatus.DONE),
    ]
    assert [r.seq for r in history] == [1, 2, 3, 4, 5]
    assert history[2].worker_id == "w1" and history[2].attempt == 1
    assert history[3].detail["stage"] == "probe"
    assert history[1].detail["size"] == 10
    assert flow.counts()[JobStatus.DONE] == 1


def test_complete_before_upload_keeps_waiting_and_can_be_retried(
        flow: JobFlow, objects: InMemoryObjectStore) -> None:
    ticket = flow.initiate_upload("alice", content_type="video/mp4")
    with pytest.raises(UploadMissing, match="no object uploaded yet"):
        flow.complete_upload(ticket.job_id, owner_id="alice")
    assert flow.get(ticket.job_id).status is JobStatus.AWAITING_UPLOAD
    objects.put(ticket.key, b"abc", content_type="video/mp4")
    assert flow.complete_upload(ticket.job_id).status is JobStatus.QUEUED


def test_complete_is_idempotent_and_skips_the_object_store_once_verified(
        flow: JobFlow, objects: InMemoryObjectStore) -> None:
    job_id = queued_job(flow, objects)
    objects.unavailable = True  # a verified job must not need the object store again
    first = flow.complete_upload(job_id, owner_id="alice")
    second = flow.complete_upload(job_id, owner_id="alice")
    assert first == second and first.status is JobStatus.QUEUED
    assert [r.event for r in flow.history(job_id)].count(Event.VERIFY_UPLOAD) == 1


def test_invalid_upload_fails_the_job_and_says_why(
        flow: JobFlow, objects: InMemoryObjectStore) -> None:
    ticket = flow.initiate_upload("alice", content_type="video/mp4")
    objects.put(ticket.key, b"", content_type="video/mp4")
    with pytest.raises(UploadRejected, match="empty"):
        flow.complete_upload(ticket.job_id)
    job = flow.get(ticket.job_id)
    assert job.status is JobStatus.FAILED and job.error_code == "upload_rejected"
    with pytest.raises(UploadRejected):  # asking again gives the same answer
        flow.complete_upload(ticket.job_id)


def test_complete_after_the_deadline_without_object_expires(
        flow: JobFlow, clock: ManualClock) -> None:
    ticket = flow.initiate_upload("alice", content_type="video/mp4")
    clock.advance(POLICY.upload_ttl_seconds)
    with pytest.raises(UploadExpired):
        flow.complete_upload(ticket.job_id)
    assert flow.get(ticket.job_id).error_code == "upload_expired"


def test_object_store_outage_changes_nothing(
        flow: JobFlow, objects: InMemoryObjectStore) -> None:
    ticket = flow.initiate_upload("alice", content_type="video/mp4")
    objects.put(ticket.key, b"abc", content_type="video/mp4")
    before = flow.get(ticket.job_id)
    objects.unavailable = True
    with pytest.raises(StorageUnavailable):
        flow.complete_upload(ticket.job_id)
    assert flow.get(ticket.job_id) == before
    assert len(flow.history(ticket.job_id)) == 1


def test_wrong_owner_reads_as_not_found(flow: JobFlow, objects: InMemoryObjectStore) -> None:
    job_id = queued_job(flow, objects)
    before = flow.get(job_id)
    for call in (flow.get, flow.complete_upload, flow.cancel, flow.history):
        with pytest.raises(JobNotFound) as info:
            call(job_id, owner_id="mallory")
        assert "mallory" not in str(info.value)
    assert flow.get(job_id) == before


@pytest.mark.parametrize("job_id", ["nope", "", "../../etc/passwd", "x" * 2000, "a\x00b"])
def test_malformed_and_unknown_ids_are_not_found(flow: JobFlow, job_id: str) -> None:
    with pytest.raises(MalformedJobId, match="malformed job id"):
        flow.get(job_id)
    with pytest.raises(JobNotFound, match="not found"):
        flow.complete_upload("00000000-0000-4000-8000-000000000000")


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"params": {"when": datetime.now()}}, InvalidInput, "not JSON-serialisable"),
    ({"params": {"x": float("nan")}}, InvalidInput, "not JSON-serialisable"),
    ({"params": ["not", "a", "dict"]}, InvalidInput, "JSON object"),
    ({"content_type": "application/x-msdownload"}, ContentTypeNotAllowed, "not allowed"),
    ({"sha256": "abc"}, InvalidInput, "64 hexadecimal"),
    ({"owner_id": ""}, InvalidInput, "owner_id"),
    ({"owner_id": "x" * 2000}, InvalidInput, "owner_id"),
    ({"owner_id": "a\x00b"}, InvalidInput, "NUL"),
])
def test_bad_initiate_input_is_refused_and_writes_nothing(
        flow: JobFlow, kwargs: dict[str, object], error: type[Exception], message: str) -> None:
    call: dict[str, object] = {"owner_id": "alice", "params": {}, "content_type": "video/mp4"}
    call.update(kwargs)
    with pytest.raises(error, match=message):
        flow.initiate_upload(**call)  # type: ignore[arg-type]
    assert sum(flow.counts().values()) == 0


def test_owner_ids_are_only_data(flow: JobFlow) -> None:
    ticket = flow.initiate_upload("../../owner/with/slashes", content_type="video/mp4")
    assert ticket.key == f"uploads/{ticket.job_id}"
    assert flow.get(ticket.job_id, owner_id="../../owner/with/slashes").id == ticket.job_id


def test_wrong_state_events_are_refused_with_context(
        flow: JobFlow, objects: InMemoryObjectStore) -> None:
    ticket = flow.initiate_upload("alice", content_type="video/mp4")
    with pytest.raises(InvalidTransition) as info:
        flow.requeue(ticket.job_id)
    assert info.value.status == "awaiting_upload" and info.value.event == "requeue"
    assert str(info.value) == f"cannot requeue job {ticket.job_id} in awaiting_upload"
    job_id = queued_job(flow, objects)
    [claim] = flow.claim("w1")
    flow.succeed(claim)
    with pytest.raises(InvalidTransition, match=f"cannot cancel job {job_id} in done"):
        flow.cancel(job_id)


def test_cancel_asks_a_running_job_to_stop_and_its_lease_renewal_says_so(
        flow: JobFlow, objects: InMemoryObjectStore, clock: ManualClock) -> None:
    for _ in range(2):
        queued_job(flow, objects)
    first, second = flow.claim("w1", limit=2)
    asked_at = clock.advance(5)

    asked = flow.cancel(first.job.id)
    assert (asked.status, asked.cancel_requested_at) == (JobStatus.QUICK_RUNNING, asked_at)
    assert (asked.lease_token, asked.lease_owner) == (first.token, "w1"), "it keeps its lease"
    last = flow.history(first.job.id)[-1]
    assert (last.event, last.from_status, last.to_status) == (
        Event.REQUEST_CANCEL, JobStatus.QUICK_RUNNING, JobStatus.QUICK_RUNNING)
    clock.advance(1)
    assert flow.cancel(first.job.id) == asked, "asking again changes nothing"
    assert len(flow.history(first.job.id)) == last.seq
    flow.cancel(second.job.id)

    # The worker's claims predate the requests; renewing them tells it.
    renewed = flow.heartbeat(first)
    assert renewed.token == first.token and renewed.job.cancel_requested_at == asked_at
    assert renewed.job == flow.get(first.job.id)
    [renewed_second] = flow.heartbeat_many([second])
    assert isinstance(renewed_second, Claim)
    assert renewed_second.job.cancel_requested_at is not None


def test_a_running_job_asked_to_stop_ends_cancelled_unless_it_succeeded(
        flow: JobFlow, objects: InMemoryObjectStore, clock: ManualClock) -> None:
    ids = [queued_job(flow, objects) for _ in range(5)]
    retried, given_back, succeeded, rescued, failed_alone = flow.claim(
        "w1", limit=5, lease_seconds=30)
    for job_id in ids:
        flow.cancel(job_id)
    clock.advance(1)

    # Written from claims decided before the requests, as a busy worker would.
    written = flow.finish_many([Failed(retried, "boom", retryable=True),
                                Released(given_back), Succeeded(succeeded, {"n": 1})])
    assert [(j.status, j.error_code) for j in written if not isinstance(j, LeaseLost)] == [
        (JobStatus.FAILED, "cancelled"), (JobStatus.FAILED, "cancelled"),
        (JobStatus.DONE, None)]
    assert flow.get(retried.job.id).error_message == "boom"
    done = flow.get(succeeded.job.id)
    assert done.result == {"n": 1} and done.cancel_requested_at is not None
    alone = flow.fail(failed_alone, "boom", retryable=True)
    assert (alone.status, alone.error_code) == (JobStatus.FAILED, "cancelled")
    clock.advance(31)
    report = flow.reconcile()
    assert report.lease_failed == (rescued.job.id,) and report.rescued == ()
    assert flow.get(rescued.job.id).error_code == "cancelled"
    assert flow.counts()[JobStatus.QUEUED] == 0, "no cancelled job runs again"
    with pytest.raises(InvalidTransition, match="cannot cancel"):
        flow.cancel(rescued.job.id)
    requeued = flow.requeue(rescued.job.id)
    assert requeued.status is JobStatus.QUEUED and requeued.cancel_requested_at is None


def test_a_rescued_worker_cannot_touch_the_job(
        flow: JobFlow, objects: InMemoryObjectStore, clock: ManualClock) -> None:
    job_id = queued_job(flow, objects)
    [zombie] = flow.claim("w1", lease_seconds=10)
    clock.advance(11)
    report = flow.reconcile()
    assert report.rescued == (job_id,)
    [live] = flow.claim("w2")
    before = flow.get(job_id)
    for call in (lambda: flow.heartbeat(zombie), lambda: flow.succeed(zombie),
                 lambda: flow.fail(zombie, "x"), lambda: flow.release(zombie)):
        with pytest.raises(LeaseLost, match="no longer held"):
            call()
    assert flow.get(job_id) == before
    assert flow.succeed(live).status is JobStatus.DONE


def test_a_rescue_names_the_process_that_rescued_and_the_worker_it_lost(
        flow: JobFlow, objects: InMemoryObjectStore, clock: ManualClock) -> None:
    named, unnamed = queued_job(flow, objects), queued_job(flow, objects)
    flow.claim("w-lost", limit=2, lease_seconds=10)
    clock.advance(11)
    [first] = flow.store.expired_leases(now=clock.now, limit=1)
    assert flow.reconcile(limit=1, rescuer_id="ops-cron").rescued == (first.id,)
    assert flow.reconcile().rescued != ()
    rows = {job_id: flow.history(job_id)[-1] for job_id in (named, unnamed)}
    assert all(row.event is Event.RESCUE and row.detail == {"lost_worker": "w-lost"}
               for row in rows.values())
    second = unnamed if first.id == named else named
    assert rows[first.id].worker_id == "ops-cron"
    host, pid, _ = (rows[second].worker_id or "").split(":")
    assert host == socket.gethostname() and pid == str(os.getpid())
    with pytest.raises(InvalidInput, match="rescuer_id"):
        flow.reconcile(rescuer_id="a\nb")


def test_retry_backs_off_then_fails_when_attempts_run_out(
        flow: JobFlow, objects: InMemoryObjectStore, clock: ManualClock) -> None:
    job_id = queued_job(flow, objects)
    for attempt in range(1, POLICY.max_attempts + 1):
        [claim] = flow.claim("w1")
        assert claim.job.attempts == attempt
        job = flow.fail(claim, f"boom {attempt}")
        if attempt < POLICY.max_attempts:
            assert job.status is JobStatus.QUEUED
            assert flow.claim("w1") == []  # backing off
            clock.advance((job.run_at - clock.now).total_seconds())
    assert job.status is JobStatus.FAILED and job.error_message == "boom 3"
    requeued = flow.requeue(job_id)
    assert requeued.status is JobStatus.QUEUED and requeued.attempts == 0


def test_error_text_with_nul_is_kept_readable(
        flow: JobFlow, objects: InMemoryObjectStore) -> None:
    queued_job(flow, objects)
    [claim] = flow.claim("w1")
    job = flow.fail(claim, "bad\x00byte", retryable=False)
    assert job.error_message == "bad\\0byte"


def test_requeue_refuses_when_the_object_is_gone(
        flow: JobFlow, objects: InMemoryObjectStore) -> None:
    job_id = queued_job(flow, objects)
    flow.cancel(job_id)
    objects.delete(flow.get(job_id).key)
    with pytest.raises(UploadMissing):
        flow.requeue(job_id)
    assert flow.get(job_id).status is JobStatus.FAILED


def test_reconcile_adopts_expires_and_leaves_fresh_uploads_alone(
        flow: JobFlow, objects: InMemoryObjectStore, clock: ManualClock) -> None:
    forgotten = flow.initiate_upload("alice", content_type="video/mp4")
    objects.put(forgotten.key, b"abc", content_type="video/mp4")
    never = flow.initiate_upload("alice", content_type="video/mp4")
    assert flow.reconcile().total == 0  # too fresh: the client may still call complete
    clock.advance(POLICY.adopt_after_seconds)
    assert flow.reconcile().adopted == (forgotten.job_id,)
    assert flow.get(never.job_id).status is JobStatus.AWAITING_UPLOAD
    clock.advance(POLICY.upload_ttl_seconds)
    assert flow.reconcile().expired == (never.job_id,)
    assert flow.get(never.job_id).status is JobStatus.FAILED


def test_reconcile_never_queues_without_the_store_showing_the_object(
        flow: JobFlow, objects: InMemoryObjectStore, clock: ManualClock) -> None:
    ticket = flow.initiate_upload("alice", content_type="video/mp4")
    objects.put(ticket.key, b"abc", content_type="video/mp4")
    clock.advance(POLICY.adopt_after_seconds)
    objects.unavailable = True
    report = flow.reconcile()
    assert report.unavailable == (ticket.job_id,) and report.adopted == ()
    assert flow.get(ticket.job_id).status is JobStatus.AWAITING_UPLOAD


def test_reconcile_rescues_first_and_one_outage_stops_its_upload_checks(
        flow: JobFlow, objects: InMemoryObjectStore, clock: ManualClock) -> None:
    """An unavailable object store costs one failed check per pass, not one per
    upload; nothing waiting is expired on its account, and a dead worker's job
    is rescued all the same."""
    dead = queued_job(flow, objects)
    flow.claim("dead-worker")
    waiting = []
    for _ in range(3):
        ticket = flow.initiate_upload("alice", content_type="video/mp4")
        objects.put(ticket.key, b"abc", content_type="video/mp4")
        waiting.append(ticket.job_id)
        clock.advance(1)  # deadlines in this order
    clock.advance(POLICY.upload_ttl_seconds)  # every lease and deadline has passed
    objects.unavailable = True

    report = flow.reconcile()

    assert report.rescued == (dead,)
    assert report.unavailable == (waiting[0],)
    assert report.skipped == tuple(waiting[1:])
    assert report.expired == report.adopted == ()
    assert all(flow.get(job_id).status is JobStatus.AWAITING_UPLOAD for job_id in waiting)
    objects.unavailable = False
    assert flow.reconcile().adopted == tuple(waiting)


def test_reconcile_starts_no_upload_check_once_its_budget_is_spent(
        flow: JobFlow, objects: InMemoryObjectStore, clock: ManualClock) -> None:
    dead = queued_job(flow, objects)
    flow.claim("dead-worker")
    ticket = flow.initiate_upload("alice", content_type="video/mp4")
    objects.put(ticket.key, b"abc", content_type="video/mp4")
    clock.advance(POLICY.lease_seconds + POLICY.adopt_after_seconds)

    report = flow.reconcile(budget_seconds=0)

    assert (report.rescued, report.skipped, report.adopted) == ((dead,), (ticket.job_id,), ())
    assert flow.get(ticket.job_id).status is JobStatus.AWAITING_UPLOAD
    for budget in (-1, float("nan"), float("inf"), 3601, "10", True):
        with pytest.raises(InvalidInput):
            flow.reconcile(budget_seconds=budget)  # type: ignore[arg-type]


def test_a_job_keeps_the_size_limit_it_was_created_under(
        store: JobStore, objects: InMemoryObjectStore, clock: ManualClock) -> None:
    """A job created under a 64-byte policy stays rejected for a 100-byte object
    whichever process verifies it (complete, reconcile's adoption, requeue),
    even one whose own policy allows 128 bytes; a stricter process refuses an
    object the job's own policy allows."""
    strict = JobFlow(store=store, objects=objects, clock=clock, logger=QUIET_LOGGER,
                     policy=attrs.evolve(POLICY, adopt_after_seconds=0))
    loose = JobFlow(store=store, objects=objects, clock=clock, logger=QUIET_LOGGER,
                    policy=attrs.evolve(POLICY, max_bytes=128, adopt_after_seconds=0))
    big = b"x" * 100

    def waiting(flow: JobFlow) -> str:
        ticket = flow.initiate_upload("alice", content_type="video/mp4")
        objects.put(ticket.key, big, content_type="video/mp4")
        return ticket.job_id

    completed, adopted, requeued = waiting(strict), waiting(strict), waiting(strict)
    assert store.get(completed).max_bytes == 64
    with pytest.raises(UploadRejected, match="above the limit of 64"):
        loose.complete_upload(completed)
    strict.cancel(requeued)
    with pytest.raises(UploadRejected, match="above the limit of 64"):
        loose.requeue(requeued)
    assert store.get(requeued).error_code == "cancelled", "a refused requeue wrote nothing"
    clock.advance(1)
    report = loose.reconcile()
    assert adopted in report.rejected and adopted not in report.adopted
    assert all(store.get(job_id).upload_verified_at is None
               for job_id in (completed, adopted, requeued))

    roomy = waiting(loose)
    assert store.get(roomy).max_bytes == 128
    with pytest.raises(UploadRejected, match="above the limit of 64"):
        strict.complete_upload(roomy)
    second = waiting(loose)
    assert loose.complete_upload(second).status is JobStatus.QUEUED


def test_bad_claim_and_clock_arguments(flow: JobFlow, store: JobStore,
                                       objects: InMemoryObjectStore) -> None:
    with pytest.raises(InvalidInput, match="limit"):
        flow.claim("w1", limit=0)
    with pytest.raises(InvalidInput, match="worker_id"):
        flow.claim("")
    naive = JobFlow(store=store, objects=objects, clock=lambda: datetime(2026, 1, 1))
    with pytest.raises(ConfigurationError, match="aware UTC"):
        naive.initiate_upload("alice", content_type="video/mp4")


def test_finish_many_ends_each_attempt_as_its_outcome_says(
        flow: JobFlow, objects: InMemoryObjectStore) -> None:
    for _ in range(5):
        queued_job(flow, objects)
    succeeded, retried, failed, released, stale = flow.claim("w1", limit=5)
    flow.release(stale)  # its claim is stale from here on

    outcomes = flow.finish_many([
        Succeeded(succeeded, {"frames": 3}),
        Failed(retried, "flaky", retry_in=timedelta(seconds=7)),
        Failed(failed, "broken", retryable=False, error_code="bad_input"),
        Released(released, "draining"),
        Succeeded(stale),
    ])

    done, queued_again, gave_up, back, lost = outcomes
    assert done.status is JobStatus.DONE and done.result == {"frames": 3}
    assert queued_again.status is JobStatus.QUEUED and queued_again.attempts == 1
    assert queued_again.run_at == flow.now() + timedelta(seconds=7)
    assert gave_up.status is JobStatus.FAILED and gave_up.error_code == "bad_input"
    assert back.status is JobStatus.QUEUED and back.attempts == 0
    assert isinstance(lost, LeaseLost) and lost.job_id == stale.job.id
    for claim, job, event in [(succeeded, done, Event.SUCCEED), (retried, queued_again,
                              Event.RETRY), (failed, gave_up, Event.FAIL),
                              (released, back, Event.RELEASE)]:
        assert flow.get(claim.job.id) == job
        assert flow.history(claim.job.id)[-1].event is event
    assert flow.history(stale.job.id)[-1].event is Event.RELEASE, "a lost lease wrote nothing"


def test_a_deferral_gives_the_attempt_back_until_its_budget_is_spent(
        flow: JobFlow, objects: InMemoryObjectStore, clock: ManualClock) -> None:
    job_id = queued_job(flow, objects)
    [claim] = flow.claim("w1")

    deferred = flow.defer(claim, "object store unavailable")

    assert (deferred.status, deferred.attempts, deferred.deferrals) == (JobStatus.QUEUED, 0, 1)
    assert deferred.run_at == clock.now + timedelta(seconds=POLICY.defer_seconds)
    assert flow.claim("w1") == []  # it backs off like a retry
    clock.advance(POLICY.defer_seconds)
    [claim] = flow.claim("w1")
    assert claim.job.attempts == 1, "the deferred attempt was not counted"
    # POLICY allows one deferral: the next outage fails the job, in a batch too.
    [failed] = flow.finish_many([Deferred(claim, "object store still unavailable")])
    assert isinstance(failed, Job) and failed.status is JobStatus.FAILED
    assert (failed.error_code, failed.attempts, failed.deferrals) == ("storage_unavailable", 1, 1)
    history = flow.history(job_id)
    first, second = [row for row in history if row.event is Event.DEFER]
    assert (first.to_status, first.attempt) == (JobStatus.QUEUED, 0)
    assert first.detail == {"error": "object store unavailable",
                            "error_code": "storage_unavailable",
                            "retry_in_seconds": POLICY.defer_seconds, "deferrals": 1}
    assert second.to_status is JobStatus.FAILED
    assert states.replay(history) is JobStatus.FAILED
    assert flow.requeue(job_id).deferrals == 0  # a requeue starts both budgets afresh


def test_a_batch_mixes_deferrals_with_other_outcomes(
        flow: JobFlow, objects: InMemoryObjectStore, clock: ManualClock) -> None:
    for _ in range(4):
        queued_job(flow, objects)
    succeeded, deferred, later, failed = flow.claim("w1", limit=4)
    stale = attrs.evolve(later, token="not-the-lease")

    outcomes = flow.finish_many([
        Succeeded(succeeded, {"ok": True}),
        Deferred(deferred, "object store unavailable"),
        Deferred(later, "busy", retry_in=timedelta(seconds=30), error_code="retry_later"),
        Failed(failed, "broken", retryable=False),
    ])

    done, back, back_later, gave_up = outcomes
    assert isinstance(done, Job) and done.status is JobStatus.DONE
    assert isinstance(back, Job) and (back.status, back.deferrals) == (JobStatus.QUEUED, 1)
    assert isinstance(back_later, Job) and back_later.error_code == "retry_later"
    assert back_later.run_at == clock.now + timedelta(seconds=30)
    assert isinstance(gave_up, Job) and gave_up.status is JobStatus.FAILED
    with pytest.raises(LeaseLost):
        flow.defer(stale, "too late")
    with pytest.raises(InvalidInput):
        flow.finish_many([Deferred(deferred, "x", retry_in=timedelta(seconds=-1))])


def test_heartbeat_many_renews_every_lease_still_held(
        flow: JobFlow, objects: InMemoryObjectStore, clock: ManualClock) -> None:
    for _ in range(3):
        queued_job(flow, objects)
    first, second, stale = flow.claim("w1", limit=3, lease_seconds=30)
    flow.release(stale)
    clock.advance(10)

    renewed_first, renewed_second, lost = flow.heartbeat_many([first, second, stale],
                                                              lease_seconds=60)

    assert isinstance(lost, LeaseLost)
    for old, new in [(first, renewed_first), (second, renewed_second)]:
        assert isinstance(new, Claim) and new.token == old.token
        assert new.job.lease_expires_at == flow.now() + timedelta(seconds=60)
        assert flow.get(old.job.id) == new.job
        assert flow.history(old.job.id)[-1].event is Event.HEARTBEAT
    flow.succeed(renewed_first, {"ok": True})  # the renewed claim still finishes the job
    assert flow.heartbeat_many([]) == []
    for nonsense in (0, -1, float("nan"), float("inf"), 10**12):
        with pytest.raises(InvalidInput, match="lease_seconds"):
            flow.heartbeat_many([renewed_second], lease_seconds=nonsense)
        with pytest.raises(InvalidInput, match="lease_seconds"):
            flow.heartbeat(renewed_second, lease_seconds=nonsense)
    assert flow.get(second.job.id) == renewed_second.job, "a refused heartbeat wrote nothing"


def test_a_batch_keeps_each_result_exactly_as_given(
        flow: JobFlow, objects: InMemoryObjectStore) -> None:
    """Results Python calls equal but JSON does not ({"n": 1} and {"n": True})
    are each stored as given, as are results shared by the whole batch."""
    for _ in range(4):
        queued_job(flow, objects)
    claims = flow.claim("w1", limit=4)
    results = [{"n": 1}, {"n": True}, {"n": 1}, {"n": 1}]
    flow.finish_many([Succeeded(c, r) for c, r in zip(claims, results, strict=True)])
    stored = [flow.get(claim.job.id).result for claim in claims]
    assert stored == results
    assert [type(result["n"]) for result in stored if result] == [int, bool, int, int]


def test_each_transition_logs_one_line_with_its_context(
        store: JobStore, objects: InMemoryObjectStore, clock: ManualClock) -> None:
    flow = JobFlow(store=store, objects=objects, clock=clock, policy=POLICY)
    with structlog.testing.capture_logs() as logs:
        job_id = queued_job(flow, objects)
        [claim] = flow.claim("w1")
        flow.succeed(claim)
    assert [(e["event"], e["job_id"], e["to_status"]) for e in logs] == [
        ("created", job_id, "awaiting_upload"), ("verify_upload", job_id, "queued"),
        ("claim", job_id, "quick_running"), ("succeed", job_id, "done")]
    assert logs[2]["worker_id"] == "w1" and logs[2]["attempt"] == 1


def test_every_error_is_a_jobflow_error() -> None:
    import jobflow.errors as errors
    exported = [getattr(errors, n) for n in dir(errors) if n[0].isupper()]
    assert all(issubclass(e, JobflowError) for e in exported if isinstance(e, type))


def test_threads_complete_and_claim_at_once(flow: JobFlow, objects: InMemoryObjectStore) -> None:
    tickets = [flow.initiate_upload("alice", content_type="video/mp4") for _ in range(20)]
    for ticket in tickets:
        objects.put(ticket.key, b"abc", content_type="video/mp4")
    barrier = threading.Barrier(8)
    claimed: list[str] = []
    errors: list[BaseException] = []

    def hammer(worker: str) -> None:
        try:
            barrier.wait()
            for ticket in tickets:
                flow.complete_upload(ticket.job_id)
                claimed.extend(c.job.id for c in flow.claim(worker, limit=2))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(f"w{i}",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(claimed) == sorted(t.job_id for t in tickets), "a job claimed twice or lost"
    for ticket in tickets:
        events = [r.event for r in flow.history(ticket.job_id)]
        assert events.count(Event.VERIFY_UPLOAD) == 1 and events.count(Event.CLAIM) == 1
