"""The audit every chaos test ends with, whatever fault it caused.

It checks, from the database and from the handlers' own run log
(:mod:`tests.chaos.handlers`), that the fault cost nothing but time:

* nothing was lost: every job created still exists, and is terminal
  (``done``, ``failed``) or legitimately waiting (``awaiting_upload``, or
  ``queued`` for a retry that is not due yet); none is left running;
* nothing ran twice at once: no two attempts of one job were running at the
  same moment, by the handlers' own record (a process's attempt runs from its
  ``start`` line to its ``end`` line, or to the process's death, minus the
  time the test kept the process stopped);
* every job's history replays to its current status (:func:`jobflow.states.replay`)
  and has as many rows as the job row counts;
* no row breaks a CHECK constraint: the database's own constraint
  definitions (PostgreSQL's or SQLite's) are run again as queries.

It returns the figures the test (and ``docs/reliability.md``) reports: jobs,
how they ended, attempts run, attempts started after another attempt of the
same job had finished (work redone), and the audit's findings, which are
zero when it passes.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import attrs
import sqlalchemy as sa

from jobflow import JobFlow, JobStatus, states
from jobflow.errors import JobNotFound

Span = tuple[float, float]


@attrs.define
class Timeline:
    """What a test did to one worker process, in wall-clock seconds
    (``time.time()``): the spans it kept the process stopped (SIGSTOP to
    SIGCONT; the end None while still stopped), and when it saw it dead."""

    pid: int
    frozen: list[list[float | None]] = attrs.field(factory=list)
    died_at: float | None = None


@attrs.frozen
class Run:
    """One attempt as the handler recorded it."""

    job_id: str
    attempt: int
    pid: int
    started: float
    ended: float | None  # None: the process never wrote the end (it died)
    outcome: str | None  # "ok", "error", "abandoned"


@attrs.frozen
class AuditReport:
    """The figures of one chaos run."""

    jobs: int
    done: int
    failed: int
    waiting: int
    runs: int  # attempts the handlers started
    reruns_after_finish: int  # attempts started after one of the same job finished ok
    lost: int  # always 0 once the audit passed
    double_runs: int  # always 0 once the audit passed

    def line(self) -> str:
        return (f"{self.jobs} jobs: {self.done} done, {self.failed} failed, "
                f"{self.waiting} waiting; {self.runs} attempts run, "
                f"{self.reruns_after_finish} re-run after finishing, {self.lost} lost, "
                f"{self.double_runs} ran twice at once")


def read_runs(run_log: Path) -> list[Run]:
    """The attempts in the handlers' run log, in the order they started.

    One process may run one job's attempt number twice in turn (a deferred
    attempt gives its number back): an ``end`` line closes the earliest
    attempt of its job, number and process still open, so that two of them
    started before either ended are two attempts at once."""
    runs: list[Run] = []
    still_open: dict[tuple[str, int, int], list[int]] = defaultdict(list)
    text = run_log.read_text() if run_log.exists() else ""
    for line in text.splitlines():
        what, job_id, attempt, pid, at, *rest = line.split()
        key = (job_id, int(attempt), int(pid))
        if what == "start":
            still_open[key].append(len(runs))
            runs.append(Run(job_id, int(attempt), int(pid), float(at), None, None))
        elif still_open[key]:
            index = still_open[key].pop(0)
            runs[index] = attrs.evolve(runs[index], ended=float(at), outcome=rest[0])
    return sorted(runs, key=lambda run: run.started)


def _cut(spans: list[Span], hole: Span) -> list[Span]:
    """``spans`` without the time in ``hole``."""
    left = []
    for start, end in spans:
        if end <= hole[0] or start >= hole[1]:
            left.append((start, end))
            continue
        if start < hole[0]:
            left.append((start, hole[0]))
        if end > hole[1]:
            left.append((hole[1], end))
    return left


def active_spans(run: Run, timeline: Timeline | None) -> list[Span]:
    """When the attempt may have been running: from its start to its end (or
    the process's death; forever if neither is known), less the spans its
    process was kept stopped."""
    end = run.ended
    if end is None:
        end = timeline.died_at if timeline is not None and timeline.died_at else math.inf
    spans = [(run.started, end)]
    for stopped, continued in timeline.frozen if timeline is not None else []:
        assert stopped is not None
        spans = _cut(spans, (stopped, math.inf if continued is None else continued))
    return spans


def overlapping(runs: Sequence[Run], timelines: dict[int, Timeline]) -> list[tuple[Run, Run]]:
    """Pairs of attempts of one job that were running at the same moment."""
    found = []
    for first, second in itertools.combinations(runs, 2):
        for a, b in itertools.product(active_spans(first, timelines.get(first.pid)),
                                      active_spans(second, timelines.get(second.pid))):
            if max(a[0], b[0]) < min(a[1], b[1]):
                found.append((first, second))
                break
    return found


def check_constraints(conn: sa.Connection) -> list[tuple[str, str, str]]:
    """``(table, name, condition)`` of every CHECK constraint on jobflow's
    tables, as the database itself keeps them: PostgreSQL's catalog, or the
    ``CREATE TABLE`` statements SQLite stores."""
    if conn.dialect.name == "postgresql":
        rows = conn.execute(sa.text(
            "SELECT conrelid::regclass::text AS tab, conname, pg_get_constraintdef(oid) AS def "
            "FROM pg_constraint WHERE contype = 'c' "
            "AND conrelid::regclass::text LIKE 'jobflow%'")).all()
        return [(table, name, definition.removeprefix("CHECK ").removesuffix(" NOT VALID"))
                for table, name, definition in rows]
    inspector = sa.inspect(conn)
    return [(table, check["name"] or "unnamed", check["sqltext"])
            for table in inspector.get_table_names() if table.startswith("jobflow")
            for check in inspector.get_check_constraints(table)]


def broken_constraints(engine: sa.Engine) -> list[str]:
    """The CHECK constraints of jobflow's tables that some row breaks, each
    with the number of such rows, found by running the database's own
    definition of the constraint as a query."""
    broken = []
    with engine.connect() as conn:
        checks = check_constraints(conn)
        assert checks, "no CHECK constraint found: is this jobflow's database?"
        for table, name, condition in checks:
            rows = conn.execute(sa.text(
                f"SELECT count(*) FROM {table} WHERE NOT ({condition})")).scalar_one()
            if rows:
                broken.append(f"{name}: {rows} rows")
        miscounted = conn.execute(sa.text(
            "SELECT count(*) FROM jobflow_jobs j WHERE j.history_length <> "
            "(SELECT count(*) FROM jobflow_job_events e WHERE e.job_id = j.id)")).scalar_one()
        if miscounted:
            broken.append(f"history_length: {miscounted} jobs")
    return broken


def audit(flow: JobFlow, job_ids: Sequence[str], run_log: Path,
          timelines: Iterable[Timeline] = ()) -> AuditReport:
    """Check every job in ``job_ids`` and the run log; raise AssertionError
    naming what is wrong, or return the figures."""
    problems: list[str] = []
    by_pid = {timeline.pid: timeline for timeline in timelines}
    now = flow.now()
    statuses: dict[JobStatus, int] = defaultdict(int)
    lost = 0
    for job_id in job_ids:
        try:
            job = flow.get(job_id)
        except JobNotFound:
            lost += 1
            problems.append(f"job {job_id} is lost")
            continue
        statuses[job.status] += 1
        waiting = job.status is JobStatus.AWAITING_UPLOAD or (
            job.status is JobStatus.QUEUED and job.run_at > now)
        if job.status not in (JobStatus.DONE, JobStatus.FAILED) and not waiting:
            problems.append(f"job {job_id} is {job.status.value}, neither finished nor waiting")
        try:
            replayed = states.replay(flow.history(job_id))
        except ValueError as exc:
            problems.append(f"job {job_id}: {exc}")
        else:
            if replayed is not job.status:
                problems.append(f"job {job_id} is {job.status.value}, its history says "
                                f"{replayed.value}")
    runs_by_job: dict[str, list[Run]] = defaultdict(list)
    runs = read_runs(run_log)
    for run in runs:
        runs_by_job[run.job_id].append(run)
    double = []
    reruns = 0
    for job_runs in runs_by_job.values():
        double += overlapping(job_runs, by_pid)
        finished = [run.ended for run in job_runs if run.outcome == "ok" and run.ended]
        if finished:
            reruns += sum(1 for run in job_runs if run.started > min(finished))
    problems += [f"job {a.job_id} ran twice at once: attempt {a.attempt} in process {a.pid} "
                 f"and attempt {b.attempt} in process {b.pid}" for a, b in double]
    engine = getattr(flow.store, "engine", None)
    assert engine is not None, "the chaos audit reads a SQL job store"
    problems += [f"CHECK {broken}" for broken in broken_constraints(engine)]
    assert not problems, "the audit failed:\n" + "\n".join(problems)
    return AuditReport(
        jobs=len(job_ids), done=statuses[JobStatus.DONE], failed=statuses[JobStatus.FAILED],
        waiting=statuses[JobStatus.AWAITING_UPLOAD] + statuses[JobStatus.QUEUED],
        runs=len(runs), reruns_after_finish=reruns, lost=lost, double_runs=len(double))
