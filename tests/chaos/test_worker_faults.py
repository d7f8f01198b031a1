"""Worker processes killed or stopped in the middle of their jobs."""

from __future__ import annotations

import signal

from jobflow.models import Event
from tests.chaos.audit import read_runs
from tests.chaos.conftest import CHAOS, Site, wait_for

pytestmark = CHAOS

QUICK = ["--lease-seconds", "2", "--heartbeat-interval", "0.5", "--poll-interval", "0.2"]


def test_a_worker_killed_mid_batch_loses_nothing_and_runs_nothing_twice_at_once(
        site: Site) -> None:
    site.queue_jobs(40, {"seconds": 1.0})
    doomed = site.start_worker("doomed", "--concurrency", "8", *QUICK,
                               "--reconcile-interval", "600")
    wait_for(lambda: sum(run.pid == doomed.pid for run in read_runs(site.run_log)) >= 8,
             "the doomed worker to start a batch")
    survivor = site.start_worker("survivor", "--concurrency", "8", *QUICK,
                                 "--reconcile-interval", "0.5")
    doomed.kill()
    site.wait_until_done()

    report = site.audit()
    assert report.done == 40
    cut_short = [run for run in read_runs(site.run_log)
                 if run.pid == doomed.pid and run.ended is None]
    assert cut_short, "the worker was killed with no attempt running"
    for run in cut_short:
        history = site.flow.history(run.job_id)
        assert Event.RESCUE in [row.event for row in history]
        assert (site.flow.get(run.job_id).result or {}).get("pid") == survivor.pid
    survivor.signal(signal.SIGTERM)
    assert survivor.wait() == 0


def test_a_stopped_worker_that_wakes_up_changes_nothing(site: Site) -> None:
    """A worker SIGSTOPped with jobs running: its leases expire, another worker
    rescues and finishes the jobs; continued, it finds its leases lost and its
    writes are fenced: no job and no history row changes."""
    ids = site.queue_jobs(6, {"seconds": 2.0})
    zombie = site.start_worker("zombie", "--concurrency", "6", *QUICK,
                               "--reconcile-interval", "600")
    wait_for(lambda: sum(run.pid == zombie.pid for run in read_runs(site.run_log)) == 6,
             "the worker to start every job")
    zombie.freeze()
    rescuer = site.start_worker("rescuer", "--concurrency", "6", *QUICK,
                                "--reconcile-interval", "0.5")
    site.wait_until_done(ids)
    finished = {job_id: (site.flow.get(job_id), site.flow.history(job_id)) for job_id in ids}

    zombie.thaw()
    wait_for(lambda: all(run.ended is not None for run in read_runs(site.run_log)
                         if run.pid == zombie.pid), "the continued handlers to return")
    wait_for(lambda: {e["job_id"] for e in zombie.logged("job.lease_lost")} == set(ids),
             "the continued worker to find every lease lost")
    assert {job_id: (site.flow.get(job_id), site.flow.history(job_id))
            for job_id in ids} == finished
    for job_id in ids:
        assert (site.flow.get(job_id).result or {}).get("pid") == rescuer.pid
    for worker in (zombie, rescuer):
        worker.signal(signal.SIGTERM)
        assert worker.wait() == 0
    site.audit()
