"""jobflow's exception tree.

Every error jobflow raises derives from :class:`JobflowError`. Adapters
translate driver errors (SQLAlchemy, botocore, OS errors) into this tree with
``raise ... from exc``, so callers never import a driver to handle a failure.

::

    JobflowError
    ├── InvalidInput (also ValueError)
    │   └── ContentTypeNotAllowed
    ├── ConfigurationError
    │   └── StoragePermissionDenied
    ├── JobNotFound (also LookupError)
    │   └── MalformedJobId
    ├── InvalidTransition
    ├── LeaseLost
    ├── UploadError
    │   ├── UploadMissing
    │   ├── UploadRejected
    │   └── UploadExpired
    ├── ObjectChanged
    ├── StorageUnavailable
    ├── PermanentStorageError
    ├── PermanentJobError
    ├── JobCancelled
    └── RetryLater

Whether a failure is worth retrying is part of its class:
:class:`StorageUnavailable` means the outside world failed and the same call
may succeed later; :class:`PermanentStorageError` and
:class:`ConfigurationError` mean the same call fails again until a person
fixes the code or the setup.

Each error also says which HTTP status a web app should answer with when the
error reaches a request handler: the class attribute ``http_status``
(:func:`http_status_of` for any exception). A host maps every jobflow error
with one exception handler, and all hosts map them alike:

=======================================================  =====================================
error                                                    ``http_status``
=======================================================  =====================================
:class:`InvalidInput`, :class:`UploadRejected`           422 Unprocessable Content
:class:`JobNotFound` (another owner's job included)      404 Not Found
:class:`UploadMissing`, :class:`InvalidTransition`,      409 Conflict (the job is not in a
:class:`LeaseLost`, :class:`ObjectChanged`,              state that allows the call)
:class:`JobCancelled`
:class:`UploadExpired`                                   410 Gone (the upload window closed
                                                         for good: a new job is needed)
:class:`StorageUnavailable`, :class:`RetryLater`         503 Service Unavailable (retry later)
:class:`ConfigurationError`,                             500 Internal Server Error (the
:class:`PermanentStorageError`, anything else            server's setup or code is wrong)
=======================================================  =====================================
"""

from __future__ import annotations

import math
from datetime import timedelta
from typing import ClassVar


class JobflowError(Exception):
    """Root of every error jobflow raises."""

    #: The HTTP status a web app answers with when this error ends a request.
    http_status: ClassVar[int] = 500


def http_status_of(exc: BaseException) -> int:
    """The HTTP status for ``exc``: a jobflow error's own, 500 for anything else."""
    return exc.http_status if isinstance(exc, JobflowError) else 500


class InvalidInput(JobflowError, ValueError):
    """An argument is malformed: not JSON-serialisable, too long, empty..."""

    http_status = 422


class ContentTypeNotAllowed(InvalidInput):
    """The declared content type is not allowed by the upload policy."""

    def __init__(self, content_type: str, allowed: frozenset[str]) -> None:
        self.content_type = content_type
        self.allowed = allowed
        super().__init__(
            f"content type {content_type!r} is not allowed "
            f"(allowed: {', '.join(sorted(allowed))})"
        )


class ConfigurationError(JobflowError):
    """jobflow or one of its adapters is configured wrongly."""

    http_status = 500


class StoragePermissionDenied(ConfigurationError):
    """The object store refused access: credentials or bucket policy are wrong.

    This is never reported as a missing upload.
    """


class JobNotFound(JobflowError, LookupError):
    """No job with this id is visible to the caller."""

    http_status = 404

    def __init__(self, job_id: str, message: str | None = None) -> None:
        self.job_id = job_id
        super().__init__(message or f"job {job_id!r} not found")


class MalformedJobId(JobNotFound):
    """The job id is not a jobflow job id (a UUID); no such job can exist."""

    def __init__(self, job_id: str) -> None:
        shown = job_id if len(job_id) <= 64 else job_id[:61] + "..."
        super().__init__(job_id, f"malformed job id {shown!r}: expected a UUID")


class InvalidTransition(JobflowError):
    """The event is not allowed from the job's current status."""

    http_status = 409

    def __init__(self, job_id: str, status: str, event: str) -> None:
        self.job_id = job_id
        self.status = status
        self.event = event
        super().__init__(f"cannot {event} job {job_id} in {status}")


