"""Object store outages under load, against a real ``jobflow worker`` process:
S3 (moto's server) down for 15 s, a local object folder renamed away for 15 s,
and S3 hanging while ``jobflow reconcile`` must rescue a dead worker's job.

The promise: an outage fails no job and expires no upload (the jobs wait,
deferred, and all end ``done`` once the store is back), and it delays no
rescue. Each test ends with its own audit of every job it created: the
expected status, a history that replays to it, attempts and deferrals within
bounds, and never two attempts of one job running at once in the handlers'
own log.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import sqlalchemy as sa
from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import BaseWSGIServer, make_server

from jobflow import JobFlow, JobStatus, UploadPolicy
from jobflow import states as core
from jobflow.adapters.memory import InMemoryObjectStore
from jobflow.adapters.sqlalchemy import SqlAlchemyJobStore
from jobflow.config import StoreSettings, ensure_schema, make_engine, open_flow
from jobflow.models import Event, Job
from tests.chaos.outage_handlers import LOG_DIR_ENV, attempt_spans
from tests.fake_aws import REGION, silent_endpoint, use_fake_aws_credentials

pytestmark = pytest.mark.chaos

ROOT = Path(__file__).resolve().parents[2]
HANDLER = "tests.chaos.outage_handlers:download"
BUCKET = "jobflow-chaos"
#: How long each outage lasts, as in the probe that found the defects.
OUTAGE_SECONDS = 15.0
#: Upper bound for waiting on the worker after an outage; a guard, not a measurement.
PATIENCE = 60.0
#: Short backoffs and pauses, so that the jobs come back soon after the store does.
WORKER_OPTIONS = [
    "--concurrency", "4", "--lease-seconds", "10", "--poll-interval", "0.1",
    "--reconcile-interval", "0.5", "--adopt-after", "2", "--shutdown-grace", "5",
    "--defer-backoff", "0.5", "--defer-backoff-max", "2",
    "--storage-pause", "0.2", "--storage-pause-max", "1",
]
#: Uploads created just before an outage pass their deadline during it.
SHORT_DEADLINE = UploadPolicy(upload_ttl_seconds=3)
VIDEO = b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8


# -- the moving parts ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class S3Server:
    """moto's S3 on one fixed port that can be taken down and brought back.

    Down means down: the listening socket is closed, so connections are
    refused. The buckets live in moto's process-wide state and survive."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._server = make_server("127.0.0.1", self.port,
                                   DomainDispatcherApplication(create_backend_app),
                                   threaded=True, request_handler=MotoRequestHandler)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="moto-s3", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = self._thread = None


class Process:
    """A ``jobflow`` subprocess whose output (JSON log lines) goes to a file."""

    def __init__(self, args: list[str], env: dict[str, str], folder: Path, name: str) -> None:
        self.log_path = folder / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "jobflow", *args], env=env, cwd=folder,
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def logged(self, event: str) -> list[str]:
        return [line for line in self.log_path.read_text(errors="replace").splitlines()
                if f'"event": "{event}"' in line]

    def stop(self, signum: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signum)
        code = self.process.wait(PATIENCE)
        self._log.close()
        return code


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    """The subprocesses a test started; killed at its end whatever happened."""
    started: list[Process] = []
    yield started
    for process in started:
        if process.process.poll() is None:
            process.stop(signal.SIGKILL)


@pytest.fixture
def open_store() -> Iterator[Callable[[StoreSettings], JobFlow]]:
    """Opens the test's own JobFlow on a deployment's stores; its engine is
    disposed at the end."""
    opened: list[JobFlow] = []

    def open_one(settings: StoreSettings) -> JobFlow:
        opened.append(open_flow(settings, SHORT_DEADLINE))
        return opened[-1]

    yield open_one
    for flow in opened:
        assert isinstance(flow.store, SqlAlchemyJobStore)
        flow.store.engine.dispose()


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """What a deployment's processes see: fake AWS credentials, JSON logs, and
    the folder the handler writes its attempts to."""
    use_fake_aws_credentials(monkeypatch, tmp_path)
    (tmp_path / "attempts").mkdir()
    return {**os.environ, "JOBFLOW_LOG_FORMAT": "json",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            LOG_DIR_ENV: str(tmp_path / "attempts")}


