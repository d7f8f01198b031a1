"""Worker throughput on one PostgreSQL: jobflow's Worker beside procrastinate and pgqueuer.

What users run: ``jobflow worker`` is ``Worker(flow, handler, concurrency=C).run()``.
Each contender's worker drains the same number of queued jobs to its "done"
state with 1 and N worker processes at concurrency 1, 8 and 32: jobflow's
``Worker`` (``run(until_idle=True)``), procrastinate's worker at the same
concurrency, pgqueuer's ``QueueManager`` with ``batch_size`` = concurrency,
and, at concurrency 8 and 32, the store's own claim/finish loop at that batch
size (``JobFlow.claim`` then ``JobFlow.finish_many``: the most a worker can
get from the store through the public API). Then one cell where each job
sleeps 5 ms (an I/O-bound job) at concurrency 32, one where the real
``jobflow worker --burst`` command drains the queue as a subprocess, and how
many statements the Worker sends per finished job (``pg_stat_statements``).

The same throw-away PostgreSQL cluster as the claim benchmark, one database
per contender, contenders interleaved cell by cell so that a change in the
machine's load hits them alike; before every drain the contender's tables are
emptied, seeded in bulk and vacuumed, and the clock covers only the drain.

Run ``python -m bench.worker_throughput`` from the repository root
(``--quick`` for a smoke run, ``--help`` for the rest).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from bench import jobflow_seed, tool_jobflow
from bench.drain import DRAIN_TIMEOUT_SECONDS, DrainBody, run_drain
from bench.pgserver import PostgresServer
from bench.tables import machine_summary, markdown_table, progress, rate, ratio

JOBFLOW = "jobflow Worker"
LOOP = "jobflow claim/finish loop"
PGQUEUER = "pgqueuer"
PGQUEUER_CAPPED = "pgqueuer, <= C in flight"
PROCRASTINATE = "procrastinate"

#: How long the I/O-bound job sleeps, and at which concurrency that cell runs.
SLEEP_SECONDS = 0.005
SLEEP_CONCURRENCY = 32
#: The concurrency of the ``jobflow worker`` subprocess and of the statement count.
CLI_CONCURRENCY = 8
STATEMENTS_CONCURRENCY = 8
#: The store loop runs at these batch sizes only.
LOOP_BATCHES = frozenset({8, 32})
#: Seconds pgqueuer waits for a notification when a dequeue found nothing (it
#: also polls every 0.1 s while work is eligible): bounds its wait once the
#: queue is empty and its last tasks run.
PGQUEUER_DEQUEUE_TIMEOUT = 0.1

#: Targets: jobflow's Worker against a contender, least ratio, at these concurrencies.
TARGETS: tuple[tuple[str, float, frozenset[int]], ...] = (
    (PGQUEUER, 1.0, frozenset({8, 32})),
    (PGQUEUER_CAPPED, 1.0, frozenset({8, 32})),
    (PROCRASTINATE, 5.0, frozenset({8, 32})),
    (LOOP, 0.7, LOOP_BATCHES),
)
#: With the 5 ms handler at concurrency 32: the least fraction of concurrency / 5 ms.
TARGET_SLEEP_FRACTION = 0.6
#: The most statements the Worker may send per finished job (concurrency 8, one process).
TARGET_STATEMENTS_PER_JOB = 0.3

REPOSITORY = Path(__file__).resolve().parent.parent


# -- the handlers ------------------------------------------------------------------------


def noop(job: Any, ctx: Any) -> None:
    """A job that does nothing (also the ``jobflow worker --handler`` of the CLI cell)."""
    return None


def sleep_5ms(job: Any, ctx: Any) -> None:
    """An I/O-bound job: it waits 5 ms. jobflow runs handlers in threads, so it sleeps;
    the peers' jobs are coroutines and ``await asyncio.sleep`` as long."""
    time.sleep(SLEEP_SECONDS)


# -- plan, cells, contenders -------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    jobs: int
    processes: tuple[int, ...]
    concurrencies: tuple[int, ...]
    synchronous_commit: str


@dataclass(frozen=True)
class Cell:
    """Worker processes, jobs in flight per process, and how long each job sleeps."""

    processes: int
    concurrency: int
    sleep: float = 0.0

    @property
    def label(self) -> str:
        sleeping = f" sleep={self.sleep * 1000:g}ms" if self.sleep else ""
        return f"processes={self.processes} c={self.concurrency:<2}{sleeping}"


