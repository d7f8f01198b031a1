"""Shared fixtures. Every contract and property test takes ``make_store``,
so each runs against every JobStore adapter listed in ``STORE_KINDS``."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, settings

from jobflow.adapters.memory import InMemoryJobStore
from jobflow.ports import JobStore

# Hypothesis profiles: "ci" is the fixed, meaningful budget the test command uses.
settings.register_profile(
    "ci", max_examples=200, stateful_step_count=50, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev", max_examples=50, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

StoreFactory = Callable[[], JobStore]

STORE_KINDS = ["memory"]


@pytest.fixture(autouse=True)
def _no_jobflow_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never see the caller's JOBFLOW_* configuration."""
    for name in list(os.environ):
        if name.startswith("JOBFLOW_"):
            monkeypatch.delenv(name)


@pytest.fixture(params=STORE_KINDS)
def make_store(request: pytest.FixtureRequest) -> Iterator[StoreFactory]:
    """A factory of fresh, empty job stores of one kind."""
    if request.param == "memory":
        yield InMemoryJobStore
    else:  # pragma: no cover - every kind above has a branch
        raise AssertionError(request.param)
