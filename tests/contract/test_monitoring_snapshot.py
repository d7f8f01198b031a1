"""The queue's figures behind the Prometheus gauges and the dashboard, on every
JobStore: counts, the oldest waiting upload and queued job, stuck uploads,
expired leases and recent failures by error code."""

from __future__ import annotations

from datetime import timedelta

import pytest

from jobflow import JobFlow, JobStatus, UploadPolicy
from jobflow.adapters.memory import InMemoryObjectStore
from jobflow.errors import UploadRejected
from jobflow.monitoring import FailureGroup, take_snapshot
from jobflow.ports import JobStore
from tests.conftest import QUIET_LOGGER, ManualClock
from tests.strategies import START


def test_a_snapshot_counts_what_the_history_left(store: JobStore) -> None:
    clock = ManualClock()
    flow = JobFlow(store=store, objects=InMemoryObjectStore(), clock=clock, logger=QUIET_LOGGER,
                   policy=UploadPolicy(upload_ttl_seconds=30 * 60))

    def queued(minute: float) -> str:
        clock.now = START + timedelta(minutes=minute)
        ticket = flow.initiate_upload("o", content_type="video/mp4")
        flow.objects.put(ticket.key, b"video", content_type="video/mp4")
        flow.complete_upload(ticket.job_id)
        return ticket.job_id

    waiting_longest = flow.initiate_upload("o", content_type="video/mp4").job_id  # at START
    clock.now = START + timedelta(minutes=1)
    flow.cancel(flow.initiate_upload("o", content_type="video/mp4").job_id)  # outside the window
    done = queued(2)
    [claim] = flow.claim("w")
    flow.succeed(claim)
    running = queued(3)
    [claim] = flow.claim("w", lease_seconds=60)
    assert claim.job.id == running
    queued(5)
    clock.now = START + timedelta(minutes=15)
    flow.initiate_upload("o", content_type="video/mp4")  # waiting, its deadline still ahead
    queued(20)
    clock.now = START + timedelta(minutes=35)
    flow.cancel(flow.initiate_upload("o", content_type="video/mp4").job_id)
    clock.now = START + timedelta(minutes=36)
    empty = flow.initiate_upload("o", content_type="video/mp4")
    flow.objects.put(empty.key, b"", content_type="video/mp4")
    with pytest.raises(UploadRejected):
        flow.complete_upload(empty.job_id)
    clock.now = START + timedelta(minutes=40)

    snapshot = take_snapshot(flow, failure_window=timedelta(minutes=30))

    assert snapshot.at == START + timedelta(minutes=40)
    assert snapshot.counts == {JobStatus.AWAITING_UPLOAD: 2, JobStatus.QUEUED: 2,
                               JobStatus.QUICK_RUNNING: 1, JobStatus.DONE: 1,
                               JobStatus.FAILED: 3}
    assert flow.get(waiting_longest).created_at == snapshot.oldest_upload_since == START
    assert snapshot.upload_wait_seconds == 40 * 60
    if getattr(store, "engine", None) is not None:  # the in-memory store cannot tell
        assert snapshot.oldest_queued_since == START + timedelta(minutes=5)
        assert snapshot.queue_age_seconds == 35 * 60
    assert snapshot.stuck_uploads == 1  # the first one's deadline passed at minute 30
    assert snapshot.expired_leases == 1
    assert flow.get(done).status is JobStatus.DONE
    assert snapshot.failures == (
        FailureGroup("cancelled", 1, START + timedelta(minutes=35)),
        FailureGroup("upload_rejected", 1, START + timedelta(minutes=36)))
    assert snapshot.failed_recently == 2


def test_an_empty_store_has_nothing_waiting(store: JobStore) -> None:
    flow = JobFlow(store=store, objects=InMemoryObjectStore(), clock=ManualClock(),
                   logger=QUIET_LOGGER)
    snapshot = take_snapshot(flow)
    assert snapshot.counts == dict.fromkeys(JobStatus, 0)
    assert (snapshot.upload_wait_seconds, snapshot.queue_age_seconds) == (0, 0)
    assert (snapshot.stuck_uploads, snapshot.expired_leases, snapshot.failures) == (0, 0, ())
