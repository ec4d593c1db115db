"""``shoal.Pool``: the standard library's ``multiprocessing.Pool`` on shoal's engine.

Same signature and documented behaviour, so ``import shoal as
multiprocessing`` works, plus what the standard library lacks: a task whose
worker dies fails with :class:`~shoal.WorkerDiedError` instead of hanging the
pool; lambdas and closures work under every start method; per-task time
limits (``task_timeout``); a memory ceiling per worker (``max_memory``);
progress bars (``progress=True``); ``submit()`` returning a
``concurrent.futures.Future``; ``statistics()``; an object shared read-only
with every worker (``shared=``, read with :func:`shoal.shared`); per-worker
state (:func:`shoal.worker_state`) with ``worker_init`` / ``worker_exit``
hooks whose results :meth:`Pool.worker_exit_results` collects.

The pool is a thin face: every method turns its arguments into serialized
tasks (in the caller's thread, so pickling errors surface here) and hands them
to :class:`shoal._engine.Engine`, which owns the workers.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing.pool
import weakref
from collections.abc import Callable, Iterable
from multiprocessing.context import BaseContext
from typing import Any, NoReturn

from ._asyncresult import AsyncResult, IMapIterator, MapResult, new_async_result
from ._backends import make_engine
from ._engine import MAP, NO_SHARED, STARMAP, PoolStatistics, WorkerProcess
from ._future import submit_future
from ._progress import progress_bar
from ._serialization import name_unpicklable_item
from ._util import check_timeout, public

__all__ = ("AsyncResult", "Pool", "PoolStatistics")

#: map_async hands tasks to the engine in groups of about this many
#: serialized bytes, so big inputs start running while the rest is pickled.
SUBMIT_EARLY_BYTES = 1 << 20

_NO_KWARGS: dict = {}  # shared, never mutated: saves a dict per apply_async


class Pool:
    """A pool of worker processes (``multiprocessing.Pool``, made robust).

    Args:
        processes: number of workers (default: the CPUs this process may use).
        initializer: called as ``initializer(*initargs)`` when each worker starts.
            If it raises, the pool stops with :class:`~shoal.WorkerStartError`
            instead of restarting workers forever.
        maxtasksperchild: tasks a worker runs before it is replaced.
        context: a ``multiprocessing`` context or a start method name
            (``"fork"``, ``"spawn"``, ``"forkserver"``).
        max_memory: bytes of resident memory after which a worker is replaced
            between tasks.
        task_timeout: seconds a task may run; a late task's worker is killed
            and the task fails with :class:`~shoal.TaskTimeoutError` (a
            ``TimeoutError``).  Each call can set its own.
        shared: an object every worker gets once, when it starts (not with
            each task), and tasks read with :func:`shoal.shared`.  Under fork
            it is inherited without a copy; otherwise it is pickled once and
            large buffers inside it (numpy arrays) are mapped from shared
            memory by every worker.  Read-only: a worker's changes stay in it.
        worker_init: called with no arguments in each worker as it starts,
            after *initializer*; typically fills :func:`shoal.worker_state`.
            If it raises, the pool stops as for *initializer*.
        worker_exit: called with no arguments in each worker when it ends
            normally (after :meth:`close` / :meth:`join`, or when replaced by
            *maxtasksperchild* or *max_memory*), not when it is killed
            (:meth:`terminate`, which the ``with`` block calls, or a crash).
            What it returns is collected by :meth:`worker_exit_results`.
        backend: ``None`` (worker processes on this machine) or ``"dask"``
            (a Dask cluster; needs ``distributed``: ``pip install distributed``).
        address: with ``backend="dask"``, the scheduler to connect to
            (``"tcp://host:8786"``); ``None`` starts a local cluster of
            *processes* workers that the pool owns and shuts down.

    ``with Pool(...) as pool:`` calls :meth:`terminate` when the block ends,
    as the standard library does: work still queued or running is stopped,
    and its results raise :class:`~shoal.PoolClosedError` (where the
    standard library's would never become ready).  To wait for pending work,
    collect its results inside the block, or call ``pool.close()`` and
    ``pool.join()`` before leaving it.

    ``map``, ``starmap``, ``imap`` and ``imap_unordered`` take
    ``progress=``: ``True`` draws a tqdm progress bar on stderr as results
    arrive, and a dict is passed to ``tqdm`` as keyword arguments
    (``progress={"desc": "resizing", "unit": "img"}``).
    """

    def __init__(
        self,
        processes: int | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: Iterable[Any] = (),
        maxtasksperchild: int | None = None,
        context: BaseContext | str | Any = None,  # Any: a shoal.Context too
        *,
        max_memory: int | None = None,
        task_timeout: float | None = None,
        shared: Any = NO_SHARED,
        worker_init: Callable[[], object] | None = None,
        worker_exit: Callable[[], Any] | None = None,
        backend: str | None = None,
        address: str | None = None,
    ) -> None:
        self._engine = make_engine(
            backend,
            address,
            processes,
            initializer,
            initargs,
            maxtasksperchild,
            context,
            max_memory=max_memory,
            task_timeout=task_timeout,
            remote_traceback=multiprocessing.pool.RemoteTraceback,  # type: ignore[attr-defined]  # not in typeshed
            shared=shared,
            worker_init=worker_init,
            worker_exit=worker_exit,
        )
        self._closed = False
        # A pool dropped or left open at exit is terminated, never joined
        # forever (the standard library's pool can hang there).
        self._finalizer = weakref.finalize(self, self._engine.terminate, False)

    # -- the standard library's API -------------------------------------------
    def apply(
        self,
        func: Callable[..., Any],
        args: Iterable[Any] = (),
        kwds: dict | None = None,
        *,
        task_timeout: float | None = None,
    ) -> Any:
        """Call ``func(*args, **kwds)`` in a worker and return its result."""
        return self.apply_async(func, args, kwds, task_timeout=task_timeout).get()

    def apply_async(
        self,
        func: Callable[..., Any],
        args: Iterable[Any] = (),
        kwds: dict | None = None,
        callback: Callable[[Any], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
        *,
        task_timeout: float | None = None,
    ) -> AsyncResult:
        """Run ``func(*args, **kwds)`` in a worker; return an :class:`AsyncResult`.

        *callback* / *error_callback* run in this (the parent) process with the
        result / the exception.
        """
        engine = self._engine
        if callback is not None or error_callback is not None:
            _check_callbacks(callback, error_callback)
        if task_timeout is not None:
            check_timeout(task_timeout)
        if kwds is None:
            kwds = _NO_KWARGS
        elif type(kwds) is not dict:
            raise TypeError(f"kwds must be a dict, got {type(kwds).__name__}")
        if type(args) is not tuple:
            args = _args_tuple(args)
        if not callable(func):
            _check_callable(func)
        # As in the standard library, a result keeps its pool alive (pool=).
        result = new_async_result(engine, callback, error_callback, self)
        result._task = engine.submit_call(func, args, kwds, result, task_timeout)
        if result.delivered:
            # Delivered before the line above ran: it could not break the
            # task <-> result cycle, which would keep a large result (its
            # shared memory) alive until the garbage collector runs.
            result._task = None
        return result

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        """Run ``fn(*args, **kwargs)`` in a worker; return a ``concurrent.futures.Future``."""

        return submit_future(self._engine, fn, args, kwargs)

    def map(
        self,
        func: Callable[[Any], Any],
        iterable: Iterable[Any],
        chunksize: int | None = None,
        *,
        task_timeout: float | None = None,
        progress: bool | dict = False,
    ) -> list:
        """``[func(x) for x in iterable]``, computed by the workers, in order.

        *progress*: ``True`` or a dict of tqdm options for a progress bar.
        Ctrl-C (KeyboardInterrupt) stops the map's running chunks at once:
        their workers are killed and replaced.
        """
        return self._map_blocking(func, iterable, chunksize, MAP, task_timeout, progress)

    def starmap(
        self,
        func: Callable[..., Any],
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = None,
        *,
        task_timeout: float | None = None,
        progress: bool | dict = False,
    ) -> list:
        """``[func(*args) for args in iterable]``, computed by the workers, in order.

        *progress*: ``True`` or a dict of tqdm options for a progress bar.
        """
        return self._map_blocking(func, iterable, chunksize, STARMAP, task_timeout, progress)

    def map_async(
        self,
        func: Callable[[Any], Any],
        iterable: Iterable[Any],
        chunksize: int | None = None,
        callback: Callable[[list[Any]], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
        *,
        task_timeout: float | None = None,
    ) -> MapResult:
        """Like :meth:`map`, returning a result object."""
        return self._map_async(func, iterable, chunksize, MAP, callback, error_callback, task_timeout)

    def starmap_async(
        self,
        func: Callable[..., Any],
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = None,
        callback: Callable[[list[Any]], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
        *,
        task_timeout: float | None = None,
    ) -> MapResult:
        """Like :meth:`starmap`, returning a result object."""
        return self._map_async(func, iterable, chunksize, STARMAP, callback, error_callback, task_timeout)

    def imap(
        self,
        func: Callable[[Any], Any],
        iterable: Iterable[Any],
        chunksize: int = 1,
        *,
        task_timeout: float | None = None,
        progress: bool | dict = False,
        buffersize: int | None = None,
    ) -> IMapIterator:
        """Lazy, ordered ``map``: reads *iterable* as results are consumed.

        At most *buffersize* tasks (default: enough to keep every worker
        busy) are submitted and not yet consumed, so an endless generator
        works and memory stays flat.  With the default, while the next
        result in order is still running, up to 1024 later results may wait
        for it, so one long task does not leave the other workers idle.
        *progress*: ``True`` or a dict of tqdm options for a progress bar.
        Ctrl-C while waiting for a result stops the iterator's running
        chunks at once.
        """
        return self._imap(func, iterable, chunksize, True, task_timeout, progress, buffersize)

    def imap_unordered(
        self,
        func: Callable[[Any], Any],
        iterable: Iterable[Any],
        chunksize: int = 1,
        *,
        task_timeout: float | None = None,
        progress: bool | dict = False,
        buffersize: int | None = None,
    ) -> IMapIterator:
        """Like :meth:`imap`, yielding results as they finish."""
        return self._imap(func, iterable, chunksize, False, task_timeout, progress, buffersize)

    def close(self) -> None:
        """Accept no more tasks; workers exit once the queued ones are done."""
        self._closed = True
        self._engine.close()

    def terminate(self) -> None:
        """Stop the workers now; unfinished tasks fail with PoolClosedError."""
        self._closed = True
        self._engine.terminate()

    def join(self) -> None:
        """Wait for the workers to exit (after :meth:`close` or :meth:`terminate`)."""
        if self._engine.state == "running":
            raise ValueError("Pool is still running: call close() or terminate() before join()")
        self._engine.join()

    def __enter__(self) -> Pool:
        """Use the pool in a ``with`` block, which terminates it at the end."""
        if self._engine.state in ("closed", "terminated"):
            self._engine._check_running()
        return self

    def __exit__(self, *exc_info: object) -> None:
        """:meth:`terminate`: unfinished tasks fail with PoolClosedError."""
        self.terminate()

    def __reduce__(self) -> NoReturn:
        raise NotImplementedError(
            "pool objects cannot be passed between processes or pickled; "
            "create the pool in the process that uses it"
        )

    def __repr__(self) -> str:
        return f"<shoal.Pool state={self._engine.state} pool_size={self._engine.processes}>"

    # -- shoal's additions ---------------------------------------------------
    def statistics(self) -> PoolStatistics:
        """Counters: tasks submitted / done / failed, workers replaced and why."""
        return self._engine.statistics()

    def worker_exit_results(self) -> list:
        """What ``worker_exit`` returned in each worker that has ended, in the
        order they ended: after :meth:`close` and :meth:`join`, one per worker
        the pool ran (replaced workers included).

        Raises the first exception a ``worker_exit`` raised, with the remote
        traceback as ``__cause__``.
        """
        return self._engine.worker_exit_results()

    @property
    def processes(self) -> int:
        """The number of worker processes."""
        return self._engine.processes

    # -- what the standard library's pool keeps, read by code in the wild ------
    @property
    def _processes(self) -> int:
        """The number of worker processes (``multiprocessing.Pool._processes``)."""
        return self._engine.processes

    @property
    def _pool(self) -> list[WorkerProcess]:
        """The live worker processes (a snapshot of ``multiprocessing.Pool._pool``)."""
        return self._engine.worker_processes()

    # -- internals -----------------------------------------------------------
    def _map_async(
        self,
        func: Callable[..., Any],
        iterable: Iterable[Any],
        chunksize: int | None,
        mode: int,
        callback: Callable[[list[Any]], object] | None,
        error_callback: Callable[[BaseException], object] | None,
        task_timeout: float | None,
    ) -> MapResult:
        engine = self._engine
        engine._check_running()
        _check_callable(func)
        _check_callbacks(callback, error_callback)
        check_timeout(task_timeout)
        # Slicing is only safe on real sequences (a dict has __getitem__ too).
        items = iterable if isinstance(iterable, (list, tuple, range)) else list(iterable)
        n = len(items)
        if chunksize is None:
            timed = engine.auto_chunksize(func) > 1  # measured, and short enough to batch
            bounds = _chunk_bounds(n, engine.map_chunksize(n, func), engine.processes, timed)
        elif not isinstance(chunksize, int) or isinstance(chunksize, bool) or chunksize < 1:
            raise ValueError(f"chunksize must be a positive int, got {chunksize!r}")
        else:
            bounds = [(start, min(start + chunksize, n)) for start in range(0, n, chunksize)]
        nchunks = len(bounds)
        result = MapResult(engine, nchunks, callback, error_callback)
        result._pool = self
        if nchunks:
            fn_ref = engine.function_ref(func)
            tasks: list = []
            queued_bytes = 0
            for i, (start, stop) in enumerate(bounds):
                chunk = list(items[start:stop])
                try:
                    task = engine.make_task(func, mode, chunk, result, i, task_timeout, fn_ref)
                except Exception as exc:
                    name_unpicklable_item(exc, chunk, start)
                    raise
                tasks.append(task)
                queued_bytes += len(task.data) + (SUBMIT_EARLY_BYTES if task.fds else 0)
                # Large chunks go to the workers as soon as they are
                # serialized, so copying the next one overlaps their work.
                if queued_bytes >= SUBMIT_EARLY_BYTES:
                    engine.submit_tasks(tasks)
                    tasks = []
                    queued_bytes = 0
            if tasks:
                engine.submit_tasks(tasks)
        return result

    def _map_blocking(
        self,
        func: Callable[..., Any],
        iterable: Iterable[Any],
        chunksize: int | None,
        mode: int,
        task_timeout: float | None,
        progress: bool | dict,
    ) -> list:
        if progress:
            if chunksize is None:
                n = len(iterable) if hasattr(iterable, "__len__") else None  # type: ignore[arg-type]  # it has one
                chunksize = self._engine.map_chunksize(n, func) if n else 1
            return list(self._imap(func, iterable, chunksize, True, task_timeout, progress, None, mode=mode))
        result = self._map_async(func, iterable, chunksize, mode, None, None, task_timeout)
        try:
            return result.get()
        except KeyboardInterrupt:
            # Ctrl-C: chunks not yet sent are dropped, running ones killed.
            self._engine.interrupt(
                concurrent.futures.CancelledError("the map was interrupted"), lambda sink: sink is result
            )
            raise

    def _imap(
        self,
        func: Callable[..., Any],
        iterable: Iterable[Any],
        chunksize: int,
        ordered: bool,
        task_timeout: float | None,
        progress: bool | dict,
        buffersize: int | None,
        mode: int = MAP,
    ) -> IMapIterator:
        engine = self._engine
        engine._check_running()
        _check_callable(func)
        check_timeout(task_timeout)
        if not isinstance(chunksize, int) or isinstance(chunksize, bool) or chunksize < 1:
            raise ValueError(f"chunksize must be a positive int, got {chunksize!r}")
        if buffersize is not None and (not isinstance(buffersize, int) or buffersize < 1):
            raise ValueError(f"buffersize must be a positive int or None, got {buffersize!r}")
        bar = progress_bar(progress, iterable)
        it = IMapIterator(
            engine,
            func,
            iterable,
            chunksize=chunksize,
            mode=mode,
            ordered=ordered,
            task_timeout=task_timeout,
            bound=buffersize,
            progress=bar,
        )
        it._pool = self
        return it


def _args_tuple(args: Iterable[Any]) -> tuple:
    try:
        return tuple(args)
    except TypeError:
        raise TypeError(
            f"args must be a tuple (or another iterable) of the function's arguments, got "
            f"{type(args).__name__} {args!r:.40}; for a single argument write args=({args!r:.40},)"
        ) from None


def _chunk_bounds(n: int, size: int, workers: int, timed: bool) -> list[tuple[int, int]]:
    """Where a map's chunks start and stop when the caller gave no chunksize.

    Every chunk is made (and pickled) before ``map`` returns, so its size
    cannot wait for a measurement.  A timed function gets chunks of *size*
    (the engine's, from its measured duration).  An untimed one gets one
    item first (the function's first measurement comes at once, and sizes
    the batches after it), then chunks of *size*, the standard library's
    guess, that shrink at the end as what remains is shared out among the
    workers (guided self-scheduling): however wrong the guess, the last
    chunks are small, so no worker is left with a long tail while the
    others idle.  (The chunks used to double from one item up to *size*:
    each doubling cost the workers a round trip to the scheduler, about
    2 ms of a first 10,000-item map that takes 11 ms.)
    """
    if timed or n <= workers:
        return [(start, min(start + size, n)) for start in range(0, n, size)]
    bounds = [(0, 1)]
    start = 1
    while start < n:
        step = max(1, min(size, -(-(n - start) // (2 * workers))))
        bounds.append((start, start + step))
        start += step
    return bounds


def _check_callable(func: object) -> None:
    if not callable(func):
        raise TypeError(f"the function to run must be callable, got {type(func).__name__} {func!r:.60}")


def _check_callbacks(callback: object, error_callback: object) -> None:
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable, got {type(callback).__name__}")
    if error_callback is not None and not callable(error_callback):
        raise TypeError(f"error_callback must be callable, got {type(error_callback).__name__}")


public(Pool)
