"""jobflow: upload-first jobs that are never claimed before their upload is verified."""

from jobflow.flow import JobFlow
from jobflow.models import (
    Claim,
    Event,
    Job,
    JobEvent,
    JobStatus,
    ObjectInfo,
    ReconcileReport,
    UploadPolicy,
    UploadTicket,
)

__all__ = [
    "Claim",
    "Event",
    "Job",
    "JobEvent",
    "JobFlow",
    "JobStatus",
    "ObjectInfo",
    "ReconcileReport",
    "UploadPolicy",
    "UploadTicket",
]
