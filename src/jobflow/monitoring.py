"""What an operator looks at: the queue's figures in one snapshot, read with one
query, for the Prometheus gauges (:mod:`jobflow.metrics`) and the web
dashboard (:mod:`jobflow.dashboard`).

On a SQL job store the snapshot is one statement, a ``UNION ALL`` of small
aggregates, each of which reads one of the partial indexes by status (see
:mod:`jobflow.adapters.sqlalchemy.schema`): it never scans the whole table,
and its cost grows with the jobs it counts, not with the jobs kept. Other
job stores (the in-memory one) are asked through the
:class:`~jobflow.ports.JobStore` methods ``jobflow status`` uses.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import attrs

from jobflow.models import Job, JobStatus

if TYPE_CHECKING:
    import sqlalchemy as sa
    from sqlalchemy.engine import Engine

    from jobflow.flow import JobFlow

#: The failure window of the Prometheus gauges (``jobflow_failed_jobs_last_hour``).
LAST_HOUR = timedelta(hours=1)
#: How many jobs a snapshot of a store without SQL looks at per list.
SCAN_LIMIT = 10_000
#: The error code shown for a failed job that has none.
NO_ERROR_CODE = "unknown"
#: How long, in milliseconds, PostgreSQL may spend on a snapshot before it
#: cancels the statement (a monitoring read must never hold on).
STATEMENT_TIMEOUT_MS = 10_000


@attrs.frozen
class FailureGroup:
    """The jobs that failed with one error code within a snapshot's window."""

    error_code: str
    jobs: int
    latest: datetime | None


@attrs.frozen
class QueueSnapshot:
    """The queue's figures at one instant ``at`` (the flow's clock)."""

    at: datetime
    counts: dict[JobStatus, int]
    #: When the oldest job still waiting for its upload was created.
    oldest_upload_since: datetime | None
    #: The earliest ``run_at`` of a queued job: since when the job that has
    #: waited longest for a worker is due (it may lie ahead, for retries).
    oldest_queued_since: datetime | None
    #: Jobs in ``awaiting_upload`` past their upload deadline: no valid upload
    #: came in time, and no reconcile has expired them yet.
    stuck_uploads: int
    #: Jobs in ``quick_running`` whose lease expired: their worker is gone and
    #: no reconcile has rescued them yet.
    expired_leases: int
    failure_window: timedelta
    #: Jobs failed within ``failure_window``, by error code, most first (then by code).
    failures: tuple[FailureGroup, ...]

    def _age(self, since: datetime | None) -> float:
        if since is None:
            return 0.0
        return max((self.at - since).total_seconds(), 0.0)

    @property
    def upload_wait_seconds(self) -> float:
        """How long the oldest job waiting for its upload has waited (0: none)."""
        return self._age(self.oldest_upload_since)

    @property
    def queue_age_seconds(self) -> float:
        """How long the queued job due first has waited for a worker (0: none due)."""
        return self._age(self.oldest_queued_since)

    @property
    def failed_recently(self) -> int:
        return sum(group.jobs for group in self.failures)


def take_snapshot(flow: JobFlow, *, failure_window: timedelta = LAST_HOUR) -> QueueSnapshot:
    """The queue's figures now: one statement on a SQL job store."""
    now = flow.now()
    engine: Engine | None = getattr(flow.store, "engine", None)
    if engine is not None:
        return _sql_snapshot(engine, now, failure_window)
    return _store_snapshot(flow, now, failure_window)


# -- any JobStore ------------------------------------------------------------------------------


def _store_snapshot(flow: JobFlow, now: datetime, failure_window: timedelta) -> QueueSnapshot:
    """Through the JobStore methods: fine for the in-memory store, which has no
    order by ``run_at`` to read (its queue age is unknown: None)."""
    store = flow.store
    waiting = store.awaiting_uploads(limit=SCAN_LIMIT)
    failed = store.failed_since(since=now - failure_window, limit=SCAN_LIMIT)
    return QueueSnapshot(
        at=now, counts=store.counts(),
        oldest_upload_since=min((job.created_at for job in waiting), default=None),
        oldest_queued_since=None,
        stuck_uploads=sum(1 for job in waiting if job.upload_expires_at <= now),
        expired_leases=len(store.expired_leases(now=now, limit=SCAN_LIMIT)),
        failure_window=failure_window, failures=_groups(failed))


def _groups(failed: list[Job]) -> tuple[FailureGroup, ...]:
    latest: dict[str, datetime | None] = {}
    counted = Counter(job.error_code or NO_ERROR_CODE for job in failed)
    for job in failed:
        code = job.error_code or NO_ERROR_CODE
        if job.finished_at is not None:
            seen = latest.get(code)
            latest[code] = job.finished_at if seen is None else max(seen, job.finished_at)
    return tuple(sorted((FailureGroup(code, n, latest.get(code)) for code, n in counted.items()),
                        key=_most_first))


