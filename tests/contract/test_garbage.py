"""Garbage in, named errors out: every public method of JobFlow, fed generated
nonsense in one argument, either accepts it or raises a jobflow error, and a
refused call changes no job and no history, on every store."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobflow import Claim, Deferred, Failed, JobFlow, Released, Succeeded
from jobflow.adapters.memory import InMemoryObjectStore
from jobflow.errors import JobflowError
from tests.conftest import QUIET_LOGGER, ManualClock, StoreFactory
from tests.strategies import GARBAGE, POLICY


def deep(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"d": value}
    return value


class World:
    """A flow over a fresh store with a job in each state a call may meet."""

    def __init__(self, make_store: StoreFactory) -> None:
        self.objects = InMemoryObjectStore(bucket="videos")
        self.flow = JobFlow(store=make_store(), objects=self.objects, clock=ManualClock(),
                            policy=POLICY, logger=QUIET_LOGGER)
        self.waiting = self.flow.initiate_upload("alice", content_type="video/mp4").job_id
        queued = self.flow.initiate_upload("alice", content_type="video/mp4")
        self.objects.put(queued.key, b"0123456789", content_type="video/mp4")
        self.flow.complete_upload(queued.job_id)
        [self.claim] = self.flow.claim("w1")
        self.ids = [self.waiting, queued.job_id]

    def snapshot(self) -> list[Any]:
        return [(self.flow.get(job_id), self.flow.history(job_id)) for job_id in self.ids]


# Each call puts the garbage ``g`` in one argument; the others are valid.
CALLS: dict[str, Any] = {
    "initiate owner": lambda w, g: w.flow.initiate_upload(g, content_type="video/mp4"),
    "initiate params": lambda w, g: w.flow.initiate_upload("bob", g, content_type="video/mp4"),
    "initiate content type": lambda w, g: w.flow.initiate_upload("bob", content_type=g),
    "initiate sha256": lambda w, g: w.flow.initiate_upload("bob", content_type="video/mp4",
                                                           sha256=g),
    "complete job id": lambda w, g: w.flow.complete_upload(g),
    "complete owner": lambda w, g: w.flow.complete_upload(w.waiting, owner_id=g),
    "get": lambda w, g: w.flow.get(g),
    "history": lambda w, g: w.flow.history(g),
    "cancel": lambda w, g: w.flow.cancel(g),
    "requeue": lambda w, g: w.flow.requeue(g),
    "claim worker": lambda w, g: w.flow.claim(g),
    "claim limit": lambda w, g: w.flow.claim("w2", limit=g),
    "claim lease": lambda w, g: w.flow.claim("w2", lease_seconds=g),
    "heartbeat claim": lambda w, g: w.flow.heartbeat(g),
    "heartbeat lease": lambda w, g: w.flow.heartbeat(w.claim, lease_seconds=g),
    "heartbeat detail": lambda w, g: w.flow.heartbeat(w.claim, detail=g),
    "succeed claim": lambda w, g: w.flow.succeed(g),
    "succeed result": lambda w, g: w.flow.succeed(w.claim, g),
    "fail error": lambda w, g: w.flow.fail(w.claim, g, retryable=False),
    "fail retry_in": lambda w, g: w.flow.fail(w.claim, "boom", retry_in=g),
    "fail error code": lambda w, g: w.flow.fail(w.claim, "boom", error_code=g),
    "release reason": lambda w, g: w.flow.release(w.claim, reason=g),
    "defer error": lambda w, g: w.flow.defer(w.claim, g),
    "defer retry_in": lambda w, g: w.flow.defer(w.claim, "down", retry_in=g),
    "defer error code": lambda w, g: w.flow.defer(w.claim, "down", error_code=g),
    "finish_many": lambda w, g: w.flow.finish_many(g),
    "finish_many item": lambda w, g: w.flow.finish_many([g]),
    "finish_many result": lambda w, g: w.flow.finish_many([Succeeded(w.claim, g)]),
    "finish_many failed": lambda w, g: w.flow.finish_many([Failed(w.claim, "x", retry_in=g)]),
    "finish_many released": lambda w, g: w.flow.finish_many([Released(w.claim, g)]),
    "finish_many deferred": lambda w, g: w.flow.finish_many([Deferred(w.claim, "x",
                                                                      retry_in=g)]),
    "heartbeat_many": lambda w, g: w.flow.heartbeat_many(g),
    "heartbeat_many lease": lambda w, g: w.flow.heartbeat_many([w.claim], lease_seconds=g),
    "stuck uploads": lambda w, g: w.flow.stuck_uploads(older_than=g),
    "recent failures": lambda w, g: w.flow.recent_failures(within=g),
    "reconcile limit": lambda w, g: w.flow.reconcile(limit=g),
    "reconcile rescuer": lambda w, g: w.flow.reconcile(rescuer_id=g),
    "purge cutoff": lambda w, g: w.flow.purge(g),
    "purge batch size": lambda w, g: w.flow.purge(timedelta(days=1), batch_size=g),
    "requeue_failed code": lambda w, g: w.flow.requeue_failed(g),
    "requeue_failed since": lambda w, g: w.flow.requeue_failed("cancelled", since=g),
    "requeue_failed limit": lambda w, g: w.flow.requeue_failed("cancelled", limit=g),
    "reconcile budget": lambda w, g: w.flow.reconcile(budget_seconds=g),
}


def test_garbage_gets_a_named_error_and_changes_nothing(make_store: StoreFactory) -> None:
    @settings(max_examples=150, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(name=st.sampled_from(sorted(CALLS)), garbage=GARBAGE)
    def call_with(name: str, garbage: Any) -> None:
        world = World(make_store)
        before = world.snapshot()
        try:
            CALLS[name](world, garbage)
        except JobflowError:
            assert world.snapshot() == before, f"{name} refused {garbage!r} but changed a job"
        # Anything else (TypeError, OverflowError, a driver error...) fails the test.

    call_with()


def test_documented_limits_are_refused_with_named_errors(make_store: StoreFactory) -> None:
    """The shapes that once escaped as raw Python or driver errors."""
    world = World(make_store)
    before = world.snapshot()
    for name, garbage in [
            ("initiate params", deep(1000)),             # was a RecursionError
            ("initiate params", {"big": "x" * 10_000_000}),
            ("initiate owner", "\ud800"),                # was a UnicodeEncodeError on SQL stores
            ("initiate owner", "eve\r\nINFO forged line"),
            ("initiate owner", "\x1b[31mred"),
            ("initiate sha256", "0" * 64 + "\n"),        # passed, then failed the right upload
            ("claim limit", 10**20),                     # was an OverflowError on SQLite
            ("fail retry_in", timedelta(days=10**6)),    # overflowed run_at
            ("heartbeat lease", -1),                     # set a lease in the past
            ("succeed result", deep(1000))]:
        try:
            CALLS[name](world, garbage)
        except JobflowError:
            pass
        else:
            raise AssertionError(f"{name} accepted {garbage!r:.60}")
        assert world.snapshot() == before
    world.flow.fail(world.claim, "e" * 10_000_000, retryable=False)
    assert len(world.flow.get(world.claim.job.id).error_message or "") <= 4000
    assert isinstance(world.claim, Claim)
