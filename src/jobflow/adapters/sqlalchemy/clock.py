"""The database's time, as the clock of every lease decision.

A lease is written as "valid until T" and rescued once "now" has passed T.
If each process asked its own host's clock, a host whose clock runs 90 s
fast would rescue a job whose lease has a minute left, and the job would run
twice at once. On PostgreSQL every process therefore asks the same clock,
the server's: :class:`DatabaseClock` reads ``clock_timestamp()`` now and
then and runs it forward with the local monotonic clock, which no one sets
and which does not jump. A host's wrong wall clock then changes nothing.

SQLite is one file on one host: its processes share that host's clock
already, and the store uses it (:func:`local_clock`).
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
import structlog

from jobflow.adapters.sqlalchemy.errors import driver_errors
from jobflow.errors import JobflowError
from jobflow.logconfig import library_logger

#: How often the database's time is read again. Between two readings the
#: local monotonic clock runs it forward; it drifts by parts per million.
RESAMPLE_SECONDS = 60.0
#: After a failed reading, how long before the next try (the last reading
#: stays in use meanwhile).
RETRY_SECONDS = 5.0

#: A host clock further than this from the database's is logged (once).
HOST_CLOCK_TOLERANCE = 1.0

_CLOCK_QUERY = sa.text("SELECT clock_timestamp()")


def local_clock() -> datetime:
    """This host's clock, as an aware UTC datetime."""
    return datetime.now(UTC)


class DatabaseClock:
    """The PostgreSQL server's time, without a round trip per call.

    A reading is ``clock_timestamp()`` taken on a connection of ``engine``;
    it is pinned to the middle of its round trip on the local monotonic
    clock, so its error is at most half the round trip (a millisecond on a
    local network). A call answers the last reading plus the monotonic time
    elapsed since. Every ``resample_seconds`` a new reading is taken by a
    background thread, so that no caller waits for the database, except the
    first ones, which have nothing to answer yet: each takes its own reading
    (no lock is held across a query, so a database that hangs holds up only
    the callers that asked it), and when that fails the call raises
    :class:`~jobflow.errors.StorageUnavailable`. A later reading that fails
    keeps the last one in use, is logged, and is tried again after
    :data:`RETRY_SECONDS`.

    On an async driver (an ``AsyncEngine``'s ``sync_engine``, as
    :class:`~jobflow.AsyncJobFlow` uses) a query only runs inside the event
    loop's greenlet, so the caller that finds a reading due takes it itself
    (one round trip a minute) instead of a background thread.
    """

    def __init__(self, engine: sa.Engine, *, resample_seconds: float = RESAMPLE_SECONDS,
                 logger: structlog.typing.FilteringBoundLogger | None = None) -> None:
        self._engine = engine
        self.resample_seconds = resample_seconds
        self._log: structlog.typing.FilteringBoundLogger = logger or library_logger(
            "jobflow.clock")
        self._lock = threading.Lock()
        # (database time, monotonic instant it was read at): None before the first reading.
        self._reading: tuple[datetime, float] | None = None
        self._next_reading = 0.0  # monotonic instant the next reading is due
        self._reading_now = False  # a background reading is under way
        self._warned = False  # about this host's clock being off
        self._in_background = not engine.dialect.is_async

    def __call__(self) -> datetime:
        reading = self._reading
        if reading is None:
            reading = self._read_first()
        elif time.monotonic() >= self._next_reading and self._take_the_next_reading():
            if self._in_background:
                threading.Thread(target=self._read_again, name="jobflow-clock",
                                 daemon=True).start()
            else:
                self._read_again()
        at, read_at = reading
        return at + timedelta(seconds=time.monotonic() - read_at)

    def _read_first(self) -> tuple[datetime, float]:
        reading = self._read()
        with self._lock:
            if self._reading is None or self._reading[1] < reading[1]:
                self._store(reading)
            return reading

    def _take_the_next_reading(self) -> bool:
        """Whether this caller starts the reading now due (one caller does)."""
        with self._lock:
            if self._reading_now or time.monotonic() < self._next_reading:
                return False
            self._reading_now = True
            return True

    def _read_again(self) -> None:
        try:
            reading = self._read()
        except Exception as exc:  # any failure: keep the last reading, try again later
            error = str(exc) if isinstance(exc, JobflowError) else f"{type(exc).__name__}: {exc}"
            self._log.warning("clock.reading_failed", error=error, retry_in=RETRY_SECONDS)
            with self._lock:
                self._next_reading = time.monotonic() + RETRY_SECONDS
                self._reading_now = False
            return
        with self._lock:
            self._store(reading)
            self._reading_now = False

    def _store(self, reading: tuple[datetime, float]) -> None:
        """Keep ``reading`` (the caller holds the lock)."""
        self._reading = reading
        self._next_reading = reading[1] + self.resample_seconds

    def _read(self) -> tuple[datetime, float]:
        """One reading: the database's time and the local monotonic instant it
        stands for, the middle of the round trip."""
        with driver_errors("read the database's clock"), self._engine.connect() as conn:
            sent = time.monotonic()
            at = conn.execute(_CLOCK_QUERY).scalar_one()
            received = time.monotonic()
            local = local_clock()
        at = at.astimezone(UTC)
        self._compare(at, local)
        return at, (sent + received) / 2

    def _compare(self, at: datetime, local: datetime) -> None:
        """Say once if this host's clock is off: lease decisions do not mind, but
        log times and anything else that reads the host's clock do."""
        offset = (local - at).total_seconds()
        if abs(offset) >= HOST_CLOCK_TOLERANCE and not self._warned:
            self._warned = True
            self._log.warning("clock.host_clock_differs", offset_seconds=round(offset, 3),
                              using="database")


__all__ = ["RESAMPLE_SECONDS", "DatabaseClock", "local_clock"]
