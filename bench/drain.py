"""Run one drain: W worker processes empty a queue of no-op jobs, timed together.

Each worker process connects and prepares first, then waits at a barrier;
the clock starts when every worker is ready and stops when the last one has
found the queue empty. Process start-up, imports and connecting are therefore
not measured, for any contender.
"""

from __future__ import annotations

import multiprocessing
import queue
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.synchronize import Barrier
from typing import Any

#: A worker process body: prepare (connect...), call ``wait_for_start()``, then
#: finish jobs until the queue is empty. The caller counts finished jobs in the
#: database afterwards, the same way for every contender.
DrainBody = Callable[[dict[str, Any], Callable[[], None]], None]

#: How long a drain may take before the benchmark gives up on it.
DRAIN_TIMEOUT_SECONDS = 600.0
#: How long worker processes get to start, import and connect.
READY_TIMEOUT_SECONDS = 120.0


@dataclass(frozen=True)
class DrainResult:
    """How long ``workers`` processes took to finish ``jobs`` jobs."""

    workers: int
    jobs: int
    seconds: float

    @property
    def jobs_per_second(self) -> float:
        return self.jobs / self.seconds if self.seconds > 0 else float("inf")


def _worker_process(body: DrainBody, settings: dict[str, Any], barrier: Barrier,
                    results: multiprocessing.Queue[tuple[float, str | None]]) -> None:
    def wait_for_start() -> None:
        barrier.wait(READY_TIMEOUT_SECONDS)

    try:
        body(settings, wait_for_start)
        results.put((time.monotonic(), None))
    except BaseException:
        barrier.abort()
        results.put((time.monotonic(), traceback.format_exc()))


def run_drain(body: DrainBody, settings: dict[str, Any], *, workers: int,
              expected_jobs: int) -> DrainResult:
    """Start ``workers`` processes running ``body`` and time them from a common start.

    ``time.monotonic`` is the system-wide CLOCK_MONOTONIC on Linux, so end
    times taken in the worker processes compare with the start taken here.
    """
    # fork: worker processes start in milliseconds. The parent holds no open
    # connection and runs no thread when it forks.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    barrier = context.Barrier(workers + 1)
    results: multiprocessing.Queue[tuple[float, str | None]] = context.Queue()
    processes = [
        context.Process(target=_worker_process,
                        args=(body, {**settings, "worker_index": index}, barrier, results),
                        daemon=True)
        for index in range(workers)
    ]
    for process in processes:
        process.start()
    try:
        barrier.wait(READY_TIMEOUT_SECONDS)
        started = time.monotonic()
    except Exception:
        started = time.monotonic()  # a worker failed to start; its report says why
    ended = started
    errors: list[str] = []
    try:
        for _ in processes:
            end, error = results.get(timeout=DRAIN_TIMEOUT_SECONDS)
            ended = max(ended, end)
            if error is not None:
                errors.append(error)
    except queue.Empty:
        errors.append(f"drain did not finish within {DRAIN_TIMEOUT_SECONDS:.0f} s")
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()
    if errors:
        raise RuntimeError("a worker process failed:\n" + "\n".join(errors))
    return DrainResult(workers=workers, jobs=expected_jobs, seconds=ended - started)
