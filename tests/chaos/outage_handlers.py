"""The handler that worker processes of the object store outage tests run.

Each attempt appends its start and its end (with the wall clock, which every
process on the host shares) to a log file of its own process, in the folder
named by ``OUTAGE_LOG_DIR``, so a test can check that no job ever had two
attempts running at once, even across processes.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from jobflow import Job
from jobflow.worker import JobContext

LOG_DIR_ENV = "OUTAGE_LOG_DIR"


def _note(job: Job, what: str) -> None:
    line = json.dumps({"job_id": job.id, "what": what, "at_ns": time.time_ns(),
                       "pid": os.getpid()})
    with (Path(os.environ[LOG_DIR_ENV]) / f"attempts-{os.getpid()}.jsonl").open("a") as log:
        log.write(line + "\n")


def download(job: Job, ctx: JobContext) -> dict[str, Any]:
    """Copy the verified object, then work ``params["sleep"]`` seconds."""
    _note(job, "start")
    try:
        size = ctx.download().stat().st_size
        time.sleep(float(job.params.get("sleep", 0)))
    finally:
        _note(job, "end")
    return {"size": size}


def attempt_spans(folder: Path) -> dict[str, list[tuple[int, int]]]:
    """(start, end) of every attempt the handlers ran, per job, in start order."""
    notes: list[dict[str, Any]] = []
    for path in folder.glob("attempts-*.jsonl"):
        notes += [json.loads(line) for line in path.read_text().splitlines()]
    open_by: dict[tuple[str, int], int] = {}
    spans: dict[str, list[tuple[int, int]]] = {}
    for note in sorted(notes, key=lambda n: n["at_ns"]):
        key = (note["job_id"], note["pid"])
        if note["what"] == "start":
            assert key not in open_by, f"job {note['job_id']} started twice in one process"
            open_by[key] = note["at_ns"]
        else:
            spans.setdefault(note["job_id"], []).append((open_by.pop(key), note["at_ns"]))
    assert not open_by, f"attempts that never ended: {sorted(open_by)}"
    return {job_id: sorted(found) for job_id, found in spans.items()}