def store_env(settings: StoreSettings) -> dict[str, str]:
    found = {"JOBFLOW_DATABASE_URL": settings.database_url,
             "JOBFLOW_OBJECTS_DIR": str(settings.objects_dir or ""),
             "JOBFLOW_S3_BUCKET": settings.s3_bucket, "JOBFLOW_S3_REGION": settings.s3_region,
             "JOBFLOW_S3_ENDPOINT_URL": settings.s3_endpoint_url}
    return {name: value for name, value in found.items() if value}


def queue_jobs(flow: JobFlow, count: int, sleep: float) -> list[str]:
    """Jobs whose upload was verified, each working ``sleep`` s after its download."""
    job_ids = []
    for _ in range(count):
        ticket = flow.initiate_upload("chaos", {"sleep": sleep}, content_type="video/mp4")
        flow.objects.put(ticket.key, VIDEO, content_type="video/mp4")
        flow.complete_upload(ticket.job_id)
        job_ids.append(ticket.job_id)
    return job_ids


def forgotten_uploads(flow: JobFlow, count: int) -> list[str]:
    """Uploads whose client never called complete: only reconcile queues them."""
    job_ids = []
    for _ in range(count):
        ticket = flow.initiate_upload("chaos", {"sleep": 0}, content_type="video/mp4")
        flow.objects.put(ticket.key, VIDEO, content_type="video/mp4")
        job_ids.append(ticket.job_id)
    return job_ids


def wait_for(condition: Callable[[], Any], what: str, timeout: float = PATIENCE) -> None:
    give_up = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > give_up:
            pytest.fail(f"gave up waiting for: {what}")
        time.sleep(0.1)


def statuses(flow: JobFlow, job_ids: list[str]) -> dict[JobStatus, int]:
    found = dict.fromkeys(JobStatus, 0)
    for job_id in job_ids:
        found[flow.get(job_id).status] += 1
    return found


def audit(flow: JobFlow, job_ids: list[str], attempts_dir: Path) -> list[Job]:
    """Every job ended done; its history replays to that, within its bounds;
    no job ever ran twice at once."""
    jobs = [flow.get(job_id) for job_id in job_ids]
    assert {job.status for job in jobs} == {JobStatus.DONE}, [
        (job.id, job.status.value, job.error_code) for job in jobs
        if job.status is not JobStatus.DONE]
    for job in jobs:
        history = flow.history(job.id)
        assert core.replay(history) is job.status
        assert 1 <= job.attempts <= job.max_attempts
        assert 0 <= job.deferrals <= flow.policy.max_deferrals
        assert not [row for row in history if row.event in (Event.FAIL, Event.EXPIRE_UPLOAD)]
    for job_id, spans in attempt_spans(attempts_dir).items():
        for (_, ended), (started, _) in itertools.pairwise(spans):
            assert started >= ended, f"job {job_id} ran two attempts at once"
    return jobs


# -- S3 down -------------------------------------------------------------------------------


@pytest.mark.postgres
def test_s3_down_for_15_s_under_load_fails_and_expires_no_job(
        tmp_path: Path, env: dict[str, str], pg_engine: sa.Engine,
        processes: list[Process], open_store: Callable[[StoreSettings], JobFlow]) -> None:
    s3 = S3Server()
    s3.start()
    try:
        boto3.client("s3", endpoint_url=s3.url, region_name=REGION).create_bucket(Bucket=BUCKET)
        settings = StoreSettings(
            database_url=pg_engine.url.render_as_string(hide_password=False),
            s3_bucket=BUCKET, s3_endpoint_url=s3.url, s3_region=REGION, workdir=tmp_path)
        flow = open_store(settings)
        job_ids = queue_jobs(flow, 40, sleep=0.25)
        worker = Process(["worker", "--handler", HANDLER, *WORKER_OPTIONS],
                         {**env, **store_env(settings)}, tmp_path, "worker")
        processes.append(worker)
        wait_for(lambda: statuses(flow, job_ids)[JobStatus.DONE] >= 8, "the first jobs to run")

        waiting = forgotten_uploads(flow, 5)
        s3.stop()
        time.sleep(OUTAGE_SECONDS)
        during = statuses(flow, job_ids + waiting)
        s3.start()

        wait_for(lambda: statuses(flow, job_ids + waiting)[JobStatus.DONE] == 45,
                 "every job to end done after S3 came back")
        assert worker.stop() == 0
    finally:
        s3.stop()

    assert during[JobStatus.FAILED] == 0, "the outage failed jobs"
    assert during[JobStatus.DONE] < 45, "the outage did not hold up any job"
    jobs = audit(flow, job_ids + waiting, tmp_path / "attempts")
    assert sum(job.deferrals for job in jobs) > 0, "no attempt met the outage"
    assert all(flow.history(job_id)[1].event is Event.VERIFY_UPLOAD for job_id in waiting)
    assert worker.logged("worker.claims_paused"), "the worker never slowed its claiming"


