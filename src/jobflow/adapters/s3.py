"""Amazon S3, or any S3-compatible store, through boto3.

:class:`S3ObjectStore` implements :class:`~jobflow.ports.ObjectStore`. It is
the only place jobflow talks to S3, so it is also the only place botocore's
errors exist: every one is translated here into jobflow's error tree
(``raise ... from exc``), and callers never import botocore.

How the answers map:

========================================================  =====================================
S3 says                                                    jobflow says
========================================================  =====================================
404, ``NoSuchKey``, ``NotFound``                           no object (``head`` returns None)
403, ``AccessDenied``, bad or expired keys                 :class:`StoragePermissionDenied`
``NoSuchBucket``, invalid bucket name, no credentials      :class:`ConfigurationError`
``SlowDown``, 429, 5xx, timeouts, connection failures      :class:`StorageUnavailable`
412 / ``NoSuchVersion`` on a read of a verified object     :class:`ObjectChanged`
========================================================  =====================================

``StorageUnavailable`` is raised only after boto3's own retries (standard
mode) gave up; a client built here waits at most ``connect_timeout`` for a
connection and ``read_timeout`` for each answer, ``max_attempts`` times (see
:data:`DEFAULT_READ_TIMEOUT`).

Presigned uploads are always signed with Signature Version 4 (SigV2 URLs,
``AWSAccessKeyId=...&Signature=...``, are refused by every region opened
since 2014). A client built by :func:`make_s3_client` asks for SigV4; a
plain ``boto3.client("s3")`` does not: botocore presigns SigV2 for the
regions that still accept it, although ``client.meta.config.signature_version``
then reads ``"s3v4"``. So every presigned upload is checked, and when one is
not SigV4 the store logs ``s3.client_signature`` once and makes that
client's presigned requests SigV4 (a ``choose-signer.s3`` event handler; the
client's other requests are not affected).
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal, TypeVar, cast
from urllib.parse import parse_qs, urlsplit

import boto3
import botocore
import structlog
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ChecksumError,
    ClientError,
    ConnectionError,
    CredentialRetrievalError,
    FlexibleChecksumError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
    SSLError,
)

from jobflow.adapters.localfs import write_file_atomically
from jobflow.checksums import sha256_base64_to_hex, sha256_hex_to_base64
from jobflow.errors import (
    ConfigurationError,
    InvalidInput,
    JobflowError,
    ObjectChanged,
    StoragePermissionDenied,
    StorageUnavailable,
)
from jobflow.keys import check_key
from jobflow.models import ObjectInfo, PresignedUpload

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer
    from botocore.response import StreamingBody
    from mypy_boto3_s3 import S3Client

UploadMethod = Literal["PUT", "POST"]
AddressingStyle = Literal["auto", "virtual", "path"]

#: Production defaults for a client jobflow builds itself. They bound one call
#: to an S3 that hangs (accepts connections, never answers) at about
#: ``DEFAULT_MAX_ATTEMPTS * DEFAULT_READ_TIMEOUT`` seconds plus botocore's
#: backoff, about 33 s, instead of boto3's five minutes: a read timeout is the
#: longest silence between two packets, not a limit on a whole download.
DEFAULT_CONNECT_TIMEOUT = 3.0
DEFAULT_READ_TIMEOUT = 10.0
DEFAULT_MAX_ATTEMPTS = 3
#: SigV4 presigned URLs and POST policies cannot outlive a week.
MAX_PRESIGN_SECONDS = 7 * 24 * 3600
#: S3 limits a key to 1024 bytes of UTF-8, prefix included.
MAX_S3_KEY_BYTES = 1024

_T = TypeVar("_T")

_log = structlog.get_logger("jobflow.s3")

#: The ``unique_id`` of the event handler that makes a client presign with SigV4.
_SIGV4_PRESIGN_HANDLER = "jobflow-s3v4-presign"
#: The signers botocore may choose for a presigned URL / POST that mean
#: "SigV2 or SigV4 for S3"; asymmetric (v4a), S3 Express and unsigned ones are left alone.
_PRESIGN_SUFFIXES = ("-query", "-presign-post")
_S3_SIGNERS = ("s3", "s3v4", "v4")

_MISSING_CODES = frozenset({"404", "NoSuchKey", "NotFound", "NoSuchVersion"})
_CHANGED_CODES = frozenset({"412", "PreconditionFailed"})
_DENIED_CODES = frozenset({
    "403", "AccessDenied", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch",
    "ExpiredToken", "InvalidToken", "TokenRefreshRequired", "AllAccessDisabled",
    "AccountProblem",
})
_UNAVAILABLE_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestThrottled", "TooManyRequests",
    "RequestLimitExceeded", "RequestTimeout", "ServiceUnavailable", "InternalError",
    "OperationAborted",
})
_BUCKET_CODES = frozenset({"NoSuchBucket", "InvalidBucketName", "PermanentRedirect",
                           "AuthorizationHeaderMalformed", "IllegalLocationConstraintException"})
_CREDENTIAL_ERRORS = (NoCredentialsError, PartialCredentialsError, CredentialRetrievalError)
_TRANSIENT_ERRORS = (HTTPClientError, ConnectionError, IncompleteReadError, ChecksumError,
                     FlexibleChecksumError)


def make_s3_client(*, region: str | None = None, endpoint_url: str | None = None,
                   addressing_style: AddressingStyle | None = None,
                   connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                   read_timeout: float = DEFAULT_READ_TIMEOUT,
                   max_attempts: int = DEFAULT_MAX_ATTEMPTS,
                   session: boto3.session.Session | None = None) -> S3Client:
    """A boto3 S3 client with production defaults: SigV4, standard retries, timeouts.

    Nothing connects here; credentials are looked up on the first request.
    ``max_attempts`` counts the first try (1 disables retries).
    """
    if addressing_style not in (None, "auto", "virtual", "path"):
        raise ConfigurationError(
            f"addressing_style must be 'auto', 'virtual' or 'path', got {addressing_style!r}")
    if max_attempts < 1 or connect_timeout <= 0 or read_timeout <= 0:
        raise ConfigurationError("max_attempts must be >= 1 and timeouts must be > 0")
    config = Config(
        signature_version="s3v4",
        retries={"mode": "standard", "total_max_attempts": max_attempts},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        s3={"addressing_style": addressing_style} if addressing_style else None,
    )
    try:
        return (session or boto3.session.Session()).client(
            "s3", region_name=region, endpoint_url=endpoint_url, config=config)
    except (BotoCoreError, ValueError) as exc:
        raise ConfigurationError(f"cannot build an S3 client: {exc}") from exc


class S3ObjectStore:
    """An :class:`~jobflow.ports.ObjectStore` on an S3 bucket.

    Pass a boto3 S3 ``client``, or let the store build one from ``region``,
    ``endpoint_url``, ``addressing_style``, the timeouts and retries, and a
    boto3 ``session`` for credentials (see :func:`make_s3_client`, which is
    also the way to build a client to pass). A given client whose retry mode
    is not standard (or adaptive), or that has no timeout, is logged
    (``s3.client_config``); one that presigns other than SigV4 is logged
    once (``s3.client_signature``) and then presigns SigV4 (see above).
    ``prefix`` is prepended to every jobflow key, so several applications
    can share a bucket; no key can leave it.
    ``upload_method`` chooses the presigned upload handed to clients:
    ``"PUT"`` (a URL whose signature covers the content type and, when
    declared, the SHA-256) or ``"POST"`` (a browser form whose policy pins the
    key, the content type, the size range and the SHA-256).
    """

    def __init__(self, *, bucket: str, client: S3Client | None = None,
                 region: str | None = None, endpoint_url: str | None = None,
                 addressing_style: AddressingStyle | None = None, prefix: str = "",
                 upload_method: UploadMethod = "PUT",
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 read_timeout: float = DEFAULT_READ_TIMEOUT,
                 max_attempts: int = DEFAULT_MAX_ATTEMPTS,
                 session: boto3.session.Session | None = None) -> None:
        if not isinstance(bucket, str) or not bucket:
            raise ConfigurationError("bucket must be a non-empty string")
        if upload_method not in ("PUT", "POST"):
            raise ConfigurationError(
                f"upload_method must be 'PUT' or 'POST', got {upload_method!r}")
        if client is not None and (region or endpoint_url or addressing_style or session):
            raise ConfigurationError(
                "pass either a client or the options to build one (region, endpoint_url, "
                "addressing_style, session), not both")
        self._bucket = bucket
        self._prefix = _normalized_prefix(prefix)
        self._upload_method: UploadMethod = upload_method
        self._client: S3Client = client or make_s3_client(
            region=region, endpoint_url=endpoint_url, addressing_style=addressing_style,
            connect_timeout=connect_timeout, read_timeout=read_timeout,
            max_attempts=max_attempts, session=session)
        self._bucket_confirmed = False
        self._signature_lock = threading.Lock()
        self._signature_warned = False
        if client is not None:
            _check_client_config(client)

    @property
    def bucket(self) -> str:
        return self._bucket

    @property
    def prefix(self) -> str:
        """What is prepended to jobflow's keys inside the bucket ("" or ending in "/")."""
        return self._prefix

    @property
    def client(self) -> S3Client:
        """The boto3 client in use (to register event hooks, for instance)."""
        return self._client

    def object_key(self, key: str) -> str:
        """The S3 key a jobflow key is stored under: checked, then prefixed."""
        full = self._prefix + check_key(key)
        if len(full.encode("utf-8")) > MAX_S3_KEY_BYTES:
            raise InvalidInput(f"object key {key[:80]!r} is longer than S3 allows with the "
                               f"prefix {self._prefix!r}")
        return full

    # -- uploads ---------------------------------------------------------------------

    def presign_upload(self, key: str, *, content_type: str, expires_in: int,
                       min_bytes: int, max_bytes: int, sha256: str | None = None
                       ) -> PresignedUpload:
        full = self.object_key(key)
        if not 1 <= expires_in <= MAX_PRESIGN_SECONDS:
            raise ConfigurationError(
                f"presigned uploads must expire within 1..{MAX_PRESIGN_SECONDS} seconds "
                f"(S3's limit), got {expires_in}: lower upload_ttl_seconds")
        checksum = sha256_hex_to_base64(sha256) if sha256 is not None else None
        if self._upload_method == "POST":
            return self._presign_post(full, content_type=content_type, expires_in=expires_in,
                                      min_bytes=min_bytes, max_bytes=max_bytes,
                                      checksum=checksum)
        params: dict[str, Any] = {"Bucket": self._bucket, "Key": full,
                                  "ContentType": content_type}
        headers = {"Content-Type": content_type}
        if checksum is not None:
            # Both headers are signed: a client that drops or alters them is refused.
            params.update(ChecksumSHA256=checksum, ChecksumAlgorithm="SHA256")
            headers.update({"x-amz-checksum-sha256": checksum,
                            "x-amz-sdk-checksum-algorithm": "SHA256"})
        url = self._presign_sigv4(
            full, lambda: self._client.generate_presigned_url(
                "put_object", Params=params, ExpiresIn=expires_in, HttpMethod="PUT"),
            lambda url: _url_signature(url))
        return PresignedUpload(method="PUT", url=url, headers=headers)

    def _presign_post(self, full: str, *, content_type: str, expires_in: int, min_bytes: int,
                      max_bytes: int, checksum: str | None) -> PresignedUpload:
        fields = {"Content-Type": content_type}
        # The policy pins the exact key and bucket too: boto3 adds both conditions.
        conditions: list[Any] = [{"Content-Type": content_type},
                                 ["content-length-range", min_bytes, max_bytes]]
        if checksum is not None:
            fields["x-amz-checksum-sha256"] = checksum
            conditions.append({"x-amz-checksum-sha256": checksum})
        post = self._presign_sigv4(
            full, lambda: self._client.generate_presigned_post(
                Bucket=self._bucket, Key=full, Fields=fields, Conditions=conditions,
                ExpiresIn=expires_in),
            lambda post: _fields_signature(post["fields"]))
        return PresignedUpload(method="POST", url=str(post["url"]), headers={},
                               fields={str(k): str(v) for k, v in post["fields"].items()})

    def _presign_sigv4(self, full: str, presign: Callable[[], _T],
                       signature: Callable[[_T], str]) -> _T:
        """Presign, and make sure the result is SigV4 (see the module's docstring)."""
        presigned = self._request("presign an upload to", full, presign)
        found = signature(presigned)
        if found == "SigV4":
            return presigned
        with self._signature_lock:
            if not self._signature_warned:
                self._signature_warned = True
                _log.warning(
                    "s3.client_signature", found=found,
                    configured=_signature_setting(self._client),
                    region=self._client.meta.region_name,
                    endpoint=self._client.meta.endpoint_url,
                    fix="build the client with jobflow.adapters.s3.make_s3_client, or pass "
                        "botocore.config.Config(signature_version='s3v4')")
            # (botocore's stubs type handlers as returning None; this one answers)
            self._client.meta.events.register_first(
                "choose-signer.s3", cast("Callable[..., None]", _presign_with_sigv4),
                unique_id=_SIGV4_PRESIGN_HANDLER)
        presigned = self._request("presign an upload to", full, presign)
        found = signature(presigned)
        if found != "SigV4":
            raise ConfigurationError(
                "the S3 client cannot presign uploads with Signature Version 4 (it presigned "
                f"{found}, its signature_version is {_signature_setting(self._client)}): "
                "build it with jobflow.adapters.s3.make_s3_client")
        return presigned

    # -- reads -----------------------------------------------------------------------

    def head(self, key: str) -> ObjectInfo | None:
        full = self.object_key(key)
        try:
            response = self._request(
                "read the metadata of", full, lambda: self._client.head_object(
                    Bucket=self._bucket, Key=full, ChecksumMode="ENABLED"),
                missing_ok=True)
        except _NoSuchObject:
            self._confirm_bucket()
            return None
        sha256 = response.get("ChecksumSHA256")
        return ObjectInfo(
            key=key,
            size=int(response["ContentLength"]),
            content_type=response.get("ContentType", ""),
            etag=response.get("ETag", ""),
            version_id=_real_version(response.get("VersionId")),
            sha256=sha256_base64_to_hex(sha256)
            if sha256 and response.get("ChecksumType") != "COMPOSITE" else None,
        )

    def open(self, key: str, *, expected: ObjectInfo | None = None) -> BinaryIO:
        """A stream of the object; with ``expected``, exactly that object.

        The verified version is read where the bucket keeps versions;
        otherwise the read is conditional on the verified ETag. Either way
        S3 itself refuses to serve other bytes, and the refusal becomes
        :class:`~jobflow.errors.ObjectChanged`.
        """
        full = self.object_key(key)
        kwargs: dict[str, Any] = {"Bucket": self._bucket, "Key": full, "ChecksumMode": "ENABLED"}
        if expected is not None:
            if expected.etag:
                kwargs["IfMatch"] = expected.etag
            if _real_version(expected.version_id):
                kwargs["VersionId"] = expected.version_id
        try:
            response = self._request(
                "read", full, lambda: self._client.get_object(**kwargs), missing_ok=True)
        except _NoSuchObject as exc:
            raise ObjectChanged(key, f"object {key} no longer exists") from exc
        body = response["Body"]
        if expected is not None and int(response["ContentLength"]) != expected.size:
            body.close()
            raise ObjectChanged(key)
        return io.BufferedReader(_TranslatedBody(body, f"s3://{self._bucket}/{full}"),
                                 buffer_size=1024 * 1024)

    def download(self, key: str, dest: Path, *, expected: ObjectInfo | None = None) -> Path:
        """Copy the object to ``dest`` (written atomically), like :meth:`open`."""
        with self.open(key, expected=expected) as stream:
            return write_file_atomically(Path(dest), stream)

    # -- writes ----------------------------------------------------------------------

    def put(self, key: str, data: bytes, *, content_type: str) -> ObjectInfo:
        """Write the object server-side, with a SHA-256 checksum S3 keeps and verifies."""
        full = self.object_key(key)
        response = self._request("write", full, lambda: self._client.put_object(
            Bucket=self._bucket, Key=full, Body=data, ContentType=content_type,
            ChecksumAlgorithm="SHA256"))
        sha256 = response.get("ChecksumSHA256")
        return ObjectInfo(key=key, size=len(data), content_type=content_type,
                          etag=response.get("ETag", ""),
                          version_id=_real_version(response.get("VersionId")),
                          sha256=sha256_base64_to_hex(sha256) if sha256 else None)

    def delete(self, key: str) -> None:
        """Remove the object. In a versioned bucket this adds a delete marker;
        older versions stay until the bucket's lifecycle rules remove them."""
        full = self.object_key(key)
        try:
            self._request("delete", full, lambda: self._client.delete_object(
                Bucket=self._bucket, Key=full), missing_ok=True)
        except _NoSuchObject:
            return

    # -- error translation -----------------------------------------------------------

    def _request(self, action: str, full_key: str, call: Callable[[], _T], *,
                 missing_ok: bool = False) -> _T:
        """Run one boto3 call; its botocore errors leave as jobflow errors.

        With ``missing_ok``, "no such object" raises :class:`_NoSuchObject`
        for the caller to interpret; otherwise it is a configuration error.
        """
        try:
            return call()
        except ClientError as exc:
            if missing_ok and _is_missing(exc):
                raise _NoSuchObject(full_key) from exc
            raise self._translated(exc, action, full_key) from exc
        except BotoCoreError as exc:
            raise self._translated(exc, action, full_key) from exc

    def _translated(self, exc: ClientError | BotoCoreError, action: str,
                    full_key: str) -> JobflowError:
        where = f"s3://{self._bucket}/{full_key}"
        if isinstance(exc, ClientError):
            code, status = _code_and_status(exc)
            message = str(exc.response.get("Error", {}).get("Message", "")) or code
            said = f"S3 answered {status} {code}: {message}"
            if code in _BUCKET_CODES:
                return ConfigurationError(
                    f"cannot {action} {where}: {said}; check the bucket name and region")
            if code in _CHANGED_CODES or status == 412:
                return ObjectChanged(full_key, f"object {where} changed after it was verified")
            if code in _MISSING_CODES or status == 404:
                return ConfigurationError(
                    f"cannot {action} {where}: {said}; check the bucket name and endpoint")
            if code in _DENIED_CODES or status == 403:
                return StoragePermissionDenied(
                    f"cannot {action} {where}: {said}. The credentials or the bucket policy "
                    "are wrong (this is not a missing upload; note that S3 also answers 403 "
                    "for a missing object when the credentials lack s3:ListBucket)")
            if code in _UNAVAILABLE_CODES or status == 429 or status >= 500:
                return StorageUnavailable(f"cannot {action} {where}: {said}")
            return ConfigurationError(f"cannot {action} {where}: {said}")
        if isinstance(exc, _CREDENTIAL_ERRORS):
            return ConfigurationError(
                f"cannot {action} {where}: no usable AWS credentials ({exc}); configure them "
                "(environment, shared config, or an instance/task role)")
        if isinstance(exc, SSLError):
            return ConfigurationError(f"cannot {action} {where}: TLS failed: {exc}")
        if isinstance(exc, _TRANSIENT_ERRORS):
            return StorageUnavailable(f"cannot {action} {where}: {exc}")
        return ConfigurationError(f"cannot {action} {where}: {exc}")

    def _confirm_bucket(self) -> None:
        """Tell a missing bucket from a missing object, once per store.

        A HEAD has no body, so both come back as a bare 404; without this a
        misspelt bucket would leave every upload "missing" until it expired.
        """
        if self._bucket_confirmed:
            return
        where = f"s3://{self._bucket}"
        try:
            self._client.head_bucket(Bucket=self._bucket)
        except ClientError as exc:
            code, status = _code_and_status(exc)
            if status == 404 or code in _BUCKET_CODES:
                raise ConfigurationError(f"bucket {where} does not exist") from exc
            if status != 403:  # 403: the bucket exists, we may just not list it
                raise self._translated(exc, "check", "") from exc
        except BotoCoreError as exc:
            raise self._translated(exc, "check", "") from exc
        self._bucket_confirmed = True