@dataclass(frozen=True)
class Contender:
    """One worker implementation and how to seed, drain and count it."""

    name: str
    database: str
    drain: DrainBody
    reset: Callable[[str], None]
    seed: Callable[[str, int], None]
    finished: Callable[[str], int]
    tables: str  # a LIKE pattern: statements that touch its tables
    settings: Callable[[Cell], dict[str, Any]]
    runs: Callable[[Cell], bool] = lambda cell: True


def contenders() -> tuple[Contender, ...]:
    # The peers are imported here, not at the top: ``jobflow worker`` imports
    # this module for its handler, and should not pay for them.
    from bench import tool_pgqueuer, tool_procrastinate

    def pgqueuer(capped: bool) -> Callable[[Cell], dict[str, Any]]:
        def settings(cell: Cell) -> dict[str, Any]:
            extra = {"in_flight": cell.processes * cell.concurrency} if capped else {}
            return {"batch": cell.concurrency, "sleep": cell.sleep,
                    "dequeue_timeout": PGQUEUER_DEQUEUE_TIMEOUT, **extra}
        return settings

    return (
        Contender(JOBFLOW, "bench_jobflow", tool_jobflow.run_worker_drain, jobflow_seed.reset,
                  jobflow_seed.seed_and_vacuum, jobflow_seed.count_done, "%jobflow\\_job%",
                  lambda cell: {"concurrency": cell.concurrency,
                                "handler": sleep_5ms if cell.sleep else noop}),
        Contender(LOOP, "bench_jobflow", tool_jobflow.drain, jobflow_seed.reset,
                  jobflow_seed.seed_and_vacuum, jobflow_seed.count_done, "%jobflow\\_job%",
                  lambda cell: {"batch": cell.concurrency},
                  runs=lambda cell: not cell.sleep and cell.concurrency in LOOP_BATCHES),
        # Without a cap pgqueuer keeps dequeuing while its jobs sleep: no
        # concurrency to compare, so it sits out the sleeping cell.
        Contender(PGQUEUER, "bench_pgqueuer", tool_pgqueuer.drain, tool_pgqueuer.reset,
                  tool_pgqueuer.seed, tool_pgqueuer.finished, "%pgqueuer%", pgqueuer(False),
                  runs=lambda cell: not cell.sleep),
        Contender(PGQUEUER_CAPPED, "bench_pgqueuer", tool_pgqueuer.drain, tool_pgqueuer.reset,
                  tool_pgqueuer.seed, tool_pgqueuer.finished, "%pgqueuer%", pgqueuer(True)),
        Contender(PROCRASTINATE, "bench_procrastinate", tool_procrastinate.drain,
                  tool_procrastinate.reset, tool_procrastinate.seed,
                  tool_procrastinate.finished, "%procrastinate\\_%",
                  lambda cell: {"concurrency": cell.concurrency, "sleep": cell.sleep}),
    )


# -- one drain ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Drained:
    """One drain's figures."""

    jobs_per_second: float
    touching_per_job: float  # top-level statements that touch the contender's tables
    statements_per_job: float  # every top-level statement, BEGIN and COMMIT included


def _statements(server: PostgresServer, database: str, tables: str) -> tuple[int, int]:
    """Top-level statements run on ``database`` since the last reset: those whose
    text matches ``tables``, and all of them."""
    with psycopg.connect(server.conninfo()) as connection:
        row = connection.execute(
            "SELECT coalesce(sum(calls) FILTER (WHERE s.query LIKE %s), 0), "
            "coalesce(sum(calls), 0) FROM pg_stat_statements s "
            "JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = %s AND s.toplevel",
            (tables, database)).fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


def _seeded(server: PostgresServer, contender: Contender, jobs: int) -> str:
    conninfo = server.conninfo(contender.database)
    contender.reset(conninfo)
    contender.seed(conninfo, jobs)
    return conninfo


def _check_finished(contender: Contender, conninfo: str, jobs: int) -> None:
    done = contender.finished(conninfo)
    if done != jobs:
        raise RuntimeError(f"{contender.name}: {done} of {jobs} jobs finished")


