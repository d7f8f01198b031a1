"""AsyncJobFlow is JobFlow, awaited: the same methods and signatures, the same
refusals, the same guarantees under concurrent tasks and cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from jobflow import AsyncJobFlow, Claim, Event, JobFlow, JobStatus
from jobflow.adapters.memory import InMemoryJobStore, InMemoryObjectStore
from jobflow.adapters.sqlalchemy import AsyncSqlAlchemyJobStore, SqlAlchemyJobStore
from jobflow.adapters.sqlalchemy.clock import DatabaseClock
from jobflow.errors import ConfigurationError, JobflowError, StorageUnavailable
from jobflow.models import ObjectInfo
from tests.aio.stores import AsyncStore, AsyncStores
from tests.conftest import QUIET_LOGGER, ManualClock
from tests.strategies import POLICY, job_ids

VIDEO = b"0123456789"

# -- no drift between the two facades ------------------------------------------------------


def _public_methods(cls: type) -> dict[str, Callable[..., Any]]:
    return {name: member for name, member in inspect.getmembers(cls, inspect.isfunction)
            if not name.startswith("_")}


def _shape(function: Callable[..., Any], skip: tuple[str, ...] = ()) -> list[tuple[Any, ...]]:
    """A function's parameters and return annotation, annotations resolved."""
    signature = inspect.signature(function, eval_str=True)
    return [*((p.name, p.kind, p.default, p.annotation) for p in signature.parameters.values()
              if p.name not in skip), ("return", signature.return_annotation)]


def drift(sync_cls: type, async_cls: type) -> list[str]:
    """How ``async_cls`` differs from being ``sync_cls`` with every method awaited."""
    found: list[str] = []
    sync, async_ = _public_methods(sync_cls), _public_methods(async_cls)
    for name in sorted(sync.keys() - async_.keys()):
        found.append(f"{name}: no async twin")
    for name in sorted(async_.keys() - sync.keys()):
        found.append(f"{name}: not a method of {sync_cls.__name__}")
    for name in sorted(sync.keys() & async_.keys()):
        if not inspect.iscoroutinefunction(async_[name]):
            found.append(f"{name}: not a coroutine")
        if _shape(sync[name]) != _shape(async_[name]):
            found.append(f"{name}: {inspect.signature(sync[name])} != "
                         f"{inspect.signature(async_[name])}")
    return found


def test_every_jobflow_method_has_an_async_twin_with_the_same_signature() -> None:
    assert drift(JobFlow, AsyncJobFlow) == []


def test_the_constructors_take_the_same_arguments() -> None:
    assert _shape(JobFlow.__init__, skip=("store",)) == _shape(AsyncJobFlow.__init__,
                                                               skip=("store",))


class JobFlowWithAnArchive(JobFlow):
    """A JobFlow that gained a method (as other changes will add them)."""

    def archive(self, *, older_than: timedelta) -> int:
        return 0


class AsyncJobFlowWithAnotherSignature(AsyncJobFlow):
    async def get(self, job_id: str, *, owner_id: str | None = None,  # type: ignore[override]
                  fresh: bool = False) -> Any:
        return None


def test_the_drift_check_catches_a_missing_twin_and_a_changed_signature() -> None:
    assert drift(JobFlowWithAnArchive, AsyncJobFlow) == ["archive: no async twin"]
    [changed] = drift(JobFlow, AsyncJobFlowWithAnotherSignature)
    assert changed.startswith("get: ")


# -- the same refusals -----------------------------------------------------------------------


def _bad_calls(claim: Claim) -> list[tuple[str, tuple[Any, ...], dict[str, Any]]]:
    """Calls JobFlow refuses, each with its arguments."""
    unknown = "00000000-0000-0000-0000-00000000ffff"
    return [
        ("initiate_upload", ("",), {"content_type": "video/mp4"}),
        ("initiate_upload", ("owner\n",), {"content_type": "video/mp4"}),
        ("initiate_upload", ("owner",), {"content_type": "text/html"}),
        ("initiate_upload", ("owner", {"x": float("nan")}), {"content_type": "video/mp4"}),
        ("initiate_upload", ("owner", ["not", "a", "dict"]), {"content_type": "video/mp4"}),
        ("initiate_upload", ("owner",), {"content_type": "video/mp4", "sha256": "abc\n"}),
        ("complete_upload", ("../uploads/x",), {}),
        ("complete_upload", (unknown,), {}),
        ("complete_upload", (claim.job.id,), {"owner_id": "mallory"}),
        ("get", ("nope",), {}),
        ("history", (unknown,), {}),
        ("cancel", (claim.job.id,), {"owner_id": "mallory"}),
        ("purge", (timedelta(days=-1),), {}),
        ("requeue_failed", ("",), {}),
        ("requeue", (claim.job.id,), {}),
        ("claim", ("worker",), {"limit": 0}),
        ("claim", ("worker",), {"lease_seconds": float("inf")}),
        ("heartbeat", ("not a claim",), {}),
        ("heartbeat_many", ("not a list",), {}),
        ("succeed", (claim, {"x": object()}), {}),
        ("fail", (claim, "boom"), {"retry_in": timedelta(days=-1)}),
        ("finish_many", ([claim, claim],), {}),
        ("stuck_uploads", (), {"older_than": 5}),
        ("recent_failures", (), {"within": timedelta(days=-1)}),
        ("reconcile", (), {"limit": 0}),
    ]


