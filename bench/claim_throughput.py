"""Claim throughput on one PostgreSQL: jobflow beside procrastinate, pgqueuer and raw SQL.

Every contender drains the same number of queued no-op jobs to its "done"
state with 1, 4 and 8 worker processes, at claim batch sizes 1, 10 and 100
where it supports batching, on the same throw-away PostgreSQL cluster, one
database each, contenders interleaved cell by cell so that a change in the
machine's load hits them alike. Before every drain the contender's tables are
emptied, seeded in bulk and vacuumed; the clock covers only the drain.

A second figure: how long ``JobFlow.claim(limit=1)`` takes with 1,000 versus
1,000,000 finished jobs in the table (claims alternate between the two
databases), and the query plan of jobflow's own claim statement.

Run ``python -m bench.claim_throughput`` from the repository root (``--quick``
for a smoke run of a few seconds' worth of jobs, ``--help`` for the rest).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg

from bench import jobflow_seed, raw_sql, tool_jobflow, tool_pgqueuer, tool_procrastinate
from bench.drain import DrainBody, run_drain
from bench.pgserver import PostgresServer
from bench.tables import (
    machine_summary,
    markdown_table,
    median,
    percentile,
    progress,
    rate,
    ratio,
)
from jobflow.models import Succeeded

JOBFLOW = "jobflow"
WORKER = "jobflow Worker"
RAW = "raw SQL"
RAW_APART = "raw SQL, two statements"
PGQUEUER = "pgqueuer"
PROCRASTINATE = "procrastinate"

#: The partial index jobflow's claim must use.
CLAIM_INDEX = "ix_jobflow_jobs_queued_run_at"
#: The claim latency target: 1,000,000 finished jobs against 1,000, median ratio.
TARGET_LATENCY_RATIO = 1.2


@dataclass(frozen=True)
class Plan:
    jobs: int
    workers: tuple[int, ...]
    batches: tuple[int, ...]
    latency_samples: int
    small_finished: int
    large_finished: int
    cost_jobs: int
    synchronous_commit: str


@dataclass(frozen=True)
class Contender:
    """One queue implementation and how to seed, drain and count it."""

    name: str
    database: str
    drain: DrainBody
    reset: Callable[[str], None]
    seed: Callable[[str, int], None]
    finished: Callable[[str], int]
    batches: frozenset[int] | None = None  # None: every batch size
    settings: dict[str, Any] = field(default_factory=dict)

    def supports(self, batch: int) -> bool:
        return self.batches is None or batch in self.batches


CONTENDERS: tuple[Contender, ...] = (
    Contender(JOBFLOW, "bench_jobflow", tool_jobflow.drain, jobflow_seed.reset,
              jobflow_seed.seed_and_vacuum, jobflow_seed.count_done),
    Contender(WORKER, "bench_jobflow", tool_jobflow.worker_drain, jobflow_seed.reset,
              jobflow_seed.seed_and_vacuum, jobflow_seed.count_done),
    Contender(RAW, "bench_jobflow", raw_sql.drain, jobflow_seed.reset,
              jobflow_seed.seed_and_vacuum, jobflow_seed.count_done,
              settings={"finish": "with the next claim"}),
    Contender(RAW_APART, "bench_jobflow", raw_sql.drain, jobflow_seed.reset,
              jobflow_seed.seed_and_vacuum, jobflow_seed.count_done,
              settings={"finish": "separately"}),
    Contender(PGQUEUER, "bench_pgqueuer", tool_pgqueuer.drain, tool_pgqueuer.reset,
              tool_pgqueuer.seed, tool_pgqueuer.finished),
    Contender(PROCRASTINATE, "bench_procrastinate", tool_procrastinate.drain,
              tool_procrastinate.reset, tool_procrastinate.seed, tool_procrastinate.finished,
              batches=frozenset({1})),
)


@dataclass(frozen=True)
class Drained:
    """One drain's figures."""

    jobs_per_second: float
    statements_per_job: float  # top-level statements the workers sent, per finished job