def drain_once(server: PostgresServer, contender: Contender, cell: Cell, jobs: int) -> Drained:
    """Seed ``jobs`` jobs, drain them with ``cell.processes`` workers, check they all finished."""
    conninfo = _seeded(server, contender, jobs)
    settings = {**contender.settings(cell), "conninfo": conninfo,
                "dsn": server.dsn(contender.database),
                "sqlalchemy_url": server.sqlalchemy_url(contender.database)}
    server.reset_statements()
    result = run_drain(contender.drain, settings, workers=cell.processes, expected_jobs=jobs)
    touching, statements = _statements(server, contender.database, contender.tables)
    _check_finished(contender, conninfo, jobs)
    return Drained(result.jobs_per_second, touching / jobs, statements / jobs)


Measured = dict[tuple[str, Cell], Drained]


def measure(server: PostgresServer, plan: Plan, cells: Sequence[Cell],
            measured: Measured) -> None:
    for cell in cells:
        for contender in contenders():
            if not contender.runs(cell):
                continue
            drained = drain_once(server, contender, cell, plan.jobs)
            measured[(contender.name, cell)] = drained
            progress(f"  {contender.name:<26} {cell.label:<32} "
                     f"{drained.jobs_per_second:>9,.0f} jobs/s "
                     f"{drained.touching_per_job:6.3f} statements/job")


def matrix(plan: Plan) -> list[Cell]:
    return [Cell(processes, concurrency) for processes in plan.processes
            for concurrency in plan.concurrencies]


SLEEP_CELL = Cell(1, SLEEP_CONCURRENCY, SLEEP_SECONDS)
STATEMENTS_CELL = Cell(1, STATEMENTS_CONCURRENCY)


# -- the jobflow worker command ----------------------------------------------------------


@dataclass(frozen=True)
class CommandRun:
    """``jobflow worker --burst`` as a subprocess, from its start to its exit."""

    jobs: int
    seconds: float  # with ``jobs`` queued
    empty_seconds: float  # with an empty queue: start-up, one look, exit

    @property
    def jobs_per_second(self) -> float:
        return self.jobs / self.seconds if self.seconds > 0 else float("inf")


def worker_command() -> list[str]:
    return [sys.executable, "-m", "jobflow", "worker", "--handler",
            "bench.worker_throughput:noop", "--concurrency", str(CLI_CONCURRENCY), "--burst"]


def _run_command(server: PostgresServer, objects_dir: str) -> float:
    """Run the worker command to its exit; how long it took, in seconds."""
    environment = {**os.environ, "JOBFLOW_DATABASE_URL": server.dsn("bench_jobflow"),
                   "JOBFLOW_OBJECTS_DIR": objects_dir, "JOBFLOW_LOG_LEVEL": "warning"}
    started = time.monotonic()
    finished = subprocess.run(worker_command(), cwd=REPOSITORY, env=environment,
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              timeout=DRAIN_TIMEOUT_SECONDS, check=False)
    seconds = time.monotonic() - started
    if finished.returncode != 0:
        raise RuntimeError(f"jobflow worker exited with {finished.returncode}:\n"
                           f"{finished.stdout}")
    return seconds


def command_run(server: PostgresServer, plan: Plan) -> CommandRun:
    jobflow = contenders()[0]
    with tempfile.TemporaryDirectory(prefix="jobflow-bench-objects-") as objects_dir:
        _seeded(server, jobflow, 0)
        empty_seconds = _run_command(server, objects_dir)
        conninfo = _seeded(server, jobflow, plan.jobs)
        seconds = _run_command(server, objects_dir)
    _check_finished(jobflow, conninfo, plan.jobs)
    result = CommandRun(plan.jobs, seconds, empty_seconds)
    progress(f"  jobflow worker --burst (subprocess) c={CLI_CONCURRENCY:<2}"
             f"{' ' * 21}{result.jobs_per_second:>9,.0f} jobs/s "
             f"(empty queue: {empty_seconds:.2f} s from start to exit)")
    return result


# -- report ------------------------------------------------------------------------------


def _rate(measured: Measured, name: str, cell: Cell) -> float | None:
    drained = measured.get((name, cell))
    return None if drained is None else drained.jobs_per_second


