"""Prometheus metrics: what a process did, and what the database holds.

Two kinds, named by Prometheus's conventions (``jobflow_`` prefix, base
units, ``_total`` counters, ``_seconds`` histograms), their labels bounded
(never a job id or an owner):

- **Process metrics** (:class:`JobflowMetrics`), recorded by every
  :class:`~jobflow.JobFlow` as it works: upload verifications by outcome,
  rejections by reason, claims, finished attempts by outcome, attempt
  durations and queue waits, lease rescues, lost leases, and the latency of
  every object store call by operation and error class. Each written
  transition passes through one hook (:meth:`JobflowMetrics.transition`),
  whatever the logging level: recording is a few counter increments. A flow
  records into the process-wide :func:`default_metrics` (registered in
  ``prometheus_client.REGISTRY``) unless it is given its own.
- **Database gauges** (:class:`DatabaseCollector`), computed when scraped
  from one :func:`~jobflow.monitoring.take_snapshot` (one indexed query),
  cached for a few seconds so that many scrapers cost one query, and
  answered within a deadline: while the database is down or hanging, a
  scrape answers at once with ``jobflow_up 0`` and the process metrics.

Serve them with ``jobflow worker --metrics-port`` (process metrics),
``jobflow metrics`` (the database gauges, one per deployment), or mount
:func:`make_wsgi_app` / :func:`make_asgi_app` in a host application.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from jobflow.errors import JobflowError, LeaseLost
from jobflow.logconfig import library_logger
from jobflow.models import Change, Claim, Event, Job, JobStatus, ObjectInfo, PresignedUpload
from jobflow.monitoring import LAST_HOUR, QueueSnapshot, take_snapshot

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from jobflow.flow import JobFlow
    from jobflow.ports import ObjectStore

#: Attempt durations, claim to finish: from a quick job to a two-hour transcode.
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                    300.0, 600.0, 1800.0, 3600.0, 7200.0)
#: Queue waits, due to claimed.
WAIT_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
                900.0, 3600.0)
#: Object store calls: a HEAD in milliseconds, a download in seconds.
STORE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                 10.0, 30.0, 120.0)
#: How many error codes ``jobflow_failed_jobs_last_hour`` lists; the rest are
#: summed as ``other``, so a handler inventing codes cannot flood Prometheus.
MAX_ERROR_CODES = 20
#: How long a database snapshot is reused, and how long a scrape waits for one.
CACHE_SECONDS = 5.0
TIMEOUT_SECONDS = 2.0

#: The label of an object store call that raised no error.
NO_ERROR = "none"
#: Rejection reasons, from the text :func:`jobflow.states.rejection_reason` gives.
_REJECTIONS = (
    ("object key", "wrong_key"),
    ("object is empty", "empty"),
    ("below the minimum", "too_small"),
    ("above the limit", "too_large"),
    ("is not allowed", "content_type_not_allowed"),
    ("differs from the declared", "content_type_mismatch"),
    ("reports no checksum", "checksum_missing"),
    ("checksum does not match", "checksum_mismatch"),
)
_FINISHES = {Event.SUCCEED: "succeeded", Event.RETRY: "retried", Event.FAIL: "failed",
             Event.RELEASE: "released", Event.DEFER: "deferred"}


def rejection_kind(reason: str | None) -> str:
    """The bounded label of an upload rejection's reason (``other`` if unknown)."""
    text = reason or ""
    for needle, kind in _REJECTIONS:
        if needle in text:
            return kind
    return "other"


def error_class(exc: BaseException) -> str:
    """The label of a failed call: jobflow's error class, a bounded set."""
    return type(exc).__name__ if isinstance(exc, JobflowError) else "unexpected"


