"""The ``jobflow`` command as a subprocess, on SQLite and on PostgreSQL.

Each test gets a :class:`Deployment`: a database, a local object folder, the
environment a real deployment would set (``JOBFLOW_*`` only), and a library
:class:`~jobflow.JobFlow` on the same stores to set the scene and check results.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest
import sqlalchemy as sa

from jobflow import JobFlow, UploadPolicy
from jobflow.config import StoreSettings, open_flow
from tests.e2e.handlers import MARKS_ENV

ROOT = Path(__file__).resolve().parents[2]
#: Upper bound for waiting on a process; a guard, never a measurement.
PATIENCE = 30.0
HANDLER = "tests.e2e.handlers:record"


def wait_for(condition: Callable[[], Any], what: str, timeout: float = PATIENCE) -> Any:
    """Poll until ``condition()`` is truthy and return it; fail naming ``what``."""
    give_up = time.monotonic() + timeout
    while not (found := condition()):
        if time.monotonic() > give_up:
            pytest.fail(f"gave up waiting for: {what}")
        time.sleep(0.05)
    return found


class WorkerProcess:
    """A ``jobflow worker`` subprocess whose JSON log lines go to a file."""

    def __init__(self, process: subprocess.Popen[bytes], log_path: Path, log: IO[bytes]) -> None:
        self.process = process
        self.log_path = log_path
        self._log = log

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

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float = PATIENCE) -> int:
        code = self.process.wait(timeout)
        self._log.close()
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait(PATIENCE)
        self._log.close()


class Deployment:
    """One database and object folder, driven through the ``jobflow`` command."""

    def __init__(self, kind: str, database_url: str, folder: Path) -> None:
        self.kind = kind
        self.folder = folder
        self.marks = folder / "marks"
        self.marks.mkdir()
        self.settings = StoreSettings(database_url=database_url,
                                      objects_dir=folder / "objects", workdir=folder)
        self.env = {name: value for name, value in os.environ.items()
                    if not name.startswith(("JOBFLOW_", "AWS_"))}
        self.env.update({
            "JOBFLOW_DATABASE_URL": database_url,
            "JOBFLOW_OBJECTS_DIR": str(folder / "objects"),
            "JOBFLOW_LOG_FORMAT": "json",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            MARKS_ENV: str(self.marks),
        })
        self._workers: list[WorkerProcess] = []
        self._flow: JobFlow | None = None

    def flow(self, policy: UploadPolicy | None = None) -> JobFlow:
        """A JobFlow on this deployment's stores (one engine for the whole test)."""
        if self._flow is None:
            self._flow = open_flow(self.settings, UploadPolicy())
        return JobFlow(store=self._flow.store, objects=self._flow.objects,
                       policy=policy or UploadPolicy())

    def queue_job(self, params: dict[str, Any] | None = None,
                  data: bytes = b"\x00\x00\x00\x18ftypmp42 video") -> str:
        flow = self.flow()
        ticket = flow.initiate_upload("e2e-owner", params or {}, content_type="video/mp4")
        flow.objects.put(ticket.key, data, content_type="video/mp4")
        flow.complete_upload(ticket.job_id)
        return ticket.job_id

    def cli(self, *args: str, env: dict[str, str] | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "jobflow", *args],
                              env={**self.env, **(env or {})}, cwd=cwd or self.folder,
                              capture_output=True, text=True, timeout=120, check=False)

    def start_worker(self, name: str, *args: str, **env: str) -> WorkerProcess:
        log_path = self.folder / f"worker-{name}.log"
        log = log_path.open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "jobflow", "worker", "--handler", HANDLER,
             "--worker-id", name, *args],
            env={**self.env, **env}, cwd=self.folder, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
        worker = WorkerProcess(process, log_path, log)
        self._workers.append(worker)
        return worker

    def close(self) -> None:
        for worker in self._workers:
            worker.kill()
        if self._flow is not None:
            engine = getattr(self._flow.store, "engine", None)
            if engine is not None:
                engine.dispose()


def _postgres_url(engine: sa.Engine) -> str:
    return engine.url.render_as_string(hide_password=False)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def deployment(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Deployment]:
    """A deployment on SQLite (a file in the test's folder) or PostgreSQL."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'jobflow.sqlite3'}"
    else:
        url = _postgres_url(request.getfixturevalue("pg_engine"))
    deployed = Deployment(request.param, url, tmp_path)
    try:
        yield deployed
    finally:
        deployed.close()


@pytest.fixture
def sqlite_deployment(tmp_path: Path) -> Iterator[Deployment]:
    """A deployment on the embedded defaults' kind of database only."""
    deployed = Deployment("sqlite", f"sqlite:///{tmp_path / 'jobflow.sqlite3'}", tmp_path)
    try:
        yield deployed
    finally:
        deployed.close()


@pytest.fixture
def postgres_deployment(tmp_path: Path, pg_engine: sa.Engine) -> Iterator[Deployment]:
    deployed = Deployment("postgres", _postgres_url(pg_engine), tmp_path)
    try:
        yield deployed
    finally:
        deployed.close()
