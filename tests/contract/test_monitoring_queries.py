"""The reads behind ``jobflow status``, on every JobStore: recent failures and
uploads stuck in ``awaiting_upload``."""

from __future__ import annotations

from datetime import timedelta

from jobflow import JobFlow, JobStatus, UploadPolicy
from jobflow.adapters.memory import InMemoryObjectStore
from tests.conftest import ManualClock, StoreFactory
from tests.strategies import START


def test_recent_failures_are_failed_jobs_finished_in_the_window_newest_first(
        make_store: StoreFactory) -> None:
    clock = ManualClock()
    flow = JobFlow(store=make_store(), objects=InMemoryObjectStore(), clock=clock,
                   policy=UploadPolicy(upload_ttl_seconds=7200))
    old = flow.initiate_upload("o", content_type="video/mp4").job_id
    flow.cancel(old)  # failed at START
    clock.now = START + timedelta(minutes=30)
    recent = [flow.initiate_upload("o", content_type="video/mp4").job_id for _ in range(3)]
    for minutes, job_id in zip((31, 32, 33), recent, strict=True):
        clock.now = START + timedelta(minutes=minutes)
        flow.cancel(job_id)
    ticket = flow.initiate_upload("o", content_type="video/mp4")
    flow.objects.put(ticket.key, b"video", content_type="video/mp4")
    flow.complete_upload(ticket.job_id)
    flow.cancel(ticket.job_id)
    flow.requeue(ticket.job_id)  # failed, then back in the queue: no longer a failure

    clock.now = START + timedelta(minutes=40)
    found = flow.recent_failures(within=timedelta(minutes=15))
    assert [job.id for job in found] == list(reversed(recent))
    assert all(job.status is JobStatus.FAILED for job in found)
    assert [j.id for j in flow.recent_failures(within=timedelta(minutes=15), limit=2)] == [
        recent[2], recent[1]]
    assert old in [job.id for job in flow.recent_failures(within=timedelta(hours=1))]


def test_stuck_uploads_are_the_waiting_jobs_older_than_the_threshold(
        make_store: StoreFactory) -> None:
    clock = ManualClock()
    flow = JobFlow(store=make_store(), objects=InMemoryObjectStore(), clock=clock)
    first = flow.initiate_upload("o", content_type="video/mp4").job_id
    clock.now = START + timedelta(minutes=20)
    second = flow.initiate_upload("o", content_type="video/mp4").job_id
    flow.cancel(flow.initiate_upload("o", content_type="video/mp4").job_id)
    clock.now = START + timedelta(minutes=50)
    fresh = flow.initiate_upload("o", content_type="video/mp4").job_id

    assert [job.id for job in flow.stuck_uploads(older_than=timedelta(minutes=30))] == [
        first, second]
    assert [job.id for job in flow.stuck_uploads(older_than=timedelta(0))] == [
        first, second, fresh]
