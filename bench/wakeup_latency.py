"""Wake-up latency and idle cost of one worker: jobflow beside procrastinate and pgqueuer.

1. Enqueue-to-start latency. One idle worker process per contender; the
   producer (this process) makes one job claimable at a time and notes the
   time its call returned: ``complete_upload`` for jobflow (after the upload
   was written), ``defer`` for procrastinate, ``enqueue`` for pgqueuer. The
   handler notes when it starts. Both stamps come from CLOCK_MONOTONIC, which
   is system-wide on Linux, so they compare across processes. jobflow runs
   twice: with LISTEN/NOTIFY (its default on PostgreSQL) and with polling only.
   Between two jobs the producer waits for the worker to go idle again.
2. Idle cost. One idle worker per contender, each on its own database of the
   same cluster, for the same period: statements per second the worker sent
   (top-level statements in ``pg_stat_statements``; all of them, and without
   transaction control ``BEGIN``/``COMMIT``/``ROLLBACK``) and transactions per
   second from ``pg_stat_database``.

Run ``python -m bench.wakeup_latency`` from the repository root (``--quick``
for a smoke run, ``--help`` for the rest).
"""

from __future__ import annotations

import argparse
import multiprocessing
import queue
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import psycopg

from bench import jobflow_seed, tool_jobflow, tool_pgqueuer, tool_procrastinate
from bench.pgserver import PostgresServer
from bench.tables import machine_summary, markdown_table, median, percentile, progress

TARGET_MEDIAN_MS = 3.0
TARGET_P99_MS = 20.0
TARGET_IDLE_QUERIES_PER_SECOND = 0.5
#: How long a started worker may take to run its first job.
FIRST_JOB_TIMEOUT_SECONDS = 60.0
#: How long a handler may take to start once its job is claimable.
START_TIMEOUT_SECONDS = 30.0
WARMUP_JOBS = 3
#: Idle workers run this long before counting starts: their start-up statements
#: are not idling, and PostgreSQL 15 backends flush their transaction counters
#: to pg_stat_database only after up to 10 s of being idle.
IDLE_SETTLE_SECONDS = 12.0

StartedQueue = multiprocessing.Queue  # of (seq, CLOCK_MONOTONIC ns) pairs
#: A worker process body: run until terminated, report each handler start.
WorkerBody = Callable[[dict[str, Any], StartedQueue], None]


class Producer(Protocol):
    def enqueue(self, seq: int) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Plan:
    notify_samples: int
    poll_samples: int
    poll_interval: float
    idle_seconds: float
    gap_seconds: float


@dataclass(frozen=True)
class Contender:
    """A worker process body and a way to make a job claimable."""

    label: str
    database: str
    run_worker: WorkerBody
    producer: Callable[[PostgresServer, str, Path], Producer]
    samples: Callable[[Plan], int]
    settings: dict[str, Any]


def _jobflow_producer(server: PostgresServer, database: str, objects_root: Path) -> Producer:
    return tool_jobflow.Producer(server.sqlalchemy_url(database), objects_root)


def _procrastinate_producer(server: PostgresServer, database: str, _: Path) -> Producer:
    return tool_procrastinate.Producer(server.conninfo(database))


def _pgqueuer_producer(server: PostgresServer, database: str, _: Path) -> Producer:
    return tool_pgqueuer.Producer(server.conninfo(database))


def contenders(plan: Plan) -> list[Contender]:
    return [
        Contender("jobflow, LISTEN/NOTIFY", "wake_jobflow", tool_jobflow.run_worker,
                  _jobflow_producer, lambda p: p.notify_samples, {"mode": "notify"}),
        Contender(f"jobflow, polling every {plan.poll_interval:g} s", "wake_jobflow",
                  tool_jobflow.run_worker, _jobflow_producer, lambda p: p.poll_samples,
                  {"mode": "poll", "poll_interval": plan.poll_interval}),
        Contender("procrastinate (LISTEN/NOTIFY)", "wake_procrastinate",
                  tool_procrastinate.run_worker, _procrastinate_producer,
                  lambda p: p.notify_samples, {}),
        Contender("pgqueuer (LISTEN/NOTIFY)", "wake_pgqueuer", tool_pgqueuer.run_worker,
                  _pgqueuer_producer, lambda p: p.notify_samples, {}),
    ]


def _settings(server: PostgresServer, database: str, extra: dict[str, Any],
              objects_root: Path) -> dict[str, Any]:
    return {**extra, "conninfo": server.conninfo(database),
            "dsn": server.dsn(database), "sqlalchemy_url": server.sqlalchemy_url(database),
            "objects_root": str(objects_root)}


def _start_worker(run_worker: WorkerBody, settings: dict[str, Any]
                  ) -> tuple[multiprocessing.process.BaseProcess, StartedQueue]:
    # fork before this process opens any connection of its own
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    started: StartedQueue = context.Queue()
    process = context.Process(target=run_worker, args=(settings, started),
                              daemon=True)
    process.start()
    return process, started


