"""``python -m examples.video_app`` with nothing configured starts on the embedded
defaults (a SQLite file and a local folder in the working directory), and the
original routes, called over HTTP with the original bodies, take a job from
``awaiting_upload`` to ``done`` with ``jobflow worker`` beside it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.example.conftest import API, CLIP, HANDLER, PATIENCE, ROOT, wait_for
from tests.pgcluster import free_port

TOKEN = {"Authorization": "Bearer coach-1-token"}  # the example's demo token


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """The app as ``python -m examples.video_app`` starts it, in an empty folder."""
    port = free_port()
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("JOBFLOW_", "VIDEO_APP_", "AWS_"))}
    env.update({"VIDEO_APP_PORT": str(port),
                "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])})
    log = (tmp_path / "app.log").open("wb")
    app = subprocess.Popen([sys.executable, "-m", "examples.video_app"], cwd=tmp_path, env=env,
                           stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    base_url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        assert app.poll() is None, (tmp_path / "app.log").read_text()
        try:
            return requests.get(base_url + "/", timeout=1).status_code == 200
        except requests.ConnectionError:
            return False

    try:
        wait_for(answers, "the app to answer")
        yield base_url, env
    finally:
        app.terminate()
        app.wait(PATIENCE)
        log.close()


def test_the_embedded_defaults_take_a_job_to_done(embedded: tuple[str, dict[str, str]],
                                                  tmp_path: Path) -> None:
    base_url, env = embedded

    def post(path: str, body: dict[str, object]) -> requests.Response:
        return requests.post(base_url + path, json=body, headers=TOKEN, timeout=PATIENCE)

    session = post(f"{API}/sessions", {"title": "Tuesday"}).json()
    ticket = post(f"{API}/videos/upload/initiate",
                  {"session_id": session["session_id"], "sample_fps": 10,
                   "include_frames": False}).json()
    assert ticket["status"] == "awaiting_upload"
    upload = ticket["upload"]
    assert upload["method"] == "PUT" and upload["url"].startswith("/")  # the app receives it
    sent = requests.put(base_url + upload["url"], data=CLIP,
                        headers={**upload["headers"], **TOKEN}, timeout=PATIENCE)
    assert sent.status_code == 204, sent.text
    assert post(f"{API}/videos/upload/complete", {"job_id": ticket["job_id"]}).json()[
        "status"] == "queued"

    worker = subprocess.run([sys.executable, "-m", "jobflow", "worker", "--handler", HANDLER,
                             "--burst"], cwd=tmp_path, env=env, capture_output=True,
                            timeout=120, check=False)
    assert worker.returncode == 0, worker.stderr.decode(errors="replace")[-3000:]

    state = requests.get(f"{base_url}{API}/videos/jobs/{ticket['job_id']}", headers=TOKEN,
                         timeout=PATIENCE).json()
    assert (state["status"], state["result"]["frames_sampled"]) == ("done", 35)
    assert (tmp_path / "jobflow.sqlite3").is_file() and (tmp_path / "jobflow-objects").is_dir()
