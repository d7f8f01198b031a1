"""The JobStore port itself (ports.py), on every store: what a write stores is
exactly what reads give back, compare-and-set loses cleanly, claims apply the
state machine's claim edge, and the reconcile queries keep their order."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import attrs
import pytest

from jobflow import Event, Failed, Job, JobFlow, JobStatus, Succeeded
from jobflow import states as core
from jobflow.adapters.memory import InMemoryObjectStore
from jobflow.errors import InvalidInput, JobNotFound
from jobflow.models import Change
from jobflow.ports import JobStore
from tests.conftest import QUIET_LOGGER, ManualClock
from tests.strategies import POLICY, START

UNKNOWN = "00000000-0000-4000-8000-000000000000"


def queued(flow: JobFlow, objects: InMemoryObjectStore, **params: object) -> Job:
    ticket = flow.initiate_upload("alice", dict(params), content_type="video/mp4")
    objects.put(ticket.key, b"0123456789", content_type="video/mp4")
    return flow.complete_upload(ticket.job_id)


def test_what_is_written_is_what_is_read(flow: JobFlow, store: JobStore,
                                         objects: InMemoryObjectStore) -> None:
    params = {"nested": {"list": [1, 2.5, None, True, "x"]}, "text": "é 漢字 \U0001f3ac",
              "big": 2**70, "empty": {}, "nul": "a\x00b"}
    job = queued(flow, objects, **params)
    [claim] = flow.claim("w1")
    flow.heartbeat(claim, detail={"progress": [0.25, {"stage": "probe"}]})
    done = flow.succeed(claim, {"frames": 12, "names": ["a", "b"]})
    stored = store.get(job.id)
    assert stored == done
    assert stored.params == params and stored.result == {"frames": 12, "names": ["a", "b"]}
    for moment in (stored.created_at, stored.updated_at, stored.run_at,
                   stored.upload_verified_at, stored.finished_at):
        assert moment is not None and moment.utcoffset() == timedelta(0)
    history = store.history(job.id)
    assert [row.seq for row in history] == [1, 2, 3, 4, 5]
    assert history[3].detail == {"progress": [0.25, {"stage": "probe"}],
                                 "lease_expires_at": history[3].detail["lease_expires_at"]}
    assert all(row.at.utcoffset() == timedelta(0) for row in history)


def test_any_utc_timezone_object_reads_back_as_the_same_instant(
        store: JobStore, objects: InMemoryObjectStore) -> None:
    other_utc = timezone(timedelta(0), "Z")
    flow = JobFlow(store=store, objects=objects, policy=POLICY, logger=QUIET_LOGGER,
                   clock=lambda: datetime(2030, 5, 6, 7, 8, 9, 123456, tzinfo=other_utc))
    ticket = flow.initiate_upload("alice", content_type="video/mp4")
    assert store.get(ticket.job_id).created_at == datetime(2030, 5, 6, 7, 8, 9, 123456,
                                                           tzinfo=other_utc)


def test_claim_writes_exactly_what_the_state_machine_decides(
        flow: JobFlow, store: JobStore, objects: InMemoryObjectStore, clock: ManualClock) -> None:
    before = queued(flow, objects)
    now = clock.advance(5)
    [claim] = store.claim(worker_id="w1", limit=3, now=now, lease_seconds=42)
    expected = core.apply(before, Event.CLAIM, core.Evidence(
        now=now, policy=POLICY, new_token=claim.token, worker_id="w1", lease_seconds=42))
    assert claim.job == expected.after == store.get(before.id)
    assert claim.token and claim.job.lease_token == claim.token
    assert store.history(before.id)[-1] == expected.record(seq=3)


def test_claims_take_due_verified_jobs_oldest_first_then_by_id(
        flow: JobFlow, store: JobStore, objects: InMemoryObjectStore, clock: ManualClock) -> None:
    flow.initiate_upload("alice", content_type="video/mp4")  # never verified
    same_moment = sorted(queued(flow, objects).id for _ in range(3))
    clock.advance(10)
    later = queued(flow, objects).id
    assert store.claim(worker_id="w1", limit=5, now=START - timedelta(seconds=1),
                       lease_seconds=60) == []  # nothing is due yet
    assert store.claim(worker_id="w1", limit=0, now=clock.now, lease_seconds=60) == []
    first = store.claim(worker_id="w1", limit=2, now=clock.now, lease_seconds=60)
    rest = store.claim(worker_id="w2", limit=5, now=clock.now, lease_seconds=60)
    assert [c.job.id for c in first + rest] == [*same_moment, later]
    assert len({c.token for c in first + rest}) == 4, "lease tokens are per job"
    assert store.claim(worker_id="w3", limit=5, now=clock.now, lease_seconds=60) == []


def test_compare_and_set_loses_against_a_changed_job(
        flow: JobFlow, store: JobStore, objects: InMemoryObjectStore, clock: ManualClock) -> None:
    job = queued(flow, objects)
    cancel = core.apply(job, Event.CANCEL, core.Evidence(now=clock.now, policy=POLICY))
    [claim] = flow.claim("w1")  # another writer moves the job first
    history = store.history(job.id)
    assert store.commit(cancel) is None
    running = store.get(job.id)
    stale = Change(event=Event.SUCCEED, before=attrs.evolve(running, lease_token="stolen"),
                   after=attrs.evolve(running, status=JobStatus.DONE, lease_token=None))
    assert store.commit(stale) is None
    assert store.get(job.id) == running == claim.job
    assert store.history(job.id) == history


def test_create_refuses_a_job_id_that_exists(flow: JobFlow, store: JobStore,
                                            clock: ManualClock) -> None:
    ticket = flow.initiate_upload("alice", content_type="video/mp4")
    again = core.new_job(job_id=ticket.job_id, owner_id="bob", params={}, bucket="videos",
                         key=ticket.key, content_type="video/mp4", expected_sha256=None,
                         now=clock.now, policy=POLICY)
    with pytest.raises(InvalidInput, match="already exists"):
        store.create(again)
    assert store.get(ticket.job_id).owner_id == "alice"
    assert len(store.history(ticket.job_id)) == 1


def test_unknown_jobs_are_not_found(store: JobStore, clock: ManualClock) -> None:
    with pytest.raises(JobNotFound):
        store.get(UNKNOWN)
    with pytest.raises(JobNotFound):
        store.history(UNKNOWN)
    ghost = core.new_job(job_id=UNKNOWN, owner_id="a", params={}, bucket="videos",
                         key=f"uploads/{UNKNOWN}", content_type="video/mp4",
                         expected_sha256=None, now=clock.now, policy=POLICY).after
    cancel = core.apply(ghost, Event.CANCEL, core.Evidence(now=clock.now, policy=POLICY))
    assert store.commit(cancel) is None
    assert sum(store.counts().values()) == 0


def test_reconcile_queries_keep_their_order_and_limit(
        flow: JobFlow, store: JobStore, objects: InMemoryObjectStore, clock: ManualClock) -> None:
    waiting = [flow.initiate_upload("alice", content_type="video/mp4").job_id]
    clock.advance(1)
    waiting += sorted(flow.initiate_upload("alice", content_type="video/mp4").job_id
                      for _ in range(2))
    assert [j.id for j in store.awaiting_uploads(limit=10)] == waiting
    assert [j.id for j in store.awaiting_uploads(limit=2)] == waiting[:2]
    assert store.awaiting_uploads(limit=0) == []

    queued(flow, objects)
    [early] = flow.claim("w1", lease_seconds=10)
    queued(flow, objects)
    [late] = flow.claim("w2", lease_seconds=20)
    assert store.expired_leases(now=clock.now + timedelta(seconds=9), limit=5) == []
    at_expiry = clock.now + timedelta(seconds=10)
    assert store.expired_leases(now=at_expiry, limit=5) == [store.get(early.job.id)]
    both = store.expired_leases(now=clock.now + timedelta(hours=1), limit=5)
    assert [j.id for j in both] == [early.job.id, late.job.id]
    assert len(store.expired_leases(now=clock.now + timedelta(hours=1), limit=1)) == 1


def test_commit_many_writes_each_winner_and_leaves_each_loser_unchanged(
        flow: JobFlow, store: JobStore, objects: InMemoryObjectStore, clock: ManualClock) -> None:
    for _ in range(3):
        queued(flow, objects)
    first, second, third = flow.claim("w1", limit=3)
    waiting = flow.initiate_upload("alice", content_type="video/mp4").job_id
    now = clock.advance(1)

    def finish(job: Job, token: str, result: dict[str, object]) -> Change:
        return core.apply(job, Event.SUCCEED, core.Evidence(
            now=now, policy=POLICY, token=token, result=result))

    done_first = finish(first.job, first.token, {"n": 1})
    stolen_second = finish(attrs.evolve(second.job, lease_token="stolen"), "stolen", {"n": 2})
    flow.release(third)  # another writer moved the third job on since this snapshot
    stale_third = finish(third.job, third.token, {"n": 3})
    cancel_waiting = core.apply(store.get(waiting), Event.CANCEL,
                                core.Evidence(now=now, policy=POLICY))
    untouched = {job_id: (store.get(job_id), store.history(job_id))
                 for job_id in (second.job.id, third.job.id)}

    written = store.commit_many([done_first, stolen_second, stale_third, cancel_waiting])

    assert written == [done_first.after, None, None, cancel_waiting.after]
    assert store.get(first.job.id) == done_first.after
    assert store.history(first.job.id)[-1] == done_first.record(seq=4)
    assert store.get(waiting) == cancel_waiting.after
    assert store.history(waiting)[-1] == cancel_waiting.record(seq=2)
    for job_id, (job, history) in untouched.items():
        assert store.get(job_id) == job and store.history(job_id) == history
    assert store.commit_many([]) == []
    assert store.commit_many([done_first]) == [None], "a batch write is still compare-and-set"


def test_commit_many_numbers_history_like_single_commits_and_refuses_repeats(
        flow: JobFlow, store: JobStore, objects: InMemoryObjectStore, clock: ManualClock) -> None:
    for _ in range(2):
        queued(flow, objects)
    claims = flow.claim("w1", limit=2)
    flow.heartbeat(claims[0])  # one more history row on the first job only
    current = [store.get(claim.job.id) for claim in claims]
    now = clock.advance(1)
    changes = [core.apply(job, Event.SUCCEED, core.Evidence(
        now=now, policy=POLICY, token=claim.token, result={})) for job, claim in
        zip(current, claims, strict=True)]
    with pytest.raises(InvalidInput, match="one change per job"):
        store.commit_many([changes[0], changes[0]])
    assert [store.get(job.id) for job in current] == current, "a refused batch wrote nothing"
    assert store.commit_many(changes) == [change.after for change in changes]
    assert [[row.seq for row in store.history(job.id)] for job in current] == [
        [1, 2, 3, 4, 5], [1, 2, 3, 4]]
    assert [store.history(job.id)[-1] for job in current] == [
        changes[0].record(seq=5), changes[1].record(seq=4)]
    assert store.counts()[JobStatus.DONE] == 2


def test_values_that_vary_within_a_batch_are_stored_exactly(
        flow: JobFlow, store: JobStore, objects: InMemoryObjectStore) -> None:
    """On PostgreSQL a field that varies within a batch travels as one array
    literal: quotes, backslashes, separators, braces, NULL-like text and NULL
    itself must all come back."""
    awkward = ['say "hi"', "back\\slash", 'both \\"', "a,b", "{braces}", "NULL", " spaced ",
               "", "é 漢字"]
    results: list[dict[str, str] | None] = [{"text": text} for text in awkward] + [None]
    for _ in results:
        queued(flow, objects)
    claims = flow.claim("w1", limit=len(results))
    changes = [core.apply(claim.job, Event.SUCCEED, core.Evidence(
        now=flow.now(), policy=POLICY, token=claim.token, result=result))
        for claim, result in zip(claims, results, strict=True)]
    assert store.commit_many(changes) == [change.after for change in changes]
    assert [store.get(claim.job.id).result for claim in claims] == results
    assert [store.get(claim.job.id) for claim in claims] == [change.after for change in changes]


def test_finish_many_refuses_a_bad_batch_before_writing_anything(
        flow: JobFlow, store: JobStore, objects: InMemoryObjectStore) -> None:
    for _ in range(2):
        queued(flow, objects)
    first, second = flow.claim("w1", limit=2)
    with pytest.raises(InvalidInput, match="at most once"):
        flow.finish_many([Succeeded(first), Failed(first, "again")])
    with pytest.raises(InvalidInput, match="result"):
        flow.finish_many([Succeeded(first), Succeeded(second, {"not json": object()})])
    with pytest.raises(InvalidInput, match="Succeeded, Failed, Released or Deferred"):
        flow.finish_many([Succeeded(first), (second, None)])  # type: ignore[list-item]
    assert [store.get(claim.job.id) for claim in (first, second)] == [first.job, second.job]
    assert flow.finish_many([]) == []
