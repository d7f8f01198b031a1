"""The worker's batches, in-process, on every JobStore adapter: claims fill the
free slots together, outcomes are buffered and written together (and always
before the worker returns), leases are renewed together."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import structlog

from jobflow import Job, JobFlow, JobStatus
from jobflow.errors import StorageUnavailable
from jobflow.models import Change, Event
from jobflow.worker import JobContext, Worker
from tests.worker.conftest import PATIENCE, FlowFactory, queue_job, running, wait_for

CALM = {"lease_seconds": 30.0, "poll_interval": 0.02, "reconcile_interval": 60.0}


def events(flow: JobFlow, job_id: str) -> list[Event]:
    return [row.event for row in flow.history(job_id)]


class CountingStore:
    """A job store that counts the calls a worker makes on it."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.inner, name)
        if not callable(attribute):
            return attribute

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            return attribute(*args, **kwargs)
        return counted


def counted_flow(flow: JobFlow, store: Any, **kwargs: Any) -> JobFlow:
    return JobFlow(store=store, objects=flow.objects, policy=flow.policy, **kwargs)


def test_claims_and_finishes_are_written_in_batches(make_flow: FlowFactory) -> None:
    """At concurrency 8 one claim fills the free slots and one write finishes a
    batch of jobs: far fewer store calls than jobs, and no single-job writes;
    the handlers run on a pool of reused threads, not a thread per job."""
    flow = make_flow()
    job_ids = [queue_job(flow) for _ in range(80)]
    store = CountingStore(flow.store)
    threads: set[str] = set()

    def handle(job: Job, ctx: JobContext) -> dict[str, Any]:
        threads.add(threading.current_thread().name)
        return {"id": job.id}

    # A generous wait for stragglers keeps the batches full on a loaded machine.
    worker = Worker(counted_flow(flow, store), handle, concurrency=8, flush_interval=0.05,
                    **CALM)
    worker.run(until_idle=True)

    assert [flow.get(j).result for j in job_ids] == [{"id": j} for j in job_ids]
    assert store.calls["commit"] == 0  # no single-job finishing write
    # One job at a time would take 2 calls per job; batches of 8 take 0.25. On
    # a machine busy with other work some batches go out part-full.
    calls = store.calls["claim"] + store.calls["commit_many"]
    assert calls / len(job_ids) < 0.4, store.calls
    assert len(threads) <= 8
    for job_id in job_ids:
        assert events(flow, job_id) == [Event.CREATED, Event.VERIFY_UPLOAD, Event.CLAIM,
                                        Event.SUCCEED]


def test_a_finished_outcome_is_written_before_stop_returns_and_logged_only_then(
        make_flow: FlowFactory) -> None:
    """An outcome waits in the buffer while its batch fills; stopping the worker
    writes it (and releases the job still running) before run() returns."""
    flow = make_flow()
    quick, slow = queue_job(flow), queue_job(flow)
    slow_started, let_go = threading.Event(), threading.Event()

    def handle(job: Job, ctx: JobContext) -> dict[str, Any]:
        if job.id == slow:
            slow_started.set()
            let_go.wait(PATIENCE)
            ctx.check()
        return {"quick": True}

    worker = Worker(flow, handle, concurrency=2, flush_interval=PATIENCE, shutdown_grace=0.1,
                    **CALM)
    with structlog.testing.capture_logs() as logs, running(worker):
        wait_for(slow_started.is_set, "the slow handler to start")
        wait_for(lambda: worker.busy == 1, "the quick handler to return")
        # Its batch is not full, the other slot is busy: the outcome waits.
        assert flow.get(quick).status is JobStatus.QUICK_RUNNING
        assert not [e for e in logs if e["event"] == "handler.finished"], (
            "an outcome was logged as finished before it was written")
        worker.stop()
        wait_for(lambda: flow.get(quick).status is JobStatus.DONE, "the buffered outcome")
        let_go.set()

    assert flow.get(quick).result == {"quick": True}
    released = flow.get(slow)
    assert released.status is JobStatus.QUEUED and released.attempts == 0
    finished = [e for e in logs if e["event"] == "handler.finished"]
    assert [(e["outcome"], e["status"]) for e in finished if e["job_id"] == quick] == [
        ("succeeded", "done")]
    # The released job's handler returned after its release: nothing written.
    assert all(e["outcome"] in ("ignored", "abandoned") and "status" not in e
               for e in finished if e["job_id"] == slow)


class FlakyStore(CountingStore):
    """Its batch writes fail as unavailable ``failures`` times, then work."""

    def __init__(self, inner: Any, failures: int) -> None:
        super().__init__(inner)
        self.failures = failures

    def commit_many(self, changes: Sequence[Change]) -> list[Job | None]:
        self.calls["commit_many"] += 1
        if self.failures:
            self.failures -= 1
            raise StorageUnavailable("the database is restarting")
        written: list[Job | None] = self.inner.commit_many(changes)
        return written


