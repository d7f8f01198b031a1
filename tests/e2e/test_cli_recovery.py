"""Retention and recovery through the ``jobflow`` command, as a subprocess on
SQLite and PostgreSQL: ``purge``, ``cancel`` of a running job, and ``requeue
--error-code``."""

from __future__ import annotations

import json
import signal
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path

from jobflow import JobFlow, JobStatus, UploadPolicy
from jobflow.models import Event
from tests.e2e.conftest import Deployment, wait_for
from tests.e2e.handlers import marks
from tests.e2e.test_cli import ACCESS_KEY, SECRET_KEY, one_error_line

LEASE = ["--lease-seconds", "5", "--heartbeat-interval", "0.25", "--poll-interval", "0.1",
         "--reconcile-interval", "600"]


def flow_at(deployment: Deployment, moment: datetime) -> JobFlow:
    """A JobFlow on the deployment's stores whose clock stands still at ``moment``."""
    base = deployment.flow()
    return JobFlow(store=base.store, objects=base.objects, policy=UploadPolicy(),
                   clock=lambda: moment)


def ended(flow: JobFlow, status: JobStatus, error_code: str | None = None) -> str:
    """A job that ran once and ended in ``status``."""
    ticket = flow.initiate_upload("e2e-owner", content_type="video/mp4")
    flow.objects.put(ticket.key, b"\x00\x00\x00\x18ftypmp42 video", content_type="video/mp4")
    flow.complete_upload(ticket.job_id)
    [claim] = flow.claim("e2e-worker")
    if status is JobStatus.DONE:
        flow.succeed(claim, {"ok": True})
    else:
        flow.fail(claim, "boom", retryable=False, error_code=error_code)
    return ticket.job_id


def test_purge_deletes_old_finished_jobs_their_history_and_objects(
        deployment: Deployment) -> None:
    long_ago = flow_at(deployment, datetime.now(UTC) - timedelta(days=40))
    old = [ended(long_ago, JobStatus.DONE), ended(long_ago, JobStatus.FAILED, "unsupported")]
    flow = deployment.flow()
    recent = ended(flow, JobStatus.DONE)
    waiting_long = long_ago.initiate_upload("e2e-owner", content_type="video/mp4").job_id
    queued = deployment.queue_job()
    keys = {job_id: flow.get(job_id).key for job_id in [*old, recent, queued]}
    history_rows = sum(len(flow.history(job_id)) for job_id in old)
    objects = deployment.folder / "objects"

    planned = deployment.cli("purge", "--finished-before", "30d", "--dry-run")
    assert planned.returncode == 0, planned.stderr
    assert planned.stdout.startswith("would delete 2 finished jobs (done or failed before ")
    assert all(flow.get(job_id) for job_id in old), "a dry run deletes nothing"

    purged = deployment.cli("purge", "--finished-before", "30d", "--delete-objects",
                            "--batch-size", "1", "--json")
    assert purged.returncode == 0, purged.stderr
    report = json.loads(purged.stdout)
    assert (report["jobs"], report["objects_deleted"], report["objects_failed"]) == (2, 2, [])
    assert report["events"] == history_rows
    for job_id in old:
        assert deployment.cli("show", job_id).returncode == 3
        assert not (objects / keys[job_id]).exists()
    for job_id in (recent, queued):
        assert (objects / keys[job_id]).exists()
    assert flow.get(waiting_long).status is JobStatus.AWAITING_UPLOAD, "never a waiting job"
    assert flow.get(queued).status is JobStatus.QUEUED

    everything = deployment.cli("purge", "--finished-before", "0")
    assert everything.returncode == 0, everything.stderr
    assert everything.stdout.startswith("deleted 1 finished jobs")
    assert flow.counts() == {JobStatus.AWAITING_UPLOAD: 1, JobStatus.QUEUED: 1,
                             JobStatus.QUICK_RUNNING: 0, JobStatus.DONE: 0,
                             JobStatus.FAILED: 0}
    missing = deployment.cli("purge")
    assert missing.returncode == 2 and "--finished-before" in missing.stderr


