"""A throw-away PostgreSQL cluster for the test suite.

``initdb`` in a temporary folder, a free port, the server's socket in that
folder, ``pg_ctl`` to start and stop it. When the tests run as root the
cluster is created and run by the ``postgres`` user (the server refuses to
run as root). The binaries come from ``pg_config --bindir`` (on Debian they
are not on PATH), else from PATH.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import sqlalchemy as sa

SERVER_USER = "postgres"
# Durability is worthless for a cluster deleted after the run; speed is not.
_FAST_SETTINGS = ("fsync=off", "synchronous_commit=off", "full_page_writes=off",
                  "max_connections=200",
                  # Tests count the statements a worker sends (CREATE EXTENSION first).
                  "shared_preload_libraries=pg_stat_statements")


class PostgresUnavailable(RuntimeError):
    """PostgreSQL could not be found or started."""


def _bindir() -> Path:
    """The folder holding initdb and pg_ctl."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            found = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True,
                                   check=True).stdout.strip()
            candidates.append(Path(found))
        except (OSError, subprocess.CalledProcessError):
            pass
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).parent)
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    for folder in candidates:
        if (folder / "initdb").exists() and (folder / "pg_ctl").exists():
            return folder
    raise PostgresUnavailable(
        "PostgreSQL server binaries (initdb, pg_ctl) not found; install PostgreSQL 15 "
        "(scripts/ensure-test-tools does it on Debian/Ubuntu) or set "
        "JOBFLOW_TEST_DATABASE_URL to a running server")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PostgresCluster:
    """One PostgreSQL server in a temporary folder, for one test run (or one test).

    ``settings`` (``name=value``) are added to the fast defaults and win over
    them. Besides starting and stopping, a test can make the server fail:
    :meth:`crash` it and :meth:`restart` it, or :meth:`freeze` every one of
    its processes (SIGSTOP: the kernel still accepts connections and
    acknowledges packets, nothing answers) and :meth:`thaw` them.
    """

    def __init__(self, settings: Sequence[str] = ()) -> None:
        self._bin = _bindir()
        self._as_root = os.geteuid() == 0
        self.folder = Path(tempfile.mkdtemp(prefix="jobflow-pg-"))
        self.data = self.folder / "data"
        self.log = self.folder / "server.log"
        self.port = 0
        self._settings = (*_FAST_SETTINGS, *settings)
        self._started = False
        self._frozen: list[int] = []

    def _run(self, args: Sequence[str]) -> None:
        command = [*(["runuser", "-u", SERVER_USER, "--"] if self._as_root else []), *args]
        try:
            result = subprocess.run(command, capture_output=True, text=True, check=False,
                                    stdin=subprocess.DEVNULL, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PostgresUnavailable(f"{' '.join(command)} could not run: {exc}") from exc
        if result.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise PostgresUnavailable(
                f"{' '.join(command)} failed ({result.returncode}):\n"
                f"{result.stdout}{result.stderr}{log}")

    def start(self) -> PostgresCluster:
        """Create and start the cluster; on failure nothing is left behind."""
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> PostgresCluster:
        if self._as_root:
            try:
                shutil.chown(self.folder, user=SERVER_USER, group=SERVER_USER)
            except (LookupError, OSError) as exc:
                raise PostgresUnavailable(
                    f"cannot hand {self.folder} to the {SERVER_USER!r} user: {exc}") from exc
        self._run([str(self._bin / "initdb"), "-D", str(self.data), "-U", SERVER_USER,
                   "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync"])
        for attempt in range(3):  # the free port may be taken before the server binds it
            self.port = free_port()
            try:
                self._pg_ctl_start()
            except PostgresUnavailable:
                if attempt == 2:
                    raise
                continue
            return self
        raise AssertionError("unreachable")  # pragma: no cover

    def _pg_ctl_start(self) -> None:
        options = " ".join([f"-p {self.port}", f"-k {self.folder}",
                            "-c listen_addresses=127.0.0.1",
                            *(f"-c {setting}" for setting in self._settings)])
        self._run([str(self._bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log),
                   "-o", options, "-w", "-t", "60", "start"])
        self._started = True

    # -- faults ---------------------------------------------------------------------------

    def crash(self) -> None:
        """Stop the server as a crash would (``pg_ctl stop -m immediate``): every
        connection drops, and the next start recovers from the WAL."""
        self.thaw()
        self._run([str(self._bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate",
                   "-w", "stop"])
        self._started = False

    def restart(self) -> None:
        """Start the server again, on the same port, after :meth:`crash`."""
        self._pg_ctl_start()

    def processes(self) -> list[int]:
        """The server's process ids: the postmaster first, then its children."""
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        children = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue  # the process ended meanwhile
            if int(fields[1]) == postmaster:
                children.append(int(stat.parent.name))
        return [postmaster, *children]

    def freeze(self) -> None:
        """SIGSTOP every process of the server (the postmaster first, so that it
        starts no new one) and wait until each is stopped."""
        for pid in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
                self._frozen.append(pid)
        for pid in self._frozen:
            wait_stopped(pid)

    def thaw(self) -> None:
        """SIGCONT every process :meth:`freeze` stopped."""
        while self._frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._frozen.pop(), signal.SIGCONT)

    def url(self, database: str = "postgres") -> str:
        """A psycopg 3 URL reaching the server through its socket folder."""
        return (f"postgresql+psycopg://{SERVER_USER}@/{database}"
                f"?host={self.folder}&port={self.port}")

    def stop(self) -> None:
        try:
            self.thaw()
            if self._started:
                self._run([str(self._bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate",
                           "-w", "stop"])
                self._started = False
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)


def wait_stopped(pid: int, timeout: float = 10.0) -> None:
    """Wait until the process is in the stopped state (``T`` in /proc)."""
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return  # gone
        if state in ("T", "t"):
            return
        time.sleep(0.005)
    raise PostgresUnavailable(f"process {pid} did not stop")


class DatabaseServer:
    """Creates and drops databases on one server (ours or one given by URL)."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = sa.make_url(admin_url)
        self._created: list[str] = []

    def url_of(self, database: str) -> sa.URL:
        return self.admin_url.set(database=database)

    def create_database(self, prefix: str = "jobflow_test") -> sa.URL:
        """A new, empty database; dropped by :meth:`drop_all`."""
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        self._admin(f'CREATE DATABASE "{name}" TEMPLATE template0')
        self._created.append(name)
        return self.url_of(name)

    def drop_all(self) -> None:
        while self._created:
            self._admin(f'DROP DATABASE IF EXISTS "{self._created.pop()}" WITH (FORCE)')

    def _admin(self, sql: str) -> None:
        engine = sa.create_engine(self.admin_url, isolation_level="AUTOCOMMIT",
                                  poolclass=sa.NullPool)
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql(sql)
        finally:
            engine.dispose()
