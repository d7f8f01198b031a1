"""S3 end to end over real HTTP: moto's server on 127.0.0.1 and a real HTTP client
doing what a browser does with an upload ticket.

moto does not check signatures, sizes or checksums of presigned requests, so
the unhappy paths here prove jobflow's own checks on ``complete_upload``.
Faults (403, 500, SlowDown, broken connections) are injected into the boto3
client's ``before-send`` event, after retries are configured, so they go
through botocore's real retry and parsing code.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import attrs
import boto3
import pytest
import requests
from botocore.awsrequest import AWSRequest, AWSResponse
from botocore.exceptions import ConnectionClosedError, ReadTimeoutError
from structlog.testing import capture_logs

from jobflow import JobFlow, JobStatus, ReconcileReport, UploadPolicy, UploadTicket
from jobflow.adapters.memory import InMemoryJobStore
from jobflow.adapters.s3 import S3ObjectStore, UploadMethod
from jobflow.errors import (
    ConfigurationError,
    InvalidInput,
    JobNotFound,
    ObjectChanged,
    StoragePermissionDenied,
    StorageUnavailable,
    UploadMissing,
    UploadRejected,
)
from jobflow.models import Job, JobEvent
from tests.fake_aws import (
    REGION,
    remove_aws_credentials,
    silent_endpoint,
    use_fake_aws_credentials,
)

BUCKET = "jobflow-uploads"
PREFIX = "app-a/"
VIDEO = b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4
POLICY = UploadPolicy(max_bytes=4096, upload_ttl_seconds=900)
METHODS: list[UploadMethod] = ["PUT", "POST"]


# -- the server and the stores ------------------------------------------------------------


@pytest.fixture(scope="module")
def boto3_session() -> boto3.session.Session:
    """One session for the module: building clients from it is cheap. Its
    credentials are resolved on first use, from the fake ones below."""
    return boto3.session.Session()


@pytest.fixture
def admin(moto_endpoint: str, boto3_session: boto3.session.Session,
          monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """A plain boto3 client, to set the scene and inspect the bucket from outside."""
    use_fake_aws_credentials(monkeypatch, tmp_path)
    requests.post(f"{moto_endpoint}/moto-api/reset", timeout=10).raise_for_status()
    client = boto3_session.client("s3", region_name=REGION, endpoint_url=moto_endpoint)
    client.create_bucket(Bucket=BUCKET)
    return client


MakeStore = Callable[..., S3ObjectStore]


@pytest.fixture
def make_store(moto_endpoint: str, boto3_session: boto3.session.Session,
               admin: Any) -> MakeStore:
    """S3 stores on the server; one retry, so injected faults stay fast."""
    def make(**options: Any) -> S3ObjectStore:
        settings: dict[str, Any] = {
            "bucket": BUCKET, "endpoint_url": moto_endpoint, "region": REGION,
            "addressing_style": "path", "prefix": PREFIX, "max_attempts": 2,
            "connect_timeout": 2.0, "read_timeout": 5.0, "session": boto3_session,
            **options}
        return S3ObjectStore(**settings)
    return make


def make_flow(objects: S3ObjectStore, policy: UploadPolicy = POLICY) -> JobFlow:
    return JobFlow(store=InMemoryJobStore(), objects=objects, policy=policy)


def bucket_keys(admin: Any) -> list[str]:
    return [item["Key"] for item in admin.list_objects_v2(Bucket=BUCKET).get("Contents", [])]


# -- what a browser does -------------------------------------------------------------------


def browser_upload(ticket: UploadTicket, data: bytes, *,
                   headers: dict[str, str] | None = None,
                   content_type: str | None = None) -> requests.Response:
    """Send ``data`` as the ticket says: a PUT with its headers, or a multipart
    POST with its form fields and the file last. ``headers`` / ``content_type``
    let a test play a client that does not follow the ticket."""
    if ticket.method == "PUT":
        sent = dict(ticket.headers if headers is None else headers)
        if content_type is not None:
            sent["Content-Type"] = content_type
        response = requests.put(ticket.url, data=data, headers=sent, timeout=10)
    else:
        fields = dict(ticket.fields)
        if content_type is not None:
            fields["Content-Type"] = content_type
        response = requests.post(
            ticket.url, data=fields,
            files={"file": ("clip.mp4", data, fields["Content-Type"])}, timeout=10)
    assert response.status_code in (200, 204), response.text
    return response


@attrs.frozen
class Snapshot:
    job: Job
    history: list[JobEvent]


def snapshot(flow: JobFlow, job_id: str) -> Snapshot:
    return Snapshot(job=flow.get(job_id), history=flow.history(job_id))


# -- the happy path ------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_browser_upload_then_complete_queues_the_job(make_store: MakeStore, admin: Any,
                                                     method: UploadMethod) -> None:
    flow = make_flow(make_store(upload_method=method))
    ticket = flow.initiate_upload("owner-1", {"title": "clip"}, content_type="video/mp4")
    assert ticket.method == method
    assert ticket.key.startswith("uploads/")

    browser_upload(ticket, VIDEO)
    job = flow.complete_upload(ticket.job_id, owner_id="owner-1")

    assert job.status is JobStatus.QUEUED
    assert job.object_size == len(VIDEO)
    assert job.object_etag == '"' + hashlib.md5(VIDEO, usedforsecurity=False).hexdigest() + '"'
    verified = flow.history(ticket.job_id)[-1]
    assert verified.event.value == "verify_upload"
    assert verified.detail["size"] == len(VIDEO)
    assert bucket_keys(admin) == [PREFIX + ticket.key]
    [claim] = flow.claim("worker-1")
    assert claim.job.id == ticket.job_id


def test_a_declared_sha256_is_verified_and_recorded(make_store: MakeStore) -> None:
    flow = make_flow(make_store(upload_method="PUT"))
    sha256 = hashlib.sha256(VIDEO).hexdigest()
    ticket = flow.initiate_upload("owner-1", content_type="video/mp4", sha256=sha256)
    assert ticket.headers["x-amz-checksum-sha256"] == base64.b64encode(
        hashlib.sha256(VIDEO).digest()).decode()

    browser_upload(ticket, VIDEO)
    job = flow.complete_upload(ticket.job_id)

    assert job.status is JobStatus.QUEUED
    assert job.object_sha256 == sha256
    assert flow.history(job.id)[-1].detail["sha256"] == sha256


def test_the_put_url_signs_the_content_type_and_the_checksum(make_store: MakeStore) -> None:
    store = make_store(upload_method="PUT")
    presigned = store.presign_upload("uploads/x", content_type="video/mp4", expires_in=900,
                                     min_bytes=1, max_bytes=4096, sha256="ab" * 32)

    query = parse_qs(urlsplit(presigned.url).query)
    signed = query["X-Amz-SignedHeaders"][0].split(";")
    assert {"content-type", "x-amz-checksum-sha256", "host"} <= set(signed)
    assert query["X-Amz-Expires"] == ["900"]
    assert urlsplit(presigned.url).path == f"/{BUCKET}/{PREFIX}uploads/x"


def test_the_post_policy_pins_key_type_size_and_checksum(make_store: MakeStore) -> None:
    store = make_store(upload_method="POST")
    checksum = base64.b64encode(bytes.fromhex("cd" * 32)).decode()
    presigned = store.presign_upload("uploads/x", content_type="video/mp4", expires_in=900,
                                     min_bytes=1, max_bytes=4096, sha256="cd" * 32)

    policy = json.loads(base64.b64decode(presigned.fields["policy"]))
    conditions = policy["conditions"]
    assert {"key": f"{PREFIX}uploads/x"} in conditions
    assert {"bucket": BUCKET} in conditions
    assert {"Content-Type": "video/mp4"} in conditions
    assert ["content-length-range", 1, 4096] in conditions
    assert {"x-amz-checksum-sha256": checksum} in conditions
    assert presigned.fields["key"] == f"{PREFIX}uploads/x"
    assert presigned.fields["x-amz-checksum-sha256"] == checksum
    assert not any(isinstance(c, list) and c[0] == "starts-with" for c in conditions)


# -- unhappy paths: each leaves the job where DESIGN.md §3 says ----------------------------


@pytest.mark.parametrize("method", METHODS)
def test_complete_before_upload_keeps_the_job_waiting(make_store: MakeStore,
                                                      method: UploadMethod) -> None:
    flow = make_flow(make_store(upload_method=method))
    ticket = flow.initiate_upload("owner-1", content_type="video/mp4")

    with pytest.raises(UploadMissing):
        flow.complete_upload(ticket.job_id)
    assert flow.get(ticket.job_id).status is JobStatus.AWAITING_UPLOAD
    assert flow.claim("worker-1") == []

    browser_upload(ticket, VIDEO)
    assert flow.complete_upload(ticket.job_id).status is JobStatus.QUEUED


def _rejected(flow: JobFlow, ticket: UploadTicket, reason: str) -> None:
    with pytest.raises(UploadRejected, match=reason):
        flow.complete_upload(ticket.job_id)
    job = flow.get(ticket.job_id)
    assert job.status is JobStatus.FAILED
    assert job.error_code == "upload_rejected"
    assert job.upload_verified_at is None
    assert flow.history(ticket.job_id)[-1].event.value == "reject_upload"
    assert flow.claim("worker-1") == []


@pytest.mark.parametrize("method", METHODS)
def test_an_empty_upload_is_rejected(make_store: MakeStore, method: UploadMethod) -> None:
    flow = make_flow(make_store(upload_method=method))
    ticket = flow.initiate_upload("owner-1", content_type="video/mp4")

    browser_upload(ticket, b"")

    _rejected(flow, ticket, "empty")


@pytest.mark.parametrize("method", METHODS)
def test_a_too_large_upload_is_rejected(make_store: MakeStore, method: UploadMethod) -> None:
    flow = make_flow(make_store(upload_method=method))
    ticket = flow.initiate_upload("owner-1", content_type="video/mp4")

    browser_upload(ticket, b"x" * (POLICY.max_bytes + 1))

    _rejected(flow, ticket, "above the limit")


@pytest.mark.parametrize("method", METHODS)
def test_an_upload_of_the_wrong_content_type_is_rejected(make_store: MakeStore,
                                                         method: UploadMethod) -> None:
    flow = make_flow(make_store(upload_method=method))
    ticket = flow.initiate_upload("owner-1", content_type="video/mp4")

    browser_upload(ticket, VIDEO, content_type="text/html")

    _rejected(flow, ticket, "content type")


def test_an_allowed_but_undeclared_content_type_is_rejected(make_store: MakeStore) -> None:
    flow = make_flow(make_store())
    ticket = flow.initiate_upload("owner-1", content_type="video/mp4")

    browser_upload(ticket, VIDEO, content_type="video/quicktime")

    _rejected(flow, ticket, "differs from the declared")


def test_a_checksum_that_differs_from_the_declared_one_is_rejected(
        make_store: MakeStore) -> None:
    flow = make_flow(make_store())
    ticket = flow.initiate_upload("owner-1", content_type="video/mp4",
                                  sha256=hashlib.sha256(VIDEO).hexdigest())
    other = VIDEO[::-1]
    # The client sends other bytes with their own checksum (S3 itself would
    # refuse the altered signed header; moto does not check signatures).
    headers = {**ticket.headers,
               "x-amz-checksum-sha256": base64.b64encode(hashlib.sha256(other).digest()).decode()}

    browser_upload(ticket, other, headers=headers)

    _rejected(flow, ticket, "SHA-256 checksum does not match")


def test_a_declared_checksum_the_store_does_not_report_is_rejected(
        make_store: MakeStore) -> None:
    flow = make_flow(make_store())
    ticket = flow.initiate_upload("owner-1", content_type="video/mp4",
                                  sha256=hashlib.sha256(VIDEO).hexdigest())
    # Something on the way dropped the checksum headers.
    headers = {"Content-Type": "video/mp4"}

    browser_upload(ticket, VIDEO, headers=headers)

    _rejected(flow, ticket, "reports no checksum")


def test_rejected_uploads_are_deleted_when_the_policy_says_so(make_store: MakeStore,
                                                              admin: Any) -> None:
    policy = attrs.evolve(POLICY, delete_rejected_uploads=True)
    flow = make_flow(make_store(), policy)
    ticket = flow.initiate_upload("owner-1", content_type="video/mp4")
    browser_upload(ticket, b"x" * (POLICY.max_bytes + 1))

    with pytest.raises(UploadRejected):
        flow.complete_upload(ticket.job_id)

    assert bucket_keys(admin) == []
    assert flow.get(ticket.job_id).status is JobStatus.FAILED


def test_an_object_replaced_after_verification_is_not_processed(make_store: MakeStore,
                                                                tmp_path: Path) -> None:
    store = make_store()
    flow = make_flow(store)
    ticket = flow.initiate_upload("owner-1", content_type="video/mp4")
    browser_upload(ticket, VIDEO)
    flow.complete_upload(ticket.job_id)

    browser_upload(ticket, VIDEO[::-1])  # the URL is still valid: the client uploads again
    [claim] = flow.claim("worker-1")
    expected = claim.job.verified_object
    assert expected is not None

    with pytest.raises(ObjectChanged):
        store.open(claim.job.key, expected=expected)
    with pytest.raises(ObjectChanged):
        store.download(claim.job.key, tmp_path / "video.mp4", expected=expected)
    assert not (tmp_path / "video.mp4").exists()


def test_a_versioned_bucket_serves_exactly_the_verified_version(make_store: MakeStore,
                                                                admin: Any) -> None:
    admin.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
    store = make_store()
    flow = make_flow(store)
    ticket = flow.initiate_upload("owner-1", content_type="video/mp4")
    browser_upload(ticket, VIDEO)
    job = flow.complete_upload(ticket.job_id)
    assert job.object_version_id

    browser_upload(ticket, VIDEO[::-1])
    [claim] = flow.claim("worker-1")
    assert claim.job.verified_object is not None

    with store.open(claim.job.key, expected=claim.job.verified_object) as stream:
        assert stream.read() == VIDEO
    admin.delete_object(Bucket=BUCKET, Key=PREFIX + job.key, VersionId=job.object_version_id)
    with pytest.raises(ObjectChanged):
        store.open(claim.job.key, expected=claim.job.verified_object)


# -- injected S3 faults: named error, no job changed ----------------------------------------


class _CannedBody:
    """The ``raw`` of a canned botocore response."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self._data


