"""What many workers wait on: the raw SQL drain loops under a sampler of waits and locks.

``bench/raw_sql.py`` drains jobflow's tables in two shapes: one statement that
finishes the batch held and claims the next one (data-modifying CTEs), and a
finishing statement followed by a claiming statement. This benchmark seeds
queued jobs on a throw-away PostgreSQL cluster and drains them with W worker
processes (default 16) in each shape, at each batch size, while a sampler
process polls the server every few milliseconds:

* ``pg_stat_activity`` for every worker backend: its state, its wait event
  and which statement it runs (``finish+claim``, ``claim`` or ``finish``);
* ``pg_locks`` rows with ``granted = false`` held up for worker backends, by
  lock type and mode, and how long each request has waited so far;
* for a backend waiting on a heavyweight lock, what the first backend
  ``pg_blocking_pids`` names is doing: its statement and its wait event
  (a blocker itself waiting on a lock is a wait chain);
* for a backend waiting on a ``transactionid`` lock, whose job the row is
  that it waits to update (read through the tuple lock it holds meanwhile):
  a job the waiter holds, locked by a worker that does not hold it, is a
  row another worker's ``FOR UPDATE SKIP LOCKED`` scan locked without
  claiming it.

After each drain: the ``deadlocks`` counter of ``pg_stat_database`` (delta),
how many statements the workers saw rolled back with ``deadlock detected``
(``raw_sql`` runs such a statement again, up to ``raw_sql.DEADLOCK_TRIES``
times; a worker that runs out of tries stops and is counted), and per
statement kind the calls, mean execution time and rows returned per call from
``pg_stat_statements``.

The shares are of (sample, worker backend) observations over the drain. One
poll reads pg_stat_activity, pg_locks and the rows in one statement, but not
at one instant: a backend can move on between the reads. On a machine with
fewer cores than workers, "no wait event" covers both running and waiting
for a CPU; the figures describe lock behaviour, not the throughput the same
worker count reaches with a core each.

Run ``python -m bench.lock_waits`` from the repository root (``--quick`` for a
smoke run, ``--help`` for the rest).
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.synchronize import Event
from typing import Any

import psycopg

from bench import jobflow_seed, raw_sql
from bench.drain import run_drain
from bench.pgserver import PostgresServer
from bench.tables import machine_summary, markdown_table, progress

DATABASE = "bench_lock_waits"
#: The application_name of the worker connections: the sampler watches these.
WORKER_APPLICATION = "jobflow-bench-lock-waits"
SAMPLER_APPLICATION = "jobflow-bench-lock-sampler"

#: The two raw SQL shapes: a label and ``raw_sql.drain``'s ``finish`` setting.
SHAPES: tuple[tuple[str, str], ...] = (
    ("one statement", "with the next claim"),
    ("two statements", "separately"),
)

#: Bounds (seconds) of the buckets of how long a not-granted lock had waited.
WAIT_AGE_BUCKETS: tuple[tuple[float, str], ...] = (
    (0.001, "< 1 ms"),
    (0.010, "1-10 ms"),
    (0.100, "10-100 ms"),
    (1.000, "100 ms-1 s"),
    (float("inf"), ">= 1 s"),
)

#: How a statement's text names its kind. The literals are split so that the
#: sampler's own statement, which holds them, is not taken for one of them.
_KIND = """CASE WHEN strpos({query}, 'finished' || ' AS') > 0
                 AND strpos({query}, 'claimed' || ' AS') > 0 THEN 'finish+claim'
            WHEN strpos({query}, 'claimed' || ' AS') > 0 THEN 'claim'
            WHEN strpos({query}, 'finished' || ' AS') > 0 THEN 'finish'
            ELSE 'other' END"""

#: One poll: one row per worker backend, then one row per lock request not granted.
#: A backend waiting on a transactionid lock inside an UPDATE holds the tuple
#: lock of the row version it waits to update: whose job that row is tells
#: what the blocking transaction's lock is (a worker that holds the job
#: finishes it; any other worker only locked it).
SAMPLE = f"""
WITH worker AS MATERIALIZED (
    SELECT pid, state, wait_event_type, wait_event,
           split_part(application_name, ':', 2) AS name,
           CASE WHEN state <> 'active' THEN coalesce(state, 'unknown')
                ELSE {_KIND.format(query="query")} END AS statement
    FROM pg_stat_activity
    WHERE starts_with(application_name, %(prefix)s)
), lock AS MATERIALIZED (
    SELECT l.pid, l.locktype, l.mode, l.granted, l.relation, l.page, l.tuple, l.waitstart
    FROM pg_locks AS l JOIN worker AS w ON w.pid = l.pid
    WHERE NOT l.granted OR l.locktype = 'tuple'
), waiting AS MATERIALIZED (
    SELECT worker.*,
           CASE WHEN wait_event_type = 'Lock'
                THEN (pg_blocking_pids(pid))[1] END AS blocker
    FROM worker
), waited_row AS MATERIALIZED (
    SELECT DISTINCT ON (l.pid) l.pid, job.lease_owner, job.status::text AS status,
           job.id IS NOT NULL AS found
    FROM lock AS l
    JOIN worker AS w ON w.pid = l.pid AND w.wait_event = 'transactionid'
    LEFT JOIN LATERAL (
        SELECT id, lease_owner, status FROM jobflow_jobs
        WHERE ctid = format('(%%s,%%s)', l.page, l.tuple)::tid) AS job ON true
    WHERE l.locktype = 'tuple' AND l.granted AND l.relation = 'jobflow_jobs'::regclass
)
SELECT 'backend', w.statement, w.state, w.wait_event_type, w.wait_event,
       CASE WHEN w.blocker IS NULL THEN NULL
            WHEN b.pid IS NULL THEN 'not a worker'
            ELSE b.statement END,
       b.wait_event_type, b.wait_event, NULL::float8,
       CASE WHEN w.wait_event IS DISTINCT FROM 'transactionid' THEN NULL
            WHEN r.pid IS NULL THEN 'no tuple lock seen'
            WHEN NOT r.found THEN 'row version no longer visible'
            WHEN r.lease_owner = w.name THEN 'a job the waiter holds'
            WHEN r.lease_owner = b.name THEN 'a job the blocker holds'
            WHEN r.lease_owner IS NOT NULL THEN 'a job a third worker holds'
            ELSE 'a ' || r.status || ' job, held by no worker' END
