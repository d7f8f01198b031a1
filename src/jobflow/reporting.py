"""What the ``jobflow`` command shows: status reports, jobs and histories, as
plain-text tables for a terminal or as JSON for scripts and alerts."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import attrs

from jobflow.flow import JobFlow
from jobflow.models import (
    Job,
    JobEvent,
    JobStatus,
    PurgeReport,
    ReconcileReport,
    RequeueReport,
)

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

#: How many jobs a status report lists by id (the counts are complete).
LISTED = 10
#: How many waiting uploads or failures a status report looks at.
SCAN_LIMIT = 10_000


def format_time(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    return moment.strftime("%Y-%m-%d %H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, JobStatus):
        return value.value
    return value


def job_as_json(job: Job) -> dict[str, Any]:
    """Every field of ``job`` except its lease token (a capability, not data)."""
    fields = attrs.asdict(job, recurse=False)
    fields.pop("lease_token", None)
    return {name: _json_value(value) for name, value in fields.items()}


def event_as_json(event: JobEvent) -> dict[str, Any]:
    return {"seq": event.seq, "event": event.event.value,
            "from_status": event.from_status.value if event.from_status else None,
            "to_status": event.to_status.value, "at": event.at.isoformat(),
            "worker_id": event.worker_id, "attempt": event.attempt, "detail": event.detail}


def dumps(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=_json_value)


def _compact(detail: dict[str, Any]) -> str:
    return json.dumps(detail, sort_keys=True, separators=(",", ":")) if detail else ""


def table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]], indent: str = ""
          ) -> list[str]:
    """Left-aligned columns, the last one unpadded."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [str(cell).ljust(width) for cell, width in zip(row[:-1], widths, strict=False)]
        lines.append((indent + "  ".join([*cells, str(row[-1])])).rstrip())
    return lines


def job_lines(job: Job) -> list[str]:
    """One job, field by field."""
    rows = [
        ("job", job.id),
        ("status", job.status.value),
        ("owner", job.owner_id),
        ("object", f"{job.bucket}/{job.key} ({job.content_type}"
                   + (f", {job.object_size} bytes" if job.object_size is not None else "")
                   + ")"),
        ("attempts", f"{job.attempts} of {job.max_attempts}"),
        ("created", format_time(job.created_at)),
        ("upload deadline", format_time(job.upload_expires_at)),
        ("upload verified", format_time(job.upload_verified_at)),
        ("run at", format_time(job.run_at)),
    ]
    if job.lease_owner is not None:
        rows.append(("lease", f"{job.lease_owner} until {format_time(job.lease_expires_at)}"))
    rows.append(("finished", format_time(job.finished_at)))
    if job.error_code is not None:
        rows.append(("error", f"{job.error_code}: {job.error_message}"))
    if job.params:
        rows.append(("params", _compact(job.params)))
    if job.result is not None:
        rows.append(("result", _compact(job.result) or "{}"))
    width = max(len(name) for name, _ in rows)
    return [f"{name.ljust(width)}  {value}" for name, value in rows]


def history_lines(history: list[JobEvent], indent: str = "") -> list[str]:
    rows = [(str(e.seq), format_time(e.at), e.event.value,
             e.from_status.value if e.from_status else "-", e.to_status.value, str(e.attempt),
             e.worker_id or "-", _compact(e.detail)) for e in history]
    return table(("seq", "at", "event", "from", "to", "attempt", "worker", "detail"), rows,
                 indent)