class JobflowMetrics(Collector):
    """The process metrics of jobflow. ``registry`` is where they are exported
    (default: none; :func:`default_metrics` is the process-wide instance in
    ``prometheus_client.REGISTRY``). The instance is itself a collector, so
    it can be registered in further registries."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        own = self._own = CollectorRegistry(auto_describe=True)
        self.uploads_initiated = Counter(
            "jobflow_uploads_initiated", "Jobs created in awaiting_upload (upload tickets "
            "handed out).", registry=own)
        self.upload_verifications = Counter(
            "jobflow_upload_verifications", "Uploads checked against the object store, by "
            "outcome: verified (queued), rejected, missing (no object yet; or none by the "
            "deadline), storage_unavailable, error (a permission or setup problem).",
            ["outcome"], registry=own)
        self.upload_rejections = Counter(
            "jobflow_upload_rejections", "Uploads rejected, by reason.", ["reason"],
            registry=own)
        self.claims = Counter("jobflow_claims", "Jobs claimed by a worker.", registry=own)
        self.attempts_finished = Counter(
            "jobflow_attempts_finished", "Attempts ended by their lease holder, by outcome: "
            "succeeded, retried, failed, released (handed back unfinished), deferred (an "
            "outage or RetryLater gave the attempt back).", ["outcome"],
            registry=own)
        self.job_duration = Histogram(
            "jobflow_job_duration_seconds", "Attempts from claim to finish, by outcome.",
            ["outcome"], buckets=DURATION_BUCKETS, registry=own)
        self.queue_wait = Histogram(
            "jobflow_queue_wait_seconds", "How long claimed jobs waited in queued after they "
            "were due.", buckets=WAIT_BUCKETS, registry=own)
        self.lease_rescues = Counter(
            "jobflow_lease_rescues", "Jobs whose worker's lease expired, rescued by "
            "reconcile: requeued, or failed with no attempts left.", ["outcome"], registry=own)
        self.leases_lost = Counter(
            "jobflow_leases_lost", "Writes refused because the writer's lease was no longer "
            "held (LeaseLost), by the event tried.", ["event"], registry=own)
        self.object_store_duration = Histogram(
            "jobflow_object_store_duration_seconds", "Object store calls, by operation and "
            "error class (none: no error).", ["operation", "error"], buckets=STORE_BUCKETS,
            registry=own)
        # Children resolved once: recording one costs an increment, not a lookup.
        self._claimed = self.claims
        self._finished = {event: (self.attempts_finished.labels(outcome),
                                  self.job_duration.labels(outcome))
                          for event, outcome in _FINISHES.items()}
        self._verified = self.upload_verifications.labels("verified")
        self._rejected = self.upload_verifications.labels("rejected")
        self._store_ok: dict[str, Any] = {}
        self._on_event: dict[Event, Callable[[Change, Job], None]] = {
            Event.CREATED: self._created, Event.VERIFY_UPLOAD: self._verify,
            Event.REQUEUE: self._verify, Event.REJECT_UPLOAD: self._reject,
            Event.RESCUE: self._rescue,
            **dict.fromkeys(_FINISHES, self._finish),
        }
        for outcome in ("verified", "rejected", "missing", "storage_unavailable", "error"):
            self.upload_verifications.labels(outcome)
        for outcome in _FINISHES.values():
            self.attempts_finished.labels(outcome)
        for outcome in ("requeued", "failed"):
            self.lease_rescues.labels(outcome)
        if registry is not None:
            registry.register(self)

    def collect(self) -> Iterable[prometheus_client.Metric]:
        return self._own.collect()

    def describe(self) -> Iterable[prometheus_client.Metric]:
        return self._own.collect()

    # -- recording -------------------------------------------------------------------------

    def transition(self, change: Change, job: Job) -> None:
        """A transition was written (``job`` as written): count what it means."""
        record = self._on_event.get(change.event)
        if record is not None:
            record(change, job)

    def _created(self, change: Change, job: Job) -> None:
        self.uploads_initiated.inc()

    def _verify(self, change: Change, job: Job) -> None:
        self._verified.inc()

    def _reject(self, change: Change, job: Job) -> None:
        self._rejected.inc()
        self.upload_rejections.labels(rejection_kind(job.error_message)).inc()

    def _rescue(self, change: Change, job: Job) -> None:
        self.lease_rescues.labels("failed" if job.status is JobStatus.FAILED
                                  else "requeued").inc()

    def _finish(self, change: Change, job: Job) -> None:
        counter, duration = self._finished[change.event]
        counter.inc()
        started = change.before.started_at if change.before is not None else None
        if started is not None:
            duration.observe(max((job.updated_at - started).total_seconds(), 0.0))

    def claimed(self, claims: list[Claim]) -> None:
        """Jobs were claimed: count them and how long each waited once due."""
        if not claims:
            return
        self._claimed.inc(len(claims))
        observe = self.queue_wait.observe
        for claim in claims:
            job = claim.job
            if job.started_at is not None:
                observe(max((job.started_at - job.run_at).total_seconds(), 0.0))

    def upload_checked(self, outcome: str) -> None:
        """An upload check that wrote nothing: ``missing``, ``storage_unavailable``
        or ``error`` (the written ones are counted by :meth:`transition`)."""
        self.upload_verifications.labels(outcome).inc()

    def lease_lost(self, lost: LeaseLost) -> None:
        self.leases_lost.labels(lost.event).inc()

    def object_store_call(self, operation: str, seconds: float,
                          error: BaseException | None = None) -> None:
        if error is None:
            child = self._store_ok.get(operation)
            if child is None:
                child = self._store_ok[operation] = self.object_store_duration.labels(
                    operation, NO_ERROR)
            child.observe(seconds)
        else:
            self.object_store_duration.labels(operation, error_class(error)).observe(seconds)


_default: JobflowMetrics | None = None
_default_lock = threading.Lock()


def default_metrics() -> JobflowMetrics:
    """The process-wide metrics, registered in ``prometheus_client.REGISTRY`` on
    first use: what every flow records into unless given its own."""
    global _default
    with _default_lock:
        if _default is None:
            _default = JobflowMetrics(prometheus_client.REGISTRY)
        return _default


# -- object store calls --------------------------------------------------------------------


class InstrumentedObjectStore:
    """An :class:`~jobflow.ports.ObjectStore` that times each call of ``inner``
    into ``metrics`` (operation, error class). Anything else is ``inner``'s."""

    def __init__(self, inner: ObjectStore, metrics: JobflowMetrics) -> None:
        self.inner = inner
        self._metrics = metrics

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.inner!r})"

    @property
    def bucket(self) -> str:
        return self.inner.bucket

    def _timed(self, operation: str, call: Callable[..., Any], *args: Any,
               **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            result = call(*args, **kwargs)
        except BaseException as exc:
            self._metrics.object_store_call(operation, time.perf_counter() - started, exc)
            raise
        self._metrics.object_store_call(operation, time.perf_counter() - started)
        return result

    def presign_upload(self, key: str, *, content_type: str, expires_in: int, min_bytes: int,
                       max_bytes: int, sha256: str | None = None) -> PresignedUpload:
        upload: PresignedUpload = self._timed(
            "presign_upload", self.inner.presign_upload, key, content_type=content_type,
            expires_in=expires_in, min_bytes=min_bytes, max_bytes=max_bytes, sha256=sha256)
        return upload

    def head(self, key: str) -> ObjectInfo | None:
        info: ObjectInfo | None = self._timed("head", self.inner.head, key)
        return info

    def open(self, key: str, *, expected: ObjectInfo | None = None) -> BinaryIO:
        stream: BinaryIO = self._timed("open", self.inner.open, key, expected=expected)
        return stream

    def download(self, key: str, dest: Path, *, expected: ObjectInfo | None = None) -> Path:
        path: Path = self._timed("download", self.inner.download, key, dest, expected=expected)
        return path

    def put(self, key: str, data: bytes, *, content_type: str) -> ObjectInfo:
        info: ObjectInfo = self._timed("put", self.inner.put, key, data,
                                       content_type=content_type)
        return info

    def delete(self, key: str) -> None:
        self._timed("delete", self.inner.delete, key)


def instrument_objects(objects: ObjectStore, metrics: JobflowMetrics) -> ObjectStore:
    """``objects`` timed into ``metrics`` (a store instrumented already is
    unwrapped first: a call is never counted twice)."""
    inner = objects.inner if isinstance(objects, InstrumentedObjectStore) else objects
    return InstrumentedObjectStore(inner, metrics)


# -- database gauges -------------------------------------------------------------------------


class DatabaseCollector(Collector):
    """The database gauges of ``flow``'s job store, from one snapshot query.

    A snapshot is reused for ``cache_seconds``; a failed one too, so that a
    database that is down is not asked again by every scraper. A scrape waits
    at most ``timeout_seconds`` for a snapshot: the query runs in a thread of
    its own, one at a time, and a scrape that stops waiting answers with
    ``jobflow_up 0`` (the query may finish later and be used by the next).
    """

    def __init__(self, flow: JobFlow, *, cache_seconds: float = CACHE_SECONDS,
                 timeout_seconds: float = TIMEOUT_SECONDS,
                 failure_window: timedelta = LAST_HOUR) -> None:
        self.flow = flow
        self.cache_seconds = cache_seconds
        self.timeout_seconds = timeout_seconds
        self.failure_window = failure_window
        self._lock = threading.Lock()
        self._taken_at = -float("inf")  # time.monotonic() of the last answer
        self._snapshot: QueueSnapshot | None = None
        self._query_seconds = 0.0
        self._running: threading.Event | None = None
        self._running_since = 0.0
        self._log = library_logger("jobflow.metrics")

    def describe(self) -> Iterable[prometheus_client.Metric]:
        return []  # the names are fixed; never query the database to register

    def snapshot(self) -> QueueSnapshot | None:
        """The latest snapshot, or None while the database does not answer
        (a scrape waits for a query at most ``timeout_seconds`` after it began)."""
        with self._lock:
            now = time.monotonic()
            if now - self._taken_at < self.cache_seconds:
                return self._snapshot
            if self._running is None:
                self._running, self._running_since = threading.Event(), now
                threading.Thread(target=self._refresh, args=(self._running,),
                                 name="jobflow-metrics-snapshot", daemon=True).start()
            running = self._running
            wait = self._running_since + self.timeout_seconds - now
        if wait <= 0 or not running.wait(wait):
            return None  # a query hangs: the next scrapes do not wait for it either
        with self._lock:
            return self._snapshot

    def _refresh(self, done: threading.Event) -> None:
        started = time.monotonic()
        snapshot: QueueSnapshot | None = None
        try:
            snapshot = take_snapshot(self.flow, failure_window=self.failure_window)
        except Exception as exc:
            self._log.warning("metrics.snapshot_failed", error=str(exc),
                              error_class=error_class(exc))
        with self._lock:
            self._snapshot = snapshot
            self._query_seconds = time.monotonic() - started
            self._taken_at = time.monotonic()
            self._running = None
        done.set()

    def collect(self) -> Iterator[prometheus_client.Metric]:
        snapshot = self.snapshot()
        up = GaugeMetricFamily("jobflow_up", "1 when the job database answered the last "
                               "snapshot query, else 0.")
        up.add_metric([], 1.0 if snapshot is not None else 0.0)
        yield up
        if snapshot is None:
            return
        yield from snapshot_metrics(snapshot, self._query_seconds)


def snapshot_metrics(snapshot: QueueSnapshot,
                     query_seconds: float) -> Iterator[prometheus_client.Metric]:
    """The database gauges of one snapshot."""
    jobs = GaugeMetricFamily("jobflow_jobs", "Jobs by status.", labels=["status"])
    for status, count in snapshot.counts.items():
        jobs.add_metric([status.value], count)
    yield jobs
    ages = GaugeMetricFamily(
        "jobflow_oldest_job_age_seconds", "How long the oldest job has waited: in "
        "awaiting_upload since it was created, in queued since it was due (0: none).",
        labels=["status"])
    ages.add_metric(["awaiting_upload"], snapshot.upload_wait_seconds)
    if snapshot.oldest_queued_since is not None or not snapshot.counts[JobStatus.QUEUED]:
        ages.add_metric(["queued"], snapshot.queue_age_seconds)  # known (not on every store)
    yield ages
    yield _gauge("jobflow_stuck_uploads", "Jobs in awaiting_upload past their upload deadline, "
                 "not yet expired by reconcile.", snapshot.stuck_uploads)
    yield _gauge("jobflow_expired_leases", "Jobs in quick_running whose lease expired, not yet "
                 "rescued by reconcile.", snapshot.expired_leases)
    failed = GaugeMetricFamily("jobflow_failed_jobs_last_hour", "Jobs that failed in the last "
                               "hour, by error code.", labels=["error_code"])
    for code, count in _bounded(snapshot):
        failed.add_metric([code], count)
    yield failed
    yield _gauge("jobflow_snapshot_query_seconds", "How long the last snapshot query took.",
                 query_seconds)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    gauge = GaugeMetricFamily(name, documentation)
    gauge.add_metric([], value)
    return gauge


def _bounded(snapshot: QueueSnapshot) -> list[tuple[str, int]]:
    """The failures by error code, the most frequent :data:`MAX_ERROR_CODES`
    kept and the rest summed as ``other``."""
    kept = {group.error_code: group.jobs for group in snapshot.failures[:MAX_ERROR_CODES]}
    rest = sum(group.jobs for group in snapshot.failures[MAX_ERROR_CODES:])
    if rest:
        kept["other"] = kept.get("other", 0) + rest
    return list(kept.items())


# -- exposing them ------------------------------------------------------------------------------


class _Registries(Collector):
    """Collects from several collectors (registries included) as one."""

    def __init__(self, *sources: Collector) -> None:
        self._sources = sources

    def collect(self) -> Iterator[prometheus_client.Metric]:
        for source in self._sources:
            yield from source.collect()


def metrics_registry(flow: JobFlow | None = None, *,
                     registry: Collector | None = prometheus_client.REGISTRY,
                     cache_seconds: float = CACHE_SECONDS,
                     timeout_seconds: float = TIMEOUT_SECONDS) -> CollectorRegistry:
    """What a ``/metrics`` endpoint serves: ``registry`` (default: the
    process-wide one, jobflow's process metrics and whatever else is registered
    there; None for nothing) and, with a ``flow``, the database gauges of its
    job store."""
    combined = CollectorRegistry(auto_describe=False)
    sources: list[Collector] = []
    if registry is not None:
        sources.append(registry)
    if flow is not None:
        sources.append(DatabaseCollector(flow, cache_seconds=cache_seconds,
                                         timeout_seconds=timeout_seconds))
    combined.register(_Registries(*sources))
    return combined


def make_wsgi_app(flow: JobFlow | None = None, **options: Any) -> Callable[..., Any]:
    """A WSGI app serving :func:`metrics_registry` (same options), to mount at
    ``/metrics`` in a host application."""
    app: Callable[..., Any] = prometheus_client.make_wsgi_app(metrics_registry(flow, **options))
    return app


class _Collected(Collector):
    """Metrics collected already."""

    def __init__(self, families: list[prometheus_client.Metric]) -> None:
        self._families = families

    def collect(self) -> list[prometheus_client.Metric]:
        return self._families


def make_asgi_app(flow: JobFlow | None = None, **options: Any) -> Callable[..., Any]:
    """An ASGI app serving :func:`metrics_registry` (same options). A scrape is
    collected in a worker thread, never on the event loop: it may wait for the
    database (up to the timeout)."""
    import asyncio

    registry = metrics_registry(flow, **options)

    async def app(scope: dict[str, Any], receive: Callable[..., Any],
                  send: Callable[..., Any]) -> None:
        families = await asyncio.to_thread(lambda: list(registry.collect()))
        collected = CollectorRegistry(auto_describe=False)
        collected.register(_Collected(families))
        await prometheus_client.make_asgi_app(collected)(scope, receive, send)

    return app


def serve(registry: CollectorRegistry, *, host: str, port: int) -> WSGIServer:
    """Serve ``registry`` over HTTP on ``host:port`` (port 0: any free port,
    ``server.server_port`` tells which) from a daemon thread; stop it with
    ``server.shutdown()``."""
    server, _ = prometheus_client.start_http_server(port, addr=host, registry=registry)
    return server


__all__ = [
    "DatabaseCollector", "InstrumentedObjectStore", "JobflowMetrics", "default_metrics",
    "instrument_objects", "make_asgi_app", "make_wsgi_app", "metrics_registry",
    "rejection_kind", "serve", "snapshot_metrics",
]
