"""The worker: runs a handler on claimed jobs, under leases, until stopped.

A :class:`Worker` claims verified jobs in batches, up to its free slots in one
statement, and runs ``handler(job, ctx)`` for each on a pool of
``concurrency`` threads that it reuses. While its handlers are short (under
:data:`CLAIM_AHEAD_BELOW` seconds on average) it claims the next batch ahead,
so that the claim's round trip overlaps the running batch; a job claimed
ahead whose lease ran out before a thread took it is released, its attempt
given back. Outcomes are buffered and written in
batches: every finished attempt (succeeded, failed, released) of a batch
goes to the store in one :meth:`~jobflow.JobFlow.finish_many` call (one
statement on PostgreSQL), each with its own lease-token compare-and-set and
history row. A batch is written when it holds an outcome for every slot, when
its oldest outcome is ``flush_interval`` old, when no handler is running, and
always before :meth:`Worker.run` returns. An outcome is logged as finished
only once it is written.

A supervisor thread renews, in one call, every lease that is due, and
enforces the per-job timeout; a housekeeping thread runs
:meth:`~jobflow.JobFlow.reconcile` periodically; a watch thread logs a
claim or a renewal stuck on the store and keeps the health file fresh. Every write the worker makes
carries the lease token, so a worker that lost its lease (it was paused, or
cut off, and its job was rescued) changes nothing: the store answers
:class:`~jobflow.errors.LeaseLost` and the worker drops the outcome.

Delivery is at least once: after SIGKILL, outcomes not yet written are lost
and their jobs run again once their leases expire; the fencing makes any
late write of the dead worker harmless.

Outcomes:

- the handler returns a JSON object (or None): the job is ``done`` with it as
  its result;
- it raises :class:`~jobflow.errors.PermanentJobError`: the job fails at once;
- it lets :class:`~jobflow.errors.StorageUnavailable` or
  :class:`~jobflow.errors.StoragePermissionDenied` escape (from
  ``ctx.download()`` or ``ctx.open()``, typically): the attempt is
  *deferred*, given back without spending one of ``max_attempts``, and the
  job waits out the policy's deferral backoff (within its ``max_deferrals``);
  the worker also pauses claiming, longer while the outage lasts;
- it raises :class:`~jobflow.errors.RetryLater`: deferred the same way, for
  the delay it asked;
- it raises anything else: the attempt fails and the job is retried with
  exponential backoff and jitter while attempts remain;
- it runs past ``job_timeout``: the attempt fails with error code
  ``handler_timeout`` (and is retried while attempts remain);
- someone asked the job to stop (``JobFlow.cancel``): the lease renewal tells
  the worker, ``ctx.cancel_requested`` turns true and ``ctx.heartbeat()``
  raises :class:`~jobflow.errors.JobCancelled`; unless the handler succeeds
  anyway, the job ends ``failed`` with error code ``cancelled``;
- the worker is stopped: running handlers get ``shutdown_grace`` seconds to
  finish, then their jobs are released back to ``queued`` without spending
  an attempt.
"""

from __future__ import annotations

import contextlib
import queue
import random
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import attrs
import structlog

from jobflow.errors import (
    ConfigurationError,
    InvalidInput,
    JobCancelled,
    JobflowError,
    LeaseLost,
    ObjectChanged,
    PermanentJobError,
    RetryLater,
    StoragePermissionDenied,
    StorageUnavailable,
)
from jobflow.flow import JobFlow, json_object
from jobflow.keys import default_worker_id as default_worker_id  # also public here
from jobflow.logconfig import library_logger
from jobflow.models import (
    Claim,
    Deferred,
    ErrorCode,
    Failed,
    Job,
    JobStatus,
    JSONDict,
    ObjectInfo,
    Outcome,
    Released,
    Succeeded,
)
from jobflow.wakeup import Wakeup, wakeup_for

#: Error codes the worker writes, besides the core's ``handler_error``.
HANDLER_TIMEOUT = "handler_timeout"
INVALID_RESULT = "invalid_result"
OBJECT_CHANGED = "object_changed"
#: The error codes of deferred attempts (see :class:`~jobflow.models.ErrorCode`).
STORAGE_UNAVAILABLE = ErrorCode.STORAGE_UNAVAILABLE.value
RETRY_LATER = ErrorCode.RETRY_LATER.value

#: Handler error messages are cut to this many characters before they are stored.
MAX_ERROR_LENGTH = 2000
#: The longest pause between two tries of a batch write while the store is unavailable.
MAX_WRITE_BACKOFF = 2.0
#: A worker claims a batch ahead while its handlers take less than this many
#: seconds on average: the claim's round trip then overlaps the running batch.
#: Longer jobs gain nothing from it, and a job claimed ahead would wait, leased,
#: for a slot while another worker may have one free.
CLAIM_AHEAD_BELOW = 1.0
#: A stopping worker waits this many seconds past its shutdown grace for its
#: last writes (the releases of jobs still running), then returns regardless.
FINAL_WRITE_SECONDS = 2.0
#: The most handler threads one worker runs: each is an OS thread sharing one
#: interpreter, and a claim batch is as large; run more processes beyond it.
MAX_CONCURRENCY = 1024
#: How often a worker touches its health file, at most.
HEALTH_INTERVAL = 1.0

Handler = Callable[[Job, "JobContext"], Any]


class AttemptAbandoned(JobflowError):
    """This attempt no longer counts: its lease was lost, it timed out, or it was
    released at shutdown. Raised inside a handler by :meth:`JobContext.heartbeat`
    and :meth:`JobContext.check`; whatever the handler does next is ignored.
    """

    http_status = 409

    def __init__(self, job_id: str, reason: str) -> None:
        self.job_id = job_id
        self.reason = reason
        super().__init__(f"attempt on job {job_id} abandoned: {reason}")


def error_message(exc: BaseException) -> str:
    """What is stored on the job for a handler's exception."""
    text = f"{type(exc).__name__}: {exc}"
    if len(text) > MAX_ERROR_LENGTH:
        text = text[: MAX_ERROR_LENGTH - 3] + "..."
    return text


