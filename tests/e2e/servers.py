"""``jobflow dashboard`` and ``jobflow metrics`` as subprocesses on a free port:
each logs where it listens (a JSON line), which is how a test finds it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

from tests.e2e.conftest import PATIENCE, Deployment, wait_for
from tests.metrics_scenario import Samples, samples


class ServerProcess:
    """``jobflow <command> --port 0 ...``; ``url`` once it listens."""

    def __init__(self, deployment: Deployment, command: str, *args: str,
                 env: dict[str, str] | None = None) -> None:
        self.command = command
        self.log = deployment.folder / f"{command}.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "jobflow", command, "--port", "0", *args],
                env={**deployment.env, **(env or {})}, cwd=deployment.folder, stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            port = wait_for(self._port, f"jobflow {command} to listen")
        except BaseException:
            self.stop()
            raise
        self.url = f"http://127.0.0.1:{port}"

    def _port(self) -> int | None:
        if self.process.poll() is not None:
            raise AssertionError(f"jobflow {self.command} exited {self.process.returncode}: "
                                 f"{self.log.read_text(errors='replace')}")
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                entry = json.loads(line)
                if entry.get("event") == f"{self.command}.listening":
                    return int(entry["port"])
        return None

    def scrape(self, **headers: str) -> Samples:
        response = httpx.get(f"{self.url}/metrics", headers=headers, timeout=PATIENCE)
        assert response.status_code == 200, response.text
        return samples(response.text)

    def stop(self) -> int:
        """SIGTERM; the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(PATIENCE)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(PATIENCE)


@contextmanager
def running(deployment: Deployment, command: str, *args: str,
            env: dict[str, str] | None = None) -> Iterator[ServerProcess]:
    server = ServerProcess(deployment, command, *args, env=env)
    try:
        yield server
    finally:
        server.stop()


def value(found: Samples, name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)