def throughput_table(plan: Plan, measured: Measured) -> str:
    names = [contender.name for contender in contenders()]
    headers = ["processes", "concurrency", *names,
               *(f"Worker / {peer}" for peer, _, _ in TARGETS)]
    rows = []
    for cell in matrix(plan):
        ours = _rate(measured, JOBFLOW, cell)
        rows.append([str(cell.processes), str(cell.concurrency),
                     *(rate(_rate(measured, name, cell)) for name in names),
                     *(ratio(ours, _rate(measured, peer, cell)) for peer, _, _ in TARGETS)])
    return markdown_table(headers, rows)


def sleep_table(measured: Measured) -> str:
    ideal = SLEEP_CELL.concurrency / SLEEP_SECONDS
    rows = []
    for contender in contenders():
        value = _rate(measured, contender.name, SLEEP_CELL)
        if value is None:
            continue
        rows.append([contender.name, rate(value), rate(ideal), f"{value / ideal:.0%}"])
    return markdown_table(["contender", "jobs/s", "ideal jobs/s", "fraction of ideal"], rows)


def command_table(run: CommandRun, measured: Measured) -> str:
    in_process = _rate(measured, JOBFLOW, Cell(1, CLI_CONCURRENCY))
    rows = [
        [f"`jobflow worker --concurrency {CLI_CONCURRENCY} --burst`, a subprocess "
         "(time includes process start, imports, connecting and the schema check)",
         f"{run.jobs:,}", f"{run.seconds:.2f}", rate(run.jobs_per_second)],
        ["the same command with an empty queue (start-up and exit only)", "0",
         f"{run.empty_seconds:.2f}", "—"],
        [f"`Worker(concurrency={CLI_CONCURRENCY}).run(until_idle=True)` in a started "
         "process (the matrix above)", f"{run.jobs:,}",
         f"{run.jobs / in_process:.2f}" if in_process else "—", rate(in_process)],
    ]
    return markdown_table(["1 worker process", "jobs", "seconds", "jobs/s"], rows)


def statements_table(plan: Plan, measured: Measured) -> str:
    """Statements per finished job with one process: touching the tables / all."""
    names = [contender.name for contender in contenders()]
    rows = []
    for concurrency in plan.concurrencies:
        cell = Cell(1, concurrency)
        row = [str(concurrency)]
        for name in names:
            drained = measured.get((name, cell))
            row.append("—" if drained is None else
                       f"{drained.touching_per_job:.3f} / {drained.statements_per_job:.3f}")
        rows.append(row)
    return markdown_table(["concurrency", *names], rows)


def _verdict(met: bool) -> str:
    return "MET" if met else "NOT MET"


def verdicts(plan: Plan, measured: Measured) -> list[str]:
    lines = []
    for peer, target, concurrencies in TARGETS:
        met, missed = [], []
        for cell in matrix(plan):
            ours, theirs = _rate(measured, JOBFLOW, cell), _rate(measured, peer, cell)
            if cell.concurrency not in concurrencies or ours is None or not theirs:
                continue
            entry = f"{cell.processes}p/c{cell.concurrency} {ours / theirs:.2f}x"
            (met if ours >= target * theirs else missed).append(entry)
        if not met and not missed:
            continue
        status = "MET" if not missed else ("NOT MET" if not met else "PARTLY MET")
        lines.append(f"- {JOBFLOW} >= {target:g}x {peer} at concurrency "
                     f"{', '.join(str(c) for c in sorted(concurrencies))}: {status} "
                     f"({len(met)}/{len(met) + len(missed)} cells: "
                     f"{', '.join(met + missed)})")
    sleeping = _rate(measured, JOBFLOW, SLEEP_CELL)
    if sleeping is not None:
        ideal = SLEEP_CELL.concurrency / SLEEP_SECONDS
        lines.append(f"- {JOBFLOW}, 5 ms handler at c={SLEEP_CELL.concurrency} >= "
                     f"{TARGET_SLEEP_FRACTION:.0%} of {ideal:,.0f} jobs/s: "
                     f"{_verdict(sleeping >= TARGET_SLEEP_FRACTION * ideal)} "
                     f"({sleeping:,.0f} jobs/s, {sleeping / ideal:.0%})")
    counted = measured.get((JOBFLOW, STATEMENTS_CELL))
    if counted is not None:
        lines.append(f"- {JOBFLOW} at c={STATEMENTS_CELL.concurrency}, one process: < "
                     f"{TARGET_STATEMENTS_PER_JOB:g} statements per finished job: "
                     f"{_verdict(counted.touching_per_job < TARGET_STATEMENTS_PER_JOB)} "
                     f"({counted.touching_per_job:.3f} touching jobflow's tables; "
                     f"{counted.statements_per_job:.3f} with BEGIN, COMMIT and the rest)")
    return lines


