"""The worker: runs a handler on claimed jobs, under leases, until stopped.

A :class:`Worker` claims verified jobs in batches up to its free capacity and
runs ``handler(job, ctx)`` for each in its own thread. While a handler runs, a
supervisor thread renews the job's lease and enforces the per-job timeout; a
housekeeping thread runs :meth:`~jobflow.JobFlow.reconcile` periodically.
Every write the worker makes carries the lease token, so a worker that lost
its lease (it was paused, or cut off, and its job was rescued) changes
nothing: the store answers :class:`~jobflow.errors.LeaseLost` and the worker
drops the outcome.

Outcomes:

- the handler returns a JSON object (or None): the job is ``done`` with it as
  its result;
- it raises :class:`~jobflow.errors.PermanentJobError`: the job fails at once;
- it raises anything else: the attempt fails and the job is retried with
  exponential backoff and jitter while attempts remain;
- it runs past ``job_timeout``: the attempt fails with error code
  ``handler_timeout`` (and is retried while attempts remain);
- the worker is stopped: running handlers get ``shutdown_grace`` seconds to
  finish, then their jobs are released back to ``queued`` without spending
  an attempt.
"""

from __future__ import annotations

import os
import random
import secrets
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import attrs
import structlog

from jobflow.errors import (
    ConfigurationError,
    InvalidInput,
    JobflowError,
    LeaseLost,
    ObjectChanged,
    PermanentJobError,
    StorageUnavailable,
)
from jobflow.flow import JobFlow, json_object
from jobflow.models import Claim, Job, JobStatus, JSONDict, ObjectInfo
from jobflow.wakeup import Wakeup, wakeup_for

#: Error codes the worker writes, besides the core's ``handler_error``.
HANDLER_TIMEOUT = "handler_timeout"
INVALID_RESULT = "invalid_result"
OBJECT_CHANGED = "object_changed"

#: Handler error messages are cut to this many characters before they are stored.
MAX_ERROR_LENGTH = 2000
#: How many times a finishing write is tried while the store is unavailable.
FINISH_TRIES = 3

Handler = Callable[[Job, "JobContext"], Any]


class AttemptAbandoned(JobflowError):
    """This attempt no longer counts: its lease was lost, it timed out, or it was
    released at shutdown. Raised inside a handler by :meth:`JobContext.heartbeat`
    and :meth:`JobContext.check`; whatever the handler does next is ignored.
    """

    def __init__(self, job_id: str, reason: str) -> None:
        self.job_id = job_id
        self.reason = reason
        super().__init__(f"attempt on job {job_id} abandoned: {reason}")