def test_the_async_facade_refuses_what_the_sync_one_refuses_with_the_same_error(
        runner: asyncio.Runner) -> None:
    store, objects, clock = InMemoryJobStore(), InMemoryObjectStore(), ManualClock()
    options: dict[str, Any] = {"store": store, "objects": objects, "clock": clock,
                               "policy": POLICY, "logger": QUIET_LOGGER}
    sync, async_ = JobFlow(**options), AsyncJobFlow(**options)
    ticket = sync.initiate_upload("alice", content_type="video/mp4")
    objects.put(ticket.key, VIDEO, content_type="video/mp4")
    sync.complete_upload(ticket.job_id)
    [claim] = sync.claim("worker")
    for name, args, kwargs in _bad_calls(claim):
        with pytest.raises(JobflowError) as refused:
            getattr(sync, name)(*args, **kwargs)
        with pytest.raises(JobflowError) as async_refused:
            runner.run(getattr(async_, name)(*args, **kwargs))
        assert (type(async_refused.value), str(async_refused.value)) == (
            type(refused.value), str(refused.value)), name
    assert sync.history(ticket.job_id) == runner.run(async_.history(ticket.job_id))
    assert [row.event for row in sync.history(ticket.job_id)] == [
        Event.CREATED, Event.VERIFY_UPLOAD, Event.CLAIM]


# -- concurrency and cancellation ------------------------------------------------------------


def test_concurrent_completions_verify_the_upload_once(async_flow: AsyncJobFlow,
                                                       objects: InMemoryObjectStore,
                                                       runner: asyncio.Runner) -> None:
    async def scenario() -> None:
        ticket = await async_flow.initiate_upload("alice", content_type="video/mp4")
        objects.put(ticket.key, VIDEO, content_type="video/mp4")
        jobs = await asyncio.gather(*(async_flow.complete_upload(ticket.job_id,
                                                                  owner_id="alice")
                                      for _ in range(8)))
        assert {job.status for job in jobs} == {JobStatus.QUEUED}
        assert len({job.upload_verified_at for job in jobs}) == 1
        events = [row.event for row in await async_flow.history(ticket.job_id)]
        assert events == [Event.CREATED, Event.VERIFY_UPLOAD]

    runner.run(scenario())


class HeldHead(InMemoryObjectStore):
    """An object store whose HEAD waits until the test lets it answer."""

    def __init__(self) -> None:
        super().__init__(bucket="videos")
        self.entered = threading.Event()
        self.go = threading.Event()

    def head(self, key: str) -> ObjectInfo | None:
        self.entered.set()
        assert self.go.wait(timeout=30), "the test never let the HEAD answer"
        return super().head(key)


def test_a_completion_cancelled_during_the_head_leaves_the_job_untouched(
        async_store: AsyncStore, clock: ManualClock, runner: asyncio.Runner) -> None:
    objects = HeldHead()
    flow = AsyncJobFlow(store=async_store, objects=objects, clock=clock, policy=POLICY,
                        logger=QUIET_LOGGER)

    async def scenario() -> None:
        ticket = await flow.initiate_upload("alice", content_type="video/mp4")
        objects.put(ticket.key, VIDEO, content_type="video/mp4")
        before = await flow.get(ticket.job_id)
        task = asyncio.create_task(flow.complete_upload(ticket.job_id))
        while not objects.entered.is_set():
            await asyncio.sleep(0.001)
        task.cancel()
        try:
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            objects.go.set()
        assert await flow.get(ticket.job_id) == before
        assert [row.event for row in await flow.history(ticket.job_id)] == [Event.CREATED]
        assert (await flow.complete_upload(ticket.job_id)).status is JobStatus.QUEUED

    runner.run(scenario())


