"""Presigned uploads are Signature Version 4, whatever boto3 client the store is given.

A plain ``boto3.client("s3")`` presigns SigV2 (``AWSAccessKeyId=...&Signature=...``)
for the regions that still accept it, which every region opened since 2014
refuses. These tests run against moto's real HTTP server: the URLs a store
hands out are SigV4, the warning about the client is logged once, and the
uploads still work end to end with a real HTTP client.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import boto3
import botocore
import pytest
import requests
from botocore.config import Config
from structlog.testing import capture_logs

from jobflow import JobFlow, JobStatus, UploadPolicy
from jobflow.adapters.memory import InMemoryJobStore
from jobflow.adapters.s3 import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_READ_TIMEOUT,
    S3ObjectStore,
    UploadMethod,
    make_s3_client,
)
from jobflow.errors import ConfigurationError
from jobflow.models import PresignedUpload
from tests.fake_aws import REGION, use_fake_aws_credentials

BUCKET = "jobflow-signing"
VIDEO = b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4
POLICY = UploadPolicy(max_bytes=4096, upload_ttl_seconds=900)
SHA256 = "ab" * 32

#: name -> the config a caller might build its own client with (None: plain boto3.client)
CALLER_CONFIGS: dict[str, Config | None] = {
    "plain": None,
    "sigv2": Config(signature_version="s3"),
}


@pytest.fixture
def endpoint(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """moto's server, reset, with the bucket; fake credentials in the environment."""
    use_fake_aws_credentials(monkeypatch, tmp_path)
    requests.post(f"{moto_endpoint}/moto-api/reset", timeout=10).raise_for_status()
    boto3.client("s3", region_name=REGION, endpoint_url=moto_endpoint).create_bucket(
        Bucket=BUCKET)
    return moto_endpoint


def caller_client(endpoint: str, config: Config | None) -> Any:
    """A client as an application builds it, following boto3's own documentation."""
    return boto3.client("s3", region_name=REGION, endpoint_url=endpoint, config=config)


def presign(store: S3ObjectStore, method: UploadMethod) -> PresignedUpload:
    store._upload_method = method  # one store, both forms of upload
    return store.presign_upload("uploads/x", content_type="video/mp4", expires_in=900,
                                min_bytes=1, max_bytes=4096, sha256=SHA256)


def assert_sigv4(presigned: PresignedUpload) -> None:
    if presigned.method == "PUT":
        query = parse_qs(urlsplit(presigned.url).query)
        assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
        assert "X-Amz-Signature" in query
        assert not {"AWSAccessKeyId", "Signature"} & set(query)
    else:
        assert presigned.fields["x-amz-algorithm"] == "AWS4-HMAC-SHA256"
        assert "x-amz-signature" in presigned.fields
        assert not {"AWSAccessKeyId", "signature"} & set(presigned.fields)