@attrs.define(eq=False)
class _Attempt:
    """One claimed job while this worker runs it."""

    claim: Claim
    log: structlog.typing.FilteringBoundLogger
    next_beat: float  # time.monotonic() of the next lease renewal
    started: float  # time.monotonic() when claimed, then when the handler started
    deadline: float | None = None  # time.monotonic() after which the attempt times out
    lock: threading.Lock = attrs.field(factory=threading.Lock)
    # Set once the attempt's outcome was decided (buffered for writing) or the
    # lease was lost: no more writes for it after that.
    settled: bool = False
    abandoned: str | None = None  # why the handler's outcome no longer counts
    cancel_requested: bool = False  # a lease renewal said someone asked the job to stop

    @property
    def job_id(self) -> str:
        return self.claim.job.id

    def settle(self) -> bool:
        """Take the right to decide the attempt's outcome; False if taken."""
        with self.lock:
            if self.settled:
                return False
            self.settled = True
            return True


@attrs.frozen
class _Pending:
    """An outcome waiting in the buffer to be written."""

    attempt: _Attempt
    outcome: Outcome
    log_fields: dict[str, Any]
    added: float  # time.monotonic()


class JobContext:
    """What a handler gets besides the job: its object, progress reports, signals.

    ``open()`` and ``download()`` return exactly the object that was verified
    (:class:`~jobflow.errors.ObjectChanged` if it was replaced since;
    :class:`~jobflow.errors.StorageUnavailable` if the store cannot be asked,
    which, left to propagate, defers the attempt).
    """

    def __init__(self, worker: Worker, attempt: _Attempt) -> None:
        self._worker = worker
        self._attempt = attempt
        self._workdir: tempfile.TemporaryDirectory[str] | None = None
        self.job: Job = attempt.claim.job
        self.worker_id: str = worker.worker_id
        self.log: structlog.typing.FilteringBoundLogger = attempt.log

    @property
    def attempt(self) -> int:
        """1 for the first attempt, 2 for the first retry..."""
        return self.job.attempts

    @property
    def shutdown_requested(self) -> bool:
        """True once the worker is stopping: finish soon or the job is handed back."""
        return self._worker.shutdown_requested

    @property
    def abandoned(self) -> bool:
        """True once this attempt no longer counts; stop working, nothing will be kept."""
        return self._attempt.abandoned is not None

    @property
    def cancel_requested(self) -> bool:
        """True once someone asked the job to stop: the worker learns of it when it
        renews the lease (within one heartbeat interval). Stop and let
        :class:`~jobflow.errors.JobCancelled` (or any error) end the attempt as
        ``cancelled``; a result returned anyway stands."""
        return self._attempt.cancel_requested

    def check(self) -> None:
        """Raise :class:`AttemptAbandoned` if this attempt no longer counts, and
        :class:`~jobflow.errors.JobCancelled` if someone asked the job to stop.
        Reads no store: what the last lease renewal said."""
        reason = self._attempt.abandoned
        if reason is not None:
            raise AttemptAbandoned(self.job.id, reason)
        if self._attempt.cancel_requested:
            raise JobCancelled(self.job.id)

    def open(self) -> BinaryIO:
        """A binary stream of the verified object. Close it (use ``with``)."""
        return self._worker.flow.objects.open(self.job.key, expected=self._verified())

    def download(self, dest: Path | None = None) -> Path:
        """Copy the verified object to ``dest`` (default: a temporary file that is
        removed when the handler returns) and return its path."""
        if dest is None:
            if self._workdir is None:  # made on first use: most handlers never need one
                self._workdir = tempfile.TemporaryDirectory(prefix="jobflow-")
            dest = Path(self._workdir.name) / PurePosixPath(self.job.key).name
        return self._worker.flow.objects.download(self.job.key, dest, expected=self._verified())

    def heartbeat(self, *, stage: str | None = None, progress: float | None = None,
                  **detail: Any) -> None:
        """Renew the lease now and record progress in the job's history.

        Call it at meaningful steps, not per byte: each call is one write.
        Raises :class:`AttemptAbandoned` when the lease is no longer held, and
        :class:`~jobflow.errors.JobCancelled` when someone asked the job to stop.
        """
        extra: JSONDict = dict(detail)
        if stage is not None:
            extra["stage"] = stage
        if progress is not None:
            extra["progress"] = progress
        self._worker._renew(self._attempt, json_object(extra, "heartbeat detail"))
        self.check()

    def _clean_up(self) -> None:
        """Remove the temporary folder of :meth:`download`, if one was made."""
        if self._workdir is not None:
            try:
                self._workdir.cleanup()
            except OSError as exc:
                self.log.warning("handler.cleanup_failed", error=str(exc))

    def _verified(self) -> ObjectInfo:
        verified = self.job.verified_object
        if verified is None:  # pragma: no cover - claims are always verified
            raise ObjectChanged(self.job.key, f"job {self.job.id} has no verified object")
        return verified