def _statements(server: PostgresServer, database: str) -> int:
    """Top-level statements run on ``database`` since the last reset of pg_stat_statements."""
    with psycopg.connect(server.conninfo()) as connection:
        row = connection.execute(
            "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements s "
            "JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = %s AND s.toplevel",
            (database,)).fetchone()
    return int(row[0]) if row else 0


def drain_once(server: PostgresServer, contender: Contender, *, jobs: int, workers: int,
               batch: int) -> Drained:
    """Seed ``jobs`` jobs, drain them, check they all finished."""
    conninfo = server.conninfo(contender.database)
    contender.reset(conninfo)
    contender.seed(conninfo, jobs)
    settings = {**contender.settings, "batch": batch, "conninfo": conninfo,
                "dsn": server.dsn(contender.database),
                "sqlalchemy_url": server.sqlalchemy_url(contender.database)}
    server.reset_statements()
    result = run_drain(contender.drain, settings, workers=workers, expected_jobs=jobs)
    statements = _statements(server, contender.database)
    done = contender.finished(conninfo)
    if done != jobs:
        raise RuntimeError(f"{contender.name}: {done} of {jobs} jobs finished")
    return Drained(result.jobs_per_second, statements / jobs)


Measured = dict[tuple[str, int, int], Drained]


def throughput(server: PostgresServer, plan: Plan) -> Measured:
    measured: Measured = {}
    for workers in plan.workers:
        for batch in plan.batches:
            for contender in CONTENDERS:
                if not contender.supports(batch):
                    continue
                drained = drain_once(server, contender, jobs=plan.jobs, workers=workers,
                                     batch=batch)
                measured[(contender.name, workers, batch)] = drained
                progress(f"  {contender.name:<22} workers={workers} batch={batch:<3} "
                         f"{drained.jobs_per_second:>9,.0f} jobs/s "
                         f"{drained.statements_per_job:6.2f} statements/job")
    return measured


def _rates(measured: Measured) -> dict[tuple[str, int, int], float]:
    return {key: drained.jobs_per_second for key, drained in measured.items()}


#: The throughput targets, checked cell by cell in the printed summary: jobflow's
#: contender, the peer's, and the least ratio between them, at the same number
#: of worker processes and batch size (procrastinate's batch is always 1; the
#: Worker's concurrency is the batch size). The Worker, what users run, is held
#: to the targets jobflow's contender had; the store's own loop is compared
#: with the raw SQL of the same shape (two statements per batch).
TARGETS: tuple[tuple[str, str, float], ...] = (
    (WORKER, PROCRASTINATE, 5.0),
    (WORKER, PGQUEUER, 1.0),
    (WORKER, RAW, 0.5),
    (JOBFLOW, RAW_APART, 0.5),
)


def _peer_rate(rates: dict[tuple[str, int, int], float], peer: str, workers: int,
               batch: int) -> float | None:
    return rates.get((peer, workers, 1 if peer == PROCRASTINATE else batch))


def throughput_table(plan: Plan, measured: Measured) -> str:
    names = [c.name for c in CONTENDERS]
    headers = ["workers", "batch", *names, *(f"{ours} / {peer}" for ours, peer, _ in TARGETS)]
    rates = _rates(measured)
    rows = []
    for workers in plan.workers:
        for batch in plan.batches:
            rows.append([
                str(workers), str(batch),
                *(rate(rates.get((name, workers, batch))) for name in names),
                *(ratio(rates.get((ours, workers, batch)),
                        _peer_rate(rates, peer, workers, batch)) for ours, peer, _ in TARGETS),
            ])
    return markdown_table(headers, rows)


def statements_table(plan: Plan, measured: Measured) -> str:
    """Statements per finished job, at the smallest worker count."""
    workers = plan.workers[0]
    names = [c.name for c in CONTENDERS]
    rows = [[str(batch), *(f"{measured[(name, workers, batch)].statements_per_job:.2f}"
                           if (name, workers, batch) in measured else "—" for name in names)]
            for batch in plan.batches]
    return markdown_table(["batch", *names], rows)


