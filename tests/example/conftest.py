"""The video example deployed for a test: its own PostgreSQL database, a bucket on
moto's HTTP server whose CORS rules the example's set-up code wrote, the app
served by uvicorn on a real port, and ``jobflow worker`` as a subprocess.

moto's server answers every browser preflight with "allow all" unless its
global CORS is switched off (``MOTO_DISABLE_GLOBAL_CORS``); it is switched off
here, so S3's answer comes from the bucket's own CORS rules, as on AWS.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa
import uvicorn
from fastapi import FastAPI

from examples.video_app.app import create_app
from examples.video_app.settings import Settings
from examples.video_app.setup import prepare_bucket
from jobflow import JobFlow
from jobflow.adapters.s3 import S3ObjectStore
from jobflow.adapters.sqlalchemy import SqlAlchemyJobStore
from jobflow.config import open_object_store
from jobflow.demo import minimal_mp4
from tests.conftest import QUIET_LOGGER
from tests.e2e.conftest import wait_for
from tests.fake_aws import REGION, moto_server, use_fake_aws_credentials
from tests.pgcluster import DatabaseServer, free_port

ROOT = Path(__file__).resolve().parents[2]
#: Upper bound for waiting on a server or a job; a guard, never a measurement.
PATIENCE = 30.0
HANDLER = "examples.video_app.worker:analyse_video"
#: The deployment's upload limit: a short clip fits, a long one does not.
MAX_BYTES = 64 * 1024
TOKENS = {"coach-1-token": "coach-1", "coach-2-token": "coach-2"}
#: A 3.5 s clip (35 frames at 10 fps), and one over MAX_BYTES.
CLIP = minimal_mp4(3.5)
LONG_CLIP = minimal_mp4(60.0, media_bytes=2 * MAX_BYTES)
API = "/api/coaches/plus"




@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto's HTTP server, CORS answered by the buckets' rules only."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MOTO_DISABLE_GLOBAL_CORS", "true")
        # moto read the variable when it was imported; its backends read this copy.
        patch.setattr("moto.moto_server.werkzeug_app.DISABLE_GLOBAL_CORS", True)
        with moto_server() as endpoint:
            yield endpoint


@contextmanager
def serving(app: FastAPI, port: int) -> Iterator[str]:
    """``app`` served by uvicorn on 127.0.0.1:``port`` in a thread, lifespan included."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="video-app", daemon=True)
    thread.start()
    wait_for(lambda: server.started or not thread.is_alive(), "the app to start")
    assert server.started, "the app did not start (see its log above)"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(PATIENCE)


class VideoApp:
    """The example, deployed: its environment, its URL, its workers."""

    def __init__(self, env: dict[str, str], base_url: str, folder: Path) -> None:
        self.env = env
        self.base_url = base_url
        self.folder = folder
        self.settings = Settings.from_env(env)
        self._workers: list[subprocess.Popen[bytes]] = []
        self._engine = sa.create_engine(env["JOBFLOW_DATABASE_URL"])

    @property
    def engine(self) -> sa.Engine:
        """The app's database, seen from outside."""
        return self._engine

    def flow(self) -> JobFlow:
        """A JobFlow on the app's stores, to look at jobs from outside."""
        return JobFlow(store=SqlAlchemyJobStore(self._engine),
                       objects=open_object_store(self.settings.stores),
                       policy=self.settings.policy, logger=QUIET_LOGGER)

    def call(self, method: str, path: str, token: str | None = "coach-1-token",
             **kwargs: Any) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return requests.request(method, self.base_url + path, headers=headers,
                                timeout=PATIENCE, **kwargs)

    def worker_command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "jobflow", "worker", "--handler", HANDLER, *args]

    def run_worker_until_idle(self) -> None:
        done = subprocess.run(self.worker_command("--burst"), env=self.env, cwd=ROOT,
                              capture_output=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]

    def start_worker(self) -> None:
        log = (self.folder / "worker.log").open("wb")
        self._workers.append(subprocess.Popen(
            self.worker_command("--poll-interval", "0.2"), env=self.env, cwd=ROOT,
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        log.close()

    def close(self) -> None:
        for worker in self._workers:
            worker.terminate()
            try:
                worker.wait(PATIENCE)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait(PATIENCE)
        self._engine.dispose()


@pytest.fixture
def video_env(pg_server: DatabaseServer, s3_endpoint: str, tmp_path: Path,
              monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """What a deployment of the example sets: one environment for the app and
    its workers (a new database and bucket for each test)."""
    use_fake_aws_credentials(monkeypatch, tmp_path)
    port = free_port()
    database = pg_server.create_database(prefix="video_app")
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("JOBFLOW_", "VIDEO_APP_"))}
    env.update({
        "JOBFLOW_DATABASE_URL": database.render_as_string(hide_password=False),
        "JOBFLOW_S3_BUCKET": f"videos-{uuid.uuid4().hex[:12]}",
        "JOBFLOW_S3_ENDPOINT_URL": s3_endpoint,
        "JOBFLOW_S3_REGION": REGION,
        "JOBFLOW_MAX_BYTES": str(MAX_BYTES),
        "JOBFLOW_LOG_FORMAT": "json",
        "VIDEO_APP_PORT": str(port),
        "VIDEO_APP_TOKENS": ",".join(f"{t}:{o}" for t, o in TOKENS.items()),
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    })
    return env


@pytest.fixture
def video_app(video_env: dict[str, str], tmp_path: Path) -> Iterator[VideoApp]:
    """The example served on its port, its bucket set up as the deploy step does."""
    settings = Settings.from_env(video_env)
    objects = open_object_store(settings.stores)
    assert isinstance(objects, S3ObjectStore)
    prepare_bucket(objects, settings.allowed_origins)
    with serving(create_app(settings), settings.port) as base_url:
        deployed = VideoApp(video_env, base_url, tmp_path)
        try:
            yield deployed
        finally:
            deployed.close()
