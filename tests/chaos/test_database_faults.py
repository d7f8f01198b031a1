"""PostgreSQL crashed, frozen, slow, or an address that never answers, while
``jobflow`` processes use it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timedelta

import pytest

from jobflow import JobStatus
from jobflow.cli import ExitCode
from jobflow.models import Event
from tests.chaos.conftest import CHAOS, HANDLER, ROOT, Site, wait_for

pytestmark = CHAOS

#: Short leases and intervals, so that rescues happen within seconds.
QUICK = ["--lease-seconds", "3", "--heartbeat-interval", "1", "--poll-interval", "0.2"]


def test_a_crash_under_load_loses_no_finished_work(site: Site) -> None:
    """``pg_ctl stop -m immediate`` with 200 jobs in flight, restarted 10 s later,
    under the worker's default lease, heartbeat and reconcile settings: every
    finished attempt's outcome is written once the server is back, so no job
    runs again, and every job ends done."""
    jobs, outage = 200, 10.0
    site.queue_jobs(jobs, {"seconds": 0.1})
    worker = site.start_worker("steady", "--concurrency", "8", "--poll-interval", "0.2")
    wait_for(lambda: site.statuses().get(JobStatus.DONE, 0) >= jobs // 4,
             "a quarter of the jobs to be done")
    site.cluster.crash()
    crashed_at = site.flow.now()  # the database's clock keeps time while it is down
    time.sleep(outage)
    assert site.flow.now() - crashed_at >= timedelta(seconds=outage)
    site.cluster.restart()
    site.wait_until_done(timeout=120)  # a claim lost in the crash waits out its lease

    report = site.audit()
    assert (report.done, report.reruns_after_finish) == (jobs, 0)
    retried = worker.logged("worker.write_failed")
    assert retried, "no finishing write met the outage"
    print(f"finishing writes tried again {len(retried)} times, for up to "
          f"{max(entry['jobs'] for entry in retried)} finished jobs")
    assert not worker.logged("job.write_failed"), "a finished outcome was given up"
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0


def test_sigterm_is_honoured_while_the_database_is_frozen(site: Site) -> None:
    """Every PostgreSQL process SIGSTOPped: the kernel keeps the connections
    alive, nothing answers. The worker says so (its health file goes stale,
    ``worker.stalled`` is logged), and on SIGTERM it exits within its grace
    plus a few seconds, leaving what it could not write to the fencing."""
    grace = 5.0
    site.queue_jobs(60, {"seconds": 0.5})
    health = site.folder / "worker.health"
    worker = site.start_worker("frozen", "--concurrency", "4", *QUICK,
                               "--shutdown-grace", str(grace), "--health-file", str(health))
    wait_for(lambda: site.statuses().get(JobStatus.DONE, 0) >= 8, "a few jobs to be done")
    probe = ["health", "--file", str(health), "--max-age", "2"]
    assert site.cli(*probe).returncode == ExitCode.OK

    site.cluster.freeze()
    try:
        wait_for(lambda: site.cli(*probe).returncode == ExitCode.ALERT,
                 "the health file to go stale", timeout=30)
        assert "the worker's claim loop or its lease renewals are stuck" in (
            site.cli(*probe).stderr)
        assert worker.logged("worker.stalled")
        signalled = time.monotonic()
        worker.signal(signal.SIGTERM)
        code = worker.wait(timeout=60)
        took = time.monotonic() - signalled
    finally:
        site.cluster.thaw()
    assert code == 0
    assert took < grace + 5, f"the worker took {took:.1f} s to exit after SIGTERM"
    print(f"exited {took:.1f} s after SIGTERM with a {grace:g} s grace")
    assert worker.logged("worker.stop_timeout")
    assert not health.exists()

    # What the frozen worker held is rescued and run by another.
    rescuer = site.start_worker("rescuer", "--concurrency", "4", *QUICK,
                                "--reconcile-interval", "0.5")
    site.wait_until_done()
    site.audit()
    rescuer.signal(signal.SIGTERM)
    assert rescuer.wait() == 0


SLOW_UPDATES = [
    """CREATE FUNCTION chaos_slow_update() RETURNS trigger LANGUAGE plpgsql AS $$
       BEGIN PERFORM pg_sleep(0.3); RETURN NULL; END $$""",
    """CREATE TRIGGER chaos_slow_update BEFORE UPDATE ON jobflow_jobs
       FOR EACH STATEMENT EXECUTE FUNCTION chaos_slow_update()""",
]


def test_leases_are_renewed_in_time_on_a_slow_database(site: Site) -> None:
    """Every UPDATE of the jobs table takes 0.3 s more (a trigger sleeps), and 32
    jobs run for 6 s under 3 s leases renewed every second, with reconcile
    looking for expired leases twice a second: one renewal per job and round
    trip would need 9.6 s per round; the renewals keep every lease, and no
    job is rescued."""
    ids = site.queue_jobs(32, {"seconds": 6})
    with site.engine.begin() as conn:
        for statement in SLOW_UPDATES:
            conn.exec_driver_sql(statement)
    worker = site.start_worker("busy", "--concurrency", "32", *QUICK,
                               "--reconcile-interval", "0.5")
    site.wait_until_done(ids)

    for job_id in ids:
        history = site.flow.history(job_id)
        assert [row.event for row in history].count(Event.CLAIM) == 1
        assert Event.RESCUE not in [row.event for row in history]
        expiry: datetime | None = None
        for row in history:
            if expiry is not None and row.event in (Event.HEARTBEAT, Event.SUCCEED):
                assert row.at < expiry, f"job {job_id}: {row.event} after its lease ended"
            if "lease_expires_at" in row.detail:
                expiry = datetime.fromisoformat(row.detail["lease_expires_at"])
    report = site.audit()
    assert report.runs == len(ids)
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0


@pytest.mark.parametrize("command", [["status"], ["db", "current"],
                                     ["worker", "--handler", HANDLER]],
                         ids=["status", "db-current", "worker"])
def test_an_address_that_never_answers_fails_within_the_connect_timeout(
        command: list[str]) -> None:
    """A port that accepts TCP connections (the kernel completes them) and never
    says a word: the command fails as "unavailable" within its connect timeout,
    with a line saying why, instead of hanging."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        host, port = silent.getsockname()
        env = {name: value for name, value in os.environ.items()
               if not name.startswith("JOBFLOW_")}
        env.update({"JOBFLOW_DATABASE_URL": f"postgresql://jobflow@{host}:{port}/jobflow",
                    "JOBFLOW_DB_CONNECT_TIMEOUT": "2", "JOBFLOW_LOG_FORMAT": "json",
                    "PYTHONPATH": str(ROOT)})
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "jobflow", *command], env=env,
                                capture_output=True, text=True, timeout=60, check=False)
        took = time.monotonic() - started
    assert result.returncode == ExitCode.STORAGE_UNAVAILABLE, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("jobflow: error:")]
    assert len(errors) == 1 and "timeout" in errors[0], result.stderr
    assert took < 2 + 5, f"{command} took {took:.1f} s"

