"""``AsyncSqlAlchemyJobStore.bind(async_session_or_connection)``: a job created,
completed or cancelled inside the host app's own transaction commits or rolls
back with the host's rows, history included, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    create_async_engine,
)
from sqlalchemy.orm import Session

from jobflow import AsyncJobFlow, Event, JobStatus
from jobflow.adapters.memory import InMemoryObjectStore
from jobflow.adapters.sqlalchemy import AsyncSqlAlchemyJobStore
from jobflow.adapters.sqlalchemy.schema import events, jobs
from jobflow.errors import ConfigurationError, JobNotFound, PermanentStorageError
from tests.aio.stores import AsyncStores, async_url
from tests.conftest import QUIET_LOGGER
from tests.strategies import POLICY

VIDEO = b"0123456789"

host_metadata = sa.MetaData()
orders = sa.Table("host_async_orders", host_metadata,
                  sa.Column("id", sa.Integer, primary_key=True),
                  sa.Column("job_id", sa.String(36)))

Host = AsyncSession | AsyncConnection
HostTransaction = Callable[[AsyncEngine], AbstractAsyncContextManager[Host]]


@asynccontextmanager
async def session_on(engine: AsyncEngine) -> AsyncIterator[AsyncSession]:
    async with AsyncSession(engine) as session:
        yield session


@asynccontextmanager
async def connection_on(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    async with engine.connect() as conn:
        yield conn


@pytest.fixture(params=[session_on, connection_on], ids=["session", "connection"])
def host_transaction(request: pytest.FixtureRequest) -> HostTransaction:
    opener: HostTransaction = request.param
    return opener


@pytest.fixture
def engine(sql_async_stores: AsyncStores, runner: asyncio.Runner) -> AsyncEngine:
    engine = sql_async_stores.engine()

    async def create_host_tables() -> None:
        async with engine.begin() as conn:
            await conn.run_sync(host_metadata.drop_all)
            await conn.run_sync(host_metadata.create_all)

    runner.run(create_host_tables())
    return engine


def flow_on(store: AsyncSqlAlchemyJobStore, objects: InMemoryObjectStore) -> AsyncJobFlow:
    return AsyncJobFlow(store=store, objects=objects, policy=POLICY, logger=QUIET_LOGGER)


async def stored(engine: AsyncEngine, job_id: str) -> tuple[int, int, int]:
    """Jobs, history rows and host orders for ``job_id``, seen from outside."""
    async with engine.connect() as conn:
        counts = []
        for table, column in ((jobs, jobs.c.id), (events, events.c.job_id),
                              (orders, orders.c.job_id)):
            query = sa.select(sa.func.count()).select_from(table).where(column == job_id)
            counts.append((await conn.execute(query)).scalar_one())
        return counts[0], counts[1], counts[2]


async def order_and_job(engine: AsyncEngine, host: Host, objects: InMemoryObjectStore) -> str:
    """What a host route does: its own row and a job, in one transaction."""
    flow = flow_on(AsyncSqlAlchemyJobStore(engine).bind(host), objects)
    ticket = await flow.initiate_upload("alice", {"order": 1}, content_type="video/mp4")
    await host.execute(sa.insert(orders).values(id=1, job_id=ticket.job_id))
    assert (await flow.get(ticket.job_id)).status is JobStatus.AWAITING_UPLOAD  # seen inside
    return ticket.job_id


def test_a_host_rollback_leaves_no_job_and_no_event(
        engine: AsyncEngine, host_transaction: HostTransaction, objects: InMemoryObjectStore,
        runner: asyncio.Runner) -> None:
    async def scenario() -> None:
        async with host_transaction(engine) as host:
            job_id = await order_and_job(engine, host, objects)
            assert await stored(engine, job_id) == (0, 0, 0), "the bound store committed"
            await host.rollback()
        assert await stored(engine, job_id) == (0, 0, 0)
        with pytest.raises(JobNotFound):
            await flow_on(AsyncSqlAlchemyJobStore(engine), objects).get(job_id)

    runner.run(scenario())


def test_a_host_commit_keeps_the_job_its_event_and_the_host_rows(
        engine: AsyncEngine, host_transaction: HostTransaction, objects: InMemoryObjectStore,
        runner: asyncio.Runner) -> None:
    async def scenario() -> None:
        async with host_transaction(engine) as host:
            job_id = await order_and_job(engine, host, objects)
            await host.commit()
        assert await stored(engine, job_id) == (1, 1, 1)
        flow = flow_on(AsyncSqlAlchemyJobStore(engine), objects)
        assert [row.event for row in await flow.history(job_id)] == [Event.CREATED]
        assert (await flow.get(job_id)).params == {"order": 1}

    runner.run(scenario())


def test_completion_and_cancel_in_the_host_transaction_go_with_it(
        engine: AsyncEngine, host_transaction: HostTransaction, objects: InMemoryObjectStore,
        runner: asyncio.Runner) -> None:
    async def scenario() -> None:
        own = flow_on(AsyncSqlAlchemyJobStore(engine), objects)
        first = await own.initiate_upload("alice", content_type="video/mp4")
        second = await own.initiate_upload("alice", content_type="video/mp4")
        objects.put(first.key, VIDEO, content_type="video/mp4")
        async with host_transaction(engine) as host:
            await host.execute(sa.insert(orders).values(id=2, job_id=None))
            bound = flow_on(AsyncSqlAlchemyJobStore(engine).bind(host), objects)
            assert (await bound.complete_upload(first.job_id)).status is JobStatus.QUEUED
            assert (await bound.cancel(second.job_id)).status is JobStatus.FAILED
            await host.rollback()
        assert [(await own.get(ticket.job_id)).status for ticket in (first, second)] == [
            JobStatus.AWAITING_UPLOAD, JobStatus.AWAITING_UPLOAD]
        async with host_transaction(engine) as host:
            bound = flow_on(AsyncSqlAlchemyJobStore(engine).bind(host), objects)
            await bound.complete_upload(first.job_id)
            await bound.cancel(second.job_id)
            await host.commit()
        assert [(await own.get(ticket.job_id)).status for ticket in (first, second)] == [
            JobStatus.QUEUED, JobStatus.FAILED]
        assert [row.event for row in await own.history(first.job_id)] == [
            Event.CREATED, Event.VERIFY_UPLOAD]

    runner.run(scenario())


def test_bind_refuses_what_is_not_an_async_session_or_connection(
        engine: AsyncEngine, runner: asyncio.Runner) -> None:
    store = AsyncSqlAlchemyJobStore(engine)
    with pytest.raises(ConfigurationError, match="AsyncSession or AsyncConnection"):
        store.bind(Session())  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="not started"):
        store.bind(AsyncConnection(engine))


@pytest.mark.postgres
def test_a_session_whose_transaction_failed_is_a_named_error_and_nothing_is_written(
        pg_engine: sa.Engine, objects: InMemoryObjectStore, runner: asyncio.Runner) -> None:
    engine = create_async_engine(async_url(pg_engine.url))

    async def scenario() -> None:
        async with AsyncSession(engine) as session:
            with pytest.raises(sa.exc.DBAPIError):
                await session.execute(sa.text("SELECT 1 / 0"))
            flow = flow_on(AsyncSqlAlchemyJobStore(engine).bind(session), objects)
            with pytest.raises(PermanentStorageError, match="roll"):
                await flow.initiate_upload("alice", content_type="video/mp4")
        counts = await flow_on(AsyncSqlAlchemyJobStore(engine), objects).counts()
        assert sum(counts.values()) == 0

    try:
        runner.run(scenario())
    finally:
        runner.run(engine.dispose())


def test_a_closed_connection_or_a_disposed_engine_loses_nothing(
        engine: AsyncEngine, objects: InMemoryObjectStore, runner: asyncio.Runner) -> None:
    """A flow bound to a connection the host already closed refuses with a named
    error and writes nothing; an engine disposed of (at a shutdown, a fork)
    opens new connections when used again."""
    async def scenario() -> None:
        async with engine.connect() as conn:
            bound = flow_on(AsyncSqlAlchemyJobStore(engine).bind(conn), objects)
        with pytest.raises(PermanentStorageError, match="closed"):
            await bound.initiate_upload("alice", content_type="video/mp4")
        own = flow_on(AsyncSqlAlchemyJobStore(engine), objects)
        assert sum((await own.counts()).values()) == 0
        await engine.dispose()
        ticket = await own.initiate_upload("alice", content_type="video/mp4")
        assert (await own.get(ticket.job_id)).status is JobStatus.AWAITING_UPLOAD

    runner.run(scenario())
