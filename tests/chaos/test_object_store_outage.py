"""Object store outages under load, against a real ``jobflow worker`` process:
S3 (moto's server) down for 15 s, a local object folder renamed away for 15 s,
and S3 hanging while ``jobflow reconcile`` must rescue a dead worker's job.

The promise: an outage fails no job and expires no upload (the jobs wait,
deferred, and all end ``done`` once the store is back), and it delays no
rescue. Each test ends with the suite's audit and its own checks: every job
done, none ever failed or expired, attempts and deferrals within bounds, and
every attempt that met the outage deferred rather than counted as an error.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest
import sqlalchemy as sa

from jobflow import JobStatus, UploadPolicy
from jobflow.models import Event
from tests.chaos.audit import read_runs
from tests.chaos.conftest import DOWNLOAD, S3Server, Site, WorkerProcess, sqlite_url, wait_for
from tests.fake_aws import silent_endpoint

pytestmark = pytest.mark.chaos

#: How long each outage lasts, as in the probe that found the defects.
OUTAGE_SECONDS = 15.0
#: Short backoffs and pauses, so that the jobs come back soon after the store does.
WORKER_OPTIONS = [
    "--concurrency", "4", "--lease-seconds", "10", "--poll-interval", "0.1",
    "--reconcile-interval", "0.5", "--adopt-after", "2", "--shutdown-grace", "5",
    "--defer-backoff", "0.5", "--defer-backoff-max", "2",
    "--storage-pause", "0.2", "--storage-pause-max", "1",
]
#: Uploads created just before an outage pass their deadline during it.
SHORT_DEADLINE = UploadPolicy(upload_ttl_seconds=3)


@pytest.fixture
def s3_site(pg_url: sa.URL, s3: S3Server, tmp_path: Path) -> Iterator[Site]:
    """A deployment on a new database of the run's PostgreSQL server and on S3."""
    with closing(Site(tmp_path, pg_url.render_as_string(hide_password=False), s3=s3,
                      policy=SHORT_DEADLINE)) as site:
        yield site


@pytest.fixture
def sqlite_site(tmp_path: Path) -> Iterator[Site]:
    """A deployment on SQLite and a local object folder."""
    with closing(Site(tmp_path, sqlite_url(tmp_path), policy=SHORT_DEADLINE)) as site:
        yield site


@pytest.fixture
def sqlite_s3_site(s3: S3Server, tmp_path: Path) -> Iterator[Site]:
    """A deployment on SQLite and S3."""
    with closing(Site(tmp_path, sqlite_url(tmp_path), s3=s3, policy=SHORT_DEADLINE)) as site:
        yield site


def check_the_outage_cost_only_time(site: Site, worker: WorkerProcess, waiting: list[str],
                                    during: dict[JobStatus, int]) -> None:
    """The audit, and what an object store outage must not do: fail or expire
    a job, spend its attempts, or leave the worker claiming at full speed."""
    jobs = len(site.job_ids)
    assert sum(during.values()) == jobs
    assert during.get(JobStatus.FAILED, 0) == 0, "the outage failed jobs"
    assert during.get(JobStatus.DONE, 0) < jobs, "the outage did not hold up any job"
    report = site.audit()
    assert (report.done, report.reruns_after_finish) == (jobs, 0)
    runs = read_runs(site.run_log)
    assert all(run.ended is not None for run in runs), "an attempt never ended"

    deferrals = 0
    for job_id in site.job_ids:
        job, history = site.flow.get(job_id), site.flow.history(job_id)
        assert 1 <= job.attempts <= job.max_attempts
        assert 0 <= job.deferrals <= site.flow.policy.max_deferrals
        assert not [row for row in history if row.event in (Event.FAIL, Event.EXPIRE_UPLOAD)]
        deferrals += job.deferrals
    assert deferrals > 0, "no attempt met the outage"
    errors = sum(run.outcome == "error" for run in runs)
    assert errors == deferrals, f"{errors} attempts raised, {deferrals} were deferred"
    print(f"outage figures: {deferrals} deferred attempts")
    # The waiting uploads passed their deadline during the outage: adopted, not expired.
    assert all(site.flow.history(job_id)[1].event is Event.VERIFY_UPLOAD for job_id in waiting)
    assert worker.logged("worker.claims_paused"), "the worker never slowed its claiming"


