"""The job state machine: pure decisions, no I/O, no clock reads, no globals.

The states, events and guards are defined once, as data, with the
``transitions`` package (no model attached, no machine per job). From that
definition this module derives a frozen lookup table and a Mermaid diagram.
:func:`apply` takes a job snapshot and the evidence an event needs (the
object store's HEAD, the caller's lease token, the time) and returns the
:class:`~jobflow.models.Change` a store must write, or raises.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Any

import attrs
from transitions import Machine

from jobflow.errors import (
    InvalidTransition,
    LeaseLost,
    UploadError,
    UploadExpired,
    UploadMissing,
    UploadRejected,
)
from jobflow.models import (
    Change,
    ErrorCode,
    Event,
    Job,
    JobEvent,
    JobStatus,
    JSONDict,
    ObjectInfo,
    UploadPolicy,
    media_type,
)

# The machine below is never triggered, but the package logs at INFO when it is.
logging.getLogger("transitions").setLevel(logging.WARNING)

AWAITING, QUEUED, RUNNING, DONE, FAILED = (
    JobStatus.AWAITING_UPLOAD,
    JobStatus.QUEUED,
    JobStatus.QUICK_RUNNING,
    JobStatus.DONE,
    JobStatus.FAILED,
)
CLAIMABLE = frozenset({QUEUED})
TERMINAL = frozenset({DONE, FAILED})
#: Statuses a job may have without a verified upload (the database CHECKs this).
UNVERIFIED_ALLOWED = frozenset({AWAITING, FAILED})


def _t(event: Event, source: JobStatus | list[JobStatus], dest: JobStatus,
       conditions: Sequence[str] = (), unless: Sequence[str] = ()) -> dict[str, Any]:
    sources = [s.value for s in source] if isinstance(source, list) else source.value
    return {"trigger": event.value, "source": sources, "dest": dest.value,
            "conditions": list(conditions), "unless": list(unless)}


# Order matters where one event has several destinations: the first transition
# whose guards pass wins.
TRANSITIONS = [
    _t(Event.VERIFY_UPLOAD, AWAITING, QUEUED, ["object_acceptable"]),
    _t(Event.REJECT_UPLOAD, AWAITING, FAILED, ["object_present"], ["object_acceptable"]),
    _t(Event.EXPIRE_UPLOAD, AWAITING, FAILED, ["upload_overdue"], ["object_acceptable"]),
    _t(Event.CLAIM, QUEUED, RUNNING, ["upload_verified", "is_due", "has_attempts_left"]),
    _t(Event.HEARTBEAT, RUNNING, RUNNING, ["holds_lease"]),
    _t(Event.SUCCEED, RUNNING, DONE, ["holds_lease"]),
    _t(Event.RETRY, RUNNING, QUEUED, ["holds_lease", "should_retry"]),
    _t(Event.FAIL, RUNNING, FAILED, ["holds_lease"], ["should_retry"]),
    _t(Event.DEFER, RUNNING, QUEUED, ["holds_lease", "may_defer"]),
    _t(Event.DEFER, RUNNING, FAILED, ["holds_lease"], ["may_defer"]),
    _t(Event.RESCUE, RUNNING, QUEUED, ["lease_expired", "may_run_again"]),
    _t(Event.RESCUE, RUNNING, FAILED, ["lease_expired"], ["may_run_again"]),
    _t(Event.RELEASE, RUNNING, QUEUED, ["holds_lease"], ["cancel_requested"]),
    _t(Event.RELEASE, RUNNING, FAILED, ["holds_lease", "cancel_requested"]),
    _t(Event.CANCEL, [AWAITING, QUEUED], FAILED),
    _t(Event.REQUEST_CANCEL, RUNNING, RUNNING, [], ["cancel_requested"]),
    _t(Event.REQUEUE, FAILED, QUEUED, ["object_acceptable"]),
]

MACHINE = Machine(
    model=None,
    states=[s.value for s in JobStatus],
    transitions=TRANSITIONS,
    initial=AWAITING.value,
    auto_transitions=False,
)


@attrs.frozen
class Edge:
    """One transition of the table: where it goes and what must hold."""

    event: Event
    source: JobStatus
    dest: JobStatus
    conditions: tuple[str, ...]
    unless: tuple[str, ...]


def _table(machine: Machine) -> Mapping[tuple[Event, JobStatus], tuple[Edge, ...]]:
    table: dict[tuple[Event, JobStatus], tuple[Edge, ...]] = {}
    for name, event in machine.events.items():
        for source, transitions in event.transitions.items():
            table[Event(name), JobStatus(source)] = tuple(
                Edge(
                    event=Event(name),
                    source=JobStatus(source),
                    dest=JobStatus(t.dest or source),
                    conditions=tuple(str(c.func) for c in t.conditions if c.target),
                    unless=tuple(str(c.func) for c in t.conditions if not c.target),
                )
                for t in transitions
            )
    return MappingProxyType(table)


#: (event, source status) -> the edges to try, in order.
TABLE = _table(MACHINE)


@attrs.frozen(slots=False)  # built for every decision: cheaper to build unslotted, as Job
class Evidence:
    """Everything an event's guards and effects may look at. No I/O behind it."""

    now: datetime
    policy: UploadPolicy = attrs.field(factory=UploadPolicy)
    obj: ObjectInfo | None = None
    token: str | None = None
    new_token: str | None = None
    worker_id: str | None = None
    lease_seconds: float | None = None
    retryable: bool = True
    retry_delay: timedelta | None = None
    error: str | None = None
    error_code: str | None = None
    result: JSONDict | None = None
    detail: JSONDict = attrs.field(factory=dict)