def _presign_with_sigv4(signature_version: object, **_: Any) -> str | None:
    """A ``choose-signer.s3`` handler: presigned URLs and POSTs are SigV4.

    Registered first, it answers before botocore's own handler that would
    pick SigV2; requests that are not presigned, and asymmetric (v4a), S3
    Express or unsigned presigning, are left to botocore.
    """
    if not isinstance(signature_version, str):
        return None
    for suffix in _PRESIGN_SUFFIXES:
        if signature_version in {signer + suffix for signer in _S3_SIGNERS}:
            return "s3v4" + suffix
    return None


def _url_signature(url: str) -> str:
    """How a presigned URL is signed: ``SigV4``, ``SigV2`` or ``unsigned``."""
    query = parse_qs(urlsplit(url).query)
    if query.get("X-Amz-Algorithm") == ["AWS4-HMAC-SHA256"]:
        return "SigV4"
    return "SigV2" if "Signature" in query else "unsigned"


def _fields_signature(fields: Mapping[str, Any]) -> str:
    """How a presigned POST's form fields are signed, like :func:`_url_signature`."""
    if fields.get("x-amz-algorithm") == "AWS4-HMAC-SHA256":
        return "SigV4"
    return "SigV2" if "signature" in fields else "unsigned"


def _check_client_config(client: S3Client) -> None:
    """Log ``s3.client_config`` when a given client would retry or wait unlike
    :func:`make_s3_client`'s (standard retries, finite timeouts)."""
    retries = _config_value(client, "retries") or {}
    problems = []
    if retries.get("mode") not in ("standard", "adaptive"):
        problems.append(f"retry mode {retries.get('mode') or 'legacy'!r}, not 'standard'")
    if None in (_config_value(client, "connect_timeout"), _config_value(client, "read_timeout")):
        problems.append("no connect or read timeout")
    if problems:
        _log.warning("s3.client_config", problems=problems,
                     fix="build the client with jobflow.adapters.s3.make_s3_client")


