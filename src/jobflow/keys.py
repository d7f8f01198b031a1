"""Ids and object keys: job ids, the process ids written in histories, and object
keys derived from job ids only and checked before any store sees them."""

from __future__ import annotations

import os
import secrets
import socket
import uuid

from jobflow.errors import InvalidInput, MalformedJobId

UPLOAD_PREFIX = "uploads/"
MAX_KEY_LENGTH = 1024


def new_job_id() -> str:
    return str(uuid.uuid4())


def default_worker_id() -> str:
    """``host:pid:random``: unique per call, and says which process wrote a history
    row (a worker's claims and outcomes, a reconcile's rescues)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def parse_job_id(job_id: object) -> str:
    """The canonical form of a job id; :class:`MalformedJobId` if it is not one."""
    if not isinstance(job_id, str):
        raise MalformedJobId(repr(job_id))
    try:
        return str(uuid.UUID(job_id))
    except ValueError:
        raise MalformedJobId(job_id) from None


def upload_key(job_id: str) -> str:
    """The object key of a job's upload. Nothing a client sends goes into it."""
    return f"{UPLOAD_PREFIX}{parse_job_id(job_id)}"


def check_key(key: str) -> str:
    """Refuse keys that could escape a bucket prefix or a folder."""
    if not key or len(key) > MAX_KEY_LENGTH:
        raise InvalidInput(f"object key must be 1..{MAX_KEY_LENGTH} characters")
    if "\x00" in key or "\\" in key:
        raise InvalidInput(f"object key {key[:80]!r} contains a NUL or a backslash")
    if key.startswith("/") or any(part in ("", ".", "..") for part in key.split("/")):
        raise InvalidInput(f"object key {key[:80]!r} is absolute or has an empty, '.' or "
                           "'..' segment")
    return key