class LeaseLost(JobflowError):
    """The caller's lease token is not the job's current one (fencing).

    The job was rescued, finished or claimed again; the call changed nothing.
    """

    http_status = 409

    def __init__(self, job_id: str, event: str) -> None:
        self.job_id = job_id
        self.event = event
        super().__init__(
            f"cannot {event} job {job_id}: the lease is no longer held by this worker"
        )


class UploadError(JobflowError):
    """Base for problems with a job's uploaded object."""

    http_status = 409

    def __init__(self, job_id: str, message: str) -> None:
        self.job_id = job_id
        super().__init__(message)


class UploadMissing(UploadError):
    """The object store shows no object for the job yet; the job keeps waiting."""

    http_status = 409

    def __init__(self, job_id: str, key: str) -> None:
        self.key = key
        super().__init__(job_id, f"no object uploaded yet for job {job_id} (key {key})")


class UploadRejected(UploadError):
    """The object exists but breaks the upload policy; the job failed."""

    http_status = 422

    def __init__(self, job_id: str, reason: str) -> None:
        self.reason = reason
        super().__init__(job_id, f"upload for job {job_id} rejected: {reason}")


class UploadExpired(UploadError):
    """The upload deadline passed without a valid object; the job failed."""

    http_status = 410

    def __init__(self, job_id: str) -> None:
        super().__init__(job_id, f"upload for job {job_id} expired before a valid object arrived")


class ObjectChanged(JobflowError):
    """The object was replaced or removed after it was verified."""

    http_status = 409

    def __init__(self, key: str, message: str | None = None) -> None:
        self.key = key
        super().__init__(message or f"object {key} changed after it was verified")


class StorageUnavailable(JobflowError):
    """A store (database or object store) is unreachable, throttling or failing.

    Transient: nothing was changed, and the call may be retried. Raised only
    for failures of the outside world (a lost or refused connection, a
    timeout, a deadlock or a lock still held after the store's own bounded
    waits and retries), never for a setup or programming error.
    """

    http_status = 503


class PermanentStorageError(JobflowError):
    """A store refused the call for a reason retrying cannot fix.

    A programming or setup error, not an outage: SQL or a feature the
    database rejects, a bound connection that is closed or whose transaction
    must be rolled back first, a database error jobflow does not know as
    transient. The message names the cause; the driver's error is its
    ``__cause__``. Never a :class:`StorageUnavailable`.
    """

    http_status = 500


class PermanentJobError(JobflowError):
    """Raised by a handler when retrying cannot help: the job fails at once.

    Any other exception from a handler is retried with backoff while attempts
    remain. ``error_code`` (default ``handler_error``) is kept on the job.
    """

    http_status = 500

    def __init__(self, message: str, *, error_code: str | None = None) -> None:
        self.error_code = error_code
        super().__init__(message)


class JobCancelled(JobflowError):
    """Someone asked this running job to stop (``JobFlow.cancel``, ``jobflow cancel``).

    Raised inside a handler by ``ctx.heartbeat()`` and ``ctx.check()`` once the
    worker has learned of the request. Let it propagate: the attempt ends as
    ``failed`` with error code ``cancelled``. A handler that catches it and
    returns a result finishes the job as ``done`` (the work is complete).
    """

    http_status = 409

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"job {job_id} was asked to stop")


class RetryLater(JobflowError):
    """Raised by a handler whose own work failed for a passing reason (a service
    it calls is down or throttling): run the job again after ``delay``.

    The attempt is *deferred*, not failed: it does not count against the
    job's ``max_attempts`` but against the policy's ``max_deferrals``; once
    those are spent the job fails with ``error_code`` (default
    ``retry_later``). ``delay`` is a number of seconds or a timedelta of 0 to
    365 days (anything else raises :class:`InvalidInput` here, which fails the
    attempt as an ordinary error); ``reason`` becomes the job's error message.
    """

    http_status = 503

    def __init__(self, delay: float | timedelta, *, reason: str | None = None,
                 error_code: str | None = None) -> None:
        seconds = delay.total_seconds() if isinstance(delay, timedelta) else delay
        if (isinstance(seconds, bool) or not isinstance(seconds, int | float)
                or not math.isfinite(seconds) or not 0 <= seconds <= 365 * 24 * 3600):
            raise InvalidInput(f"RetryLater needs a delay of 0..365 days, got {delay!r}")
        self.delay = timedelta(seconds=seconds)
        self.reason = reason
        self.error_code = error_code
        super().__init__(reason or f"the handler asked to run again in {seconds:g} s")
