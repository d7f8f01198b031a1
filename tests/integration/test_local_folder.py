"""The local-folder object store on a real filesystem: uploads through its
``file://`` tickets, atomic writes, and no way out of the folder."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from jobflow import JobFlow, JobStatus, UploadPolicy
from jobflow.adapters.localfs import LocalObjectStore, deliver
from jobflow.adapters.memory import InMemoryJobStore
from jobflow.errors import (
    ConfigurationError,
    InvalidInput,
    ObjectChanged,
    StorageUnavailable,
    UploadMissing,
    UploadRejected,
)
from jobflow.models import ObjectInfo, PresignedUpload
from tests.conftest import ManualClock

VIDEO = b"\x00\x00\x00\x18ftypmp42" + bytes(range(256))
KEY = "uploads/0b4e9f8e-8d1c-4d39-9a4f-6e1b3f0e7a11"


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder next to the store that nothing may ever touch."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "precious").write_bytes(b"do not touch")
    return folder


@pytest.fixture
def store(tmp_path: Path) -> LocalObjectStore:
    return LocalObjectStore(tmp_path / "objects")


def tree(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` (links not followed), with its bytes."""
    files: dict[str, bytes] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink():
            files[str(path.relative_to(folder))] = path.read_bytes()
    return files


def flow_on(store: LocalObjectStore, policy: UploadPolicy | None = None) -> JobFlow:
    return JobFlow(store=InMemoryJobStore(), objects=store, policy=policy)


# -- a user's round trip -------------------------------------------------------------------


def test_a_ticket_upload_queues_the_job_and_the_worker_reads_it(store: LocalObjectStore,
                                                                tmp_path: Path) -> None:
    flow = flow_on(store)
    ticket = flow.initiate_upload("owner-1", content_type="video/mp4",
                                  sha256=hashlib.sha256(VIDEO).hexdigest())
    assert ticket.method == "PUT"
    assert ticket.url == (store.root / ticket.key).as_uri()

    deliver(ticket, VIDEO)  # from the ticket alone, as the CLI's upload command does
    job = flow.complete_upload(ticket.job_id, owner_id="owner-1")

    assert job.status is JobStatus.QUEUED
    assert (job.object_size, job.object_sha256) == (len(VIDEO), hashlib.sha256(VIDEO).hexdigest())
    assert (store.root / ticket.key).read_bytes() == VIDEO  # a plain file in the folder
    [claim] = flow.claim("worker-1")
    assert claim.job.verified_object is not None
    dest = store.download(claim.job.key, tmp_path / "work.mp4",
                          expected=claim.job.verified_object)
    assert dest.read_bytes() == VIDEO


def test_an_upload_can_be_streamed_from_a_file(store: LocalObjectStore, tmp_path: Path) -> None:
    source = tmp_path / "clip.mp4"
    source.write_bytes(VIDEO * 3000)  # several chunks
    presigned = store.presign_upload(KEY, content_type="video/mp4", expires_in=60,
                                     min_bytes=1, max_bytes=10**9)

    with source.open("rb") as stream:
        info = store.deliver(presigned, stream)

    assert info.size == len(VIDEO) * 3000
    assert store.head(KEY) == info


def test_complete_before_delivery_keeps_waiting(store: LocalObjectStore) -> None:
    flow = flow_on(store)
    ticket = flow.initiate_upload("owner-1", content_type="video/mp4")

    with pytest.raises(UploadMissing):
        flow.complete_upload(ticket.job_id)
    deliver(ticket, VIDEO)
    assert flow.complete_upload(ticket.job_id).status is JobStatus.QUEUED


def test_a_file_copied_in_by_hand_is_not_an_upload(store: LocalObjectStore) -> None:
    """Only a complete, atomic delivery counts; a half-copied file must not."""
    flow = flow_on(store)
    ticket = flow.initiate_upload("owner-1", content_type="video/mp4")
    target = store.root / ticket.key
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(VIDEO)

    assert store.head(ticket.key) is None
    with pytest.raises(UploadMissing):
        flow.complete_upload(ticket.job_id)


