"""The SQL job store on SQLAlchemy's asyncio engines, for :class:`~jobflow.AsyncJobFlow`.

:class:`AsyncSqlAlchemyJobStore` is :class:`SqlAlchemyJobStore` on the
``sync_engine`` of an :class:`~sqlalchemy.ext.asyncio.AsyncEngine`, the
facade SQLAlchemy's own ``AsyncSession`` runs its synchronous core on: the
same statements, transactions, compare-and-sets, deadlock retries and error
translation, one code path for both. Each call is made by
:class:`~jobflow.AsyncJobFlow` inside a greenlet, where every round trip to
the database goes through the asyncio driver (psycopg 3's
``AsyncConnection`` for PostgreSQL, aiosqlite for SQLite) and the event loop
runs other tasks while it waits.

:meth:`AsyncSqlAlchemyJobStore.bind` joins the host's own ``AsyncSession`` or
``AsyncConnection``: jobs are created, completed or cancelled in the host's
transaction, and the host's commit or rollback decides.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar, cast

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from jobflow.adapters.sqlalchemy.store import SqlAlchemyJobStore
from jobflow.errors import ConfigurationError
from jobflow.greenlets import await_, greenlet_spawn
from jobflow.ports import JobStore

_T = TypeVar("_T")


async def _to_the_end(call: Coroutine[Any, Any, _T], running: set[asyncio.Task[Any]]) -> _T:
    """``call`` in a task of its own (kept in ``running`` until it ends) that a
    cancellation of the caller does not stop: the caller gets its
    CancelledError at once, the call still ends as it would have (committed or
    rolled back), and its connection goes back to the pool clean."""
    task = asyncio.ensure_future(call)
    running.add(task)
    task.add_done_callback(running.discard)
    return await asyncio.shield(task)


class _WholeCalls:
    """The store's calls, each run to its end once started, from inside the
    greenlet of an :class:`~jobflow.AsyncJobFlow` call.

    A task cancelled in the middle of a database round trip would otherwise
    leave the statement half-read and the connection thrown away with it;
    aiosqlite then keeps a write transaction open (and SQLite's write lock
    held) until the garbage collector finalizes the statement. Every call is
    one transaction, so finishing it keeps "untouched or fully transitioned"
    and costs the caller nothing. Calls are looked up by name, so a method
    added to :class:`SqlAlchemyJobStore` is served too.
    """

    def __init__(self, store: SqlAlchemyJobStore, running: set[asyncio.Task[Any]]) -> None:
        self._store = store
        self._running = running

    def __getattr__(self, name: str) -> Any:
        found = getattr(self._store, name)
        if name.startswith("_") or not callable(found):
            return found
        method: Callable[..., Any] = found

        def whole(*args: Any, **kwargs: Any) -> Any:
            return await_(_to_the_end(greenlet_spawn(method, *args, **kwargs), self._running))

        return whole

    def __repr__(self) -> str:
        return repr(self._store)


class AsyncSqlAlchemyJobStore:
    """Jobs and their history in PostgreSQL (``postgresql+psycopg_async://``, or
    ``postgresql+psycopg://`` given to ``create_async_engine``) or SQLite
    (``sqlite+aiosqlite:///path``), for :class:`~jobflow.AsyncJobFlow`.

    ``engine`` is an :class:`~sqlalchemy.ext.asyncio.AsyncEngine` whose
    database was migrated with :func:`jobflow.migrations.upgrade` (which
    takes the async engine too). Nothing connects until the first call.
    Each call runs in its own transaction, committed before it returns; use
    :meth:`bind` to run calls inside a transaction of your own instead.

    The store's methods are :class:`~jobflow.ports.JobStore`'s, awaited
    through :class:`~jobflow.AsyncJobFlow`; :attr:`sync_store` is the
    synchronous store underneath, whose calls only work inside a greenlet
    (``AsyncSession.run_sync`` or :func:`jobflow.greenlets.greenlet_spawn`).
    """

    def __init__(self, engine: AsyncEngine, *, busy_timeout_seconds: float = 30.0) -> None:
        if not isinstance(engine, AsyncEngine):
            raise ConfigurationError(
                f"AsyncSqlAlchemyJobStore takes an AsyncEngine (create_async_engine), not "
                f"{type(engine).__name__}; for an Engine use SqlAlchemyJobStore")
        self._engine = engine
        self._store = SqlAlchemyJobStore(engine.sync_engine,
                                         busy_timeout_seconds=busy_timeout_seconds)
        self._bound = False
        self._running: set[asyncio.Task[Any]] = set()

    @property
    def engine(self) -> AsyncEngine:
        """The engine this store was made with."""
        return self._engine

    @property
    def sync_store(self) -> JobStore:
        """The synchronous :class:`~jobflow.ports.JobStore` whose calls
        :class:`~jobflow.AsyncJobFlow` makes from its greenlets (they only work
        inside one): :class:`SqlAlchemyJobStore` on the engine's ``sync_engine``.

        On the store's own connections each call, once started, runs to its end
        even if the task that made it is cancelled (the task still gets its
        ``CancelledError`` at once): a call is one transaction, so a job is
        left untouched or fully transitioned, and no connection is dropped in
        the middle of a statement. A bound store runs in the host's
        transaction, whose commit or rollback decides instead.
        """
        if self._bound:
            return self._store
        return cast(JobStore, _WholeCalls(self._store, self._running))

    async def drain(self) -> None:
        """Wait until the calls still running after their caller was cancelled
        have ended (an app's shutdown does this before it disposes of the
        engine, so that none is cut off)."""
        while self._running:
            await asyncio.gather(*self._running, return_exceptions=True)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._engine.url.render_as_string(hide_password=True)!r})"

    def bind(self, connection: AsyncSession | AsyncConnection) -> AsyncSqlAlchemyJobStore:
        """A store that runs on the host's ``AsyncSession`` or ``AsyncConnection``
        and never commits nor rolls back: the host's transaction decides.

        A job created through it commits or rolls back together with the host's
        own rows, history included; on PostgreSQL its NOTIFY is delivered when
        the host commits. Use it from the task that owns the session (an
        ``AsyncSession`` is not safe to share between concurrent tasks).
        """
        if isinstance(connection, AsyncSession):
            bound_store = self._store.bind(connection.sync_session)
        elif isinstance(connection, AsyncConnection):
            sync_connection = connection.sync_connection
            if sync_connection is None:
                raise ConfigurationError(
                    "the AsyncConnection is not started: bind it inside "
                    "`async with engine.connect() as connection:`")
            bound_store = self._store.bind(sync_connection)
        else:
            raise ConfigurationError(
                f"bind() takes a SQLAlchemy AsyncSession or AsyncConnection, not "
                f"{type(connection).__name__}")
        bound = copy.copy(self)
        bound._store = bound_store
        bound._bound = True
        return bound


__all__ = ["AsyncSqlAlchemyJobStore"]
