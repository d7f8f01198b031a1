"""The audit itself: it finds two attempts of one job running at once, does
not count the time a test kept a process stopped, and finds a row that
breaks a CHECK on SQLite too."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobflow import JobFlow, UploadPolicy
from jobflow.adapters.memory import InMemoryObjectStore
from jobflow.adapters.sqlalchemy import SqlAlchemyJobStore
from jobflow.config import ensure_schema, make_engine
from tests.chaos.audit import Timeline, broken_constraints, overlapping, read_runs

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


def test_an_attempt_number_run_again_in_one_process_is_two_attempts(tmp_path: Path) -> None:
    """A deferred attempt gives its number back: the same process may run the
    same number again afterwards, and not at the same time."""
    log = write_log(tmp_path / "runs.log",
                    f"start {JOB} 1 100 10.0", f"end {JOB} 1 100 11.0 error",
                    f"start {JOB} 1 100 12.0", f"end {JOB} 1 100 13.0 ok")
    runs = read_runs(log)
    assert [(run.started, run.ended, run.outcome) for run in runs] == [
        (10.0, 11.0, "error"), (12.0, 13.0, "ok")]
    assert overlapping(runs, {}) == []

    both_at_once = write_log(tmp_path / "twice.log",
                             f"start {JOB} 1 100 10.0", f"start {JOB} 1 100 10.5",
                             f"end {JOB} 1 100 11.0 ok", f"end {JOB} 1 100 12.0 ok")
    assert len(overlapping(read_runs(both_at_once), {})) == 1


def test_a_sqlite_row_that_breaks_a_check_is_found(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'jobflow.sqlite3'}")
    ensure_schema(engine)
    flow = JobFlow(store=SqlAlchemyJobStore(engine), objects=InMemoryObjectStore(),
                   policy=UploadPolicy())
    flow.initiate_upload("chaos", {}, content_type="video/mp4")
    assert broken_constraints(engine) == []
    with engine.begin() as conn:  # SQLite enforces its CHECKs unless told not to
        conn.exec_driver_sql("PRAGMA ignore_check_constraints = ON")
        conn.exec_driver_sql("UPDATE jobflow_jobs SET deferrals = -1, history_length = 5")
        conn.exec_driver_sql("PRAGMA ignore_check_constraints = OFF")
    assert broken_constraints(engine) == ["ck_jobflow_jobs_deferrals_not_negative: 1 rows",
                                          "history_length: 1 jobs"]
    engine.dispose()