def test_a_file_modified_in_place_is_no_longer_the_object(store: LocalObjectStore) -> None:
    verified = store.put(KEY, VIDEO, content_type="video/mp4")
    with (store.root / KEY).open("ab") as tamper:
        tamper.write(b"appended")

    assert store.head(KEY) is None
    with pytest.raises(ObjectChanged):
        store.open(KEY, expected=verified)


def test_a_redelivery_after_verification_is_detected(store: LocalObjectStore) -> None:
    flow = flow_on(store)
    ticket = flow.initiate_upload("owner-1", content_type="video/mp4")
    deliver(ticket, VIDEO)
    flow.complete_upload(ticket.job_id)

    deliver(ticket, VIDEO)  # identical bytes, but a new object
    [claim] = flow.claim("worker-1")

    with pytest.raises(ObjectChanged):
        store.open(claim.job.key, expected=claim.job.verified_object)


def test_a_stream_opened_before_a_replacement_keeps_reading_the_verified_bytes(
        store: LocalObjectStore) -> None:
    verified = store.put(KEY, VIDEO, content_type="video/mp4")

    with store.open(KEY, expected=verified) as stream:
        store.put(KEY, b"replacement", content_type="video/mp4")
        assert stream.read() == VIDEO


def test_a_delivery_that_breaks_the_declared_checksum_writes_nothing(
        store: LocalObjectStore) -> None:
    flow = flow_on(store)
    ticket = flow.initiate_upload("owner-1", content_type="video/mp4",
                                  sha256=hashlib.sha256(VIDEO).hexdigest())

    with pytest.raises(InvalidInput, match="SHA-256"):
        deliver(ticket, VIDEO[::-1])

    assert store.head(ticket.key) is None
    assert tree(store.root) == {}


def test_a_wrong_content_type_is_rejected_on_complete(store: LocalObjectStore) -> None:
    flow = flow_on(store)
    ticket = flow.initiate_upload("owner-1", content_type="video/mp4")
    deliver(PresignedUpload(method="PUT", url=ticket.url,
                            headers={"Content-Type": "text/html"}), VIDEO)

    with pytest.raises(UploadRejected, match="content type"):
        flow.complete_upload(ticket.job_id)
    assert flow.get(ticket.job_id).status is JobStatus.FAILED


def test_rejected_uploads_are_deleted_when_the_policy_says_so(store: LocalObjectStore) -> None:
    flow = flow_on(store, UploadPolicy(delete_rejected_uploads=True, max_bytes=16))
    ticket = flow.initiate_upload("owner-1", content_type="video/mp4")
    deliver(ticket, VIDEO)

    with pytest.raises(UploadRejected):
        flow.complete_upload(ticket.job_id)

    assert not (store.root / ticket.key).exists()
    assert tree(store.root) == {}


# -- atomic writes -------------------------------------------------------------------------


class BrokenSource(io.BytesIO):
    """A client stream that fails half-way through."""

    def __init__(self) -> None:
        super().__init__(b"partial")
        self.reads = 0

    def read(self, size: int | None = -1) -> bytes:
        self.reads += 1
        if self.reads > 1:
            raise RuntimeError("client went away")
        return super().read(size)


def test_a_failed_write_leaves_the_previous_object(store: LocalObjectStore) -> None:
    before = store.put(KEY, VIDEO, content_type="video/mp4")
    presigned = store.presign_upload(KEY, content_type="video/mp4", expires_in=60,
                                     min_bytes=1, max_bytes=10**6)

    with pytest.raises(RuntimeError):
        store.deliver(presigned, BrokenSource())

    assert store.head(KEY) == before
    assert (store.root / KEY).read_bytes() == VIDEO
    assert os.listdir(store.root / ".jobflow" / "tmp") == []
    assert len(os.listdir(store.root / ".jobflow" / "meta")) == 1