def verdicts(plan: Plan, measured: Measured) -> list[str]:
    """One line per target: met in how many of the cells where it applies."""
    rates = _rates(measured)
    lines = []
    for ours, peer, target in TARGETS:
        met, missed = [], []
        for workers in plan.workers:
            for batch in plan.batches:
                mine = rates.get((ours, workers, batch))
                theirs = _peer_rate(rates, peer, workers, batch)
                if mine is None or theirs is None:
                    continue
                cell = f"{workers}w/b{batch} {mine / theirs:.2f}x"
                (met if mine >= target * theirs else missed).append(cell)
        status = "MET" if not missed else ("NOT MET" if not met else "PARTLY MET")
        lines.append(f"- {ours} >= {target:g}x {peer}: {status} "
                     f"({len(met)}/{len(met) + len(missed)} cells)"
                     + (f"; missed: {', '.join(missed)}" if missed else ""))
    return lines


# -- per-call costs ----------------------------------------------------------------------


@dataclass(frozen=True)
class CallCosts:
    """Client-side medians of one worker's calls at one batch size, in ms per call."""

    batch: int
    jobflow_claim: float  # JobFlow.claim
    raw_claim: float  # the raw claim statement
    jobflow_finish: float  # JobFlow.finish_many of the claimed batch
    raw_finish: float  # the raw statement finishing the batch
    raw_together: float  # the raw statement finishing the batch and claiming the next