def _stop_worker(process: multiprocessing.process.BaseProcess) -> None:
    process.terminate()
    process.join(timeout=10)
    if process.is_alive():
        process.kill()
        process.join()


def _wait_for_start(started: StartedQueue, seq: int, timeout: float) -> int:
    """The CLOCK_MONOTONIC ns at which the handler for ``seq`` started."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RuntimeError(f"the handler of job {seq} did not start within {timeout:.0f} s")
        try:
            got, at = started.get(timeout=remaining)
        except queue.Empty:
            continue
        if got == seq:
            return int(at)


def measure_latency(server: PostgresServer, contender: Contender, plan: Plan,
                    objects_root: Path) -> list[float]:
    """Milliseconds from the producer's call returning to the handler starting."""
    process, started = _start_worker(contender.run_worker, _settings(
        server, contender.database, contender.settings, objects_root))
    producer = contender.producer(server, contender.database, objects_root)
    seq = 0
    try:
        for warmup in range(WARMUP_JOBS):
            seq += 1
            producer.enqueue(seq)
            _wait_for_start(started, seq,
                            FIRST_JOB_TIMEOUT_SECONDS if warmup == 0 else START_TIMEOUT_SECONDS)
            time.sleep(plan.gap_seconds)
        latencies: list[float] = []
        for _ in range(contender.samples(plan)):
            seq += 1
            producer.enqueue(seq)
            returned = time.monotonic_ns()
            began = _wait_for_start(started, seq, START_TIMEOUT_SECONDS)
            latencies.append((began - returned) / 1e6)
            time.sleep(plan.gap_seconds)  # let the worker finish and go idle again
        return latencies
    finally:
        producer.close()
        _stop_worker(process)


# -- idle cost ------------------------------------------------------------------------------

_TRANSACTION_CONTROL = ("BEGIN", "COMMIT", "ROLLBACK", "START TRANSACTION")


@dataclass(frozen=True)
class IdleCounters:
    statements: int
    queries: int  # statements other than transaction control
    transactions: int
    by_query: dict[str, int]


def idle_counters(server: PostgresServer, database: str) -> IdleCounters:
    with psycopg.connect(server.conninfo()) as connection:
        connection.execute("SELECT pg_stat_clear_snapshot()")
        rows = connection.execute(
            "SELECT query, calls FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid "
            "WHERE d.datname = %s AND s.toplevel", (database,)).fetchall()
        xact = connection.execute(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s",
            (database,)).fetchone()
    by_query: dict[str, int] = {}
    for text, calls in rows:
        key = " ".join(str(text).split())[:110]
        by_query[key] = by_query.get(key, 0) + int(calls)
    statements = sum(by_query.values())
    control = sum(calls for text, calls in by_query.items()
                  if text.upper().startswith(_TRANSACTION_CONTROL))
    return IdleCounters(statements, statements - control, int(xact[0]) if xact else 0, by_query)


@dataclass(frozen=True)
class IdleCost:
    label: str
    seconds: float
    statements: int
    queries: int
    transactions: int
    top: list[tuple[str, int]]


@dataclass(frozen=True)
class IdleWorker:
    label: str
    database: str
    run_worker: WorkerBody
    empty_tables: Callable[[str], None]
    settings: dict[str, Any]


IDLE_WORKERS: tuple[IdleWorker, ...] = (
    IdleWorker("jobflow (LISTEN/NOTIFY, defaults)", "wake_jobflow", tool_jobflow.run_worker,
               jobflow_seed.reset, {"mode": "notify"}),
    IdleWorker("procrastinate (defaults)", "wake_procrastinate", tool_procrastinate.run_worker,
               tool_procrastinate.reset, {}),
    IdleWorker("pgqueuer (defaults)", "wake_pgqueuer", tool_pgqueuer.run_worker,
               tool_pgqueuer.reset, {}),
)


def measure_idle(server: PostgresServer, plan: Plan, objects_root: Path) -> list[IdleCost]:
    """Start one idle worker per contender at once; count what they send while idle."""
    running = []
    for idle in IDLE_WORKERS:
        # A job left over from the latency runs (a worker stopped mid-job) would be
        # picked up again while "idle"; start from empty queues.
        idle.empty_tables(server.conninfo(idle.database))
    for idle in IDLE_WORKERS:
        process, _ = _start_worker(idle.run_worker, _settings(
            server, idle.database, idle.settings, objects_root))
        running.append((idle.label, idle.database, process))
    try:
        time.sleep(IDLE_SETTLE_SECONDS)
        before = {database: idle_counters(server, database) for _, database, _ in running}
        started = time.monotonic()
        time.sleep(plan.idle_seconds)
        seconds = time.monotonic() - started
        after = {database: idle_counters(server, database) for _, database, _ in running}
    finally:
        for _, _, process in running:
            _stop_worker(process)
    costs = []
    for label, database, _ in running:
        first, last = before[database], after[database]
        deltas = {text: calls - first.by_query.get(text, 0)
                  for text, calls in last.by_query.items()}
        top = sorted(((t, c) for t, c in deltas.items() if c > 0), key=lambda item: -item[1])
        costs.append(IdleCost(label, seconds, last.statements - first.statements,
                              last.queries - first.queries,
                              last.transactions - first.transactions, top[:8]))
    return costs