FROM waiting AS w
LEFT JOIN worker AS b ON b.pid = w.blocker
LEFT JOIN waited_row AS r ON r.pid = w.pid
UNION ALL
SELECT 'lock', locktype, mode, NULL, NULL, NULL, NULL, NULL,
       extract(epoch FROM clock_timestamp() - waitstart)::float8, NULL
FROM lock
WHERE NOT granted
"""

#: Statement kinds in pg_stat_statements, as the sampler names them.
STATEMENT_STATS = f"""
SELECT {_KIND.format(query="s.query")} AS kind,
       sum(calls)::bigint, sum(total_exec_time)::float8, sum(rows)::bigint
FROM pg_stat_statements AS s JOIN pg_database AS d ON d.oid = s.dbid
WHERE d.datname = %s AND s.toplevel
GROUP BY 1
ORDER BY 1
"""


@dataclass(frozen=True)
class Plan:
    jobs: int
    workers: int
    batches: tuple[int, ...]
    interval: float
    synchronous_commit: str


@dataclass
class Samples:
    """What the sampler saw during one drain."""

    polls: int = 0
    seconds: float = 0.0
    waits: Counter[str] = field(default_factory=Counter)  # per backend observation
    statement_waits: Counter[str] = field(default_factory=Counter)  # active ones only
    locks: Counter[str] = field(default_factory=Counter)  # not granted, summed over polls
    lock_peaks: Counter[str] = field(default_factory=Counter)  # most in one poll
    wait_ages: Counter[str] = field(default_factory=Counter)
    blockers: Counter[str] = field(default_factory=Counter)
    waited_rows: Counter[str] = field(default_factory=Counter)  # transactionid waits

    @property
    def observations(self) -> int:
        return sum(self.waits.values())


@dataclass(frozen=True)
class StatementStats:
    kind: str
    calls: int
    total_ms: float
    rows: int


@dataclass(frozen=True)
class Cell:
    """One drain: a shape at a batch size."""

    shape: str
    batch: int
    jobs: int
    done: int
    seconds: float
    deadlocks: int  # pg_stat_database delta
    deadlock_errors: int  # statements the workers saw fail with "deadlock detected"
    gave_up: int  # workers that ran out of raw_sql.DEADLOCK_TRIES
    samples: Samples
    statements: tuple[StatementStats, ...]

    @property
    def label(self) -> str:
        return f"{self.shape}, batch {self.batch}"

    @property
    def jobs_per_second(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else float("inf")


def _wait_label(wait_type: str | None, wait_event: str | None) -> str:
    return f"{wait_type}:{wait_event}" if wait_type else "no wait event"


def _age_bucket(age: float | None) -> str:
    if age is None:
        return "not yet stamped"
    return next(label for bound, label in WAIT_AGE_BUCKETS if age < bound)


# -- the sampler process ---------------------------------------------------------------------


def _sampler(conninfo: str, interval: float, go: Event, stop: Event,
             results: multiprocessing.Queue[Samples]) -> None:
    """Poll from ``go`` until ``stop``; put what was seen on ``results``."""
    samples = Samples()
    with psycopg.connect(f"{conninfo} application_name={SAMPLER_APPLICATION}",
                         autocommit=True) as connection:
        connection.execute("SET pg_stat_statements.track = 'none'")
        statement = connection.cursor()
        go.wait()
        started = time.monotonic()
        next_poll = started
        while not stop.is_set():
            rows = statement.execute(SAMPLE, {"prefix": f"{WORKER_APPLICATION}:"}).fetchall()
            samples.polls += 1
            in_poll: Counter[str] = Counter()
            for (kind, a, state, wait_type, wait_event, blocker, b_type, b_event, age,
                 waited_row) in rows:
                if kind == "backend":
                    wait = _wait_label(wait_type, wait_event)
                    if state == "active":
                        samples.waits[wait] += 1
                        samples.statement_waits[f"{a}: {wait}"] += 1
                    else:
                        samples.waits[f"{state}: {wait}"] += 1
                    if blocker is not None:
                        blocked_by = (blocker if blocker == "not a worker" else
                                      f"{blocker} in {_wait_label(b_type, b_event)}")
                        samples.blockers[f"{a} waiting on {wait_event} <- {blocked_by}"] += 1
                    if waited_row is not None:
                        samples.waited_rows[f"{a}: {waited_row}"] += 1
                else:
                    lock = f"{a} ({state})"
                    in_poll[lock] += 1
                    samples.wait_ages[_age_bucket(age)] += 1
            samples.locks.update(in_poll)
            for lock, count in in_poll.items():
                samples.lock_peaks[lock] = max(samples.lock_peaks[lock], count)
            next_poll += interval
            time.sleep(max(0.0, next_poll - time.monotonic()))
            if next_poll < time.monotonic():
                next_poll = time.monotonic()  # behind (a busy machine): no catching up
        samples.seconds = time.monotonic() - started
    results.put(samples)


# -- the worker processes --------------------------------------------------------------------


def _count_deadlocks(counter: Any) -> None:
    """Count, in this worker process, every statement that fails with ``deadlock detected``."""
    execute = psycopg.Cursor.execute

    def counting(self: psycopg.Cursor[Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return execute(self, *args, **kwargs)
        except psycopg.errors.DeadlockDetected:
            with counter.get_lock():
                counter.value += 1
            raise

    psycopg.Cursor.execute = counting  # type: ignore[method-assign]


def _drain_body(settings: dict[str, Any], wait_for_start: Callable[[], None]) -> None:
    """``raw_sql.drain``, counting deadlocks, starting the sampler with the clock.

    The connection's application_name carries the worker's name as ``raw_sql``
    writes it into ``lease_owner``, for the sampler to match jobs to workers."""
    _count_deadlocks(settings["deadlock_errors"])
    name = f"raw-{settings['worker_index']}"
    settings = {**settings,
                "conninfo": f"{settings['conninfo']} application_name={WORKER_APPLICATION}:{name}"}

    def started() -> None:
        wait_for_start()
        settings["go"].set()

    try:
        raw_sql.drain(settings, started)
    except psycopg.errors.DeadlockDetected:
        # raw_sql ran the statement DEADLOCK_TRIES times: this worker stops,
        # its held jobs stay claimed; the drain goes on with the others
        with settings["gave_up"].get_lock():
            settings["gave_up"].value += 1


# -- one drain ---------------------------------------------------------------------------------


def _deadlocks(server: PostgresServer) -> int:
    with psycopg.connect(server.conninfo(), autocommit=True) as connection:
        row = connection.execute("SELECT deadlocks FROM pg_stat_database WHERE datname = %s",
                                 (DATABASE,)).fetchone()
    return int(row[0]) if row else 0


def _wait_for_workers_gone(server: PostgresServer, timeout: float = 10.0) -> None:
    """Until no worker backend is left: each has flushed its statistics on exit."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(server.conninfo(), autocommit=True) as connection:
        while time.monotonic() < deadline:
            row = connection.execute("SELECT count(*) FROM pg_stat_activity "
                                     "WHERE starts_with(application_name, %s)",
                                     (f"{WORKER_APPLICATION}:",)).fetchone()
            if not row or row[0] == 0:
                break
            time.sleep(0.05)
    time.sleep(0.5)