def size_range(job: Job, policy: UploadPolicy) -> tuple[int, int]:
    """The sizes an upload of ``job`` may have when ``policy``'s process verifies
    it: the job's own range (the policy it was created under), narrowed by the
    verifying policy. A stricter process refuses more, never accepts more."""
    low = max(policy.min_bytes, job.min_bytes if job.min_bytes is not None else 0)
    high = min(policy.max_bytes,
               job.max_bytes if job.max_bytes is not None else policy.max_bytes)
    return low, high


def rejection_reason(job: Job, obj: ObjectInfo, policy: UploadPolicy) -> str | None:
    """Why ``obj`` is not an acceptable upload for ``job``, or None if it is."""
    if obj.key != job.key:
        return f"object key {obj.key!r} is not the job's key {job.key!r}"
    min_bytes, max_bytes = size_range(job, policy)
    if obj.size == 0 and min_bytes > 0:
        return "object is empty"
    if obj.size < min_bytes:
        return f"object is {obj.size} bytes, below the minimum of {min_bytes}"
    if obj.size > max_bytes:
        return f"object is {obj.size} bytes, above the limit of {max_bytes}"
    found = media_type(obj.content_type)
    if found not in policy.allowed_content_types:
        return f"content type {obj.content_type!r} is not allowed"
    if found != job.content_type:
        return f"content type {obj.content_type!r} differs from the declared {job.content_type!r}"
    if job.expected_sha256 is not None:
        if obj.sha256 is None:
            return "a SHA-256 was declared but the object store reports no checksum"
        if obj.sha256.lower() != job.expected_sha256.lower():
            return "SHA-256 checksum does not match the declared one"
    return None


def _may_run_again(job: Job, ev: Evidence) -> bool:
    """Whether a running job may go back to the queue: attempts are left and
    nobody asked it to stop (a cancel request ends it whatever else happens)."""
    return job.attempts < job.max_attempts and job.cancel_requested_at is None


def _may_defer(job: Job, ev: Evidence) -> bool:
    """Whether an attempt that something outside the job broke may go back to
    the queue: deferrals are left and nobody asked the job to stop."""
    return job.deferrals < ev.policy.max_deferrals and job.cancel_requested_at is None


def _should_retry(job: Job, ev: Evidence) -> bool:
    return ev.retryable and _may_run_again(job, ev)


GUARDS: Mapping[str, Callable[[Job, Evidence], bool]] = MappingProxyType({
    "object_present": lambda job, ev: ev.obj is not None,
    "object_acceptable": lambda job, ev: (
        ev.obj is not None and rejection_reason(job, ev.obj, ev.policy) is None
    ),
    "upload_overdue": lambda job, ev: ev.now >= job.upload_expires_at,
    "upload_verified": lambda job, ev: job.upload_verified_at is not None,
    "is_due": lambda job, ev: job.run_at <= ev.now,
    "has_attempts_left": lambda job, ev: job.attempts < job.max_attempts,
    "may_run_again": _may_run_again,
    "may_defer": _may_defer,
    "cancel_requested": lambda job, ev: job.cancel_requested_at is not None,
    "holds_lease": lambda job, ev: ev.token is not None and ev.token == job.lease_token,
    "should_retry": _should_retry,
    "lease_expired": lambda job, ev: (
        job.lease_expires_at is not None and job.lease_expires_at <= ev.now
    ),
})
assert {g for edges in TABLE.values() for e in edges for g in e.conditions + e.unless} <= set(
    GUARDS
), "every guard named in the machine has a predicate"


