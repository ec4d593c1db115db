"""The engine contract: what every engine is, whatever runs its tasks.

The faces (``Pool``, ``ProcessPoolExecutor``, the result objects, the joblib
backend) talk to an :class:`Engine` and to nothing else of it, as httpx's
clients talk to a ``BaseTransport``.  Two engines implement it:
:class:`~._engine.LocalEngine` (worker processes on this machine, driven by
a :class:`~._scheduler.Scheduler`) and the Dask backend's ``DaskEngine``
(batches on a Dask cluster, :mod:`shoal._backends`).

What this class holds for both:

- the state machine and everything the caller side shares with the thread
  that drives the work (:class:`~._state.EngineState`, ``self.record``);
- the caller side's lifecycle: ``close`` / ``terminate`` / ``join`` /
  ``at_exit``, the running-state check every submit makes, the imap
  feeders' count, control requests (``cancel``, ``fail_sink``,
  ``interrupt``, ``cancel_pending_futures``), helper threads;
- the skeleton of the driving thread (``_run``): the subclass's ``_loop``,
  then, whatever happened, its error and exit paths, so that no caller is
  ever left waiting.

What a subclass implements (each an ``abc.abstractmethod`` below): the
submit path (``function_ref``, ``make_task``, ``submit_call``,
``submit_tasks``), sizing (``map_chunksize``, ``inflight_bound``,
``fn_key``), its view of workers (``statistics``, ``worker_processes``,
``worker_pids``), and the thread's steps (``_wake``, ``_loop``, ``_fail``,
``_fail_everything``, ``_cancel``, ``_interrupt``, ``_dispatch``,
``_kill_workers``, ``_close_resources``).  A subclass calls
``super().__init__`` first thing after its own argument checks
(``tests/test_layers.py`` fails otherwise), then starts its thread with
``_start_thread``.
"""

from __future__ import annotations

import abc
import os
import sys
import threading
import traceback
import weakref
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .._util import public
from ..exceptions import PoolClosedError, RemoteTraceback, ShoalError, WorkerStartError
from ._callbacks import CallbackThread
from ._state import BROKEN, CLOSE, RUN, TERMINATE, EngineState, Estimates, live_engines
from ._tasks import FailableSink, ResultSink, WorkerProcess, interrupt_task, with_traceback_type

#: Target duration of one map chunk once the function's speed is known.
CHUNK_SECONDS = 0.05


@dataclass(frozen=True)
class PoolStatistics:
    """A snapshot of a pool's counters (``pool.statistics()``)."""

    workers: int
    tasks_submitted: int
    tasks_pending: int
    tasks_running: int
    tasks_completed: int
    tasks_failed: int
    tasks_cancelled: int
    workers_started: int
    workers_replaced: int
    #: why workers were replaced: {"died": n, "timeout": n, "maxtasksperchild": n, ...}
    replaced_because: dict[str, int] = field(default_factory=dict)
    #: the scheduler's current estimate of one task's duration, seconds
    task_seconds_estimate: float | None = None


public(PoolStatistics)


def at_exit_all(engines: Iterable[Any]) -> None:
    """Stop *engines* at interpreter exit, each as its ``at_exit`` says."""
    for engine in list(engines):
        try:
            engine.at_exit()
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass


def cannot_start(what: str, exc: BaseException) -> str:
    """Why a pool could not start *what* (a worker, a thread), and what to do."""
    msg = f"shoal could not start {what} ({type(exc).__name__}: {exc})"
    if isinstance(exc, RuntimeError) and "shutdown" in str(exc):
        msg += (
            "; the interpreter is shutting down (the pool was first used from an atexit handler, a "
            "finalizer or a daemon thread at exit): use the pool before the program ends"
        )
    return msg