def _most_first(group: FailureGroup) -> tuple[int, str]:
    return -group.jobs, group.error_code


# -- SQL ----------------------------------------------------------------------------------


def snapshot_statement() -> sa.CompoundSelect[Any]:
    """One row per figure, ``(figure, label, jobs, moment)``::

        SELECT 'jobs', 'awaiting_upload', count(*), min(created_at) FROM jobflow_jobs
            WHERE status = 'awaiting_upload'
        UNION ALL SELECT 'jobs', 'queued', count(*), min(run_at) ... WHERE status = 'queued'
        UNION ALL SELECT 'jobs', '<status>', count(*), NULL ... WHERE status = '<status>'
        UNION ALL SELECT 'stuck', '', count(*), NULL ... WHERE status = 'awaiting_upload'
            AND upload_expires_at <= :now
        UNION ALL SELECT 'expired_leases', '', count(*), NULL ... WHERE status =
            'quick_running' AND lease_expires_at <= :now
        UNION ALL SELECT 'failed', coalesce(error_code, ''), count(*), max(finished_at)
            ... WHERE status = 'failed' AND finished_at >= :since GROUP BY error_code

    Each part names one status with an inline label, so that each reads that
    status's partial index and nothing else (the counts of finished jobs
    read their index only, never the table)."""
    import sqlalchemy as sa

    from jobflow.adapters.sqlalchemy.schema import UTCDateTime, jobs, status_is

    now = sa.bindparam("now", type_=UTCDateTime)
    since = sa.bindparam("since", type_=UTCDateTime)

    def text(value: str) -> sa.ColumnElement[str]:
        return sa.literal_column(f"'{value}'", sa.Text)

    def part(figure: str, label: str | sa.ColumnElement[Any], moment: Any,
             status: JobStatus, *where: sa.ColumnElement[bool]) -> sa.Select[Any]:
        return (sa.select(text(figure).label("figure"),
                          (text(label) if isinstance(label, str) else label).label("label"),
                          sa.func.count().label("jobs"), moment.label("moment"))
                .where(status_is(status), *where))

    no_moment = sa.cast(sa.null(), UTCDateTime)
    parts = [
        part("jobs", JobStatus.AWAITING_UPLOAD.value, sa.func.min(jobs.c.created_at),
             JobStatus.AWAITING_UPLOAD),
        part("jobs", JobStatus.QUEUED.value, sa.func.min(jobs.c.run_at), JobStatus.QUEUED),
        *(part("jobs", status.value, no_moment, status) for status in
          (JobStatus.QUICK_RUNNING, JobStatus.DONE, JobStatus.FAILED)),
        part("stuck", "", no_moment, JobStatus.AWAITING_UPLOAD, jobs.c.upload_expires_at <= now),
        part("expired_leases", "", no_moment, JobStatus.QUICK_RUNNING,
             jobs.c.lease_expires_at <= now),
        part("failed", sa.func.coalesce(jobs.c.error_code, ""), sa.func.max(jobs.c.finished_at),
             JobStatus.FAILED, jobs.c.finished_at >= since).group_by(jobs.c.error_code),
    ]
    return sa.union_all(*parts)


_SNAPSHOT: sa.CompoundSelect[Any] | None = None


def _sql_snapshot(engine: Engine, now: datetime, failure_window: timedelta) -> QueueSnapshot:
    from jobflow.adapters.sqlalchemy.errors import driver_errors

    global _SNAPSHOT
    if _SNAPSHOT is None:
        _SNAPSHOT = snapshot_statement()
    with driver_errors("read the queue's figures"), engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            conn.exec_driver_sql(f"SET LOCAL statement_timeout = {STATEMENT_TIMEOUT_MS}")
        rows = conn.execute(_SNAPSHOT, {"now": now, "since": now - failure_window}).all()
        conn.rollback()
    counts = dict.fromkeys(JobStatus, 0)
    since: dict[str, datetime | None] = {}
    found: dict[str, int] = {}
    groups: list[FailureGroup] = []
    for figure, label, jobs, moment in rows:
        if figure == "jobs":
            counts[JobStatus(label)] = jobs
            since[label] = moment
        elif figure == "failed":
            groups.append(FailureGroup(label or NO_ERROR_CODE, jobs, moment))
        else:
            found[figure] = jobs
    groups.sort(key=_most_first)
    return QueueSnapshot(
        at=now, counts=counts, oldest_upload_since=since.get(JobStatus.AWAITING_UPLOAD.value),
        oldest_queued_since=since.get(JobStatus.QUEUED.value),
        stuck_uploads=found.get("stuck", 0), expired_leases=found.get("expired_leases", 0),
        failure_window=failure_window, failures=tuple(groups))