def allowed(edge: Edge, job: Job, ev: Evidence) -> bool:
    return all(GUARDS[g](job, ev) for g in edge.conditions) and not any(
        GUARDS[g](job, ev) for g in edge.unless
    )


def _refusal(event: Event, job: Job, ev: Evidence, edges: Iterable[Edge]) -> Exception:
    """The most specific error for an event none of whose edges passed."""
    failed = {g for e in edges for g in e.conditions if not GUARDS[g](job, ev)}
    if "holds_lease" in failed:
        return LeaseLost(job.id, event.value)
    if "object_acceptable" in failed or "object_present" in failed:
        if ev.obj is None:
            return UploadMissing(job.id, job.key)
        reason = rejection_reason(job, ev.obj, ev.policy)
        return UploadRejected(job.id, reason or "object not acceptable")
    return InvalidTransition(job.id, job.status.value, event.value)


#: The fields an event clears when the job leaves ``quick_running``.
_LEASE_FREE: Mapping[str, None] = MappingProxyType(
    {"lease_token": None, "lease_owner": None, "lease_expires_at": None})


def _verified(obj: ObjectInfo, now: datetime) -> dict[str, Any]:
    return {
        "upload_verified_at": now,
        "object_size": obj.size,
        "object_etag": obj.etag,
        "object_version_id": obj.version_id,
        "object_sha256": obj.sha256,
    }


def _object_detail(obj: ObjectInfo | None) -> JSONDict:
    if obj is None:
        return {}
    return {"size": obj.size, "content_type": obj.content_type, "etag": obj.etag,
            "version_id": obj.version_id, "sha256": obj.sha256}


def _failure_code(job: Job, code: str | None) -> str:
    """The error code a failed attempt leaves: ``cancelled`` when someone asked
    the job to stop (the handler's own error stays in the message), else
    ``code`` (default ``handler_error``)."""
    if job.cancel_requested_at is not None:
        return ErrorCode.CANCELLED.value
    return code or ErrorCode.HANDLER_ERROR.value


