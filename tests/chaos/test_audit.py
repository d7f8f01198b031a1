"""The audit itself: it finds two attempts of one job running at once, and
does not count the time a test kept a process stopped."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos.audit import Timeline, overlapping, read_runs

pytestmark = pytest.mark.chaos

JOB = "00000000-0000-4000-8000-000000000001"


def write_log(path: Path, *lines: str) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def test_attempts_that_ran_at_the_same_time_are_found(tmp_path: Path) -> None:
    log = write_log(tmp_path / "runs.log",
                    f"start {JOB} 1 100 10.0", f"start {JOB} 2 200 12.0",
                    f"end {JOB} 2 200 13.0 ok", f"end {JOB} 1 100 14.0 ok")
    runs = read_runs(log)
    assert [(run.attempt, run.pid, run.ended, run.outcome) for run in runs] == [
        (1, 100, 14.0, "ok"), (2, 200, 13.0, "ok")]
    assert len(overlapping(runs, {})) == 1


def test_an_attempt_without_an_end_runs_until_its_process_died(tmp_path: Path) -> None:
    log = write_log(tmp_path / "runs.log",
                    f"start {JOB} 1 100 10.0", f"start {JOB} 2 200 12.0",
                    f"end {JOB} 2 200 13.0 ok")
    runs = read_runs(log)
    assert len(overlapping(runs, {})) == 1  # process 100 may still be running it
    assert overlapping(runs, {100: Timeline(100, died_at=11.0)}) == []
    assert len(overlapping(runs, {100: Timeline(100, died_at=12.5)})) == 1


def test_the_time_a_process_was_stopped_does_not_count(tmp_path: Path) -> None:
    log = write_log(tmp_path / "runs.log",
                    f"start {JOB} 1 100 10.0", f"start {JOB} 2 200 12.0",
                    f"end {JOB} 2 200 13.0 ok", f"end {JOB} 1 100 14.0 abandoned")
    runs = read_runs(log)
    assert overlapping(runs, {100: Timeline(100, frozen=[[11.0, 13.5]])}) == []
    assert len(overlapping(runs, {100: Timeline(100, frozen=[[11.0, 12.5]])})) == 1
