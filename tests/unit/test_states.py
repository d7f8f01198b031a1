"""The pure core: the transition table, guards and effects, with no I/O."""

from __future__ import annotations

from datetime import timedelta

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobflow import Event, Job, JobStatus, ObjectInfo, UploadPolicy
from jobflow import states as core
from jobflow.errors import (
    ConfigurationError,
    InvalidTransition,
    LeaseLost,
    UploadMissing,
    UploadRejected,
)
from tests.strategies import POLICY, START

KEY = "uploads/00000000-0000-0000-0000-000000000001"


def new_job(**changes: object) -> Job:
    job = core.new_job(job_id=KEY.split("/")[1], owner_id="alice", params={}, bucket="b",
                       key=KEY, content_type="video/mp4", expected_sha256=None, now=START,
                       policy=POLICY).after
    return attrs.evolve(job, **changes)


def obj(size: int = 10, content_type: str = "video/mp4", sha256: str | None = None) -> ObjectInfo:
    return ObjectInfo(key=KEY, size=size, content_type=content_type, etag='"e"', sha256=sha256)


def evidence(**kwargs: object) -> core.Evidence:
    return core.Evidence(now=START, policy=POLICY, **kwargs)  # type: ignore[arg-type]


def queued() -> Job:
    return core.settle_upload(new_job(), evidence(obj=obj())).after


def running(token: str = "tok") -> Job:
    return core.apply(queued(), Event.CLAIM,
                      evidence(new_token=token, worker_id="w1")).after


def test_the_table_is_derived_from_the_transitions_machine() -> None:
    assert core.MACHINE.models == []  # no job is ever attached to the machine
    for event in (Event.RESCUE, Event.DEFER):  # queued while the budget lasts, then failed
        assert [e.dest for e in core.TABLE[event, JobStatus.QUICK_RUNNING]] == [
            JobStatus.QUEUED, JobStatus.FAILED]
    assert (Event.CLAIM, JobStatus.AWAITING_UPLOAD) not in core.TABLE
    sources = {s for (_, s) in core.TABLE}
    assert JobStatus.DONE not in sources  # terminal
    assert {e for (e, s) in core.TABLE if s is JobStatus.FAILED} == {Event.REQUEUE}


def test_verify_records_what_the_store_reported() -> None:
    info = ObjectInfo(key=KEY, size=10, content_type="video/mp4", etag='"abc"',
                      version_id="v1", sha256="ab" * 32)
    change = core.settle_upload(new_job(), evidence(obj=info))
    job = change.after
    assert change.event is Event.VERIFY_UPLOAD and job.status is JobStatus.QUEUED
    assert (job.object_size, job.object_etag, job.object_version_id, job.object_sha256) == (
        10, '"abc"', "v1", "ab" * 32)
    assert job.upload_verified_at == START and job.verified_object == info
    assert change.record(2).detail["version_id"] == "v1"


@pytest.mark.parametrize(("info", "reason"), [
    (obj(size=0), "object is empty"),
    (obj(size=POLICY.max_bytes + 1), "above the limit"),
    (obj(content_type="text/plain"), "not allowed"),
    (obj(content_type="video/quicktime"), "differs from the declared"),
    (attrs.evolve(obj(), key="uploads/other"), "is not the job's key"),
])
def test_a_policy_breaking_object_is_rejected(info: ObjectInfo, reason: str) -> None:
    change = core.settle_upload(new_job(), evidence(obj=info))
    assert change.event is Event.REJECT_UPLOAD and change.after.status is JobStatus.FAILED
    assert change.after.error_code == "upload_rejected"
    assert reason in (change.after.error_message or "")
    assert change.after.upload_verified_at is None


def test_a_declared_checksum_must_be_reported_and_match() -> None:
    job = new_job(expected_sha256="aa" * 32)
    assert core.settle_upload(job, evidence(obj=obj(sha256="aa" * 32))).after.status is (
        JobStatus.QUEUED)
    missing = core.settle_upload(job, evidence(obj=obj(sha256=None))).after
    assert "reports no checksum" in (missing.error_message or "")
    wrong = core.settle_upload(job, evidence(obj=obj(sha256="bb" * 32))).after
    assert "does not match" in (wrong.error_message or "")


def test_no_object_keeps_waiting_until_the_deadline_then_expires() -> None:
    job = new_job()
    with pytest.raises(UploadMissing):
        core.settle_upload(job, evidence())
    late = core.Evidence(now=job.upload_expires_at, policy=POLICY)
    change = core.settle_upload(job, late)
    assert change.event is Event.EXPIRE_UPLOAD and change.after.error_code == "upload_expired"


