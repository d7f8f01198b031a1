"""jobflow's side of the benchmarks, through its public API only.

The store's best loop through the public API, on a
:class:`~jobflow.adapters.sqlalchemy.SqlAlchemyJobStore`: ``JobFlow.claim``
of a batch, then ``JobFlow.finish_many`` of the whole batch (two statements,
two commits per batch), until a claim finds nothing. A
:class:`~jobflow.worker.Worker` for the worker-throughput and wake-up figures.
Log lines below WARNING are dropped, as the peers' are (their loggers are not
configured).
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import structlog

from jobflow import JobFlow
from jobflow.adapters.localfs import LocalObjectStore
from jobflow.adapters.memory import InMemoryObjectStore
from jobflow.adapters.sqlalchemy import SqlAlchemyJobStore
from jobflow.models import Job, Succeeded
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
    """A flow on its own engine; ``pool_size`` connections kept (SQLAlchemy's default
    is 5, as the ``jobflow`` command's engine has)."""
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
    """One worker process: claim ``batch`` jobs, finish them all with one
    ``finish_many``, until a claim finds nothing."""
    quiet_logging()
    flow = make_flow(settings["sqlalchemy_url"])
    flow.counts()  # connect before the clock starts; the pool keeps the connection
    batch: int = settings["batch"]
    worker_id = f"bench-{settings['worker_index']}"
    wait_for_start()
    while claims := flow.claim(worker_id, limit=batch):
        flow.finish_many([Succeeded(claim, None) for claim in claims])


def run_worker_drain(settings: dict[str, Any], wait_for_start: Callable[[], None]) -> None:
    """One worker process: a :class:`~jobflow.worker.Worker` with ``settings["handler"]``
    and ``settings["concurrency"]``, run until the queue is empty (``until_idle``).

    The flow's engine has SQLAlchemy's default pool, as the ``jobflow worker``
    command's has. The worker is built, and one connection opened, before the
    clock starts; everything :meth:`~jobflow.worker.Worker.run` does is timed.
    """
    quiet_logging()
    flow = make_flow(settings["sqlalchemy_url"], pool_size=5)
    flow.counts()
    worker = Worker(flow, settings["handler"], concurrency=settings["concurrency"])
    wait_for_start()
    worker.run(until_idle=True)
    flow.store.engine.dispose()  # type: ignore[attr-defined]


def _noop(job: Job, ctx: JobContext) -> None:
    return None


def worker_drain(settings: dict[str, Any], wait_for_start: Callable[[], None]) -> None:
    """One worker process: a :class:`~jobflow.worker.Worker` with no-op jobs at
    ``concurrency`` = the claim benchmark's ``batch`` (see :func:`run_worker_drain`)."""
    run_worker_drain({**settings, "concurrency": settings["batch"], "handler": _noop},
                     wait_for_start)


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
