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
import itertools
import multiprocessing
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures.process import _RemoteTraceback
from multiprocessing.context import BaseContext
from types import TracebackType
from typing import Any

from ._asyncresult import IMapIterator
from ._backends import make_engine
from ._engine import NO_SHARED, STARMAP, PoolStatistics, WorkerProcess, recycling_context
from ._future import Future, submit_future
from ._util import check_int, check_timeout, public

__all__ = ("Future", "ProcessPoolExecutor")


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
        mp_context: BaseContext | str | Any = None,  # Any: a shoal.Context too
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
            check_int("max_workers", max_workers)
            if max_workers <= 0:
                raise ValueError("max_workers must be greater than 0")
        if max_tasks_per_child is not None:
            check_int("max_tasks_per_child", max_tasks_per_child)
            if max_tasks_per_child < 1:
                raise ValueError("max_tasks_per_child must be >= 1")
            if mp_context is None and backend is None:
                # As the standard library (3.11+): recycled workers start with
                # spawn unless a context is given.  (An explicit fork context
                # works here, where the standard library refuses it.)
                # (fork in a process whose default start method is another
                # library's, where spawn cannot start processes)
                mp_context = recycling_context()
        self._engine = make_engine(
            backend,
            address,
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
        self._given_context = (
            mp_context if mp_context is not None and not isinstance(mp_context, str) else None
        )
        self._shutdown = False
        # Dropped without shutdown(): finish the queued work, then stop.
        self._finalizer = weakref.finalize(self, self._engine.close)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """Schedule ``fn(*args, **kwargs)``; return a :class:`Future`."""
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        return submit_future(self._engine, fn, args, kwargs)

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int | None = None,
        buffersize: int | None = None,
    ) -> Iterator[Any]:
        """``map(fn, *iterables)`` in the workers, results in order.

        The input is read lazily.  Without *chunksize*, items go one at a
        time until the function's duration has been measured, then in
        chunks of about 50 ms of work (never more than ``len / (4 *
        max_workers)`` items when the input has a length).  Raises the first task error, and
        ``TimeoutError`` if a result is not ready *timeout* seconds after the
        call.

        *buffersize* (Python 3.14's argument, on every Python): at most this
        many tasks are submitted whose results have not been yielded yet; the
        input is read only as results are taken, so it may be endless.  A
        task is one item (*chunksize* items with a *chunksize*), as in the
        standard library.  After :meth:`shutdown` no more input is read: the
        results already submitted are yielded, then ``RuntimeError`` if input
        is left.
        """
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if buffersize is not None and not isinstance(buffersize, int):
            raise TypeError("buffersize must be an integer or None")
        if buffersize is not None and buffersize < 1:
            raise ValueError("buffersize must be None or > 0")
        if chunksize is not None and (not isinstance(chunksize, int) or chunksize < 1):
            raise ValueError("chunksize must be >= 1.")
        check_timeout(timeout)
        engine = self._engine
        engine._check_running()
        if not callable(fn):
            raise TypeError(f"the function to run must be callable, got {type(fn).__name__}")
        args = zip(*iterables, strict=False)
        cap = None
        if chunksize is None and buffersize is not None:
            # The window counts items, as the standard library's (chunksize 1).
            chunksize = 1
        if chunksize is None and iterables:
            # Chunks grow with the measured task time, never beyond the
            # standard library's Pool.map size when the length is known.
            try:
                n = min(len(it) for it in iterables)  # type: ignore[arg-type]
            except TypeError:
                pass
            else:
                cap = engine.map_chunksize(n, fn)
        it = IMapIterator(
            engine,
            fn,
            args,
            chunksize=chunksize,
            mode=STARMAP,
            ordered=True,
            task_timeout=None,
            bound=buffersize,
            max_chunksize=cap,
            stop_at_close=buffersize is not None,
        )
        deadline = None if timeout is None else time.monotonic() + timeout
        return _results(it, deadline)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
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

    def terminate_workers(self) -> None:
        """Stop every worker now with SIGTERM (SIGKILL after a second if one
        is still alive), as Python 3.14's method does, on every Python.

        It is ``shutdown(wait=False, cancel_futures=True)`` and then the
        signal: futures not yet handed to a worker are cancelled, those
        running fail with :class:`~shoal.PoolClosedError` (a
        ``RuntimeError``; the standard library's raise ``BrokenProcessPool``,
        also a ``RuntimeError``), and no work can be submitted afterwards.
        It returns without waiting; ``shutdown()`` (or leaving the ``with``
        block) waits until the workers are gone.
        """
        self._force_shutdown(kill=False)

    def kill_workers(self) -> None:
        """:meth:`terminate_workers` with SIGKILL: for workers that ignore
        or block SIGTERM (Python 3.14's method, on every Python)."""
        self._force_shutdown(kill=True)

    def _force_shutdown(self, kill: bool) -> None:
        self._shutdown = True
        self._engine.cancel_pending_futures()
        self._engine.terminate(wait=False, kill=kill)

    def worker_exit_results(self) -> list:
        """What ``worker_exit`` returned in each worker that has ended (see
        :meth:`shoal.Pool.worker_exit_results`)."""
        return self._engine.worker_exit_results()

    def statistics(self) -> PoolStatistics:
        """Counters: tasks submitted / done / failed, workers replaced and why."""
        return self._engine.statistics()

    # -- what the standard library's executor keeps, read by code in the wild --
    @property
    def _broken(self) -> str | bool:
        """The standard library's ``_broken``: why the pool cannot run tasks
        any more (a message), or False (read-only)."""
        error = self._engine.broken_error
        return False if error is None else str(error) or type(error).__name__

    @property
    def _max_workers(self) -> int:
        """The number of worker processes."""
        return self._engine.processes

    @property
    def _mp_context(self) -> Any:  # a BaseContext or the shoal.Context given
        """The multiprocessing context the workers are started with."""
        return self._given_context if self._given_context is not None else self._engine.context

    @property
    def _processes(self) -> dict[int, WorkerProcess] | None:
        """``{pid: process}`` of the live workers (a snapshot; ``None`` after
        ``shutdown()``, as in the standard library)."""
        if self._shutdown:
            return None
        return {p.pid: p for p in self._engine.worker_processes()}


def _results(it: IMapIterator, deadline: float | None) -> Iterator[Any]:
    # Each result is yielded without a name in this frame: the suspended
    # generator must not keep the last result alive after the caller drops
    # it (the standard library's test_free_reference).
    try:
        for _ in itertools.count():
            if deadline is None:
                yield it.next()
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("the map did not finish within its timeout")
            try:
                yield it.next(remaining)
            except multiprocessing.TimeoutError:
                raise TimeoutError("the map did not finish within its timeout") from None
    except StopIteration:
        return
    finally:
        it.close()


public(ProcessPoolExecutor)