@attrs.define
class FaultInjector:
    """Answers an S3 operation with a fault instead of sending it, counting calls."""

    status: int = 500
    code: str = "InternalError"
    exception: Callable[[], Exception] | None = None
    calls: int = 0

    def install(self, store: S3ObjectStore, operation: str) -> FaultInjector:
        injector = attrs.evolve(self)  # a fresh counter per installation
        store.client.meta.events.register(f"before-send.s3.{operation}", injector.answer)
        return injector

    def answer(self, request: AWSRequest, **_: Any) -> AWSResponse:
        self.calls += 1
        if self.exception is not None:
            raise self.exception()
        # Like S3: errors to HEAD requests have no body, others carry XML.
        body = b"" if request.method == "HEAD" else (
            f"<Error><Code>{self.code}</Code><Message>injected</Message></Error>".encode())
        return AWSResponse(request.url, self.status, {"Content-Type": "application/xml"},
                           _CannedBody(body))


#: fault -> (how to inject it, the error jobflow raises, HTTP attempts with one retry)
FAULTS: dict[str, tuple[FaultInjector, type[Exception], int]] = {
    "403": (FaultInjector(status=403, code="AccessDenied"), StoragePermissionDenied, 1),
    "500": (FaultInjector(status=500, code="InternalError"), StorageUnavailable, 2),
    "SlowDown": (FaultInjector(status=503, code="SlowDown"), StorageUnavailable, 2),
    "connection-closed": (
        FaultInjector(exception=lambda: ConnectionClosedError(endpoint_url="http://s3")),
        StorageUnavailable, 2),
    "read-timeout": (
        FaultInjector(exception=lambda: ReadTimeoutError(endpoint_url="http://s3")),
        StorageUnavailable, 2),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_fault_on_complete_changes_no_job(make_store: MakeStore, fault: str) -> None:
    fault_injector, error, calls = FAULTS[fault]
    store = make_store()
    flow = make_flow(store)
    ticket = flow.initiate_upload("owner-1", content_type="video/mp4")
    browser_upload(ticket, VIDEO)
    before = snapshot(flow, ticket.job_id)
    injector = fault_injector.install(store, "HeadObject")

    with pytest.raises(error) as raised:
        flow.complete_upload(ticket.job_id)

    assert type(raised.value) is error
    assert injector.calls == calls  # 5xx and broken connections were retried, 403 not
    assert snapshot(flow, ticket.job_id) == before


def test_a_permission_error_says_what_is_wrong(make_store: MakeStore) -> None:
    store = make_store()
    FaultInjector(status=403, code="AccessDenied").install(store, "HeadObject")

    with pytest.raises(StoragePermissionDenied, match="credentials or the bucket policy"):
        store.head("uploads/x")


@pytest.mark.parametrize("fault", ["500", "SlowDown", "connection-closed"])
def test_a_fault_on_the_workers_read_is_unavailable(make_store: MakeStore, fault: str) -> None:
    fault_injector, error, _ = FAULTS[fault]
    store = make_store()
    flow = make_flow(store)
    ticket = flow.initiate_upload("owner-1", content_type="video/mp4")
    browser_upload(ticket, VIDEO)
    flow.complete_upload(ticket.job_id)
    [claim] = flow.claim("worker-1")
    fault_injector.install(store, "GetObject")

    with pytest.raises(error):
        store.open(claim.job.key, expected=claim.job.verified_object)
    assert flow.get(ticket.job_id) == claim.job


def test_one_transient_fault_is_absorbed_by_retries(make_store: MakeStore) -> None:
    store = make_store()
    flow = make_flow(store)
    ticket = flow.initiate_upload("owner-1", content_type="video/mp4")
    browser_upload(ticket, VIDEO)
    injector = FaultInjector(status=503, code="SlowDown")

    def first_call_only(request: AWSRequest, **kwargs: Any) -> AWSResponse | None:
        return injector.answer(request, **kwargs) if injector.calls == 0 else None

    store.client.meta.events.register("before-send.s3.HeadObject", first_call_only)

    assert flow.complete_upload(ticket.job_id).status is JobStatus.QUEUED
    assert injector.calls == 1


def test_a_failed_delete_of_a_rejected_upload_does_not_undo_the_rejection(
        make_store: MakeStore, admin: Any) -> None:
    store = make_store()
    flow = make_flow(store, attrs.evolve(POLICY, delete_rejected_uploads=True))
    ticket = flow.initiate_upload("owner-1", content_type="video/mp4")
    browser_upload(ticket, b"")
    FaultInjector(status=503, code="SlowDown").install(store, "DeleteObject")

    with capture_logs() as logs, pytest.raises(UploadRejected):
        flow.complete_upload(ticket.job_id)

    assert flow.get(ticket.job_id).status is JobStatus.FAILED
    assert bucket_keys(admin) == [PREFIX + ticket.key]
    [warning] = [log for log in logs if log["event"] == "upload.delete_failed"]
    assert warning["job_id"] == ticket.job_id


# -- bad input and bad configuration ---------------------------------------------------------


@pytest.mark.parametrize("owner_id", ["a/b", "../../etc", "..", "owner/../../x"])
def test_owner_ids_are_only_data(make_store: MakeStore, admin: Any, owner_id: str) -> None:
    flow = make_flow(make_store())
    ticket = flow.initiate_upload(owner_id, content_type="video/mp4")
    browser_upload(ticket, VIDEO)

    assert flow.complete_upload(ticket.job_id, owner_id=owner_id).owner_id == owner_id
    assert bucket_keys(admin) == [f"{PREFIX}uploads/{ticket.job_id}"]
    with pytest.raises(JobNotFound):
        flow.get(ticket.job_id, owner_id="someone-else")


@pytest.mark.parametrize("owner_id", ["nul\x00owner", "o" * 2000, ""])
def test_unusable_owner_ids_are_refused(make_store: MakeStore, admin: Any,
                                        owner_id: str) -> None:
    flow = make_flow(make_store())

    with pytest.raises(InvalidInput):
        flow.initiate_upload(owner_id, content_type="video/mp4")
    assert flow.counts()[JobStatus.AWAITING_UPLOAD] == 0
    assert bucket_keys(admin) == []


@pytest.mark.parametrize("job_id", ["../uploads/x", "a/b", "\x00", "j" * 2000, ".."])
def test_job_ids_that_are_paths_find_no_job(make_store: MakeStore, job_id: str) -> None:
    flow = make_flow(make_store())

    with pytest.raises(JobNotFound):
        flow.complete_upload(job_id)


@pytest.mark.parametrize("key", ["../outside", "/absolute", "uploads/../../x", "nul\x00",
                                 "k" * 2000])
def test_bad_keys_write_nothing(make_store: MakeStore, admin: Any, key: str) -> None:
    store = make_store()

    with pytest.raises(InvalidInput):
        store.put(key, VIDEO, content_type="video/mp4")
    with pytest.raises(InvalidInput):
        store.presign_upload(key, content_type="video/mp4", expires_in=60, min_bytes=1,
                             max_bytes=10)
    assert bucket_keys(admin) == []


def test_keys_stay_under_the_prefix(make_store: MakeStore, admin: Any) -> None:
    store = make_store(prefix="tenant/app")
    store.put("uploads/a", b"1", content_type="video/mp4")
    store.put("a/b/c", b"2", content_type="video/mp4")

    assert sorted(bucket_keys(admin)) == ["tenant/app/a/b/c", "tenant/app/uploads/a"]
    head = store.head("uploads/a")
    assert head is not None and head.key == "uploads/a"


@pytest.mark.parametrize("prefix", ["/abs", "../up", "a//b", "a/../b"])
def test_an_escaping_prefix_is_a_configuration_error(make_store: MakeStore,
                                                     prefix: str) -> None:
    with pytest.raises(ConfigurationError):
        make_store(prefix=prefix)


def test_a_bucket_name_boto3_rejects_is_a_configuration_error(make_store: MakeStore) -> None:
    store = make_store(bucket="not/a bucket")
    flow = make_flow(store)

    with pytest.raises(ConfigurationError, match="bucket"):
        flow.initiate_upload("owner-1", content_type="video/mp4")
    with pytest.raises(ConfigurationError):
        store.head("uploads/x")
    assert sum(flow.counts().values()) == 0


def test_a_missing_bucket_is_not_a_missing_upload(make_store: MakeStore) -> None:
    store = make_store(bucket="no-such-bucket")
    flow = make_flow(store)
    ticket = flow.initiate_upload("owner-1", content_type="video/mp4")

    with pytest.raises(ConfigurationError, match="does not exist"):
        flow.complete_upload(ticket.job_id)
    assert flow.get(ticket.job_id).status is JobStatus.AWAITING_UPLOAD


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_an_endpoint_that_refuses_connections_is_unavailable(make_store: MakeStore) -> None:
    good = make_store()
    flow = make_flow(good)
    ticket = flow.initiate_upload("owner-1", content_type="video/mp4")
    browser_upload(ticket, VIDEO)
    before = snapshot(flow, ticket.job_id)
    flow.objects = make_store(endpoint_url=f"http://127.0.0.1:{_closed_port()}")

    with pytest.raises(StorageUnavailable):
        flow.complete_upload(ticket.job_id)
    with pytest.raises(StorageUnavailable):
        flow.objects.open(ticket.key)
    assert snapshot(flow, ticket.job_id) == before


def test_an_endpoint_that_never_answers_is_unavailable_within_its_timeouts(
        make_store: MakeStore) -> None:
    """A hung S3 (it accepts connections, then says nothing) costs each call at
    most its read timeout per try: then StorageUnavailable, nothing changed."""
    good = make_store()
    flow = make_flow(good)
    ticket = flow.initiate_upload("owner-1", content_type="video/mp4")
    browser_upload(ticket, VIDEO)
    before = snapshot(flow, ticket.job_id)

    with silent_endpoint() as url:
        flow.objects = make_store(endpoint_url=url, read_timeout=0.5, max_attempts=2)
        started = time.monotonic()
        with pytest.raises(StorageUnavailable, match="timeout"):
            flow.complete_upload(ticket.job_id)
        with pytest.raises(StorageUnavailable):
            flow.objects.open(ticket.key)
        assert time.monotonic() - started < 10  # 2 calls x 2 tries x 0.5 s, and backoff
    assert snapshot(flow, ticket.job_id) == before


def test_reconcile_rescues_a_dead_workers_job_while_s3_hangs(make_store: MakeStore) -> None:
    """A hung S3 and one waiting upload: the expired lease is rescued at once,
    not after the upload's check times out, and the upload is left waiting."""
    flow = make_flow(make_store(), attrs.evolve(POLICY, lease_seconds=0.2,
                                                adopt_after_seconds=0))
    dead = flow.initiate_upload("owner-1", content_type="video/mp4")
    browser_upload(dead, VIDEO)
    flow.complete_upload(dead.job_id)
    flow.claim("dead-worker")
    waiting = flow.initiate_upload("owner-1", content_type="video/mp4")
    browser_upload(waiting, VIDEO)
    before = snapshot(flow, waiting.job_id)
    time.sleep(0.3)  # the dead worker's lease runs out

    with silent_endpoint() as url:
        flow.objects = make_store(endpoint_url=url, read_timeout=3.0, max_attempts=2)
        reports: list[ReconcileReport] = []
        thread = threading.Thread(target=lambda: reports.append(flow.reconcile()))
        thread.start()
        give_up = time.monotonic() + 3.0  # well before the upload's check times out
        while flow.get(dead.job_id).status is not JobStatus.QUEUED:
            assert time.monotonic() < give_up, "the rescue waited behind the hung S3"
            time.sleep(0.01)
        assert thread.is_alive(), "the upload's check did not even reach the hung S3"
        thread.join(30)

    [report] = reports
    assert report.rescued == (dead.job_id,)
    assert report.unavailable == (waiting.job_id,) and report.expired == ()
    assert snapshot(flow, waiting.job_id) == before


def test_missing_credentials_are_a_configuration_error(make_store: MakeStore,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    flow = make_flow(make_store())
    ticket = flow.initiate_upload("owner-1", content_type="video/mp4")
    browser_upload(ticket, VIDEO)
    before = snapshot(flow, ticket.job_id)
    remove_aws_credentials(monkeypatch)
    flow.objects = make_store(session=boto3.session.Session())  # nothing cached

    with pytest.raises(ConfigurationError, match="credentials"):
        flow.complete_upload(ticket.job_id)
    with pytest.raises(ConfigurationError, match="credentials"):
        flow.initiate_upload("owner-1", content_type="video/mp4")
    assert snapshot(flow, ticket.job_id) == before
    assert flow.counts()[JobStatus.AWAITING_UPLOAD] == 1


def test_a_ttl_beyond_what_s3_signs_is_a_configuration_error(make_store: MakeStore) -> None:
    flow = make_flow(make_store(), attrs.evolve(POLICY, upload_ttl_seconds=8 * 24 * 3600))

    with pytest.raises(ConfigurationError, match="expire"):
        flow.initiate_upload("owner-1", content_type="video/mp4")
