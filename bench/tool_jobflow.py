"""jobflow's side of the benchmarks, through its public API only.

``JobFlow.claim_loop(worker_id, limit=batch)`` (each batch finished with the
claim of a later one in one statement, the next batch claimed ahead, the
statements pipelined on one connection) on a
:class:`~jobflow.adapters.sqlalchemy.SqlAlchemyJobStore`, in one claim loop
per worker process or in several (threads sharing one JobFlow, each loop on
its own pooled connection), and a
:class:`~jobflow.worker.Worker` for the wake-up figures. Log lines below
WARNING are dropped, as the peers' are (their loggers are not configured).
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import structlog

from jobflow import JobFlow
from jobflow.adapters.localfs import LocalObjectStore
from jobflow.adapters.memory import InMemoryObjectStore
from jobflow.adapters.sqlalchemy import SqlAlchemyJobStore
from jobflow.models import Job
from jobflow.ports import ObjectStore
from jobflow.wakeup import PollingWakeup
from jobflow.worker import JobContext, Worker

OWNER = "bench-owner"
CONTENT_TYPE = "video/mp4"


def quiet_logging() -> None:
    """Drop jobflow's INFO lines (one per transition) before anything logs."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def make_flow(sqlalchemy_url: str, objects: ObjectStore | None = None, *,
              pool_size: int = 2) -> JobFlow:
    engine = sa.create_engine(sqlalchemy_url, pool_size=pool_size)
    return JobFlow(store=SqlAlchemyJobStore(engine), objects=objects or InMemoryObjectStore())


def claim_statements(flow: JobFlow) -> list[tuple[str, Any]]:
    """Record every statement with ``SKIP LOCKED`` that the store sends from now on.

    A statement listener makes the store send its statements through
    SQLAlchemy's execution layer, which costs more: do not time this flow."""
    engine = flow.store.engine  # type: ignore[attr-defined]
    seen: list[tuple[str, Any]] = []

    def record(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any,
               executemany: bool) -> None:
        if "SKIP LOCKED" in statement:
            seen.append((statement, parameters))

    sa.event.listen(engine, "before_cursor_execute", record)
    return seen


def drain(settings: dict[str, Any], wait_for_start: Callable[[], None]) -> None:
    """One worker process: ``settings["loops"]`` threads (default 1) sharing one
    JobFlow, each running a claim loop of ``batch`` jobs until none is left."""
    quiet_logging()
    loops: int = settings.get("loops", 1)
    flow = make_flow(settings["sqlalchemy_url"], pool_size=max(loops, 2))
    flow.counts()
    # Open a connection per loop before the clock starts; the pool keeps them.
    for connection in [flow.store.engine.connect() for _ in range(loops)]:  # type: ignore[attr-defined]
        connection.close()
    batch: int = settings["batch"]
    worker_id = f"bench-{settings['worker_index']}"

    def claim_until_empty() -> None:
        with flow.claim_loop(worker_id, limit=batch) as loop:
            for claims in loop:
                loop.succeed([(claim, None) for claim in claims])

    wait_for_start()
    if loops == 1:
        claim_until_empty()
        return
    with ThreadPoolExecutor(loops) as pool:
        for running in [pool.submit(claim_until_empty) for _ in range(loops)]:
            running.result()


# -- wake-up latency ---------------------------------------------------------------------


def run_worker(settings: dict[str, Any],
               started: multiprocessing.Queue[tuple[int, int]]) -> None:
    """A worker process whose handler reports (seq, CLOCK_MONOTONIC ns) when it starts.

    ``settings["mode"]``: "notify" (LISTEN, jobflow's default on PostgreSQL)
    or "poll" (polling only, every ``poll_interval`` seconds).
    """
    quiet_logging()
    flow = make_flow(settings["sqlalchemy_url"], LocalObjectStore(settings["objects_root"]))

    def report_start(job: Job, ctx: JobContext) -> None:
        started.put((int(job.params["seq"]), time.monotonic_ns()))

    wakeup = PollingWakeup() if settings["mode"] == "poll" else None
    worker = Worker(flow, report_start, concurrency=1, wakeup=wakeup,
                    poll_interval=settings.get("poll_interval", 1.0))
    worker.run()


class Producer:
    """Creates a job, uploads its object, and calls ``complete_upload``."""

    def __init__(self, sqlalchemy_url: str, objects_root: Path) -> None:
        quiet_logging()
        self.flow = make_flow(sqlalchemy_url, LocalObjectStore(objects_root))

    def enqueue(self, seq: int) -> None:
        """Returns when ``complete_upload`` returns: the job is queued and NOTIFY sent."""
        ticket = self.flow.initiate_upload(OWNER, {"seq": seq}, content_type=CONTENT_TYPE)
        self.flow.objects.put(ticket.key, b"\x00" * 1024, content_type=CONTENT_TYPE)
        self.flow.complete_upload(ticket.job_id, owner_id=OWNER)

    def close(self) -> None:
        self.flow.store.engine.dispose()  # type: ignore[attr-defined]