def default_worker_id() -> str:
    """``host:pid:random``: unique per process, readable in history rows."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


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
    deadline: float | None  # time.monotonic() after which the attempt times out
    next_beat: float  # time.monotonic() of the next lease renewal
    lock: threading.Lock = attrs.field(factory=threading.Lock)
    # Set once a finishing write was made or given up on: no more writes after it.
    settled: bool = False
    abandoned: str | None = None  # why the handler's outcome no longer counts
    thread: threading.Thread | None = None

    @property
    def job_id(self) -> str:
        return self.claim.job.id


class JobContext:
    """What a handler gets besides the job: its object, progress reports, signals.

    ``open()`` and ``download()`` return exactly the object that was verified
    (:class:`~jobflow.errors.ObjectChanged` if it was replaced since).
    """

    def __init__(self, worker: Worker, attempt: _Attempt, workdir: Path) -> None:
        self._worker = worker
        self._attempt = attempt
        self._workdir = workdir
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

    def check(self) -> None:
        """Raise :class:`AttemptAbandoned` if this attempt no longer counts."""
        reason = self._attempt.abandoned
        if reason is not None:
            raise AttemptAbandoned(self.job.id, reason)

    def open(self) -> BinaryIO:
        """A binary stream of the verified object. Close it (use ``with``)."""
        return self._worker.flow.objects.open(self.job.key, expected=self._verified())

    def download(self, dest: Path | None = None) -> Path:
        """Copy the verified object to ``dest`` (default: a temporary file that is
        removed when the handler returns) and return its path."""
        if dest is None:
            dest = self._workdir / PurePosixPath(self.job.key).name
        return self._worker.flow.objects.download(self.job.key, dest, expected=self._verified())

    def heartbeat(self, *, stage: str | None = None, progress: float | None = None,
                  **detail: Any) -> None:
        """Renew the lease now and record progress in the job's history.

        Call it at meaningful steps, not per byte: each call is one write.
        Raises :class:`AttemptAbandoned` when the lease is no longer held.
        """
        extra: JSONDict = dict(detail)
        if stage is not None:
            extra["stage"] = stage
        if progress is not None:
            extra["progress"] = progress
        self._worker._renew(self._attempt, json_object(extra, "heartbeat detail"))
        self.check()

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
    """

    def __init__(self, flow: JobFlow, handler: Handler, *, worker_id: str | None = None,
                 concurrency: int = 1, lease_seconds: float | None = None,
                 heartbeat_interval: float | None = None, poll_interval: float = 1.0,
                 listen_poll_interval: float = 10.0, reconcile_interval: float = 30.0,
                 shutdown_grace: float = 25.0, job_timeout: float | None = None,
                 wakeup: Wakeup | None = None,
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
        self._check_settings()
        self._wakeup = wakeup if wakeup is not None else wakeup_for(flow.store)
        self._log: structlog.typing.FilteringBoundLogger = (
            logger or structlog.get_logger("jobflow.worker")).bind(worker_id=self.worker_id)
        self._random = random.Random()
        self._stopping = threading.Event()
        self._shutdown_requested = threading.Event()
        self._wake = threading.Event()  # the main loop should look again
        self._supervisor_wake = threading.Event()
        self._housekeeping_done = threading.Event()
        self._attempts_lock = threading.Lock()
        self._attempts: dict[str, _Attempt] = {}  # by lease token
        # When the earliest job this worker sent back for a retry becomes due
        # (time.monotonic()): its NOTIFY came while it was not due yet.
        self._retry_due: float | None = None
        self._started = False

    def _check_settings(self) -> None:
        if not isinstance(self.concurrency, int) or self.concurrency < 1:
            raise ConfigurationError(f"concurrency must be a positive integer, "
                                     f"got {self.concurrency!r}")
        positive = {"lease_seconds": self.lease_seconds,
                    "heartbeat_interval": self.heartbeat_interval,
                    "poll_interval": self.poll_interval,
                    "listen_poll_interval": self.listen_poll_interval,
                    "reconcile_interval": self.reconcile_interval}
        if self.job_timeout is not None:
            positive["job_timeout"] = self.job_timeout
        for name, value in positive.items():
            if not value > 0:
                raise ConfigurationError(f"{name} must be > 0, got {value!r}")
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
        """Handler threads still running (a timed-out handler counts until it returns)."""
        with self._attempts_lock:
            return len(self._attempts)

    def stop(self) -> None:
        """Stop claiming; :meth:`run` lets running handlers finish within
        ``shutdown_grace``, releases the rest and returns. Safe from any thread
        and from a signal handler running in a thread other than :meth:`run`'s."""
        self._shutdown_requested.set()
        self._stopping.set()
        self._wake.set()

    def run(self, *, until_idle: bool = False) -> None:
        """Work until :meth:`stop` is called.

        With ``until_idle``, reconcile once, then return as soon as no handler is
        running and nothing is due: convenient for scripts and tests.
        """
        if self._started:
            raise RuntimeError("a Worker runs once; create a new one")
        self._started = True
        supervisor = threading.Thread(target=self._supervise, name="jobflow-supervisor",
                                      daemon=True)
        supervisor.start()
        housekeeping: threading.Thread | None = None
        try:
            if until_idle:
                self._reconcile_once()
            else:
                housekeeping = threading.Thread(target=self._housekeep,
                                                name="jobflow-reconcile", daemon=True)
                housekeeping.start()
            self._wakeup.start(self._wake.set)
            self._log.info("worker.started", concurrency=self.concurrency,
                           lease_seconds=self.lease_seconds, poll_interval=self.poll_interval)
            self._claim_until_stopped(until_idle)
        finally:
            released = self._shut_down()
            self._housekeeping_done.set()
            self._supervisor_wake.set()
            self._wakeup.close()
            supervisor.join()
            if housekeeping is not None:
                housekeeping.join()
            self._log.info("worker.stopped", released=released)

    # -- claiming ---------------------------------------------------------------------

    def _claim_until_stopped(self, until_idle: bool) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            free = self.concurrency - self.busy
            claims: list[Claim] = []
            if free > 0:
                looked_at = time.monotonic()
                claims = self._claim(free)
                with self._attempts_lock:
                    if self._retry_due is not None and self._retry_due <= looked_at:
                        self._retry_due = None  # this claim already saw it due
                for claim in claims:
                    self._start(claim)
            if until_idle and not claims and self.busy == 0:
                return
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

    def _start(self, claim: Claim) -> None:
        now = time.monotonic()
        attempt = _Attempt(
            claim=claim,
            log=self._log.bind(job_id=claim.job.id, attempt=claim.job.attempts),
            deadline=now + self.job_timeout if self.job_timeout is not None else None,
            next_beat=now + self.heartbeat_interval,
        )
        attempt.thread = threading.Thread(target=self._run_attempt, args=(attempt,),
                                          name=f"jobflow-job-{claim.job.id[:8]}", daemon=True)
        with self._attempts_lock:
            self._attempts[claim.token] = attempt
        attempt.thread.start()
        self._supervisor_wake.set()

    # -- running a handler ------------------------------------------------------------

    def _run_attempt(self, attempt: _Attempt) -> None:
        job = attempt.claim.job
        attempt.log.info("handler.started")
        started = time.monotonic()
        try:
            with tempfile.TemporaryDirectory(prefix="jobflow-") as workdir:
                context = JobContext(self, attempt, Path(workdir))
                try:
                    result = self.handler(job, context)
                except AttemptAbandoned:
                    self._finish_abandoned(attempt, started)
                except PermanentJobError as exc:
                    self._finish_failed(attempt, exc, started, retryable=False,
                                        error_code=exc.error_code)
                except ObjectChanged as exc:
                    self._finish_failed(attempt, exc, started, retryable=False,
                                        error_code=OBJECT_CHANGED)
                except Exception as exc:
                    self._finish_failed(attempt, exc, started, retryable=True)
                except BaseException as exc:
                    # SystemExit or KeyboardInterrupt raised inside a handler: do
                    # not leave the lease renewed forever; retry the job elsewhere.
                    self._finish_failed(attempt, exc, started, retryable=True)
                    raise
                else:
                    self._finish_succeeded(attempt, result, started)
        finally:
            with self._attempts_lock:
                self._attempts.pop(attempt.claim.token, None)
            self._wake.set()

    def _settle(self, attempt: _Attempt) -> bool:
        """Take the right to write the attempt's final transition; False if taken."""
        with attempt.lock:
            if attempt.settled:
                return False
            attempt.settled = True
            return True

    def _finish_abandoned(self, attempt: _Attempt, started: float) -> None:
        if attempt.abandoned is None:
            # Raised by the handler itself, not by its context: an ordinary error.
            self._finish_failed(attempt, AttemptAbandoned(attempt.job_id, "raised by handler"),
                                started, retryable=True)
            return
        attempt.log.info("handler.finished", outcome="abandoned", reason=attempt.abandoned,
                         duration_ms=_elapsed_ms(started))

    def _finish_succeeded(self, attempt: _Attempt, result: Any, started: float) -> None:
        if not self._settle(attempt):
            attempt.log.info("handler.finished", outcome="ignored", reason=attempt.abandoned,
                             duration_ms=_elapsed_ms(started))
            return
        try:
            checked = json_object(result, "handler result")
        except InvalidInput as exc:
            problem = str(exc)
            attempt.log.warning("handler.finished", outcome="invalid_result", error=problem,
                                duration_ms=_elapsed_ms(started))
            self._write(attempt, "fail", lambda: self.flow.fail(
                attempt.claim, problem, retryable=False, error_code=INVALID_RESULT))
            return
        attempt.log.info("handler.finished", outcome="succeeded",
                         duration_ms=_elapsed_ms(started))
        self._write(attempt, "succeed", lambda: self._succeed_and_take_next(attempt, checked))

    def _succeed_and_take_next(self, attempt: _Attempt, result: JSONDict) -> Job:
        """Finish the job and, in the same write (one commit), claim the next
        one for the slot it frees; while stopping, only finish."""
        if self._stopping.is_set():
            return self.flow.succeed(attempt.claim, result)
        [outcome], claims = self.flow.succeed_and_claim(
            [(attempt.claim, result)], self.worker_id, limit=1,
            lease_seconds=self.lease_seconds)
        for claim in claims:
            if self._stopping.is_set():  # stopped meanwhile: hand it straight back
                self._hand_back(claim)
            else:
                self._start(claim)
        if isinstance(outcome, LeaseLost):
            raise outcome
        return outcome

    def _finish_failed(self, attempt: _Attempt, exc: BaseException, started: float, *,
                       retryable: bool, error_code: str | None = None) -> None:
        if not self._settle(attempt):
            attempt.log.info("handler.finished", outcome="ignored", reason=attempt.abandoned,
                             error=error_message(exc), duration_ms=_elapsed_ms(started))
            return
        # A handler's own verdict needs no traceback; an unexpected error does.
        expected = isinstance(exc, PermanentJobError | ObjectChanged)
        message = str(exc) if isinstance(exc, PermanentJobError) else error_message(exc)
        attempt.log.warning("handler.finished", outcome="error", error=message,
                            retryable=retryable, duration_ms=_elapsed_ms(started),
                            exc_info=None if expected else exc)
        self._expect_retry(self._write(attempt, "fail", lambda: self.flow.fail(
            attempt.claim, message, retryable=retryable, error_code=error_code,
            retry_in=self.retry_delay(attempt.claim.job.attempts) if retryable else None)))

    def retry_delay(self, attempts: int) -> timedelta:
        """The policy's exponential backoff after ``attempts`` tries, with jitter:
        a random point in its upper half, so failed jobs do not retry in lockstep."""
        base = self.flow.policy.retry_delay(attempts)
        return base * (0.5 + 0.5 * self._random.random())

    def _write(self, attempt: _Attempt, what: str, write: Callable[[], Job]) -> Job | None:
        """Make a finishing write; a lost lease or a lasting outage drops it (the lease
        then expires and ``reconcile`` rescues the job)."""
        for try_number in range(1, FINISH_TRIES + 1):
            try:
                return write()
            except LeaseLost:
                attempt.abandoned = attempt.abandoned or "lease lost"
                attempt.log.warning("job.lease_lost", write=what)
                return None
            except StorageUnavailable as exc:
                if try_number == FINISH_TRIES:
                    attempt.log.error("job.write_failed", write=what, error=str(exc))
                    return None
                time.sleep(0.5 * 2 ** (try_number - 1))
            except JobflowError as exc:
                attempt.log.error("job.write_failed", write=what, error=error_message(exc))
                return None
        return None  # pragma: no cover - the loop always returns

    # -- leases and timeouts ----------------------------------------------------------

    def _renew(self, attempt: _Attempt, detail: JSONDict | None = None) -> None:
        """Heartbeat one attempt's lease, unless it is already settled."""
        with attempt.lock:
            if attempt.settled:
                return
            try:
                attempt.claim = self.flow.heartbeat(attempt.claim,
                                                    lease_seconds=self.lease_seconds,
                                                    detail=detail)
            except LeaseLost:
                attempt.settled = True
                attempt.abandoned = "lease lost"
                attempt.log.warning("job.lease_lost", write="heartbeat")
                return
            except StorageUnavailable as exc:
                # The lease may still hold; try again sooner than usual.
                attempt.log.warning("job.heartbeat_failed", error=str(exc))
                attempt.next_beat = time.monotonic() + self.heartbeat_interval / 2
                return
            attempt.next_beat = time.monotonic() + self.heartbeat_interval

    def _time_out(self, attempt: _Attempt) -> None:
        if not self._settle(attempt):
            return
        attempt.abandoned = "timed out"
        assert self.job_timeout is not None
        message = f"handler did not finish within {self.job_timeout:g} s"
        attempt.log.warning("handler.timed_out", timeout=self.job_timeout)
        self._expect_retry(self._write(attempt, "fail", lambda: self.flow.fail(
            attempt.claim, message, retryable=True, error_code=HANDLER_TIMEOUT,
            retry_in=self.retry_delay(attempt.claim.job.attempts))))

    def _expect_retry(self, job: Job | None) -> None:
        """Look for jobs again when a job this worker retried becomes due."""
        if job is None or job.status is not JobStatus.QUEUED:
            return
        # A few milliseconds late rather than early: the store decides with the clock.
        wait = max((job.run_at - self.flow.now()).total_seconds(), 0.0) + 0.005
        due = time.monotonic() + wait
        with self._attempts_lock:
            if self._retry_due is None or due < self._retry_due:
                self._retry_due = due
        self._wake.set()

    def _supervise(self) -> None:
        """Renew leases on time and time out overdue handlers, until shut down."""
        while not self._housekeeping_done.is_set():
            self._supervisor_wake.clear()
            with self._attempts_lock:
                live = [a for a in self._attempts.values() if not a.settled]
            for attempt in live:
                now = time.monotonic()
                try:
                    if attempt.deadline is not None and now >= attempt.deadline:
                        self._time_out(attempt)
                    elif now >= attempt.next_beat:
                        self._renew(attempt)
                except Exception as exc:  # never let one job stop every lease renewal
                    attempt.log.error("job.supervision_failed", error=error_message(exc),
                                      exc_info=exc)
                    attempt.next_beat = time.monotonic() + self.heartbeat_interval / 2
            due = [min(a.next_beat, a.deadline if a.deadline is not None else a.next_beat)
                   for a in live if not a.settled]
            wait = min(due) - time.monotonic() if due else self.heartbeat_interval
            self._supervisor_wake.wait(max(wait, 0.0))

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
            report = self.flow.reconcile()
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

    def _shut_down(self) -> int:
        """Let handlers finish within the grace period, release the rest. Returns
        how many jobs were handed back."""
        with self._attempts_lock:
            running = list(self._attempts.values())
        if running and self._shutdown_requested.is_set():
            self._log.info("worker.stopping", running=len(running), grace=self.shutdown_grace)
        deadline = time.monotonic() + self.shutdown_grace
        for attempt in running:
            if attempt.thread is not None:
                attempt.thread.join(max(deadline - time.monotonic(), 0.0))
        released = 0
        with self._attempts_lock:
            left = list(self._attempts.values())
        for attempt in left:
            if not self._settle(attempt):
                continue
            attempt.abandoned = "released at shutdown"
            if self._release(attempt) is not None:
                released += 1
        return released

    def _hand_back(self, claim: Claim) -> None:
        """Release a job claimed as the worker was stopping, before it ran; if
        that fails, its lease expires and ``reconcile`` rescues it."""
        try:
            self.flow.release(claim)
        except JobflowError as exc:
            self._log.warning("job.release_failed", job_id=claim.job.id,
                              error=error_message(exc))

    def _release(self, attempt: _Attempt) -> Job | None:
        return self._write(attempt, "release", lambda: self.flow.release(attempt.claim))


def _elapsed_ms(started: float) -> int:
    return round((time.monotonic() - started) * 1000)
