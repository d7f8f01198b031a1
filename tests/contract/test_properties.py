"""The proof: DESIGN.md's invariants hold on every JobStore, under any sequence
of client, worker, clock and admin actions Hypothesis can find."""

from __future__ import annotations

from datetime import datetime

import attrs
import pytest
from hypothesis import Phase, settings
from hypothesis.stateful import run_state_machine_as_test

from jobflow import Claim, JobStatus, UploadPolicy
from jobflow import states as core
from jobflow.adapters.memory import InMemoryJobStore
from jobflow.models import Change, Event, Job
from tests.conftest import StoreFactory
from tests.contract.jobflow_machine import machine_for


def test_invariants_hold_on_every_store(make_store: StoreFactory) -> None:
    run_state_machine_as_test(machine_for(make_store))


class ClaimsUnverifiedJobs(InMemoryJobStore):
    """Broken on purpose: claim also takes jobs still awaiting their upload."""

    def claim(self, *, worker_id: str, limit: int, now: datetime,
              lease_seconds: float) -> list[Claim]:
        claims = super().claim(worker_id=worker_id, limit=limit, now=now,
                               lease_seconds=lease_seconds)
        for job in self.awaiting_uploads(limit=limit - len(claims)):
            taken = attrs.evolve(job, status=JobStatus.QUICK_RUNNING, lease_token="t" + job.id,
                                 lease_owner=worker_id, attempts=job.attempts + 1,
                                 lease_expires_at=now, updated_at=now)
            written = self.commit(Change(event=Event.CLAIM, before=job, after=taken))
            assert written is not None
            claims.append(Claim(job=written, token="t" + job.id))
        return claims


class IgnoresLeaseToken(InMemoryJobStore):
    """Broken on purpose: compare-and-set checks the status but not the lease token."""

    def commit(self, change: Change) -> Job | None:
        assert change.before is not None
        current = self.get(change.before.id)
        if current.lease_token != change.before.lease_token:
            change = attrs.evolve(change, before=current)
        return super().commit(change)


@pytest.mark.parametrize(("broken_store", "violation"), [
    (ClaimsUnverifiedJobs, "handed to a worker but its object does not exist|unverified"),
    (IgnoresLeaseToken, r"a stale .* (was written over a job|wrote over job)"),
])
def test_the_proof_catches_a_broken_store(broken_store: StoreFactory, violation: str) -> None:
    """A property suite that cannot fail proves nothing: break a store, watch it fail."""
    with pytest.raises(AssertionError, match=violation):
        run_state_machine_as_test(
            machine_for(broken_store),
            settings=settings(max_examples=400, stateful_step_count=50, database=None,
                              phases=[Phase.generate], deadline=None),
        )


def test_the_proof_catches_a_flow_that_verifies_against_its_own_policy_only(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Broken on purpose: verification forgets the size range the job was
    created under, so a looser process queues what the job's policy refuses."""

    def process_policy_only(job: Job, policy: UploadPolicy) -> tuple[int, int]:
        return policy.min_bytes, policy.max_bytes

    monkeypatch.setattr(core, "size_range", process_policy_only)
    # It takes a job created strictly, a larger upload and a loose verification in
    # one run, a rarer path than the broken stores' ones: a larger budget, which
    # costs nothing while the violation is found (the run stops there).
    with pytest.raises((AssertionError, pytest.fail.Exception),
                       match=r"unacceptable upload|looser policy|DID NOT RAISE"):
        run_state_machine_as_test(
            machine_for(InMemoryJobStore),
            settings=settings(max_examples=1000, stateful_step_count=50, database=None,
                              phases=[Phase.generate], deadline=None),
        )


class ForgetsCancelRequests(InMemoryJobStore):
    """Broken on purpose: compare-and-set ignores the cancel request, so a lease
    holder's write decided before the request wipes it out."""

    def commit(self, change: Change) -> Job | None:
        assert change.before is not None
        current = self.get(change.before.id)
        if current.cancel_requested_at != change.before.cancel_requested_at:
            change = attrs.evolve(change, before=current)
        return super().commit(change)


def test_the_proof_catches_a_store_that_forgets_cancel_requests() -> None:
    with pytest.raises(AssertionError, match=r"forgot a cancel request|stale"):
        run_state_machine_as_test(
            machine_for(ForgetsCancelRequests),
            settings=settings(max_examples=1000, stateful_step_count=50, database=None,
                              phases=[Phase.generate], deadline=None),
        )