@attrs.frozen
class StatusReport:
    """What ``jobflow status`` reports and alerts on."""

    counts: dict[JobStatus, int]
    stuck_after: timedelta
    stuck: list[Job]
    failure_window: timedelta
    failures: list[Job]
    expired_leases: int

    @classmethod
    def collect(cls, flow: JobFlow, *, stuck_after: timedelta,
                failure_window: timedelta) -> StatusReport:
        return cls(
            counts=flow.counts(), stuck_after=stuck_after,
            stuck=flow.stuck_uploads(older_than=stuck_after, limit=SCAN_LIMIT),
            failure_window=failure_window,
            failures=flow.recent_failures(within=failure_window, limit=SCAN_LIMIT),
            expired_leases=len(flow.store.expired_leases(now=flow.now(), limit=SCAN_LIMIT)))

    def failures_by_code(self) -> dict[str, int]:
        return dict(Counter(job.error_code or "unknown" for job in self.failures).most_common())

    def alerts(self, *, max_stuck: int | None, max_failed: int | None) -> list[str]:
        found = []
        if max_stuck is not None and len(self.stuck) > max_stuck:
            found.append(f"{len(self.stuck)} uploads stuck in awaiting_upload for more than "
                         f"{_minutes(self.stuck_after)} (limit {max_stuck})")
        if max_failed is not None and len(self.failures) > max_failed:
            found.append(f"{len(self.failures)} jobs failed in the last "
                         f"{_minutes(self.failure_window)} (limit {max_failed})")
        return found

    def as_json(self, alerts: list[str]) -> dict[str, Any]:
        return {
            "counts": {status.value: n for status, n in self.counts.items()},
            "stuck_uploads": {"older_than_minutes": self.stuck_after.total_seconds() / 60,
                              "count": len(self.stuck),
                              "job_ids": [job.id for job in self.stuck[:LISTED]]},
            "recent_failures": {"window_minutes": self.failure_window.total_seconds() / 60,
                                "count": len(self.failures),
                                "by_error_code": self.failures_by_code(),
                                "job_ids": [job.id for job in self.failures[:LISTED]]},
            "expired_leases": self.expired_leases,
            "alerts": alerts,
        }

    def lines(self) -> list[str]:
        out = table(("status", "jobs"),
                    [(status.value, str(n)) for status, n in self.counts.items()])
        out += ["", f"stuck in awaiting_upload for more than {_minutes(self.stuck_after)}: "
                    f"{len(self.stuck)}"]
        out += table(("job", "created", "upload deadline"),
                     [(job.id, format_time(job.created_at), format_time(job.upload_expires_at))
                      for job in self.stuck[:LISTED]], "  ") if self.stuck else []
        out.append(f"failed in the last {_minutes(self.failure_window)}: {len(self.failures)}")
        out += [f"  {code}: {n}" for code, n in self.failures_by_code().items()]
        out.append(f"running with an expired lease (rescued by the next reconcile): "
                   f"{self.expired_leases}")
        return out


def reconcile_lines(report: ReconcileReport) -> list[str]:
    outcome = attrs.asdict(report)
    out = [", ".join(f"{name} {len(ids)}" for name, ids in outcome.items())]
    for name, ids in outcome.items():
        out += [f"  {name}: {job_id}" for job_id in ids]
    return out


def purge_lines(report: PurgeReport) -> list[str]:
    """What a purge deleted (or, as a dry run, would delete)."""
    verb = "would delete" if report.dry_run else "deleted"
    out = [f"{verb} {report.jobs} finished jobs (done or failed before "
           f"{format_time(report.finished_before)}) and {report.events} history rows"]
    if report.objects_deleted or report.objects_failed:
        out.append(f"objects deleted {report.objects_deleted}, "
                   f"not deleted {len(report.objects_failed)}")
        out += [f"  not deleted: {key}" for key in report.objects_failed[:LISTED]]
        if len(report.objects_failed) > LISTED:
            out.append(f"  ... and {len(report.objects_failed) - LISTED} more (--json lists "
                       "them all)")
    return out


def requeue_lines(report: RequeueReport) -> list[str]:
    """What a bulk requeue did with the failed jobs of one cause."""
    outcome = {name: ids for name, ids in attrs.asdict(report).items()
               if name not in ("error_code", "stopped")}
    out = [f"error code {report.error_code}: "
           + ", ".join(f"{name.replace('_', ' ')} {len(ids)}" for name, ids in outcome.items())]
    for name, ids in outcome.items():
        if name != "requeued":
            out += [f"  {name.replace('_', ' ')}: {job_id}" for job_id in ids]
    return out


def _minutes(span: timedelta) -> str:
    minutes = span.total_seconds() / 60
    return f"{minutes:g} min"


# -- listing jobs (read-only queries on a SQL job store's tables) --------------------------