# -- report ---------------------------------------------------------------------------------


def latency_table(results: dict[str, list[float]]) -> str:
    rows = [[label, str(len(values)), f"{median(values):.2f}", f"{percentile(values, 0.99):.2f}",
             f"{min(values):.2f}", f"{max(values):.2f}"]
            for label, values in results.items()]
    return markdown_table(["worker", "jobs", "median ms", "p99 ms", "min ms", "max ms"], rows)


def idle_table(costs: list[IdleCost]) -> str:
    rows = [[cost.label, f"{cost.seconds:.0f}", f"{cost.statements / cost.seconds:.3f}",
             f"{cost.queries / cost.seconds:.3f}", f"{cost.transactions / cost.seconds:.3f}"]
            for cost in costs]
    return markdown_table(["idle worker", "seconds", "statements/s", "queries/s (no BEGIN/COMMIT)",
                           "transactions/s"], rows)


def verdicts(results: dict[str, list[float]], costs: list[IdleCost]) -> list[str]:
    notify = results.get("jobflow, LISTEN/NOTIFY", [])
    jobflow_idle = next((c for c in costs if c.label.startswith("jobflow")), None)
    lines = []
    if notify:
        middle, tail = median(notify), percentile(notify, 0.99)
        lines.append(f"- jobflow NOTIFY median {middle:.2f} ms (target <= {TARGET_MEDIAN_MS:g}): "
                     f"{'MET' if middle <= TARGET_MEDIAN_MS else 'NOT MET'}")
        lines.append(f"- jobflow NOTIFY p99 {tail:.2f} ms (target <= {TARGET_P99_MS:g}): "
                     f"{'MET' if tail <= TARGET_P99_MS else 'NOT MET'}")
    if jobflow_idle is not None:
        per_second = jobflow_idle.queries / jobflow_idle.seconds
        lines.append(f"- jobflow idle worker {per_second:.3f} queries/s "
                     f"(target <= {TARGET_IDLE_QUERIES_PER_SECOND:g}): "
                     f"{'MET' if per_second <= TARGET_IDLE_QUERIES_PER_SECOND else 'NOT MET'}")
    return lines


def parse_plan(argv: Sequence[str] | None) -> Plan:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--samples", type=int, default=None,
                        help="jobs per NOTIFY-driven contender (default 300; 30 with --quick)")
    parser.add_argument("--poll-samples", type=int, default=None,
                        help="jobs for jobflow's polling-only run (default 20; 5 with --quick)")
    parser.add_argument("--poll-interval", type=float, default=1.0,
                        help="jobflow's poll interval in the polling-only run (default 1 s)")
    parser.add_argument("--idle-seconds", type=float, default=None,
                        help="how long the idle workers are watched (default 60; 12 with --quick)")
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    args = parser.parse_args(argv)
    return Plan(
        notify_samples=args.samples or (30 if args.quick else 300),
        poll_samples=args.poll_samples or (5 if args.quick else 20),
        poll_interval=args.poll_interval,
        idle_seconds=args.idle_seconds or (12.0 if args.quick else 60.0),
        gap_seconds=0.05,
    )


def main(argv: Sequence[str] | None = None) -> int:
    plan = parse_plan(argv)
    started = time.monotonic()
    with PostgresServer() as server, tempfile.TemporaryDirectory(
            prefix="jobflow-bench-objects-") as objects_folder:
        objects_root = Path(objects_folder)
        summary = machine_summary(server.version())
        progress("preparing databases")
        server.prepare(jobflow="wake_jobflow", pgqueuer="wake_pgqueuer",
                       procrastinate="wake_procrastinate")
        results: dict[str, list[float]] = {}
        for contender in contenders(plan):
            progress(f"  latency: {contender.label}")
            results[contender.label] = measure_latency(server, contender, plan, objects_root)
        progress(f"  idle cost: {plan.idle_seconds:g} s")
        costs = measure_idle(server, plan, objects_root)
    print("# Wake-up latency: from the enqueueing call returning to the handler starting")
    print()
    print(f"Machine: {summary}")
    print()
    print(latency_table(results))
    print()
    print("# Idle cost of one worker")
    print()
    print(idle_table(costs))
    print()
    for cost in costs:
        print(f"{cost.label}, statements while idle:")
        for text, calls in cost.top:
            print(f"    {calls:>5}  {text}")
    print()
    print("Targets:")
    print("\n".join(verdicts(results, costs)))
    print()
    print(f"(total run time {time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