def _timed(into: list[float], function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``function`` and append how long it took, in milliseconds, to ``into``."""
    started = time.perf_counter()
    result = function(*args, **kwargs)
    into.append((time.perf_counter() - started) * 1000)
    return result


def call_costs(server: PostgresServer, plan: Plan) -> list[CallCosts]:
    """Where one worker's time goes: jobflow's calls beside the raw statements.

    Each batch size drains the queue with claim then finish as two calls on
    both sides, then with the raw finish-and-claim statement (full batches only)."""
    conninfo = server.conninfo("bench_jobflow")
    tool_jobflow.quiet_logging()
    flow = tool_jobflow.make_flow(server.sqlalchemy_url("bench_jobflow"))

    def jobflow_finish(claims: list[Any]) -> Any:
        return flow.finish_many([Succeeded(claim, None) for claim in claims])

    def fresh_queue(batch: int) -> None:
        jobflow_seed.reset(conninfo)
        jobflow_seed.seed_and_vacuum(conninfo, max(plan.cost_jobs, 10 * batch))

    costs = []
    with psycopg.connect(conninfo, autocommit=True) as connection:
        sides: dict[str, tuple[Callable[[int], list[Any]], Callable[[list[Any]], Any]]] = {
            "jobflow": (lambda batch: flow.claim("cost", limit=batch), jobflow_finish),
            "raw": (lambda batch: raw_sql.claim(connection, batch, "cost"),
                    lambda held: raw_sql.finish(connection, held, "cost")),
        }
        for batch in plan.batches:
            medians: dict[str, float] = {}
            for side, (claim, finish) in sides.items():
                timings: dict[str, list[float]] = {"claim": [], "finish": []}
                fresh_queue(batch)
                while held := _timed(timings["claim"], claim, batch):
                    _timed(timings["finish"], finish, held)
                timings["claim"].pop()  # the last claim found nothing
                medians.update({f"{side}_{name}": median(values)
                                for name, values in timings.items()})
            together: list[float] = []
            fresh_queue(batch)
            held = raw_sql.claim(connection, batch, "cost")
            while len(held) == batch:
                held = _timed(together, raw_sql.claim, connection, batch, "cost",
                              finishing=held)
            costs.append(CallCosts(batch=batch, raw_together=median(together), **medians))
    flow.store.engine.dispose()  # type: ignore[attr-defined]
    return costs


def call_costs_table(costs: list[CallCosts]) -> str:
    rows = [[str(c.batch), *(f"{value:.2f}" for value in (
        c.jobflow_claim, c.raw_claim, c.jobflow_finish, c.raw_finish, c.raw_together))]
            for c in costs]
    return markdown_table(["batch", "jobflow claim", "raw claim", "jobflow finish_many",
                           "raw finish", "raw finish and claim"], rows)


# -- claim latency with many finished jobs ----------------------------------------------------


@dataclass(frozen=True)
class ClaimLatency:
    small_ms: list[float]
    large_ms: list[float]
    plan_text: str

    @property
    def ratio(self) -> float:
        return median(self.large_ms) / median(self.small_ms)


def explain(sqlalchemy_url: str, statement: str, parameters: Any) -> str:
    """EXPLAIN ANALYZE of a claim statement, inside a transaction that is rolled back."""
    import sqlalchemy as sa

    engine = sa.create_engine(sqlalchemy_url)
    try:
        connection = engine.raw_connection()
        try:
            cursor = connection.cursor()
            cursor.execute("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF, TIMING OFF) " + statement,
                           parameters)
            lines = [str(row[0]) for row in cursor.fetchall()]
            connection.rollback()
        finally:
            connection.close()
    finally:
        engine.dispose()
    return "\n".join(lines)


def claim_latency(server: PostgresServer, plan: Plan) -> ClaimLatency:
    warmup = 20
    sizes = {"bench_claim_small": plan.small_finished, "bench_claim_large": plan.large_finished}
    for database, finished in sizes.items():
        server.create_database(database)
        conninfo = server.conninfo(database)
        jobflow_seed.migrate(server.sqlalchemy_url(database))
        started = time.monotonic()
        jobflow_seed.seed_done(conninfo, finished)
        # two spare jobs: one for the probe below, one for EXPLAIN ANALYZE to
        # claim (and roll back)
        jobflow_seed.seed_queued(conninfo, plan.latency_samples + warmup + 2)
        jobflow_seed.vacuum_analyze(conninfo)
        progress(f"  seeded {finished:,} done jobs in {time.monotonic() - started:.1f} s")
    tool_jobflow.quiet_logging()
    small = tool_jobflow.make_flow(server.sqlalchemy_url("bench_claim_small"))
    large = tool_jobflow.make_flow(server.sqlalchemy_url("bench_claim_large"))
    timings: dict[int, list[float]] = {id(small): [], id(large): []}
    for round_number in range(warmup + plan.latency_samples):
        for flow in (small, large):  # alternate, so load changes hit both alike
            started = time.perf_counter()
            claims = flow.claim("latency-probe", limit=1)
            elapsed_ms = (time.perf_counter() - started) * 1000
            if len(claims) != 1:
                raise RuntimeError("the latency probe found no queued job to claim")
            if round_number >= warmup:
                timings[id(flow)].append(elapsed_ms)
    # The statement to EXPLAIN comes from a flow that is not timed: a statement
    # listener sends the store's statements through SQLAlchemy's execution layer.
    probe = tool_jobflow.make_flow(server.sqlalchemy_url("bench_claim_large"))
    statements = tool_jobflow.claim_statements(probe)
    probe.claim("latency-probe", limit=1)
    if not statements:
        raise RuntimeError("no SKIP LOCKED statement was seen: cannot show the claim plan")
    statement, parameters = statements[-1]
    plan_text = explain(server.sqlalchemy_url("bench_claim_large"), statement, parameters)
    for flow in (small, large, probe):
        flow.store.engine.dispose()  # type: ignore[attr-defined]
    return ClaimLatency(timings[id(small)], timings[id(large)], plan_text)


def latency_report(plan: Plan, result: ClaimLatency) -> list[str]:
    rows = [[f"{plan.small_finished:,}", f"{median(result.small_ms):.2f}",
             f"{percentile(result.small_ms, 0.99):.2f}"],
            [f"{plan.large_finished:,}", f"{median(result.large_ms):.2f}",
             f"{percentile(result.large_ms, 0.99):.2f}"]]
    uses_index = CLAIM_INDEX in result.plan_text
    met = result.ratio < TARGET_LATENCY_RATIO
    return [
        f"JobFlow.claim(limit=1) latency, {plan.latency_samples} claims per table "
        "(ms, client side):",
        "",
        markdown_table(["done jobs in the table", "median ms", "p99 ms"], rows),
        "",
        f"- median ratio {plan.large_finished:,} / {plan.small_finished:,} done: "
        f"{result.ratio:.2f} (target < {TARGET_LATENCY_RATIO}): {'MET' if met else 'NOT MET'}",
        f"- claim plan uses the partial index {CLAIM_INDEX}: {'yes' if uses_index else 'NO'}",
        "",
        f"EXPLAIN (ANALYZE, BUFFERS) of jobflow's claim statement, "
        f"{plan.large_finished:,} done jobs:",
        "",
        "```",
        result.plan_text,
        "```",
    ]


# -- entry point -------------------------------------------------------------------------


def parse_plan(argv: Sequence[str] | None) -> Plan:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=None,
                        help="jobs per drain (default 20000; 1000 with --quick)")
    parser.add_argument("--workers", default=None,
                        help="comma-separated worker counts (default 1,4,8; 1,4 with --quick)")
    parser.add_argument("--batches", default="1,10,100",
                        help="comma-separated claim batch sizes (default 1,10,100)")
    parser.add_argument("--finished", type=int, default=None,
                        help="done jobs for the latency figure (default 1000000; "
                             "100000 with --quick)")
    parser.add_argument("--synchronous-commit", choices=("on", "off"), default="on",
                        help="the cluster's synchronous_commit (default on: every commit "
                             "waits for its WAL flush, as in production)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: few jobs, fewer worker counts")
    args = parser.parse_args(argv)

    def numbers(text: str) -> tuple[int, ...]:
        return tuple(int(part) for part in text.split(",") if part.strip())

    return Plan(
        jobs=args.jobs or (1_000 if args.quick else 20_000),
        workers=numbers(args.workers or ("1,4" if args.quick else "1,4,8")),
        batches=numbers(args.batches),
        latency_samples=300 if args.quick else 2_000,
        small_finished=1_000,
        large_finished=args.finished or (100_000 if args.quick else 1_000_000),
        cost_jobs=300 if args.quick else 1_000,
        synchronous_commit=args.synchronous_commit,
    )


def main(argv: Sequence[str] | None = None) -> int:
    plan = parse_plan(argv)
    started = time.monotonic()
    with PostgresServer(settings={"synchronous_commit": plan.synchronous_commit}) as server:
        summary = machine_summary(server.version())
        summary += f"; synchronous_commit={plan.synchronous_commit}"
        progress("preparing databases")
        server.prepare(jobflow="bench_jobflow", pgqueuer="bench_pgqueuer",
                       procrastinate="bench_procrastinate")
        progress(f"draining {plan.jobs:,} jobs per run")
        measured = throughput(server, plan)
        progress("per-call costs, one worker")
        costs = call_costs(server, plan)
        progress("claim latency")
        latency = claim_latency(server, plan)
    print(f"# Claim throughput: {plan.jobs:,} queued no-op jobs drained to done (jobs/s)")
    print()
    print(f"Machine: {summary}")
    print()
    print(throughput_table(plan, measured))
    print()
    print("Targets:")
    print("\n".join(verdicts(plan, measured)))
    print()
    print(f"Top-level statements sent to PostgreSQL per finished job "
          f"({plan.workers[0]} worker(s), from pg_stat_statements):")
    print()
    print(statements_table(plan, measured))
    print()
    print("Where one worker's time goes (client-side medians in ms per call, one process, "
          "each statement its own transaction):")
    print()
    print(call_costs_table(costs))
    print()
    print("\n".join(latency_report(plan, latency)))
    print()
    print(f"(total run time {time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