def test_a_rewrite_leaves_one_metadata_file(store: LocalObjectStore) -> None:
    for payload in (VIDEO, b"second", b"third"):
        store.put(KEY, payload, content_type="video/mp4")

    assert len(os.listdir(store.root / ".jobflow" / "meta")) == 1
    store.delete(KEY)
    assert os.listdir(store.root / ".jobflow" / "meta") == []


def test_two_stores_on_one_folder_see_the_same_objects(tmp_path: Path) -> None:
    writer = LocalObjectStore(tmp_path / "shared")
    reader = LocalObjectStore(tmp_path / "shared")

    written = writer.put(KEY, VIDEO, content_type="video/mp4")

    assert reader.head(KEY) == written


def test_a_key_under_an_existing_object_is_refused(store: LocalObjectStore) -> None:
    store.put("uploads/a", VIDEO, content_type="video/mp4")

    with pytest.raises(InvalidInput, match="conflicts"):
        store.put("uploads/a/b", VIDEO, content_type="video/mp4")
    with pytest.raises(InvalidInput, match="folder"):
        store.put("uploads", VIDEO, content_type="video/mp4")
    assert store.head("uploads") is None


# -- nothing escapes the folder --------------------------------------------------------------


@pytest.fixture
def untouched(outside: Path) -> Iterator[Path]:
    """After the test, the outside folder holds exactly what it held before."""
    before = tree(outside)
    yield outside
    assert tree(outside) == before


@pytest.mark.parametrize("key", ["../outside/precious", "/etc/passwd", "uploads/../../outside/x",
                                 "..", ".jobflow/meta/x", "uploads/.jobflow/x", "nul\x00"])
def test_escaping_keys_are_refused(store: LocalObjectStore, untouched: Path, key: str) -> None:
    with pytest.raises(InvalidInput):
        store.put(key, b"pwned", content_type="video/mp4")
    with pytest.raises(InvalidInput):
        store.head(key)
    with pytest.raises(InvalidInput):
        store.delete(key)
    assert tree(store.root) == {}


def test_a_symlinked_folder_inside_the_store_is_refused(store: LocalObjectStore,
                                                       untouched: Path) -> None:
    (store.root / "uploads").symlink_to(untouched, target_is_directory=True)

    with pytest.raises(ConfigurationError, match="symbolic link"):
        store.put("uploads/precious", b"pwned", content_type="video/mp4")
    with pytest.raises(ConfigurationError, match="symbolic link"):
        store.head("uploads/precious")
    with pytest.raises(ConfigurationError, match="symbolic link"):
        store.open("uploads/precious")
    with pytest.raises(ConfigurationError, match="symbolic link"):
        store.delete("uploads/precious")
    with pytest.raises(ConfigurationError, match="symbolic link"):
        store.put("uploads/new/deeper", b"pwned", content_type="video/mp4")


def test_a_symlinked_object_is_refused(store: LocalObjectStore, untouched: Path) -> None:
    (store.root / "uploads").mkdir()
    (store.root / KEY).symlink_to(untouched / "precious")

    with pytest.raises(ConfigurationError, match="symbolic link"):
        store.put(KEY, b"pwned", content_type="video/mp4")
    with pytest.raises(ConfigurationError, match="symbolic link"):
        store.head(KEY)
    with pytest.raises(ConfigurationError, match="symbolic link"):
        store.delete(KEY)
    assert (store.root / KEY).is_symlink()


def test_a_symlinked_state_folder_is_refused(tmp_path: Path, untouched: Path) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    meta = store.root / ".jobflow" / "meta"
    meta.rmdir()
    meta.symlink_to(untouched, target_is_directory=True)

    with pytest.raises(ConfigurationError, match="symbolic link"):
        store.put(KEY, b"pwned", content_type="video/mp4")
    with pytest.raises(ConfigurationError, match="symbolic link"):
        LocalObjectStore(tmp_path / "objects")


