"""Worker processes killed, stopped, paused and woken, on SQLite and PostgreSQL."""

from __future__ import annotations

import itertools
import signal
import time
from datetime import datetime

import pytest
import sqlalchemy as sa

from jobflow import JobStatus
from jobflow.models import Event, JobEvent
from tests.e2e.conftest import Deployment, wait_for
from tests.e2e.handlers import marks

# Short leases keep these tests fast; a heartbeat every 0.25 s renews them.
LEASE = ["--lease-seconds", "1", "--heartbeat-interval", "0.25", "--poll-interval", "0.1"]
NO_RECONCILE = ["--reconcile-interval", "600"]
EAGER_RECONCILE = ["--reconcile-interval", "0.3"]


def lease_spans(history: list[JobEvent]) -> list[tuple[str, datetime, datetime]]:
    """(worker, claimed at, last lease expiry it was granted) for each claim."""
    spans: list[tuple[str, datetime, datetime]] = []
    for row in history:
        if row.event is Event.CLAIM:
            assert row.worker_id is not None
            spans.append((row.worker_id, row.at,
                          datetime.fromisoformat(row.detail["lease_expires_at"])))
        elif row.event is Event.HEARTBEAT:
            worker, claimed, _ = spans[-1]
            assert row.worker_id == worker
            spans[-1] = (worker, claimed, datetime.fromisoformat(row.detail["lease_expires_at"]))
    return spans


def assert_never_two_live_leases(history: list[JobEvent]) -> None:
    spans = lease_spans(history)
    for (_, _, first_expiry), (_, second_claim, _) in itertools.pairwise(spans):
        assert second_claim >= first_expiry, "a job was claimed while a lease was live"


def test_a_job_whose_worker_was_killed_is_rescued_and_runs_to_done_once(
        deployment: Deployment) -> None:
    job_id = deployment.queue_job({"sleep": [60, 0]})
    first = deployment.start_worker("first", *LEASE, *NO_RECONCILE)
    wait_for(lambda: marks(deployment.marks, job_id, "started"), "the first attempt to start")
    first.signal(signal.SIGKILL)
    assert first.wait() == -signal.SIGKILL

    flow = deployment.flow()
    orphaned = flow.get(job_id)
    assert (orphaned.status, orphaned.lease_owner) == (JobStatus.QUICK_RUNNING, "first")

    second = deployment.start_worker("second", *LEASE, *EAGER_RECONCILE)
    wait_for(lambda: flow.get(job_id).status is JobStatus.DONE, "the rescued job to finish")

    job = flow.get(job_id)
    assert job.result == {"pid": second.pid, "attempt": 2, "worker_id": "second"}
    history = flow.history(job_id)
    events = [row.event for row in history]
    assert events.count(Event.SUCCEED) == 1
    rescue = history[events.index(Event.RESCUE)]
    assert rescue.detail == {"lost_worker": "first"}
    assert rescue.worker_id == "second", "the rescue names the process that made it"
    assert [(row.worker_id, row.attempt) for row in history if row.event is Event.CLAIM] == [
        ("first", 1), ("second", 2)]
    assert_never_two_live_leases(history)
    assert marks(deployment.marks, job_id, "finished") == [(2, second.pid)]
    # The worker's own log lines carry the job, the attempt and the worker.
    started = second.logged("handler.started", job_id=job_id)
    assert [(e["attempt"], e["worker_id"]) for e in started] == [(2, "second")]

    second.signal(signal.SIGTERM)
    assert second.wait() == 0


def test_sigterm_lets_the_worker_exit_cleanly_and_hands_the_job_back(
        deployment: Deployment) -> None:
    job_id = deployment.queue_job({"sleep": [60]})
    worker = deployment.start_worker("stopping", *LEASE, *NO_RECONCILE,
                                     "--shutdown-grace", "0.5")
    wait_for(lambda: marks(deployment.marks, job_id, "started"), "the handler to start")
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0

    job = deployment.flow().get(job_id)
    assert job.status is JobStatus.QUEUED
    assert job.attempts == 0 and job.lease_token is None  # no attempt was spent
    last = deployment.flow().history(job_id)[-1]
    assert (last.event, last.worker_id) == (Event.RELEASE, "stopping")
    assert worker.logged("worker.stopped", released=1)
    assert marks(deployment.marks, job_id, "finished") == []


