"""What an async host's event loop sees of jobflow, and what AsyncJobFlow costs.

1. Loop blocking (the situation of issue 15): an object store whose HEAD takes
   0.5 s, five requests completing their uploads at once, and a /ping-like task
   that wakes every 10 ms beside them. For each way a host can call jobflow
   from ``async def``, the worst time the ping waited beyond its 10 ms, and how
   long the five completions took together:

   * the sync facade called in the coroutine;
   * the sync facade bound to the request's session through
     ``AsyncSession.run_sync`` (the statements are async, the HEAD is not);
   * the sync facade on a worker thread (``asyncio.to_thread``), outside the
     request's transaction;
   * AsyncJobFlow (statements through psycopg's async driver, the HEAD on a
     worker thread).

2. Overhead: the median time of one call, sequentially, for ``get``,
   ``initiate_upload`` and ``complete_upload`` (an in-memory object store that
   answers at once), JobFlow on a sync engine beside AsyncJobFlow on an async
   one; and the round trip of one object-store call through a worker thread.

Both run on a throw-away PostgreSQL cluster. ``python -m bench.async_loop``
from the repository root (``--quick`` for a smoke run). Needs only jobflow's
development environment (``.venv``), not the benchmarks' own.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

import jobflow.migrations
from bench.pgserver import PostgresServer
from bench.tables import machine_summary, markdown_table, progress
from jobflow import AsyncJobFlow, JobFlow
from jobflow.adapters.memory import InMemoryObjectStore
from jobflow.adapters.sqlalchemy import AsyncSqlAlchemyJobStore, SqlAlchemyJobStore
from jobflow.aio import ThreadedObjectStore
from jobflow.greenlets import greenlet_spawn
from jobflow.models import ObjectInfo

HEAD_SECONDS = 0.5
REQUESTS = 5
VIDEO = b"0123456789"


class SlowHead(InMemoryObjectStore):
    """An object store whose HEAD takes :data:`HEAD_SECONDS` (the thread sleeps)."""

    def head(self, key: str) -> ObjectInfo | None:
        time.sleep(HEAD_SECONDS)
        return super().head(key)


async def _beside_ping(work: Callable[[], Awaitable[None]]) -> tuple[float, float]:
    """(worst ping delay, seconds the work took) with a ping every 10 ms."""
    loop = asyncio.get_running_loop()
    worst, stop = 0.0, False

    async def ping() -> None:
        nonlocal worst
        while not stop:
            asked = loop.time()
            await asyncio.sleep(0.01)
            worst = max(worst, loop.time() - asked - 0.01)

    pinging = asyncio.create_task(ping())
    await asyncio.sleep(0.05)
    started = loop.time()
    await work()
    took = loop.time() - started
    stop = True
    await pinging
    return worst, took


async def blocking(url: str, async_engine: AsyncEngine) -> list[list[str]]:
    objects = SlowHead()
    sync_store = SqlAlchemyJobStore(sa.create_engine(url))
    sync_flow = JobFlow(store=sync_store, objects=objects)
    async_flow = AsyncJobFlow(store=AsyncSqlAlchemyJobStore(async_engine), objects=objects)

    def uploaded() -> list[str]:
        tickets = [sync_flow.initiate_upload("bench", content_type="video/mp4")
                   for _ in range(REQUESTS)]
        for ticket in tickets:
            objects.put(ticket.key, VIDEO, content_type="video/mp4")
        return [ticket.job_id for ticket in tickets]

    async def in_coroutine(job_id: str) -> None:
        sync_flow.complete_upload(job_id)

    async def run_sync(job_id: str) -> None:
        async with AsyncSession(async_engine) as session:
            def complete(sync_session: Any) -> None:
                JobFlow(store=SqlAlchemyJobStore(async_engine.sync_engine).bind(sync_session),
                        objects=objects).complete_upload(job_id)
            await session.run_sync(complete)
            await session.commit()

    async def to_thread(job_id: str) -> None:
        await asyncio.to_thread(sync_flow.complete_upload, job_id)

    async def async_jobflow(job_id: str) -> None:
        await async_flow.complete_upload(job_id)

    rows = []
    for name, complete in [("sync JobFlow in async def", in_coroutine),
                           ("AsyncSession.run_sync(JobFlow)", run_sync),
                           ("asyncio.to_thread(JobFlow)", to_thread),
                           ("AsyncJobFlow", async_jobflow)]:
        job_ids = uploaded()
        worst, took = await _beside_ping(
            lambda c=complete, ids=job_ids: _gather(*(c(job_id) for job_id in ids)))
        rows.append([name, f"{worst * 1000:,.0f}", f"{took:.2f}"])
        progress(f"  {name}: ping waited up to {worst * 1000:.0f} ms")
    return rows


async def _gather(*calls: Awaitable[None]) -> None:
    await asyncio.gather(*calls)


def _median_us(samples: list[float]) -> str:
    return f"{statistics.median(samples) * 1e6:,.0f}"


async def overhead(url: str, async_engine: AsyncEngine, calls: int) -> list[list[str]]:
    objects = InMemoryObjectStore()
    sync_flow = JobFlow(store=SqlAlchemyJobStore(sa.create_engine(url)), objects=objects)
    async_flow = AsyncJobFlow(store=AsyncSqlAlchemyJobStore(async_engine), objects=objects)
    rows = []
    for name in ("initiate_upload", "complete_upload", "get"):
        timings: dict[str, list[float]] = {"sync": [], "async": []}
        for _ in range(calls):
            for kind in ("sync", "async"):
                ticket = sync_flow.initiate_upload("bench", content_type="video/mp4")
                objects.put(ticket.key, VIDEO, content_type="video/mp4")
                started = time.perf_counter()
                if name == "initiate_upload":
                    call: Any = (sync_flow if kind == "sync" else async_flow).initiate_upload(
                        "bench", content_type="video/mp4")
                else:
                    call = getattr(sync_flow if kind == "sync" else async_flow, name)(
                        ticket.job_id)
                if kind == "async":
                    await call
                timings[kind].append(time.perf_counter() - started)
        rows.append([name, _median_us(timings["sync"]), _median_us(timings["async"])])
        progress(f"  {name}: done")
    threaded = ThreadedObjectStore(objects)
    direct, hop = [], []
    for _ in range(calls):
        started = time.perf_counter()
        objects.head("uploads/none")
        direct.append(time.perf_counter() - started)
        started = time.perf_counter()
        await greenlet_spawn(threaded.head, "uploads/none")
        hop.append(time.perf_counter() - started)
    rows.append(["object store HEAD (memory)", _median_us(direct), _median_us(hop)])
    return rows


async def main_async(server: PostgresServer, calls: int) -> None:
    server.create_database("async_loop")
    url = server.sqlalchemy_url("async_loop")
    jobflow.migrations.upgrade(url)
    async_engine = create_async_engine(url.replace("+psycopg", "+psycopg_async"))
    try:
        progress("loop blocking")
        blocked = await blocking(url, async_engine)
        progress("overhead")
        costs = await overhead(url, async_engine, calls)
    finally:
        await async_engine.dispose()
    print(f"### Event loop blocking: HEAD {HEAD_SECONDS} s, {REQUESTS} concurrent "
          f"completions\n")
    print(markdown_table(["how the coroutine calls jobflow", "worst /ping delay (ms)",
                          "5 completions took (s)"], blocked))
    print(f"\n### One call, median of {calls} (us)\n")
    print(markdown_table(["call", "JobFlow (sync engine)", "AsyncJobFlow (async engine)"],
                         costs))
    print(f"\n{machine_summary(server.version())}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: few calls")
    args = parser.parse_args()
    with PostgresServer() as server:
        asyncio.run(main_async(server, calls=50 if args.quick else 1000))


if __name__ == "__main__":
    main()
