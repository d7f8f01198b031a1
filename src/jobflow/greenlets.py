"""SQLAlchemy's bridge between synchronous code and asyncio, under one name.

:func:`greenlet_spawn` runs a synchronous function in a greenlet from a
coroutine; inside it, :func:`await_` waits for a coroutine by handing it to
the event loop and switching back when it is done. This is how SQLAlchemy's
``AsyncSession`` runs the synchronous ORM on asyncio drivers, and how
:mod:`jobflow.aio` runs :class:`~jobflow.JobFlow` (SQLAlchemy 2.1 renamed
``await_only`` to ``await_``; both spellings are served here).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy.util import greenlet_spawn

if TYPE_CHECKING:
    from sqlalchemy.util import await_only as await_
else:
    try:
        from sqlalchemy.util import await_
    except ImportError:  # SQLAlchemy 2.0
        from sqlalchemy.util import await_only as await_

__all__ = ["await_", "greenlet_spawn"]