#: The columns ``jobflow jobs`` lists.
LISTED_COLUMNS = ("id", "status", "owner_id", "created_at", "updated_at", "attempts",
                  "max_attempts", "error_code", "error_message", "finished_at")


def _read(engine: Engine, statement: Any) -> list[Any]:
    """Rows of a read-only query; driver failures become jobflow errors."""
    from sqlalchemy import exc as sa_exc

    from jobflow.errors import ConfigurationError, StorageUnavailable

    try:
        with engine.connect() as connection:
            return list(connection.execute(statement))
    except sa_exc.DBAPIError as exc:
        detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        if isinstance(exc, sa_exc.ProgrammingError):
            raise ConfigurationError(f"cannot list jobs: {detail}") from exc
        raise StorageUnavailable(f"cannot list jobs: {detail}") from exc


def job_ids_starting_with(engine: Engine, prefix: str, *, limit: int) -> list[str]:
    """Up to ``limit`` job ids (canonical, sorted) whose 32 hex digits start with
    ``prefix`` (lowercase hex digits, no hyphens): the ids from ``prefix`` padded
    with 0s to ``prefix`` padded with fs, a range of the primary key's index on
    both databases (PostgreSQL orders a ``uuid`` by its bytes, SQLite keeps the
    32 lowercase hex digits as text: the same order)."""
    import uuid

    import sqlalchemy as sa

    from jobflow.adapters.sqlalchemy.schema import jobs

    low, high = (str(uuid.UUID(prefix.ljust(32, digit))) for digit in "0f")
    statement = (sa.select(jobs.c.id).where(jobs.c.id.between(low, high))
                 .order_by(jobs.c.id).limit(limit))
    return [str(row[0]) for row in _read(engine, statement)]


def list_jobs(engine: Engine, *, statuses: Sequence[JobStatus] = (), owner: str | None = None,
              error_code: str | None = None, created_before: datetime | None = None,
              created_after: datetime | None = None,
              after: tuple[datetime, str] | None = None, limit: int = 50
              ) -> list[dict[str, Any]]:
    """Jobs matching every filter given, ordered by ``(created_at, id)``; ``after``
    is the ``(created_at, id)`` of the last job of the previous page."""
    import sqlalchemy as sa

    from jobflow.adapters.sqlalchemy.schema import jobs

    statement = sa.select(*(jobs.c[name] for name in LISTED_COLUMNS))
    if statuses:
        statement = statement.where(jobs.c.status.in_(list(statuses)))
    if owner is not None:
        statement = statement.where(jobs.c.owner_id == owner)
    if error_code is not None:
        statement = statement.where(jobs.c.error_code == error_code)
    if created_before is not None:
        statement = statement.where(jobs.c.created_at <= created_before)
    if created_after is not None:
        statement = statement.where(jobs.c.created_at >= created_after)
    if after is not None:
        created, job_id = after
        statement = statement.where(sa.or_(
            jobs.c.created_at > created,
            sa.and_(jobs.c.created_at == created, jobs.c.id > job_id)))
    statement = statement.order_by(jobs.c.created_at, jobs.c.id).limit(limit)
    return [dict(zip(LISTED_COLUMNS, row, strict=True)) for row in _read(engine, statement)]


def job_list_as_json(found: list[dict[str, Any]], limit: int) -> dict[str, Any]:
    """The listed jobs and the ``--after`` of the next page (None on the last)."""
    return {"jobs": [{name: _json_value(value) for name, value in row.items()}
                     for row in found],
            "next_after": found[-1]["id"] if len(found) == limit else None}


def job_list_lines(found: list[dict[str, Any]], limit: int) -> list[str]:
    """The listed jobs as a table, ids shortened to 8 digits (a prefix ``show``
    accepts), and how to get the next page."""
    rows = [(row["id"][:8], row["status"].value, row["owner_id"],
             format_time(row["created_at"]), f"{row['attempts']}/{row['max_attempts']}",
             row["error_code"] or "-") for row in found]
    out = table(("job", "status", "owner", "created", "attempts", "error_code"), rows)
    if len(found) == limit:
        out.append(f"more: jobflow jobs --after {found[-1]['id']} (same filters)")
    return out
