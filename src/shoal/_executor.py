"""``shoal.ProcessPoolExecutor``: ``concurrent.futures`` on shoal's engine.

The same engine as :class:`shoal.Pool`, behind the ``Executor`` interface, so
``loop.run_in_executor(executor, fn, *args)`` works.  Differences from the
standard library, all in the user's favour: a worker that dies fails only the
task it was running (:class:`~shoal.WorkerDiedError`) instead of breaking the
whole executor; ``map`` reads its input lazily and, without a ``chunksize``,
chunks by measured task time; lambdas and closures work; a running task can be
cancelled with ``future.cancel(running=True)``.
"""

from __future__ import annotations

import concurrent.futures
from concurrent.futures import _base
import itertools
import multiprocessing
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ._asyncresult import IMapIterator
from ._backends import NOT_SHARED, remote_engine
from ._engine._engine import Engine, PoolStatistics, _check_timeout
from ._engine._worker import STARMAP

__all__ = ("Future", "ProcessPoolExecutor")


class Future(concurrent.futures.Future):
    """A ``concurrent.futures.Future`` whose running task can be cancelled."""

    _shoal_engine: Engine | None = None
    _shoal_task: Any = None

    def cancel(self, running: bool = False) -> bool:
        """Cancel the task.

        As in the standard library a queued task is cancelled and ``True``
        returned.  With ``running=True`` a task already running is cancelled
        too: its worker is killed and replaced, and the future raises
        :class:`concurrent.futures.CancelledError`.
        """
        if super().cancel():
            return True
        task = self._shoal_task
        if not running or task is None:
            return False
        # Move a RUNNING future to CANCELLED, as cancel() does for a pending
        # one (the same steps as Future.set_running_or_notify_cancel).
        with self._condition:
            if self._state != _base.RUNNING:
                return self._state in (_base.CANCELLED, _base.CANCELLED_AND_NOTIFIED)
            self._state = _base.CANCELLED_AND_NOTIFIED
            for waiter in self._waiters:
                waiter.add_cancelled(self)
            self._condition.notify_all()
        self._invoke_callbacks()
        self._shoal_engine.cancel(task, concurrent.futures.CancelledError("the running task was cancelled"))
        return True

    def _invoke_callbacks(self) -> None:
        # Done-callbacks are user code: never on the scheduler thread, where
        # a slow or blocking one would stall every task.
        engine = self._shoal_engine
        if engine is not None and engine.is_scheduler_thread():
            engine.callbacks.call(super()._invoke_callbacks)
        else:
            super()._invoke_callbacks()


class _FutureSink:
    """Delivers a task's outcome to a Future (the engine's sink protocol)."""

    __slots__ = ("future",)

    def __init__(self, future: Future) -> None:
        self.future = future

    def _skip(self, task) -> bool:
        future = self.future
        if future.running():
            return False
        # Marks it running, or reports that the user cancelled it.
        return future.done() or not future.set_running_or_notify_cancel()

    def _deliver(self, task, ok: bool, value) -> None:
        future = self.future
        future._shoal_task = None  # break the task <-> future cycle
        # Future._invoke_callbacks hands user callbacks to the callback thread.
        _settle(future, ok, value)


def _settle(future: Future, ok: bool, value) -> None:
    if future.done():
        return
    try:
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)
    except concurrent.futures.InvalidStateError:
        pass  # cancelled meanwhile


def _submit_future(engine: Engine, fn, args, kwargs, task_timeout=None) -> Future:
    engine._check_running()
    if not callable(fn):
        raise TypeError(f"the function to run must be callable, got {type(fn).__name__}")
    future = Future()
    future._shoal_engine = engine
    future._shoal_task = engine.submit_call(fn, args, kwargs, _FutureSink(future), task_timeout)
    return future