class Worker:
    """Claims jobs and runs ``handler(job, ctx)`` on them, ``concurrency`` at a time.

    ``lease_seconds`` is how long a claim holds without renewal (default: the
    flow's policy); ``heartbeat_interval`` how often it is renewed (default: a
    third of the lease). An idle worker claims again after ``poll_interval``
    seconds, or ``listen_poll_interval`` while its ``wakeup`` delivers
    notifications (default: LISTEN/NOTIFY on PostgreSQL, polling otherwise).
    ``reconcile_interval`` spaces the housekeeping passes; ``shutdown_grace``
    is how long :meth:`stop` lets running handlers finish; ``job_timeout``
    (None: no limit) fails an attempt that runs too long.

    ``flush_interval`` is how long a finished attempt's outcome may wait in
    the buffer for others to be written with it, and how long a free slot
    waits for others to be claimed with it while handlers are still running.

    After an attempt deferred because the object store was unavailable the
    worker stops claiming for ``storage_pause`` seconds, doubled after each
    later such attempt up to ``storage_pause_max``, and back to none after an
    attempt that succeeds: while the store keeps failing, the worker does not
    burn through its queue.

    ``health_file``, when given, is touched every second (at most) while
    neither the claim loop nor the lease renewals have been stuck in a store
    call for longer than ``heartbeat_interval``, and removed when the worker
    stops: its age is a liveness check (``jobflow health``). Such a stall is
    logged either way (``worker.stalled``).
    """

    def __init__(self, flow: JobFlow, handler: Handler, *, worker_id: str | None = None,
                 concurrency: int = 1, lease_seconds: float | None = None,
                 heartbeat_interval: float | None = None, poll_interval: float = 1.0,
                 listen_poll_interval: float = 10.0, reconcile_interval: float = 30.0,
                 shutdown_grace: float = 25.0, job_timeout: float | None = None,
                 flush_interval: float = 0.005, storage_pause: float = 1.0,
                 storage_pause_max: float = 30.0, wakeup: Wakeup | None = None,
                 health_file: Path | str | None = None,
                 logger: structlog.typing.FilteringBoundLogger | None = None) -> None:
        self.flow = flow
        self.handler = handler
        self.worker_id = worker_id or default_worker_id()
        self.concurrency = concurrency
        self.lease_seconds = float(lease_seconds or flow.policy.lease_seconds)
        self.heartbeat_interval = float(heartbeat_interval or self.lease_seconds / 3)
        self.poll_interval = poll_interval
        self.listen_poll_interval = listen_poll_interval
        self.reconcile_interval = reconcile_interval
        self.shutdown_grace = shutdown_grace
        self.job_timeout = job_timeout
        self.flush_interval = flush_interval
        self.storage_pause = storage_pause
        self.storage_pause_max = storage_pause_max
        self.health_file = Path(health_file) if health_file is not None else None
        self._health_file_failed = False
        self._health_lock = threading.Lock()
        self._check_settings()
        self._wakeup = wakeup if wakeup is not None else wakeup_for(flow.store)
        self._log: structlog.typing.FilteringBoundLogger = (
            logger or library_logger("jobflow.worker")).bind(worker_id=self.worker_id)
        self._random = random.Random()
        self._stopping = threading.Event()
        self._shutdown_requested = threading.Event()
        self._wake = threading.Event()  # the claim loop should look again
        self._supervisor_wake = threading.Event()
        self._housekeeping_done = threading.Event()
        self._attempts_lock = threading.Lock()
        # By lease token: every job held, running or claimed ahead, until its
        # handler returns.
        self._attempts: dict[str, _Attempt] = {}
        self._mean_run: float | None = None  # the handlers' recent mean duration, seconds
        self._ready: queue.SimpleQueue[_Attempt | None] = queue.SimpleQueue()
        self._outcomes = _OutcomeBuffer(self)
        # When the earliest job this worker sent back for a retry becomes due
        # (time.monotonic()): its NOTIFY came while it was not due yet.
        self._retry_due: float | None = None
        # Claiming paused for an object store outage: the current pause's length
        # (0: none), and until when (time.monotonic()).
        self._pause_lock = threading.Lock()
        self._pause = 0.0
        self._paused_until = 0.0
        self._started = False
        self._stop_requested_at: float | None = None  # time.monotonic() of the first stop()
        # The two loops whose progress the watch thread checks.
        self._claiming = _Loop("claims")
        self._renewing = _Loop("heartbeats")

    def _check_settings(self) -> None:
        if (not isinstance(self.concurrency, int) or isinstance(self.concurrency, bool)
                or not 1 <= self.concurrency <= MAX_CONCURRENCY):
            raise ConfigurationError(f"concurrency must be an integer from 1 to "
                                     f"{MAX_CONCURRENCY}, got {self.concurrency!r}")
        positive = {"lease_seconds": self.lease_seconds,
                    "heartbeat_interval": self.heartbeat_interval,
                    "poll_interval": self.poll_interval,
                    "listen_poll_interval": self.listen_poll_interval,
                    "reconcile_interval": self.reconcile_interval,
                    "flush_interval": self.flush_interval,
                    "storage_pause": self.storage_pause,
                    "storage_pause_max": self.storage_pause_max}
        if self.job_timeout is not None:
            positive["job_timeout"] = self.job_timeout
        for name, value in positive.items():
            if not value > 0:
                raise ConfigurationError(f"{name} must be > 0, got {value!r}")
        if self.storage_pause_max < self.storage_pause:
            raise ConfigurationError(
                f"storage_pause_max ({self.storage_pause_max:g} s) must be at least "
                f"storage_pause ({self.storage_pause:g} s)")
        if self.shutdown_grace < 0:
            raise ConfigurationError(f"shutdown_grace must be >= 0, got {self.shutdown_grace!r}")
        if self.heartbeat_interval >= self.lease_seconds:
            raise ConfigurationError(
                f"heartbeat_interval ({self.heartbeat_interval:g} s) must be shorter than "
                f"lease_seconds ({self.lease_seconds:g} s), or leases expire between beats")

    # -- public control ---------------------------------------------------------------

    @property
    def shutdown_requested(self) -> bool:
        return self._shutdown_requested.is_set()

    @property
    def busy(self) -> int:
        """Jobs held: handlers still running (a timed-out handler counts until it
        returns) and jobs claimed ahead, waiting for a handler thread."""
        with self._attempts_lock:
            return len(self._attempts)

    @property
    def claims_ahead(self) -> bool:
        """Whether the worker claims a batch ahead: while its handlers take less
        than :data:`CLAIM_AHEAD_BELOW` seconds on average."""
        mean = self._mean_run
        return mean is not None and mean < CLAIM_AHEAD_BELOW

    def _capacity(self) -> int:
        """How many jobs the worker holds at most: a batch per thread, and a second
        one while it claims ahead."""
        return self.concurrency * (2 if self.claims_ahead else 1)

    def stop(self) -> None:
        """Stop claiming; :meth:`run` lets running handlers finish within
        ``shutdown_grace``, releases the rest, writes every outcome and returns.
        Safe from any thread and from a signal handler running in a thread
        other than :meth:`run`'s."""
        if self._stop_requested_at is None:
            self._stop_requested_at = time.monotonic()
        self._shutdown_requested.set()
        self._stopping.set()
        self._wake.set()

    def run(self, *, until_idle: bool = False) -> None:
        """Work until :meth:`stop` is called.

        With ``until_idle``, reconcile once, then return as soon as no handler is
        running, every outcome is written and nothing is due (or claiming is
        paused for an object store outage): convenient for scripts and tests.

        Once stopped, it returns within ``shutdown_grace`` plus
        :data:`FINAL_WRITE_SECONDS`, even while the database hangs: a thread
        still waiting for it then is left behind (each is a daemon thread),
        and what it did not write is left to the fencing: the jobs' leases
        expire, they are rescued and run again.
        """
        if self._started:
            raise RuntimeError("a Worker runs once; create a new one")
        self._started = True
        threads = [threading.Thread(target=self._run_handlers, name=f"jobflow-handler-{n}",
                                    daemon=True) for n in range(self.concurrency)]
        threads.append(threading.Thread(target=self._outcomes.write_until_closed,
                                        name="jobflow-outcomes", daemon=True))
        threads.append(threading.Thread(target=self._supervise, name="jobflow-supervisor",
                                        daemon=True))
        threads.append(threading.Thread(target=self._watch, name="jobflow-watch", daemon=True))
        if not until_idle:
            threads.append(threading.Thread(target=self._housekeep, name="jobflow-reconcile",
                                            daemon=True))
        failure: list[BaseException] = []
        # The claim loop runs in a thread of its own too, so that a claim that
        # hangs on the database cannot hold up the shutdown.
        claims = threading.Thread(target=self._claim_loop, args=(until_idle, failure),
                                  name="jobflow-claims", daemon=True)
        for thread in threads:
            thread.start()
        try:
            self._wakeup.start(self._wake.set)
            self._log.info("worker.started", concurrency=self.concurrency,
                           lease_seconds=self.lease_seconds, poll_interval=self.poll_interval)
            claims.start()
            self._stopping.wait()  # stop(), or the claim loop ended
        finally:
            self._finish(claims, threads[self.concurrency:])
        if failure:
            raise failure[0]

    def _finish(self, claims: threading.Thread, services: Sequence[threading.Thread]) -> None:
        """Shut down: running handlers get the grace, the last writes until
        :data:`FINAL_WRITE_SECONDS` after it; no wait lasts longer."""
        self._stopping.set()
        self._wake.set()
        grace_ends = (self._stop_requested_at or time.monotonic()) + self.shutdown_grace
        deadline = grace_ends + FINAL_WRITE_SECONDS
        released = 0
        try:
            if claims.ident is not None:  # started: it ends at once, unless a claim hangs
                claims.join(max(deadline - time.monotonic(), 0.0))
            self._wakeup.close()
            released = self._shut_down(grace_ends)
        finally:
            self._housekeeping_done.set()
            self._remove_health_file()
            self._supervisor_wake.set()
            for _ in range(self.concurrency):
                self._ready.put(None)  # handler threads still running a job stay daemons
            self._outcomes.close(deadline)
            for thread in services:
                thread.join(max(deadline - time.monotonic(), 0.0))
            stuck = [t.name for t in (claims, *services) if t.is_alive()]
            if stuck:
                self._log.warning("worker.stop_timeout", waiting=stuck,
                                  unwritten=self._outcomes.unwritten)
        self._log.info("worker.stopped", released=released)

    # -- claiming ---------------------------------------------------------------------

    def _claim_loop(self, until_idle: bool, failure: list[BaseException]) -> None:
        """The claim loop's thread: when it ends, for any reason, the worker stops."""
        try:
            if until_idle:
                self._reconcile_once()
            self._claim_until_stopped(until_idle)
        except BaseException as exc:
            failure.append(exc)
        finally:
            self._stopping.set()

    def _claim_until_stopped(self, until_idle: bool) -> None:
        partly_free_since: float | None = None
        while not self._stopping.is_set():
            self._wake.clear()
            paused = self._claims_paused_for()
            if paused > 0:
                if until_idle and self.busy == 0:
                    self._outcomes.write_all()
                    return  # the object store is unavailable: nothing can run now
                self._wake.wait(paused)  # stop() wakes it
                continue
            free = self._capacity() - self.busy
            if 0 < free < self.concurrency:
                # Handlers are still running: let a few more slots free up, so that
                # one claim fills them together.
                now = time.monotonic()
                partly_free_since = partly_free_since or now
                if now < partly_free_since + self.flush_interval:
                    self._wake.wait(partly_free_since + self.flush_interval - now)
                    continue
            partly_free_since = None
            claims: list[Claim] = []
            writes_seen = self._outcomes.batches_written
            if free > 0:
                looked_at = time.monotonic()
                with self._claiming.round():
                    claims = self._claim(free)
                with self._attempts_lock:
                    if self._retry_due is not None and self._retry_due <= looked_at:
                        self._retry_due = None  # this claim already saw it due
                self._start(claims)
            if until_idle and not claims and self.busy == 0:
                self._outcomes.write_all()
                if self._outcomes.batches_written == writes_seen:
                    return
                continue  # a retry or release written since the claim may be due: look again
            if claims and len(claims) == free:
                continue  # the batch was full: there may be more; loop waits for a slot
            idle_for = (self.listen_poll_interval if self._wakeup.listening
                        else self.poll_interval)
            with self._attempts_lock:
                retry_due = self._retry_due
            if retry_due is not None:
                idle_for = min(idle_for, max(retry_due - time.monotonic(), 0.0))
            self._wake.wait(idle_for)

    def _claim(self, limit: int) -> list[Claim]:
        try:
            return self.flow.claim(self.worker_id, limit=limit, lease_seconds=self.lease_seconds)
        except StorageUnavailable as exc:
            self._log.warning("worker.claim_failed", error=str(exc))
            return []

    def _start(self, claims: Sequence[Claim]) -> None:
        """Hand a batch of claims to the handler threads. Every attempt of the batch
        counts as running before any starts, so that the first to finish does not
        see an idle worker and write its outcome alone."""
        now = time.monotonic()
        attempts = [_Attempt(
            claim=claim, log=self._log.bind(job_id=claim.job.id, attempt=claim.job.attempts),
            next_beat=now + self.heartbeat_interval, started=now,
        ) for claim in claims]
        with self._attempts_lock:
            self._attempts.update((attempt.claim.token, attempt) for attempt in attempts)
        for attempt in attempts:
            self._ready.put(attempt)
        if attempts:
            self._supervisor_wake.set()

    # -- running handlers -------------------------------------------------------------

    def _run_handlers(self) -> None:
        """A handler thread: run attempts until told to stop (None)."""
        while (attempt := self._ready.get()) is not None:
            try:
                if self._run_attempt(attempt):
                    took = time.monotonic() - attempt.started
                    mean = self._mean_run
                    self._mean_run = took if mean is None else 0.8 * mean + 0.2 * took
            finally:
                with self._attempts_lock:
                    self._attempts.pop(attempt.claim.token, None)
                    held = len(self._attempts)
                if not held:
                    self._outcomes.slot_freed()
                # Wake the claim loop for the first free slot (it then waits a little
                # for more by itself), a batch's worth, or an idle worker: not per job.
                free = self._capacity() - held
                if not held or free == 1 or free >= self.concurrency:
                    self._wake.set()

    def _run_attempt(self, attempt: _Attempt) -> bool:
        """Run the handler on the attempt's job; False if it was given back instead."""
        job = attempt.claim.job
        if self._stopping.is_set() or (job.lease_expires_at is not None
                                       and job.lease_expires_at <= self.flow.now()):
            # Stopped, or paused so long that the lease ran out before the handler
            # started: give the attempt back (if the lease was rescued meanwhile,
            # the release loses and changes nothing).
            if attempt.settle():
                attempt.abandoned = "released before it started"
                self._outcomes.add(attempt, Released(attempt.claim, "not started"),
                                   outcome="released")
            return False
        if attempt.cancel_requested:  # asked to stop while it waited for a thread
            self._finish_failed(attempt, JobCancelled(job.id), retryable=False,
                                error_code=ErrorCode.CANCELLED.value)
            return False
        attempt.log.info("handler.started")
        attempt.started = time.monotonic()
        if self.job_timeout is not None:
            attempt.deadline = attempt.started + self.job_timeout
            self._supervisor_wake.set()
        context = JobContext(self, attempt)
        try:
            result = self.handler(job, context)
        except AttemptAbandoned:
            self._finish_abandoned(attempt)
        except JobCancelled as exc:
            self._finish_failed(attempt, exc, retryable=False,
                                error_code=ErrorCode.CANCELLED.value)
        except PermanentJobError as exc:
            self._finish_failed(attempt, exc, retryable=False, error_code=exc.error_code)
        except ObjectChanged as exc:
            self._finish_failed(attempt, exc, retryable=False, error_code=OBJECT_CHANGED)
        except (StorageUnavailable, StoragePermissionDenied) as exc:
            self._finish_deferred(attempt, exc, retry_in=None, error_code=STORAGE_UNAVAILABLE)
        except RetryLater as exc:
            self._finish_deferred(attempt, exc, retry_in=exc.delay,
                                  error_code=exc.error_code or RETRY_LATER)
        except BaseException as exc:
            # Anything else, SystemExit included: the attempt failed, not
            # the handler thread, which runs the next job.
            self._finish_failed(attempt, exc, retryable=True)
        else:
            self._finish_succeeded(attempt, result)
        finally:
            context._clean_up()
        return True

    def _finish_abandoned(self, attempt: _Attempt) -> None:
        if attempt.abandoned is None:
            # Raised by the handler itself, not by its context: an ordinary error.
            self._finish_failed(attempt, AttemptAbandoned(attempt.job_id, "raised by handler"),
                                retryable=True)
            return
        attempt.log.info("handler.finished", outcome="abandoned", reason=attempt.abandoned,
                         duration_ms=_elapsed_ms(attempt.started))

    def _finish_succeeded(self, attempt: _Attempt, result: Any) -> None:
        if not attempt.settle():
            attempt.log.info("handler.finished", outcome="ignored", reason=attempt.abandoned,
                             duration_ms=_elapsed_ms(attempt.started))
            return
        try:
            checked = json_object(result, "handler result")
        except InvalidInput as exc:
            self._outcomes.add(attempt, Failed(attempt.claim, str(exc), retryable=False,
                                               error_code=INVALID_RESULT),
                               outcome="invalid_result", error=str(exc), level="warning")
            return
        self._outcomes.add(attempt, Succeeded(attempt.claim, checked), outcome="succeeded")
        self._storage_recovered()

    def _finish_failed(self, attempt: _Attempt, exc: BaseException, *,
                       retryable: bool, error_code: str | None = None) -> None:
        if not attempt.settle():
            attempt.log.info("handler.finished", outcome="ignored", reason=attempt.abandoned,
                             error=error_message(exc), duration_ms=_elapsed_ms(attempt.started))
            return
        # A handler's own verdict needs no traceback; an unexpected error does.
        expected = isinstance(exc, PermanentJobError | ObjectChanged | JobCancelled)
        message = (str(exc) if isinstance(exc, PermanentJobError | JobCancelled)
                   else error_message(exc))
        self._outcomes.add(attempt, self._failure(attempt, message, retryable=retryable,
                                                  error_code=error_code),
                           outcome="error", error=message, retryable=retryable,
                           exc_info=None if expected else exc, level="warning")

    def _finish_deferred(self, attempt: _Attempt, exc: JobflowError, *,
                         retry_in: timedelta | None, error_code: str) -> None:
        """The attempt met an outage (``retry_in`` None: the object store's; the
        policy's deferral backoff, with jitter, applies and claiming pauses) or
        the handler raised :class:`RetryLater`: give it back, deferred."""
        if not attempt.settle():
            attempt.log.info("handler.finished", outcome="ignored", reason=attempt.abandoned,
                             error=error_message(exc), duration_ms=_elapsed_ms(attempt.started))
            return
        message = str(exc) if isinstance(exc, RetryLater) else error_message(exc)
        if retry_in is None:
            retry_in = self.defer_delay(attempt.claim.job.deferrals)
            self._storage_outage()
        self._outcomes.add(attempt, Deferred(attempt.claim, message, retry_in=retry_in,
                                             error_code=error_code),
                           outcome="deferred", error=message, error_code=error_code,
                           retry_in_seconds=retry_in.total_seconds(), level="warning")

    def _failure(self, attempt: _Attempt, message: str, *, retryable: bool,
                 error_code: str | None) -> Failed:
        return Failed(attempt.claim, message, retryable=retryable, error_code=error_code,
                      retry_in=self.retry_delay(attempt.claim.job.attempts) if retryable
                      else None)

    def retry_delay(self, attempts: int) -> timedelta:
        """The policy's exponential backoff after ``attempts`` tries, with jitter:
        a random point in its upper half, so failed jobs do not retry in lockstep."""
        base = self.flow.policy.retry_delay(attempts)
        return base * (0.5 + 0.5 * self._random.random())

    def defer_delay(self, deferrals: int) -> timedelta:
        """The policy's deferral backoff after ``deferrals`` earlier deferrals, with
        jitter (a random point in its upper half), as :meth:`retry_delay`."""
        base = self.flow.policy.defer_delay(deferrals)
        return base * (0.5 + 0.5 * self._random.random())

    def _expect_retry(self, job: Job) -> None:
        """Look for jobs again when a job this worker retried becomes due."""
        if job.status is not JobStatus.QUEUED:
            return
        # A few milliseconds late rather than early: the store decides with the clock.
        wait = max((job.run_at - self.flow.now()).total_seconds(), 0.0) + 0.005
        due = time.monotonic() + wait
        with self._attempts_lock:
            if self._retry_due is None or due < self._retry_due:
                self._retry_due = due
        self._wake.set()

    # -- pausing claims while the object store is unavailable -------------------------

    def _storage_outage(self) -> None:
        """An attempt met an unavailable object store: stop claiming for a while,
        twice as long as last time while the outage lasts. Attempts that meet
        it during a pause (a batch runs together) do not lengthen the pause."""
        now = time.monotonic()
        with self._pause_lock:
            if now < self._paused_until:
                return
            previous = self._pause
            self._pause = min(previous * 2 if previous else self.storage_pause,
                              self.storage_pause_max)
            self._paused_until = now + self._pause
            pause = self._pause
        if pause != previous:
            self._log.warning("worker.claims_paused", seconds=pause,
                              reason="object store unavailable")

    def _storage_recovered(self) -> None:
        """An attempt succeeded: claim again at once, and start any later pause afresh."""
        with self._pause_lock:
            if not self._pause:
                return
            self._pause = self._paused_until = 0.0
        self._log.info("worker.claims_resumed", reason="an attempt succeeded")
        self._wake.set()

    def _claims_paused_for(self) -> float:
        """Seconds left of the current pause (0: claim)."""
        with self._pause_lock:
            return max(self._paused_until - time.monotonic(), 0.0)

    # -- leases and timeouts ----------------------------------------------------------

    def _renew(self, attempt: _Attempt, detail: JSONDict | None = None) -> None:
        """Heartbeat one attempt's lease now (a handler's own progress report)."""
        with attempt.lock:
            if attempt.settled:
                return
            claim = attempt.claim
        try:
            renewed: Claim | LeaseLost = self.flow.heartbeat(
                claim, lease_seconds=self.lease_seconds, detail=detail)
        except LeaseLost as lost:
            renewed = lost
        except StorageUnavailable as exc:
            self._heartbeat_failed([attempt], exc)
            return
        self._renewed(attempt, renewed)

    def _renew_due(self, due: Sequence[_Attempt]) -> None:
        """Heartbeat every lease that is due in one store call."""
        try:
            renewed = self.flow.heartbeat_many([attempt.claim for attempt in due],
                                               lease_seconds=self.lease_seconds)
        except StorageUnavailable as exc:
            self._heartbeat_failed(due, exc)
            return
        for attempt, outcome in zip(due, renewed, strict=True):
            self._renewed(attempt, outcome)

    def _renewed(self, attempt: _Attempt, outcome: Claim | LeaseLost) -> None:
        with attempt.lock:
            if attempt.settled:
                return  # finished meanwhile: its outcome decides
            if isinstance(outcome, LeaseLost):
                attempt.settled = True
                attempt.abandoned = "lease lost"
            else:
                attempt.claim = outcome
                attempt.next_beat = time.monotonic() + self.heartbeat_interval
                asked = (outcome.job.cancel_requested_at is not None
                         and not attempt.cancel_requested)
                attempt.cancel_requested = outcome.job.cancel_requested_at is not None
                if asked:
                    attempt.log.info("job.cancel_requested")
                return
        attempt.log.warning("job.lease_lost", write="heartbeat")

    def _heartbeat_failed(self, attempts: Sequence[_Attempt], exc: StorageUnavailable) -> None:
        """The leases may still hold: try again sooner than usual."""
        self._log.warning("job.heartbeat_failed", jobs=[a.job_id for a in attempts],
                          error=str(exc))
        sooner = time.monotonic() + self.heartbeat_interval / 2
        for attempt in attempts:
            attempt.next_beat = sooner

    def _release_waiting(self) -> int:
        """Hand back at once the jobs claimed ahead that no handler thread took."""
        released = 0
        while True:
            try:
                attempt = self._ready.get_nowait()
            except queue.Empty:
                return released
            if attempt is None:
                continue
            with self._attempts_lock:
                self._attempts.pop(attempt.claim.token, None)
            if attempt.settle():
                attempt.abandoned = "released at shutdown"
                self._outcomes.add(attempt, Released(attempt.claim, "not started"),
                                   outcome="released")
                released += 1

    def _time_out(self, attempt: _Attempt) -> None:
        if not attempt.settle():
            return
        attempt.abandoned = "timed out"
        assert self.job_timeout is not None
        message = f"handler did not finish within {self.job_timeout:g} s"
        attempt.log.warning("handler.timed_out", timeout=self.job_timeout)
        self._outcomes.add(attempt, self._failure(attempt, message, retryable=True,
                                                  error_code=HANDLER_TIMEOUT),
                           outcome="timed_out", level="warning")

    def _supervise(self) -> None:
        """Renew leases on time and time out overdue handlers, until shut down."""
        while not self._housekeeping_done.is_set():
            self._supervisor_wake.clear()
            with self._attempts_lock:
                live = [a for a in self._attempts.values() if not a.settled]
            now = time.monotonic()
            for attempt in live:
                if attempt.deadline is not None and now >= attempt.deadline:
                    self._time_out(attempt)
            due = [a for a in live if not a.settled and now >= a.next_beat]
            if due:
                try:
                    with self._renewing.round():
                        self._renew_due(due)
                except Exception as exc:  # never let one failure stop every lease renewal
                    self._log.error("worker.supervision_failed", error=error_message(exc),
                                    exc_info=exc)
                    self._heartbeat_failed(due, StorageUnavailable(str(exc)))
            times = [min(a.next_beat, a.deadline if a.deadline is not None else a.next_beat)
                     for a in live if not a.settled]
            wait = min(times) - time.monotonic() if times else self.heartbeat_interval
            self._supervisor_wake.wait(max(wait, 0.0))

    # -- watching the loops ------------------------------------------------------------

    def _watch(self) -> None:
        """Say when the claim loop or the lease renewals are stuck in a store call
        for longer than a heartbeat interval (a hung database shows in the log,
        not only as silence), and keep the health file fresh while neither is."""
        while True:
            self._check_progress()
            if self._housekeeping_done.wait(min(HEALTH_INTERVAL, self.heartbeat_interval / 2)):
                return

    def _check_progress(self) -> None:
        now = time.monotonic()
        healthy = True
        for loop in (self._claiming, self._renewing):
            since = loop.busy_since
            late = since is not None and now - since > self.heartbeat_interval
            healthy = healthy and not late
            if late and loop.stalled_since is None:
                loop.stalled_since = since
                self._log.warning("worker.stalled", loop=loop.name,
                                  seconds=round(now - (since or now), 1), held=self.busy)
            elif not late and loop.stalled_since is not None:
                self._log.info("worker.stall_ended", loop=loop.name,
                               seconds=round(now - loop.stalled_since, 1))
                loop.stalled_since = None
        if healthy:
            self._touch_health_file()

    def _touch_health_file(self) -> None:
        with self._health_lock:
            if self.health_file is None or self._housekeeping_done.is_set():
                return  # stopped: the file is removed, not touched again
            try:
                self.health_file.touch()
            except OSError as exc:
                if not self._health_file_failed:
                    self._log.warning("worker.health_file_failed", path=str(self.health_file),
                                      error=str(exc))
                self._health_file_failed = True
            else:
                self._health_file_failed = False

    def _remove_health_file(self) -> None:
        with self._health_lock:
            if self.health_file is not None:
                with contextlib.suppress(OSError):
                    self.health_file.unlink(missing_ok=True)

    # -- housekeeping -----------------------------------------------------------------

    def _housekeep(self) -> None:
        """Reconcile at start, then every ``reconcile_interval`` (with 10 % jitter,
        so many workers do not all reconcile in the same second)."""
        while not self._housekeeping_done.is_set():
            self._reconcile_once()
            spread = self.reconcile_interval * (0.9 + 0.2 * self._random.random())
            self._housekeeping_done.wait(spread)

    def _reconcile_once(self) -> None:
        try:
            report = self.flow.reconcile(rescuer_id=self.worker_id)
        except StorageUnavailable as exc:
            self._log.warning("worker.reconcile_failed", error=str(exc))
            return
        except Exception as exc:
            # A misconfigured object store, say: keep working, keep saying so.
            self._log.error("worker.reconcile_failed", error=error_message(exc), exc_info=exc)
            return
        if report.adopted or report.rescued:
            self._wake.set()

    # -- shutdown ---------------------------------------------------------------------

    def _shut_down(self, grace_ends: float) -> int:
        """Let handlers finish until ``grace_ends``, release the rest. Returns how
        many jobs are handed back."""
        released = self._release_waiting()
        with self._attempts_lock:
            running = list(self._attempts.values())
        if running and self._shutdown_requested.is_set():
            self._log.info("worker.stopping", running=len(running), grace=self.shutdown_grace)
        while self.busy and time.monotonic() < grace_ends:
            self._wake.wait(min(grace_ends - time.monotonic(), 0.05))
            self._wake.clear()
        with self._attempts_lock:
            left = list(self._attempts.values())
        for attempt in left:
            if not attempt.settle():
                continue
            attempt.abandoned = "released at shutdown"
            self._outcomes.add(attempt, Released(attempt.claim), outcome="released")
            released += 1
        return released