@pytest.mark.parametrize("url", ["file:///etc/passwd", "https://example.invalid/x"])
def test_a_delivery_outside_the_folder_is_refused(store: LocalObjectStore, untouched: Path,
                                                  url: str) -> None:
    upload = PresignedUpload(method="PUT", url=url, headers={"Content-Type": "video/mp4"})

    with pytest.raises(InvalidInput):
        store.deliver(upload, b"pwned")
    with pytest.raises(InvalidInput):
        deliver(upload, b"pwned")


def test_a_delivery_url_climbing_out_is_refused(store: LocalObjectStore, untouched: Path) -> None:
    url = store.root.as_uri() + "/../outside/precious"
    upload = PresignedUpload(method="PUT", url=url, headers={"Content-Type": "video/mp4"})

    with pytest.raises(InvalidInput):
        store.deliver(upload, b"pwned")


def test_a_root_that_is_a_file_is_a_configuration_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")

    with pytest.raises(ConfigurationError):
        LocalObjectStore(tmp_path / "file")


# -- a folder that is not there is an outage, never a missing object -----------------------


def every_read(store: LocalObjectStore, verified: ObjectInfo,
               tmp_path: Path) -> list[Callable[[], object]]:
    return [lambda: store.head(KEY),
            lambda: store.open(KEY, expected=verified),
            lambda: store.download(KEY, tmp_path / "copy", expected=verified),
            lambda: store.put("uploads/other", VIDEO, content_type="video/mp4"),
            lambda: store.delete(KEY)]


def test_a_folder_renamed_away_is_unavailable_until_it_returns(store: LocalObjectStore,
                                                               tmp_path: Path) -> None:
    verified = store.put(KEY, VIDEO, content_type="video/mp4")
    store.root.rename(tmp_path / "away")

    for call in every_read(store, verified, tmp_path):
        with pytest.raises(StorageUnavailable, match="unavailable"):
            call()
    assert not store.root.exists(), "a write recreated the folder"

    (tmp_path / "away").rename(store.root)
    assert store.head(KEY) == verified
    with store.open(KEY, expected=verified) as stream:
        assert stream.read() == VIDEO


def test_an_empty_mount_point_is_unavailable_and_gets_no_objects(store: LocalObjectStore,
                                                                 tmp_path: Path) -> None:
    """An unmounted volume leaves its empty mount point behind: that folder has
    no objects because it is not the store, not because they are missing."""
    verified = store.put(KEY, VIDEO, content_type="video/mp4")
    store.root.rename(tmp_path / "volume")
    store.root.mkdir()

    for call in every_read(store, verified, tmp_path):
        with pytest.raises(StorageUnavailable, match="mounted"):
            call()
    assert list(store.root.iterdir()) == [], "something was written into the mount point"


def test_reconcile_and_complete_change_nothing_while_the_folder_is_gone(
        store: LocalObjectStore, tmp_path: Path) -> None:
    clock = ManualClock()
    flow = JobFlow(store=InMemoryJobStore(), objects=store, clock=clock,
                   policy=UploadPolicy(upload_ttl_seconds=60))
    waiting = flow.initiate_upload("owner-1", content_type="video/mp4")
    deliver(waiting, VIDEO)
    store.root.rename(tmp_path / "away")
    clock.advance(61)  # the deadline passed: only a valid object can save the job

    with pytest.raises(StorageUnavailable):
        flow.complete_upload(waiting.job_id)
    report = flow.reconcile()

    assert report.unavailable == (waiting.job_id,) and report.expired == ()
    assert flow.get(waiting.job_id).status is JobStatus.AWAITING_UPLOAD
    (tmp_path / "away").rename(store.root)
    assert flow.reconcile().adopted == (waiting.job_id,)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any folder whatever its mode")
def test_an_unreadable_folder_is_unavailable(store: LocalObjectStore, tmp_path: Path) -> None:
    verified = store.put(KEY, VIDEO, content_type="video/mp4")
    store.root.chmod(0)
    try:
        for call in every_read(store, verified, tmp_path):
            with pytest.raises(StorageUnavailable):
                call()
    finally:
        store.root.chmod(0o755)
    assert store.head(KEY) == verified
