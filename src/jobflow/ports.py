"""The ports jobflow's core talks through. Adapters implement them.

Each is a :class:`typing.Protocol`: an adapter needs no base class, only the
methods below with the documented behaviour. The contract suites in
``tests/contract`` run every adapter against the same expectations.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

from jobflow.models import (
    Change,
    Claim,
    Job,
    JobEvent,
    JobStatus,
    ObjectInfo,
    PresignedUpload,
    Purged,
)


@runtime_checkable
class Clock(Protocol):
    """A zero-argument callable returning the current time as an aware UTC datetime."""

    def __call__(self) -> datetime: ...


@runtime_checkable
class JobStore(Protocol):
    """Where jobs and their history live.

    Every write is atomic: the job row and its history row are written
    together or not at all. Writes are compare-and-set against the snapshot
    the core decided on, so two racing callers can never both win.
    Outages (a lost connection, timeouts, deadlocks, locks) raise
    :class:`~jobflow.errors.StorageUnavailable`; setup errors
    :class:`~jobflow.errors.ConfigurationError`; any other driver failure
    :class:`~jobflow.errors.PermanentStorageError`, which retrying cannot fix.

    A store may also offer a ``clock`` attribute (a :class:`Clock`): the time
    its lease decisions should be judged by, shared by every process that
    uses the same store (the SQL store on PostgreSQL: the database server's
    time). :class:`~jobflow.JobFlow` uses it when it is given no clock. The
    in-memory store has none: it lives in one process.
    """

    def create(self, change: Change) -> Job:
        """Insert a new job and its ``created`` history row."""
        ...

    def get(self, job_id: str) -> Job:
        """The job's current snapshot; :class:`~jobflow.errors.JobNotFound` if absent."""
        ...

    def commit(self, change: Change) -> Job | None:
        """Write ``change.after`` if the job still has ``change.before``'s status,
        lease token and cancel request (``cancel_requested_at``), and append the
        history row; return the written job.

        Return None, writing nothing, when another writer got there first. A
        cancel request changes a running job without changing its lease, so a
        lease holder's write decided before the request loses here and is
        decided again on the job as it now is.
        """
        ...

    def commit_many(self, changes: Sequence[Change]) -> list[Job | None]:
        """:meth:`commit` for a batch of changes to distinct jobs, in one transaction.

        Each change is its own compare-and-set on ``before.status``,
        ``before.lease_token`` and ``before.cancel_requested_at`` with its own
        history row: result ``i`` is the
        job written for ``changes[i]``, or None when that change lost (and
        wrote nothing). One change losing never stops the others. Changes to
        the same job twice raise :class:`~jobflow.errors.InvalidInput`.
        """
        ...

    def claim(self, *, worker_id: str, limit: int, now: datetime,
              lease_seconds: float) -> list[Claim]:
        """Atomically move up to ``limit`` claimable jobs to ``quick_running``.

        Claimable: ``queued``, upload verified, ``run_at <= now`` and
        ``attempts < max_attempts``; oldest ``run_at`` first, then id. Each
        claimed job gets a fresh random lease token, ``attempts + 1``, a lease
        until ``now + lease_seconds`` and a ``claim`` history row. No job is
        ever handed to two callers.
        """
        ...

    def history(self, job_id: str) -> list[JobEvent]:
        """The job's history rows, oldest first."""
        ...

    def awaiting_uploads(self, *, limit: int) -> list[Job]:
        """Jobs in ``awaiting_upload``, earliest upload deadline first."""
        ...

    def expired_leases(self, *, now: datetime, limit: int) -> list[Job]:
        """Jobs in ``quick_running`` whose lease expired at or before ``now``."""
        ...

    def counts(self) -> dict[JobStatus, int]:
        """Number of jobs per status, every status present (0 where none)."""
        ...

    def failed_since(self, *, since: datetime, limit: int) -> list[Job]:
        """Jobs in ``failed`` whose ``finished_at`` is at or after ``since``,
        most recently finished first (for monitoring)."""
        ...

    # -- retention and bulk recovery ---------------------------------------------------

    def purge_finished(self, *, status: JobStatus, finished_before: datetime,
                       limit: int) -> Purged:
        """Delete up to ``limit`` jobs in ``status`` (``done`` or ``failed``; any
        other status raises :class:`~jobflow.errors.InvalidInput`) whose
        ``finished_at`` is before ``finished_before``, oldest first, with their
        history, in one short transaction; return what was deleted.

        The delete itself checks the status and ``finished_at`` again, so a job
        that changed meanwhile (requeued, say) is never deleted; on PostgreSQL a
        job another transaction holds locked is skipped, left to the next call.
        """
        ...

    def count_finished(self, *, status: JobStatus, finished_before: datetime) -> tuple[int, int]:
        """How many jobs :meth:`purge_finished` would delete now with no limit,
        and how many history rows they have (a purge's dry run)."""
        ...

    def failed_after(self, *, error_code: str, after: tuple[datetime, str],
                     limit: int) -> list[Job]:
        """Up to ``limit`` jobs in ``failed`` with ``error_code`` whose
        ``(finished_at, id)`` comes after ``after``, in that order: one page of
        a bulk requeue, ``after`` being the last job of the previous page."""
        ...


@runtime_checkable
class ObjectStore(Protocol):
    """Where uploads land: S3, a local folder, or memory.

    ``head`` is the only source of truth for "is the upload there".
    Keys are generated by jobflow; adapters still refuse keys that would
    escape their bucket prefix or folder. Outages raise
    :class:`~jobflow.errors.StorageUnavailable`; a permission problem raises
    :class:`~jobflow.errors.StoragePermissionDenied`.
    """

    @property
    def bucket(self) -> str:
        """The bucket (or folder name) objects live in."""
        ...

    def presign_upload(self, key: str, *, content_type: str, expires_in: int,
                       min_bytes: int, max_bytes: int, sha256: str | None = None
                       ) -> PresignedUpload:
        """How a client uploads the object for ``key`` without credentials."""
        ...

    def head(self, key: str) -> ObjectInfo | None:
        """What the store reports about ``key``, or None when there is no object."""
        ...

    def open(self, key: str, *, expected: ObjectInfo | None = None) -> BinaryIO:
        """A binary stream of the object; with ``expected``, exactly that object.

        Raises :class:`~jobflow.errors.ObjectChanged` when the object was
        replaced or removed since ``expected`` was read.
        """
        ...

    def download(self, key: str, dest: Path, *, expected: ObjectInfo | None = None) -> Path:
        """Copy the object to ``dest``, with the same guarantees as :meth:`open`."""
        ...

    def put(self, key: str, data: bytes, *, content_type: str) -> ObjectInfo:
        """Write an object server-side (tools and tests); returns its HEAD."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object; removing a missing object is not an error."""
        ...


__all__: Sequence[str] = ["Clock", "JobStore", "ObjectStore"]
