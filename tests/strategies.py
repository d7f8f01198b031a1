"""Every Hypothesis strategy of the suite, in one place.

A new field, event or upload kind is added here in the same change.
"""

from __future__ import annotations

import hashlib
import itertools
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import attrs
from hypothesis import strategies as st

from jobflow import UploadPolicy

START = datetime(2026, 1, 1, tzinfo=UTC)

POLICY = UploadPolicy(
    max_bytes=64,
    min_bytes=1,
    allowed_content_types=frozenset({"video/mp4", "video/quicktime"}),
    upload_ttl_seconds=3600,
    lease_seconds=60,
    max_attempts=3,
    backoff_seconds=10,
    backoff_max_seconds=600,
    adopt_after_seconds=60,
    max_deferrals=1,  # small, so that runs reach a spent deferral budget
    defer_seconds=5,
    defer_max_seconds=60,
)
#: A second process's policy over the same store: it allows larger uploads.
LOOSE_POLICY = attrs.evolve(POLICY, max_bytes=128)

def job_ids() -> Callable[[], str]:
    """Deterministic job ids, so a run replays exactly (claims order by id)."""
    counter = itertools.count(1)
    return lambda: str(uuid.UUID(int=next(counter)))


owners = st.sampled_from(["alice", "bob"])
workers = st.sampled_from(["worker-1", "worker-2", "worker-3"])
claim_limits = st.integers(min_value=1, max_value=3)
#: How a worker ends an attempt in a batch (``JobFlow.finish_many``).
OUTCOME_KINDS = ("succeeded", "retry", "fail", "release", "defer")
outcome_kinds = st.sampled_from(OUTCOME_KINDS)
#: Why a job failed (``Job.error_code``): what a bulk requeue picks jobs by.
FAILURE_CAUSES = ("handler_error", "cancelled", "lease_expired", "upload_rejected",
                  "upload_expired")
failure_causes = st.sampled_from(FAILURE_CAUSES)
#: Small steps, a lease's length, an upload deadline's length.
clock_steps = st.sampled_from([1, 15, 61, 601, 3601])
params = st.dictionaries(st.sampled_from(["width", "codec", "note"]),
                         st.one_of(st.integers(), st.text(max_size=8), st.none()), max_size=3)

#: What a client may put at a job's key. "valid" is the bytes the job declared
#: (when it declared a checksum); "other" is acceptable except for that checksum;
#: "large" only under LOOSE_POLICY; "too_large" under neither policy.
UPLOAD_KINDS = ("valid", "other", "empty", "large", "too_large", "wrong_type")
upload_kinds = st.sampled_from(UPLOAD_KINDS)


def payload(job_id: str) -> bytes:
    """The bytes a job's client means to upload; depends only on the job id."""
    return b"video:" + job_id.encode()[:32]


def payload_sha256(job_id: str) -> str:
    return hashlib.sha256(payload(job_id)).hexdigest()


def upload_for(kind: str, job_id: str, content_type: str) -> tuple[bytes, str]:
    """The bytes and content type of one kind of upload for a job."""
    return {
        "valid": (payload(job_id), content_type),
        "other": (b"another:" + job_id.encode()[:16], content_type),
        "empty": (b"", content_type),
        "large": (b"x" * (POLICY.max_bytes + 1), content_type),
        "too_large": (b"x" * (LOOSE_POLICY.max_bytes + 1), content_type),
        "wrong_type": (payload(job_id), "text/plain"),
    }[kind]


def acceptable(kind: str | None, declared_sha256: bool, loose: bool = False) -> bool:
    """Whether an upload of this kind is acceptable (independent of jobflow's
    code): under POLICY, or under LOOSE_POLICY when ``loose`` (the job was
    created under it and is verified by a process that has it)."""
    return kind == "valid" or (kind in ("other", "large") and not declared_sha256
                               and (kind == "other" or loose))


#: Nonsense for any argument of the public API (tests/contract/test_garbage.py):
#: wrong types, out-of-range numbers, hostile text, deep and huge JSON.
GARBAGE = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=2**63),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["", " ", "\x00", "a\nb", "\r\n", "\x1b[2J", "\ud800", "\udfff x",
                     "x" * 300, "0" * 64 + "\n", "VIDEO/MP4", "video/mp4; codecs=avc1",
                     "00000000-0000-4000-8000-00000000000g", "../../etc/passwd"]),
    st.binary(max_size=20),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=3),
    st.just({"nan": float("nan")}), st.just({1: object()}),
    st.timedeltas(), st.just(timedelta(days=10**6)), st.just(timedelta(seconds=-1)),
    st.just(object()), st.just(START),
)
