"""Retention and bulk recovery, on every JobStore: purging finished jobs with
their history (and optionally their objects), and requeuing the failed jobs of
one cause."""

from __future__ import annotations

from datetime import timedelta

import pytest

from jobflow import JobFlow, JobStatus
from jobflow.adapters.memory import InMemoryJobStore, InMemoryObjectStore
from jobflow.errors import InvalidInput, JobNotFound, StorageUnavailable
from jobflow.ports import JobStore
from tests.conftest import QUIET_LOGGER, ManualClock
from tests.strategies import POLICY, START

DATA = b"0123456789"


def queued(flow: JobFlow, objects: InMemoryObjectStore) -> str:
    ticket = flow.initiate_upload("alice", content_type="video/mp4")
    objects.put(ticket.key, DATA, content_type="video/mp4")
    flow.complete_upload(ticket.job_id)
    return ticket.job_id


def finished(flow: JobFlow, objects: InMemoryObjectStore, status: JobStatus,
             error_code: str | None = None) -> str:
    """A job that ran once and ended in ``status`` at the clock's time."""
    job_id = queued(flow, objects)
    [claim] = flow.claim("w1")
    if status is JobStatus.DONE:
        flow.succeed(claim, {"ok": True})
    else:
        flow.fail(claim, "boom", retryable=False, error_code=error_code)
    return job_id


class World:
    """Jobs in every status, finished at known times."""

    def __init__(self, flow: JobFlow, objects: InMemoryObjectStore, clock: ManualClock) -> None:
        self.old_done = finished(flow, objects, JobStatus.DONE)          # START
        clock.advance(10)
        self.old_failed = finished(flow, objects, JobStatus.FAILED)      # START + 10
        clock.advance(10)
        self.old_cancelled = queued(flow, objects)
        flow.cancel(self.old_cancelled)                                   # START + 20
        self.requeued = finished(flow, objects, JobStatus.FAILED)
        flow.requeue(self.requeued)                                       # queued again
        self.waiting = flow.initiate_upload("alice", content_type="video/mp4").job_id
        self.running = queued(flow, objects)
        flow.claim("w2")
        clock.advance(100)
        self.recent_done = finished(flow, objects, JobStatus.DONE)       # START + 120
        self.cutoff = START + timedelta(seconds=60)
        self.purgeable = [self.old_done, self.old_failed, self.old_cancelled]
        self.kept = [self.requeued, self.waiting, self.running, self.recent_done]


@pytest.fixture
def world(flow: JobFlow, objects: InMemoryObjectStore, clock: ManualClock) -> World:
    return World(flow, objects, clock)


def test_purge_finished_deletes_old_finished_jobs_with_their_history_only(
        flow: JobFlow, store: JobStore, world: World) -> None:
    history = {job_id: len(flow.history(job_id)) for job_id in world.purgeable}
    kept = {job_id: (flow.get(job_id), flow.history(job_id)) for job_id in world.kept}
    assert store.count_finished(status=JobStatus.FAILED, finished_before=world.cutoff) == (
        2, history[world.old_failed] + history[world.old_cancelled])

    done = store.purge_finished(status=JobStatus.DONE, finished_before=world.cutoff, limit=10)
    assert [job.id for job in done.jobs] == [world.old_done]
    assert done.jobs[0].status is JobStatus.DONE and done.events == history[world.old_done]
    first = store.purge_finished(status=JobStatus.FAILED, finished_before=world.cutoff, limit=1)
    assert [job.id for job in first.jobs] == [world.old_failed], "oldest first, one at most"
    rest = store.purge_finished(status=JobStatus.FAILED, finished_before=world.cutoff, limit=5)
    assert [job.id for job in rest.jobs] == [world.old_cancelled]
    assert store.purge_finished(status=JobStatus.FAILED, finished_before=world.cutoff,
                                limit=5).jobs == ()

    for job_id in world.purgeable:
        with pytest.raises(JobNotFound):
            store.get(job_id)
        with pytest.raises(JobNotFound):
            store.history(job_id)
    assert {job_id: (store.get(job_id), store.history(job_id)) for job_id in world.kept} == kept
    assert store.count_finished(status=JobStatus.DONE, finished_before=world.cutoff) == (0, 0)
    for status in (JobStatus.QUEUED, JobStatus.QUICK_RUNNING, JobStatus.AWAITING_UPLOAD):
        with pytest.raises(InvalidInput, match="only finished jobs"):
            store.purge_finished(status=status, finished_before=world.cutoff, limit=5)
    assert sum(store.counts().values()) == len(world.kept)


