"""The JobFlow facade: what a host web app, the worker and the CLI call.

Each method reads a snapshot, asks :mod:`jobflow.states` what to write, and
hands the resulting change to the job store's compare-and-set. The only I/O
is through the injected ports; the only clock is the injected one.
"""

from __future__ import annotations

import json
import logging
import re
from collections import deque
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any

import structlog

from jobflow import states
from jobflow.errors import (
    ConfigurationError,
    ContentTypeNotAllowed,
    InvalidInput,
    InvalidTransition,
    JobflowError,
    JobNotFound,
    LeaseLost,
    StorageUnavailable,
    UploadExpired,
    UploadMissing,
    UploadRejected,
)
from jobflow.keys import new_job_id, parse_job_id, upload_key
from jobflow.models import (
    Change,
    Claim,
    ErrorCode,
    Event,
    Job,
    JobEvent,
    JobStatus,
    JSONDict,
    ReconcileReport,
    UploadPolicy,
    UploadTicket,
)
from jobflow.ports import ClaimPipeline, Clock, JobStore, ObjectStore

MAX_ID_LENGTH = 255
_SHA256_HEX = re.compile(r"^[0-9a-fA-F]{64}$")
# A compare-and-set that loses re-reads the job and decides again; after this
# many lost rounds in a row the caller gets the last refusal instead.
_MAX_ROUNDS = 5


def utc_now() -> datetime:
    return datetime.now(UTC)