def test_a_valid_object_found_after_the_deadline_is_still_verified() -> None:
    job = new_job()
    late = core.Evidence(now=job.upload_expires_at + timedelta(seconds=1), policy=POLICY,
                         obj=obj())
    assert core.settle_upload(job, late).event is Event.VERIFY_UPLOAD


def test_claim_needs_a_verified_due_job_with_attempts_left() -> None:
    claim = evidence(new_token="t", worker_id="w1")
    with pytest.raises(InvalidTransition, match=r"cannot claim job .* in awaiting_upload"):
        core.apply(new_job(), Event.CLAIM, claim)
    with pytest.raises(InvalidTransition):
        core.apply(attrs.evolve(queued(), run_at=START + timedelta(seconds=1)), Event.CLAIM, claim)
    with pytest.raises(InvalidTransition):
        core.apply(attrs.evolve(queued(), attempts=POLICY.max_attempts), Event.CLAIM, claim)
    job = core.apply(queued(), Event.CLAIM, claim).after
    assert (job.status, job.attempts, job.lease_token, job.lease_owner) == (
        JobStatus.QUICK_RUNNING, 1, "t", "w1")
    assert job.lease_expires_at == START + timedelta(seconds=POLICY.lease_seconds)


@pytest.mark.parametrize("event", [Event.HEARTBEAT, Event.SUCCEED, Event.RELEASE, Event.DEFER])
def test_lease_events_are_fenced_by_the_token(event: Event) -> None:
    with pytest.raises(LeaseLost):
        core.apply(running("mine"), event, evidence(token="stale"))
    with pytest.raises(LeaseLost):  # rescued and queued again: still "lost", not "invalid"
        core.apply(queued(), event, evidence(token="mine"))
    assert core.apply(running("mine"), event, evidence(token="mine")).after.lease_token in (
        "mine", None)


def test_errors_retry_with_backoff_until_attempts_run_out() -> None:
    job = running()
    retry = core.finish_with_error(job, evidence(token="tok", error="boom"))
    assert retry.event is Event.RETRY and retry.after.status is JobStatus.QUEUED
    assert retry.after.run_at == START + timedelta(seconds=POLICY.backoff_seconds)
    assert retry.after.error_message == "boom" and retry.after.lease_token is None
    last = attrs.evolve(job, attempts=POLICY.max_attempts)
    failed = core.finish_with_error(last, evidence(token="tok", error="boom"))
    assert failed.event is Event.FAIL and failed.after.error_code == "handler_error"
    permanent = core.finish_with_error(job, evidence(token="tok", error="x", retryable=False))
    assert permanent.after.status is JobStatus.FAILED


def test_rescue_requeues_or_fails_only_after_the_lease_expired() -> None:
    job = running()
    with pytest.raises(InvalidTransition):
        core.apply(job, Event.RESCUE, evidence())
    after_lease = core.Evidence(now=job.lease_expires_at or START, policy=POLICY)
    assert core.apply(job, Event.RESCUE, after_lease).after.status is JobStatus.QUEUED
    spent = attrs.evolve(job, attempts=job.max_attempts)
    failed = core.apply(spent, Event.RESCUE, after_lease).after
    assert failed.status is JobStatus.FAILED and failed.error_code == "lease_expired"


def test_release_hands_the_job_back_without_spending_an_attempt() -> None:
    job = running()
    released = core.apply(job, Event.RELEASE, evidence(token="tok")).after
    assert released.status is JobStatus.QUEUED and released.attempts == job.attempts - 1


def test_a_deferral_gives_the_attempt_back_and_backs_off_on_its_own_budget() -> None:
    job = running()
    change = core.apply(job, Event.DEFER, evidence(token="tok", error="S3 is down"))
    deferred = change.after
    assert (change.event, deferred.status) == (Event.DEFER, JobStatus.QUEUED)
    assert (deferred.attempts, deferred.deferrals) == (job.attempts - 1, 1)
    assert deferred.run_at == START + timedelta(seconds=POLICY.defer_seconds)
    assert (deferred.error_code, deferred.lease_token) == ("storage_unavailable", None)
    assert change.detail == {"error": "S3 is down", "error_code": "storage_unavailable",
                             "retry_in_seconds": POLICY.defer_seconds, "deferrals": 1}
    # The next deferral waits twice as long; a given delay and code win.
    again = core.apply(attrs.evolve(job, deferrals=1), Event.DEFER, core.Evidence(
        now=START, policy=attrs.evolve(POLICY, max_deferrals=2), token="tok",
        error="down")).after
    assert again.run_at == START + timedelta(seconds=2 * POLICY.defer_seconds)
    later = core.apply(job, Event.DEFER, evidence(token="tok", error="busy",
                                                  retry_delay=timedelta(seconds=42),
                                                  error_code="retry_later")).after
    assert (later.run_at, later.error_code) == (START + timedelta(seconds=42), "retry_later")