# -- a local folder gone -------------------------------------------------------------------


def test_a_local_object_folder_renamed_away_for_15_s_fails_and_expires_no_job(
        tmp_path: Path, env: dict[str, str], processes: list[Process],
        open_store: Callable[[StoreSettings], JobFlow]) -> None:
    folder = tmp_path / "objects"
    settings = StoreSettings(database_url=f"sqlite:///{tmp_path / 'jobflow.sqlite3'}",
                             objects_dir=folder, workdir=tmp_path)
    flow = open_store(settings)
    job_ids = queue_jobs(flow, 60, sleep=0.15)
    worker = Process(["worker", "--handler", HANDLER, *WORKER_OPTIONS],
                     {**env, **store_env(settings)}, tmp_path, "worker")
    processes.append(worker)
    wait_for(lambda: statuses(flow, job_ids)[JobStatus.DONE] >= 10, "the first jobs to run")

    waiting = forgotten_uploads(flow, 5)
    folder.rename(tmp_path / "objects-away")  # an unmounted volume, a moved folder
    time.sleep(OUTAGE_SECONDS)
    during = statuses(flow, job_ids + waiting)
    (tmp_path / "objects-away").rename(folder)

    wait_for(lambda: statuses(flow, job_ids + waiting)[JobStatus.DONE] == 65,
             "every job to end done after the folder came back")
    assert worker.stop() == 0

    assert during[JobStatus.FAILED] == 0, "the outage failed jobs"
    assert during[JobStatus.DONE] < 65, "the outage did not hold up any job"
    jobs = audit(flow, job_ids + waiting, tmp_path / "attempts")
    assert sum(job.deferrals for job in jobs) > 0, "no attempt met the outage"
    assert all(flow.history(job_id)[1].event is Event.VERIFY_UPLOAD for job_id in waiting)
    assert worker.logged("worker.claims_paused"), "the worker never slowed its claiming"
    assert not (tmp_path / "objects-away").exists()


# -- S3 hanging ----------------------------------------------------------------------------


def test_reconcile_rescues_a_dead_workers_job_on_time_while_s3_hangs(
        tmp_path: Path, env: dict[str, str], processes: list[Process]) -> None:
    """S3 accepts connections and never answers; one upload waits for a check,
    one job's worker died. ``jobflow reconcile`` (the CLI's own S3 timeouts,
    about 30 s per call) rescues the job at once and leaves the upload alone."""
    database_url = f"sqlite:///{tmp_path / 'jobflow.sqlite3'}"
    engine = make_engine(database_url)
    ensure_schema(engine)
    # The scene is set with an in-memory object store on the same database.
    flow = JobFlow(store=SqlAlchemyJobStore(engine), objects=InMemoryObjectStore(bucket=BUCKET),
                   policy=UploadPolicy(lease_seconds=0.5))
    [dead] = queue_jobs(flow, 1, sleep=0)
    [claim] = flow.claim("dead-worker")
    [waiting] = forgotten_uploads(flow, 1)
    before = (flow.get(waiting), flow.history(waiting))
    wait_for(lambda: (claim.job.lease_expires_at or flow.now()) < flow.now(),
             "the dead worker's lease to run out")

    with silent_endpoint() as hung:
        settings = StoreSettings(database_url=database_url, s3_bucket=BUCKET,
                                 s3_endpoint_url=hung, s3_region=REGION, workdir=tmp_path)
        reconcile = Process(["reconcile", "--adopt-after", "0"],
                            {**env, **store_env(settings)}, tmp_path, "reconcile")
        processes.append(reconcile)
        wait_for(lambda: flow.get(dead).status is JobStatus.QUEUED,
                 "the dead worker's job to be rescued", timeout=5.0)
        assert reconcile.process.poll() is None, "reconcile did not even ask the hung S3"
        assert (flow.get(waiting), flow.history(waiting)) == before
        reconcile.stop(signal.SIGKILL)

    assert (flow.get(waiting), flow.history(waiting)) == before
    rescue = flow.history(dead)[-1]
    assert (rescue.event, rescue.detail) == (Event.RESCUE, {"lost_worker": "dead-worker"})
    engine.dispose()
