"""The chaos suite: real faults done to real processes, with ``jobflow worker``
subprocesses that run :mod:`tests.chaos.handlers`.

A :class:`Site` is one deployment: a migrated database (by default, the
``site`` fixture's, a PostgreSQL cluster of the test's own that it crashes,
freezes or slows; SQLite, or a database of the run's server, where the fault
is elsewhere); a local object folder or moto's S3 (:class:`S3Server`, which a
test takes down); the environment a deployment would set (``JOBFLOW_*``, and
fake ``AWS_*`` credentials for S3); the handlers' run log; and a library
:class:`~jobflow.JobFlow` on the same stores to queue jobs and to look at
them. Every test ends with :func:`tests.chaos.audit.audit`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import boto3
import pytest
import sqlalchemy as sa
from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import BaseWSGIServer, make_server

import jobflow.migrations
from jobflow import JobFlow, JobStatus, UploadPolicy
from jobflow.adapters.sqlalchemy.schema import jobs as jobs_table
from jobflow.config import StoreSettings, open_flow
from tests.chaos.audit import AuditReport, Timeline, audit
from tests.chaos.handlers import RUN_LOG_ENV
from tests.conftest import EXTERNAL_DATABASE_URL, IN_CI
from tests.e2e import conftest as e2e
from tests.fake_aws import REGION, use_fake_aws_credentials
from tests.pgcluster import PostgresCluster, PostgresUnavailable, free_port, wait_stopped

#: The marks of a chaos test on PostgreSQL (``pytestmark = CHAOS`` in a module of them).
CHAOS = [pytest.mark.chaos, pytest.mark.postgres]

ROOT = Path(__file__).resolve().parents[2]
HANDLER = "tests.chaos.handlers:run"
#: The handler that first copies the job's object out of the object store.
DOWNLOAD = "tests.chaos.handlers:download"
#: Upper bound for waiting on something; a guard, never a measurement.
PATIENCE = 60.0
#: A crashed server loses no commit it acknowledged (the suite's shared
#: cluster trades that for speed; fsync stays off: the OS survives the crash).
DURABLE = ("synchronous_commit=on",)


def wait_for(condition: Callable[[], Any], what: str, timeout: float = PATIENCE) -> Any:
    """Poll until ``condition()`` is truthy and return it; fail naming ``what``."""
    return e2e.wait_for(condition, what, timeout)


def sqlite_url(folder: Path) -> str:
    """A SQLite database file in ``folder``."""
    return f"sqlite:///{folder / 'jobflow.sqlite3'}"


class S3Server:
    """moto's S3 on one fixed port that can be taken down and brought back.

    Down means down: the listening socket is closed, so connections are
    refused. The buckets live in moto's process-wide state and survive."""

    bucket = "jobflow-chaos"

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


