"""Sending a file through an :class:`~jobflow.UploadTicket`, exactly as a client would.

An ``http(s)://`` ticket (S3 or an S3-compatible store) is one real HTTP
request made with the standard library: a PUT of the bytes with the ticket's
headers, or a multipart/form-data POST of the ticket's fields followed by the
file. A ``file://`` ticket (the local object folder) is written with
:func:`jobflow.adapters.localfs.deliver`. Only the ticket is used: no
credentials, no server-side access.

Error messages name the target without its query string, so a presigned
URL's signature never reaches a terminal or a log.
"""

from __future__ import annotations

import re
import secrets
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

from jobflow.errors import InvalidInput, StorageUnavailable, UploadError
from jobflow.models import UploadTicket

#: Seconds to wait for the object store to accept a connection or answer.
HTTP_TIMEOUT = 60.0
_CHUNK = 1024 * 1024
_S3_ERROR_CODE = re.compile(rb"<Code>([^<]{1,64})</Code>")


class UploadRefused(UploadError):
    """The object store refused the bytes (policy, signature, expiry): nothing was
    stored and the job is still waiting for its upload."""

    def __init__(self, job_id: str, reason: str) -> None:
        self.reason = reason
        super().__init__(job_id, f"the object store refused the upload for job {job_id}: "
                                 f"{reason}")


def public_target(url: str) -> str:
    """``url`` without its query string and credentials: safe to print."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}"


def send_file(ticket: UploadTicket, path: Path) -> None:
    """Upload ``path`` as the object of ``ticket``'s job."""
    try:
        with path.open("rb") as stream:
            size = path.stat().st_size
            scheme = urlsplit(ticket.url).scheme
            if scheme == "file":
                from jobflow.adapters.localfs import deliver

                try:
                    deliver(ticket, stream)
                except InvalidInput as exc:
                    raise UploadRefused(ticket.job_id, str(exc)) from exc
            elif scheme in ("http", "https"):
                _send_http(ticket, stream, size, path.name)
            else:
                raise InvalidInput(f"cannot upload to a {scheme or 'schemeless'} URL")
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror or exc}") from exc


def _send_http(ticket: UploadTicket, stream: BinaryIO, size: int, filename: str) -> None:
    method = ticket.method.upper()
    if method == "PUT":
        headers = {**ticket.headers, "Content-Length": str(size)}
        request = urllib.request.Request(ticket.url, data=stream, method="PUT", headers=headers)
    elif method == "POST":
        boundary = f"jobflow-{secrets.token_hex(16)}"
        head, tail = _form_parts(ticket.fields, boundary, filename,
                                 ticket.headers.get("Content-Type") or
                                 ticket.fields.get("Content-Type", "application/octet-stream"))
        headers = {**ticket.headers,
                   "Content-Type": f"multipart/form-data; boundary={boundary}",
                   "Content-Length": str(len(head) + size + len(tail))}
        request = urllib.request.Request(ticket.url, data=_form_body(head, stream, tail),
                                         method="POST", headers=headers)
    else:
        raise InvalidInput(f"unsupported upload method {ticket.method!r}")
    target = public_target(ticket.url)
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:
            response.read()
    except urllib.error.HTTPError as exc:
        body = exc.read(4096)
        found = _S3_ERROR_CODE.search(body)
        reason = f"HTTP {exc.code}" + (f" {found.group(1).decode(errors='replace')}"
                                       if found else "")
        if exc.code >= 500 or exc.code in (408, 429):
            raise StorageUnavailable(f"{target} answered {reason}; try again") from exc
        raise UploadRefused(ticket.job_id, f"{target} answered {reason}") from exc
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        cause: object = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        raise StorageUnavailable(f"cannot reach {target}: {cause}") from exc


def _form_parts(fields: dict[str, str], boundary: str, filename: str,
                content_type: str) -> tuple[bytes, bytes]:
    """The multipart body around the file: every field first, as S3 requires."""
    lines: list[bytes] = []
    for name, value in fields.items():
        lines += [f"--{boundary}".encode(),
                  f'Content-Disposition: form-data; name="{name}"'.encode(), b"",
                  value.encode()]
    safe_name = filename.replace('"', "_").replace("\r", "_").replace("\n", "_")
    lines += [f"--{boundary}".encode(),
              f'Content-Disposition: form-data; name="file"; filename="{safe_name}"'.encode(),
              f"Content-Type: {content_type}".encode(), b"", b""]
    head = b"\r\n".join(lines)
    tail = f"\r\n--{boundary}--\r\n".encode()
    return head, tail


def _form_body(head: bytes, stream: BinaryIO, tail: bytes) -> Iterator[bytes]:
    yield head
    while chunk := stream.read(_CHUNK):
        yield chunk
    yield tail
