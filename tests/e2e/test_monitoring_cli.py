"""The monitoring commands as subprocesses: a worker's ``--metrics-port``
scraped while it works, ``jobflow metrics`` (with the database up, and down
at start), and ``jobflow dashboard``'s refusal of a public address without a
token, and its token when it has one."""

from __future__ import annotations

import signal
import time

import httpx
import pytest

from jobflow import JobStatus
from tests.e2e.conftest import Deployment, wait_for
from tests.e2e.servers import running, value
from tests.metrics_scenario import Samples, samples
from tests.pgcluster import free_port

FINISHED = "jobflow_attempts_finished_total"
VERIFIED = ("jobflow_upload_verifications_total", {"outcome": "verified"})


def scrape_port(port: int) -> Samples:
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30)
    assert response.status_code == 200
    return samples(response.text)


def test_a_running_workers_counters_move_as_it_works(deployment: Deployment) -> None:
    worker = deployment.start_worker("w", "--metrics-port", "0", "--poll-interval", "0.1",
                                     "--reconcile-interval", "0.3", "--adopt-after", "0")
    [listening] = wait_for(lambda: worker.logged("metrics.listening"), "the metrics server")
    port = listening["port"]
    before = scrape_port(port)
    assert value(before, FINISHED, outcome="succeeded") == 0
    assert value(before, "jobflow_claims_total") == 0
    assert value(before, "process_cpu_seconds_total") > 0  # the standard process metrics

    flow = deployment.flow()
    first = deployment.queue_job()  # verified here, run there
    wait_for(lambda: flow.get(first).status is JobStatus.DONE, "the first job")
    after_one = scrape_port(port)
    assert value(after_one, FINISHED, outcome="succeeded") == 1
    assert value(after_one, "jobflow_claims_total") == 1
    assert value(after_one, "jobflow_job_duration_seconds_count", outcome="succeeded") == 1

    forgotten = flow.initiate_upload("e2e-owner", content_type="video/mp4")
    flow.objects.put(forgotten.key, b"\x00\x00\x00\x18ftypmp42 video", content_type="video/mp4")
    wait_for(lambda: flow.get(forgotten.job_id).status is JobStatus.DONE,
             "the worker's reconcile to adopt the forgotten upload and run it")
    after_two = scrape_port(port)
    assert value(after_two, FINISHED, outcome="succeeded") == 2
    assert value(after_two, VERIFIED[0], **VERIFIED[1]) == 1  # its reconcile verified it
    assert value(after_two, "jobflow_object_store_duration_seconds_count", operation="head",
                 error="none") >= 1
    assert ("jobflow_up", frozenset()) not in after_two  # the database gauges: jobflow metrics

    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0


def test_jobflow_metrics_serves_the_database_gauges(deployment: Deployment) -> None:
    deployment.queue_job()
    flow = deployment.flow()
    waiting = flow.initiate_upload("e2e-owner", content_type="video/mp4")
    flow.cancel(flow.initiate_upload("e2e-owner", content_type="video/mp4").job_id)
    with running(deployment, "metrics", "--cache-seconds", "0") as exporter:
        found = exporter.scrape()
        assert value(found, "jobflow_up") == 1
        assert value(found, "jobflow_jobs", status="queued") == 1
        assert value(found, "jobflow_jobs", status="awaiting_upload") == 1
        assert value(found, "jobflow_jobs", status="failed") == 1
        assert value(found, "jobflow_failed_jobs_last_hour", error_code="cancelled") == 1
        assert value(found, "jobflow_oldest_job_age_seconds", status="awaiting_upload") > 0
        assert not [name for name, _ in found if name.startswith("process_")]
        flow.cancel(waiting.job_id)
        assert value(exporter.scrape(), "jobflow_jobs", status="failed") == 2
        assert exporter.stop() == 0


@pytest.mark.postgres
def test_jobflow_metrics_starts_while_the_database_is_down(deployment: Deployment) -> None:
    nowhere = f"postgresql://nobody@127.0.0.1:{free_port()}/jobs"
    with running(deployment, "metrics", "--query-timeout", "1",
                 env={"JOBFLOW_DATABASE_URL": nowhere}) as exporter:
        started = time.monotonic()
        found = exporter.scrape()
        assert time.monotonic() - started < 10
        assert value(found, "jobflow_up") == 0
        assert not [name for name, _ in found if name == "jobflow_jobs"]


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "dashboard.example.com"])
def test_the_dashboard_refuses_a_public_address_without_a_token(
        sqlite_deployment: Deployment, host: str) -> None:
    sqlite_deployment.queue_job()
    refused = sqlite_deployment.cli("dashboard", "--host", host, "--port", "0")
    assert refused.returncode == 2
    assert "needs a token" in refused.stderr
    assert refused.stdout == ""


def test_the_dashboard_on_a_public_address_checks_its_token(
        sqlite_deployment: Deployment) -> None:
    job_id = sqlite_deployment.queue_job()
    with running(sqlite_deployment, "dashboard", "--host", "0.0.0.0",
                 env={"JOBFLOW_DASHBOARD_TOKEN": "s3cret-token"}) as dashboard:
        page = f"{dashboard.url}/job/{job_id}"
        assert httpx.get(page).status_code == 401
        assert httpx.get(page, auth=("ops", "wrong")).status_code == 401
        shown = httpx.get(page, auth=("ops", "s3cret-token"))
        assert shown.status_code == 200 and job_id in shown.text
        assert httpx.get(page, headers={"Authorization": "Bearer s3cret-token"}
                         ).status_code == 200
        assert httpx.post(page, auth=("ops", "s3cret-token")).status_code == 405
        assert dashboard.stop() == 0
    assert sqlite_deployment.flow().get(job_id).status is JobStatus.QUEUED
