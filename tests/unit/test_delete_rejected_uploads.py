"""``UploadPolicy.delete_rejected_uploads``: the object of a rejected or expired
upload is removed after the job failed, and a failed removal never undoes that."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from structlog.testing import capture_logs

from jobflow import JobFlow, JobStatus, UploadPolicy
from jobflow.adapters.memory import InMemoryJobStore, InMemoryObjectStore
from jobflow.errors import StorageUnavailable, UploadExpired, UploadRejected

VIDEO = b"\x00\x00\x00\x18ftypmp42"


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2030, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


class UndeletableObjectStore(InMemoryObjectStore):
    """Reads and writes work; deletes fail as during an outage."""

    def delete(self, key: str) -> None:
        raise StorageUnavailable("delete refused: the store is throttling")


def flow_with(objects: InMemoryObjectStore, clock: Clock, *, delete: bool) -> JobFlow:
    policy = UploadPolicy(max_bytes=64, upload_ttl_seconds=600, adopt_after_seconds=0,
                          delete_rejected_uploads=delete)
    return JobFlow(store=InMemoryJobStore(), objects=objects, clock=clock, policy=policy)


def test_the_flag_is_off_by_default() -> None:
    assert UploadPolicy().delete_rejected_uploads is False


@pytest.mark.parametrize("delete", [True, False])
def test_a_rejected_upload_is_deleted_only_when_asked(delete: bool) -> None:
    objects = InMemoryObjectStore()
    flow = flow_with(objects, Clock(), delete=delete)
    ticket = flow.initiate_upload("owner", content_type="video/mp4")
    objects.put(ticket.key, b"x" * 65, content_type="video/mp4")

    with pytest.raises(UploadRejected):
        flow.complete_upload(ticket.job_id)

    assert flow.get(ticket.job_id).status is JobStatus.FAILED
    assert (objects.head(ticket.key) is None) is delete


def test_an_accepted_upload_is_never_deleted() -> None:
    objects = InMemoryObjectStore()
    flow = flow_with(objects, Clock(), delete=True)
    ticket = flow.initiate_upload("owner", content_type="video/mp4")
    objects.put(ticket.key, VIDEO, content_type="video/mp4")

    assert flow.complete_upload(ticket.job_id).status is JobStatus.QUEUED
    assert objects.head(ticket.key) is not None


def test_reconcile_deletes_what_it_rejects() -> None:
    objects = InMemoryObjectStore()
    flow = flow_with(objects, Clock(), delete=True)
    ticket = flow.initiate_upload("owner", content_type="video/mp4")
    objects.put(ticket.key, b"", content_type="video/mp4")

    assert flow.reconcile().rejected == (ticket.job_id,)
    assert objects.head(ticket.key) is None


def test_an_expired_upload_with_nothing_to_delete_expires_quietly() -> None:
    objects = InMemoryObjectStore()
    clock = Clock()
    flow = flow_with(objects, clock, delete=True)
    ticket = flow.initiate_upload("owner", content_type="video/mp4")
    clock.now += timedelta(seconds=601)

    with capture_logs() as logs, pytest.raises(UploadExpired):
        flow.complete_upload(ticket.job_id)

    assert flow.get(ticket.job_id).error_code == "upload_expired"
    assert [log for log in logs if log["event"] == "upload.delete_failed"] == []


def test_a_failed_delete_is_logged_and_the_job_stays_failed() -> None:
    objects = UndeletableObjectStore()
    flow = flow_with(objects, Clock(), delete=True)
    ticket = flow.initiate_upload("owner", content_type="video/mp4")
    objects.put(ticket.key, b"", content_type="video/mp4")

    with capture_logs() as logs, pytest.raises(UploadRejected):
        flow.complete_upload(ticket.job_id)

    job = flow.get(ticket.job_id)
    assert (job.status, job.error_code) == (JobStatus.FAILED, "upload_rejected")
    assert [e.event.value for e in flow.history(ticket.job_id)] == ["created", "reject_upload"]
    [warning] = [log for log in logs if log["event"] == "upload.delete_failed"]
    assert warning["key"] == ticket.key
    assert "throttling" in warning["error"]
