"""A host whose clock is wrong: lease decisions follow the database's clock."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from jobflow import JobStatus
from tests.chaos.conftest import CHAOS, Site
from tests.conftest import IN_CI

pytestmark = CHAOS

FAST = ["faketime", "-f", "+90s"]

#: The leases that reconcile would rescue if it judged them by the host's own clock.
EXPIRED_BY_LOCAL_CLOCK = """
import os
from jobflow import UploadPolicy
from jobflow.adapters.sqlalchemy.clock import local_clock
from jobflow.config import StoreSettings, open_flow
settings = StoreSettings(database_url=os.environ["JOBFLOW_DATABASE_URL"],
                         objects_dir=os.environ["JOBFLOW_OBJECTS_DIR"])
store = open_flow(settings, UploadPolicy()).store
print(" ".join(job.id for job in store.expired_leases(now=local_clock(), limit=10)))
"""


@pytest.fixture(autouse=True)
def _faketime() -> None:
    if shutil.which("faketime") is None and not IN_CI:
        pytest.skip("faketime is not installed (scripts/ensure-test-tools installs it)")


def test_a_reconcile_90_s_in_the_future_leaves_a_live_lease_alone(site: Site) -> None:
    [job_id] = site.queue_jobs(1)
    [claim] = site.flow.claim("live-worker", lease_seconds=60)  # 60 s left on its lease
    history = site.flow.history(job_id)

    result = site.cli("reconcile", "--json", prefix=FAST)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["rescued"] == []
    differs = [json.loads(line) for line in result.stderr.splitlines()
               if "clock.host_clock_differs" in line]
    assert differs and differs[0]["offset_seconds"] > 80  # it did run 90 s ahead
    job = site.flow.get(job_id)
    assert (job.status, job.lease_token) == (JobStatus.QUICK_RUNNING, claim.token)
    assert site.flow.history(job_id) == history  # no rescue, nothing written

    # Judged by that host's own clock, the live lease would have been rescued:
    # the run above could have failed.
    control = subprocess.run([*FAST, sys.executable, "-c", EXPIRED_BY_LOCAL_CLOCK],
                             env=site.env, cwd=site.folder, capture_output=True, text=True,
                             timeout=120, check=False)
    assert control.returncode == 0, control.stderr
    assert control.stdout.split() == [job_id]

    site.flow.release(claim)
    worker = site.start_worker("after", "--burst")
    assert worker.wait() == 0
    site.wait_until_done()
    site.audit()
