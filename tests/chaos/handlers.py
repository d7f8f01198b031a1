"""The handlers that the chaos suite's worker processes run: :func:`run`, and
:func:`download`, which first copies the job's object out of the object store
(an outage makes that raise, and the attempt is deferred).

Each writes its own record of every attempt, independent of jobflow's: a
``start`` line when it begins and an ``end`` line when it returns or raises,
each with the job, the attempt, the process id and the wall-clock time, to
the file named by ``CHAOS_RUN_LOG``. Lines are appended with one ``write``
each (atomic for lines this short), from any number of processes. The audit
reads them to find attempts of one job that ran at the same time.
"""

from __future__ import annotations

import os
import time
from typing import Any

from jobflow import Job
from jobflow.worker import AttemptAbandoned, JobContext

RUN_LOG_ENV = "CHAOS_RUN_LOG"
#: The handler sleeps in steps this long, checking between them that its
#: attempt still counts.
STEP = 0.05


def note(what: str, job: Job, attempt: int, *extra: str) -> None:
    """Append one line to the run log."""
    line = " ".join([what, job.id, str(attempt), str(os.getpid()), f"{time.time():.6f}",
                     *extra])
    fd = os.open(os.environ[RUN_LOG_ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def run(job: Job, ctx: JobContext) -> dict[str, Any]:
    """Work for ``params["seconds"]`` (default 0.05) seconds, then succeed."""
    return _attempt(job, ctx, fetch=False)


def download(job: Job, ctx: JobContext) -> dict[str, Any]:
    """Copy the verified object (``ctx.download()``), then work as :func:`run` does."""
    return _attempt(job, ctx, fetch=True)


def _attempt(job: Job, ctx: JobContext, *, fetch: bool) -> dict[str, Any]:
    """One attempt, from its ``start`` line to its ``end`` line."""
    attempt = ctx.attempt
    note("start", job, attempt)
    outcome = "error"
    try:
        result: dict[str, Any] = {"pid": os.getpid(), "attempt": attempt}
        if fetch:
            result["size"] = ctx.download().stat().st_size
        left = float(job.params.get("seconds", STEP))
        while left > 0:
            time.sleep(min(left, STEP))
            left -= STEP
            ctx.check()
        outcome = "ok"
        return result
    except AttemptAbandoned:
        outcome = "abandoned"
        raise
    finally:
        note("end", job, attempt, outcome)