class WorkerProcess(e2e.WorkerProcess):
    """A ``jobflow`` subprocess (a worker, or a command the test cuts short)
    whose JSON log lines go to a file, and the :class:`Timeline` of what the
    test did to it."""

    def __init__(self, process: subprocess.Popen[bytes], log_path: Path, log: IO[bytes]) -> None:
        super().__init__(process, log_path, log)
        self.timeline = Timeline(process.pid)

    def freeze(self) -> None:
        """SIGSTOP, noted once the process is stopped."""
        self.process.send_signal(signal.SIGSTOP)
        wait_stopped(self.pid)
        self.timeline.frozen.append([time.time(), None])

    def thaw(self) -> None:
        """SIGCONT, noted before it is sent."""
        self.timeline.frozen[-1][1] = time.time()
        self.process.send_signal(signal.SIGCONT)

    def wait(self, timeout: float = PATIENCE) -> int:
        code = super().wait(timeout)
        self.timeline.died_at = self.timeline.died_at or time.time()
        return code

    def kill(self) -> None:
        """SIGKILL; its death is noted once it is reaped."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
        self.wait()


class Site:
    """One deployment, driven through the ``jobflow`` command: its database at
    ``database_url`` (the ``cluster``'s, if the test faults that), its objects
    in a local folder or, with ``s3``, in that server's bucket; ``policy`` is
    the test's own JobFlow's (uploads are created under it)."""

    def __init__(self, folder: Path, database_url: str, *,
                 cluster: PostgresCluster | None = None, s3: S3Server | None = None,
                 policy: UploadPolicy | None = None) -> None:
        self._cluster = cluster
        self.folder = folder
        self.run_log = folder / "runs.log"
        self.database_url = database_url
        engine = sa.create_engine(self.database_url)
        try:
            jobflow.migrations.upgrade(engine)
        finally:
            engine.dispose()
        self.env = {name: value for name, value in os.environ.items()
                    if not name.startswith(("JOBFLOW_", "AWS_"))}
        self.env.update({
            "JOBFLOW_DATABASE_URL": self.database_url,
            "JOBFLOW_LOG_FORMAT": "json",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            RUN_LOG_ENV: str(self.run_log),
        })
        if s3 is None:
            self.settings = StoreSettings(database_url=self.database_url,
                                          objects_dir=folder / "objects", workdir=folder)
            self.env["JOBFLOW_OBJECTS_DIR"] = str(folder / "objects")
        else:
            self.settings = StoreSettings(database_url=self.database_url, s3_bucket=s3.bucket,
                                          s3_endpoint_url=s3.url, s3_region=REGION,
                                          workdir=folder)
            self.env.update({"JOBFLOW_S3_BUCKET": s3.bucket, "JOBFLOW_S3_ENDPOINT_URL": s3.url,
                             "JOBFLOW_S3_REGION": REGION})
            # The fake credentials the ``s3`` fixture put in this process's environment.
            self.env.update({name: value for name, value in os.environ.items()
                             if name.startswith("AWS_")})
        self.flow: JobFlow = open_flow(self.settings, policy or UploadPolicy())
        self.workers: list[WorkerProcess] = []
        self.job_ids: list[str] = []

    @property
    def cluster(self) -> PostgresCluster:
        """The PostgreSQL cluster the test may crash or freeze."""
        assert self._cluster is not None, "this site's database is not a cluster of its own"
        return self._cluster

    @property
    def engine(self) -> sa.Engine:
        engine: sa.Engine = self.flow.store.engine  # type: ignore[attr-defined]
        return engine

    def _upload(self, params: dict[str, Any] | None) -> str:
        """A new job whose object is in place; its client has not completed it."""
        ticket = self.flow.initiate_upload("chaos", params or {}, content_type="video/mp4")
        self.flow.objects.put(ticket.key, b"\x00\x00\x00\x18ftypmp42",
                              content_type="video/mp4")
        self.job_ids.append(ticket.job_id)
        return ticket.job_id

    def queue_jobs(self, count: int, params: dict[str, Any] | None = None) -> list[str]:
        """``count`` jobs whose upload is verified: queued, claimable."""
        ids = [self._upload(params) for _ in range(count)]
        for job_id in ids:
            self.flow.complete_upload(job_id)
        return ids

    def forgotten_uploads(self, count: int) -> list[str]:
        """``count`` uploads whose object is in place but whose client never
        called complete: only a reconcile queues them."""
        return [self._upload({}) for _ in range(count)]

    def cli(self, *args: str, prefix: Sequence[str] = (),
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*prefix, sys.executable, "-m", "jobflow", *args],
                              env={**self.env, **(env or {})}, cwd=self.folder,
                              capture_output=True, text=True, timeout=120, check=False)

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> WorkerProcess:
        """``jobflow ARGS`` in the background, logging to ``NAME.log``; killed at the end."""
        log_path = self.folder / f"{name}.log"
        log = log_path.open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "jobflow", *args], env={**self.env, **(env or {})},
            cwd=self.folder, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        started = WorkerProcess(process, log_path, log)
        self.workers.append(started)
        return started

    def start_worker(self, name: str, *args: str, handler: str = HANDLER) -> WorkerProcess:
        return self.start(f"worker-{name}", "worker", "--handler", handler,
                          "--worker-id", name, *args)

    def statuses(self, job_ids: Sequence[str] | None = None) -> dict[JobStatus, int]:
        """How many of the jobs (default: all queued by the test) are in each status;
        nothing while the database cannot say."""
        ids = list(self.job_ids if job_ids is None else job_ids)
        query = (sa.select(jobs_table.c.status, sa.func.count())
                 .where(jobs_table.c.id.in_(ids)).group_by(jobs_table.c.status))
        try:
            with self.engine.connect() as conn:
                rows = conn.execute(query).all()
        except sa.exc.OperationalError:  # after a crash: the pool reconnects next time
            return {}
        return {JobStatus(status): count for status, count in rows}

    def wait_until_done(self, job_ids: Sequence[str] | None = None,
                        timeout: float = PATIENCE) -> None:
        ids = list(self.job_ids if job_ids is None else job_ids)
        wait_for(lambda: self.statuses(ids).get(JobStatus.DONE, 0) == len(ids),
                 f"{len(ids)} jobs to be done", timeout)

    def audit(self) -> AuditReport:
        """:func:`tests.chaos.audit.audit` of every job the test queued; prints the figures."""
        report = audit(self.flow, self.job_ids, self.run_log,
                       [worker.timeline for worker in self.workers])
        print(f"chaos figures: {report.line()}")
        return report

    def close(self) -> None:
        for worker in self.workers:
            worker.kill()
        self.engine.dispose()


@pytest.fixture
def cluster() -> Iterator[PostgresCluster]:
    """A PostgreSQL cluster of this test's own, which it may crash or freeze."""
    if EXTERNAL_DATABASE_URL:
        pytest.skip("the chaos suite crashes and freezes a PostgreSQL of its own")
    try:
        started = PostgresCluster(settings=DURABLE).start()
    except PostgresUnavailable as exc:
        if IN_CI:
            pytest.fail(f"PostgreSQL is required under CI and did not start: {exc}")
        pytest.skip(f"PostgreSQL unavailable: {exc}")
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture
def s3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    """moto's S3 server with the sites' bucket, and fake AWS credentials in the
    environment; stopped at the end."""
    use_fake_aws_credentials(monkeypatch, tmp_path)
    server = S3Server()
    server.start()
    try:
        boto3.client("s3", endpoint_url=server.url,
                     region_name=REGION).create_bucket(Bucket=server.bucket)
        yield server
    finally:
        server.stop()


@pytest.fixture
def site(cluster: PostgresCluster, tmp_path: Path) -> Iterator[Site]:
    """A deployment on the test's own cluster and a local object folder."""
    deployed = Site(tmp_path, cluster.url(), cluster=cluster)
    try:
        yield deployed
    finally:
        deployed.close()
