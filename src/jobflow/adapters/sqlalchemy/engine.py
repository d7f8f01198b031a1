"""Engines whose PostgreSQL connections cannot wait forever.

A worker waits on the database in three places: while connecting, while a
statement runs, and while a connection sits idle (its LISTEN connection, a
pooled connection between calls). Without limits, an address that accepts
connections and never answers, a server that hangs, or a network that drops
packets without a reset leaves the process waiting with no output.
:class:`DatabaseTimeouts` bounds each: libpq's ``connect_timeout``, a
``statement_timeout`` the server enforces, and TCP keepalives with
``tcp_user_timeout`` so that a dead peer's connection breaks on its own.

:func:`create_engine` is :func:`sqlalchemy.create_engine` with these
settings in the URL's query (SQLite ignores them: it has its busy timeout),
so that whatever connects from the engine's URL, such as the worker's
LISTEN connection, has them too.

One wait no client setting can bound: a server that is frozen (stopped,
not dead) still has its kernel acknowledge every packet and keepalive, and
it enforces no statement timeout while it does not run. Only the waiting
process can give up then; the worker does so on shutdown (see
``docs/reliability.md``).
"""

from __future__ import annotations

import math
from typing import Any

import attrs
import sqlalchemy as sa

from jobflow.errors import ConfigurationError

#: libpq counts the connect timeout in whole seconds, and at least 2.
_MIN_CONNECT_TIMEOUT = 2


def _positive(instance: Any, attribute: attrs.Attribute[Any], value: float | None) -> None:
    if value is None and attribute.name == "statement_seconds":
        return
    if value is None or not (isinstance(value, int | float) and math.isfinite(value)
                             and value > 0):
        raise ConfigurationError(f"{attribute.name} must be a finite number of seconds > 0, "
                                 f"got {value!r}")


@attrs.frozen
class DatabaseTimeouts:
    """How long a PostgreSQL connection may wait, in seconds.

    * ``connect_seconds`` (5): to open a connection, TLS and authentication
      included (libpq counts whole seconds, at least 2).
    * ``statement_seconds`` (30; None: no limit): how long one statement may
      run, locks waited for included; the server cancels it after that. Every
      statement jobflow sends takes milliseconds; migrations run without it.
    * ``tcp_seconds`` (30): how long the server's host may go silent before the
      connection is dropped: while sending (``tcp_user_timeout``) and while
      idle (TCP keepalives: the first probe after half of it, then three
      probes a sixth of it apart).
    """

    connect_seconds: float = attrs.field(default=5.0, validator=_positive)
    statement_seconds: float | None = attrs.field(default=30.0, validator=_positive)
    tcp_seconds: float = attrs.field(default=30.0, validator=_positive)

    def connect_args(self) -> dict[str, Any]:
        """libpq connection parameters that apply these limits."""
        args: dict[str, Any] = {
            "connect_timeout": max(_MIN_CONNECT_TIMEOUT, math.ceil(self.connect_seconds)),
            "keepalives": 1,
            "keepalives_idle": max(1, round(self.tcp_seconds / 2)),
            "keepalives_interval": max(1, round(self.tcp_seconds / 6)),
            "keepalives_count": 3,
            "tcp_user_timeout": max(1, round(self.tcp_seconds * 1000)),
        }
        if self.statement_seconds is not None:
            args["options"] = f"-c statement_timeout={max(1, round(self.statement_seconds * 1000))}"
        return args


def with_timeouts(url: str | sa.URL, timeouts: DatabaseTimeouts | None = None) -> sa.URL:
    """``url`` with the libpq parameters of ``timeouts`` (default:
    :class:`DatabaseTimeouts`'s) added to its query, except those it sets
    already; the statement timeout joins the URL's own ``options`` unless
    they set one. A URL that is not PostgreSQL's is returned as it is."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() != "postgresql":
        return parsed
    ours = (timeouts or DatabaseTimeouts()).connect_args()
    statement = ours.pop("options", None)
    added = {name: str(value) for name, value in ours.items() if name not in parsed.query}
    theirs = parsed.query.get("options", "")
    theirs = theirs if isinstance(theirs, str) else " ".join(theirs)
    if statement is not None and "statement_timeout" not in theirs:
        added["options"] = f"{theirs} {statement}".strip()
    return parsed.update_query_dict(added)


def create_engine(url: str | sa.URL, *, timeouts: DatabaseTimeouts | None = None,
                  **kwargs: Any) -> sa.Engine:
    """:func:`sqlalchemy.create_engine` for :func:`with_timeouts` of ``url``:
    every connection made from the engine's URL (its pool's, the worker's
    LISTEN connection) has the ``timeouts``. Other keywords go to SQLAlchemy;
    ``connect_args`` win over the URL's query."""
    return sa.create_engine(with_timeouts(url, timeouts), **kwargs)


__all__ = ["DatabaseTimeouts", "create_engine", "with_timeouts"]
