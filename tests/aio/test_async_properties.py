"""The proof, run async: the Hypothesis state machine of tests/contract drives
AsyncJobFlow over the in-memory store, SQLite through aiosqlite and PostgreSQL
through psycopg's async driver, and DESIGN.md's invariants hold after every
step.

Every rule of :class:`~tests.contract.jobflow_machine.JobFlowMachine` runs as
it is; only its flows are AsyncJobFlow (each call run to completion on the
machine's own event loop) and its store's direct compare-and-sets run in a
greenlet on the async driver. A rule added to the machine, or a method added
to JobFlow that a rule calls, is thereby proved on AsyncJobFlow too.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import run_state_machine_as_test

from jobflow import AsyncJobFlow, JobFlow, UploadPolicy
from jobflow.adapters.sqlalchemy import AsyncSqlAlchemyJobStore
from jobflow.greenlets import greenlet_spawn
from jobflow.ports import JobStore
from tests.aio.stores import AsyncStore, AsyncStores
from tests.conftest import QUIET_LOGGER
from tests.contract.jobflow_machine import JobFlowMachine
from tests.contract.test_properties import ClaimsUnverifiedJobs

#: A fixed, modest budget: the sync suite explores far more on the same rules;
#: this one proves the async path (about 10 s per backend on two cores).
ASYNC_PROOF = settings(max_examples=50, stateful_step_count=30, deadline=None,
                       derandomize=True, database=None,
                       suppress_health_check=[HealthCheck.too_slow,
                                              HealthCheck.data_too_large])


class Blocking:
    """An async object seen as a sync one: each coroutine method is run to
    completion on ``runner`` (the test plays a caller that awaits each call)."""

    def __init__(self, target: Any, runner: asyncio.Runner) -> None:
        self._target = target
        self._runner = runner

    def __getattr__(self, name: str) -> Any:
        found = getattr(self._target, name)
        if not inspect.iscoroutinefunction(found):
            return found
        return lambda *args, **kwargs: self._runner.run(found(*args, **kwargs))


class InGreenlets:
    """A store's synchronous JobStore calls, each made in a greenlet on ``runner``,
    as AsyncJobFlow makes them (the machine's direct compare-and-sets)."""

    def __init__(self, store: AsyncStore, runner: asyncio.Runner) -> None:
        self.store = store
        self._sync = store.sync_store if isinstance(store, AsyncSqlAlchemyJobStore) else store
        self._runner = runner

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._sync, name)
        return lambda *args, **kwargs: self._runner.run(
            greenlet_spawn(method, *args, **kwargs))


class AsyncJobFlowMachine(JobFlowMachine):
    make_stores: Callable[[], AsyncStores]

    def __init__(self) -> None:
        self.runner = asyncio.Runner()
        self.stores = type(self).make_stores()
        super().__init__()

    def new_store(self) -> JobStore:
        return cast(JobStore, InGreenlets(self.stores(), self.runner))

    def new_flow(self, policy: UploadPolicy, ids: Callable[[], str]) -> JobFlow:
        store = cast(InGreenlets, self.store).store
        flow = AsyncJobFlow(store=store, objects=self.objects, clock=lambda: self.now,
                            policy=policy, logger=QUIET_LOGGER, new_job_id=ids)
        return cast(JobFlow, Blocking(flow, self.runner))

    def teardown(self) -> None:
        try:
            self.runner.run(self.stores.dispose())
        finally:
            self.runner.close()


def async_machine_for(make_stores: Callable[[], AsyncStores]) -> type[AsyncJobFlowMachine]:
    return type("AsyncJobFlowMachineFor", (AsyncJobFlowMachine,),
                {"make_stores": staticmethod(make_stores)})


def _stores_of(kind: str, request: pytest.FixtureRequest,
               tmp_path: Path) -> Callable[[], AsyncStores]:
    if kind == "sqlite":
        template: Path = request.getfixturevalue("sqlite_template")
        return lambda: AsyncStores(kind, sqlite_template=template, folder=tmp_path)
    if kind == "postgres":
        pg_engine: sa.Engine = request.getfixturevalue("pg_engine")
        return lambda: AsyncStores(kind, pg_engine=pg_engine)
    return lambda: AsyncStores(kind)


@pytest.mark.parametrize("kind", [pytest.param("memory"), pytest.param("sqlite"),
                                  pytest.param("postgres", marks=pytest.mark.postgres)])
def test_invariants_hold_on_every_store_through_async_jobflow(
        kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    run_state_machine_as_test(async_machine_for(_stores_of(kind, request, tmp_path)),
                              settings=ASYNC_PROOF)


class BrokenStores(AsyncStores):
    """Stores that claim jobs still awaiting their upload."""

    def __call__(self) -> AsyncStore:
        return ClaimsUnverifiedJobs()


def test_the_async_proof_catches_a_broken_store() -> None:
    with pytest.raises(AssertionError, match=r"handed to a worker|unverified"):
        run_state_machine_as_test(
            async_machine_for(lambda: BrokenStores("memory")),
            settings=settings(ASYNC_PROOF, max_examples=200, phases=[Phase.generate]))