# -- S3 down -------------------------------------------------------------------------------


@pytest.mark.postgres
def test_s3_down_for_15_s_under_load_fails_and_expires_no_job(
        s3_site: Site, s3: S3Server) -> None:
    site = s3_site
    site.queue_jobs(40, {"seconds": 0.25})
    worker = site.start_worker("outage", *WORKER_OPTIONS, handler=DOWNLOAD)
    wait_for(lambda: site.statuses().get(JobStatus.DONE, 0) >= 8, "the first jobs to run")

    waiting = site.forgotten_uploads(5)
    s3.stop()
    time.sleep(OUTAGE_SECONDS)
    during = wait_for(site.statuses, "the jobs' statuses at the end of the outage")
    s3.start()

    site.wait_until_done()
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0
    check_the_outage_cost_only_time(site, worker, waiting, during)


# -- a local folder gone -------------------------------------------------------------------


def test_a_local_object_folder_renamed_away_for_15_s_fails_and_expires_no_job(
        sqlite_site: Site) -> None:
    site = sqlite_site
    folder = site.settings.resolved_objects_dir()
    away = site.folder / "objects-away"
    site.queue_jobs(60, {"seconds": 0.15})
    worker = site.start_worker("outage", *WORKER_OPTIONS, handler=DOWNLOAD)
    wait_for(lambda: site.statuses().get(JobStatus.DONE, 0) >= 10, "the first jobs to run")

    waiting = site.forgotten_uploads(5)
    folder.rename(away)  # an unmounted volume, a moved folder
    time.sleep(OUTAGE_SECONDS)
    during = wait_for(site.statuses, "the jobs' statuses at the end of the outage")
    away.rename(folder)

    site.wait_until_done()
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0
    check_the_outage_cost_only_time(site, worker, waiting, during)
    assert not away.exists()


# -- S3 hanging ----------------------------------------------------------------------------


def test_reconcile_rescues_a_dead_workers_job_on_time_while_s3_hangs(
        sqlite_s3_site: Site) -> None:
    """S3 accepts connections and never answers; one upload waits for a check,
    one job's worker died. ``jobflow reconcile`` (the CLI's own S3 timeouts,
    about 30 s per call) rescues the job at once and leaves the upload alone.
    Once S3 answers again and the client completes its upload, a worker runs
    both."""
    site = sqlite_s3_site
    [dead] = site.queue_jobs(1)
    [claim] = site.flow.claim("dead-worker", lease_seconds=0.5)
    [waiting] = site.forgotten_uploads(1)
    before = (site.flow.get(waiting), site.flow.history(waiting))
    wait_for(lambda: (claim.job.lease_expires_at or site.flow.now()) < site.flow.now(),
             "the dead worker's lease to run out")

    with silent_endpoint() as hung:
        reconcile = site.start("reconcile", "reconcile", "--adopt-after", "0",
                               env={"JOBFLOW_S3_ENDPOINT_URL": hung})
        wait_for(lambda: site.flow.get(dead).status is JobStatus.QUEUED,
                 "the dead worker's job to be rescued", timeout=5.0)
        assert reconcile.process.poll() is None, "reconcile did not even ask the hung S3"
        assert (site.flow.get(waiting), site.flow.history(waiting)) == before
        reconcile.kill()

    assert (site.flow.get(waiting), site.flow.history(waiting)) == before
    rescue = site.flow.history(dead)[-1]
    assert (rescue.event, rescue.detail) == (Event.RESCUE, {"lost_worker": "dead-worker"})

    site.flow.complete_upload(waiting)
    worker = site.start_worker("after", "--burst", handler=DOWNLOAD)
    assert worker.wait() == 0
    report = site.audit()
    assert (report.done, report.runs, report.reruns_after_finish) == (2, 2, 0)