# -- entry point -------------------------------------------------------------------------


def parse_plan(argv: Sequence[str] | None) -> Plan:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=None,
                        help="jobs per drain (default 20000; 300 with --quick)")
    parser.add_argument("--processes", type=int, default=4,
                        help="the larger number of worker processes, besides 1 (default 4)")
    parser.add_argument("--concurrencies", default="1,8,32",
                        help="comma-separated concurrencies (default 1,8,32)")
    parser.add_argument("--synchronous-commit", choices=("on", "off"), default="on",
                        help="the cluster's synchronous_commit (default on: every commit "
                             "waits for its WAL flush, as in production)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few jobs per drain")
    args = parser.parse_args(argv)
    if args.processes < 1:
        parser.error("--processes must be at least 1")
    concurrencies = tuple(int(part) for part in args.concurrencies.split(",") if part.strip())
    return Plan(
        jobs=args.jobs or (300 if args.quick else 20_000),
        processes=(1,) if args.processes == 1 else (1, args.processes),
        concurrencies=concurrencies,
        synchronous_commit=args.synchronous_commit,
    )


def main(argv: Sequence[str] | None = None) -> int:
    plan = parse_plan(argv)
    started = time.monotonic()
    measured: Measured = {}
    with PostgresServer(settings={"synchronous_commit": plan.synchronous_commit}) as server:
        summary = machine_summary(server.version())
        summary += f"; synchronous_commit={plan.synchronous_commit}"
        progress("preparing databases")
        server.prepare(jobflow="bench_jobflow", pgqueuer="bench_pgqueuer",
                       procrastinate="bench_procrastinate")
        progress(f"draining {plan.jobs:,} jobs per run")
        measure(server, plan, matrix(plan), measured)
        progress(f"handler sleeping {SLEEP_SECONDS * 1000:g} ms")
        measure(server, plan, [SLEEP_CELL], measured)
        progress("the jobflow worker command")
        command = command_run(server, plan)
    print(f"# Worker throughput: {plan.jobs:,} queued jobs drained to done (jobs/s)")
    print()
    print(f"Machine: {summary}")
    print()
    print("No-op jobs. Concurrency C: jobflow's `Worker(concurrency=C)`, procrastinate's "
          "worker with `concurrency=C`, pgqueuer's `QueueManager` with `batch_size=C` (and, "
          "capped, its entrypoint's `concurrency_limit` = processes x C), the store loop "
          "with batches of C. Per process, except pgqueuer's cap, which counts all of them.")
    print()
    print(throughput_table(plan, measured))
    print()
    print(f"Each job sleeps {SLEEP_SECONDS * 1000:g} ms (jobflow: `time.sleep` in its "
          "handler thread; the peers: `await asyncio.sleep`), concurrency "
          f"{SLEEP_CELL.concurrency}, one process; ideal = concurrency / "
          f"{SLEEP_SECONDS * 1000:g} ms. ({PGQUEUER} without a cap sits this one out: it "
          "keeps dequeuing while its jobs sleep, so it runs at no fixed concurrency.)")
    print()
    print(sleep_table(measured))
    print()
    print("The `jobflow worker` command (`python -m jobflow worker --handler "
          f"bench.worker_throughput:noop --concurrency {CLI_CONCURRENCY} --burst`, "
          "INFO lines off), timed from its start to its exit:")
    print()
    print(command_table(command, measured))
    print()
    print("Top-level statements per finished job, one process (pg_stat_statements): "
          "those touching the contender's tables / all, BEGIN and COMMIT included:")
    print()
    print(statements_table(plan, measured))
    print()
    print("Targets:")
    print("\n".join(verdicts(plan, measured)))
    print()
    print(f"(total run time {time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