def test_cancel_asks_a_running_job_to_stop_and_its_worker_ends_it(
        deployment: Deployment) -> None:
    job_id = deployment.queue_job()
    worker = deployment.start_worker("stoppable", "--handler",
                                     "tests.e2e.handlers:until_cancelled", *LEASE)
    flow = deployment.flow()
    wait_for(lambda: marks(deployment.marks, job_id, "started"), "the job to start")
    waiting = deployment.queue_job()  # the worker's one slot is taken: it waits
    not_started = deployment.cli("cancel", waiting)
    assert not_started.returncode == 0, not_started.stderr
    assert not_started.stdout.strip() == f"job {waiting}: queued -> failed (cancelled)"

    asked = deployment.cli("cancel", job_id[:8])
    assert asked.returncode == 0, asked.stderr
    assert asked.stdout.strip() == (f"job {job_id}: cancel requested (quick_running; its "
                                    "worker stops it at its next lease renewal)")
    wait_for(lambda: flow.get(job_id).status is JobStatus.FAILED, "the worker to stop it")
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0

    job = flow.get(job_id)
    assert (job.error_code, job.attempts) == ("cancelled", 1)
    history = [(row.event, row.worker_id) for row in flow.history(job_id)]
    assert Event.REQUEST_CANCEL in [event for event, _ in history]
    assert history[-1] == (Event.FAIL, "stoppable")
    assert worker.logged("job.cancel_requested", job_id=job_id)
    refused = deployment.cli("cancel", job_id)
    assert refused.returncode == 4
    assert one_error_line(refused.stderr) == (
        f"jobflow: error: cannot cancel job {job_id} in failed")


def test_cancel_says_when_a_running_job_was_asked_already(deployment: Deployment) -> None:
    job_id = deployment.queue_job()
    [claim] = deployment.flow().claim("e2e-worker")
    first = deployment.cli("cancel", job_id, "--json")
    assert first.returncode == 0, first.stderr
    document = json.loads(first.stdout)
    assert document["status"] == "quick_running" and document["cancel_requested_at"]
    again = deployment.cli("cancel", job_id)
    assert again.returncode == 0, again.stderr
    assert "cancel already requested" in again.stdout
    assert deployment.flow().get(job_id).cancel_requested_at == datetime.fromisoformat(
        document["cancel_requested_at"]), "the first request stands"
    assert claim.token == deployment.flow().get(job_id).lease_token


def test_requeue_by_error_code_reverifies_each_job(deployment: Deployment) -> None:
    flow = deployment.flow()
    cause = [ended(flow, JobStatus.FAILED, "storage_outage") for _ in range(4)]
    gone = cause[2]
    (deployment.folder / "objects" / flow.get(gone).key).unlink()
    other = ended(flow, JobStatus.FAILED, "unsupported")

    result = deployment.cli("requeue", "--error-code", "storage_outage", "--since", "1h",
                            "--batch-size", "2", "--json")
    assert result.returncode == 6, result.stderr  # one job's object is gone
    report = json.loads(result.stdout)
    assert sorted(report["requeued"]) == sorted(set(cause) - {gone})
    assert report["still_failing"] == [gone] and report["stopped"] is None
    for job_id in report["requeued"]:
        assert flow.get(job_id).status is JobStatus.QUEUED
    assert flow.get(gone).status is flow.get(other).status is JobStatus.FAILED

    text = deployment.cli("requeue", "--error-code", "storage_outage")
    assert text.returncode == 6
    assert text.stdout.splitlines()[0] == ("error code storage_outage: requeued 0, "
                                           "still failing 1, skipped 0, unavailable 0")
    assert deployment.cli("requeue", "--error-code", "nothing_like_it").returncode == 0
    single = deployment.cli("requeue", other[:8], "--json")  # one job, as before
    assert single.returncode == 0 and json.loads(single.stdout)["status"] == "queued"

    for args in ([], [other, "--error-code", "unsupported"], [other, "--since", "1h"],
                 ["--error-code", "x", "--since", "soon"]):
        refused = deployment.cli("requeue", *args)
        assert refused.returncode == 2, (args, refused.stderr)
        assert "Traceback" not in refused.stderr


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_requeue_by_error_code_stops_cleanly_when_the_object_store_is_down(
        deployment: Deployment, tmp_path: Path) -> None:
    flow = deployment.flow()
    failed = [ended(flow, JobStatus.FAILED, "storage_outage") for _ in range(3)]
    before = {job_id: (flow.get(job_id), flow.history(job_id)) for job_id in failed}
    unreachable = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                   "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
                   "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
                   "AWS_EC2_METADATA_DISABLED": "true", "JOBFLOW_S3_BUCKET": "videos",
                   "JOBFLOW_S3_REGION": "us-east-1",
                   "JOBFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{_free_port()}"}

    result = deployment.cli("requeue", "--error-code", "storage_outage", env=unreachable)

    assert result.returncode == 5, result.stderr
    line = one_error_line(result.stderr)
    assert "stopped after requeuing 0 jobs" in line and "run it again" in line
    assert "unavailable 1" in result.stdout.splitlines()[0]
    assert {job_id: (flow.get(job_id), flow.history(job_id)) for job_id in failed} == before
    again = deployment.cli("requeue", "--error-code", "storage_outage")
    assert again.returncode == 0, again.stderr
    assert all(flow.get(job_id).status is JobStatus.QUEUED for job_id in failed)