class ProcessPoolExecutor(concurrent.futures.Executor):
    """An executor that runs calls in worker processes (drop-in for
    ``concurrent.futures.ProcessPoolExecutor``).

    Args:
        max_workers: number of workers (default: the CPUs this process may use).
        mp_context: a ``multiprocessing`` context or start method name.
        initializer, initargs: run in each worker as it starts.
        max_tasks_per_child: tasks a worker runs before it is replaced.
        max_memory: resident bytes after which a worker is replaced between tasks.
        task_timeout: seconds a task may run before its worker is killed
            and the task fails with :class:`~shoal.TaskTimeoutError`.
        backend, address, shared: as for :class:`shoal.Pool` (``backend="dask"``
            runs the calls on a Dask cluster).
    """

    def __init__(
        self,
        max_workers: int | None = None,
        mp_context=None,
        initializer: Callable[..., object] | None = None,
        initargs: Iterable[Any] = (),
        *,
        max_tasks_per_child: int | None = None,
        max_memory: int | None = None,
        task_timeout: float | None = None,
        backend: str | None = None,
        address: str | None = None,
        shared: Any = NOT_SHARED,
    ) -> None:
        if max_workers is not None and (not isinstance(max_workers, int) or max_workers <= 0):
            raise ValueError("max_workers must be greater than 0")
        if backend is not None or address is not None:
            self._engine = remote_engine(
                backend, address, max_workers, initializer, initargs, max_tasks_per_child, mp_context,
                max_memory=max_memory, task_timeout=task_timeout, shared=shared, graceful_exit=True,
            )
        elif shared is not NOT_SHARED:
            raise NotImplementedError("shared= is not implemented for the local backend yet")
        else:
            self._engine = Engine(
                max_workers,
                initializer,
                initargs,
                max_tasks_per_child,
                mp_context,
                max_memory=max_memory,
                task_timeout=task_timeout,
                graceful_exit=True,
            )
        self._shutdown = False
        # Dropped without shutdown(): finish the queued work, then stop.
        self._finalizer = weakref.finalize(self, self._engine.close)

    def submit(self, fn: Callable[..., Any], /, *args, **kwargs) -> Future:
        """Schedule ``fn(*args, **kwargs)``; return a :class:`Future`."""
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        return _submit_future(self._engine, fn, args, kwargs)

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int | None = None, buffersize: int | None = None) -> Iterator[Any]:
        """``map(fn, *iterables)`` in the workers, results in order.

        The input is read lazily.  Without *chunksize*, items are grouped by
        measured task time.  Raises the first task error, and
        ``TimeoutError`` if a result is not ready *timeout* seconds after the
        call.
        """
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if chunksize is not None and (not isinstance(chunksize, int) or chunksize < 1):
            raise ValueError("chunksize must be >= 1.")
        _check_timeout(timeout)
        engine = self._engine
        engine._check_running()
        if not callable(fn):
            raise TypeError(f"the function to run must be callable, got {type(fn).__name__}")
        args = zip(*iterables)
        if chunksize is None:
            chunksize = 1
            try:
                n = min(len(it) for it in iterables)  # type: ignore[arg-type]
            except TypeError:
                pass
            else:
                chunksize = engine.map_chunksize(n, fn)
        it = IMapIterator(engine, fn, args, chunksize, STARMAP, True, None, buffersize, None)
        deadline = None if timeout is None else time.monotonic() + timeout
        return _results(it, deadline)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting work; with *cancel_futures*, cancel what has not started."""
        self._shutdown = True
        if cancel_futures:
            self._engine.cancel_pending_futures()
        self._engine.close()
        if wait:
            self._engine.join()

    def statistics(self) -> PoolStatistics:
        """Counters: tasks submitted / done / failed, workers replaced and why."""
        return self._engine.statistics()


def _results(it: IMapIterator, deadline: float | None) -> Iterator[Any]:
    try:
        for _ in itertools.count():
            if deadline is None:
                value = it.next()
            else:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("the map did not finish within its timeout")
                try:
                    value = it.next(remaining)
                except multiprocessing.TimeoutError:
                    raise TimeoutError("the map did not finish within its timeout") from None
            yield value
    except StopIteration:
        return
    finally:
        it.close()
