"""``shoal.get_context()``: a start method's context whose factories are shoal's.

``multiprocessing.get_context("spawn").Pool()`` is the standard library's
pool; code that does ``import shoal as multiprocessing`` expects shoal's.  A
:class:`Context` wraps the standard library's context: ``Pool``, ``Pipe``,
the queues, ``Manager`` and ``Actor`` are shoal's (the pool starts its workers with this
context's start method), and everything else (``Process``, ``Lock``,
``Value``, ``get_start_method``, ...) is the wrapped context's own.
"""

from __future__ import annotations

import multiprocessing
from typing import Any

from ._engine import mp_context

__all__ = ("Context", "get_context")


class Context:
    """A ``multiprocessing`` context with shoal's pool, pipes, queues and manager."""

    def __init__(self, ctx: multiprocessing.context.BaseContext) -> None:
        self._ctx = ctx

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ctx, name)

    def __dir__(self) -> list[str]:
        # What the wrapped context offers is this context's too.
        return sorted(set(super().__dir__()) | set(dir(self._ctx)))

    def Pool(self, processes=None, initializer=None, initargs=(), maxtasksperchild=None, **options):  # noqa: N802
        from ._pool import Pool

        return Pool(processes, initializer, initargs, maxtasksperchild, context=self._ctx, **options)

    def Pipe(self, duplex: bool = True):  # noqa: N802
        from ._ipc import Pipe

        return Pipe(duplex)

    def Queue(self, maxsize: int = 0):  # noqa: N802
        from ._ipc import Queue

        return Queue(maxsize)

    def JoinableQueue(self, maxsize: int = 0):  # noqa: N802
        from ._ipc import JoinableQueue

        return JoinableQueue(maxsize)

    def SimpleQueue(self):  # noqa: N802
        from ._ipc import SimpleQueue

        return SimpleQueue()

    def Manager(self):  # noqa: N802
        from ._manager import Manager

        return Manager(ctx=self._ctx)

    def Actor(self, cls, /, *args, **kwargs):  # noqa: N802
        """:class:`shoal.Actor`, its process started with this context's start method."""
        from ._actor import Actor

        return Actor._in_context(self._ctx, cls, args, kwargs)

    def get_context(self, method: str | None = None) -> Context:
        return get_context(method)

    def __repr__(self) -> str:
        return f"<shoal.Context start_method={self._ctx.get_start_method()!r}>"


def get_context(method: str | None = None) -> Context:
    """The context for *method* (``"fork"``, ``"spawn"``, ``"forkserver"``;
    ``None`` for the current default), with shoal's factories."""
    return Context(multiprocessing.get_context() if method is None else mp_context(method))
