"""``jobflow.migrations`` takes an AsyncEngine or an async URL as it takes an Engine:
from a deploy script (``upgrade``) or from inside a running loop (``upgrade_async``)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

import jobflow.migrations
from jobflow import AsyncJobFlow, JobStatus
from jobflow.adapters.memory import InMemoryObjectStore
from jobflow.adapters.sqlalchemy import AsyncSqlAlchemyJobStore
from jobflow.errors import ConfigurationError
from tests.aio.stores import async_url
from tests.conftest import QUIET_LOGGER

KINDS = [pytest.param("sqlite"), pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=KINDS)
def empty_async_url(request: pytest.FixtureRequest, tmp_path: Path) -> sa.URL:
    """The async URL of a new database without any table."""
    if request.param == "sqlite":
        return sa.make_url(f"sqlite+aiosqlite:///{tmp_path / 'empty.sqlite3'}")
    url: sa.URL = request.getfixturevalue("pg_url")
    return async_url(url)


async def _jobs_work(url: sa.URL) -> None:
    engine = create_async_engine(url)
    try:
        flow = AsyncJobFlow(store=AsyncSqlAlchemyJobStore(engine), objects=InMemoryObjectStore(),
                            logger=QUIET_LOGGER)
        ticket = await flow.initiate_upload("alice", content_type="video/mp4")
        assert (await flow.get(ticket.job_id)).status is JobStatus.AWAITING_UPLOAD
    finally:
        await engine.dispose()


def test_upgrade_takes_an_async_engine_outside_a_loop(empty_async_url: sa.URL) -> None:
    engine = create_async_engine(empty_async_url)
    assert jobflow.migrations.current(engine) is None
    jobflow.migrations.upgrade(engine)
    assert jobflow.migrations.current(engine) == jobflow.migrations.head()
    asyncio.run(_jobs_work(empty_async_url))
    jobflow.migrations.downgrade(engine, "base")
    assert jobflow.migrations.current(engine) is None


def test_upgrade_takes_an_async_url(empty_async_url: sa.URL) -> None:
    jobflow.migrations.upgrade(empty_async_url.render_as_string(hide_password=False))
    assert jobflow.migrations.current(empty_async_url) == jobflow.migrations.head()


def test_upgrade_async_runs_inside_the_app_loop(empty_async_url: sa.URL) -> None:
    async def lifespan() -> None:
        engine = create_async_engine(empty_async_url)
        try:
            await jobflow.migrations.upgrade_async(engine)
            assert await jobflow.migrations.current_async(engine) == jobflow.migrations.head()
            async with engine.connect() as conn:  # an AsyncConnection serves too
                await jobflow.migrations.downgrade_async(conn, "base")
                await conn.commit()
            assert await jobflow.migrations.current_async(engine) is None
        finally:
            await engine.dispose()

    asyncio.run(lifespan())


def test_the_sync_call_inside_a_running_loop_names_the_async_one(tmp_path: Path) -> None:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'jobs.sqlite3'}")

    async def lifespan() -> None:
        with pytest.raises(ConfigurationError, match="upgrade_async"):
            jobflow.migrations.upgrade(engine)

    asyncio.run(lifespan())
    assert jobflow.migrations.current(engine) is None


@pytest.mark.parametrize("database", [42, "not a url", "nosuchdb://x", None])
def test_what_is_no_database_is_a_configuration_error(database: object) -> None:
    with pytest.raises(ConfigurationError):
        jobflow.migrations.upgrade(database)  # type: ignore[arg-type]
