"""How an idle worker learns that a job may have become claimable.

A worker always polls; a :class:`Wakeup` lets it poll rarely. On PostgreSQL
the transaction that makes a job ``queued`` sends a NOTIFY, and
:class:`PostgresNotifyWakeup` holds one extra connection that LISTENs for it,
so an idle worker starts a new job at once and costs the database almost
nothing while it waits. SQLite and the in-memory store have no notifications:
:class:`PollingWakeup` never wakes anyone and the worker's poll interval decides.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import structlog

from jobflow.logconfig import library_logger

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from jobflow.ports import JobStore

#: Longest pause between two attempts to re-open a broken LISTEN connection.
MAX_RECONNECT_DELAY = 30.0


@runtime_checkable
class Wakeup(Protocol):
    """A source of "look for jobs now" signals for one worker."""

    def start(self, wake: Callable[[], None]) -> None:
        """Begin listening; call ``wake`` (from any thread) when a job may be claimable."""
        ...

    def close(self) -> None:
        """Stop listening and release connections. Idempotent."""
        ...

    @property
    def listening(self) -> bool:
        """True while notifications are being delivered, so polling can be rare."""
        ...


class PollingWakeup:
    """No notifications at all: the worker relies on its poll interval."""

    def start(self, wake: Callable[[], None]) -> None:
        return None

    def close(self) -> None:
        return None

    @property
    def listening(self) -> bool:
        return False


class PostgresNotifyWakeup:
    """LISTEN on a PostgreSQL channel from a dedicated connection and thread.

    ``connect`` opens a new psycopg connection in autocommit mode. The thread
    looks at the socket in slices of ``wait_slice`` seconds (no query is sent),
    so :meth:`close` returns within one slice. When the
    connection breaks, :attr:`listening` turns False (the worker then polls at
    its ordinary interval), the worker is woken once, and the connection is
    re-opened with a growing delay.
    """

    def __init__(self, connect: Callable[[], Any], channel: str, *,
                 wait_slice: float = 0.1,
                 logger: structlog.typing.FilteringBoundLogger | None = None) -> None:
        self._connect = connect
        self._channel = channel
        self._wait_slice = wait_slice
        self._log: structlog.typing.FilteringBoundLogger = logger or library_logger(
            "jobflow.wakeup")
        self._closed = threading.Event()
        self._listening = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def for_engine(cls, engine: Engine, channel: str) -> PostgresNotifyWakeup:
        """Listen with the same connection parameters as a SQLAlchemy engine."""
        import psycopg

        cargs, cparams = engine.dialect.create_connect_args(engine.url)

        def connect() -> Any:
            return psycopg.connect(*cargs, **cparams, autocommit=True)

        return cls(connect, channel)

    @property
    def listening(self) -> bool:
        return self._listening.is_set()

    def start(self, wake: Callable[[], None]) -> None:
        if self._thread is not None:
            raise RuntimeError("this wakeup was already started")
        self._thread = threading.Thread(target=self._listen_forever, args=(wake,),
                                        name="jobflow-listen", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closed.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self._wait_slice + 5.0)

    def _listen_forever(self, wake: Callable[[], None]) -> None:
        delay = 0.5
        while not self._closed.is_set():
            try:
                self._listen_once(wake)
                delay = 0.5
            except Exception as exc:  # any driver error: report, fall back to polling
                if self._listening.is_set():
                    self._listening.clear()
                    wake()  # a notification may have been lost: look once now
                self._log.warning("wakeup.listen_failed", channel=self._channel,
                                  error=f"{type(exc).__name__}: {exc}", retry_in=delay)
                self._closed.wait(delay)
                delay = min(delay * 2, MAX_RECONNECT_DELAY)

    def _listen_once(self, wake: Callable[[], None]) -> None:
        connection = self._connect()
        try:
            # The channel name is a constant of the adapter, never user input.
            connection.execute(f'LISTEN "{self._channel}"')
            self._listening.set()
            self._log.info("wakeup.listening", channel=self._channel)
            wake()  # jobs queued while we were not listening
            while not self._closed.is_set():
                # Waits on the socket; no query is sent while idle.
                for _ in connection.notifies(timeout=self._wait_slice):
                    wake()
        finally:
            self._listening.clear()
            connection.close()


def wakeup_for(store: JobStore) -> Wakeup:
    """The best wake-up source for ``store``: LISTEN/NOTIFY on PostgreSQL, else polling."""
    engine = getattr(store, "engine", None)
    if engine is None or getattr(engine.dialect, "name", None) != "postgresql":
        return PollingWakeup()
    try:
        from jobflow.adapters.sqlalchemy import NOTIFY_CHANNEL
    except ImportError:  # pragma: no cover - the adapter ships with jobflow
        return PollingWakeup()
    return PostgresNotifyWakeup.for_engine(engine, NOTIFY_CHANNEL)
