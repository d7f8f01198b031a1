"""One ObjectStore contract, run against every adapter: memory, a local folder,
and S3 (moto, in-process) with and without versioning, presigned PUT and POST.

Where adapters legitimately differ, the difference is a named capability of
the subject under test, and each test asserts the exact answer for it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import attrs
import pytest
import requests
from moto import mock_aws

from jobflow.adapters.localfs import LocalObjectStore, deliver
from jobflow.adapters.memory import InMemoryObjectStore
from jobflow.adapters.s3 import S3ObjectStore
from jobflow.errors import InvalidInput, ObjectChanged
from jobflow.models import ObjectInfo, PresignedUpload
from jobflow.ports import ObjectStore
from tests.fake_aws import REGION, use_fake_aws_credentials

KEY = "uploads/6f1d1c3e-3b89-4f7e-9a59-1f1c2a7e5b10"
DATA = b"\x00\x00\x00\x18ftypmp42 not really a video"
CONTENT_TYPE = "video/mp4"

Deliver = Callable[[PresignedUpload, bytes], None]


@attrs.frozen
class Subject:
    """An adapter under test, how a client performs its presigned uploads, and
    what it can legitimately do differently."""

    store: ObjectStore
    deliver: Deliver
    #: Reads of a verified object return that version even after it was
    #: replaced or deleted (a versioned bucket), instead of ObjectChanged.
    keeps_versions: bool = False
    #: Rewriting the same bytes counts as a change (fresh version id per write).
    identical_rewrite_is_change: bool = True
    #: The presigned upload carries the declared SHA-256 to the store, which
    #: then reports it. moto ignores checksum fields in POST forms.
    stores_presigned_checksum: bool = True


def _deliver_to_memory(store: InMemoryObjectStore) -> Deliver:
    def upload(presigned: PresignedUpload, data: bytes) -> None:
        # The in-memory store's "URL" is memory://<bucket>/<key>; a client of it
        # is code in the same process that writes what the ticket allows.
        url = urlsplit(presigned.url)
        assert (url.scheme, url.netloc) == ("memory", store.bucket)
        store.put(url.path.lstrip("/"), data, content_type=presigned.headers["Content-Type"])
    return upload


def _deliver_to_local(presigned: PresignedUpload, data: bytes) -> None:
    deliver(presigned, data)


def _deliver_over_http(presigned: PresignedUpload, data: bytes) -> None:
    """What a browser does with the ticket (moto intercepts the request in-process)."""
    if presigned.method == "PUT":
        response = requests.put(presigned.url, data=data, headers=presigned.headers, timeout=10)
    else:
        response = requests.post(
            presigned.url, data=presigned.fields,
            files={"file": ("upload.mp4", data, presigned.fields["Content-Type"])}, timeout=10)
    assert response.status_code in (200, 204), response.text


SUBJECTS = ["memory", "local", "s3", "s3-versioned", "s3-post"]


@pytest.fixture(params=SUBJECTS)
def subject(request: pytest.FixtureRequest, tmp_path: Path,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[Subject]:
    kind = request.param
    if kind == "memory":
        memory = InMemoryObjectStore()
        yield Subject(store=memory, deliver=_deliver_to_memory(memory))
        return
    if kind == "local":
        yield Subject(store=LocalObjectStore(tmp_path / "objects"), deliver=_deliver_to_local)
        return
    use_fake_aws_credentials(monkeypatch, tmp_path)
    with mock_aws():
        s3 = S3ObjectStore(bucket="jobflow-contract", region=REGION, prefix="tenant-a/",
                           upload_method="POST" if kind == "s3-post" else "PUT")
        s3.client.create_bucket(Bucket="jobflow-contract")
        if kind == "s3-versioned":
            s3.client.put_bucket_versioning(
                Bucket="jobflow-contract", VersioningConfiguration={"Status": "Enabled"})
        yield Subject(store=s3, deliver=_deliver_over_http,
                      keeps_versions=kind == "s3-versioned",
                      # Without versions S3 can only pin the ETag, i.e. the bytes.
                      identical_rewrite_is_change=False,
                      stores_presigned_checksum=kind != "s3-post")


def _md5_etag(data: bytes) -> str:
    return '"' + hashlib.md5(data, usedforsecurity=False).hexdigest() + '"'


# -- put and head --------------------------------------------------------------------------


def test_head_reports_what_put_wrote(subject: Subject) -> None:
    written = subject.store.put(KEY, DATA, content_type=CONTENT_TYPE)

    assert subject.store.head(KEY) == written
    assert written.key == KEY
    assert written.size == len(DATA)
    assert written.content_type == CONTENT_TYPE
    assert written.etag == _md5_etag(DATA)
    assert written.sha256 == hashlib.sha256(DATA).hexdigest()
    if subject.keeps_versions:
        assert written.version_id


def test_head_of_a_missing_object_is_none(subject: Subject) -> None:
    assert subject.store.head(KEY) is None


def test_a_rewrite_gets_new_metadata(subject: Subject) -> None:
    first = subject.store.put(KEY, DATA, content_type=CONTENT_TYPE)
    second = subject.store.put(KEY, b"other bytes", content_type="video/quicktime")

    assert subject.store.head(KEY) == second
    assert second.etag != first.etag
    assert (second.size, second.content_type) == (len(b"other bytes"), "video/quicktime")


def test_an_empty_object_is_an_object(subject: Subject) -> None:
    written = subject.store.put(KEY, b"", content_type=CONTENT_TYPE)

    head = subject.store.head(KEY)
    assert head == written
    assert head is not None and head.size == 0


def test_bucket_is_named(subject: Subject) -> None:
    assert isinstance(subject.store.bucket, str) and subject.store.bucket


# -- delete --------------------------------------------------------------------------------


def test_delete_removes_the_object_and_is_idempotent(subject: Subject) -> None:
    subject.store.put(KEY, DATA, content_type=CONTENT_TYPE)

    subject.store.delete(KEY)
    assert subject.store.head(KEY) is None
    subject.store.delete(KEY)
    subject.store.delete("uploads/never-written")
    assert subject.store.head(KEY) is None


# -- reading exactly the verified object -----------------------------------------------------


def test_open_reads_the_verified_object(subject: Subject) -> None:
    verified = subject.store.put(KEY, DATA, content_type=CONTENT_TYPE)

    with subject.store.open(KEY, expected=verified) as stream:
        assert stream.read(5) == DATA[:5]
        assert stream.read() == DATA[5:]
    with subject.store.open(KEY) as stream:
        assert stream.read() == DATA


def test_download_writes_the_verified_object(subject: Subject, tmp_path: Path) -> None:
    verified = subject.store.put(KEY, DATA, content_type=CONTENT_TYPE)
    dest = tmp_path / "download.mp4"

    assert subject.store.download(KEY, dest, expected=verified) == dest
    assert dest.read_bytes() == DATA
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")] == []


def test_a_replaced_object_is_never_read_as_the_verified_one(
        subject: Subject, tmp_path: Path) -> None:
    verified = subject.store.put(KEY, DATA, content_type=CONTENT_TYPE)
    subject.store.put(KEY, b"replacement bytes", content_type=CONTENT_TYPE)
    dest = tmp_path / "download.mp4"

    if subject.keeps_versions:
        with subject.store.open(KEY, expected=verified) as stream:
            assert stream.read() == DATA
        subject.store.download(KEY, dest, expected=verified)
        assert dest.read_bytes() == DATA
    else:
        with pytest.raises(ObjectChanged):
            subject.store.open(KEY, expected=verified)
        with pytest.raises(ObjectChanged):
            subject.store.download(KEY, dest, expected=verified)
        assert not dest.exists()


def test_a_rewrite_with_identical_bytes(subject: Subject) -> None:
    verified = subject.store.put(KEY, DATA, content_type=CONTENT_TYPE)
    subject.store.put(KEY, DATA, content_type=CONTENT_TYPE)

    if subject.identical_rewrite_is_change:
        with pytest.raises(ObjectChanged):
            subject.store.open(KEY, expected=verified)
    else:  # the ETag (or version) still pins exactly the verified bytes
        with subject.store.open(KEY, expected=verified) as stream:
            assert stream.read() == DATA


def test_a_deleted_object_is_reported_changed(subject: Subject, tmp_path: Path) -> None:
    verified = subject.store.put(KEY, DATA, content_type=CONTENT_TYPE)
    subject.store.delete(KEY)

    with pytest.raises(ObjectChanged):
        subject.store.open(KEY)
    if subject.keeps_versions:
        with subject.store.open(KEY, expected=verified) as stream:
            assert stream.read() == DATA
    else:
        with pytest.raises(ObjectChanged):
            subject.store.open(KEY, expected=verified)
        with pytest.raises(ObjectChanged):
            subject.store.download(KEY, tmp_path / "gone.mp4", expected=verified)


def test_a_stale_expectation_is_refused(subject: Subject) -> None:
    subject.store.put(KEY, DATA, content_type=CONTENT_TYPE)
    stale = ObjectInfo(key=KEY, size=len(DATA), content_type=CONTENT_TYPE,
                       etag='"00000000000000000000000000000000"')

    with pytest.raises(ObjectChanged):
        subject.store.open(KEY, expected=stale)


def test_open_of_a_missing_object_is_object_changed(subject: Subject) -> None:
    with pytest.raises(ObjectChanged):
        subject.store.open(KEY)


# -- keys ------------------------------------------------------------------------------------

BAD_KEYS = ["", "/etc/passwd", "../outside", "uploads/../../outside", "uploads/./x",
            "uploads//x", "uploads/x/", "..", "nul\x00byte", "back\\slash", "k" * 2000]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_bad_keys_are_refused_by_every_operation(subject: Subject, key: str,
                                                 tmp_path: Path) -> None:
    store = subject.store
    operations: list[Callable[[], object]] = [
        lambda: store.put(key, DATA, content_type=CONTENT_TYPE),
        lambda: store.head(key),
        lambda: store.open(key),
        lambda: store.download(key, tmp_path / "dest"),
        lambda: store.delete(key),
        lambda: store.presign_upload(key, content_type=CONTENT_TYPE, expires_in=60,
                                     min_bytes=1, max_bytes=1024),
    ]
    for operation in operations:
        with pytest.raises(InvalidInput):
            operation()
    assert not (tmp_path / "dest").exists()


# -- presigned uploads -----------------------------------------------------------------------


def test_a_presigned_upload_is_usable(subject: Subject) -> None:
    presigned = subject.store.presign_upload(KEY, content_type=CONTENT_TYPE, expires_in=600,
                                             min_bytes=1, max_bytes=1024)

    assert presigned.method in ("PUT", "POST")
    subject.deliver(presigned, DATA)

    head = subject.store.head(KEY)
    assert head is not None
    assert (head.key, head.size, head.content_type) == (KEY, len(DATA), CONTENT_TYPE)
    assert head.etag == _md5_etag(DATA)
    with subject.store.open(KEY, expected=head) as stream:
        assert stream.read() == DATA


def test_a_presigned_upload_carries_the_declared_sha256(subject: Subject) -> None:
    sha256 = hashlib.sha256(DATA).hexdigest()
    presigned = subject.store.presign_upload(KEY, content_type=CONTENT_TYPE, expires_in=600,
                                             min_bytes=1, max_bytes=1024, sha256=sha256)

    subject.deliver(presigned, DATA)

    head = subject.store.head(KEY)
    assert head is not None
    if subject.stores_presigned_checksum:
        assert head.sha256 == sha256
    else:
        # A store that drops the checksum reports none, which verification
        # treats as "not verified" (see the rejection rules).
        assert head.sha256 is None