def json_object(value: Any, what: str) -> JSONDict:
    """A JSON round-trip copy of ``value``, which must be a JSON object."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be a JSON object (a dict), got {type(value).__name__}")
    try:
        copied: JSONDict = json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"{what} is not JSON-serialisable: {exc}") from exc
    return copied


def check_id(value: Any, what: str) -> str:
    """Owner and worker ids are data only; they must still be sane strings."""
    if not isinstance(value, str) or not value or len(value) > MAX_ID_LENGTH:
        raise InvalidInput(f"{what} must be a string of 1..{MAX_ID_LENGTH} characters")
    if "\x00" in value:
        raise InvalidInput(f"{what} must not contain NUL characters")
    return value


class JobFlow:
    """Upload-first jobs: create, verify, claim, finish, reconcile.

    ``clock`` is a zero-argument callable returning an aware UTC datetime
    (default: the system clock). ``policy`` is the :class:`UploadPolicy`
    applied to every upload and attempt. ``new_job_id`` makes job ids (default:
    random UUIDs; tests pass a deterministic one).
    """

    def __init__(self, *, store: JobStore, objects: ObjectStore, clock: Clock | None = None,
                 policy: UploadPolicy | None = None,
                 logger: structlog.typing.FilteringBoundLogger | None = None,
                 new_job_id: Callable[[], str] = new_job_id) -> None:
        self.store = store
        self.objects = objects
        self.policy = policy or UploadPolicy()
        self._clock: Callable[[], datetime] = clock or utc_now
        self._new_job_id = new_job_id
        self._log: structlog.typing.FilteringBoundLogger = logger or structlog.get_logger(
            "jobflow")

    # -- helpers -----------------------------------------------------------------

    def now(self) -> datetime:
        now = self._clock()
        if now.tzinfo is None or now.utcoffset() != timedelta(0):
            raise ConfigurationError(f"clock must return an aware UTC datetime, got {now!r}")
        return now

    def _evidence(self, now: datetime | None = None, **kwargs: Any) -> states.Evidence:
        """The evidence of a decision at ``now`` (default: the clock, read now)."""
        return states.Evidence(now=self.now() if now is None else now, policy=self.policy,
                               **kwargs)

    def _log_transition(self, event: Event, job: Job, from_status: JobStatus | None,
                        worker_id: str | None) -> None:
        self._log.info(event.value, job_id=job.id, from_status=from_status,
                       to_status=job.status.value, attempt=job.attempts, worker_id=worker_id)

    def _logs_transitions(self) -> bool:
        """Whether transition lines (INFO) are logged at all; batch calls ask once
        instead of formatting a line per job that the logger would drop."""
        enabled = getattr(self._log, "is_enabled_for", None)
        return True if enabled is None else bool(enabled(logging.INFO))

    def _logged(self, change: Change, job: Job) -> Job:
        self._log_transition(change.event, job, change.before.status if change.before else None,
                             change.worker_id)
        return job

    def _transition(self, job_id: str, decide: Callable[[Job], Change],
                    owner_id: str | None = None, *, snapshot: Job | None = None) -> Job:
        """Decide and compare-and-set, re-deciding on a fresh read after a lost race.

        ``snapshot`` is a copy the caller already holds (a worker's claim): the
        first round decides on it without reading, and the compare-and-set
        checks that it still describes the job.
        """
        for _ in range(_MAX_ROUNDS):
            job = snapshot if snapshot is not None else self.get(job_id, owner_id=owner_id)
            snapshot = None
            written = self.store.commit(change := decide(job))
            if written is not None:
                return self._logged(change, written)
        raise StorageUnavailable(f"job {job_id} kept changing under {_MAX_ROUNDS} attempts")

    # -- the host app's side -------------------------------------------------------

    def initiate_upload(self, owner_id: str, params: JSONDict | None = None, *,
                        content_type: str, sha256: str | None = None) -> UploadTicket:
        """Create a job in ``awaiting_upload`` and say how to upload its object."""
        owner_id = check_id(owner_id, "owner_id")
        params = json_object(params, "params")
        if not isinstance(content_type, str):
            raise InvalidInput("content_type must be a string")
        media_type = content_type.split(";")[0].strip().lower()
        if media_type not in self.policy.allowed_content_types:
            raise ContentTypeNotAllowed(content_type, self.policy.allowed_content_types)
        if sha256 is not None and not (isinstance(sha256, str) and _SHA256_HEX.match(sha256)):
            raise InvalidInput("sha256 must be 64 hexadecimal characters")
        job_id = parse_job_id(self._new_job_id())
        key = upload_key(job_id)
        ttl = int(self.policy.upload_ttl_seconds)
        presigned = self.objects.presign_upload(
            key, content_type=media_type, expires_in=ttl, min_bytes=self.policy.min_bytes,
            max_bytes=self.policy.max_bytes, sha256=sha256.lower() if sha256 else None)
        change = states.new_job(
            job_id=job_id, owner_id=owner_id, params=params, bucket=self.objects.bucket,
            key=key, content_type=media_type,
            expected_sha256=sha256.lower() if sha256 else None, now=self.now(),
            policy=self.policy)
        job = self._logged(change, self.store.create(change))
        return UploadTicket(
            job_id=job.id, bucket=job.bucket, key=job.key, method=presigned.method,
            url=presigned.url, headers=presigned.headers, fields=presigned.fields,
            expires_at=job.upload_expires_at)

    def complete_upload(self, job_id: str, *, owner_id: str | None = None) -> Job:
        """Ask the object store whether the upload is there and acceptable.

        Idempotent. Returns the job once queued (or later). Raises
        :class:`UploadMissing` (job keeps waiting), :class:`UploadRejected` or
        :class:`UploadExpired` (job failed), :class:`StorageUnavailable`
        (nothing changed).
        """
        for _ in range(_MAX_ROUNDS):
            job = self.get(job_id, owner_id=owner_id)
            if job.status is not JobStatus.AWAITING_UPLOAD:
                return self._settled(job)
            info = self.objects.head(job.key)
            change = states.settle_upload(job, self._evidence(obj=info))
            written = self.store.commit(change)
            if written is None:
                continue  # a concurrent completion or reconcile won; look again
            self._logged(change, written)
            self._discard_failed_upload(change)
            error = states.upload_error(change)
            if error is not None:
                raise error
            return written
        raise StorageUnavailable(f"job {job_id} kept changing under {_MAX_ROUNDS} attempts")

    @staticmethod
    def _settled(job: Job) -> Job:
        """``complete_upload`` on a job that already left ``awaiting_upload``."""
        if job.upload_verified_at is not None:
            return job
        if job.error_code == ErrorCode.UPLOAD_REJECTED.value:
            raise UploadRejected(job.id, job.error_message or "rejected")
        if job.error_code == ErrorCode.UPLOAD_EXPIRED.value:
            raise UploadExpired(job.id)
        raise InvalidTransition(job.id, job.status.value, Event.VERIFY_UPLOAD.value)

    def get(self, job_id: str, *, owner_id: str | None = None) -> Job:
        """The job; :class:`JobNotFound` if unknown or owned by someone else."""
        job_id = parse_job_id(job_id)
        job = self.store.get(job_id)
        if owner_id is not None and job.owner_id != owner_id:
            raise JobNotFound(job_id)
        return job

    def history(self, job_id: str, *, owner_id: str | None = None) -> list[JobEvent]:
        """The job's transitions, oldest first."""
        job = self.get(job_id, owner_id=owner_id)
        return self.store.history(job.id)

    def cancel(self, job_id: str, *, owner_id: str | None = None) -> Job:
        """Fail a job that has not started (``awaiting_upload`` or ``queued``)."""
        return self._transition(
            job_id, lambda job: states.apply(job, Event.CANCEL, self._evidence()), owner_id)

    def requeue(self, job_id: str) -> Job:
        """Admin: put a failed job back in the queue, after verifying its object again."""
        def decide(job: Job) -> Change:
            if (Event.REQUEUE, job.status) not in states.TABLE:
                raise InvalidTransition(job.id, job.status.value, Event.REQUEUE.value)
            return states.apply(job, Event.REQUEUE,
                                self._evidence(obj=self.objects.head(job.key)))
        return self._transition(job_id, decide)

    def counts(self) -> dict[JobStatus, int]:
        return self.store.counts()

    def stuck_uploads(self, *, older_than: timedelta, limit: int = 1000) -> list[Job]:
        """Jobs still in ``awaiting_upload`` created more than ``older_than`` ago,
        oldest first; looks at the ``limit`` waiting jobs whose deadline is nearest."""
        cutoff = self.now() - older_than
        waiting = [job for job in self.store.awaiting_uploads(limit=limit)
                   if job.created_at <= cutoff]
        return sorted(waiting, key=lambda job: (job.created_at, job.id))

    def recent_failures(self, *, within: timedelta, limit: int = 1000) -> list[Job]:
        """Jobs that failed during the last ``within``, most recent first."""
        return self.store.failed_since(since=self.now() - within, limit=limit)

    # -- the worker's side ---------------------------------------------------------

    def claim(self, worker_id: str, *, limit: int = 1,
              lease_seconds: float | None = None) -> list[Claim]:
        """Take up to ``limit`` due, verified, queued jobs under a lease."""
        worker_id, lease = self._claim_args(worker_id, limit, lease_seconds)
        claims = self.store.claim(worker_id=worker_id, limit=limit, now=self.now(),
                                  lease_seconds=lease)
        return self._claimed(claims, worker_id)

    def _claim_args(self, worker_id: str, limit: int,
                    lease_seconds: float | None) -> tuple[str, float]:
        """The checked worker id and lease length of a claim."""
        worker_id = check_id(worker_id, "worker_id")
        if not isinstance(limit, int) or limit < 1:
            raise InvalidInput(f"limit must be a positive integer, got {limit!r}")
        lease = lease_seconds if lease_seconds is not None else self.policy.lease_seconds
        if lease <= 0:
            raise InvalidInput(f"lease_seconds must be > 0, got {lease!r}")
        return worker_id, lease

    def _claimed(self, claims: list[Claim], worker_id: str) -> list[Claim]:
        if claims and self._logs_transitions():
            for claim in claims:
                self._log_transition(Event.CLAIM, claim.job, JobStatus.QUEUED, worker_id)
        return claims

    def _leased(self, claim: Claim, decide: Callable[[Job, states.Evidence], Change],
                **evidence: Any) -> Job:
        """A lease holder's write. While its token is current only the holder
        changes the job, so the first round decides on the claim's own copy."""
        job = claim.job
        return self._transition(job.id, lambda current: decide(current, self._evidence(
            token=claim.token, worker_id=job.lease_owner, **evidence)), snapshot=job)

    @staticmethod
    def _event(event: Event) -> Callable[[Job, states.Evidence], Change]:
        return lambda job, evidence: states.apply(job, event, evidence)

    def heartbeat(self, claim: Claim, *, lease_seconds: float | None = None,
                  detail: JSONDict | None = None) -> Claim:
        """Extend the lease; :class:`LeaseLost` if it is no longer ours."""
        job = self._leased(claim, self._event(Event.HEARTBEAT), lease_seconds=lease_seconds,
                           detail=json_object(detail, "detail"))
        return Claim(job=job, token=claim.token)

    def succeed(self, claim: Claim, result: JSONDict | None = None) -> Job:
        """Finish the job as ``done`` with a JSON ``result``."""
        return self._leased(claim, self._event(Event.SUCCEED), result=json_object(result, "result"))

    def succeed_many(self, finished: Sequence[tuple[Claim, JSONDict | None]]
                     ) -> list[Job | LeaseLost]:
        """Finish a batch of claimed jobs as ``done``, each with its JSON result,
        in one store transaction (one statement on PostgreSQL).

        ``finished`` holds ``(claim, result)`` pairs for distinct jobs. Item
        ``i`` of the answer is what :meth:`succeed` would have returned for
        pair ``i`` (the ``done`` job) or, instead of raising it, the
        :class:`LeaseLost` for a claim whose lease is no longer held: that job
        was left unchanged. A result that is not a JSON object, or a job given
        twice, raises :class:`InvalidInput` before anything is written; the
        batch's write itself is all or nothing (:class:`StorageUnavailable`
        when the store is down).
        """
        batch = _SucceededBatch(self, finished)
        return batch.settle(self.store.commit_many(batch.changes) if batch.changes else [])

    def succeed_and_claim(self, finished: Sequence[tuple[Claim, JSONDict | None]],
                          worker_id: str, *, limit: int = 1, lease_seconds: float | None = None
                          ) -> tuple[list[Job | LeaseLost], list[Claim]]:
        """:meth:`succeed_many` and then :meth:`claim`, in one store transaction
        (one statement and one commit on PostgreSQL instead of two).

        The loop of a worker that finishes what it holds and takes more:
        ``outcomes, claims = flow.succeed_and_claim([(claim, result), ...],
        worker_id, limit=n)``. ``outcomes`` is what :meth:`succeed_many` would
        return, ``claims`` what :meth:`claim` would. If the store fails,
        neither the finishing writes nor the claim happened.
        """
        worker_id, lease = self._claim_args(worker_id, limit, lease_seconds)
        batch = _SucceededBatch(self, finished)
        written, claims = self.store.commit_and_claim(
            batch.changes, worker_id=worker_id, limit=limit, now=self.now(),
            lease_seconds=lease)
        return batch.settle(written), self._claimed(claims, worker_id)

    def claim_loop(self, worker_id: str, *, limit: int = 1,
                   lease_seconds: float | None = None) -> ClaimLoop:
        """Batches of up to ``limit`` claims, the next always claimed ahead, each
        batch finished with a later claim in one write: see :class:`ClaimLoop`."""
        worker_id, lease = self._claim_args(worker_id, limit, lease_seconds)
        return ClaimLoop(self, worker_id, limit=limit, lease_seconds=lease)

    def fail(self, claim: Claim, error: str, *, retryable: bool = True,
             retry_in: timedelta | None = None, error_code: str | None = None) -> Job:
        """Record a handler error: retry with backoff while attempts remain, else fail."""
        return self._leased(claim, states.finish_with_error,
                            error=str(error).replace("\x00", "\\0"), retryable=retryable,
                            retry_delay=retry_in, error_code=error_code)

    def release(self, claim: Claim, *, reason: str = "worker shutting down") -> Job:
        """Hand an unfinished job back to ``queued`` without spending an attempt."""
        return self._leased(claim, self._event(Event.RELEASE), error=reason)

    # -- housekeeping ---------------------------------------------------------------

    def reconcile(self, *, limit: int = 500) -> ReconcileReport:
        """Adopt or expire waiting uploads and rescue jobs whose lease expired.

        Safe to run from many processes at once: every write is compare-and-set.
        An upload is queued only if the object store shows a valid object.
        """
        now = self.now()
        outcome: dict[str, list[str]] = {name: [] for name in (
            "adopted", "rejected", "expired", "rescued", "lease_failed", "unavailable")}
        adopt_before = now - timedelta(seconds=self.policy.adopt_after_seconds)
        for job in self.store.awaiting_uploads(limit=limit):
            if job.created_at > adopt_before and job.upload_expires_at > now:
                continue  # the client is probably still uploading
            try:
                info = self.objects.head(job.key)
                change = states.settle_upload(job, self._evidence(now, obj=info))
            except UploadMissing:
                continue
            except StorageUnavailable:
                outcome["unavailable"].append(job.id)
                continue
            if self._commit_quietly(change):
                outcome[{Event.VERIFY_UPLOAD: "adopted", Event.REJECT_UPLOAD: "rejected",
                         Event.EXPIRE_UPLOAD: "expired"}[change.event]].append(job.id)
                self._discard_failed_upload(change)
        for job in self.store.expired_leases(now=now, limit=limit):
            change = states.apply(job, Event.RESCUE, self._evidence(now))
            if self._commit_quietly(change):
                key = "rescued" if change.after.status is JobStatus.QUEUED else "lease_failed"
                outcome[key].append(job.id)
        report = ReconcileReport(**{k: tuple(v) for k, v in outcome.items()})
        if report.total or report.unavailable:
            self._log.info("reconcile.done", **{k: len(v) for k, v in outcome.items()})
        return report

    def _discard_failed_upload(self, change: Change) -> None:
        """Delete a rejected or expired upload's object when the policy asks for it.

        The job has already failed; a delete that fails is logged and left to
        the bucket's own lifecycle rules, never undoing the transition.
        """
        if not self.policy.delete_rejected_uploads or change.event not in (
                Event.REJECT_UPLOAD, Event.EXPIRE_UPLOAD):
            return
        try:
            self.objects.delete(change.after.key)
        except JobflowError as exc:
            self._log.warning("upload.delete_failed", job_id=change.after.id,
                              key=change.after.key, error=str(exc))

    def _commit_quietly(self, change: Change) -> bool:
        """Commit; a lost race means another process already handled the job."""
        written = self.store.commit(change)
        if written is None:
            return False
        self._logged(change, written)
        return True


class _SucceededBatch:
    """The ``succeed`` decisions for a batch of claims, and what became of them.

    Each job is decided on its claim's own copy (as :meth:`JobFlow.succeed`
    does); a change that loses its compare-and-set is decided again on a
    fresh read, one job at a time.
    """

    def __init__(self, flow: JobFlow,
                 finished: Sequence[tuple[Claim, JSONDict | None]]) -> None:
        self._flow = flow
        self._pairs = [(claim, json_object(result, "result")) for claim, result in finished]
        job_ids = [claim.job.id for claim, _ in self._pairs]
        if len(set(job_ids)) != len(job_ids):
            raise InvalidInput("succeed_many takes each job at most once")
        self._outcomes: dict[int, Job | LeaseLost] = {}
        self._decided: list[tuple[int, Change]] = []
        now = flow.now()  # one write, one instant
        for index, (claim, result) in enumerate(self._pairs):
            try:
                self._decided.append((index, self._decide(claim, result, now)(claim.job)))
            except LeaseLost as lost:
                self._outcomes[index] = lost

    @property
    def changes(self) -> list[Change]:
        return [change for _, change in self._decided]

    def _decide(self, claim: Claim, result: JSONDict,
                now: datetime | None = None) -> Callable[[Job], Change]:
        """``succeed`` for ``claim``, at ``now`` (default: the flow's clock, read
        when deciding, as a retry after a lost race does)."""
        flow = self._flow
        return lambda job: states.apply(job, Event.SUCCEED, flow._evidence(
            now, token=claim.token, worker_id=claim.job.lease_owner, result=result))

    def settle(self, written: Sequence[Job | None]) -> list[Job | LeaseLost]:
        """The outcomes, in the order of the pairs, once the store wrote ``written``."""
        flow, outcomes = self._flow, self._outcomes
        log = flow._logs_transitions()
        for (index, change), job in zip(self._decided, written, strict=True):
            if job is not None:
                outcomes[index] = flow._logged(change, job) if log else job
                continue
            claim, result = self._pairs[index]
            try:  # lost the race: decide again on a fresh read, as succeed does
                outcomes[index] = flow._transition(claim.job.id, self._decide(claim, result))
            except LeaseLost as lost:
                outcomes[index] = lost
        return [outcomes[index] for index in range(len(self._pairs))]


class ClaimLoop:
    """Claims jobs in batches and finishes those that succeeded, one write ahead::

        with flow.claim_loop("worker-1", limit=100) as loop:
            for claims in loop:
                loop.succeed([(claim, handle(claim.job)) for claim in claims])

    Iterating gives batches of up to ``limit`` claims until a claim finds no
    job. :meth:`succeed` finishes the jobs of the batch just given out (each
    its own compare-and-set on status and lease token, as
    :meth:`JobFlow.succeed_many`) in one write with the claim of a later
    batch: the next batch was claimed ahead while the caller ran this one.
    On PostgreSQL these writes go in libpq's pipeline mode on one connection,
    so the database runs one while the caller works; elsewhere the same
    calls are made one at a time.

    A batch waits a batch's time before it is given out, under its lease:
    choose ``lease_seconds`` longer than two batches take to run. A claim
    whose lease ran out while it waited is not given out (``reconcile``
    rescues its job), so no job is run by two workers at once.

    The jobs of a batch not passed to :meth:`succeed` are the caller's to
    :meth:`~JobFlow.fail` or :meth:`~JobFlow.release`. A job whose lease was
    lost is not finished; its :class:`~jobflow.errors.LeaseLost` is kept in
    :attr:`lost`. Leaving the loop waits for the writes in flight and hands
    back (releases) the jobs claimed ahead and not given out. When the store
    fails the loop raises :class:`~jobflow.errors.StorageUnavailable`; the
    writes in flight then may or may not have been made (each in full or not
    at all), and jobs left running are rescued when their leases expire.
    """

    def __init__(self, flow: JobFlow, worker_id: str, *, limit: int,
                 lease_seconds: float) -> None:
        self._flow = flow
        self._worker_id, self._limit, self._lease_seconds = worker_id, limit, lease_seconds
        self._pipeline: ClaimPipeline | None = None
        self._used = False
        self._owed = False  # a batch was given out and not yet followed by a write
        #: The lost leases of the jobs passed to :meth:`succeed` so far.
        self.lost: list[LeaseLost] = []

    def __enter__(self) -> ClaimLoop:
        if self._used:
            raise RuntimeError("a ClaimLoop runs once; create a new one")
        self._used = True
        flow, worker_id, limit, lease = (self._flow, self._worker_id, self._limit,
                                         self._lease_seconds)
        open_pipeline = getattr(flow.store, "claim_pipeline", None)
        pipeline: ClaimPipeline | None = None
        if open_pipeline is not None:
            pipeline = open_pipeline(worker_id=worker_id, limit=limit, lease_seconds=lease)
        self._pipeline = pipeline or _OneAtATime(flow.store, worker_id=worker_id, limit=limit,
                                                 lease_seconds=lease)
        try:
            for _ in range(2):  # the first batch, and the one claimed ahead
                self._pipeline.send(None, [], now=flow.now())
        except BaseException:
            self._pipeline.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        pipeline = self._running()
        self._pipeline = None
        ahead: list[Claim] = []
        try:
            try:
                while pipeline.in_flight:
                    ahead += self._receive(pipeline)
            finally:
                pipeline.close()  # before the releases, which take connections of their own
            for claim in ahead:
                self._flow.release(claim, reason="claimed ahead, not started")
        except JobflowError as failure:
            if exc_type is None:
                raise
            self._flow._log.warning("claim_loop.close_failed", error=str(failure))

    def __iter__(self) -> ClaimLoop:
        return self

    def __next__(self) -> list[Claim]:
        pipeline = self._running()
        if self._owed:  # the last batch was finished some other way: claim on
            self._owed = False
            pipeline.send(None, [], now=self._flow.now())
        while pipeline.in_flight:
            received = self._receive(pipeline)
            now = self._flow.now()
            claims = [claim for claim in received if claim.job.lease_expires_at is None
                      or claim.job.lease_expires_at > now]
            if claims:
                self._owed = True
                return claims
            if received:  # their leases ran out while they waited: claim on
                pipeline.send(None, [], now=now)
        raise StopIteration

    def succeed(self, finished: Sequence[tuple[Claim, JSONDict | None]]) -> None:
        """Finish these claimed jobs, each with its result (a JSON object or None),
        in one write with the claim of a later batch; once per batch given out."""
        pipeline = self._running()
        if not self._owed:
            raise InvalidInput("succeed() takes the jobs of the batch just given out, once")
        batch = _SucceededBatch(self._flow, finished)
        pipeline.send(batch, batch.changes, now=self._flow.now())
        self._owed = False

    def _running(self) -> ClaimPipeline:
        if self._pipeline is None:
            raise RuntimeError("use a ClaimLoop inside its with block")
        return self._pipeline

    def _receive(self, pipeline: ClaimPipeline) -> list[Claim]:
        token, written, claims = pipeline.receive()
        if isinstance(token, _SucceededBatch):
            self.lost.extend(outcome for outcome in token.settle(written)
                             if isinstance(outcome, LeaseLost))
        return self._flow._claimed(claims, self._worker_id)


class _OneAtATime:
    """A :class:`~jobflow.ports.ClaimPipeline` for stores without one: each
    write is made when it is sent."""

    def __init__(self, store: JobStore, *, worker_id: str, limit: int,
                 lease_seconds: float) -> None:
        self._store = store
        self._worker_id, self._limit, self._lease_seconds = worker_id, limit, lease_seconds
        self._outcomes: deque[tuple[object, list[Job | None], list[Claim]]] = deque()

    @property
    def in_flight(self) -> int:
        return len(self._outcomes)

    def send(self, token: object, changes: Sequence[Change], *, now: datetime) -> None:
        self._outcomes.append((token, *self._store.commit_and_claim(
            changes, worker_id=self._worker_id, limit=self._limit, now=now,
            lease_seconds=self._lease_seconds)))

    def receive(self) -> tuple[object, list[Job | None], list[Claim]]:
        return self._outcomes.popleft()

    def close(self) -> None:
        self._outcomes.clear()
