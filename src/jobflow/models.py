"""jobflow's value objects: jobs, claims, tickets, policies, history rows.

Everything here is immutable (frozen attrs) and free of I/O.
"""

from __future__ import annotations

import enum
import operator
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import attrs

from jobflow.errors import ConfigurationError, InvalidInput

JSONDict = dict[str, Any]


class JobStatus(enum.StrEnum):
    """A job's state. The order is part of the contract (a database enum keeps it)."""

    AWAITING_UPLOAD = "awaiting_upload"
    QUEUED = "queued"
    QUICK_RUNNING = "quick_running"
    DONE = "done"
    FAILED = "failed"


class Event(enum.StrEnum):
    """Everything that can happen to a job. ``created`` opens every history."""

    CREATED = "created"
    VERIFY_UPLOAD = "verify_upload"
    REJECT_UPLOAD = "reject_upload"
    EXPIRE_UPLOAD = "expire_upload"
    CLAIM = "claim"
    HEARTBEAT = "heartbeat"
    SUCCEED = "succeed"
    RETRY = "retry"
    FAIL = "fail"
    RESCUE = "rescue"
    RELEASE = "release"
    DEFER = "defer"
    CANCEL = "cancel"
    REQUEUE = "requeue"
    #: Someone asked a running job to stop; it keeps its lease until its worker does.
    REQUEST_CANCEL = "request_cancel"


class ErrorCode(enum.StrEnum):
    """Why a job is ``failed``."""

    UPLOAD_REJECTED = "upload_rejected"
    UPLOAD_EXPIRED = "upload_expired"
    HANDLER_ERROR = "handler_error"
    LEASE_EXPIRED = "lease_expired"
    CANCELLED = "cancelled"
    #: The object store stayed unavailable through ``max_deferrals`` deferrals
    #: (also the code of each such deferral's history row).
    STORAGE_UNAVAILABLE = "storage_unavailable"
    #: The handler raised ``RetryLater`` more than ``max_deferrals`` times.
    RETRY_LATER = "retry_later"


DEFAULT_CONTENT_TYPES = frozenset({"video/mp4", "video/quicktime", "video/x-msvideo"})


def media_type(content_type: str) -> str:
    """A content type without its parameters, lowercased (``VIDEO/MP4; codecs=x``
    is ``video/mp4``): what policies and jobs compare."""
    return content_type.split(";")[0].strip().lower()