def _effects(edge: Edge, job: Job, ev: Evidence) -> tuple[dict[str, Any], JSONDict]:
    """The fields an edge writes, and the detail its history row carries."""
    now = ev.now
    obj = ev.obj
    match edge.event, edge.dest:
        # The cases are tried in order: the one run for every finished job first.
        case Event.SUCCEED, _:
            return (
                {**_LEASE_FREE, "finished_at": now, "result": ev.result,
                 "error_code": None, "error_message": None},
                {},
            )
        case Event.VERIFY_UPLOAD, _:
            assert obj is not None
            return {**_verified(obj, now), "run_at": now}, _object_detail(obj)
        case Event.REJECT_UPLOAD, _:
            assert obj is not None
            reason = rejection_reason(job, obj, ev.policy)
            return (
                {"error_code": ErrorCode.UPLOAD_REJECTED.value, "error_message": reason,
                 "finished_at": now},
                {**_object_detail(obj), "reason": reason},
            )
        case Event.EXPIRE_UPLOAD, _:
            return (
                {"error_code": ErrorCode.UPLOAD_EXPIRED.value,
                 "error_message": "upload deadline passed without a valid object",
                 "finished_at": now},
                {"deadline": job.upload_expires_at.isoformat()},
            )
        case Event.CLAIM, _:
            if ev.new_token is None or ev.worker_id is None:
                raise ValueError("claim needs a new lease token and a worker id")
            expires = now + timedelta(seconds=ev.lease_seconds or ev.policy.lease_seconds)
            return (
                {"lease_token": ev.new_token, "lease_owner": ev.worker_id,
                 "lease_expires_at": expires, "attempts": job.attempts + 1, "started_at": now},
                {"lease_expires_at": expires.isoformat()},
            )
        case Event.HEARTBEAT, _:
            expires = now + timedelta(seconds=ev.lease_seconds or ev.policy.lease_seconds)
            return {"lease_expires_at": expires}, {
                "lease_expires_at": expires.isoformat(), **ev.detail}
        case Event.RETRY, _:
            delay = ev.retry_delay if ev.retry_delay is not None else ev.policy.retry_delay(
                job.attempts)
            return (
                {**_LEASE_FREE, "run_at": now + delay,
                 "error_code": ev.error_code or ErrorCode.HANDLER_ERROR.value,
                 "error_message": ev.error},
                {"error": ev.error, "error_code": ev.error_code or ErrorCode.HANDLER_ERROR.value,
                 "retry_in_seconds": delay.total_seconds()},
            )
        case Event.FAIL, _:
            code = _failure_code(job, ev.error_code)
            return (
                {**_LEASE_FREE, "finished_at": now, "error_code": code,
                 "error_message": ev.error},
                {"error": ev.error, "error_code": code, "retryable": ev.retryable},
            )
        case Event.DEFER, JobStatus.QUEUED:
            # Something outside the job failed: the attempt is given back and
            # counted against the deferral budget instead.
            delay = (ev.retry_delay if ev.retry_delay is not None
                     else ev.policy.defer_delay(job.deferrals))
            code = ev.error_code or ErrorCode.STORAGE_UNAVAILABLE.value
            return (
                {**_LEASE_FREE, "run_at": now + delay, "attempts": job.attempts - 1,
                 "deferrals": job.deferrals + 1, "error_code": code,
                 "error_message": ev.error},
                {"error": ev.error, "error_code": code,
                 "retry_in_seconds": delay.total_seconds(), "deferrals": job.deferrals + 1},
            )
        case Event.DEFER, _:
            code = _failure_code(job, ev.error_code or ErrorCode.STORAGE_UNAVAILABLE.value)
            return (
                {**_LEASE_FREE, "finished_at": now, "error_code": code,
                 "error_message": ev.error},
                {"error": ev.error, "error_code": code, "deferrals": job.deferrals,
                 "max_deferrals": ev.policy.max_deferrals},
            )
        case Event.RESCUE, JobStatus.QUEUED:
            return (
                {**_LEASE_FREE, "run_at": now,
                 "error_message": f"lease of worker {job.lease_owner} expired"},
                {"lost_worker": job.lease_owner},
            )
        case Event.RESCUE, _:
            why = "cancel requested" if job.cancel_requested_at else "no attempts left"
            return (
                {**_LEASE_FREE, "finished_at": now,
                 "error_code": _failure_code(job, ErrorCode.LEASE_EXPIRED.value),
                 "error_message": f"lease of worker {job.lease_owner} expired, {why}"},
                {"lost_worker": job.lease_owner},
            )
        case Event.RELEASE, JobStatus.FAILED:
            # Handed back unfinished after someone asked it to stop: it ends here.
            return (
                {**_LEASE_FREE, "finished_at": now, "error_code": ErrorCode.CANCELLED.value,
                 "error_message": "cancelled"},
                {"reason": ev.error or "worker shutting down"},
            )
        case Event.RELEASE, _:
            # A worker shutting down hands the job back: not a failed attempt.
            return (
                {**_LEASE_FREE, "run_at": now, "attempts": job.attempts - 1},
                {"reason": ev.error or "worker shutting down"},
            )
        case Event.CANCEL, _:
            return (
                {"error_code": ErrorCode.CANCELLED.value, "error_message": "cancelled",
                 "finished_at": now},
                {},
            )
        case Event.REQUEST_CANCEL, _:
            return {"cancel_requested_at": now}, {}
        case Event.REQUEUE, _:
            assert obj is not None
            return (
                {**_verified(obj, now), "attempts": 0, "run_at": now, "finished_at": None,
                 "error_code": None, "error_message": None, "result": None,
                 "started_at": None, "cancel_requested_at": None, "deferrals": 0},
                {**_object_detail(obj), "previous_error": job.error_code},
            )
    raise AssertionError(f"no effects defined for {edge}")  # pragma: no cover


def apply(job: Job, event: Event, ev: Evidence) -> Change:
    """Apply ``event`` to ``job``: the Change to write, or a refusal.

    Raises :class:`InvalidTransition` when the event is not allowed from the
    job's status, :class:`LeaseLost` when the caller's lease token is not the
    current one, and :class:`UploadMissing` / :class:`UploadRejected` when an
    object-store guard fails.
    """
    edges = TABLE.get((event, job.status), ())
    if not edges:
        if "holds_lease" in _lease_guards(event):
            raise LeaseLost(job.id, event.value)
        raise InvalidTransition(job.id, job.status.value, event.value)
    for edge in edges:
        if allowed(edge, job, ev):
            fields, detail = _effects(edge, job, ev)
            after = job.evolve(status=edge.dest, updated_at=ev.now, **fields)
            return Change(event=event, before=job, after=after,
                          worker_id=ev.worker_id or job.lease_owner, detail=detail)
    raise _refusal(event, job, ev, edges)


