"""The chaos suite: real faults done to real processes, each test on its own
PostgreSQL cluster (the test crashes, freezes or slows it), with ``jobflow
worker`` subprocesses that run :func:`tests.chaos.handlers.run`.

A :class:`Site` is one deployment: the cluster's database, migrated; a local
object folder; the environment a deployment would set (``JOBFLOW_*`` only);
the handlers' run log; and a library :class:`~jobflow.JobFlow` on the same
stores to queue jobs and to look at them. Every test ends with
:func:`tests.chaos.audit.audit`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import pytest
import sqlalchemy as sa

import jobflow.migrations
from jobflow import JobFlow, JobStatus, UploadPolicy
from jobflow.config import StoreSettings, open_flow
from tests.chaos.audit import AuditReport, Timeline, audit
from tests.chaos.handlers import RUN_LOG_ENV
from tests.conftest import EXTERNAL_DATABASE_URL, IN_CI
from tests.pgcluster import PostgresCluster, PostgresUnavailable, wait_stopped

#: Every chaos test module sets ``pytestmark = CHAOS``.
CHAOS = [pytest.mark.chaos, pytest.mark.postgres]

ROOT = Path(__file__).resolve().parents[2]
HANDLER = "tests.chaos.handlers:run"
#: Upper bound for waiting on something; a guard, never a measurement.
PATIENCE = 60.0
#: A crashed server loses no commit it acknowledged (the suite's shared
#: cluster trades that for speed; fsync stays off: the OS survives the crash).
DURABLE = ("synchronous_commit=on",)


def wait_for(condition: Callable[[], Any], what: str, timeout: float = PATIENCE) -> Any:
    """Poll until ``condition()`` is truthy and return it; fail naming ``what``."""
    give_up = time.monotonic() + timeout
    while not (found := condition()):
        if time.monotonic() > give_up:
            pytest.fail(f"gave up waiting for: {what}")
        time.sleep(0.05)
    return found


class WorkerProcess:
    """A ``jobflow worker`` subprocess whose JSON log lines go to a file, and
    the :class:`Timeline` of what the test did to it."""

    def __init__(self, process: subprocess.Popen[bytes], log_path: Path, log: IO[bytes]) -> None:
        self.process = process
        self.log_path = log_path
        self._log = log
        self.timeline = Timeline(process.pid)

    @property
    def pid(self) -> int:
        return self.process.pid

    def logs(self) -> list[dict[str, Any]]:
        entries = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                entries.append(json.loads(line))
            except ValueError:
                entries.append({"event": "<not json>", "line": line})
        return entries

    def logged(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        return [e for e in self.logs() if e.get("event") == event
                and all(e.get(k) == v for k, v in fields.items())]

    def freeze(self) -> None:
        """SIGSTOP, noted once the process is stopped."""
        self.process.send_signal(signal.SIGSTOP)
        wait_stopped(self.pid)
        self.timeline.frozen.append([time.time(), None])

    def thaw(self) -> None:
        """SIGCONT, noted before it is sent."""
        self.timeline.frozen[-1][1] = time.time()
        self.process.send_signal(signal.SIGCONT)

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float = PATIENCE) -> int:
        code = self.process.wait(timeout)
        self.timeline.died_at = self.timeline.died_at or time.time()
        self._log.close()
        return code

    def kill(self) -> None:
        """SIGKILL; its death is noted once it is reaped."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
        self.wait()


class Site:
    """One deployment on one cluster, driven through the ``jobflow`` command."""

    def __init__(self, cluster: PostgresCluster, folder: Path) -> None:
        self.cluster = cluster
        self.folder = folder
        self.run_log = folder / "runs.log"
        self.database_url = cluster.url()
        engine = sa.create_engine(self.database_url)
        try:
            jobflow.migrations.upgrade(engine)
        finally:
            engine.dispose()
        self.settings = StoreSettings(database_url=self.database_url,
                                      objects_dir=folder / "objects", workdir=folder)
        self.env = {name: value for name, value in os.environ.items()
                    if not name.startswith(("JOBFLOW_", "AWS_"))}
        self.env.update({
            "JOBFLOW_DATABASE_URL": self.database_url,
            "JOBFLOW_OBJECTS_DIR": str(folder / "objects"),
            "JOBFLOW_LOG_FORMAT": "json",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            RUN_LOG_ENV: str(self.run_log),
        })
        self.flow: JobFlow = open_flow(self.settings, UploadPolicy())
        self.workers: list[WorkerProcess] = []
        self.job_ids: list[str] = []

    @property
    def engine(self) -> sa.Engine:
        engine: sa.Engine = self.flow.store.engine  # type: ignore[attr-defined]
        return engine

    def queue_jobs(self, count: int, params: dict[str, Any] | None = None) -> list[str]:
        """``count`` jobs whose upload is verified: queued, claimable."""
        ids = []
        for _ in range(count):
            ticket = self.flow.initiate_upload("chaos", params or {}, content_type="video/mp4")
            self.flow.objects.put(ticket.key, b"\x00\x00\x00\x18ftypmp42",
                                  content_type="video/mp4")
            self.flow.complete_upload(ticket.job_id)
            ids.append(ticket.job_id)
        self.job_ids += ids
        return ids

    def cli(self, *args: str, prefix: Sequence[str] = (),
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*prefix, sys.executable, "-m", "jobflow", *args],
                              env={**self.env, **(env or {})}, cwd=self.folder,
                              capture_output=True, text=True, timeout=120, check=False)

    def start_worker(self, name: str, *args: str) -> WorkerProcess:
        log_path = self.folder / f"worker-{name}.log"
        log = log_path.open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "jobflow", "worker", "--handler", HANDLER,
             "--worker-id", name, *args],
            env=self.env, cwd=self.folder, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
        worker = WorkerProcess(process, log_path, log)
        self.workers.append(worker)
        return worker

    def statuses(self, job_ids: Sequence[str] | None = None) -> dict[JobStatus, int]:
        """How many of the jobs (default: all queued by the test) are in each status;
        nothing while the database cannot say."""
        ids = list(self.job_ids if job_ids is None else job_ids)
        try:
            with self.engine.connect() as conn:
                rows = conn.execute(sa.text(
                    "SELECT status, count(*) FROM jobflow_jobs "
                    "WHERE id = ANY(CAST(:ids AS uuid[])) GROUP BY status"), {"ids": ids}).all()
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
def site(cluster: PostgresCluster, tmp_path: Path) -> Iterator[Site]:
    deployed = Site(cluster, tmp_path)
    try:
        yield deployed
    finally:
        deployed.close()
