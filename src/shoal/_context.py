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
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from ._engine import mp_context
from ._util import public

if TYPE_CHECKING:
    from ._actor import Actor
    from ._ipc import Connection, JoinableQueue, Queue, SimpleQueue
    from ._manager import Manager
    from ._pool import Pool

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

    def Pool(  # noqa: N802
        self,
        processes: int | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: Iterable[Any] = (),
        maxtasksperchild: int | None = None,
        **options: Any,
    ) -> Pool:
        from ._pool import Pool

        return Pool(processes, initializer, initargs, maxtasksperchild, context=self._ctx, **options)

    def Pipe(self, duplex: bool = True) -> tuple[Connection, Connection]:  # noqa: N802
        from ._ipc import Pipe

        return Pipe(duplex)

    def Queue(self, maxsize: int = 0) -> Queue:  # noqa: N802
        from ._ipc import Queue

        return Queue(maxsize)

    def JoinableQueue(self, maxsize: int = 0) -> JoinableQueue:  # noqa: N802
        from ._ipc import JoinableQueue

        return JoinableQueue(maxsize)

    def SimpleQueue(self) -> SimpleQueue:  # noqa: N802
        from ._ipc import SimpleQueue

        return SimpleQueue()

    def Manager(self) -> Manager:  # noqa: N802
        from ._manager import Manager

        return Manager(ctx=self._ctx)

    def Actor(self, cls: Callable[..., object], /, *args: Any, **kwargs: Any) -> Actor:  # noqa: N802
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


public(Context)
public(get_context)
