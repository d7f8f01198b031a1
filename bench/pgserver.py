"""A throw-away PostgreSQL cluster for the benchmarks.

``initdb`` in a temporary folder, a free TCP port on 127.0.0.1, trust
authentication, ``pg_stat_statements`` preloaded (the idle-cost figure reads
it), removed again on exit. PostgreSQL refuses to run as root, so when the
benchmark runs as root the server binaries run as the ``postgres`` user.

The cluster keeps PostgreSQL's durable defaults (``fsync`` and
``synchronous_commit`` on): every contender pays for real commits.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import psycopg

#: Settings written to the cluster's postgresql.conf, the same for every contender.
SERVER_SETTINGS: dict[str, str] = {
    "listen_addresses": "'127.0.0.1'",
    "max_connections": "200",
    "shared_buffers": "'512MB'",
    "shared_preload_libraries": "'pg_stat_statements'",
    "pg_stat_statements.track": "'all'",
    "pg_stat_statements.track_utility": "on",
    "log_min_messages": "'warning'",
    "logging_collector": "off",
}

#: The superuser the benchmarks connect as.
SUPERUSER = "postgres"


def server_bindir() -> Path:
    """Where ``initdb`` and ``pg_ctl`` live: ``$PG_BINDIR``, ``pg_config --bindir`` or PATH."""
    explicit = os.environ.get("PG_BINDIR")
    if explicit:
        return Path(explicit)
    pg_config = shutil.which("pg_config")
    if pg_config:
        found = subprocess.run([pg_config, "--bindir"], check=True, capture_output=True,
                               text=True).stdout.strip()
        if (Path(found) / "initdb").exists():
            return Path(found)
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise RuntimeError("PostgreSQL server binaries not found (set PG_BINDIR or install them)")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class PostgresServer:
    """One PostgreSQL cluster for the length of a ``with`` block."""

    def __init__(self, *, settings: dict[str, str] | None = None) -> None:
        self.settings = dict(SERVER_SETTINGS, **(settings or {}))
        self.port = free_port()
        self._root: Path | None = None
        self._run_as: list[str] = []

    @property
    def data_dir(self) -> Path:
        if self._root is None:
            raise RuntimeError("the server is not started")
        return self._root / "data"

    def conninfo(self, database: str = "postgres") -> str:
        """A libpq connection string (psycopg, asyncpg via :meth:`dsn`)."""
        return f"host=127.0.0.1 port={self.port} user={SUPERUSER} dbname={database}"

    def dsn(self, database: str = "postgres") -> str:
        """A ``postgresql://`` URL."""
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def sqlalchemy_url(self, database: str = "postgres") -> str:
        """A SQLAlchemy URL using psycopg 3."""
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str) -> None:
        subprocess.run([*self._run_as, *args], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE)

    def start(self) -> PostgresServer:
        bindir = server_bindir()
        self._root = Path(tempfile.mkdtemp(prefix="jobflow-bench-pg-"))
        if os.geteuid() == 0:
            shutil.chown(self._root, user=SUPERUSER)
            self._run_as = ["runuser", "-u", SUPERUSER, "--"]
        self._run(str(bindir / "initdb"), "-D", str(self.data_dir), "-U", SUPERUSER,
                  "--auth=trust", "--encoding=UTF8", "--no-instructions")
        conf = "".join(f"{name} = {value}\n" for name, value in self.settings.items())
        conf += f"port = {self.port}\nunix_socket_directories = '{self._root}'\n"
        with (self.data_dir / "postgresql.conf").open("a", encoding="utf-8") as handle:
            handle.write(conf)
        self._run(str(bindir / "pg_ctl"), "-D", str(self.data_dir), "-l",
                  str(self._root / "server.log"), "-w", "-t", "60", "start")
        self._wait_ready()
        with psycopg.connect(self.conninfo(), autocommit=True) as connection:
            connection.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        return self

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.conninfo(), connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        if self._root is None:
            return
        try:
            self._run(str(server_bindir() / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast",
                      "-w", "stop")
        finally:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None

    def create_database(self, name: str) -> None:
        """A fresh database with ``pg_stat_statements`` available in it."""
        with psycopg.connect(self.conninfo(), autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            connection.execute(f'CREATE DATABASE "{name}"')
        with psycopg.connect(self.conninfo(name), autocommit=True) as connection:
            connection.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")

    def reset_statements(self) -> None:
        """Forget what ``pg_stat_statements`` counted so far, in every database."""
        with psycopg.connect(self.conninfo(), autocommit=True) as connection:
            connection.execute("SELECT pg_stat_statements_reset()")

    def version(self) -> str:
        with psycopg.connect(self.conninfo()) as connection:
            row = connection.execute("SHOW server_version").fetchone()
        return str(row[0]) if row else "unknown"

    def prepare(self, *, jobflow: str, pgqueuer: str, procrastinate: str) -> None:
        """Create the contenders' databases: jobflow's migrated, the peers' schemas
        installed (the peers are imported only here)."""
        from bench import jobflow_seed, tool_pgqueuer, tool_procrastinate

        for database in (jobflow, pgqueuer, procrastinate):
            self.create_database(database)
        jobflow_seed.migrate(self.sqlalchemy_url(jobflow))
        tool_pgqueuer.install(self.dsn(pgqueuer))
        tool_procrastinate.install(self.conninfo(procrastinate))

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()
