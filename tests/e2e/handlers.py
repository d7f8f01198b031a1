"""Handlers that worker processes started by the end-to-end tests run.

They leave marks on disk (in the folder named by ``E2E_MARKS_DIR``) so a test
can see which process started and finished which attempt, even after the
process was killed.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from jobflow import Job
from jobflow.worker import JobContext

MARKS_ENV = "E2E_MARKS_DIR"


def mark(job: Job, attempt: int, what: str) -> None:
    folder = Path(os.environ[MARKS_ENV])
    (folder / f"{job.id}.{attempt}.{os.getpid()}.{what}").touch()


def marks(folder: Path, job_id: str, what: str) -> list[tuple[int, int]]:
    """(attempt, pid) of every ``what`` mark the handlers left for ``job_id``."""
    found = []
    for path in folder.glob(f"{job_id}.*.*.{what}"):
        _, attempt, pid, _ = path.name.rsplit(".", 3)
        found.append((int(attempt), int(pid)))
    return sorted(found)


def record(job: Job, ctx: JobContext) -> dict[str, Any]:
    """Sleep ``params["sleep"][attempt - 1]`` seconds (the last entry for later
    attempts), marking the start and the finish of the attempt."""
    attempt = ctx.attempt
    mark(job, attempt, "started")
    plan = job.params.get("sleep", [0])
    time.sleep(float(plan[min(attempt, len(plan)) - 1]))
    mark(job, attempt, "finished")
    return {"pid": os.getpid(), "attempt": attempt, "worker_id": ctx.worker_id}


def until_cancelled(job: Job, ctx: JobContext) -> dict[str, Any]:
    """Work until asked to stop: ``ctx.check()`` raises JobCancelled once the
    worker's lease renewal brings the request (for a minute at most)."""
    mark(job, ctx.attempt, "started")
    give_up = time.monotonic() + 60
    while time.monotonic() < give_up:
        ctx.check()
        time.sleep(0.05)
    return {"never": "asked to stop"}
