"""AsyncJobFlow: the JobFlow facade for asyncio host apps (FastAPI, Starlette...).

It is a thin shell: each coroutine runs the very same :class:`~jobflow.JobFlow`
method, so every decision, check, error, history row and log line comes from
one place. The method runs in a greenlet (SQLAlchemy's ``greenlet_spawn``,
the bridge SQLAlchemy's own ``AsyncSession`` runs the synchronous ORM on),
and wherever it does I/O the greenlet hands a coroutine to the event loop and
waits for it while the loop runs other tasks:

* the database, through :class:`~jobflow.adapters.sqlalchemy.AsyncSqlAlchemyJobStore`:
  the synchronous store's statements on an ``AsyncEngine``'s ``sync_engine``,
  each round trip made by the asyncio driver (psycopg 3, aiosqlite);
* the object store, through :class:`ThreadedObjectStore`: boto3's HEAD,
  presign and delete (or the local folder's file I/O) run on a worker thread
  (``asyncio.to_thread``), as blocking libraries must under asyncio.

The in-memory stores serve it as they are (their calls are short and never
wait). ``docs/async.md`` says what runs where and why, with measurements.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import BinaryIO, ParamSpec, TypeVar

import structlog

from jobflow.adapters.sqlalchemy import AsyncSqlAlchemyJobStore, SqlAlchemyJobStore
from jobflow.errors import ConfigurationError, LeaseLost
from jobflow.flow import RECONCILE_BUDGET_SECONDS, JobFlow
from jobflow.greenlets import await_, greenlet_spawn
from jobflow.keys import new_job_id
from jobflow.metrics import JobflowMetrics
from jobflow.models import (
    Claim,
    Job,
    JobEvent,
    JobStatus,
    JSONDict,
    ObjectInfo,
    Outcome,
    PresignedUpload,
    PurgeReport,
    ReconcileReport,
    RequeueReport,
    UploadPolicy,
    UploadTicket,
)
from jobflow.ports import Clock, JobStore, ObjectStore

_P = ParamSpec("_P")
_T = TypeVar("_T")


def _in_thread(call: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
    """Run a blocking call on a worker thread of the running loop and wait for it
    from inside a greenlet: the loop goes on meanwhile."""
    return await_(asyncio.to_thread(call, *args, **kwargs))


class ThreadedObjectStore:
    """An :class:`~jobflow.ports.ObjectStore` whose every call runs on a worker
    thread (the event loop's default executor), for code running in a greenlet
    under :class:`AsyncJobFlow`: a boto3 HEAD that takes a second keeps a
    thread busy for a second, never the event loop. (The stream :meth:`open`
    returns still reads synchronously: workers read objects, not web apps.)"""

    def __init__(self, objects: ObjectStore) -> None:
        self.objects = objects

    @property
    def bucket(self) -> str:
        return self.objects.bucket

    def presign_upload(self, key: str, *, content_type: str, expires_in: int,
                       min_bytes: int, max_bytes: int, sha256: str | None = None
                       ) -> PresignedUpload:
        return _in_thread(self.objects.presign_upload, key, content_type=content_type,
                          expires_in=expires_in, min_bytes=min_bytes, max_bytes=max_bytes,
                          sha256=sha256)

    def head(self, key: str) -> ObjectInfo | None:
        return _in_thread(self.objects.head, key)

    def open(self, key: str, *, expected: ObjectInfo | None = None) -> BinaryIO:
        return _in_thread(self.objects.open, key, expected=expected)

    def download(self, key: str, dest: Path, *, expected: ObjectInfo | None = None) -> Path:
        return _in_thread(self.objects.download, key, dest, expected=expected)

    def put(self, key: str, data: bytes, *, content_type: str) -> ObjectInfo:
        return _in_thread(self.objects.put, key, data, content_type=content_type)

    def delete(self, key: str) -> None:
        _in_thread(self.objects.delete, key)


def _job_store(store: JobStore | AsyncSqlAlchemyJobStore) -> JobStore:
    """The synchronous store JobFlow runs on, refusing one that would block the loop."""
    if isinstance(store, AsyncSqlAlchemyJobStore):
        return store.sync_store
    if isinstance(store, SqlAlchemyJobStore) and not store.engine.dialect.is_async:
        raise ConfigurationError(
            "AsyncJobFlow was given a SqlAlchemyJobStore on a synchronous Engine, whose "
            "statements would block the event loop: use AsyncSqlAlchemyJobStore("
            "create_async_engine(url)) (postgresql+psycopg_async://, sqlite+aiosqlite://)")
    if not isinstance(store, JobStore):
        raise ConfigurationError(
            f"AsyncJobFlow's store must be an AsyncSqlAlchemyJobStore or a JobStore, not "
            f"{type(store).__name__}")
    return store


class AsyncJobFlow:
    """:class:`~jobflow.JobFlow` for asyncio: every method a coroutine with the
    same signature, semantics, errors and history rows.

    ``store`` is an :class:`~jobflow.adapters.sqlalchemy.AsyncSqlAlchemyJobStore`
    (on an ``AsyncEngine``, or bound to the host's ``AsyncSession``), or an
    in-memory :class:`~jobflow.adapters.memory.InMemoryJobStore`. ``objects``
    is any :class:`~jobflow.ports.ObjectStore` (S3, a local folder, memory):
    its calls run on worker threads. The other arguments are JobFlow's.

    A task cancelled in the middle of a call leaves each job either untouched
    or fully transitioned: every write is one compare-and-set with its
    history row, in one transaction.
    """

    def __init__(self, *, store: JobStore | AsyncSqlAlchemyJobStore, objects: ObjectStore,
                 clock: Clock | None = None, policy: UploadPolicy | None = None,
                 logger: structlog.typing.FilteringBoundLogger | None = None,
                 new_job_id: Callable[[], str] = new_job_id,
                 metrics: JobflowMetrics | None = None) -> None:
        self.store = store
        self.objects = objects
        self._flow = JobFlow(store=_job_store(store), objects=ThreadedObjectStore(objects),
                             clock=clock, policy=policy, logger=logger, new_job_id=new_job_id,
                             metrics=metrics)

    @property
    def policy(self) -> UploadPolicy:
        """The :class:`UploadPolicy` applied to new jobs and verifications."""
        return self._flow.policy

    @property
    def sync_flow(self) -> JobFlow:
        """The :class:`~jobflow.JobFlow` each coroutine runs (in a greenlet: its
        store and object calls only work inside one)."""
        return self._flow

    def __repr__(self) -> str:
        return f"{type(self).__name__}(store={self.store!r}, objects={self.objects!r})"

    # Each method below is JobFlow's, run by greenlet_spawn. They are written out
    # rather than generated so that type checkers and editors see their
    # signatures; tests/aio/test_async_flow.py fails when one drifts from
    # JobFlow's or when JobFlow gains a method that has no twin here.

    async def now(self) -> datetime:
        """The flow's clock, read now (see :meth:`JobFlow.now`): the database's
        on PostgreSQL, which a reading may have to ask."""
        return await greenlet_spawn(self._flow.now)

    async def initiate_upload(self, owner_id: str, params: JSONDict | None = None, *,
                              content_type: str, sha256: str | None = None) -> UploadTicket:
        """See :meth:`JobFlow.initiate_upload`."""
        return await greenlet_spawn(self._flow.initiate_upload, owner_id, params,
                                    content_type=content_type, sha256=sha256)

    async def complete_upload(self, job_id: str, *, owner_id: str | None = None) -> Job:
        """See :meth:`JobFlow.complete_upload`."""
        return await greenlet_spawn(self._flow.complete_upload, job_id, owner_id=owner_id)

    async def get(self, job_id: str, *, owner_id: str | None = None) -> Job:
        """See :meth:`JobFlow.get`."""
        return await greenlet_spawn(self._flow.get, job_id, owner_id=owner_id)

    async def history(self, job_id: str, *, owner_id: str | None = None) -> list[JobEvent]:
        """See :meth:`JobFlow.history`."""
        return await greenlet_spawn(self._flow.history, job_id, owner_id=owner_id)

    async def cancel(self, job_id: str, *, owner_id: str | None = None) -> Job:
        """See :meth:`JobFlow.cancel`."""
        return await greenlet_spawn(self._flow.cancel, job_id, owner_id=owner_id)

    async def requeue(self, job_id: str) -> Job:
        """See :meth:`JobFlow.requeue`."""
        return await greenlet_spawn(self._flow.requeue, job_id)

    async def counts(self) -> dict[JobStatus, int]:
        """See :meth:`JobFlow.counts`."""
        return await greenlet_spawn(self._flow.counts)

    async def stuck_uploads(self, *, older_than: timedelta, limit: int = 1000) -> list[Job]:
        """See :meth:`JobFlow.stuck_uploads`."""
        return await greenlet_spawn(self._flow.stuck_uploads, older_than=older_than,
                                    limit=limit)

    async def recent_failures(self, *, within: timedelta, limit: int = 1000) -> list[Job]:
        """See :meth:`JobFlow.recent_failures`."""
        return await greenlet_spawn(self._flow.recent_failures, within=within, limit=limit)

    async def claim(self, worker_id: str, *, limit: int = 1,
                    lease_seconds: float | None = None) -> list[Claim]:
        """See :meth:`JobFlow.claim`."""
        return await greenlet_spawn(self._flow.claim, worker_id, limit=limit,
                                    lease_seconds=lease_seconds)

    async def heartbeat(self, claim: Claim, *, lease_seconds: float | None = None,
                        detail: JSONDict | None = None) -> Claim:
        """See :meth:`JobFlow.heartbeat`."""
        return await greenlet_spawn(self._flow.heartbeat, claim, lease_seconds=lease_seconds,
                                    detail=detail)

    async def heartbeat_many(self, claims: Sequence[Claim], *,
                             lease_seconds: float | None = None) -> list[Claim | LeaseLost]:
        """See :meth:`JobFlow.heartbeat_many`."""
        return await greenlet_spawn(self._flow.heartbeat_many, claims,
                                    lease_seconds=lease_seconds)

    async def succeed(self, claim: Claim, result: JSONDict | None = None) -> Job:
        """See :meth:`JobFlow.succeed`."""
        return await greenlet_spawn(self._flow.succeed, claim, result)

    async def fail(self, claim: Claim, error: str, *, retryable: bool = True,
                   retry_in: timedelta | None = None, error_code: str | None = None) -> Job:
        """See :meth:`JobFlow.fail`."""
        return await greenlet_spawn(self._flow.fail, claim, error, retryable=retryable,
                                    retry_in=retry_in, error_code=error_code)

    async def release(self, claim: Claim, *, reason: str = "worker shutting down") -> Job:
        """See :meth:`JobFlow.release`."""
        return await greenlet_spawn(self._flow.release, claim, reason=reason)

    async def finish_many(self, outcomes: Sequence[Outcome]) -> list[Job | LeaseLost]:
        """See :meth:`JobFlow.finish_many`."""
        return await greenlet_spawn(self._flow.finish_many, outcomes)

    async def defer(self, claim: Claim, error: str, *, retry_in: timedelta | None = None,
                    error_code: str | None = None) -> Job:
        """See :meth:`JobFlow.defer`."""
        return await greenlet_spawn(self._flow.defer, claim, error, retry_in=retry_in,
                                    error_code=error_code)

    async def reconcile(self, *, limit: int = 500, rescuer_id: str | None = None,
                        budget_seconds: float = RECONCILE_BUDGET_SECONDS) -> ReconcileReport:
        """See :meth:`JobFlow.reconcile`."""
        return await greenlet_spawn(self._flow.reconcile, limit=limit, rescuer_id=rescuer_id,
                                    budget_seconds=budget_seconds)

    async def purge(self, finished_before: timedelta | datetime, *, batch_size: int = 500,
                    delete_objects: bool = False, dry_run: bool = False) -> PurgeReport:
        """See :meth:`JobFlow.purge`."""
        return await greenlet_spawn(self._flow.purge, finished_before, batch_size=batch_size,
                                    delete_objects=delete_objects, dry_run=dry_run)

    async def requeue_failed(self, error_code: str, *, since: timedelta | None = None,
                             batch_size: int = 100, limit: int | None = None) -> RequeueReport:
        """See :meth:`JobFlow.requeue_failed`."""
        return await greenlet_spawn(self._flow.requeue_failed, error_code, since=since,
                                    batch_size=batch_size, limit=limit)


__all__ = ["AsyncJobFlow", "ThreadedObjectStore"]