def test_purge_deletes_in_batches_objects_after_rows_and_a_dry_run_deletes_nothing(
        flow: JobFlow, store: JobStore, objects: InMemoryObjectStore, world: World) -> None:
    keys = {job_id: flow.get(job_id).key for job_id in world.purgeable + world.kept}
    events = sum(len(flow.history(job_id)) for job_id in world.purgeable)

    planned = flow.purge(timedelta(seconds=60), dry_run=True)
    assert (planned.jobs, planned.events, planned.dry_run) == (3, events, True)
    assert planned.finished_before == world.cutoff
    assert all(flow.get(job_id) for job_id in world.purgeable), "a dry run deletes nothing"

    report = flow.purge(world.cutoff, batch_size=1, delete_objects=True)
    assert (report.jobs, report.events, report.objects_deleted, report.objects_failed) == (
        3, events, 3, ())
    for job_id in world.purgeable:
        assert objects.head(keys[job_id]) is None
        with pytest.raises(JobNotFound):
            flow.get(job_id)
    for job_id in world.kept:
        assert flow.get(job_id).id == job_id
        if job_id != world.waiting:
            assert objects.head(keys[job_id]) is not None
    assert flow.purge(world.cutoff).jobs == 0, "nothing is left to purge"


def test_an_object_store_outage_is_reported_and_does_not_stop_the_purge(
        flow: JobFlow, store: JobStore, objects: InMemoryObjectStore, world: World) -> None:
    keys = [flow.get(job_id).key for job_id in world.purgeable]
    objects.unavailable = True
    report = flow.purge(world.cutoff, delete_objects=True)
    objects.unavailable = False
    assert (report.jobs, report.objects_deleted) == (3, 0)
    assert sorted(report.objects_failed) == sorted(keys)
    assert all(objects.head(key) is not None for key in keys), "left for the bucket's rules"
    assert store.count_finished(status=JobStatus.FAILED, finished_before=world.cutoff) == (0, 0)


def test_purge_never_deletes_an_object_of_another_bucket(
        store: JobStore, objects: InMemoryObjectStore, clock: ManualClock,
        world: World) -> None:
    elsewhere = InMemoryObjectStore(bucket="archive")
    flow = JobFlow(store=store, objects=elsewhere, clock=clock, policy=POLICY,
                   logger=QUIET_LOGGER)
    key = flow.get(world.old_done).key
    elsewhere.put(key, DATA, content_type="video/mp4")
    report = flow.purge(world.cutoff, delete_objects=True)
    assert report.jobs == 3 and report.objects_deleted == 0
    assert len(report.objects_failed) == 3
    assert elsewhere.head(key) is not None and objects.head(key) is not None


@pytest.mark.parametrize("bad", [
    {"finished_before": -timedelta(seconds=1)},
    {"finished_before": START.replace(tzinfo=None)},
    {"finished_before": "yesterday"},
    {"finished_before": timedelta(days=1), "batch_size": 0},
])
def test_purge_refuses_nonsense(flow: JobFlow, world: World, bad: dict[str, object]) -> None:
    with pytest.raises(InvalidInput):
        flow.purge(**bad)  # type: ignore[arg-type]
    assert flow.get(world.old_done).status is JobStatus.DONE