def test_a_spent_deferral_budget_fails_the_job_with_the_deferrals_code() -> None:
    spent = attrs.evolve(running(), deferrals=POLICY.max_deferrals)
    change = core.apply(spent, Event.DEFER, evidence(token="tok", error="S3 is down"))
    failed = change.after
    assert (change.event, failed.status, failed.error_code) == (
        Event.DEFER, JobStatus.FAILED, "storage_unavailable")
    assert (failed.attempts, failed.deferrals) == (spent.attempts, POLICY.max_deferrals)
    assert change.detail["max_deferrals"] == POLICY.max_deferrals
    never = UploadPolicy(max_deferrals=0)
    first = core.apply(running(), Event.DEFER, core.Evidence(now=START, policy=never,
                                                             token="tok", error="down"))
    assert first.after.status is JobStatus.FAILED


def test_deferral_backoff_doubles_and_is_capped() -> None:
    policy = UploadPolicy(defer_seconds=5, defer_max_seconds=300)
    assert [policy.defer_delay(n).total_seconds() for n in (0, 1, 2, 6, 10_000)] == [
        5, 10, 20, 300, 300]


def test_requeue_verifies_the_object_again() -> None:
    failed = core.apply(queued(), Event.CANCEL, evidence()).after
    with pytest.raises(UploadMissing):
        core.apply(failed, Event.REQUEUE, evidence())
    with pytest.raises(UploadRejected):
        core.apply(failed, Event.REQUEUE, evidence(obj=obj(size=0)))
    job = core.apply(attrs.evolve(failed, deferrals=3), Event.REQUEUE,
                     evidence(obj=obj(size=7))).after
    assert job.status is JobStatus.QUEUED and job.object_size == 7
    assert (job.attempts, job.deferrals) == (0, 0)  # a fresh start, both budgets included


@given(st.lists(st.sampled_from(list(Event)), max_size=12))
def test_done_never_changes(events: list[Event]) -> None:
    done = core.apply(running(), Event.SUCCEED, evidence(token="tok")).after
    for event in events:
        with pytest.raises((InvalidTransition, LeaseLost)):
            core.apply(done, event, evidence(token="tok", obj=obj(), new_token="n",
                                             worker_id="w"))


def test_replay_rejects_an_inconsistent_history() -> None:
    created = core.new_job(job_id="j", owner_id="o", params={}, bucket="b", key=KEY,
                           content_type="video/mp4", expected_sha256=None, now=START,
                           policy=POLICY)
    verify = core.settle_upload(created.after, evidence(obj=obj()))
    assert core.replay([created.record(1), verify.record(2)]) is JobStatus.QUEUED
    with pytest.raises(ValueError, match="seq"):
        core.replay([created.record(1), verify.record(3)])
    with pytest.raises(ValueError, match="from"):
        core.replay([verify.record(1)])


@pytest.mark.parametrize("changes", [
    {"max_bytes": 0}, {"min_bytes": -1}, {"min_bytes": 10, "max_bytes": 5},
    {"allowed_content_types": []}, {"lease_seconds": 0}, {"max_attempts": 0},
    {"upload_ttl_seconds": -5}, {"max_deferrals": -1}, {"defer_seconds": 0},
    {"defer_max_seconds": -1},
])
def test_a_malformed_policy_is_refused(changes: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError, match="upload policy"):
        UploadPolicy(**changes)  # type: ignore[arg-type]


def test_backoff_doubles_and_is_capped() -> None:
    policy = UploadPolicy(backoff_seconds=2, backoff_max_seconds=5)
    assert [policy.retry_delay(n).total_seconds() for n in (1, 2, 3)] == [2, 4, 5]


def test_a_transition_copies_the_job_and_leaves_the_snapshot_alone() -> None:
    before = running()
    done = core.apply(before, Event.SUCCEED, evidence(token="tok", result={"n": 1})).after
    assert done == attrs.evolve(before, status=JobStatus.DONE, lease_token=None,
                                lease_owner=None, lease_expires_at=None, finished_at=START,
                                result={"n": 1})
    assert before.status is JobStatus.QUICK_RUNNING and before.lease_token == "tok"
    with pytest.raises(TypeError, match="no field 'colour'"):
        before.evolve(colour="red")


