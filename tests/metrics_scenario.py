"""A scripted run whose every step the metrics must reflect: uploads verified,
one completed too early (missing), one rejected, a job retried, one failed
for good, one rescued from a worker that vanished; a real Worker runs the
jobs in a thread. Shared by the scrape test and the dashboard-and-alerts
checks, which need a registry that has seen everything."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import attrs
import pytest
from prometheus_client.parser import text_string_to_metric_families

from jobflow import Claim, Job, JobFlow, JobStatus
from jobflow.errors import LeaseLost, PermanentJobError, UploadMissing, UploadRejected
from jobflow.worker import JobContext, Worker

VIDEO = b"\x00\x00\x00\x18ftypmp42 video"
#: Upper bound for waiting on the worker; a guard, never a measurement.
PATIENCE = 30.0


@attrs.frozen
class Happened:
    """What the scripted run did, as the metrics should count it."""

    initiated: int = 8
    verified: int = 7  # all but the rejected upload; the early one once uploaded
    missing: int = 1
    rejected: int = 1
    claims: int = 9  # 7 first attempts, a retry, the rescued job again (+ the vanished one)
    succeeded: int = 6
    retried: int = 1
    failed: int = 1
    rescued: int = 1
    leases_lost: int = 1
    puts: int = 8
    opens: int = 8  # every attempt the worker ran reads its object
    heads: int = 9  # each verification and the early, missing one
    done: int = 6
    failed_jobs: dict[str, int] = attrs.field(factory=lambda: {
        "upload_rejected": 1, "bad_input": 1})


def handler(job: Job, ctx: JobContext) -> dict[str, Any]:
    with ctx.open() as stream:
        size = len(stream.read())
    if job.params.get("fail_first") and ctx.attempt == 1:
        raise RuntimeError("the first attempt fails")
    if job.params.get("permanent"):
        raise PermanentJobError("cannot read this file", error_code="bad_input")
    return {"size": size}


def queue(flow: JobFlow, **params: Any) -> str:
    ticket = flow.initiate_upload("scenario", params, content_type="video/mp4")
    flow.objects.put(ticket.key, VIDEO, content_type="video/mp4")
    flow.complete_upload(ticket.job_id)
    return ticket.job_id


def wait_until(condition: Any, what: str) -> None:
    give_up = time.monotonic() + PATIENCE
    while not condition():
        if time.monotonic() > give_up:
            pytest.fail(f"gave up waiting for: {what}")
        time.sleep(0.02)


@contextmanager
def running(worker: Worker) -> Iterator[None]:
    thread = threading.Thread(target=worker.run, name="scenario-worker", daemon=True)
    thread.start()
    try:
        yield
    finally:
        worker.stop()
        thread.join(PATIENCE)
        assert not thread.is_alive(), "the worker did not stop"


def run_scenario(flow: JobFlow) -> Happened:
    """Play the script on ``flow`` (a short backoff policy); return what happened."""
    vanished = queue(flow)
    [ghost] = flow.claim("vanished-worker", lease_seconds=0.2)  # then never heard of again
    assert ghost.job.id == vanished
    for _ in range(3):
        queue(flow)
    early = flow.initiate_upload("scenario", content_type="video/mp4")
    with pytest.raises(UploadMissing):
        flow.complete_upload(early.job_id)  # the client called too soon
    flow.objects.put(early.key, VIDEO, content_type="video/mp4")
    flow.complete_upload(early.job_id)
    empty = flow.initiate_upload("scenario", content_type="video/mp4")
    flow.objects.put(empty.key, b"", content_type="video/mp4")
    with pytest.raises(UploadRejected):
        flow.complete_upload(empty.job_id)
    queue(flow, fail_first=True)
    queue(flow, permanent=True)
    lease_ends = ghost.job.lease_expires_at
    assert lease_ends is not None
    wait_until(lambda: flow.now() > lease_ends, "the vanished worker's lease to run out")

    worker = Worker(flow, handler, concurrency=2, poll_interval=0.05, reconcile_interval=60)
    with running(worker):  # its first reconcile rescues the vanished worker's job
        wait_until(lambda: flow.counts()[JobStatus.DONE] == 6
                   and flow.counts()[JobStatus.FAILED] == 2, "every job to finish")
    with pytest.raises(LeaseLost):
        flow.succeed(Claim(job=ghost.job, token=ghost.token))  # back, too late
    return Happened()


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(exposition: str) -> Samples:
    """Every sample of a Prometheus text exposition: (name, labels) -> value."""
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(exposition)
            for sample in family.samples}
