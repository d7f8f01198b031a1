"""JobFlow.claim_loop on every store: batches claimed one write ahead, each
finished with a later claim; on PostgreSQL in libpq's pipeline mode."""

from __future__ import annotations

import pytest

from jobflow import Event, JobFlow, JobStatus
from jobflow.adapters.memory import InMemoryObjectStore
from jobflow.errors import InvalidInput
from jobflow.ports import JobStore
from tests.conftest import ManualClock


def queue(flow: JobFlow, objects: InMemoryObjectStore, count: int) -> list[str]:
    job_ids = []
    for n in range(count):
        ticket = flow.initiate_upload("alice", {"n": n}, content_type="video/mp4")
        objects.put(ticket.key, b"0123456789", content_type="video/mp4")
        job_ids.append(flow.complete_upload(ticket.job_id).id)
    return job_ids


def events_of(store: JobStore, job_id: str) -> list[Event]:
    return [row.event for row in store.history(job_id)]


def test_a_claim_loop_finishes_every_job_once(flow: JobFlow, store: JobStore,
                                              objects: InMemoryObjectStore) -> None:
    job_ids = queue(flow, objects, 7)
    sizes = []
    with flow.claim_loop("w1", limit=3) as loop:
        for claims in loop:
            sizes.append(len(claims))
            loop.succeed([(claim, {"n": claim.job.params["n"]}) for claim in claims])
    assert sum(sizes) == 7 and max(sizes) <= 3
    assert loop.lost == []
    for job_id in job_ids:
        job = store.get(job_id)
        assert job.status is JobStatus.DONE and job.result == {"n": job.params["n"]}
        assert events_of(store, job_id) == [Event.CREATED, Event.VERIFY_UPLOAD, Event.CLAIM,
                                            Event.SUCCEED]


def test_leaving_a_claim_loop_hands_back_the_jobs_claimed_ahead(
        flow: JobFlow, store: JobStore, objects: InMemoryObjectStore) -> None:
    job_ids = queue(flow, objects, 6)
    with flow.claim_loop("w1", limit=2) as loop:
        first = next(loop)
        loop.succeed([(claim, None) for claim in first])
    done = {claim.job.id for claim in first}
    for job_id in set(job_ids) - done:
        assert store.get(job_id).status is JobStatus.QUEUED
        assert events_of(store, job_id)[-2:] == [Event.CLAIM, Event.RELEASE]
    assert all(store.get(job_id).status is JobStatus.DONE for job_id in done)
    assert len(flow.claim("w2", limit=10)) == 4, "the jobs handed back can be claimed again"


def test_a_batch_finished_some_other_way_lets_the_loop_go_on(
        flow: JobFlow, store: JobStore, objects: InMemoryObjectStore) -> None:
    job_ids = queue(flow, objects, 3)
    with flow.claim_loop("w1", limit=1) as loop:
        for [claim] in loop:
            flow.fail(claim, "not this one", retryable=False)
    assert {store.get(job_id).status for job_id in job_ids} == {JobStatus.FAILED}


def test_a_lost_lease_is_reported_and_the_other_jobs_finish(
        flow: JobFlow, store: JobStore, objects: InMemoryObjectStore,
        clock: ManualClock) -> None:
    queue(flow, objects, 3)
    with flow.claim_loop("w1", limit=3, lease_seconds=30) as loop:
        first, second, third = next(loop)
        kept = [flow.heartbeat(claim, lease_seconds=120) for claim in (first, second)]
        clock.advance(31)
        assert flow.reconcile().rescued == (third.job.id,)
        loop.succeed([(claim, None) for claim in [*kept, third]])
        for claims in loop:  # the rescued job, queued and due again
            loop.succeed([(claim, None) for claim in claims])
    assert [lost.job_id for lost in loop.lost] == [third.job.id]
    assert flow.counts()[JobStatus.DONE] == 3
    assert events_of(store, third.job.id)[2:] == [Event.CLAIM, Event.RESCUE, Event.CLAIM,
                                                  Event.SUCCEED]


def test_a_claim_whose_lease_ran_out_while_it_waited_is_not_given_out(
        flow: JobFlow, store: JobStore, objects: InMemoryObjectStore,
        clock: ManualClock) -> None:
    first, second = queue(flow, objects, 2)
    with flow.claim_loop("w1", limit=1, lease_seconds=30) as loop:
        [claim] = next(loop)
        clock.advance(31)  # the job claimed ahead waited past its lease
        loop.succeed([(claim, None)])
        assert list(loop) == []
    [waited] = {first, second} - {claim.job.id}
    assert store.get(waited).status is JobStatus.QUICK_RUNNING
    assert flow.reconcile().rescued == (waited,)


def test_succeed_takes_the_batch_just_given_out_once(flow: JobFlow,
                                                     objects: InMemoryObjectStore) -> None:
    queue(flow, objects, 2)
    with flow.claim_loop("w1", limit=1) as loop:
        with pytest.raises(InvalidInput, match="batch just given out"):
            loop.succeed([])
        [claim] = next(loop)
        loop.succeed([(claim, None)])
        with pytest.raises(InvalidInput, match="batch just given out"):
            loop.succeed([(claim, None)])
        for [other] in loop:
            loop.succeed([(other, None)])
    assert flow.counts()[JobStatus.DONE] == 2


def test_a_claim_loop_is_used_inside_its_with_block_once(flow: JobFlow) -> None:
    loop = flow.claim_loop("w1", limit=1)
    with pytest.raises(RuntimeError, match="with block"):
        next(loop)
    with loop:
        assert list(loop) == []
    with pytest.raises(RuntimeError, match="with block"):
        next(loop)
    with pytest.raises(RuntimeError, match="runs once"), loop:
        pass
    with pytest.raises(InvalidInput):
        flow.claim_loop("w1", limit=0)
