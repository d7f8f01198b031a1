"""One claimer process for the concurrency test: claim batches until the queue
is empty, then print the ids of the jobs it claimed, one per line.

Usage: python -m tests.integration.pg_claimer DATABASE_URL WORKER_ID BATCH
It prints "ready" once connected and starts when a line arrives on stdin.
"""

from __future__ import annotations

import logging
import sys

import sqlalchemy as sa
import structlog

from jobflow import JobFlow
from jobflow.adapters.memory import InMemoryObjectStore
from jobflow.adapters.sqlalchemy import SqlAlchemyJobStore


def main(url: str, worker_id: str, batch: int) -> int:
    engine = sa.create_engine(url)
    quiet = structlog.wrap_logger(
        structlog.PrintLogger(), wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    flow = JobFlow(store=SqlAlchemyJobStore(engine), objects=InMemoryObjectStore(), logger=quiet)
    claimed: list[str] = []
    try:
        flow.counts()  # connect before the start signal
        print("ready", flush=True)
        sys.stdin.readline()
        while claims := flow.claim(worker_id, limit=batch):
            claimed += [claim.job.id for claim in claims]
    finally:
        engine.dispose()
    print("\n".join(claimed), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
