"""pgqueuer's side of the benchmarks (its latest release, benchmark-only).

Each worker process runs one ``QueueManager`` over one asyncpg connection
(pgqueuer's own recommended driver) with ``batch_size`` jobs per dequeue, in
``drain`` mode, so it stops once the queue is empty and its tasks are done.
pgqueuer batches its finishing writes itself (a status-log buffer flushed
every ``batch_size`` jobs or 0.1 s). Tables are installed with pgqueuer's
default, durable (logged) tables.

``batch_size`` alone does not bound the jobs in flight: the manager dequeues
the next batch while the tasks of the last one still run (and asyncio runs
them while it waits for that dequeue), so a slow entrypoint accumulates
tasks. ``in_flight`` sets the entrypoint's ``concurrency_limit``, which
pgqueuer enforces in its dequeue statement across all managers: at most that
many of its jobs picked (running, or finished and not yet flushed) at once.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import asyncpg
import psycopg
from pgqueuer import AsyncpgDriver, Job, Queries, QueueManager
from pgqueuer.db import SyncPsycopgDriver
from pgqueuer.queries import SyncQueries
from pgqueuer.types import QueueExecutionMode

NOOP_ENTRYPOINT = "bench_noop"
MARK_ENTRYPOINT = "bench_mark"
_SEED_CHUNK = 5_000


def install(dsn: str) -> None:
    async def run() -> None:
        connection = await asyncpg.connect(dsn)
        try:
            await Queries(AsyncpgDriver(connection)).install()
        finally:
            await connection.close()

    asyncio.run(run())


def reset(conninfo: str) -> None:
    with psycopg.connect(conninfo, autocommit=True) as connection:
        connection.execute("TRUNCATE pgqueuer, pgqueuer_log, pgqueuer_statistics")


def seed(conninfo: str, count: int) -> None:
    with psycopg.connect(conninfo, autocommit=True) as connection:
        queries = SyncQueries(SyncPsycopgDriver(connection))
        for start in range(0, count, _SEED_CHUNK):
            size = min(_SEED_CHUNK, count - start)
            queries.enqueue([NOOP_ENTRYPOINT] * size, [None] * size, [0] * size)
        connection.execute("VACUUM ANALYZE pgqueuer")


def finished(conninfo: str) -> int:
    """Successful jobs: pgqueuer deletes them from its queue and logs them."""
    with psycopg.connect(conninfo) as connection:
        row = connection.execute(
            "SELECT count(*) FROM pgqueuer_log WHERE status = 'successful'").fetchone()
    return int(row[0]) if row else 0


def drain(settings: dict[str, Any], wait_for_start: Callable[[], None]) -> None:
    """One worker process: a QueueManager in drain mode, ``batch`` jobs per dequeue.

    ``settings["sleep"]``: seconds each job awaits (default 0: a no-op);
    ``settings["in_flight"]``: the entrypoint's ``concurrency_limit``, counted
    across every manager (default 0: unlimited); ``settings["dequeue_timeout"]``:
    seconds the manager waits for a notification when it found nothing (default 1).
    """
    sleep: float = settings.get("sleep", 0.0)

    async def work() -> None:
        connection = await asyncpg.connect(settings["dsn"])
        manager = QueueManager(Queries(AsyncpgDriver(connection)))

        @manager.entrypoint(NOOP_ENTRYPOINT, concurrency_limit=settings.get("in_flight", 0))
        async def noop(job: Job) -> None:
            if sleep:
                await asyncio.sleep(sleep)

        wait_for_start()
        await manager.run(batch_size=settings["batch"], mode=QueueExecutionMode.drain,
                          dequeue_timeout=timedelta(
                              seconds=settings.get("dequeue_timeout", 1.0)))
        await connection.close()

    asyncio.run(work())


# -- wake-up latency ---------------------------------------------------------------------


def run_worker(settings: dict[str, Any],
               started: multiprocessing.Queue[tuple[int, int]]) -> None:
    """A continuous QueueManager (LISTEN/NOTIFY, its default) that reports
    (seq, CLOCK_MONOTONIC ns) when a job starts."""

    async def work() -> None:
        connection = await asyncpg.connect(settings["dsn"])
        manager = QueueManager(Queries(AsyncpgDriver(connection)))

        @manager.entrypoint(MARK_ENTRYPOINT)
        async def mark(job: Job) -> None:
            started.put((int(job.payload or b"0"), time.monotonic_ns()))

        await manager.run()

    asyncio.run(work())


class Producer:
    """Enqueues one job per call on a synchronous psycopg connection."""

    def __init__(self, conninfo: str) -> None:
        self._connection = psycopg.connect(conninfo, autocommit=True)
        self._queries = SyncQueries(SyncPsycopgDriver(self._connection))

    def enqueue(self, seq: int) -> None:
        self._queries.enqueue(MARK_ENTRYPOINT, str(seq).encode())

    def close(self) -> None:
        self._connection.close()
