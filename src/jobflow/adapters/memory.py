"""In-memory adapters: public, thread-safe fakes with a database's guarantees.

They refuse exactly what the SQL store refuses, write each change and its
history row atomically, and never hand one job to two claimers, so a host
app's tests can use them in place of PostgreSQL and S3.
"""

from __future__ import annotations

import hashlib
import io
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

import attrs

from jobflow import states
from jobflow.errors import InvalidInput, JobNotFound, ObjectChanged, StorageUnavailable
from jobflow.keys import check_key
from jobflow.models import (
    Change,
    Claim,
    Event,
    Job,
    JobEvent,
    JobStatus,
    ObjectInfo,
    PresignedUpload,
    Purged,
    check_batch,
    check_finished_status,
)


class _Outage:
    """A switch that makes every call fail as if the backend were down."""

    unavailable: bool = False

    def _check(self) -> None:
        if self.unavailable:
            raise StorageUnavailable(f"{type(self).__name__} is unavailable")


class InMemoryJobStore(_Outage):
    """A :class:`~jobflow.ports.JobStore` in a dict, guarded by one lock.

    Set ``unavailable = True`` to make every call raise
    :class:`~jobflow.errors.StorageUnavailable`, as a database outage would.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._jobs: dict[str, Job] = {}
        self._events: dict[str, list[JobEvent]] = {}

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self._check()
        with self._lock:
            yield

    def _append(self, change: Change) -> Job:
        events = self._events.setdefault(change.after.id, [])
        events.append(change.record(len(events) + 1))
        self._jobs[change.after.id] = change.after
        return change.after

    def create(self, change: Change) -> Job:
        with self._locked():
            if change.after.id in self._jobs:
                raise InvalidInput(f"job {change.after.id} already exists")
            return self._append(change)

    def get(self, job_id: str) -> Job:
        with self._locked():
            try:
                return self._jobs[job_id]
            except KeyError:
                raise JobNotFound(job_id) from None

    def _compare_and_set(self, change: Change) -> Job | None:
        """Under the lock: write ``change`` if its snapshot is still current."""
        assert change.before is not None
        current = self._jobs.get(change.before.id)
        if (current is None or current.status is not change.before.status
                or current.lease_token != change.before.lease_token
                or current.cancel_requested_at != change.before.cancel_requested_at):
            return None
        return self._append(change)

    def commit(self, change: Change) -> Job | None:
        with self._locked():
            return self._compare_and_set(change)

    def commit_many(self, changes: Sequence[Change]) -> list[Job | None]:
        check_batch(changes)
        with self._locked():
            return [self._compare_and_set(change) for change in changes]

    def claim(self, *, worker_id: str, limit: int, now: datetime,
              lease_seconds: float) -> list[Claim]:
        claims: list[Claim] = []
        with self._locked():
            due = sorted(
                (j for j in self._jobs.values()
                 if j.status is JobStatus.QUEUED and j.run_at <= now
                 and j.attempts < j.max_attempts and j.upload_verified_at is not None),
                key=lambda j: (j.run_at, j.id),
            )
            for job in due[:limit]:
                evidence = states.Evidence(
                    now=now, new_token=uuid.uuid4().hex,
                    worker_id=worker_id, lease_seconds=lease_seconds)
                claimed = self._append(states.apply(job, Event.CLAIM, evidence))
                assert claimed.lease_token is not None
                claims.append(Claim(job=claimed, token=claimed.lease_token))
        return claims

    def history(self, job_id: str) -> list[JobEvent]:
        with self._locked():
            if job_id not in self._jobs:
                raise JobNotFound(job_id)
            return list(self._events[job_id])

    def awaiting_uploads(self, *, limit: int) -> list[Job]:
        with self._locked():
            waiting = [j for j in self._jobs.values() if j.status is JobStatus.AWAITING_UPLOAD]
        return sorted(waiting, key=lambda j: (j.upload_expires_at, j.id))[:limit]

    def expired_leases(self, *, now: datetime, limit: int) -> list[Job]:
        with self._locked():
            expired = [j for j in self._jobs.values()
                       if j.status is JobStatus.QUICK_RUNNING
                       and j.lease_expires_at is not None and j.lease_expires_at <= now]
        return sorted(expired, key=lambda j: (j.lease_expires_at or now, j.id))[:limit]

    def failed_since(self, *, since: datetime, limit: int) -> list[Job]:
        with self._locked():
            failed = [j for j in self._jobs.values() if j.status is JobStatus.FAILED
                      and j.finished_at is not None and j.finished_at >= since]
        failed.sort(key=lambda j: j.id)
        failed.sort(key=lambda j: j.finished_at or since, reverse=True)
        return failed[:limit]

    def _finished(self, status: JobStatus, finished_before: datetime) -> list[Job]:
        """Under the lock: the jobs in ``status`` finished before ``finished_before``,
        oldest first."""
        check_finished_status(status)
        found = [j for j in self._jobs.values() if j.status is status
                 and j.finished_at is not None and j.finished_at < finished_before]
        return sorted(found, key=lambda j: (j.finished_at or finished_before, j.id))

    def purge_finished(self, *, status: JobStatus, finished_before: datetime,
                       limit: int) -> Purged:
        with self._locked():
            doomed = self._finished(status, finished_before)[:max(limit, 0)]
            events = 0
            for job in doomed:
                del self._jobs[job.id]
                events += len(self._events.pop(job.id))
        return Purged(jobs=tuple(doomed), events=events)

    def count_finished(self, *, status: JobStatus, finished_before: datetime) -> tuple[int, int]:
        with self._locked():
            found = self._finished(status, finished_before)
            return len(found), sum(len(self._events[job.id]) for job in found)

    def failed_after(self, *, error_code: str, after: tuple[datetime, str],
                     limit: int) -> list[Job]:
        with self._locked():
            failed = [j for j in self._jobs.values() if j.status is JobStatus.FAILED
                      and j.error_code == error_code and j.finished_at is not None
                      and (j.finished_at, j.id) > after]
        failed.sort(key=lambda j: (j.finished_at or after[0], j.id))
        return failed[:max(limit, 0)]

    def counts(self) -> dict[JobStatus, int]:
        with self._locked():
            counts = dict.fromkeys(JobStatus, 0)
            for job in self._jobs.values():
                counts[job.status] += 1
            return counts


@attrs.frozen
class _StoredObject:
    data: bytes
    info: ObjectInfo


class InMemoryObjectStore(_Outage):
    """An :class:`~jobflow.ports.ObjectStore` in a dict, with S3-like metadata.

    Every put gets a new ETag (MD5, like S3 for single-part uploads), a new
    version id and a SHA-256. Set ``unavailable = True`` to simulate an outage.
    """

    def __init__(self, bucket: str = "memory") -> None:
        self._bucket = bucket
        self._lock = threading.Lock()
        self._objects: dict[str, _StoredObject] = {}
        self._versions = 0

    @property
    def bucket(self) -> str:
        return self._bucket

    def presign_upload(self, key: str, *, content_type: str, expires_in: int,
                       min_bytes: int, max_bytes: int, sha256: str | None = None
                       ) -> PresignedUpload:
        check_key(key)
        self._check()
        headers = {"Content-Type": content_type}
        if sha256 is not None:
            headers["x-amz-checksum-sha256"] = sha256
        return PresignedUpload(method="PUT", url=f"memory://{self._bucket}/{key}",
                               headers=headers)

    def head(self, key: str) -> ObjectInfo | None:
        check_key(key)
        self._check()
        with self._lock:
            stored = self._objects.get(key)
        return stored.info if stored else None

    def _read(self, key: str, expected: ObjectInfo | None) -> bytes:
        check_key(key)
        self._check()
        with self._lock:
            stored = self._objects.get(key)
        if stored is None:
            raise ObjectChanged(key, f"object {key} no longer exists")
        if expected is not None and (stored.info.etag != expected.etag
                                     or stored.info.version_id != expected.version_id):
            raise ObjectChanged(key)
        return stored.data

    def open(self, key: str, *, expected: ObjectInfo | None = None) -> BinaryIO:
        return io.BytesIO(self._read(key, expected))

    def download(self, key: str, dest: Path, *, expected: ObjectInfo | None = None) -> Path:
        dest.write_bytes(self._read(key, expected))
        return dest

    def put(self, key: str, data: bytes, *, content_type: str) -> ObjectInfo:
        check_key(key)
        self._check()
        with self._lock:
            self._versions += 1
            info = ObjectInfo(
                key=key, size=len(data), content_type=content_type,
                etag='"' + hashlib.md5(data, usedforsecurity=False).hexdigest() + '"',
                version_id=str(self._versions), sha256=hashlib.sha256(data).hexdigest(),
            )
            self._objects[key] = _StoredObject(data=bytes(data), info=info)
        return info

    def delete(self, key: str) -> None:
        check_key(key)
        self._check()
        with self._lock:
            self._objects.pop(key, None)