@attrs.define(eq=False)
class _Loop:
    """A loop of the worker whose store calls are watched: the claim loop or the
    lease renewals."""

    name: str
    busy_since: float | None = None  # time.monotonic() when its store call began
    stalled_since: float | None = None  # set while a stall is reported

    @contextlib.contextmanager
    def round(self) -> Iterator[None]:
        """A store call of the loop."""
        self.busy_since = time.monotonic()
        try:
            yield
        finally:
            self.busy_since = None


class _OutcomeBuffer:
    """Finished attempts' outcomes, written in batches by one thread.

    A batch is written when it holds an outcome for every slot, when its
    oldest outcome is ``flush_interval`` old, when no handler is running, or
    when asked (:meth:`write_all`, :meth:`close`). While the store is
    unavailable a batch is tried again, with backoff, as long as its leases
    may still hold; an outcome whose lease ran out is given up (its job is
    rescued and runs again: at least once).
    """

    def __init__(self, worker: Worker) -> None:
        self._worker = worker
        self._changed = threading.Condition()
        self._pending: list[_Pending] = []
        self._writing = 0  # outcomes taken from the buffer and not yet written
        self._urgent = False  # write what is buffered now
        self._closed_by: float | None = None  # time.monotonic() after which to give up
        #: How many batches were written so far.
        self.batches_written = 0

    def add(self, attempt: _Attempt, outcome: Outcome, /, **log_fields: Any) -> None:
        with self._changed:
            self._pending.append(_Pending(attempt, outcome, log_fields, time.monotonic()))
            # The writer needs waking for the first outcome (it then times the
            # batch itself) and for a full batch, not for each outcome.
            if len(self._pending) in (1, self._worker.concurrency):
                self._changed.notify_all()

    @property
    def unwritten(self) -> int:
        """Outcomes not written yet: buffered, or in a write under way."""
        with self._changed:
            return len(self._pending) + self._writing

    def slot_freed(self) -> None:
        """The last handler returned: the batch is complete."""
        with self._changed:
            self._changed.notify_all()

    def write_all(self) -> None:
        """Write what is buffered now, and wait until it is written."""
        with self._changed:
            if self._pending or self._writing:
                self._urgent = True
                self._changed.notify_all()
                self._changed.wait_for(lambda: not self._pending and not self._writing)

    def close(self, give_up_at: float) -> None:
        """Write everything buffered, trying until ``give_up_at`` (time.monotonic())
        while the store is unavailable; the writing thread then ends."""
        with self._changed:
            self._closed_by = give_up_at
            self._changed.notify_all()

    def write_until_closed(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                self._write(batch)
            except Exception as exc:  # a bug must not stop every later write
                self._worker._log.error("worker.write_failed", jobs=len(batch),
                                        error=error_message(exc), exc_info=exc)
            finally:
                with self._changed:
                    self._writing = 0
                    self.batches_written += 1
                    self._changed.notify_all()

    def _next_batch(self) -> list[_Pending] | None:
        """Wait until a batch is due and take it; None once closed and empty."""
        worker = self._worker
        with self._changed:
            while True:
                if self._pending:
                    waited = time.monotonic() - self._pending[0].added
                    if (self._closed_by is not None or self._urgent
                            or len(self._pending) >= worker.concurrency
                            or waited >= worker.flush_interval or not worker.busy):
                        batch, self._pending = _one_per_job(self._pending)
                        self._writing, self._urgent = len(batch), False
                        return batch
                    self._changed.wait(worker.flush_interval - waited)
                elif self._closed_by is not None:
                    return None
                else:
                    self._urgent = False
                    self._changed.wait()

    def _write(self, batch: list[_Pending]) -> None:
        """One :meth:`~jobflow.JobFlow.finish_many` call for the batch, tried again
        while the store is unavailable and the leases may still hold."""
        worker, flow = self._worker, self._worker.flow
        pause = 0.05
        while batch:
            try:
                written = flow.finish_many([pending.outcome for pending in batch])
            except StorageUnavailable as exc:
                batch = self._still_leased(batch, exc)
                if batch:
                    give_up_at = self._closed_by
                    if give_up_at is not None and time.monotonic() + pause > give_up_at:
                        self._given_up(batch, f"shutting down: {exc}")
                        return
                    time.sleep(pause)
                    pause = min(pause * 2, MAX_WRITE_BACKOFF)
                continue
            except JobflowError as exc:
                self._given_up(batch, error_message(exc))
                return
            for pending, outcome in zip(batch, written, strict=True):
                self._report(pending, outcome)
                if isinstance(outcome, Job) and isinstance(pending.outcome, Failed | Deferred):
                    worker._expect_retry(outcome)
            return

    def _still_leased(self, batch: list[_Pending], exc: StorageUnavailable) -> list[_Pending]:
        """The outcomes of ``batch`` whose leases may still hold; the others are given up."""
        now = self._worker.flow.now()
        keep = [p for p in batch if p.attempt.claim.job.lease_expires_at is None
                or p.attempt.claim.job.lease_expires_at > now]
        lapsed = [p for p in batch if p not in keep]
        if lapsed:
            self._given_up(lapsed, f"lease ran out while the store was unavailable: {exc}")
        if keep:
            self._worker._log.warning("worker.write_failed", jobs=len(keep), error=str(exc))
        return keep

    @staticmethod
    def _given_up(batch: Sequence[_Pending], error: str) -> None:
        for pending in batch:
            pending.attempt.log.error("job.write_failed", write=_write_name(pending.outcome),
                                      error=error)

    @staticmethod
    def _report(pending: _Pending, outcome: Job | LeaseLost) -> None:
        """Log an outcome once it is written (or refused for a lost lease)."""
        attempt = pending.attempt
        if isinstance(outcome, LeaseLost):
            attempt.abandoned = attempt.abandoned or "lease lost"
            attempt.log.warning("job.lease_lost", write=_write_name(pending.outcome))
            return
        fields = dict(pending.log_fields)
        level = fields.pop("level", "info")
        if fields.get("outcome") == "released":
            return  # the flow logged the release itself
        log = attempt.log.warning if level == "warning" else attempt.log.info
        log("handler.finished", status=outcome.status.value,
            duration_ms=_elapsed_ms(attempt.started), **fields)


def _one_per_job(pending: list[_Pending]) -> tuple[list[_Pending], list[_Pending]]:
    """The outcomes to write now, at most one per job, and those left for the
    next batch: a stale attempt's outcome can wait beside the same job's next
    attempt (its lease was rescued and the job claimed again), and a batch
    takes each job once. Each job's outcomes stay in the order they came."""
    batch: list[_Pending] = []
    later: list[_Pending] = []
    seen: set[str] = set()
    for item in pending:
        job_id = item.attempt.job_id
        (later if job_id in seen else batch).append(item)
        seen.add(job_id)
    return batch, later


def _write_name(outcome: Outcome) -> str:
    return {Succeeded: "succeed", Failed: "fail", Released: "release",
            Deferred: "defer"}[type(outcome)]


def _elapsed_ms(started: float) -> int:
    return round((time.monotonic() - started) * 1000)
