"""The metrics' labels stay bounded: every reason the state machine gives for
rejecting an upload maps to its own short label, never to free text."""

from __future__ import annotations

from typing import Any

from jobflow import states
from jobflow.errors import ObjectChanged, StorageUnavailable
from jobflow.metrics import error_class, rejection_kind
from jobflow.models import Job, ObjectInfo, UploadPolicy
from tests.strategies import START

POLICY = UploadPolicy(min_bytes=10, max_bytes=100)


def waiting(sha256: str | None = None) -> Job:
    return states.new_job(job_id="00000000-0000-4000-8000-000000000001", owner_id="o",
                          params={}, bucket="b", key="uploads/x", content_type="video/mp4",
                          expected_sha256=sha256, now=START, policy=POLICY).after


def uploaded(**changes: Any) -> ObjectInfo:
    fields: dict[str, Any] = {"key": "uploads/x", "size": 50, "content_type": "video/mp4",
                              "etag": "e", "sha256": "a" * 64, **changes}
    return ObjectInfo(**fields)


def test_every_rejection_reason_has_its_own_label() -> None:
    cases = {
        "wrong_key": (waiting(), uploaded(key="uploads/y")),
        "empty": (waiting(), uploaded(size=0)),
        "too_small": (waiting(), uploaded(size=5)),
        "too_large": (waiting(), uploaded(size=500)),
        "content_type_not_allowed": (waiting(), uploaded(content_type="text/html")),
        "content_type_mismatch": (waiting(), uploaded(content_type="video/quicktime")),
        "checksum_missing": (waiting("b" * 64), uploaded(sha256=None)),
        "checksum_mismatch": (waiting("b" * 64), uploaded()),
    }
    for kind, (job, obj) in cases.items():
        reason = states.rejection_reason(job, obj, POLICY)
        assert reason is not None, kind
        assert rejection_kind(reason) == kind, reason
    assert rejection_kind("something new") == rejection_kind(None) == "other"


def test_error_labels_are_jobflows_error_classes() -> None:
    assert error_class(StorageUnavailable("down")) == "StorageUnavailable"
    assert error_class(ObjectChanged("k")) == "ObjectChanged"
    assert error_class(KeyError("a bug")) == "unexpected"