def _positive(_: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if value <= 0:
        raise ConfigurationError(f"upload policy: {attribute.name} must be > 0, got {value!r}")


def _not_negative(_: Any, attribute: attrs.Attribute[Any], value: int) -> None:
    if value < 0:
        raise ConfigurationError(f"upload policy: {attribute.name} must be >= 0, got {value!r}")


@attrs.frozen
class UploadPolicy:
    """What an upload must look like, and how its job is run.

    ``min_bytes`` defaults to 1, so an empty object is rejected. With
    ``delete_rejected_uploads``, a rejected or expired upload's object is
    deleted once the job has failed.

    An attempt that could not run for a reason outside the job (the object
    store was unavailable; the handler raised ``RetryLater``) is *deferred*:
    it gives its attempt back and the job waits ``defer_seconds``, doubled
    after each deferral up to ``defer_max_seconds``. A job is deferred at
    most ``max_deferrals`` times (the budget of the process that writes the
    outcome); the next such attempt fails it.
    """

    max_bytes: int = attrs.field(default=5 * 1024**3, validator=_positive)
    min_bytes: int = attrs.field(default=1, validator=_positive)
    allowed_content_types: frozenset[str] = attrs.field(
        default=DEFAULT_CONTENT_TYPES, converter=frozenset
    )
    upload_ttl_seconds: float = attrs.field(default=3600.0, validator=_positive)
    lease_seconds: float = attrs.field(default=60.0, validator=_positive)
    max_attempts: int = attrs.field(default=3, validator=_positive)
    backoff_seconds: float = attrs.field(default=10.0, validator=_positive)
    backoff_max_seconds: float = attrs.field(default=3600.0, validator=_positive)
    adopt_after_seconds: float = attrs.field(default=60.0)
    max_deferrals: int = attrs.field(default=20, validator=_not_negative)
    defer_seconds: float = attrs.field(default=5.0, validator=_positive)
    defer_max_seconds: float = attrs.field(default=300.0, validator=_positive)
    #: Remove the object of a rejected or expired upload from the object store.
    delete_rejected_uploads: bool = False

    def __attrs_post_init__(self) -> None:
        if self.min_bytes > self.max_bytes:
            raise ConfigurationError(
                f"upload policy: min_bytes ({self.min_bytes}) exceeds max_bytes ({self.max_bytes})"
            )
        if not self.allowed_content_types:
            raise ConfigurationError("upload policy: allowed_content_types is empty")
        if self.adopt_after_seconds < 0:
            raise ConfigurationError("upload policy: adopt_after_seconds must be >= 0")

    def retry_delay(self, attempt: int) -> timedelta:
        """Exponential backoff after the ``attempt``-th attempt failed."""
        seconds = self.backoff_seconds * 2 ** max(attempt - 1, 0)
        return timedelta(seconds=min(seconds, self.backoff_max_seconds))

    def defer_delay(self, deferrals: int) -> timedelta:
        """Exponential backoff before the job runs again, after ``deferrals``
        earlier deferrals (0 for the first): ``defer_seconds`` doubled each
        time, at most ``defer_max_seconds``."""
        seconds = self.defer_seconds * 2.0 ** min(max(deferrals, 0), 64)
        return timedelta(seconds=min(seconds, self.defer_max_seconds))


@attrs.frozen
class ObjectInfo:
    """What the object store itself reports about one key (a HEAD)."""

    key: str
    size: int
    content_type: str
    etag: str
    version_id: str | None = None
    sha256: str | None = None  # hex digest, when the store keeps a checksum


@attrs.frozen(slots=False)
class Job:
    """A snapshot of one job. Transitions return new snapshots.

    Not slotted: a frozen slotted class sets each of its 31 fields through
    ``object.__setattr__``, which made a job cost twice as much to build, and
    a worker builds two for every job it runs (the claimed row, the finished job).
    """

    id: str
    owner_id: str
    status: JobStatus
    params: JSONDict
    bucket: str
    key: str
    content_type: str
    created_at: datetime
    updated_at: datetime
    upload_expires_at: datetime
    max_attempts: int
    run_at: datetime
    expected_sha256: str | None = None
    upload_verified_at: datetime | None = None
    object_size: int | None = None
    object_etag: str | None = None
    object_version_id: str | None = None
    object_sha256: str | None = None
    attempts: int = 0
    lease_token: str | None = None
    lease_owner: str | None = None
    lease_expires_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error_code: str | None = None
    error_message: str | None = None
    result: JSONDict | None = None
    # The upload's size range under the policy the job was created with; every
    # later verification binds to it (None: a job stored before jobs kept it).
    min_bytes: int | None = None
    max_bytes: int | None = None
    # When someone asked this running job to stop (None: nobody did).
    cancel_requested_at: datetime | None = None
    # Attempts that ended because something outside the job failed and gave
    # their attempt back (bounded by the policy's own budget, not max_attempts).
    deferrals: int = 0

    def evolve(self, **changes: Any) -> Job:
        """A copy with ``changes``: :func:`attrs.evolve` without its generic
        per-call work (every transition makes one). A job's fields live in its
        ``__dict__`` (it has no validators or converters), copied as a whole."""
        if not changes.keys() <= _JOB_FIELD_NAMES:
            raise TypeError(f"Job has no field {sorted(changes.keys() - _JOB_FIELD_NAMES)[0]!r}")
        copy = object.__new__(Job)
        fields = copy.__dict__
        fields.update(self.__dict__)
        fields.update(changes)
        return copy

    @property
    def verified_object(self) -> ObjectInfo | None:
        """The object as it was when verified, or None before verification."""
        if self.upload_verified_at is None or self.object_size is None:
            return None
        return ObjectInfo(
            key=self.key,
            size=self.object_size,
            content_type=self.content_type,
            etag=self.object_etag or "",
            version_id=self.object_version_id,
            sha256=self.object_sha256,
        )


#: Job's field names, in the order its constructor takes them.
JOB_FIELDS = tuple(field.name for field in attrs.fields(Job))
#: A job's field values, as a tuple in :data:`JOB_FIELDS` order.
job_values = operator.attrgetter(*JOB_FIELDS)
_JOB_FIELD_NAMES = frozenset(JOB_FIELDS)


@attrs.frozen
class Claim:
    """A job held by a worker, with the lease token that fences its writes."""

    job: Job
    token: str


@attrs.frozen
class Succeeded:
    """A claimed job's handler succeeded: finish it as ``done`` with ``result``
    (a JSON object, or None for an empty one)."""

    claim: Claim
    result: JSONDict | None = None


@attrs.frozen
class Failed:
    """A claimed job's attempt failed with ``error``: retried after ``retry_in``
    (default: the policy's backoff) while it is ``retryable`` and attempts
    remain, else ``failed`` with ``error_code`` (default: ``handler_error``)."""

    claim: Claim
    error: str
    retryable: bool = True
    retry_in: timedelta | None = None
    error_code: str | None = None


@attrs.frozen
class Released:
    """A claimed job goes back to ``queued`` unfinished, without spending an attempt."""

    claim: Claim
    reason: str = "worker shutting down"


@attrs.frozen
class Deferred:
    """A claimed job's attempt could not run for a reason outside the job: its
    object store was unavailable, or its handler asked to run later. The job
    goes back to ``queued`` after ``retry_in`` (default: the policy's
    :meth:`~UploadPolicy.defer_delay`) without spending an attempt, and its
    ``deferrals`` count grows; once the policy's ``max_deferrals`` are spent
    it is ``failed`` instead, with ``error_code`` (default
    ``storage_unavailable``)."""

    claim: Claim
    error: str
    retry_in: timedelta | None = None
    error_code: str | None = None


#: How one claimed attempt ends, as :meth:`~jobflow.JobFlow.finish_many` takes it.
Outcome = Succeeded | Failed | Released | Deferred


@attrs.frozen
class PresignedUpload:
    """How a client sends the bytes: an HTTP request the object store accepts."""

    method: str  # "PUT" or "POST"
    url: str
    headers: dict[str, str] = attrs.field(factory=dict)
    fields: dict[str, str] = attrs.field(factory=dict)


@attrs.frozen
class UploadTicket:
    """Handed to the client by ``initiate_upload``."""

    job_id: str
    bucket: str
    key: str
    method: str
    url: str
    headers: dict[str, str]
    fields: dict[str, str]
    expires_at: datetime


@attrs.frozen
class JobEvent:
    """One row of a job's history."""

    job_id: str
    seq: int
    event: Event
    from_status: JobStatus | None
    to_status: JobStatus
    at: datetime
    worker_id: str | None = None
    attempt: int = 0
    detail: JSONDict = attrs.field(factory=dict)


@attrs.frozen
class Change:
    """What the core decided: the snapshot to replace and the one to write.

    A store applies it with compare-and-set on ``before.status`` and
    ``before.lease_token`` and appends the history row in the same transaction.
    """

    event: Event
    before: Job | None
    after: Job
    worker_id: str | None = None
    detail: JSONDict = attrs.field(factory=dict)

    def record(self, seq: int) -> JobEvent:
        return JobEvent(self.after.id, seq, *self.history_values())

    def history_values(self) -> tuple[Any, ...]:
        """The values of this change's history row after ``job_id`` and ``seq``,
        in :class:`JobEvent`'s field order: event, from_status, to_status, at,
        worker_id, attempt, detail."""
        after = self.after
        return (self.event, self.before.status if self.before else None, after.status,
                after.updated_at, self.worker_id, after.attempts, self.detail)


def check_batch(changes: Sequence[Change]) -> None:
    """What every store refuses in a batch of changes, before writing any: a
    change without the snapshot it was decided on, or two changes to one job."""
    if any(change.before is None for change in changes):
        raise InvalidInput("commit needs the snapshot each change was decided on")
    job_ids = [change.after.id for change in changes]
    if len(set(job_ids)) != len(job_ids):
        raise InvalidInput("commit_many takes at most one change per job")


def check_finished_status(status: JobStatus) -> JobStatus:
    """What every store refuses to purge: a status other than ``done`` or ``failed``."""
    if status not in (JobStatus.DONE, JobStatus.FAILED):
        raise InvalidInput(f"only finished jobs (done, failed) are purged, not {status!r}")
    return status


@attrs.frozen
class ReconcileReport:
    """What one ``reconcile`` pass did, as job ids per outcome.

    ``unavailable``: the upload whose check met an object store outage (the
    pass checked no more); ``skipped``: uploads due for a check that this pass
    did not make, for that outage or because its time budget was spent.
    """

    adopted: tuple[str, ...] = ()
    rejected: tuple[str, ...] = ()
    expired: tuple[str, ...] = ()
    rescued: tuple[str, ...] = ()
    lease_failed: tuple[str, ...] = ()
    unavailable: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        return (
            len(self.adopted) + len(self.rejected) + len(self.expired)
            + len(self.rescued) + len(self.lease_failed)
        )


@attrs.frozen
class Purged:
    """What one batch of a purge deleted: the jobs, and how many history rows
    went with them."""

    jobs: tuple[Job, ...] = ()
    events: int = 0


@attrs.frozen
class PurgeReport:
    """What ``JobFlow.purge`` deleted (with ``dry_run``: would delete).

    ``objects_failed`` holds the keys of objects that could not be deleted: their
    jobs are gone, so the bucket's lifecycle rules or a person must remove them.
    """

    finished_before: datetime
    jobs: int = 0
    events: int = 0
    objects_deleted: int = 0
    objects_failed: tuple[str, ...] = ()
    dry_run: bool = False


@attrs.frozen
class RequeueReport:
    """What ``JobFlow.requeue_failed`` did with the failed jobs of one cause, as
    job ids per outcome.

    ``still_failing``: the object is missing or breaks the job's policy, so the
    job stays failed. ``skipped``: the job changed since it was listed (requeued
    by someone else, or failed again for another cause). ``unavailable``: a
    store failed while this job was handled; it was left as it was, and the
    pass stopped there (``stopped`` says why). Nothing is half-written: each
    requeue is one compare-and-set.
    """

    error_code: str
    requeued: tuple[str, ...] = ()
    still_failing: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
    unavailable: tuple[str, ...] = ()
    stopped: str | None = None
