"""AsyncJobFlow never blocks the event loop: with an object store whose HEAD and
presign each take 300 ms, and a database reached through its asyncio driver,
asyncio's own debug mode sees no callback run longer than 50 ms, and a
concurrent /ping-like task is never held up by a HEAD.

The control case runs the synchronous JobFlow from a coroutine, as a host
would without AsyncJobFlow: the same checks catch it blocking the loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from jobflow import AsyncJobFlow, JobFlow, JobStatus
from jobflow.adapters.memory import InMemoryJobStore, InMemoryObjectStore
from jobflow.models import ObjectInfo, PresignedUpload
from tests.aio.stores import AsyncStores
from tests.conftest import QUIET_LOGGER
from tests.strategies import POLICY

#: What a slow S3 takes per HEAD and per presign (the thread making the call sleeps).
SLOW = 0.3
#: asyncio's debug mode logs every callback that runs longer than this.
SLOW_CALLBACK = 0.05
VIDEO = b"0123456789"
CALLS = 5


class SlowObjects(InMemoryObjectStore):
    """An object store that takes :data:`SLOW` seconds per HEAD and per presign."""

    def __init__(self) -> None:
        super().__init__(bucket="videos")
        self.slow = False

    def head(self, key: str) -> ObjectInfo | None:
        if self.slow:
            time.sleep(SLOW)
        return super().head(key)

    def presign_upload(self, key: str, *, content_type: str, expires_in: int,
                       min_bytes: int, max_bytes: int, sha256: str | None = None
                       ) -> PresignedUpload:
        if self.slow:
            time.sleep(SLOW)
        return super().presign_upload(key, content_type=content_type, expires_in=expires_in,
                                      min_bytes=min_bytes, max_bytes=max_bytes, sha256=sha256)


class Ping:
    """A task that wakes every 10 ms, as a /ping route is served, and records the
    longest it was kept waiting beyond that."""

    def __init__(self) -> None:
        self.worst = 0.0
        self.stopped = False

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self.stopped:
            asked = loop.time()
            await asyncio.sleep(0.01)
            self.worst = max(self.worst, loop.time() - asked - 0.01)


def slow_callbacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records
            if record.name == "asyncio" and "took" in record.getMessage()]


def watched(runner: asyncio.Runner, caplog: pytest.LogCaptureFixture,
            scenario: Callable[[], Awaitable[None]]) -> Ping:
    """Run ``scenario`` in debug mode beside a :class:`Ping`; asyncio's slow
    callback warnings land in ``caplog``."""
    loop = runner.get_loop()
    loop.set_debug(True)
    loop.slow_callback_duration = SLOW_CALLBACK
    ping = Ping()

    async def beside_ping() -> None:
        pinging = asyncio.create_task(ping.run())
        try:
            await scenario()
        finally:
            ping.stopped = True
            await pinging

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="asyncio"):
        runner.run(beside_ping())
    return ping


async def _initiate_and_complete(flow: Any, objects: SlowObjects) -> None:
    """What the host's routes do, :data:`CALLS` clients at once."""
    async def one_client() -> None:
        ticket = await flow.initiate_upload("alice", content_type="video/mp4")
        objects.put(ticket.key, VIDEO, content_type="video/mp4")
        job = await flow.complete_upload(ticket.job_id, owner_id="alice")
        assert job.status is JobStatus.QUEUED

    await asyncio.gather(*(one_client() for _ in range(CALLS)))


def test_async_jobflow_never_blocks_the_event_loop(async_stores: AsyncStores,
                                                   runner: asyncio.Runner,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    objects = SlowObjects()
    flow = AsyncJobFlow(store=async_stores(), objects=objects, policy=POLICY,
                        logger=QUIET_LOGGER)
    # First connections, driver imports and statement caches are not what is measured.
    runner.run(_initiate_and_complete(flow, objects))
    objects.slow = True

    ping = watched(runner, caplog, lambda: _initiate_and_complete(flow, objects))

    assert slow_callbacks(caplog) == []
    assert ping.worst < SLOW, f"a /ping waited {ping.worst:.3f} s"


def test_the_sync_facade_in_a_coroutine_is_caught_blocking_the_loop(
        runner: asyncio.Runner, caplog: pytest.LogCaptureFixture) -> None:
    """The checks above can fail: a coroutine calling JobFlow blocks the loop for
    every HEAD and presign."""
    objects = SlowObjects()
    flow = JobFlow(store=InMemoryJobStore(), objects=objects, policy=POLICY,
                   logger=QUIET_LOGGER)
    objects.slow = True

    async def blocking_route() -> None:
        await asyncio.sleep(0.05)  # let the ping start waiting
        ticket = flow.initiate_upload("alice", content_type="video/mp4")
        objects.put(ticket.key, VIDEO, content_type="video/mp4")
        flow.complete_upload(ticket.job_id)

    ping = watched(runner, caplog, blocking_route)

    assert slow_callbacks(caplog), "asyncio saw no slow callback"
    assert ping.worst >= SLOW