def test_a_batch_write_is_tried_again_while_the_store_is_unavailable(
        make_flow: FlowFactory) -> None:
    """A finished job is not thrown away because its write failed for a while:
    the same batch is written once the store is back, and the handler ran once."""
    flow = make_flow()
    job_ids = [queue_job(flow) for _ in range(3)]
    store = FlakyStore(flow.store, failures=3)
    ran: Counter[str] = Counter()

    def handle(job: Job, ctx: JobContext) -> None:
        ran[job.id] += 1

    Worker(counted_flow(flow, store), handle, concurrency=3, **CALM).run(until_idle=True)

    assert store.failures == 0 and store.calls["commit_many"] >= 4
    assert all(flow.get(job_id).status is JobStatus.DONE for job_id in job_ids)
    assert ran == Counter(dict.fromkeys(job_ids, 1))


def test_a_claim_whose_lease_ran_out_before_it_started_is_given_back(
        make_flow: FlowFactory) -> None:
    """A worker paused between claiming and starting a job (here: its clock
    jumps past the lease) does not run it: the attempt is given back, and the
    job runs later with its attempts intact."""
    jumps = iter([timedelta(seconds=31)])
    offset = timedelta()
    base = make_flow()

    def clock() -> Any:
        return base.now() + offset

    class PausingStore(CountingStore):
        def claim(self, **kwargs: Any) -> Any:
            nonlocal offset
            claims = self.inner.claim(**kwargs)
            if claims:
                offset += next(jumps, timedelta())
            return claims

    job_id = queue_job(base)
    ran: list[int] = []
    flow = counted_flow(base, PausingStore(base.store), clock=clock)
    Worker(flow, lambda job, ctx: ran.append(job.attempts), **CALM).run(until_idle=True)

    assert ran == [1], "the job ran once, as its first attempt"
    assert events(base, job_id)[2:] == [Event.CLAIM, Event.RELEASE, Event.CLAIM, Event.SUCCEED]


def test_due_leases_are_renewed_together_in_one_write(make_flow: FlowFactory) -> None:
    flow = make_flow()
    job_ids = [queue_job(flow) for _ in range(3)]
    store = CountingStore(flow.store)
    let_go = threading.Event()

    def handle(job: Job, ctx: JobContext) -> None:
        let_go.wait(PATIENCE)

    worker = Worker(counted_flow(flow, store), handle, concurrency=3, lease_seconds=1.0,
                    heartbeat_interval=0.1, poll_interval=0.02, reconcile_interval=60.0)
    with running(worker):
        wait_for(lambda: all(events(flow, j).count(Event.HEARTBEAT) >= 3 for j in job_ids),
                 "three heartbeats of every job")
        let_go.set()
        wait_for(lambda: flow.counts()[JobStatus.DONE] == 3, "the jobs to finish")

    beats = sum(events(flow, j).count(Event.HEARTBEAT) for j in job_ids)
    assert store.calls["commit"] == 0, "no lease was renewed on its own"
    assert store.calls["commit_many"] < beats, "renewals were not batched"


def test_short_jobs_are_claimed_a_batch_ahead_and_handed_back_at_stop(
        make_flow: FlowFactory) -> None:
    """Once handlers prove short, the worker holds a second batch, leased and
    waiting for a thread; stopping hands those back at once, attempts intact."""
    flow = make_flow()
    quick = [queue_job(flow, params={"block": False}) for _ in range(4)]
    blocking = [queue_job(flow, params={"block": True}) for _ in range(4)]
    let_go = threading.Event()

    def handle(job: Job, ctx: JobContext) -> None:
        if job.params["block"]:
            let_go.wait(PATIENCE)

    worker = Worker(flow, handle, concurrency=2, shutdown_grace=0.2, **CALM)
    with running(worker):
        wait_for(lambda: all(flow.get(j).status is JobStatus.DONE for j in quick),
                 "the quick jobs")
        wait_for(lambda: flow.counts()[JobStatus.QUICK_RUNNING] == 4,
                 "two blocking jobs running and two claimed ahead")
        assert worker.claims_ahead and worker.busy == 4
        worker.stop()
        wait_for(lambda: flow.counts()[JobStatus.QUEUED] == 4, "every blocking job handed back")
        let_go.set()

    for job_id in blocking:
        job = flow.get(job_id)
        assert job.status is JobStatus.QUEUED and job.attempts == 0
        assert events(flow, job_id)[-2:] == [Event.CLAIM, Event.RELEASE]
