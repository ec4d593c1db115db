"""shoal's :class:`Future`: the result of ``ProcessPoolExecutor.submit``.

A ``concurrent.futures.Future`` that is also the engine's result sink (the
``ResultSink`` protocol: ``skip``, ``deliver``) and that allocates nothing
until somebody waits on it; its docstring says which lock guards its state.
:func:`submit_future` submits a call to an engine with a new future as its
sink (the executor, ``Pool`` internals, the joblib backend);
:func:`settle_future` settles any future, shoal's or not (actors).
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable
from concurrent.futures import _base
from typing import Any

from ._util import public

_PENDING = _base.PENDING
_RUNNING = _base.RUNNING
_CANCELLED = _base.CANCELLED
_CANCELLED_AND_NOTIFIED = _base.CANCELLED_AND_NOTIFIED
_FINISHED = _base.FINISHED
_CANCELLED_STATES = (_CANCELLED, _CANCELLED_AND_NOTIFIED)
_DONE_STATES = (_CANCELLED, _CANCELLED_AND_NOTIFIED, _FINISHED)

#: Guards the state of every shoal :class:`Future` that has no condition yet,
#: and the making of a future's condition.  A leaf lock: held for a few
#: attribute reads and writes, never while taking another lock, running user
#: code or a repr().  Re-entrant, as the standard library's condition is: a
#: finalizer the garbage collector runs inside it, or a signal handler, may
#: touch a future without deadlocking its own thread.
_UNWATCHED = threading.RLock()


class Future(concurrent.futures.Future):
    """A ``concurrent.futures.Future`` whose running task can be cancelled,
    and that costs next to nothing until somebody waits on it.

    Every public method behaves as the standard library's.  What differs is
    inside: the standard library's ``__init__`` gives each future a
    ``threading.Condition`` (an RLock, a deque, bound methods) and two lists,
    and every method takes the condition; for a pool of trivial tasks those
    allocations, the lock round trips and the garbage collector's work on
    thousands of live futures cost more than running the task.  Here
    ``__init__`` allocates nothing: class attributes stand in for the state,
    the result and the lists, and the condition (``_condition``, read by
    ``concurrent.futures.wait`` / ``as_completed`` and by code written for
    the standard library) is made on first use.  The future is also the
    engine's result sink (:meth:`skip`, :meth:`deliver`): no second object
    per task.

    Which lock guards the state, and why no wake-up is lost:

    * A future with a condition changes state only under its condition, and
      notifies it (and the ``wait`` / ``as_completed`` waiters) there, as the
      standard library does.
    * A future without one changes state under the module lock
      ``_UNWATCHED``, which also guards making the condition.  Nobody can be
      waiting on such a future (waiting needs the condition) so there is
      nobody to notify.  A state change takes ``cond or _UNWATCHED`` and, if
      it took ``_UNWATCHED`` but a condition appeared meanwhile, lets go and
      takes the condition instead: once a condition exists, every change goes
      through it.
    * A waiter makes the condition (under ``_UNWATCHED``), then reads the
      state under the condition before it waits.  A change made under
      ``_UNWATCHED`` was complete before the condition existed, so the waiter
      sees it; a later change is made under the condition, so it either comes
      before the waiter's read or finds the waiter in ``cond.wait()`` and
      wakes it.
    * ``_UNWATCHED`` is never held while taking a condition (``wait()``
      holds conditions while it makes others: the opposite order), and each
      lock is taken by a ``with`` statement, so Ctrl-C cannot leave it held.
      Nothing is allocated under it that need not be, so the garbage
      collector seldom runs there.

    Reads that need no lock take none: ``done()``, ``running()``,
    ``cancelled()`` and a ``result()`` of a finished future read one
    attribute, and a state change writes the result before the state (under
    the GIL each store is atomic and seen in program order).  ``result()``
    and ``exception()`` wait in a loop until the state changes or the
    timeout passes.

    Done-callbacks never run on the engine's scheduler thread (they go to its
    callback thread); one added after completion runs at once in the caller's
    thread, as in the standard library.
    """

    # What the standard library's __init__ allocates for each future; these
    # class attributes stand in until an instance needs its own.
    _state = _PENDING
    _result: Any = None
    _exception: BaseException | None = None
    _shoal_condition: threading.Condition | None = None
    _shoal_waiters: list[Any] | None = None
    _shoal_callbacks: list[Callable[[Any], object]] | None = None
    _shoal_engine: Any = None  # the Engine running the task
    _shoal_task: Any = None  # the task, while it may still be cancelled

    def __init__(self) -> None:
        """Initializes the future (allocating nothing). Should not be called by clients."""

    # -- what the standard library's methods and wait()/as_completed() read --
    @property
    def _condition(self) -> threading.Condition:
        cond = self._shoal_condition
        if cond is None:
            # Made outside the lock: see _UNWATCHED.
            made = threading.Condition()
            waiters: list[Any] = []
            with _UNWATCHED:
                cond = self._shoal_condition
                if cond is None:
                    if self._shoal_waiters is None:
                        self._shoal_waiters = waiters
                    cond = self._shoal_condition = made
        return cond

    @_condition.setter
    def _condition(self, cond: threading.Condition) -> None:
        self._shoal_condition = cond  # concurrent.futures.Future.__init__, called by a subclass

    @property
    def _waiters(self) -> list[Any]:
        # Waiters are added under the condition: make it, and the list with it.
        self._condition  # noqa: B018 - made for its side effect
        return self._shoal_waiters  # type: ignore[return-value]  # made with the condition

    @_waiters.setter
    def _waiters(self, waiters: list[Any]) -> None:
        self._shoal_waiters = waiters

    @property
    def _done_callbacks(self) -> list[Callable[[Any], object]]:
        callbacks = self._shoal_callbacks
        if callbacks is None:
            made: list[Callable[[Any], object]] = []
            with _UNWATCHED:
                callbacks = self._shoal_callbacks
                if callbacks is None:
                    callbacks = self._shoal_callbacks = made
        return callbacks

    @_done_callbacks.setter
    def _done_callbacks(self, callbacks: list[Callable[[Any], object]]) -> None:
        self._shoal_callbacks = callbacks

    # -- state changes (see the class docstring for the locking) -------------
    def _start(self) -> bool | None:
        """PENDING -> RUNNING: True.  CANCELLED -> CANCELLED_AND_NOTIFIED,
        waiters told: False.  Any other state: None, changing nothing."""
        while True:
            lock = self._shoal_condition or _UNWATCHED
            with lock:
                if lock is _UNWATCHED and self._shoal_condition is not None:
                    continue
                state = self._state
                if state == _PENDING:
                    self._state = _RUNNING
                    return True
                if state != _CANCELLED:
                    return None
                self._state = _CANCELLED_AND_NOTIFIED
                for waiter in self._shoal_waiters or ():
                    waiter.add_cancelled(self)
                # No notify_all: cancel() notified when it cancelled.
                return False

    def _invoke_callbacks(self) -> None:
        # Done-callbacks are user code: never on the scheduler thread, where
        # a slow or blocking one would stall every task.
        if not self._shoal_callbacks:
            return
        engine = self._shoal_engine
        if engine is not None and engine.is_scheduler_thread():
            engine.callbacks.call(self._run_callbacks)
        else:
            self._run_callbacks()

    def _run_callbacks(self) -> None:
        # Run once: the future keeps only its result, not the callbacks.
        callbacks, self._shoal_callbacks = self._shoal_callbacks, None
        for callback in callbacks or ():
            try:
                callback(self)
            except Exception:  # noqa: BLE001 - logged, as the standard library does
                _base.LOGGER.exception("exception calling callback for %r", self)

    def _wait(self, timeout: float | None) -> str:
        """Wait until the future is done or *timeout* seconds pass; the state then."""
        cond = self._condition
        with cond:
            state = self._state
            if timeout is None:
                while state not in _DONE_STATES:
                    cond.wait()
                    state = self._state
            else:
                deadline = time.monotonic() + timeout
                while state not in _DONE_STATES:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    cond.wait(remaining)
                    state = self._state
        return state

    # -- the public API (the standard library's) ------------------------------
    def cancel(self, running: bool = False) -> bool:
        """Cancel the task.

        As in the standard library a queued task is cancelled and ``True``
        returned.  With ``running=True`` a task already running is cancelled
        too: its worker is killed and replaced, and the future raises
        :class:`concurrent.futures.CancelledError`.
        """
        task = None
        while True:
            lock = self._shoal_condition or _UNWATCHED
            with lock:
                if lock is _UNWATCHED and self._shoal_condition is not None:
                    continue
                state = self._state
                if state in _CANCELLED_STATES:
                    return True
                if state == _FINISHED:
                    return False
                if state == _RUNNING:
                    task = self._shoal_task
                    if not running or task is None:
                        return False
                    # The steps of cancel() and set_running_or_notify_cancel()
                    # in one: waiters learn now, not when the task is sent.
                    self._state = _CANCELLED_AND_NOTIFIED
                    for waiter in self._shoal_waiters or ():
                        waiter.add_cancelled(self)
                else:
                    self._state = _CANCELLED
                if lock is not _UNWATCHED:
                    lock.notify_all()  # type: ignore[union-attr]  # a Condition here
                break
        self._invoke_callbacks()
        if task is not None:
            self._shoal_engine.cancel(
                task, concurrent.futures.CancelledError("the running task was cancelled")
            )
        return True

    def cancelled(self) -> bool:
        """Return True if the future was cancelled."""
        return self._state in _CANCELLED_STATES

    def running(self) -> bool:
        """Return True if the future is currently executing."""
        return self._state == _RUNNING

    def done(self) -> bool:
        """Return True if the future was cancelled or finished executing."""
        return self._state in _DONE_STATES

    def result(self, timeout: float | None = None) -> Any:
        """Return the call's result, or raise its exception.

        Raises:
            CancelledError: the future was cancelled.
            TimeoutError: not done within *timeout* seconds.
        """
        try:
            state = self._state
            if state != _FINISHED:
                state = self._wait(timeout)
            if state == _FINISHED:
                if self._exception:
                    raise self._exception
                return self._result
            if state in _CANCELLED_STATES:
                raise concurrent.futures.CancelledError()
            raise TimeoutError()
        finally:
            # Break a reference cycle with the exception in self._exception
            self = None  # type: ignore[assignment]

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """Return the call's exception (None if it returned).

        Raises:
            CancelledError: the future was cancelled.
            TimeoutError: not done within *timeout* seconds.
        """
        state = self._state
        if state != _FINISHED:
            state = self._wait(timeout)
        if state == _FINISHED:
            return self._exception
        if state in _CANCELLED_STATES:
            raise concurrent.futures.CancelledError()
        raise TimeoutError()

    def add_done_callback(self, fn: Callable[[Any], object]) -> None:
        """Call ``fn(future)`` when the future is done (at once if it is).

        Callbacks of a future the engine settles run on its callback thread."""
        made: list[Callable[[Any], object]] = []  # made outside the lock: see _UNWATCHED
        while True:
            lock = self._shoal_condition or _UNWATCHED
            with lock:
                if lock is _UNWATCHED and self._shoal_condition is not None:
                    continue
                if self._state not in _DONE_STATES:
                    callbacks = self._shoal_callbacks
                    if callbacks is None:
                        callbacks = self._shoal_callbacks = made
                    callbacks.append(fn)
                    return
                break
        try:
            fn(self)
        except Exception:  # noqa: BLE001 - logged, as the standard library does
            _base.LOGGER.exception("exception calling callback for %r", self)

    def set_running_or_notify_cancel(self) -> bool:
        """Mark the future running (True), or tell waiters it was cancelled
        (False).  For executors and tests, as in the standard library."""
        started = self._start()
        if started is None:
            _base.LOGGER.critical("Future %s in unexpected state: %s", id(self), self._state)
            raise RuntimeError("Future in unexpected state")
        return started

    def set_result(self, result: Any) -> None:
        """Set the result (for executors and tests)."""
        if not self.deliver(None, True, result):
            raise concurrent.futures.InvalidStateError(f"{self._state}: {self!r}")

    def set_exception(self, exception: BaseException | None) -> None:
        """Set the exception (for executors and tests)."""
        if not self.deliver(None, False, exception):
            raise concurrent.futures.InvalidStateError(f"{self._state}: {self!r}")

    # -- the engine's ResultSink protocol (scheduler thread) ----------------
    @property
    def future(self) -> Future:
        """The future a task settles: this one (what the engine looks for to
        cancel a task's future)."""
        return self

    def skip(self, task: Any) -> bool:
        """Before the task is sent: mark the future running, or say the
        task need not run (the future was cancelled, or is done)."""
        if self._state == _RUNNING:  # sent again after its worker died
            return False
        if self._start():
            return False
        self._shoal_task = None  # never delivered: break the task <-> future cycle here
        return True

    def deliver(self, task: Any, ok: bool, value: Any) -> bool:
        """The task's outcome (the engine's sink protocol; *task* None from
        set_result / set_exception): FINISHED with *value*, the result when
        *ok*, else the exception.  False, changing nothing, if the future is
        done already (cancelled meanwhile)."""
        self._shoal_task = None  # break the task <-> future cycle
        while True:
            lock = self._shoal_condition or _UNWATCHED
            with lock:
                if lock is _UNWATCHED and self._shoal_condition is not None:
                    continue  # a waiter made a condition meanwhile: it guards the state now
                if self._state in _DONE_STATES:
                    return False
                if ok:
                    self._result = value
                else:
                    self._exception = value
                self._state = _FINISHED
                if lock is not _UNWATCHED:
                    for waiter in self._shoal_waiters or ():
                        if ok:
                            waiter.add_result(self)
                        else:
                            waiter.add_exception(self)
                    lock.notify_all()  # type: ignore[union-attr]  # a Condition here
                break
        # No callback can be added once the state is final: read them unlocked.
        if self._shoal_callbacks:
            self._invoke_callbacks()
        return True


def settle_future(future: concurrent.futures.Future[Any], ok: bool, value: Any) -> None:
    """Set a future's result or exception unless it is done (or cancelled meanwhile)."""
    if isinstance(future, Future):
        future.deliver(None, ok, value)
        return
    if future.done():
        return
    try:
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)
    except concurrent.futures.InvalidStateError:
        pass  # cancelled meanwhile


def submit_future(
    engine: Any,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    task_timeout: float | None = None,
) -> Future:
    """Submit ``fn(*args, **kwargs)`` to *engine*; its outcome settles the
    returned :class:`Future` (the executor's ``submit``, ``Pool`` internals,
    the joblib backend)."""
    if not callable(fn):
        engine._check_running()  # a closed pool says so first
        raise TypeError(f"the function to run must be callable, got {type(fn).__name__}")
    future = Future()
    future._shoal_engine = engine
    # The future is the task's sink; submit_call checks the engine runs.
    future._shoal_task = engine.submit_call(fn, args, kwargs, future, task_timeout)
    if future._state in _DONE_STATES:
        future._shoal_task = None  # settled before the line above: break the cycle here
    return future


public(Future)

__all__ = ("Future", "settle_future", "submit_future")
