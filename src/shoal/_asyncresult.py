"""The result objects the pool hands out, and the lazy feeder behind imap.

Each result object is a *sink* (the engine's ``ResultSink`` protocol): the
engine's scheduler thread calls ``deliver(task, ok, value)`` once per task (a
call, or a chunk of a map) and ``skip(task)`` before sending a task, to drop
work nobody wants any more.
Sinks never block the scheduler: user callbacks are handed to the engine's
callback thread, and readiness is published under the engine's
``results_cond`` so waiters wake.

As in the standard library, a result with a callback becomes ready only after
the callback has run, so ``get()`` and ``join()`` observe its effects.

:class:`~shoal._future.Future` (``submit``, in :mod:`shoal._future`) is
its own sink too, but waiters wait on the future's own condition, made only
when somebody waits, not on ``results_cond``.

imap / imap_unordered (lazy input)::

    caller                 feeder thread (one per imap call)      scheduler
    ------                 ---------------------------------      ---------
    next() waits on        pulls items from the input, pickles     runs chunks,
    results_cond     ◄──   chunks, submits while fewer than        delivers to
    consumes a result      `bound` chunks are unconsumed;          _IMapState
    (frees one slot) ──►   stops at the end of the input, on an
                           error from it, or when the iterator
                           is dropped (a weakref finalizer)
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import threading
import time
import types
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from . import _native
from ._serialization import name_unpicklable_item
from ._util import public
from .exceptions import PoolClosedError, ShoalError


class AsyncResult(_native.ResultSlot):
    """The result of ``apply_async`` (the standard library's ``AsyncResult``).

    ``AsyncResult(engine, callback=None, error_callback=None, pool=None)``.
    Its state, the methods the engine's scheduler thread calls (``deliver``,
    ``skip``), ``ready()`` and ``get()`` of a finished result are C
    (``src/native/result.c``): one is made per task, and a plain one (no
    callbacks) is not tracked by the garbage collector while it waits.
    """

    __slots__ = ("__weakref__",)

    # As the standard library's: ``AsyncResult[int]`` in annotations.
    __class_getitem__: Any = classmethod(types.GenericAlias)

    if TYPE_CHECKING:  # the C base's fields

        def __init__(
            self,
            engine: Any,
            callback: Callable[[Any], object] | None = None,
            error_callback: Callable[[BaseException], object] | None = None,
            pool: object = None,
        ) -> None: ...

        _engine: Any
        _callback: Callable[[Any], object] | None
        _error_callback: Callable[[BaseException], object] | None
        _pool: object
        _task: Any
        _value: Any
        _ready: bool
        _success: bool
        delivered: bool

        def deliver(self, task: Any, ok: bool, value: Any) -> None: ...
        def skip(self, task: Any) -> bool: ...
        def ready(self) -> bool: ...
        def get(self, timeout: float | None = None) -> Any:
            """Return the result, or raise the task's exception.

            Raises:
                multiprocessing.TimeoutError: not ready within *timeout* seconds.
            """

    def _finish(self, ok: bool, value: Any) -> None:
        self.delivered = True
        self._success = ok
        self._value = value
        cb = self._callback if ok else self._error_callback
        # A finished result keeps only its value, not the callbacks.
        self._callback = self._error_callback = None
        if cb is None:
            self._ready = True
            self._pool = None
        else:
            self._engine.callbacks.call(self._run_callback, cb, value)

    def _run_callback(self, cb: Callable[[Any], object], value: Any) -> None:
        try:
            cb(value)
        finally:
            self._ready = True
            self._pool = None
            with self._engine.results_cond:
                self._engine.results_cond.notify_all()

    # -- public API (and ready(), in the C base) ---------------------------------
    def successful(self) -> bool:
        """Whether the task returned without raising; ValueError if not ready."""
        if not self._ready:
            raise ValueError(f"{self!r} not ready")
        return bool(self._success)

    def wait(self, timeout: float | None = None) -> None:
        """Wait until the result is ready or *timeout* seconds pass."""
        engine = self._engine  # read first: a plain result drops it once ready
        if self._ready:
            return
        _wait_for(engine, lambda: self._ready, timeout)

    def _get(self, timeout: float | None) -> Any:
        """get() when the value is not there at once (the C base's get)."""
        if not self._ready:
            self.wait(timeout)
            if not self._ready:
                raise multiprocessing.TimeoutError(f"the result was not ready within {timeout} seconds")
        if self._success:
            return self._value
        raise self._value

    def cancel(self) -> bool:
        """Cancel the task: drop it if queued, kill its worker if running.

        The result then raises :class:`concurrent.futures.CancelledError`.
        Returns False if the task had already finished.
        """
        # Read before `delivered`: the scheduler thread may deliver meanwhile,
        # and a delivered plain result lets go of its task and its engine.
        engine, task = self._engine, self._task
        if self.delivered or task is None:
            return False
        engine.cancel(task, concurrent.futures.CancelledError("the task was cancelled"))
        return True

    def __repr__(self) -> str:
        state = "ready" if self._ready else "pending"
        return f"<{type(self).__name__} {state}>"


ApplyResult = AsyncResult
_native.result_type(AsyncResult)
#: ``new_async_result(engine, callback, error_callback, pool)``: the same as
#: ``AsyncResult(engine, callback, error_callback, pool)``, for apply_async's
#: per-task path (no argument tuple, no ``__init__`` dispatch)
new_async_result: Callable[[Any, Any, Any, Any], AsyncResult] = _native.new_result


class MapResult(AsyncResult):
    """The result of ``map_async`` / ``starmap_async``: a list once every chunk is in."""

    __slots__ = ("_chunks", "_left")

    def __init__(
        self,
        engine: Any,
        nchunks: int,
        callback: Callable[[Any], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
    ) -> None:
        super().__init__(engine, callback, error_callback)
        self._chunks: list[Any] = [None] * nchunks
        self._left = nchunks
        if nchunks == 0:
            # As in the standard library: ready at once, no callback.
            self.delivered = True
            self._success = True
            self._value = []
            self._ready = True

    def deliver(self, task: Any, ok: bool, value: Any) -> None:
        if self.delivered:
            return
        if not ok:
            # The first failure decides; chunks not yet sent are dropped
            # (skip), and results of the others are ignored.
            self._finish(False, value)
            return
        self._chunks[task.index] = value
        self._left -= 1
        if self._left == 0:
            out = []
            for chunk in self._chunks:
                out.extend(chunk)
            self._chunks = []
            self._finish(True, out)

    def cancel(self) -> bool:
        """Fail the map with CancelledError; chunks not yet sent are dropped.

        Chunks already running finish and are ignored.  Returns False if the
        map had already finished."""
        if self.delivered:
            return False
        self._engine.fail_sink(self, concurrent.futures.CancelledError("the map was cancelled"))
        return True


def _wait_for(engine: Any, predicate: Callable[[], bool], timeout: float | None) -> bool:
    """Wait on the engine's results condition until predicate() is true."""
    cond = engine.results_cond
    deadline = None if timeout is None else time.monotonic() + timeout
    with cond:
        engine.waiters += 1
        try:
            while not predicate():
                if deadline is None:
                    # A bounded wait keeps us responsive even if a wake-up is
                    # ever missed; Ctrl-C interrupts it at once.
                    cond.wait(1.0)
                else:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    cond.wait(remaining)
        finally:
            engine.waiters -= 1
    return True


class _IMapState:
    """Shared by an imap iterator, its feeder thread and the scheduler."""

    def __init__(self, engine: Any, ordered: bool) -> None:
        self.engine = engine
        self.ordered = ordered
        self.results: dict[int, tuple[bool, Any]] = {}
        self.unordered: deque[tuple[bool, Any]] = deque()
        self.next_index = 0
        self.submitted = 0  # chunks submitted
        self.finished = 0  # chunks whose outcome arrived
        self.consumed = 0  # chunks consumed by the iterator
        self.total: int | None = None  # chunks in all, once the input is exhausted
        self.input_error: BaseException | None = None
        self.abandoned = False
        #: The input not yet read when the feeder stopped at shutdown
        #: (``stop_at_close``); the iterator looks at it once it is done.
        self.unread: Iterator[Any] | None = None

    # the engine's ResultSink protocol
    def skip(self, task: Any) -> bool:
        return self.abandoned

    def deliver(self, task: Any, ok: bool, value: Any) -> None:
        if self.ordered:
            self.results[task.index] = (ok, value)
        else:
            self.unordered.append((ok, value))
        self.finished += 1


class IMapIterator:
    """The iterator returned by ``imap`` / ``imap_unordered``.

    Items (or, with ``chunksize > 1``, chunks) come back in input order
    (``imap``) or as they finish (``imap_unordered``).  An item whose task
    raised raises from ``next()``; iteration can go on after it.
    """

    def __init__(
        self,
        engine: Any,
        fn: Callable[..., Any],
        iterable: Iterable[Any],
        *,
        chunksize: int | None,
        mode: int,
        ordered: bool,
        task_timeout: float | None,
        bound: int | None,
        progress: Any = None,
        max_chunksize: int | None = None,
        stop_at_close: bool = False,
    ) -> None:
        # stop_at_close: once the pool is closed (shutdown), read no more
        # input; an iterator that then has input left raises RuntimeError
        # when it gets there (Executor.map with buffersize, as in 3.14).
        # Otherwise the input is read to its end after close, as Pool.imap
        # does.
        self._state = _IMapState(engine, ordered)
        self._engine = engine
        self._pool: object = None  # set by the pool: the iterator keeps it alive
        self._pending_items: deque[Any] = deque()
        self._progress = progress
        state = self._state
        feeder = threading.Thread(
            target=_feed,
            args=(state, fn, iter(iterable), chunksize, mode, task_timeout, bound, max_chunksize),
            kwargs={"stop_at_close": stop_at_close},
            name="shoal-imap-feeder",
            daemon=True,
        )
        engine.feeder_started()
        try:
            engine.start_thread(feeder, "the thread that feeds this map's input to the workers")
        except BaseException:
            engine.feeder_finished()  # or close() + join() would wait for it forever
            raise
        weakref.finalize(self, _abandon, state)

    def __iter__(self) -> IMapIterator:
        return self

    def __next__(self) -> Any:
        return self.next()

    def next(self, timeout: float | None = None) -> Any:
        """The next result; raises ``multiprocessing.TimeoutError`` after *timeout*."""
        if self._pending_items:
            return self._take_item()
        state = self._state
        engine = self._engine
        if state.ordered:

            def ready() -> bool:
                return state.next_index in state.results or _input_done(state) or engine.state == "terminated"
        else:

            def ready() -> bool:
                return bool(state.unordered) or _input_done(state) or engine.state == "terminated"

        try:
            if not ready() and not _wait_for(engine, ready, timeout):
                raise multiprocessing.TimeoutError(f"no result within {timeout} seconds")
        except KeyboardInterrupt:
            # Ctrl-C: chunks not yet sent are dropped, running ones killed.
            _abandon(state)
            engine.interrupt(
                concurrent.futures.CancelledError("interrupted"),
                lambda sink: getattr(sink, "state", None) is state,
            )
            self._close_progress()
            raise
        if state.ordered and state.next_index in state.results:
            ok, value = state.results.pop(state.next_index)
            state.next_index += 1
        elif not state.ordered and state.unordered:
            ok, value = state.unordered.popleft()
        else:
            # Everything submitted has been consumed.
            if state.input_error is not None:
                self._close_progress()
                err, state.input_error = state.input_error, None
                state.total = state.consumed  # raise it once, then stop
                raise err
            self._close_progress()
            if engine.state == "terminated" and state.total is None:
                raise PoolClosedError("the pool was terminated while this imap was running")
            if state.unread is not None:
                unread, state.unread = state.unread, None
                try:
                    next(unread)
                except StopIteration:
                    pass
                else:
                    raise RuntimeError(
                        "cannot schedule new futures after shutdown: the executor was shut down "
                        "before this map read all of its input"
                    )
            raise StopIteration
        with engine.results_cond:
            state.consumed += 1
            engine.results_cond.notify_all()
        if self._progress is not None:
            self._progress.update(len(value) if ok and isinstance(value, _Chunk) else 1)
        if not ok:
            raise value
        if isinstance(value, _Chunk):
            self._pending_items.extend(value)
            return self._take_item()
        return value

    def _take_item(self) -> Any:
        return self._pending_items.popleft()

    def _close_progress(self) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None

    def close(self) -> None:
        """Stop reading the input and drop chunks not yet sent."""
        _abandon(self._state)
        self._close_progress()


class _Chunk(list[Any]):
    """Results of a chunk of several items (a list with a marker type)."""


def _input_done(state: _IMapState) -> bool:
    return state.total is not None and state.consumed >= state.total


def _abandon(state: _IMapState) -> None:
    engine = state.engine
    state.abandoned = True
    try:
        with engine.results_cond:
            engine.results_cond.notify_all()
    except Exception:  # noqa: BLE001 - at interpreter shutdown
        pass


def _feed(
    state: _IMapState,
    fn: Callable[..., Any],
    iterator: Iterator[Any],
    chunksize: int | None,
    mode: int,
    task_timeout: float | None,
    bound: int | None,
    max_chunksize: int | None,
    stop_at_close: bool = False,
) -> None:
    """Submit the input in chunks; *chunksize* None sizes each chunk by the
    function's measured duration (Engine.auto_chunksize)."""
    engine = state.engine
    cond = engine.results_cond
    index = 0  # chunks made
    items = 0  # input items in them
    fn_ref = None
    auto = chunksize is None
    sink = _Unwrap(state) if chunksize == 1 else _Chunked(state)
    try:
        while not state.abandoned:
            if auto:
                chunksize = engine.auto_chunksize(fn, max_chunksize)
            limit = _limit(engine, bound, fn, chunksize)
            with cond:
                while (
                    (room := _room(state, limit, bound is None)) <= 0
                    and not state.abandoned
                    and engine.state != "terminated"
                ):
                    engine.waiters += 1
                    try:
                        cond.wait(1.0)
                    finally:
                        engine.waiters -= 1
                    limit = _limit(engine, bound, fn, chunksize)
            if state.abandoned or engine.state == "terminated":
                break
            if stop_at_close and engine.state == "closed":
                state.unread = iterator
                break
            tasks = []
            try:
                for _ in range(max(1, min(room, 256))):
                    if chunksize == 1:
                        payload = [next(iterator)]
                    else:
                        payload = []
                        for _ in range(chunksize):  # type: ignore[arg-type]  # an int: None only when auto, set above
                            try:
                                payload.append(next(iterator))
                            except StopIteration:
                                break
                        if not payload:
                            raise StopIteration
                    if fn_ref is None:
                        fn_ref = engine.function_ref(fn)
                    try:
                        tasks.append(engine.make_task(fn, mode, payload, sink, index, task_timeout, fn_ref))
                    except Exception as exc:
                        name_unpicklable_item(exc, payload, items)
                        raise
                    index += 1
                    items += len(payload)
            except StopIteration:
                _submit(engine, state, tasks)
                break
            except BaseException as exc:  # noqa: BLE001 - the input (or pickling) failed: report in order
                _submit(engine, state, tasks)
                state.input_error = exc
                break
            _submit(engine, state, tasks)
    except ShoalError as exc:
        # The pool was terminated or broke under us: the items not submitted
        # will never run, and next() says so after the ones that did.
        state.input_error = exc
    finally:
        with cond:
            state.total = state.submitted
            cond.notify_all()
        engine.feeder_finished()


#: How many results an ordered imap (default window) may hold behind a
#: result still being computed: the tasks after a long one go on running on
#: the other workers, as far as this.
STUCK_AHEAD = 1024


def _room(state: _IMapState, limit: int, default_window: bool) -> int:
    """How many more tasks the feeder may submit now.

    At most *limit* submitted and not yet consumed.  With the default window,
    an ordered imap whose next result is still being computed may go further,
    so that a long task does not leave the other workers idle: *limit* tasks
    unfinished, and at most STUCK_AHEAD results waiting behind the long one
    (the caller cannot consume them yet).  A window the caller chose
    (``buffersize``) is kept exactly.
    """
    ahead = state.submitted - state.consumed
    room = limit - ahead
    if room > 0 or not default_window or not state.ordered or state.next_index in state.results:
        return room
    return min(limit - (state.submitted - state.finished), max(limit, STUCK_AHEAD) - ahead)


def _limit(engine: Any, bound: int | None, fn: Callable[..., Any], chunksize: int | None) -> int:
    """How many tasks may be submitted and not yet consumed.  Once the pool
    is closed, no limit: close() + join() must finish the whole input even
    if nobody reads the results, as with the standard library."""
    if engine.state != "running":
        return 1 << 62
    return bound or engine.inflight_bound(fn, chunksize)


def _submit(engine: Any, state: _IMapState, tasks: list[Any]) -> None:
    if not tasks:
        return
    with engine.results_cond:
        state.submitted += len(tasks)
    engine.submit_tasks(tasks, from_feeder=True)


class _Unwrap:
    """Sink for one-item tasks: the worker returns [value]; deliver the value."""

    __slots__ = ("state",)

    def __init__(self, state: _IMapState) -> None:
        self.state = state

    def skip(self, task: Any) -> bool:
        return self.state.abandoned

    def deliver(self, task: Any, ok: bool, value: Any) -> None:
        if ok:
            value = value[0]
        self.state.deliver(task, ok, value)


class _Chunked(_Unwrap):
    """Sink for chunks of several items: deliver them as one _Chunk."""

    __slots__ = ()

    def deliver(self, task: Any, ok: bool, value: Any) -> None:
        self.state.deliver(task, ok, _Chunk(value) if ok else value)


public(AsyncResult)
public(MapResult)
public(IMapIterator)

__all__ = ("ApplyResult", "AsyncResult", "IMapIterator", "MapResult")