def signature_warnings(logs: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [log for log in logs if log["event"] == "s3.client_signature"]


@pytest.mark.parametrize("config", list(CALLER_CONFIGS))
def test_a_caller_client_that_presigns_sigv2_yields_sigv4_uploads(endpoint: str,
                                                                  config: str) -> None:
    client = caller_client(endpoint, CALLER_CONFIGS[config])
    # The premise: on its own this client presigns SigV2.
    assert "AWSAccessKeyId=" in client.generate_presigned_url(
        "put_object", Params={"Bucket": BUCKET, "Key": "k"}, ExpiresIn=60)
    store = S3ObjectStore(bucket=BUCKET, client=client)

    with capture_logs() as logs:
        uploads = [presign(store, method) for method in ("PUT", "POST", "PUT", "POST")]

    for presigned in uploads:
        assert_sigv4(presigned)
    signed = parse_qs(urlsplit(uploads[0].url).query)["X-Amz-SignedHeaders"][0].split(";")
    assert {"content-type", "x-amz-checksum-sha256", "host"} <= set(signed)
    [warning] = signature_warnings(logs)
    assert warning["log_level"] == "warning"
    assert warning["found"] == "SigV2"
    assert warning["configured"] == ("s3" if config == "sigv2" else "s3v4")
    assert "make_s3_client" in warning["fix"]


def test_the_warning_is_logged_once_per_store(endpoint: str) -> None:
    client = caller_client(endpoint, None)

    with capture_logs() as logs:
        first = S3ObjectStore(bucket=BUCKET, client=client)
        for _ in range(3):
            presign(first, "PUT")
        second = S3ObjectStore(bucket=BUCKET, client=caller_client(endpoint, None))
        for _ in range(3):
            presign(second, "POST")

    assert len(signature_warnings(logs)) == 2


@pytest.mark.parametrize("client", ["make_s3_client", "s3v4-config"])
def test_a_sigv4_client_is_used_as_it_is_without_a_warning(endpoint: str, client: str) -> None:
    given = (make_s3_client(region=REGION, endpoint_url=endpoint) if client == "make_s3_client"
             else caller_client(endpoint, Config(signature_version="s3v4")))

    with capture_logs() as logs:
        store = S3ObjectStore(bucket=BUCKET, client=given)
        uploads = [presign(store, "PUT"), presign(store, "POST")]

    for presigned in uploads:
        assert_sigv4(presigned)
    assert logs == []


def test_a_store_built_without_a_client_presigns_sigv4(endpoint: str) -> None:
    with capture_logs() as logs:
        store = S3ObjectStore(bucket=BUCKET, region=REGION, endpoint_url=endpoint)
        assert_sigv4(presign(store, "PUT"))
        assert_sigv4(presign(store, "POST"))
    assert logs == []


@pytest.mark.parametrize("method", ["PUT", "POST"])
def test_an_upload_through_a_corrected_client_works_end_to_end(endpoint: str,
                                                               method: UploadMethod) -> None:
    client = caller_client(endpoint, Config(signature_version="s3"))
    flow = JobFlow(store=InMemoryJobStore(),
                   objects=S3ObjectStore(bucket=BUCKET, client=client, upload_method=method),
                   policy=POLICY)
    ticket = flow.initiate_upload("owner-1", content_type="video/mp4")

    if ticket.method == "PUT":
        assert "X-Amz-Algorithm=AWS4-HMAC-SHA256" in ticket.url
        response = requests.put(ticket.url, data=VIDEO, headers=ticket.headers, timeout=10)
    else:
        assert ticket.fields["x-amz-algorithm"] == "AWS4-HMAC-SHA256"
        response = requests.post(ticket.url, data=ticket.fields,
                                 files={"file": ("clip.mp4", VIDEO, "video/mp4")}, timeout=10)
    assert response.status_code in (200, 204), response.text

    # The client's own (not presigned) requests are untouched: the HEAD works.
    job = flow.complete_upload(ticket.job_id, owner_id="owner-1")
    assert job.status is JobStatus.QUEUED
    assert job.object_size == len(VIDEO)
    # The client's SigV2 setting is unchanged for everything but presigning.
    assert client.meta.config.signature_version == "s3"


def test_an_unsigned_client_cannot_presign_uploads(endpoint: str) -> None:
    client = caller_client(endpoint, Config(signature_version=botocore.UNSIGNED))
    store = S3ObjectStore(bucket=BUCKET, client=client)

    for method in ("PUT", "POST"):
        with pytest.raises(ConfigurationError, match="Signature Version 4"):
            presign(store, method)


def test_the_default_client_is_sigv4_with_standard_retries_and_timeouts() -> None:
    config: Any = make_s3_client(region=REGION).meta.config

    assert config.signature_version == "s3v4"
    assert config.retries == {"mode": "standard", "total_max_attempts": DEFAULT_MAX_ATTEMPTS}
    assert config.connect_timeout == DEFAULT_CONNECT_TIMEOUT
    assert config.read_timeout == DEFAULT_READ_TIMEOUT
    assert 0 < DEFAULT_CONNECT_TIMEOUT < float("inf")
    assert 0 < DEFAULT_READ_TIMEOUT < float("inf")


def test_a_client_with_legacy_retries_or_no_timeout_is_logged(endpoint: str) -> None:
    with capture_logs() as logs:
        S3ObjectStore(bucket=BUCKET, client=caller_client(
            endpoint, Config(retries={"mode": "legacy"}, read_timeout=None)))
        S3ObjectStore(bucket=BUCKET, client=make_s3_client(region=REGION,
                                                           endpoint_url=endpoint))

    [warning] = [log for log in logs if log["event"] == "s3.client_config"]
    assert any("legacy" in problem for problem in warning["problems"])
    assert any("timeout" in problem for problem in warning["problems"])
