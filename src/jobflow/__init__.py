"""jobflow: upload-first jobs that are never claimed before their upload is verified."""

from jobflow.aio import AsyncJobFlow
from jobflow.flow import JobFlow
from jobflow.models import (
    Claim,
    Deferred,
    Event,
    Failed,
    Job,
    JobEvent,
    JobStatus,
    ObjectInfo,
    Outcome,
    PurgeReport,
    ReconcileReport,
    Released,
    RequeueReport,
    Succeeded,
    UploadPolicy,
    UploadTicket,
)

__all__ = [
    "AsyncJobFlow",
    "Claim",
    "Deferred",
    "Event",
    "Failed",
    "Job",
    "JobEvent",
    "JobFlow",
    "JobStatus",
    "ObjectInfo",
    "Outcome",
    "PurgeReport",
    "ReconcileReport",
    "Released",
    "RequeueReport",
    "Succeeded",
    "UploadPolicy",
    "UploadTicket",
]
