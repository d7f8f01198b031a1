"""The built wheel carries jobflow's migrations: installed into a new virtual
environment, it migrates a fresh SQLite database on its own."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

MIGRATE = """
import sys
import jobflow.migrations as migrations
url = "sqlite:///" + sys.argv[1]
migrations.upgrade(url)
print(migrations.current(url), migrations.SCRIPT_LOCATION)
"""


def run(command: list[str], cwd: Path) -> str:
    # A clean environment: nothing from this checkout may leak onto sys.path.
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                            check=False, timeout=600)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.mark.wheel
def test_the_installed_wheel_migrates_a_fresh_database(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(ROOT)], cwd=ROOT)
    [wheel] = dist.glob("jobflow-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    assert {"jobflow/py.typed", "jobflow/migrations/env.py",
            "jobflow/migrations/script.py.mako",
            "jobflow/migrations/versions/0001_jobs_and_events.py"} <= shipped

    environment = tmp_path / "venv"
    venv.create(environment, with_pip=True)
    python = environment / "bin" / "python"
    run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         str(wheel)], cwd=tmp_path)

    database = tmp_path / "fresh.sqlite3"
    output = run([str(python), "-c", MIGRATE, str(database)], cwd=tmp_path)
    revision, location = output.split()
    assert revision == "0005"
    assert Path(location).is_relative_to(environment), "migrations ran from the checkout"
    with sqlite3.connect(database) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    conn.close()
    assert {"jobflow_jobs", "jobflow_job_events", "jobflow_alembic_version"} <= tables
