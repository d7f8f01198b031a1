"""``jobflow worker --health-file`` and ``jobflow health``, the liveness probe.

The file going stale while the database hangs is in the chaos suite
(tests/chaos/test_database_faults.py)."""

from __future__ import annotations

import os
import re
import signal
import time

from jobflow.cli import ExitCode
from tests.e2e.conftest import Deployment, wait_for


def test_a_running_worker_keeps_its_health_file_fresh_and_removes_it_on_exit(
        sqlite_deployment: Deployment) -> None:
    deployment = sqlite_deployment
    health = deployment.folder / "worker.health"
    worker = deployment.start_worker("alive", "--poll-interval", "0.1",
                                     JOBFLOW_HEALTH_FILE=str(health))
    wait_for(health.exists, "the health file")
    first = health.stat().st_mtime
    wait_for(lambda: health.stat().st_mtime > first, "the health file to be touched again")
    probe = deployment.cli("health", "--file", str(health), "--max-age", "5")
    assert probe.returncode == ExitCode.OK, probe.stderr
    assert probe.stdout.startswith("healthy: ")

    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0
    assert not health.exists()
    gone = deployment.cli("health", env={"JOBFLOW_HEALTH_FILE": str(health)})
    assert gone.returncode == ExitCode.ALERT
    assert "no health file" in gone.stderr


def test_a_stale_health_file_fails_the_probe(sqlite_deployment: Deployment) -> None:
    health = sqlite_deployment.folder / "worker.health"
    health.touch()
    old = time.time() - 120
    os.utime(health, (old, old))
    stale = sqlite_deployment.cli("health", "--file", str(health), "--max-age", "60")
    assert stale.returncode == ExitCode.ALERT
    assert re.search(r"last touched 12\d s ago, more than --max-age 60 s", stale.stderr)
    assert sqlite_deployment.cli("health", "--file", str(health),
                                 "--max-age", "600").returncode == ExitCode.OK