def test_requeue_failed_requeues_every_failed_job_of_one_cause(
        flow: JobFlow, objects: InMemoryObjectStore, clock: ManualClock) -> None:
    old = finished(flow, objects, JobStatus.FAILED, "storage_outage")
    clock.advance(600)
    cause = [finished(flow, objects, JobStatus.FAILED, "storage_outage") for _ in range(5)]
    gone, broken = cause[1], cause[3]
    objects.delete(flow.get(gone).key)
    objects.put(flow.get(broken).key, b"", content_type="video/mp4")
    other = finished(flow, objects, JobStatus.FAILED, "unsupported_format")
    clock.advance(1)

    report = flow.requeue_failed("storage_outage", since=timedelta(minutes=5), batch_size=2)

    assert report.error_code == "storage_outage" and report.stopped is None
    assert set(report.requeued) == set(cause) - {gone, broken}
    assert set(report.still_failing) == {gone, broken}
    assert report.skipped == report.unavailable == ()
    for job_id in report.requeued:
        job = flow.get(job_id)
        assert (job.status, job.attempts, job.upload_verified_at) == (
            JobStatus.QUEUED, 0, clock.now), "verified again, now"
    for job_id in (gone, broken, old, other):
        assert flow.get(job_id).status is JobStatus.FAILED
    everything = flow.requeue_failed("storage_outage")
    assert everything.requeued == (old,) and set(everything.still_failing) == {gone, broken}
    # One job at most: the first in (finished_at, id) order, and they finished together.
    assert flow.requeue_failed("storage_outage", limit=1).still_failing == (min(gone, broken),)


class FailsAfter(InMemoryObjectStore):
    """An object store whose outage starts after ``heads`` HEAD requests."""

    def __init__(self, heads: int) -> None:
        super().__init__(bucket="videos")
        self.heads_left = heads

    def head(self, key: str) -> object:  # type: ignore[override]
        if self.heads_left == 0:
            self.unavailable = True
        self.heads_left -= 1
        return super().head(key)


def test_requeue_failed_stops_cleanly_when_the_object_store_goes_down(
        store: JobStore, clock: ManualClock) -> None:
    objects = FailsAfter(heads=10**6)
    flow = JobFlow(store=store, objects=objects, clock=clock, policy=POLICY,
                   logger=QUIET_LOGGER)
    failed = []
    for _ in range(4):
        failed.append(finished(flow, objects, JobStatus.FAILED, "storage_outage"))
        clock.advance(1)
    before = {job_id: (flow.get(job_id), flow.history(job_id)) for job_id in failed[2:]}
    objects.heads_left = 2

    report = flow.requeue_failed("storage_outage", batch_size=3)

    assert report.requeued == tuple(failed[:2])
    assert report.unavailable == (failed[2],) and report.stopped is not None
    assert "unavailable" in report.stopped
    assert {job_id: (flow.get(job_id), flow.history(job_id)) for job_id in failed[2:]} == (
        before), "the jobs it did not reach are untouched"
    objects.unavailable, objects.heads_left = False, 10**6
    again = flow.requeue_failed("storage_outage")
    assert again.requeued == tuple(failed[2:]) and again.stopped is None
    assert flow.requeue_failed("storage_outage").requeued == (), "nothing is left to requeue"


def test_requeue_failed_stops_cleanly_when_the_database_goes_down(clock: ManualClock) -> None:
    """The in-memory store's outage switch stands in for a database that went down."""
    store, objects = InMemoryJobStore(), InMemoryObjectStore(bucket="videos")
    flow = JobFlow(store=store, objects=objects, clock=clock, policy=POLICY,
                   logger=QUIET_LOGGER)
    job_id = finished(flow, objects, JobStatus.FAILED, "storage_outage")
    store.unavailable = True
    report = flow.requeue_failed("storage_outage")
    with pytest.raises(StorageUnavailable):  # a purge simply fails: rerun it
        flow.purge(timedelta(0))
    store.unavailable = False
    assert (report.requeued, report.unavailable) == ((), ())
    assert report.stopped is not None and "unavailable" in report.stopped
    assert flow.get(job_id).status is JobStatus.FAILED


@pytest.mark.parametrize("bad", [
    {"error_code": ""}, {"error_code": "a\nb"}, {"error_code": None},
    {"error_code": "x", "since": timedelta(days=-1)}, {"error_code": "x", "batch_size": 0},
    {"error_code": "x", "limit": 0},
])
def test_requeue_failed_refuses_nonsense(flow: JobFlow, bad: dict[str, object]) -> None:
    with pytest.raises(InvalidInput):
        flow.requeue_failed(**bad)  # type: ignore[arg-type]