def test_cancelled_anywhere_a_completion_is_all_or_nothing(
        async_stores: AsyncStores, runner: asyncio.Runner) -> None:
    """Cancel complete_upload after every number of loop turns it takes: each
    job is either untouched or queued with its one verify_upload row, and the
    store goes on working."""
    store = async_stores()
    flow = AsyncJobFlow(store=store, objects=InMemoryObjectStore(),
                        policy=POLICY, logger=QUIET_LOGGER, new_job_id=job_ids())

    async def cancelled_after(turns: int) -> bool:
        ticket = await flow.initiate_upload("alice", content_type="video/mp4")
        flow.objects.put(ticket.key, VIDEO, content_type="video/mp4")
        task = asyncio.create_task(flow.complete_upload(ticket.job_id))
        for _ in range(turns):
            await asyncio.sleep(0)
        finished = task.done()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if isinstance(store, AsyncSqlAlchemyJobStore):
            await store.drain()  # a store call the cancel came in the middle of
        job = await flow.get(ticket.job_id)
        events = [row.event for row in await flow.history(ticket.job_id)]
        assert (job.status, events) in [
            (JobStatus.AWAITING_UPLOAD, [Event.CREATED]),
            (JobStatus.QUEUED, [Event.CREATED, Event.VERIFY_UPLOAD])], (turns, job, events)
        assert (await flow.complete_upload(ticket.job_id)).status is JobStatus.QUEUED
        return finished

    async def scenario() -> None:
        turns = 0
        while not await cancelled_after(turns):
            turns += 1
            assert turns < 500, "complete_upload never finished"
        assert turns > 0

    runner.run(scenario())


# -- configuration -------------------------------------------------------------------------


def test_the_sync_sql_store_refuses_an_async_engine(tmp_path: Any) -> None:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'jobs.sqlite3'}")
    with pytest.raises(ConfigurationError, match="AsyncSqlAlchemyJobStore"):
        SqlAlchemyJobStore(engine)  # type: ignore[arg-type]


def test_the_async_store_refuses_a_sync_engine(tmp_path: Any) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'jobs.sqlite3'}")
    with pytest.raises(ConfigurationError, match="AsyncEngine"):
        AsyncSqlAlchemyJobStore(engine)  # type: ignore[arg-type]


def test_async_jobflow_refuses_a_store_that_would_block_the_loop(tmp_path: Any) -> None:
    store = SqlAlchemyJobStore(sa.create_engine(f"sqlite:///{tmp_path / 'jobs.sqlite3'}"))
    with pytest.raises(ConfigurationError, match="block the event loop"):
        AsyncJobFlow(store=store, objects=InMemoryObjectStore())
    with pytest.raises(ConfigurationError, match="store must be"):
        AsyncJobFlow(store="sqlite:///jobs.sqlite3",  # type: ignore[arg-type]
                     objects=InMemoryObjectStore())


@pytest.mark.postgres
def test_an_unreachable_database_is_unavailable_and_nothing_is_created(
        runner: asyncio.Runner) -> None:
    from tests.pgcluster import free_port

    engine = create_async_engine(
        f"postgresql+psycopg_async://nobody@127.0.0.1:{free_port()}/nothing",
        connect_args={"connect_timeout": 2})
    flow = AsyncJobFlow(store=AsyncSqlAlchemyJobStore(engine), objects=InMemoryObjectStore(),
                        policy=POLICY, logger=QUIET_LOGGER)

    async def scenario() -> None:
        try:
            with pytest.raises(StorageUnavailable):
                await flow.initiate_upload("alice", content_type="video/mp4")
        finally:
            await engine.dispose()

    runner.run(scenario())


# -- the clock of lease decisions ------------------------------------------------------------


def test_on_postgresql_the_async_facade_judges_time_by_the_database(
        runner: asyncio.Runner, sql_async_stores: AsyncStores) -> None:
    """AsyncJobFlow given no clock takes the store's, as JobFlow does; on an
    async driver the clock reads the database inside the loop's greenlet, the
    first readings and the ones due later, concurrent callers included."""
    store = sql_async_stores()
    flow = AsyncJobFlow(store=store, objects=InMemoryObjectStore(), logger=QUIET_LOGGER)
    clock = store._store.clock  # type: ignore[union-attr]
    if sql_async_stores.kind != "postgres":
        assert not isinstance(clock, DatabaseClock)
        return
    assert isinstance(clock, DatabaseClock)
    clock.resample_seconds = 0.0  # every call after the first finds a reading due

    async def readings() -> list[datetime]:
        return list(await asyncio.gather(*(flow.now() for _ in range(8))))

    async def database_time() -> datetime:
        async with store.engine.connect() as conn:
            value: datetime = (await conn.execute(sa.text("SELECT clock_timestamp()"))
                               ).scalar_one()
            return value

    first = runner.run(readings())
    first_reading = clock._reading
    later = runner.run(readings())
    server = runner.run(database_time())
    assert all(abs((moment - server).total_seconds()) < 5 for moment in first + later)
    assert first_reading is not None and clock._reading is not None
    assert clock._reading[1] > first_reading[1], "the reading due was taken by a caller"