def test_a_second_signal_exits_at_once_and_the_lease_is_left_to_expire(
        sqlite_deployment: Deployment) -> None:
    deployment = sqlite_deployment
    job_id = deployment.queue_job({"sleep": [60]})
    worker = deployment.start_worker("impatient", *LEASE, *NO_RECONCILE,
                                     "--shutdown-grace", "60")
    wait_for(lambda: marks(deployment.marks, job_id, "started"), "the handler to start")
    worker.signal(signal.SIGTERM)
    wait_for(lambda: worker.logged("worker.signal"), "the first signal to be noticed")
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 128 + signal.SIGTERM
    assert worker.logged("worker.forced_exit")
    job = deployment.flow().get(job_id)
    assert (job.status, job.lease_owner) == (JobStatus.QUICK_RUNNING, "impatient")


def test_a_paused_worker_cannot_finish_the_job_rescued_from_it(
        deployment: Deployment) -> None:
    job_id = deployment.queue_job({"sleep": [2, 0]})
    zombie = deployment.start_worker("zombie", *LEASE, *NO_RECONCILE)
    wait_for(lambda: marks(deployment.marks, job_id, "started"), "the first attempt to start")
    zombie.signal(signal.SIGSTOP)

    flow = deployment.flow()
    rescuer = deployment.start_worker("rescuer", *LEASE, *EAGER_RECONCILE)
    wait_for(lambda: flow.get(job_id).status is JobStatus.DONE, "the rescuer to finish the job")
    done = flow.get(job_id)
    history_when_done = flow.history(job_id)

    zombie.signal(signal.SIGCONT)
    wait_for(lambda: zombie.logged("job.lease_lost", job_id=job_id),
             "the resumed worker to find its lease gone")
    wait_for(lambda: zombie.logged("handler.finished", job_id=job_id),
             "the resumed handler to return")

    assert flow.get(job_id) == done
    assert done.result == {"pid": rescuer.pid, "attempt": 2, "worker_id": "rescuer"}
    history = flow.history(job_id)
    assert history == history_when_done  # the zombie wrote nothing
    assert [row.event for row in history].count(Event.SUCCEED) == 1
    assert_never_two_live_leases(history)
    for worker in (zombie, rescuer):
        worker.signal(signal.SIGTERM)
        assert worker.wait() == 0


@pytest.mark.postgres
def test_an_idle_postgres_worker_starts_a_new_job_without_waiting_for_a_poll(
        postgres_deployment: Deployment) -> None:
    deployment = postgres_deployment
    # Polls 30 s apart: a job that starts within the wait below was announced by NOTIFY.
    worker = deployment.start_worker("listener", "--poll-interval", "30",
                                     "--listen-poll-interval", "30", *NO_RECONCILE)
    wait_for(lambda: worker.logged("wakeup.listening"), "the worker to LISTEN")
    time.sleep(0.5)  # let it look for jobs once and go idle
    job_id = deployment.queue_job()
    wait_for(lambda: marks(deployment.marks, job_id, "finished"), "the job to run",
             timeout=10)
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0


@pytest.mark.postgres
def test_a_burst_worker_drains_the_queue_in_batches(postgres_deployment: Deployment,
                                                    pg_url: sa.URL) -> None:
    """``jobflow worker --burst -c 8`` runs every job once and exits 0; the
    database runs far fewer statements on the jobs table than there are jobs
    (claims and finishing writes go in batches), as pg_stat_statements counts."""
    deployment = postgres_deployment
    job_ids = [deployment.queue_job() for _ in range(120)]
    # The extension's view lives in a database of its own; it sees every database.
    stats = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    try:
        with stats.connect() as conn:
            conn.exec_driver_sql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            conn.exec_driver_sql("SELECT pg_stat_statements_reset()")
        worker = deployment.start_worker("burst", "--burst", "--concurrency", "8",
                                         *NO_RECONCILE)
        assert worker.wait(timeout=60) == 0
        database = sa.make_url(deployment.settings.database_url).database
        with stats.connect() as conn:
            statements = conn.execute(sa.text(
                "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements s "
                "JOIN pg_database d ON d.oid = s.dbid "
                "WHERE d.datname = :database AND s.query ILIKE '%jobflow_jobs%'"),
                {"database": database}).scalar_one()
    finally:
        stats.dispose()

    flow = deployment.flow()
    assert all(flow.get(job_id).status is JobStatus.DONE for job_id in job_ids)
    assert all(len(marks(deployment.marks, job_id, "finished")) == 1 for job_id in job_ids)
    per_job = statements / len(job_ids)
    print(f"statements on the jobs table per job at concurrency 8: {per_job:.3f}")
    assert per_job < 0.4, f"{statements} statements for {len(job_ids)} jobs"