def _lease_guards(event: Event) -> set[str]:
    return {g for (e, _), edges in TABLE.items() if e is event for edge in edges
            for g in edge.conditions}


def apply_first(job: Job, events: Sequence[Event], ev: Evidence) -> Change:
    """Apply the first of ``events`` whose guards pass; refuse as the first would."""
    for event in events:
        if any(allowed(edge, job, ev) for edge in TABLE.get((event, job.status), ())):
            return apply(job, event, ev)
    return apply(job, events[0], ev)


def settle_upload(job: Job, ev: Evidence) -> Change:
    """Decide an awaiting upload from the store's HEAD: verify, reject or expire.

    Raises :class:`UploadMissing` when there is no object and the deadline has
    not passed (the job keeps waiting).
    """
    return apply_first(job, (Event.VERIFY_UPLOAD, Event.REJECT_UPLOAD, Event.EXPIRE_UPLOAD), ev)


def finish_with_error(job: Job, ev: Evidence) -> Change:
    """A handler error: retry with backoff while allowed, otherwise fail."""
    return apply_first(job, (Event.RETRY, Event.FAIL), ev)


def cancel(job: Job, ev: Evidence) -> Change | None:
    """An operator's cancel. A job that has not started fails as ``cancelled``; a
    running one is asked to stop (``request_cancel``): it keeps its lease, and
    its worker ends the attempt. None when the running job was asked already:
    the first request stands and there is nothing to write. A finished job
    refuses it (:class:`InvalidTransition`)."""
    if job.status is RUNNING and job.cancel_requested_at is not None:
        return None
    return apply_first(job, (Event.CANCEL, Event.REQUEST_CANCEL), ev)


def upload_error(change: Change) -> UploadError | None:
    """The error to raise to the caller after a rejecting change was written."""
    if change.event is Event.REJECT_UPLOAD:
        return UploadRejected(change.after.id, change.after.error_message or "rejected")
    if change.event is Event.EXPIRE_UPLOAD:
        return UploadExpired(change.after.id)
    return None


def new_job(*, job_id: str, owner_id: str, params: JSONDict, bucket: str, key: str,
            content_type: str, expected_sha256: str | None, now: datetime,
            policy: UploadPolicy) -> Change:
    """The ``created`` change that opens a job's life in ``awaiting_upload``."""
    job = Job(
        id=job_id, owner_id=owner_id, status=AWAITING, params=params, bucket=bucket, key=key,
        content_type=content_type, created_at=now, updated_at=now,
        upload_expires_at=now + timedelta(seconds=policy.upload_ttl_seconds),
        max_attempts=policy.max_attempts, run_at=now, expected_sha256=expected_sha256,
        min_bytes=policy.min_bytes, max_bytes=policy.max_bytes,
    )
    return Change(event=Event.CREATED, before=None, after=job,
                  detail={"content_type": content_type, "key": key})


def replay(events: Sequence[JobEvent]) -> JobStatus:
    """Fold a job's history into its status, checking that it is consistent."""
    status: JobStatus | None = None
    for expected_seq, row in enumerate(events, start=1):
        if row.seq != expected_seq:
            raise ValueError(f"history of job {row.job_id}: seq {row.seq}, expected {expected_seq}")
        if row.from_status != status:
            raise ValueError(
                f"history of job {row.job_id}: {row.event} from {row.from_status}, "
                f"but the job was {status}")
        if row.event is not Event.CREATED and row.to_status not in {
            e.dest for e in TABLE.get((row.event, row.from_status), ())  # type: ignore[arg-type]
        }:
            raise ValueError(f"history of job {row.job_id}: {row.event} cannot reach "
                             f"{row.to_status} from {row.from_status}")
        status = row.to_status
    if status is None:
        raise ValueError("empty history")
    return status


def mermaid() -> str:
    """The state diagram, in Mermaid syntax, derived from the machine."""
    lines = ["stateDiagram-v2", f"    [*] --> {AWAITING.value}"]
    for (event, source), edges in TABLE.items():
        for edge in edges:
            lines.append(f"    {source.value} --> {edge.dest.value}: {event.value}")
    lines += [f"    {s.value} --> [*]" for s in (DONE, FAILED)]
    return "\n".join(lines) + "\n"