def asked_to_stop(token: str = "tok") -> Job:
    job = running(token)
    change = core.cancel(job, evidence())
    assert change is not None and change.event is Event.REQUEST_CANCEL
    return change.after


def test_cancel_fails_a_job_that_has_not_started_and_asks_a_running_one_to_stop() -> None:
    for waiting in (new_job(), queued()):
        change = core.cancel(waiting, evidence())
        assert change is not None and change.event is Event.CANCEL
        assert (change.after.status, change.after.error_code) == (JobStatus.FAILED, "cancelled")
    job = running("tok")
    asked = asked_to_stop("tok")
    assert asked == attrs.evolve(job, cancel_requested_at=START, updated_at=START)
    assert asked.lease_token == "tok", "the job keeps its lease until its worker stops"
    assert core.cancel(asked, evidence()) is None, "asking again writes nothing"
    with pytest.raises(InvalidTransition, match="cannot request_cancel"):
        core.apply(asked, Event.REQUEST_CANCEL, evidence())
    for finished in (core.apply(job, Event.SUCCEED, evidence(token="tok")).after,
                     core.apply(queued(), Event.CANCEL, evidence()).after):
        with pytest.raises(InvalidTransition, match="cannot cancel"):
            core.cancel(finished, evidence())


def test_a_job_asked_to_stop_still_renews_its_lease_and_its_success_stands() -> None:
    asked = asked_to_stop()
    renewed = core.apply(asked, Event.HEARTBEAT, evidence(token="tok")).after
    assert renewed.status is JobStatus.QUICK_RUNNING and renewed.cancel_requested_at == START
    with pytest.raises(LeaseLost):
        core.apply(asked, Event.HEARTBEAT, evidence(token="stale"))
    done = core.apply(asked, Event.SUCCEED, evidence(token="tok", result={"n": 1})).after
    assert (done.status, done.result, done.error_code) == (JobStatus.DONE, {"n": 1}, None)


@pytest.mark.parametrize(("retryable", "code"), [(True, None), (False, "unsupported")])
def test_a_job_asked_to_stop_that_fails_is_cancelled_and_never_retried(
        retryable: bool, code: str | None) -> None:
    change = core.finish_with_error(asked_to_stop(), evidence(
        token="tok", error="ValueError: boom", retryable=retryable, error_code=code))
    assert change.event is Event.FAIL
    assert (change.after.status, change.after.error_code) == (JobStatus.FAILED, "cancelled")
    assert change.after.error_message == "ValueError: boom"
    assert change.detail["error_code"] == "cancelled"


def test_a_job_asked_to_stop_is_never_rescued_or_released_back_to_the_queue() -> None:
    asked = asked_to_stop()
    after_lease = core.Evidence(now=asked.lease_expires_at or START, policy=POLICY)
    rescued = core.apply(asked, Event.RESCUE, after_lease)
    assert (rescued.after.status, rescued.after.error_code) == (JobStatus.FAILED, "cancelled")
    assert rescued.detail == {"lost_worker": "w1"}
    released = core.apply(asked, Event.RELEASE, evidence(token="tok")).after
    assert (released.status, released.error_code) == (JobStatus.FAILED, "cancelled")
    assert released.lease_token is None and released.attempts == asked.attempts
    with pytest.raises(LeaseLost):
        core.apply(asked, Event.RELEASE, evidence(token="stale"))


def test_requeue_forgets_a_cancel_request() -> None:
    failed = core.apply(asked_to_stop(), Event.FAIL, evidence(token="tok", error="x")).after
    assert failed.cancel_requested_at == START
    requeued = core.apply(failed, Event.REQUEUE, evidence(obj=obj())).after
    assert requeued.status is JobStatus.QUEUED and requeued.cancel_requested_at is None


def test_a_history_with_a_cancel_request_replays_to_its_status() -> None:
    created = core.new_job(job_id="j", owner_id="o", params={}, bucket="b", key=KEY,
                           content_type="video/mp4", expected_sha256=None, now=START,
                           policy=POLICY)
    verify = core.settle_upload(created.after, evidence(obj=obj()))
    claim = core.apply(verify.after, Event.CLAIM, evidence(new_token="t", worker_id="w1"))
    ask = core.cancel(claim.after, evidence())
    assert ask is not None
    release = core.apply(ask.after, Event.RELEASE, evidence(token="t"))
    history = [c.record(n) for n, c in enumerate((created, verify, claim, ask, release), 1)]
    assert core.replay(history) is JobStatus.FAILED