def _statement_stats(server: PostgresServer) -> tuple[StatementStats, ...]:
    with psycopg.connect(server.conninfo(), autocommit=True) as connection:
        rows = connection.execute(STATEMENT_STATS, (DATABASE,)).fetchall()
    return tuple(StatementStats(str(kind), int(calls), float(total), int(count))
                 for kind, calls, total, count in rows if kind != "other")


def drain_once(server: PostgresServer, plan: Plan, shape: str, finish: str,
               batch: int) -> Cell:
    conninfo = server.conninfo(DATABASE)
    jobflow_seed.reset(conninfo)
    jobflow_seed.seed_queued(conninfo, plan.jobs)
    jobflow_seed.vacuum_analyze(conninfo)
    with psycopg.connect(server.conninfo(), autocommit=True) as connection:
        connection.execute("SELECT pg_stat_statements_reset()")
    deadlocks_before = _deadlocks(server)

    context = multiprocessing.get_context(
        "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    go, stop = context.Event(), context.Event()
    deadlock_errors, gave_up = context.Value("i", 0), context.Value("i", 0)
    results: multiprocessing.Queue[Samples] = context.Queue()
    sampler = context.Process(target=_sampler,
                              args=(conninfo, plan.interval, go, stop, results),
                              daemon=True)
    sampler.start()
    settings = {"finish": finish, "batch": batch,
                "conninfo": conninfo,
                "go": go, "deadlock_errors": deadlock_errors, "gave_up": gave_up}
    try:
        drained = run_drain(_drain_body, settings, workers=plan.workers,
                            expected_jobs=plan.jobs)
    finally:
        go.set()  # a sampler still waiting (a worker failed first) ends too
        stop.set()
    samples = results.get(timeout=60)
    sampler.join(timeout=10)

    _wait_for_workers_gone(server)
    done = jobflow_seed.count_status(conninfo, "done")
    return Cell(shape=shape, batch=batch, jobs=plan.jobs, done=done, seconds=drained.seconds,
                deadlocks=_deadlocks(server) - deadlocks_before,
                deadlock_errors=deadlock_errors.value, gave_up=gave_up.value,
                samples=samples, statements=_statement_stats(server))


# -- report ------------------------------------------------------------------------------------


def _share(count: int, total: int) -> str:
    return f"{100 * count / total:.1f}%" if total else "—"


def _ordered(counters: Sequence[Counter[str]]) -> list[str]:
    """Keys of all ``counters``, the largest total first."""
    totals: Counter[str] = Counter()
    for counter in counters:
        totals.update(counter)
    return [key for key, _ in totals.most_common()]


def summary_table(cells: Sequence[Cell]) -> str:
    rows = []
    for cell in cells:
        s = cell.samples
        mean_ms = 1000 * s.seconds / s.polls if s.polls else float("nan")
        rows.append([
            cell.shape, str(cell.batch), f"{cell.jobs_per_second:,.0f}",
            f"{cell.seconds:.1f}", f"{cell.done:,}/{cell.jobs:,}",
            f"{s.polls:,} ({mean_ms:.0f} ms)",
            f"{s.observations / s.polls:.1f}" if s.polls else "—",
            str(cell.deadlocks), str(cell.deadlock_errors), str(cell.gave_up),
        ])
    return markdown_table(["shape", "batch", "jobs/s", "s", "done", "polls (mean interval)",
                           "worker backends per poll", "deadlocks (pg_stat_database)",
                           "deadlock errors seen by workers", "workers gave up"], rows)


def statements_table(cells: Sequence[Cell]) -> str:
    rows = []
    for cell in cells:
        for stats in cell.statements:
            rows.append([cell.shape, str(cell.batch), stats.kind, f"{stats.calls:,}",
                         f"{stats.total_ms / stats.calls:.2f}" if stats.calls else "—",
                         f"{stats.rows / stats.calls:.1f}" if stats.calls else "—"])
    return markdown_table(["shape", "batch", "statement", "calls", "mean exec ms",
                           "rows per call"], rows)


def share_table(cells: Sequence[Cell], counters: Sequence[Counter[str]], key_header: str,
                totals: Sequence[int]) -> str:
    rows = [[key, *(_share(counter[key], total) for counter, total in
                    zip(counters, totals, strict=True))]
            for key in _ordered(counters)]
    return markdown_table([key_header, *(cell.label for cell in cells)], rows)


def locks_table(cells: Sequence[Cell]) -> str:
    counters = [cell.samples.locks for cell in cells]
    rows = [[key, *(f"{cell.samples.locks[key] / cell.samples.polls:.2f} / "
                    f"{cell.samples.lock_peaks[key]}" if cell.samples.polls else "—"
                    for cell in cells)]
            for key in _ordered(counters)]
    return markdown_table(["lock type (mode)", *(cell.label for cell in cells)], rows)


def report(plan: Plan, summary: str, deadlock_timeout: str, cells: Sequence[Cell]) -> str:
    samples = [cell.samples for cell in cells]
    observations = [s.observations for s in samples]
    lines = [
        f"# Lock waits: {plan.jobs:,} queued jobs drained by {plan.workers} worker processes, "
        "raw SQL",
        "",
        f"Machine: {summary}; synchronous_commit={plan.synchronous_commit}; "
        f"deadlock_timeout={deadlock_timeout}; sampling every {plan.interval * 1000:g} ms",
        "",
        "Shapes: \"one statement\" finishes the batch held and claims the next in one "
        "statement; \"two statements\" sends a finishing statement, then a claiming one. "
        "Each statement is its own transaction.",
        "",
        summary_table(cells),
        "",
        "Statements per kind (pg_stat_statements; mean execution time includes lock waits; "
        "rows per call of a claiming statement = jobs it claimed):",
        "",
        statements_table(cells),
        "",
        "Worker backends by state and wait event (share of all sampled worker-backend "
        "observations; \"no wait event\" = running or waiting for a CPU):",
        "",
        share_table(cells, [s.waits for s in samples], "state: wait event", observations),
        "",
        "Active worker backends by statement and wait event (same denominator):",
        "",
        share_table(cells, [s.statement_waits for s in samples], "statement: wait event",
                    observations),
        "",
        "Lock requests not granted (pg_locks, worker backends): mean per poll / most in "
        "one poll:",
        "",
        locks_table(cells),
        "",
        "How long the not-granted lock requests had waited when sampled (share of them):",
        "",
        share_table(cells, [s.wait_ages for s in samples], "waited so far",
                    [sum(s.wait_ages.values()) for s in samples]),
        "",
        "Backends waiting on a lock: their statement, then the statement and wait event of "
        "the first backend pg_blocking_pids names (share of lock-waiting observations):",
        "",
        share_table(cells, [s.blockers for s in samples], "waiter <- blocker",
                    [sum(s.blockers.values()) for s in samples]),
        "",
        "Backends waiting on a transactionid lock: whose job is the row they wait to update "
        "(from the tuple lock the waiter holds; share of transactionid-waiting observations). "
        "A worker that does not hold a job has only locked it, in a claim that then "
        "did not take it:",
        "",
        share_table(cells, [s.waited_rows for s in samples], "waiter: row waited for",
                    [sum(s.waited_rows.values()) for s in samples]),
    ]
    return "\n".join(lines)


# -- entry point -------------------------------------------------------------------------------


def parse_plan(argv: Sequence[str] | None) -> Plan:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=None,
                        help="jobs per drain (default 20000; 3000 with --quick)")
    parser.add_argument("--workers", type=int, default=16,
                        help="worker processes (default 16)")
    parser.add_argument("--batches", default="10,100",
                        help="comma-separated claim batch sizes (default 10,100)")
    parser.add_argument("--interval-ms", type=float, default=10.0,
                        help="time between two polls of the sampler (default 10)")
    parser.add_argument("--synchronous-commit", choices=("on", "off"), default="on",
                        help="the cluster's synchronous_commit (default on)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few jobs")
    args = parser.parse_args(argv)
    return Plan(
        jobs=args.jobs or (3_000 if args.quick else 20_000),
        workers=args.workers,
        batches=tuple(int(part) for part in args.batches.split(",") if part.strip()),
        interval=args.interval_ms / 1000,
        synchronous_commit=args.synchronous_commit,
    )


def main(argv: Sequence[str] | None = None) -> int:
    plan = parse_plan(argv)
    started = time.monotonic()
    cells = []
    with PostgresServer(settings={"synchronous_commit": plan.synchronous_commit}) as server:
        summary = machine_summary(server.version())
        with psycopg.connect(server.conninfo()) as connection:
            row = connection.execute("SHOW deadlock_timeout").fetchone()
        deadlock_timeout = str(row[0]) if row else "unknown"
        progress("preparing the database")
        server.create_database(DATABASE)
        jobflow_seed.migrate(server.sqlalchemy_url(DATABASE))
        progress(f"draining {plan.jobs:,} jobs per run with {plan.workers} workers")
        for batch in plan.batches:
            for shape, finish in SHAPES:
                cell = drain_once(server, plan, shape, finish, batch)
                cells.append(cell)
                progress(f"  {shape:<15} batch={batch:<3} {cell.jobs_per_second:>8,.0f} jobs/s "
                         f"{cell.samples.polls:>5} polls, {cell.deadlocks} deadlocks")
    print(report(plan, summary, deadlock_timeout, cells))
    print()
    print(f"(total run time {time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