class Engine(abc.ABC):
    """A set of workers and the thread that drives them (see the module docstring)."""

    # What auto_chunksize aims for (a backend with dearer tasks sets its own).
    chunk_seconds: float = CHUNK_SECONDS
    max_batch: int = 2048

    def __init__(
        self,
        processes: int,
        *,
        task_timeout: float | None,
        graceful_exit: bool,
        remote_traceback: type[BaseException] = RemoteTraceback,
    ) -> None:
        #: What the caller side and the driving thread share (see _state).
        self.record = EngineState()
        # The record's containers, never rebound: one attribute lookup on
        # the per-task paths.
        self._pending = self.record.pending
        self._control = self.record.control
        self._processes = processes
        self.task_timeout = task_timeout
        self._graceful_exit = graceful_exit
        self._remote_traceback = remote_traceback
        #: Seconds per item, by fn_key, as measured (see Estimates).
        self._estimates = Estimates()
        #: What workers' worker_exit returned (or raised), in arrival order.
        self._exit_results: list[tuple[bool, Any]] = []
        self._helpers: weakref.WeakSet[threading.Thread] = weakref.WeakSet()
        self.callbacks = CallbackThread()
        self._finished = threading.Event()
        #: _finished.is_set(), as a plain attribute for the per-task path
        #: (set just before the event, by the one thread that sets it)
        self._ended = False
        self.owner_pid = os.getpid()
        self._submitted_n = 0
        self._thread: threading.Thread | None = None
        self._start_failure = ""
        #: The multiprocessing context workers start with (None: not this
        #: engine's to choose, as on a Dask cluster).
        self.context: Any = None

    # ------------------------------------------------------------------
    # the shared record, as the faces and result objects read it
    # ------------------------------------------------------------------
    @property
    def processes(self) -> int:
        return self._processes

    @property
    def state(self) -> str:
        return self.record.state

    @property
    def broken_error(self) -> BaseException | None:
        """Why the pool cannot run tasks any more (BROKEN), else None."""
        return self.record.broken_error

    @property
    def results_cond(self) -> threading.Condition:
        """The condition result objects wait on; notified when results arrive."""
        return self.record.results_cond

    @property
    def waiters(self) -> int:
        """How many threads wait on ``results_cond`` (the thread notifies only then)."""
        return self.record.waiters

    @waiters.setter
    def waiters(self, value: int) -> None:
        self.record.waiters = value

    # ------------------------------------------------------------------
    # caller side
    # ------------------------------------------------------------------
    def _check_running(self) -> None:
        if os.getpid() != self.owner_pid:
            raise PoolClosedError(
                f"this pool belongs to process {self.owner_pid}; a process started by fork inherits the "
                "object but not its workers: create a new pool in this process"
            )
        record = self.record
        if record.state == RUN:
            return
        if record.state == BROKEN and record.broken_error is not None:
            if self._thread is None:  # it never started
                raise WorkerStartError(self._start_failure) from record.broken_error
            raise WorkerStartError(
                f"the pool cannot run tasks: {record.broken_error}"
            ) from record.broken_error
        raise PoolClosedError(
            "Pool not running: it was closed or terminated; create a new pool to submit work"
        )

    def feeder_started(self) -> None:
        with self.record.results_cond:
            self.record.feeders += 1

    def feeder_finished(self) -> None:
        with self.record.results_cond:
            self.record.feeders -= 1
        self._wake()

    def auto_chunksize(self, fn: Any, cap: int | None = None) -> int:
        """Size of the next chunk of a lazily chunked map (``chunksize=None``).

        One item until this function's duration has been measured, then
        about ``chunk_seconds`` of work, at most *cap* items: a first guess
        never strands seconds of work in one chunk, where it would spoil
        the balance of the tail and make an interrupt wait for it.
        """
        est = self._estimate(fn)
        if est is None:
            return 1
        size = max(1, min(self.max_batch, int(self.chunk_seconds / max(est, 1e-9))))
        return size if cap is None else max(1, min(size, cap))

    def _estimate(self, fn: Any) -> float | None:
        """The measured duration of one call of *fn*, or None."""
        if fn is None:
            return None
        return self._estimates.get(self.fn_key(fn))

    def cancel(self, task: Any, exc: BaseException) -> None:
        """Fail *task* with *exc*: drop it if queued, stop it if running."""
        self._control.append(("cancel", task, exc))
        self._wake()

    def fail_sink(self, sink: FailableSink, exc: BaseException) -> None:
        """Fail a result object (a cancelled map) from the driving thread,
        so it cannot race a result being delivered.  Its tasks not yet sent
        are dropped at dispatch (``sink.skip``)."""
        self._control.append(("fail_sink", sink, exc))
        self._wake()

    def interrupt(self, exc: BaseException, match: Callable[[Any], bool] | None = None) -> None:
        """Stop work at once (Ctrl-C): every task whose sink satisfies
        *match* (every task, without it) fails with *exc*; queued ones are
        dropped and running ones stopped where the backend can.  Futures
        among them are cancelled."""
        self._control.append(("interrupt", match, exc))
        self._wake()

    def cancel_pending_futures(self) -> None:
        """Cancel every Future whose task has not been sent to a worker."""
        self._control.append(("cancel_futures", None, None))
        self._wake()

    def close(self) -> None:
        if self.record.state == RUN:
            self.record.state = CLOSE
        self._wake()
        # imap feeders waiting for room go on: after close() the input is
        # read to the end, as the standard library does.
        self.record.notify_waiters()

    def terminate(self, wait: bool = True, *, kill: bool = False) -> None:
        """Stop the workers and fail unfinished tasks; with *wait*, return
        once all is done (a garbage-collection finalizer must not wait: it
        may run while its thread holds a lock the driving thread needs).
        With *kill* the workers get SIGKILL at once, not SIGTERM first."""
        if os.getpid() != self.owner_pid:
            # A forked child inherited this object but not its threads or
            # workers: nothing here is its to stop.
            return
        if kill:
            self.record.kill_on_terminate = True
        if self.record.state in (RUN, CLOSE, BROKEN):
            self.record.state = TERMINATE
        self._wake()
        if not wait or self._thread is None or threading.current_thread() is self._thread:
            return
        self._finished.wait()
        self._thread.join()
        self.callbacks.stop()

    def join(self, timeout: float | None = None) -> bool:
        if threading.current_thread() is self._thread:
            raise RuntimeError("cannot join the pool from its own scheduler thread")
        if not self._finished.wait(timeout):
            return False
        if self._thread is not None:
            self._thread.join()
        # The driving thread ended after every feeder was done: they are exiting.
        for thread in list(self._helpers):
            if thread is not threading.current_thread():
                thread.join()
        self.callbacks.drain()
        self.callbacks.stop()
        return True

    def at_exit(self) -> None:
        """The interpreter is exiting with this pool open."""
        if os.getpid() != self.owner_pid:
            return
        # An uncaught Ctrl-C ends the program: nobody waits for queued work.
        interrupted = isinstance(getattr(sys, "last_value", None), KeyboardInterrupt)
        if self._graceful_exit and self.record.state in (RUN, CLOSE) and not interrupted:
            self.close()
            self.join()
        else:
            self.terminate()

    def worker_exit_results(self) -> list[Any]:
        """What the workers' ``worker_exit`` hooks returned so far, in the
        order the workers ended; the first exception a hook raised is raised
        instead (the others' results are then lost to the caller)."""
        results = list(self._exit_results)
        for ok, value in results:
            if not ok:
                raise value
        return [value for _ok, value in results]

    def start_thread(self, thread: threading.Thread, what: str) -> None:
        """Start a helper thread of this pool (an imap feeder); if Python
        refuses, raise WorkerStartError (a BrokenProcessPool) saying why."""
        try:
            thread.start()
        except RuntimeError as exc:
            raise WorkerStartError(cannot_start(what, exc)) from exc
        self._helpers.add(thread)  # join() waits for it: no shoal thread outlives shutdown

    def is_scheduler_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def descriptors(self) -> list[int]:
        """Descriptors this engine holds that no child process should keep."""
        return []

    def with_traceback_type(self, exc: BaseException) -> BaseException:
        """*exc*, a worker's exception, with the face's remote-traceback type
        as its cause (see :func:`._tasks.with_traceback_type`)."""
        return with_traceback_type(exc, self._remote_traceback)

    # ------------------------------------------------------------------
    # the submit path and the workers: each engine's own
    # ------------------------------------------------------------------
    @abc.abstractmethod
    def function_ref(self, fn: Any) -> Any:
        """What the tasks of *fn* refer to it by (cached where the engine can)."""

    @abc.abstractmethod
    def make_task(
        self,
        fn: Any,
        mode: int,
        payload: Any,
        sink: ResultSink,
        index: int = 0,
        timeout: float | None = None,
        fn_ref: Any = None,
    ) -> Any:
        """Serialize one task in the caller's thread (errors surface here)."""

    @abc.abstractmethod
    def submit_call(
        self, fn: Any, args: tuple, kwargs: dict, sink: ResultSink, timeout: float | None = None
    ) -> Any:
        """Serialize and queue ``fn(*args, **kwargs)`` (apply_async, submit)."""

    @abc.abstractmethod
    def submit_tasks(self, tasks: list[Any], from_feeder: bool = False) -> None:
        """Queue tasks made by :meth:`make_task`; an imap feeder that started
        before close() may go on submitting."""

    @abc.abstractmethod
    def map_chunksize(self, n: int, fn: Any = None) -> int:
        """Chunk size for a map of *n* items when the caller gave none."""

    @abc.abstractmethod
    def inflight_bound(self, fn: Any = None, chunksize: int = 1) -> int:
        """How many tasks an imap keeps submitted but unconsumed."""

    @abc.abstractmethod
    def fn_key(self, fn: Any) -> Hashable:
        """The key of *fn*'s entry in the duration estimates."""

    @abc.abstractmethod
    def statistics(self) -> PoolStatistics: ...

    @abc.abstractmethod
    def worker_processes(self) -> list[WorkerProcess]: ...

    @property
    @abc.abstractmethod
    def worker_pids(self) -> list[int]: ...

    # ------------------------------------------------------------------
    # the driving thread
    # ------------------------------------------------------------------
    def _start_thread(self, name: str) -> None:
        """Start the driving thread (``_run``)."""
        thread = threading.Thread(target=self._run, name=name, daemon=True)
        thread.start()
        self._thread = thread

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - never leave callers waiting
            self.record.broken_error = exc
            self.record.state = BROKEN
            traceback.print_exc()
            self._fail_everything(ShoalError(f"the pool's scheduler failed: {exc!r}; this is a bug in shoal"))
            self._kill_workers(graceful=False)
        finally:
            live_engines.discard(self)  # its descriptors are about to close
            self._close_resources()
            self._ended = True
            self._finished.set()
            # A caller that queued a task before seeing _finished set gets it
            # failed here; one that queues after sees _finished (_reject).
            while True:
                try:
                    # (not `while self._pending`: a caller's _reject may take
                    # the last one between the test and the popleft)
                    task = self._pending.popleft()
                except IndexError:
                    break
                self._fail(task, PoolClosedError("the pool was terminated before this task ran"))
            self.record.notify_waiters()
            # No shoal thread outlives its pool, even one never joined.
            self.callbacks.stop(wait=False)

    def _notify(self) -> None:
        self.record.notify_waiters()

    def _handle_control(self, what: str, obj: Any, exc: Any) -> None:
        """A caller's control request, run on the driving thread."""
        if what == "cancel":
            self._cancel(obj, exc)
        elif what == "interrupt":
            self._interrupt(obj, exc)
        elif what == "cancel_futures":
            # As the standard library's executor, whose workers already hold
            # the calls it queued for them: first hand out what the workers
            # have room for (those run), then cancel what is still queued.
            self._dispatch()
            # Callers append to _pending concurrently: never iterate it live
            # or rebind it.  Cancelled futures are skipped at dispatch.
            for t in list(self._pending):
                future = getattr(t.sink, "future", None)
                if future is not None:
                    future.cancel()
        elif what == "fail_sink":
            sink = obj
            if not sink.delivered:
                sink.deliver(None, False, exc)
                self._notify()

    _interrupt_task = staticmethod(interrupt_task)

    @abc.abstractmethod
    def _wake(self) -> None:
        """Tell the driving thread that something changed."""

    @abc.abstractmethod
    def _loop(self) -> None:
        """The driving thread's work; returns when the engine is done."""

    @abc.abstractmethod
    def _dispatch(self) -> None:
        """Hand queued tasks to the workers that have room."""

    @abc.abstractmethod
    def _cancel(self, task: Any, exc: BaseException) -> None:
        """Fail *task* with *exc* (a control request, on the driving thread)."""

    @abc.abstractmethod
    def _interrupt(self, match: Callable[[Any], bool] | None, exc: BaseException) -> None:
        """Fail every task whose sink satisfies *match* (on the driving thread)."""

    @abc.abstractmethod
    def _fail(self, task: Any, exc: BaseException, *, cancelled: bool = False) -> None:
        """Deliver *exc* as *task*'s outcome."""

    @abc.abstractmethod
    def _fail_everything(self, exc: BaseException) -> None:
        """Fail every unfinished task with *exc*."""

    @abc.abstractmethod
    def _kill_workers(self, graceful: bool) -> None:
        """Stop the workers this engine owns."""

    @abc.abstractmethod
    def _close_resources(self) -> None:
        """Release what the engine holds; the driving thread's last step."""


__all__ = ("CHUNK_SECONDS", "Engine", "PoolStatistics", "at_exit_all", "cannot_start")
