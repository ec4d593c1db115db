"""``shoal.ProcessPoolExecutor``: ``concurrent.futures`` on shoal's engine.

The same engine as :class:`shoal.Pool`, behind the ``Executor`` interface, so
``loop.run_in_executor(executor, fn, *args)`` works.  Differences from the
standard library, all in the user's favour: a worker that dies fails only the
task it was running (:class:`~shoal.WorkerDiedError`) instead of breaking the
whole executor; ``map`` reads its input lazily and, without a ``chunksize``,
chunks by measured task time; lambdas and closures work; a running task can be
cancelled with ``future.cancel(running=True)``.

What code written for the standard library reads keeps its meaning:
``_max_workers``, ``_mp_context`` and ``_processes`` are read-only views of the
engine's state, a worker's exception has ``_RemoteTraceback`` as its cause,
and an executor that cannot start (no new thread at interpreter shutdown)
raises ``BrokenProcessPool`` from submit and map.
"""

from __future__ import annotations

import concurrent.futures
from concurrent.futures import _base
from concurrent.futures.process import _RemoteTraceback
import itertools
import multiprocessing
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ._asyncresult import IMapIterator
from ._backends import remote_engine
from ._engine._engine import Engine, PoolStatistics, WorkerProcess, _check_int, _check_timeout
from ._engine._local import NO_SHARED
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
        # a slow or blocking one would stall every task.  (The future is
        # done: no callback can be added to the list any more.)
        if not self._done_callbacks:
            return
        engine = self._shoal_engine
        if engine is not None and engine.is_scheduler_thread():
            engine.callbacks.call(self._run_callbacks)
        else:
            self._run_callbacks()

    def _run_callbacks(self) -> None:
        super()._invoke_callbacks()
        # Run once: the future keeps only its result, not the callbacks.
        self._done_callbacks = []


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
    if future.done():
        future._shoal_task = None  # settled before the line above: break the cycle here
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
        backend, address: as for :class:`shoal.Pool` (``backend="dask"``
            runs the calls on a Dask cluster).
        shared, worker_init, worker_exit: as for :class:`shoal.Pool`; read
            the shared object with :func:`shoal.shared`, collect what
            ``worker_exit`` returned with :meth:`worker_exit_results` after
            ``shutdown(wait=True)``.

    Leaving a ``with`` block waits for every submitted task, as the standard
    library does.  Left by Ctrl-C (KeyboardInterrupt), it does not: queued
    futures are cancelled, running tasks stop at once (their workers are
    killed) and their futures raise ``CancelledError``.  An interrupted
    ``map`` stops its own running chunks the same way.
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
        shared: Any = NO_SHARED,
        worker_init: Callable[[], object] | None = None,
        worker_exit: Callable[[], Any] | None = None,
        backend: str | None = None,
        address: str | None = None,
    ) -> None:
        if max_workers is not None:
            _check_int("max_workers", max_workers)
            if max_workers <= 0:
                raise ValueError("max_workers must be greater than 0")
        if max_tasks_per_child is not None:
            _check_int("max_tasks_per_child", max_tasks_per_child)
            if max_tasks_per_child < 1:
                raise ValueError("max_tasks_per_child must be >= 1")
        if backend is not None or address is not None:
            self._engine = remote_engine(
                backend, address, max_workers, initializer, initargs, max_tasks_per_child, mp_context,
                max_memory=max_memory, task_timeout=task_timeout, shared=shared, graceful_exit=True,
                worker_init=worker_init, worker_exit=worker_exit, remote_traceback=_RemoteTraceback,
            )
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
                defer_start_errors=True,
                remote_traceback=_RemoteTraceback,
                shared=shared,
                worker_init=worker_init,
                worker_exit=worker_exit,
            )
        # What the standard library's executor keeps in _mp_context.
        self._given_context = mp_context if mp_context is not None and not isinstance(mp_context, str) else None
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

        The input is read lazily.  Without *chunksize*, items go one at a
        time until the function's duration has been measured, then in
        chunks of about 50 ms of work (never more than ``len / (4 *
        max_workers)`` items when the input has a length).  Raises the first task error, and
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
        cap = None
        if chunksize is None:
            # Chunks grow with the measured task time, never beyond the
            # standard library's Pool.map size when the length is known.
            try:
                n = min(len(it) for it in iterables)  # type: ignore[arg-type]
            except TypeError:
                pass
            else:
                cap = engine.map_chunksize(n, fn)
        it = IMapIterator(engine, fn, args, chunksize, STARMAP, True, None, buffersize, None, cap)
        deadline = None if timeout is None else time.monotonic() + timeout
        return _results(it, deadline)

    def __exit__(self, exc_type, exc_val, exc_tb) -> None:
        """``shutdown(wait=True)``: wait for the pending work, as the standard
        library does; left by Ctrl-C, cancel it and stop running tasks."""
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            # Ctrl-C in the block: queued futures are cancelled and running
            # ones stop now (their workers are killed), instead of the block
            # waiting for all the work it was interrupted out of.
            self._engine.interrupt(concurrent.futures.CancelledError("interrupted by KeyboardInterrupt"))
            self.shutdown(wait=True, cancel_futures=True)
        else:
            self.shutdown(wait=True)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting work; with *cancel_futures*, cancel what has not started."""
        self._shutdown = True
        if cancel_futures:
            self._engine.cancel_pending_futures()
        self._engine.close()
        if wait:
            self._engine.join()

    def worker_exit_results(self) -> list:
        """What ``worker_exit`` returned in each worker that has ended (see
        :meth:`shoal.Pool.worker_exit_results`)."""
        return self._engine.worker_exit_results()

    def statistics(self) -> PoolStatistics:
        """Counters: tasks submitted / done / failed, workers replaced and why."""
        return self._engine.statistics()

    # -- what the standard library's executor keeps, read by code in the wild --
    @property
    def _max_workers(self) -> int:
        """The number of worker processes."""
        return self._engine.processes

    @property
    def _mp_context(self):
        """The multiprocessing context the workers are started with."""
        return self._given_context if self._given_context is not None else self._engine._ctx

    @property
    def _processes(self) -> dict[int, WorkerProcess] | None:
        """``{pid: process}`` of the live workers (a snapshot; ``None`` after
        ``shutdown()``, as in the standard library)."""
        if self._shutdown:
            return None
        return {p.pid: p for p in self._engine.worker_processes()}


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
