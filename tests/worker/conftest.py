"""Fixtures for running a Worker in-process against every JobStore adapter."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from jobflow import JobFlow, UploadPolicy
from jobflow.adapters.memory import InMemoryObjectStore
from jobflow.worker import Worker
from tests.conftest import StoreFactory

FlowFactory = Callable[..., JobFlow]

#: Upper bound for waiting on something a worker does; a guard, never a measurement.
PATIENCE = 15.0


@pytest.fixture
def make_flow(make_store: StoreFactory) -> FlowFactory:
    """JobFlows over ONE fresh job store and one object store, with any policy
    and clock: several flows built by one test see the same jobs."""
    store = make_store()
    objects = InMemoryObjectStore()

    def build(policy: UploadPolicy | None = None, clock: Any = None) -> JobFlow:
        return JobFlow(store=store, objects=objects, policy=policy or UploadPolicy(),
                       clock=clock)

    return build


def queue_job(flow: JobFlow, data: bytes = b"\x00\x00\x00\x18ftypmp42",
              params: dict[str, Any] | None = None) -> str:
    """A job whose upload was verified: queued and claimable."""
    ticket = flow.initiate_upload("owner-1", params or {}, content_type="video/mp4")
    flow.objects.put(ticket.key, data, content_type="video/mp4")
    flow.complete_upload(ticket.job_id)
    return ticket.job_id


def wait_for(condition: Callable[[], bool], what: str, timeout: float = PATIENCE) -> None:
    """Poll ``condition`` until it holds; fail the test naming ``what`` if it never does."""
    give_up = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > give_up:
            pytest.fail(f"gave up waiting for: {what}")
        time.sleep(0.01)


@contextmanager
def running(worker: Worker) -> Iterator[threading.Thread]:
    """Run ``worker`` in a thread; stop it and make sure it ended on exit."""
    thread = threading.Thread(target=worker.run, name="test-worker", daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        worker.stop()
        thread.join(PATIENCE)
        assert not thread.is_alive(), "worker did not stop"
