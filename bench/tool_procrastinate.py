"""procrastinate's side of the benchmarks (its latest release, benchmark-only).

procrastinate fetches one job per statement (no claim batching), so in the
claim benchmark it runs at batch size 1 only, one procrastinate worker with
``concurrency=1`` per worker process; the worker benchmark runs it at the
concurrency under test (that many jobs fetched and running at once, on the
connector's default pool). Jobs are seeded in bulk with the same row its
``defer`` inserts, so its insert trigger (events, NOTIFY) runs as usual.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from collections.abc import Callable
from typing import Any

import procrastinate
import psycopg

QUEUE = "bench"
NOOP_TASK = "bench_noop"
MARK_TASK = "bench_mark"


def make_app(conninfo: str, *, synchronous: bool = False) -> procrastinate.App:
    connector: procrastinate.BaseConnector = (
        procrastinate.SyncPsycopgConnector(conninfo=conninfo) if synchronous
        else procrastinate.PsycopgConnector(conninfo=conninfo))
    return procrastinate.App(connector=connector)


def install(conninfo: str) -> None:
    """procrastinate's schema, as its ``schema --apply`` command does."""
    app = make_app(conninfo, synchronous=True)
    with app.open():
        app.schema_manager.apply_schema()


def reset(conninfo: str) -> None:
    with psycopg.connect(conninfo, autocommit=True) as connection:
        connection.execute("TRUNCATE procrastinate_jobs, procrastinate_events, "
                           "procrastinate_workers, procrastinate_periodic_defers CASCADE")


def seed(conninfo: str, count: int) -> None:
    with psycopg.connect(conninfo, autocommit=True) as connection:
        connection.execute(
            "INSERT INTO procrastinate_jobs (queue_name, task_name, args) "
            "SELECT %(queue)s, %(task)s, '{}' FROM generate_series(1, %(count)s)",
            {"queue": QUEUE, "task": NOOP_TASK, "count": count})
        connection.execute("VACUUM ANALYZE procrastinate_jobs")


def finished(conninfo: str) -> int:
    with psycopg.connect(conninfo) as connection:
        row = connection.execute(
            "SELECT count(*) FROM procrastinate_jobs WHERE status = 'succeeded'").fetchone()
    return int(row[0]) if row else 0


def drain(settings: dict[str, Any], wait_for_start: Callable[[], None]) -> None:
    """One worker process: a procrastinate worker that stops when the queue is empty.

    ``settings["concurrency"]``: the worker's concurrency (default 1);
    ``settings["sleep"]``: seconds each task awaits (default 0: a no-op).
    """
    sleep: float = settings.get("sleep", 0.0)

    async def work() -> None:
        app = make_app(settings["conninfo"])

        @app.task(name=NOOP_TASK, queue=QUEUE)
        async def noop() -> None:
            if sleep:
                await asyncio.sleep(sleep)

        async with app.open_async():
            await app.check_connection_async()
            wait_for_start()
            await app.run_worker_async(queues=[QUEUE], concurrency=settings.get("concurrency", 1),
                                       wait=False, listen_notify=False,
                                       install_signal_handlers=False)

    asyncio.run(work())


# -- wake-up latency ---------------------------------------------------------------------


def run_worker(settings: dict[str, Any],
               started: multiprocessing.Queue[tuple[int, int]]) -> None:
    """An idle-until-woken worker (LISTEN/NOTIFY on, the default) that reports
    (seq, CLOCK_MONOTONIC ns) when a task starts."""

    async def work() -> None:
        app = make_app(settings["conninfo"])

        @app.task(name=MARK_TASK, queue=QUEUE)
        async def mark(seq: int) -> None:
            started.put((seq, time.monotonic_ns()))

        async with app.open_async():
            await app.run_worker_async(queues=[QUEUE], concurrency=1,
                                       install_signal_handlers=False)

    asyncio.run(work())


class Producer:
    """Defers one task per call, synchronously, the way a web app would."""

    def __init__(self, conninfo: str) -> None:
        self.app = make_app(conninfo, synchronous=True)
        self.app.open()

        @self.app.task(name=MARK_TASK, queue=QUEUE)
        def mark(seq: int) -> None:
            return None

        self._mark = mark

    def enqueue(self, seq: int) -> None:
        self._mark.defer(seq=seq)

    def close(self) -> None:
        self.app.close()
