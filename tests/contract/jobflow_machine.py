"""A Hypothesis state machine that drives JobFlow and checks DESIGN.md's invariants.

``machine_for(make_store)`` builds the machine for one JobStore factory, so the
same proof runs against every adapter. Reads and compare-and-set writes are
separate rules for completion, cancellation and finishing, so Hypothesis
chooses how concurrent callers interleave.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    multiple,
    rule,
)

from jobflow import (
    Claim,
    Deferred,
    Event,
    Failed,
    Job,
    JobFlow,
    JobStatus,
    Outcome,
    Released,
    Succeeded,
    UploadPolicy,
)
from jobflow import states as core
from jobflow.adapters.memory import InMemoryObjectStore
from jobflow.errors import (
    InvalidTransition,
    JobNotFound,
    LeaseLost,
    UploadExpired,
    UploadMissing,
    UploadRejected,
)
from jobflow.models import Change
from jobflow.ports import JobStore
from tests import strategies as S
from tests.conftest import QUIET_LOGGER

VERIFYING = {Event.VERIFY_UPLOAD, Event.REQUEUE}
LEASE_EVENTS = {Event.HEARTBEAT, Event.SUCCEED, Event.RETRY, Event.FAIL, Event.RELEASE,
                Event.DEFER}


class JobFlowMachine(RuleBasedStateMachine):
    make_store: Callable[[], JobStore]

    jobs = Bundle("jobs")
    claims = Bundle("claims")
    pending = Bundle("pending")

    def __init__(self) -> None:
        super().__init__()
        self.now = S.START
        self.store = self.new_store()
        self.objects = InMemoryObjectStore()
        ids = S.job_ids()
        self.flow = self.new_flow(S.POLICY, ids)
        # A second process over the same store whose policy allows larger uploads.
        self.loose_flow = self.new_flow(S.LOOSE_POLICY, ids)
        self.created_loose: dict[str, bool] = {}
        self.job_ids: list[str] = []
        self.declared: dict[str, bool] = {}
        self.owner: dict[str, str] = {}
        self.upload: dict[str, str | None] = {}
        self.undecided: Counter[str] = Counter()  # pending changes not yet committed

    # -- helpers -------------------------------------------------------------------

    def new_store(self) -> JobStore:
        return type(self).make_store()

    def new_flow(self, policy: UploadPolicy, ids: Callable[[], str]) -> JobFlow:
        """A flow over the machine's store and objects, on the machine's clock
        (tests/aio drives AsyncJobFlow through this instead)."""
        return JobFlow(store=self.store, objects=self.objects, clock=lambda: self.now,
                       policy=policy, logger=QUIET_LOGGER, new_job_id=ids)

    def acceptable(self, job_id: str, via_loose: bool = False) -> bool:
        """Whether the job's upload is acceptable to the verifying flow: a job
        created under the strict policy stays bound to it, whoever verifies."""
        return S.acceptable(self.upload[job_id], self.declared[job_id],
                            loose=via_loose and self.created_loose[job_id])

    def _flow(self, loose: bool) -> JobFlow:
        return self.loose_flow if loose else self.flow

    def unchanged(self, before: Job) -> None:
        assert self.flow.get(before.id) == before, "a refused call changed the job"

    # -- the client's side ---------------------------------------------------------

    @rule(target=jobs, owner=S.owners, params=S.params, declare=st.booleans(),
          loose=st.booleans())
    def initiate(self, owner: str, params: dict[str, Any], declare: bool,
                 loose: bool = False) -> str:
        # A checksum is declared before the job id exists, so a declaring job
        # declares its owner's fixed payload, which its "valid" upload sends.
        ticket = self._flow(loose).initiate_upload(
            owner, params, content_type="video/mp4",
            sha256=S.payload_sha256(owner) if declare else None)
        job = self.flow.get(ticket.job_id)
        assert job.status is JobStatus.AWAITING_UPLOAD
        assert ticket.key == job.key and ticket.job_id in job.key
        assert job.params == params and job.owner_id == owner
        self.job_ids.append(job.id)
        self.declared[job.id] = declare
        self.owner[job.id] = owner
        self.upload[job.id] = None
        self.created_loose[job.id] = loose
        policy = S.LOOSE_POLICY if loose else S.POLICY
        assert (job.min_bytes, job.max_bytes) == (policy.min_bytes, policy.max_bytes)
        return job.id

    @rule(target=jobs, owner=S.owners)
    def initiate_upload_complete(self, owner: str) -> str:
        """The happy path in one step, so runs reach the worker's side often."""
        job_id = self.initiate(owner, {}, declare=False)
        self.upload_object(job_id, "valid")
        self.complete(job_id, right_owner=True)
        return job_id

    @rule(job_id=jobs, kind=S.upload_kinds)
    def upload_object(self, job_id: str, kind: str) -> None:
        seed = self.owner[job_id] if self.declared[job_id] else job_id
        data, content_type = S.upload_for(kind, seed, "video/mp4")
        self.objects.put(self.flow.get(job_id).key, data, content_type=content_type)
        self.upload[job_id] = kind

    @rule(job_id=jobs, kind=S.upload_kinds, via_loose=st.booleans())
    def upload_and_complete(self, job_id: str, kind: str, via_loose: bool) -> None:
        self.upload_object(job_id, kind)
        self.complete(job_id, right_owner=True, via_loose=via_loose)

    @rule(job_id=jobs)
    def delete_object(self, job_id: str) -> None:
        job = self.flow.get(job_id)
        # Removing a verified object from under a queued job is outside the
        # contract; a client may remove an unverified upload, and an operator
        # may clean up after a job has ended.
        if job.status in (JobStatus.QUEUED, JobStatus.QUICK_RUNNING) or self.undecided[job_id]:
            return
        self.objects.delete(job.key)
        self.upload[job_id] = None

    @rule(job_id=jobs, right_owner=st.booleans(), via_loose=st.booleans())
    def complete(self, job_id: str, right_owner: bool, via_loose: bool = False) -> None:
        flow = self._flow(via_loose)
        before = self.flow.get(job_id)
        owner = self.owner[job_id] if right_owner else "mallory"
        if not right_owner:
            with pytest.raises(JobNotFound):
                flow.complete_upload(job_id, owner_id=owner)
            return self.unchanged(before)
        verify_events = self._count(job_id, Event.VERIFY_UPLOAD)
        try:
            job = flow.complete_upload(job_id, owner_id=owner)
        except UploadMissing:
            assert before.status is JobStatus.AWAITING_UPLOAD and self.upload[job_id] is None
            assert self.now < before.upload_expires_at
            return self.unchanged(before)
        except UploadRejected:
            after = self.flow.get(job_id)
            assert after.status is JobStatus.FAILED and after.upload_verified_at is None
            if before.status is JobStatus.AWAITING_UPLOAD:
                assert self.upload[job_id] is not None
                assert not self.acceptable(job_id, via_loose)
            return None
        except UploadExpired:
            after = self.flow.get(job_id)
            assert after.status is JobStatus.FAILED and after.upload_verified_at is None
            if before.status is JobStatus.AWAITING_UPLOAD:
                assert self.upload[job_id] is None and self.now >= before.upload_expires_at
            return None
        except InvalidTransition:
            assert before.status is JobStatus.FAILED and before.upload_verified_at is None
            return self.unchanged(before)
        if before.status is JobStatus.AWAITING_UPLOAD:
            assert self.acceptable(job_id, via_loose), (
                f"queued an unacceptable upload {self.upload[job_id]}")
            assert job.status is JobStatus.QUEUED
            assert self._count(job_id, Event.VERIFY_UPLOAD) == verify_events + 1
        else:
            assert job == before, "completing a verified job again changed it"
            assert self._count(job_id, Event.VERIFY_UPLOAD) == verify_events

    # -- interleavings: decide now, compare-and-set later -----------------------------

    @rule(target=pending, job_id=jobs)
    def decide_completion(self, job_id: str) -> Change | Any:
        job = self.flow.get(job_id)
        try:
            change = core.settle_upload(job, core.Evidence(
                now=self.now, policy=S.POLICY, obj=self.objects.head(job.key)))
        except (UploadMissing, InvalidTransition):
            return multiple()
        self.undecided[job_id] += 1
        return change

    @rule(target=pending, job_id=jobs)
    def decide_cancel(self, job_id: str) -> Change | Any:
        """An operator's cancel, decided now and written later: a running job's
        worker may heartbeat or finish in between."""
        try:
            change = core.cancel(self.flow.get(job_id),
                                 core.Evidence(now=self.now, policy=S.POLICY))
        except InvalidTransition:
            return multiple()
        if change is None:
            return multiple()
        self.undecided[job_id] += 1
        return change

    @rule(target=pending, claim=claims, succeed=st.booleans())
    def decide_finish(self, claim: Claim, succeed: bool) -> Change | Any:
        job = self.flow.get(claim.job.id)
        evidence = core.Evidence(now=self.now, policy=S.POLICY, token=claim.token,
                                 error="boom", result={"ok": True})
        try:
            change = (core.apply(job, Event.SUCCEED, evidence) if succeed
                      else core.finish_with_error(job, evidence))
        except LeaseLost:
            return multiple()
        self.undecided[job.id] += 1
        return change

    @rule(change=consumes(pending))
    def commit_decision(self, change: Change) -> None:
        assert change.before is not None
        self.undecided[change.before.id] -= 1
        current = self.flow.get(change.before.id)
        fresh = (current.status is change.before.status
                 and current.lease_token == change.before.lease_token
                 and current.cancel_requested_at == change.before.cancel_requested_at)
        written = self.store.commit(change)
        if fresh:
            assert written == change.after, "a compare-and-set on a fresh snapshot failed"
        else:
            assert written is None, (
                f"a stale {change.event} was written over a job that is now {current.status}")
            self.unchanged(current)

    # -- the worker's side -----------------------------------------------------------

    @rule(target=claims, worker=S.workers, limit=S.claim_limits)
    def claim(self, worker: str, limit: int) -> Any:
        return multiple(*self._check_claims(self.flow.claim(worker, limit=limit), worker, limit))

    def _check_claims(self, claims: list[Claim], worker: str, limit: int) -> list[Claim]:
        assert len(claims) <= limit
        for claim in claims:
            job = claim.job
            assert job.status is JobStatus.QUICK_RUNNING and job.lease_token == claim.token
            assert job.lease_owner == worker and job.run_at <= self.now
            assert self.objects.head(job.key) is not None, (
                f"job {job.id} was handed to a worker but its object does not exist")
            verified = job.verified_object
            assert verified is not None, f"job {job.id} was handed out unverified"
            policy = S.LOOSE_POLICY if self.created_loose[job.id] else S.POLICY
            assert policy.min_bytes <= verified.size <= policy.max_bytes, (
                f"job {job.id} was handed out verified against a looser policy than its own")
        if len(claims) < limit:
            left = [j for j in self._jobs()
                    if j.status is JobStatus.QUEUED and j.run_at <= self.now]
            assert not left, "claim left due, queued jobs behind"
        return claims

    @rule(claim=claims)
    def heartbeat(self, claim: Claim) -> None:
        renewed = self._leased(claim, lambda: self.flow.heartbeat(claim).job)
        if renewed is not None:
            assert renewed.status is JobStatus.QUICK_RUNNING
            assert renewed.lease_expires_at == self.now + timedelta(seconds=S.POLICY.lease_seconds)

    @rule(claim=claims, result=st.none() | st.just({"frames": 3}))
    def succeed(self, claim: Claim, result: dict[str, int] | None) -> None:
        job = self._leased(claim, lambda: self.flow.succeed(claim, result))
        if job is not None:
            assert job.status is JobStatus.DONE and job.result == (result or {})

    @rule(batch=st.lists(st.tuples(claims, S.outcome_kinds), min_size=1, max_size=4,
                         unique_by=lambda item: item[0].job.id))
    def finish_batch(self, batch: list[tuple[Claim, str]]) -> None:
        """End several attempts in one write, as the Worker's outcome buffer does:
        exactly those whose token is current win, each as its outcome says."""
        before = {claim.job.id: self.flow.get(claim.job.id) for claim, _ in batch}
        outcomes = self.flow.finish_many([_outcome(claim, kind, index)
                                          for index, (claim, kind) in enumerate(batch)])
        assert len(outcomes) == len(batch)
        for index, ((claim, kind), outcome) in enumerate(zip(batch, outcomes, strict=True)):
            job = before[claim.job.id]
            if not self._holds(job, claim, outcome):
                continue
            assert isinstance(outcome, Job)
            assert self.flow.get(job.id) == outcome
            asked = job.cancel_requested_at is not None
            expected = {"succeeded": JobStatus.DONE,
                        "release": JobStatus.FAILED if asked else JobStatus.QUEUED,
                        "fail": JobStatus.FAILED,
                        "retry": JobStatus.QUEUED if job.attempts < job.max_attempts
                        and not asked else JobStatus.FAILED,
                        "defer": JobStatus.QUEUED
                        if job.deferrals < S.POLICY.max_deferrals and not asked
                        else JobStatus.FAILED}[kind]
            assert outcome.status is expected, (kind, outcome)
            if kind == "succeeded":
                assert outcome.result == {"item": index}
            elif asked:
                assert outcome.error_code == "cancelled", (kind, outcome)
            if kind == "release" and not asked:
                assert outcome.attempts == job.attempts - 1
            if kind == "defer":
                self._check_deferred(job, outcome)

    @rule(batch=st.lists(claims, min_size=1, max_size=4, unique_by=lambda c: c.job.id))
    def heartbeat_batch(self, batch: list[Claim]) -> None:
        """Renew several leases in one write, as the Worker's supervisor does."""
        before = {claim.job.id: self.flow.get(claim.job.id) for claim in batch}
        renewed = self.flow.heartbeat_many(batch)
        for claim, outcome in zip(batch, renewed, strict=True):
            if self._holds(before[claim.job.id], claim, outcome):
                assert isinstance(outcome, Claim) and outcome.token == claim.token
                assert outcome.job.lease_expires_at == self.now + timedelta(
                    seconds=S.POLICY.lease_seconds)
                assert self.flow.get(claim.job.id) == outcome.job

    def _holds(self, job: Job, claim: Claim, outcome: object) -> bool:
        """Whether ``claim`` held ``job``'s lease before a batch write; if not,
        the batch must have answered LeaseLost and left the job alone."""
        if job.status is JobStatus.QUICK_RUNNING and job.lease_token == claim.token:
            assert not isinstance(outcome, LeaseLost), f"a current lease lost: {outcome}"
            return True
        assert isinstance(outcome, LeaseLost) and outcome.job_id == job.id, (
            f"a stale lease holder wrote over job {job.id} ({job.status})")
        self.unchanged(job)
        return False

    @rule(claim=claims, retryable=st.booleans())
    def fail(self, claim: Claim, retryable: bool) -> None:
        asked = self.flow.get(claim.job.id).cancel_requested_at is not None
        job = self._leased(claim, lambda: self.flow.fail(claim, "boom", retryable=retryable))
        if job is not None:
            retried = retryable and job.attempts < job.max_attempts and not asked
            if asked:
                assert job.error_code == "cancelled"
            assert job.status is (JobStatus.QUEUED if retried else JobStatus.FAILED)
            if retried:
                assert job.run_at > self.now

    @rule(worker=S.workers)
    def attempt_during_outage(self, worker: str) -> None:
        """A worker claims a job and meets an unavailable object store: the
        attempt is deferred at once (due again now, so that runs reach a
        spent deferral budget)."""
        for claim in self._check_claims(self.flow.claim(worker), worker, 1):
            before = self.flow.get(claim.job.id)
            job = self.flow.defer(claim, "object store unavailable", retry_in=timedelta(0))
            self._check_deferred(before, job, immediate=True)

    def _check_deferred(self, before: Job, job: Job, immediate: bool = False) -> None:
        """A deferral gives the attempt back and spends one of the deferral
        budget; with that budget spent, the job fails instead."""
        asked = before.cancel_requested_at is not None
        if before.deferrals < S.POLICY.max_deferrals and not asked:
            assert job.status is JobStatus.QUEUED
            assert job.run_at == self.now if immediate else job.run_at > self.now
            assert (job.attempts, job.deferrals) == (before.attempts - 1, before.deferrals + 1)
        else:
            assert job.status is JobStatus.FAILED
            assert (job.attempts, job.deferrals) == (before.attempts, before.deferrals)
        assert job.error_code == ("cancelled" if asked else "storage_unavailable")

    @rule(claim=claims)
    def release(self, claim: Claim) -> None:
        before = self.flow.get(claim.job.id)
        job = self._leased(claim, lambda: self.flow.release(claim))
        if job is None:
            return
        if before.cancel_requested_at is not None:  # asked to stop: it ends here
            assert job.status is JobStatus.FAILED and job.error_code == "cancelled"
            assert job.attempts == before.attempts
        else:
            assert job.status is JobStatus.QUEUED and job.attempts == before.attempts - 1

    def _leased(self, claim: Claim, call: Callable[[], Any]) -> Any:
        before = self.flow.get(claim.job.id)
        holds = before.status is JobStatus.QUICK_RUNNING and before.lease_token == claim.token
        if holds:
            job = call()
            assert job.lease_token in (None, claim.token)
            return job
        try:
            call()
        except LeaseLost:
            self.unchanged(before)
            return None
        raise AssertionError(f"a stale lease holder wrote over job {before.id} ({before.status})")

    @rule(seconds=S.clock_steps)
    def advance_clock(self, seconds: int) -> None:
        """Time passes; a worker that stopped heartbeating has died."""
        self.now += timedelta(seconds=seconds)

    # -- housekeeping and admin --------------------------------------------------------

    @rule(via_loose=st.booleans())
    def reconcile(self, via_loose: bool) -> None:
        before = {j.id: j for j in self._jobs()}
        report = self._flow(via_loose).reconcile()
        for job_id in report.adopted:
            assert before[job_id].status is JobStatus.AWAITING_UPLOAD
            assert self.acceptable(job_id, via_loose)
            assert self.flow.get(job_id).status is JobStatus.QUEUED
        for job_id in report.rejected:
            assert not self.acceptable(job_id, via_loose) and self.upload[job_id] is not None
        for job_id in report.expired:
            assert self.upload[job_id] is None
            assert self.now >= before[job_id].upload_expires_at
        for job_id in report.rescued + report.lease_failed:
            lease = before[job_id].lease_expires_at
            assert lease is not None and lease <= self.now
        for job in self._jobs():  # nothing overdue is left behind
            assert not (job.status is JobStatus.QUICK_RUNNING
                        and job.lease_expires_at is not None and job.lease_expires_at <= self.now)
            assert not (job.status is JobStatus.AWAITING_UPLOAD
                        and job.upload_expires_at <= self.now)

    @rule(job_id=jobs)
    def cancel(self, job_id: str) -> None:
        before = self.flow.get(job_id)
        if before.status in (JobStatus.AWAITING_UPLOAD, JobStatus.QUEUED):
            job = self.flow.cancel(job_id)
            assert job.status is JobStatus.FAILED and job.error_code == "cancelled"
        elif before.status is JobStatus.QUICK_RUNNING:
            # Asked to stop: the job keeps its lease; a second request changes nothing.
            job = self.flow.cancel(job_id)
            assert job == self.flow.get(job_id)
            assert job.status is JobStatus.QUICK_RUNNING
            assert (job.lease_token, job.lease_owner) == (before.lease_token,
                                                          before.lease_owner)
            assert job.cancel_requested_at == (before.cancel_requested_at or self.now)
            if before.cancel_requested_at is not None:
                self.unchanged(before)
        else:
            with pytest.raises(InvalidTransition):
                self.flow.cancel(job_id)
            self.unchanged(before)

    @rule(job_id=jobs, via_loose=st.booleans())
    def requeue(self, job_id: str, via_loose: bool) -> None:
        flow = self._flow(via_loose)
        before = self.flow.get(job_id)
        if before.status is not JobStatus.FAILED:
            with pytest.raises(InvalidTransition):
                flow.requeue(job_id)
            return self.unchanged(before)
        if self.upload[job_id] is None:
            with pytest.raises(UploadMissing):
                flow.requeue(job_id)
            return self.unchanged(before)
        if not self.acceptable(job_id, via_loose):
            with pytest.raises(UploadRejected):
                flow.requeue(job_id)
            return self.unchanged(before)
        job = flow.requeue(job_id)
        assert job.status is JobStatus.QUEUED and job.attempts == 0
        assert job.upload_verified_at == self.now
        return None

    @rule(error_code=S.failure_causes, via_loose=st.booleans())
    def requeue_failed(self, error_code: str, via_loose: bool) -> None:
        """Requeue every failed job of one cause, in pages of two: exactly those
        whose object is acceptable now go back to the queue, the others stay."""
        before = {job.id: job for job in self._jobs()}
        report = self._flow(via_loose).requeue_failed(error_code, batch_size=2)
        assert report.stopped is None and report.skipped == report.unavailable == ()
        chosen = {job_id for job_id, job in before.items()
                  if job.status is JobStatus.FAILED and job.error_code == error_code}
        assert set(report.requeued) | set(report.still_failing) == chosen
        for job_id, job in before.items():
            after = self.flow.get(job_id)
            if job_id in report.requeued:
                assert self.acceptable(job_id, via_loose), "requeued an unacceptable upload"
                assert after.status is JobStatus.QUEUED and after.upload_verified_at == self.now
            else:
                assert job_id not in chosen or not self.acceptable(job_id, via_loose)
                assert after == job, "a job not requeued changed"

    # -- the invariants of DESIGN.md, after every step ---------------------------------

    def _jobs(self) -> list[Job]:
        return [self.flow.get(job_id) for job_id in self.job_ids]

    def _count(self, job_id: str, event: Event) -> int:
        return sum(1 for row in self.flow.history(job_id) if row.event is event)

    @invariant()
    def invariants_hold(self) -> None:
        tokens: list[str] = []
        statuses: Counter[JobStatus] = Counter()
        for job in self._jobs():
            statuses[job.status] += 1
            history = self.flow.history(job.id)
            # 6. History is the truth: folding the events gives the status.
            assert core.replay(history) is job.status
            assert all(row.at <= self.now for row in history)
            # 1. Never claimed before verified (the row and its history agree).
            if job.status not in core.UNVERIFIED_ALLOWED:
                assert job.upload_verified_at is not None
            verified = False
            for row in history:
                if row.event in VERIFYING:
                    verified = True
                elif row.event is Event.CLAIM:
                    assert verified, f"job {job.id} was claimed before its upload was verified"
                if row.to_status in core.UNVERIFIED_ALLOWED:
                    verified = False
            # 2. One live lease, held only while running.
            if job.status is JobStatus.QUICK_RUNNING:
                assert job.lease_token is not None and job.lease_expires_at is not None
                tokens.append(job.lease_token)
            else:
                assert job.lease_token is None and job.lease_owner is None
            # A cancel request is kept from the request until the job is requeued:
            # a running job has one exactly when its history asked since its
            # claim, and a job asked to stop never goes back to the queue.
            asked = False
            for row in history:
                if row.event is Event.REQUEST_CANCEL:
                    asked = True
                elif asked and row.event is not Event.HEARTBEAT:
                    assert row.to_status is not JobStatus.QUEUED or row.event is Event.REQUEUE, (
                        f"job {job.id} was asked to stop but went back to the queue")
                    if row.to_status is JobStatus.FAILED:
                        assert row.detail.get("error_code", "cancelled") == "cancelled"
                    asked = row.to_status is not JobStatus.QUEUED
            if job.status is JobStatus.QUICK_RUNNING:
                assert (job.cancel_requested_at is not None) == asked, (
                    f"job {job.id} forgot a cancel request" if asked
                    else f"job {job.id} has a cancel request nobody made")
            elif job.status in (JobStatus.AWAITING_UPLOAD, JobStatus.QUEUED):
                assert job.cancel_requested_at is None
            elif job.status is JobStatus.FAILED and job.cancel_requested_at is not None:
                assert job.error_code == "cancelled"
            # 3. Idempotent completion.
            assert sum(1 for row in history if row.event is Event.VERIFY_UPLOAD) <= 1
            # 4. Terminal is terminal: nothing after done, only requeue after failed.
            for row, following in itertools.pairwise(history):
                assert row.to_status is not JobStatus.DONE
                if row.to_status is JobStatus.FAILED:
                    assert following.event is Event.REQUEUE
            # 8. A job's own policy binds it: no verification accepted more.
            if job.upload_verified_at is not None:
                assert job.object_size is not None and job.max_bytes is not None
                policy = S.LOOSE_POLICY if self.created_loose[job.id] else S.POLICY
                assert job.max_bytes == policy.max_bytes
                assert policy.min_bytes <= job.object_size <= policy.max_bytes, (
                    f"job {job.id} was verified against a looser policy than its own")
            # 5. Bounded attempts, and deferrals bounded by their own budget:
            # each one since the last requeue is a defer row back to queued.
            assert 0 <= job.attempts <= job.max_attempts
            assert history[-1].attempt == job.attempts
            assert 0 <= job.deferrals <= S.POLICY.max_deferrals
            deferred = 0
            for row in history:
                if row.event is Event.REQUEUE:
                    deferred = 0
                elif row.event is Event.DEFER and row.to_status is JobStatus.QUEUED:
                    deferred += 1
            assert job.deferrals == deferred
        assert len(tokens) == len(set(tokens)), "two running jobs share a lease token"
        assert self.flow.counts() == {s: statuses[s] for s in JobStatus}


def machine_for(make_store: Callable[[], JobStore]) -> type[JobFlowMachine]:
    """The state machine bound to one JobStore factory."""
    return type("JobFlowMachineFor", (JobFlowMachine,), {"make_store": staticmethod(make_store)})


def _outcome(claim: Claim, kind: str, index: int) -> Outcome:
    if kind == "succeeded":
        return Succeeded(claim, {"item": index})
    if kind == "release":
        return Released(claim)
    if kind == "defer":
        return Deferred(claim, "object store unavailable")
    return Failed(claim, "boom", retryable=kind == "retry")