def _config_value(client: S3Client, name: str) -> Any:
    """One of the client's resolved ``botocore.config.Config`` options (untyped in the stubs)."""
    return getattr(client.meta.config, name, None)


def _signature_setting(client: S3Client) -> str:
    value = _config_value(client, "signature_version")
    return "UNSIGNED" if value is botocore.UNSIGNED else str(value)


class _NoSuchObject(Exception):
    """Internal: S3 has no object (or no such version) at this key.

    Raised only where the caller asked for it (``missing_ok``) and catches it.
    """


def _code_and_status(exc: ClientError) -> tuple[str, int]:
    code = str(exc.response.get("Error", {}).get("Code", ""))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
    return code, status


def _is_missing(exc: ClientError) -> bool:
    code, status = _code_and_status(exc)
    return code not in _BUCKET_CODES and (code in _MISSING_CODES or status == 404)


def _normalized_prefix(prefix: str) -> str:
    """``""`` or a checked key prefix ending in ``/``."""
    if not isinstance(prefix, str) or prefix.startswith("/"):
        raise ConfigurationError(f"prefix must be a string not starting with '/', got {prefix!r}")
    stripped = prefix[:-1] if prefix.endswith("/") else prefix
    if not stripped:
        return ""
    try:
        check_key(stripped)
    except InvalidInput as exc:
        raise ConfigurationError(f"invalid prefix {prefix!r}: {exc}") from exc
    return stripped + "/"


def _real_version(version_id: str | None) -> str | None:
    """A version id that pins content; S3's ``"null"`` version does not."""
    return version_id if version_id and version_id != "null" else None


class _TranslatedBody(io.RawIOBase):
    """A GET's streaming body whose botocore and socket errors become jobflow errors."""

    def __init__(self, body: StreamingBody, where: str) -> None:
        super().__init__()
        self._body = body
        self._where = where

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        try:
            chunk = self._body.read(len(view))
        except (BotoCoreError, OSError) as exc:
            raise StorageUnavailable(f"reading {self._where} failed: {exc}") from exc
        view[: len(chunk)] = chunk
        return len(chunk)

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()
