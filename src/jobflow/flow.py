"""The JobFlow facade: what a host web app, the worker and the CLI call.

Each method reads a snapshot, asks :mod:`jobflow.states` what to write, and
hands the resulting change to the job store's compare-and-set. The only I/O
is through the injected ports; the only clock is the injected one.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
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
from jobflow.keys import default_worker_id, new_job_id, parse_job_id, upload_key
from jobflow.logconfig import library_logger
from jobflow.metrics import JobflowMetrics, default_metrics, instrument_objects
from jobflow.models import (
    Change,
    Claim,
    Deferred,
    ErrorCode,
    Event,
    Failed,
    Job,
    JobEvent,
    JobStatus,
    JSONDict,
    ObjectInfo,
    Outcome,
    PurgeReport,
    ReconcileReport,
    Released,
    RequeueReport,
    Succeeded,
    UploadPolicy,
    UploadTicket,
    media_type,
)
from jobflow.ports import Clock, JobStore, ObjectStore

MAX_ID_LENGTH = 255
#: The most a JSON object given to jobflow (params, result, heartbeat detail)
#: may take, encoded as UTF-8 JSON, and how deeply it may nest.
MAX_JSON_BYTES = 64 * 1024
MAX_JSON_DEPTH = 32
#: Error messages (``fail``) are cut to this many characters.
MAX_ERROR_LENGTH = 4000
#: The most jobs one claim may take.
MAX_CLAIM_LIMIT = 10_000
#: The longest retry delay ``fail`` accepts.
MAX_RETRY_DELAY = timedelta(days=365)
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
# Control characters (C0, DEL, C1): an id holding one could forge log lines or
# terminal output, and it is never a real owner or worker name.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# A compare-and-set that loses re-reads the job and decides again; after this
# many lost rounds in a row the caller gets the last refusal instead.
_MAX_ROUNDS = 5
#: The longest lease a claim or heartbeat may ask for (a week): longer is a mistake.
MAX_LEASE_SECONDS = 7 * 24 * 3600.0
#: Where a bulk requeue without ``since`` starts: before any job finished, and
#: the smallest job id.
_BEGINNING = (datetime(1970, 1, 1, tzinfo=UTC), "00000000-0000-0000-0000-000000000000")
#: How long one reconcile pass spends checking waiting uploads by default, seconds.
RECONCILE_BUDGET_SECONDS = 10.0
#: The longest budget a reconcile pass takes (an hour).
MAX_RECONCILE_BUDGET = 3600.0

#: A decision on a lease holder's job, given the evidence.
_Decide = Callable[[Job, states.Evidence], Change]


def utc_now() -> datetime:
    return datetime.now(UTC)


def _depth(value: Any, limit: int) -> int:
    """How deeply ``value`` nests (lists and dicts), counting no further than
    ``limit + 1`` (so that a 1,000-deep value costs no recursion)."""
    depth, level = 0, [value]
    while level and depth <= limit:
        depth += 1
        level = [child for item in level if isinstance(item, dict | list)
                 for child in (item.values() if isinstance(item, dict) else item)]
        level = [item for item in level if isinstance(item, dict | list)]
    return depth


def json_object(value: Any, what: str) -> JSONDict:
    """A JSON round-trip copy of ``value``, which must be a JSON object of at
    most :data:`MAX_JSON_BYTES` (as UTF-8 JSON) nesting at most
    :data:`MAX_JSON_DEPTH` levels."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be a JSON object (a dict), got {type(value).__name__}")
    if _depth(value, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise InvalidInput(f"{what} nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        text = json.dumps(value, allow_nan=False, ensure_ascii=False)
        size = len(text.encode("utf-8"))
    except (TypeError, ValueError) as exc:  # UnicodeEncodeError (a lone surrogate) included
        raise InvalidInput(f"{what} is not JSON-serialisable: {exc}") from exc
    if size > MAX_JSON_BYTES:
        raise InvalidInput(f"{what} takes {size} bytes as JSON, more than {MAX_JSON_BYTES}")
    copied: JSONDict = json.loads(text)
    return copied


def check_id(value: Any, what: str) -> str:
    """Owner and worker ids are data only; they must still be sane strings:
    1..:data:`MAX_ID_LENGTH` characters of valid Unicode, no control characters."""
    if not isinstance(value, str) or not value or len(value) > MAX_ID_LENGTH:
        raise InvalidInput(f"{what} must be a string of 1..{MAX_ID_LENGTH} characters")
    if _CONTROL.search(value):
        raise InvalidInput(f"{what} must not contain control characters (NUL, newlines, "
                           f"escapes)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInput(f"{what} is not valid Unicode: {exc.reason}") from exc
    return value


def _error_text(error: Any) -> str:
    """An error message as stored: text, NUL and lone surrogates made visible,
    cut to :data:`MAX_ERROR_LENGTH` characters."""
    text = str(error).replace("\x00", "\\0")
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(text) > MAX_ERROR_LENGTH:
        text = text[: MAX_ERROR_LENGTH - 3] + "..."
    return text


def _retry_in(retry_in: Any) -> timedelta | None:
    """A delay before the next attempt: None (the policy's) or 0..:data:`MAX_RETRY_DELAY`."""
    return None if retry_in is None else _duration(retry_in, "retry_in", most=MAX_RETRY_DELAY)


def _error_code(code: Any) -> str | None:
    return None if code is None else check_id(code, "error_code")


def _check_claim(claim: Any) -> Claim:
    """A claim as :meth:`JobFlow.claim` hands them out (its lease may be lost)."""
    if not (isinstance(claim, Claim) and isinstance(claim.job, Job)
            and isinstance(claim.token, str)):
        raise InvalidInput(f"expected a Claim from JobFlow.claim, got {type(claim).__name__}")
    return claim


def _items(value: Any, what: str) -> list[Any]:
    """The items of a batch argument (a list or tuple)."""
    if not isinstance(value, list | tuple):
        raise InvalidInput(f"{what} must be a list, got {type(value).__name__}")
    return list(value)


def _limit(value: Any, what: str, most: int) -> int:
    """A count in ``1..most``."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
        raise InvalidInput(f"{what} must be an integer in 1..{most}, got {value!r}")
    return value


def _duration(value: Any, what: str, *, most: timedelta = timedelta(days=3650)) -> timedelta:
    """A length of time, not negative, of at most ``most`` (ten years)."""
    if not isinstance(value, timedelta) or not timedelta(0) <= value <= most:
        raise InvalidInput(f"{what} must be a timedelta of 0..{most.days} days, got {value!r}")
    return value


def _seconds(value: Any, what: str, *, most: float, zero: bool) -> float:
    """A finite number of seconds up to ``most``: from 0 with ``zero``, else above 0."""
    if (isinstance(value, bool) or not isinstance(value, int | float)
            or not math.isfinite(value) or not (value >= 0 if zero else value > 0)
            or not value <= most):
        raise InvalidInput(f"{what} must be a number of seconds in "
                           f"{'[' if zero else '('}0, {most:g}], got {value!r}")
    return float(value)


def _budget(seconds: Any) -> float:
    """A reconcile pass's budget: 0 (rescue leases only) up to an hour."""
    return _seconds(seconds, "budget_seconds", most=MAX_RECONCILE_BUDGET, zero=True)


def _check_lease(seconds: Any) -> float:
    """A lease length: more than 0 seconds, at most :data:`MAX_LEASE_SECONDS`."""
    return _seconds(seconds, "lease_seconds", most=MAX_LEASE_SECONDS, zero=False)


class JobFlow:
    """Upload-first jobs: create, verify, claim, finish, reconcile.

    ``clock`` is a zero-argument callable returning an aware UTC datetime
    (default: the store's ``clock`` when it has one, such as the database's
    time on PostgreSQL, so that every host judges leases by the same clock;
    else the system clock). ``policy`` is the :class:`UploadPolicy`
    applied to every upload and attempt. ``new_job_id`` makes job ids (default:
    random UUIDs; tests pass a deterministic one). ``metrics`` records what
    the flow does, its object store calls included (default: the process-wide
    :func:`~jobflow.metrics.default_metrics`).
    """

    def __init__(self, *, store: JobStore, objects: ObjectStore, clock: Clock | None = None,
                 policy: UploadPolicy | None = None,
                 logger: structlog.typing.FilteringBoundLogger | None = None,
                 new_job_id: Callable[[], str] = new_job_id,
                 metrics: JobflowMetrics | None = None) -> None:
        self.store = store
        self.metrics = metrics if metrics is not None else default_metrics()
        self.objects = instrument_objects(objects, self.metrics)
        self.policy = policy or UploadPolicy()
        self._clock: Callable[[], datetime] = clock or getattr(store, "clock", None) or utc_now
        self._new_job_id = new_job_id
        self._log: structlog.typing.FilteringBoundLogger = logger or library_logger("jobflow")

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

    def _logged(self, change: Change, job: Job, *, log: bool = True) -> Job:
        """Every written transition passes here: counted in the metrics, always,
        and logged (unless a batch found INFO lines off: ``log``)."""
        self.metrics.transition(change, job)
        if log:
            self._log_transition(change.event, job,
                                 change.before.status if change.before else None,
                                 change.worker_id)
        return job

    def _head(self, job: Job) -> ObjectInfo | None:
        """The object store's HEAD of ``job``'s upload. An answer that decides
        nothing by itself is counted here (no object, an outage, a setup
        error); what a verification writes is counted with the transition."""
        try:
            info = self.objects.head(job.key)
        except StorageUnavailable:
            self.metrics.upload_checked("storage_unavailable")
            raise
        except JobflowError:
            self.metrics.upload_checked("error")
            raise
        if info is None:
            self.metrics.upload_checked("missing")
        return info

    def _transition(self, job_id: str, decide: Callable[[Job], Change | None],
                    owner_id: str | None = None, *, snapshot: Job | None = None) -> Job:
        """Decide and compare-and-set, re-deciding on a fresh read after a lost race.
        A decision of None means the job already is as asked: nothing is written.

        ``snapshot`` is a copy the caller already holds (a worker's claim): the
        first round decides on it without reading, and the compare-and-set
        checks that it still describes the job.
        """
        for _ in range(_MAX_ROUNDS):
            job = snapshot if snapshot is not None else self.get(job_id, owner_id=owner_id)
            snapshot = None
            change = decide(job)
            if change is None:
                return job
            written = self.store.commit(change)
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
        declared = media_type(content_type)
        if declared not in self.policy.allowed_content_types:
            raise ContentTypeNotAllowed(content_type, self.policy.allowed_content_types)
        if sha256 is not None and not (isinstance(sha256, str)
                                       and _SHA256_HEX.fullmatch(sha256)):
            raise InvalidInput("sha256 must be 64 hexadecimal characters")
        job_id = parse_job_id(self._new_job_id())
        key = upload_key(job_id)
        ttl = int(self.policy.upload_ttl_seconds)
        presigned = self.objects.presign_upload(
            key, content_type=declared, expires_in=ttl, min_bytes=self.policy.min_bytes,
            max_bytes=self.policy.max_bytes, sha256=sha256.lower() if sha256 else None)
        change = states.new_job(
            job_id=job_id, owner_id=owner_id, params=params, bucket=self.objects.bucket,
            key=key, content_type=declared,
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
            info = self._head(job)
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
        """Fail a job that has not started (``awaiting_upload`` or ``queued``) as
        ``cancelled``; ask a running one to stop. A running job keeps its lease
        and gets ``cancel_requested_at``: its worker learns of it when it renews
        the lease and ends the attempt as ``failed`` (``cancelled``), unless the
        handler finishes first. Asking again changes nothing. A finished job
        refuses it (:class:`InvalidTransition`)."""
        return self._transition(
            job_id, lambda job: states.cancel(job, self._evidence()), owner_id)

    def requeue(self, job_id: str) -> Job:
        """Admin: put a failed job back in the queue, after verifying its object again."""
        return self._transition(job_id, self._requeue_decision)

    def _requeue_decision(self, job: Job, error_code: str | None = None) -> Change:
        """Requeue ``job`` (only if it failed with ``error_code``, when given) on the
        object store's HEAD, taken now: an old verification is never trusted."""
        if (Event.REQUEUE, job.status) not in states.TABLE or (
                error_code is not None and job.error_code != error_code):
            raise InvalidTransition(job.id, job.status.value, Event.REQUEUE.value)
        return states.apply(job, Event.REQUEUE, self._evidence(obj=self._head(job)))

    def counts(self) -> dict[JobStatus, int]:
        return self.store.counts()

    def stuck_uploads(self, *, older_than: timedelta, limit: int = 1000) -> list[Job]:
        """Jobs still in ``awaiting_upload`` created more than ``older_than`` ago,
        oldest first; looks at the ``limit`` waiting jobs whose deadline is nearest."""
        cutoff = self.now() - _duration(older_than, "older_than")
        waiting = [job for job in self.store.awaiting_uploads(
                   limit=_limit(limit, "limit", MAX_CLAIM_LIMIT))
                   if job.created_at <= cutoff]
        return sorted(waiting, key=lambda job: (job.created_at, job.id))

    def recent_failures(self, *, within: timedelta, limit: int = 1000) -> list[Job]:
        """Jobs that failed during the last ``within``, most recent first."""
        return self.store.failed_since(since=self.now() - _duration(within, "within"),
                                       limit=_limit(limit, "limit", MAX_CLAIM_LIMIT))

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
        _limit(limit, "limit", MAX_CLAIM_LIMIT)
        lease = lease_seconds if lease_seconds is not None else self.policy.lease_seconds
        return worker_id, _check_lease(lease)

    def _claimed(self, claims: list[Claim], worker_id: str) -> list[Claim]:
        self.metrics.claimed(claims)
        if claims and self._logs_transitions():
            for claim in claims:
                self._log_transition(Event.CLAIM, claim.job, JobStatus.QUEUED, worker_id)
        return claims

    def _as_holder(self, claim: Claim, decide: _Decide, evidence: dict[str, Any],
                   now: datetime | None = None) -> Callable[[Job], Change]:
        """``decide`` as the holder of ``claim``'s lease, at ``now`` (default: the
        clock, read when deciding)."""
        return lambda job: decide(job, self._evidence(
            now, token=claim.token, worker_id=claim.job.lease_owner, **evidence))

    def _leased(self, claim: Claim, decide: _Decide, evidence: dict[str, Any]) -> Job:
        """A lease holder's write. While its token is current only the holder
        changes the job, so the first round decides on the claim's own copy."""
        _check_claim(claim)
        try:
            return self._transition(claim.job.id, self._as_holder(claim, decide, evidence),
                                    snapshot=claim.job)
        except LeaseLost as lost:
            self.metrics.lease_lost(lost)
            raise

    def _leased_many(self, writes: Sequence[tuple[Claim, _Decide, dict[str, Any]]]
                     ) -> list[Job | LeaseLost]:
        """Lease holders' writes to distinct jobs, decided at one instant and
        written in one store call (each its own compare-and-set); a write that
        loses is decided again on a fresh read, as :meth:`_leased` does. Item
        ``i`` is the written job, or the :class:`LeaseLost` of write ``i``."""
        job_ids = [_check_claim(claim).job.id for claim, _, _ in writes]
        if len(set(job_ids)) != len(job_ids):
            raise InvalidInput("a batch takes each job at most once")
        now = self.now()
        outcomes: dict[int, Job | LeaseLost] = {}
        decided: list[tuple[int, Change]] = []
        for index, (claim, decide, evidence) in enumerate(writes):
            try:
                decided.append((index, self._as_holder(claim, decide, evidence, now)(claim.job)))
            except LeaseLost as lost:
                outcomes[index] = lost
        written = self.store.commit_many([change for _, change in decided]) if decided else []
        log = self._logs_transitions()
        for (index, change), job in zip(decided, written, strict=True):
            if job is not None:
                outcomes[index] = self._logged(change, job, log=log)
                continue
            claim, decide, evidence = writes[index]
            try:  # lost the race: decide again on a fresh read
                outcomes[index] = self._transition(claim.job.id,
                                                   self._as_holder(claim, decide, evidence))
            except LeaseLost as lost:
                outcomes[index] = lost
        answers = [outcomes[index] for index in range(len(writes))]
        for answer in answers:
            if isinstance(answer, LeaseLost):
                self.metrics.lease_lost(answer)
        return answers

    @staticmethod
    def _event(event: Event) -> _Decide:
        return lambda job, evidence: states.apply(job, event, evidence)

    def _heartbeat_evidence(self, lease_seconds: float | None,
                            detail: JSONDict | None) -> dict[str, Any]:
        if lease_seconds is not None:
            _check_lease(lease_seconds)
        return {"lease_seconds": lease_seconds, "detail": json_object(detail, "detail")}

    def heartbeat(self, claim: Claim, *, lease_seconds: float | None = None,
                  detail: JSONDict | None = None) -> Claim:
        """Extend the lease; :class:`LeaseLost` if it is no longer ours."""
        job = self._leased(claim, self._event(Event.HEARTBEAT),
                           self._heartbeat_evidence(lease_seconds, detail))
        return Claim(job=job, token=claim.token)

    def heartbeat_many(self, claims: Sequence[Claim], *, lease_seconds: float | None = None
                       ) -> list[Claim | LeaseLost]:
        """Extend the leases of several claims in one store call (one statement on
        PostgreSQL); item ``i`` is claim ``i`` renewed, or its :class:`LeaseLost`."""
        claims = _items(claims, "claims")
        evidence = self._heartbeat_evidence(lease_seconds, None)
        written = self._leased_many([(claim, self._event(Event.HEARTBEAT), evidence)
                                     for claim in claims])
        return [outcome if isinstance(outcome, LeaseLost)
                else Claim(job=outcome, token=claim.token)
                for claim, outcome in zip(claims, written, strict=True)]

    def succeed(self, claim: Claim, result: JSONDict | None = None) -> Job:
        """Finish the job as ``done`` with a JSON ``result``."""
        return self._leased(claim, *self._finishing(Succeeded(claim, result)))

    def fail(self, claim: Claim, error: str, *, retryable: bool = True,
             retry_in: timedelta | None = None, error_code: str | None = None) -> Job:
        """Record a handler error: retry with backoff while attempts remain, else fail."""
        return self._leased(claim, *self._finishing(Failed(
            claim, error, retryable=retryable, retry_in=retry_in, error_code=error_code)))

    def defer(self, claim: Claim, error: str, *, retry_in: timedelta | None = None,
              error_code: str | None = None) -> Job:
        """The attempt could not run for a reason outside the job (the object
        store was unavailable): back to ``queued`` after the policy's deferral
        backoff (or ``retry_in``), the attempt given back and counted in
        ``deferrals``; ``failed`` with ``error_code`` (default
        ``storage_unavailable``) once the policy's ``max_deferrals`` are spent."""
        return self._leased(claim, *self._finishing(Deferred(
            claim, error, retry_in=retry_in, error_code=error_code)))

    def release(self, claim: Claim, *, reason: str = "worker shutting down") -> Job:
        """Hand an unfinished job back to ``queued`` without spending an attempt."""
        return self._leased(claim, *self._finishing(Released(claim, reason)))

    def finish_many(self, outcomes: Sequence[Outcome]) -> list[Job | LeaseLost]:
        """End a batch of claimed attempts in one store call (one statement on
        PostgreSQL): each :class:`~jobflow.models.Succeeded`,
        :class:`~jobflow.models.Failed`, :class:`~jobflow.models.Released` or
        :class:`~jobflow.models.Deferred` is written as :meth:`succeed`,
        :meth:`fail`, :meth:`release` or :meth:`defer` would,
        with its own compare-and-set on the lease token and its history row.

        Item ``i`` of the answer is the job as written for outcome ``i`` or,
        instead of raising it, the :class:`LeaseLost` of a claim whose lease is
        no longer held (that job was left unchanged). A job given twice or a
        result that is not a JSON object raises :class:`InvalidInput` before
        anything is written; the store's write is all or nothing
        (:class:`StorageUnavailable` when the store is down).
        """
        writes = []
        for outcome in _items(outcomes, "outcomes"):
            decide, evidence = self._finishing(outcome)
            writes.append((outcome.claim, decide, evidence))
        return self._leased_many(writes)

    def _finishing(self, outcome: Outcome) -> tuple[_Decide, dict[str, Any]]:
        """How ``outcome`` is decided, and the evidence it brings."""
        if isinstance(outcome, Succeeded):
            return self._event(Event.SUCCEED), {"result": json_object(outcome.result, "result")}
        if isinstance(outcome, Failed):
            return states.finish_with_error, {
                "error": _error_text(outcome.error), "retryable": bool(outcome.retryable),
                "retry_delay": _retry_in(outcome.retry_in),
                "error_code": _error_code(outcome.error_code)}
        if isinstance(outcome, Released):
            return self._event(Event.RELEASE), {
                "error": _error_text(outcome.reason)}
        if isinstance(outcome, Deferred):
            return self._event(Event.DEFER), {
                "error": _error_text(outcome.error), "retry_delay": _retry_in(outcome.retry_in),
                "error_code": _error_code(outcome.error_code)}
        raise InvalidInput(f"finish_many takes Succeeded, Failed, Released or Deferred "
                           f"outcomes, not {type(outcome).__name__}")

    # -- housekeeping ---------------------------------------------------------------

    def reconcile(self, *, limit: int = 500, rescuer_id: str | None = None,
                  budget_seconds: float = RECONCILE_BUDGET_SECONDS) -> ReconcileReport:
        """Rescue jobs whose lease expired, then adopt or expire waiting uploads.

        Two passes. The rescue needs only the job store, and runs first: a
        slow or hung object store never delays it. Then each waiting upload
        due for a look (older than the policy's ``adopt_after_seconds``, or
        past its deadline) is checked with the object store's HEAD, within
        ``budget_seconds`` of wall time: no check starts once the budget is
        spent, so the pass ends within the budget plus one check (each
        bounded by the object store's own timeouts). The first
        :class:`StorageUnavailable` ends the checks too: that upload is
        reported ``unavailable``, and the uploads not checked, for either
        reason, ``skipped``. An outage is never taken for a missing object,
        and costs one timeout per pass, not one per upload.

        Safe to run from many processes at once: every write is compare-and-set.
        An upload is queued only if the object store shows a valid object.
        ``rescuer_id`` names this process in the history rows of its rescues
        (default: ``host:pid:random``, as a worker's default id); the lost
        worker is in their detail.
        """
        limit = _limit(limit, "limit", MAX_CLAIM_LIMIT)
        rescuer_id = (default_worker_id() if rescuer_id is None
                      else check_id(rescuer_id, "rescuer_id"))
        budget = _budget(budget_seconds)
        now = self.now()
        outcome: dict[str, list[str]] = {name: [] for name in (
            "adopted", "rejected", "expired", "rescued", "lease_failed", "unavailable",
            "skipped")}
        self._rescue_expired_leases(now, limit, outcome, rescuer_id)
        self._settle_waiting_uploads(now, limit, time.monotonic() + budget, outcome)
        report = ReconcileReport(**{k: tuple(v) for k, v in outcome.items()})
        if report.total or report.unavailable or report.skipped:
            self._log.info("reconcile.done", **{k: len(v) for k, v in outcome.items()})
        return report

    def _rescue_expired_leases(self, now: datetime, limit: int,
                               outcome: dict[str, list[str]], rescuer_id: str) -> None:
        """Reconcile's first pass: requeue (or fail) jobs whose lease expired."""
        for job in self.store.expired_leases(now=now, limit=limit):
            change = states.apply(job, Event.RESCUE, self._evidence(now, worker_id=rescuer_id))
            if self._commit_quietly(change):
                key = "rescued" if change.after.status is JobStatus.QUEUED else "lease_failed"
                outcome[key].append(job.id)

    def _settle_waiting_uploads(self, now: datetime, limit: int, give_up_at: float,
                                outcome: dict[str, list[str]]) -> None:
        """Reconcile's second pass: verify, reject or expire the waiting uploads
        due for a look, until ``give_up_at`` (``time.monotonic()``) or the
        object store's first outage."""
        adopt_before = now - timedelta(seconds=self.policy.adopt_after_seconds)
        stopped = False
        for job in self.store.awaiting_uploads(limit=limit):
            if job.created_at > adopt_before and job.upload_expires_at > now:
                continue  # the client is probably still uploading
            if stopped or time.monotonic() >= give_up_at:
                outcome["skipped"].append(job.id)
                continue
            try:
                info = self._head(job)
                change = states.settle_upload(job, self._evidence(now, obj=info))
            except UploadMissing:
                continue
            except StorageUnavailable as exc:
                self._log.warning("reconcile.objects_unavailable", job_id=job.id,
                                  error=str(exc))
                outcome["unavailable"].append(job.id)
                stopped = True
                continue
            if self._commit_quietly(change):
                outcome[{Event.VERIFY_UPLOAD: "adopted", Event.REJECT_UPLOAD: "rejected",
                         Event.EXPIRE_UPLOAD: "expired"}[change.event]].append(job.id)
                self._discard_failed_upload(change)

    # -- retention and bulk recovery ------------------------------------------------

    def _cutoff(self, value: Any, what: str) -> datetime:
        """A moment in the past: ``value`` ago (a timedelta), or ``value`` itself
        (an aware datetime)."""
        if isinstance(value, datetime):
            if value.tzinfo is None or value.utcoffset() is None:
                raise InvalidInput(f"{what} must be timezone-aware, got {value!r}")
            return value
        return self.now() - _duration(value, what)

    def purge(self, finished_before: timedelta | datetime, *, batch_size: int = 500,
              delete_objects: bool = False, dry_run: bool = False) -> PurgeReport:
        """Delete the finished jobs (``done`` and ``failed``) that finished before
        ``finished_before`` (a moment, or a timedelta: that long ago), with their
        history, in batches of ``batch_size``, each its own short transaction. A
        job that is not finished is never deleted, nor one requeued meanwhile.

        With ``delete_objects``, each deleted job's object is deleted too, after
        its row is gone: a failure then leaves an orphan object, never a job
        whose object vanished. A failed object delete is logged and reported
        (``objects_failed``), not fatal; once the object store reports itself
        unavailable no further object is tried (each is reported). With
        ``dry_run``, nothing is deleted: the report counts what would be.
        """
        cutoff = self._cutoff(finished_before, "finished_before")
        batch_size = _limit(batch_size, "batch_size", MAX_CLAIM_LIMIT)
        jobs = events = 0
        if dry_run:
            for status in (JobStatus.DONE, JobStatus.FAILED):
                found, history = self.store.count_finished(status=status,
                                                           finished_before=cutoff)
                jobs, events = jobs + found, events + history
            return PurgeReport(finished_before=cutoff, jobs=jobs, events=events, dry_run=True)
        deleted = 0
        failed: list[str] = []
        objects_down = False
        for status in (JobStatus.DONE, JobStatus.FAILED):
            while True:
                batch = self.store.purge_finished(status=status, finished_before=cutoff,
                                                  limit=batch_size)
                jobs, events = jobs + len(batch.jobs), events + batch.events
                for job in batch.jobs if delete_objects else ():
                    result = "unavailable" if objects_down else self._delete_object(job)
                    objects_down = result == "unavailable"
                    if result == "deleted":
                        deleted += 1
                    else:
                        failed.append(job.key)
                if len(batch.jobs) < batch_size:
                    break
        report = PurgeReport(finished_before=cutoff, jobs=jobs, events=events,
                             objects_deleted=deleted, objects_failed=tuple(failed))
        self._log.info("purge.done", finished_before=cutoff.isoformat(), jobs=jobs,
                       events=events, objects_deleted=deleted, objects_failed=len(failed))
        return report

    def _delete_object(self, job: Job) -> str:
        """Delete a purged job's object: ``deleted``, ``failed``, or ``unavailable``
        (the object store reports itself down: the purge tries no more)."""
        if job.bucket != self.objects.bucket:  # never delete a key in the wrong bucket
            self._log.warning("purge.object_elsewhere", job_id=job.id, bucket=job.bucket,
                              key=job.key)
            return "failed"
        try:
            self.objects.delete(job.key)
        except JobflowError as exc:
            self._log.warning("purge.object_delete_failed", job_id=job.id, key=job.key,
                              error=str(exc))
            return "unavailable" if isinstance(exc, StorageUnavailable) else "failed"
        return "deleted"

    def requeue_failed(self, error_code: str, *, since: timedelta | None = None,
                       batch_size: int = 100, limit: int | None = None) -> RequeueReport:
        """Admin: requeue the failed jobs of one cause (``error_code``) that failed
        in the last ``since`` (default: whenever), oldest first, verifying each
        object again as :meth:`requeue` does; at most ``limit`` jobs (default:
        all), read in pages of ``batch_size``.

        A job whose object is missing or breaks its policy stays failed
        (``still_failing``). When a store is unavailable the pass stops there,
        cleanly (``stopped`` says why; the job at hand is in ``unavailable``):
        each requeue is one compare-and-set, so no job is half-written, and
        running it again carries on.
        """
        error_code = check_id(error_code, "error_code")
        batch_size = _limit(batch_size, "batch_size", MAX_CLAIM_LIMIT)
        if limit is not None:
            limit = _limit(limit, "limit", 10**9)
        cursor = _BEGINNING if since is None else (
            self.now() - _duration(since, "since"), _BEGINNING[1])
        outcome: dict[str, list[str]] = {name: [] for name in (
            "requeued", "still_failing", "skipped", "unavailable")}
        stopped: str | None = None
        seen = 0
        at_hand: str | None = None
        # Jobs that fail again while the pass runs are not its business: it would
        # chase them for as long as they fail.
        until = self.now()
        try:
            while limit is None or seen < limit:
                page_size = batch_size if limit is None else min(batch_size, limit - seen)
                page = [job for job in self.store.failed_after(
                    error_code=error_code, after=cursor, limit=page_size)
                    if job.finished_at is not None and job.finished_at <= until]
                for job in page:
                    at_hand = job.id
                    outcome[self._requeue_one(job.id, error_code)].append(job.id)
                    at_hand = None
                seen += len(page)
                if len(page) < page_size:
                    break
                cursor = (page[-1].finished_at or cursor[0], page[-1].id)
        except StorageUnavailable as exc:
            stopped = str(exc)
            outcome["unavailable"] += [at_hand] if at_hand is not None else []
            self._log.warning("requeue_failed.stopped", error_code=error_code, error=stopped,
                              requeued=len(outcome["requeued"]))
        report = RequeueReport(error_code=error_code, stopped=stopped,
                               **{name: tuple(ids) for name, ids in outcome.items()})
        self._log.info("requeue_failed.done", error_code=error_code,
                       **{name: len(ids) for name, ids in outcome.items()})
        return report

    def _requeue_one(self, job_id: str, error_code: str) -> str:
        """Requeue one job of a bulk requeue; which outcome of the report it is."""
        try:
            self._transition(job_id, lambda job: self._requeue_decision(job, error_code))
        except (UploadMissing, UploadRejected):
            return "still_failing"
        except (InvalidTransition, JobNotFound):
            return "skipped"  # changed (or purged) since it was listed
        return "requeued"

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
