"""The pool engine: one scheduler thread that owns every worker.

Data flow::

    caller threads            scheduler thread                     workers
    --------------            ----------------                     -------
    submit(): pickle args ─┐
      (errors raise here)  │  pending (deque of _Task)
      append, wake if      └──────────► dispatch: a batch to each     run tasks,
      the scheduler sleeps              worker holding < 2 batches ─► write status
                                        (non-blocking writes)         block, send
                             select() on: worker sockets,             results
                               worker sentinels, wake-up pipe  ◄────  (batched)
                             results → sink._deliver() ───────► result objects
                                                                (AsyncResult,
                             sentinel → reap: the task that was   Future, map/imap)
                               running fails with                       │
                               WorkerDiedError, tasks not yet           ▼
                               started go back to pending,      callback thread
                               a replacement worker starts      runs user callbacks

Ownership: the scheduler thread alone reads and writes worker channels,
starts replacement workers, and mutates per-worker state.  Callers touch only
the ``pending`` deque (thread-safe), the control queue and the wake-up pipe.
Nothing the scheduler does waits on user code: callbacks run on their own
thread, and sockets are written without blocking, so a worker that stops
reading can never wedge the scheduler.

Batching: the scheduler keeps an estimate of the task duration (an EWMA of
what workers report) and sends each worker about BATCH_SECONDS of work per
message, never more than a fair share of what is pending, and lets a worker
hold at most two batches, so an idle worker always pulls the next one and a
slow task strands at most one batch behind it.  A lone task goes at once.

Crash attribution: each worker writes the id of the task it is running (and
when it started, and the last task it finished) into its slot of a shared
*status block* before running it.  When a worker's sentinel fires the
scheduler drains its socket, then reads the slot: the running task fails
(WorkerDiedError, or TaskTimeoutError / CancelledError when the scheduler
killed it on purpose); tasks the worker never started go to other workers;
tasks it finished whose results were still inside it run again (results are
sent at least every 1 ms of work, and after every task once a function has
killed a worker, so this is short work, once).  The same slot gives per-task
time limits their start time.  Under fork, a new worker first closes the
descriptors of every engine in this process that it inherited.

Shutdown: close() lets pending work finish, then the scheduler sends STOP to
each worker and exits when all have exited; terminate() fails what is
unfinished, sends SIGTERM, then SIGKILL after TERMINATE_GRACE seconds.  When
the scheduler ends, the callback thread ends once its queue is empty, and
join() waits for both and for the imap feeders: after it no shoal thread
and no worker of this pool remains.  The callback thread lets go of each
callback as soon as it ran (a future it held would keep its traceback's
frames, and so perhaps a dropped pool, alive).

Start failures: if the first workers or the scheduler thread cannot start
(Python refuses new threads and fork while the interpreter shuts down), the
workers already started are killed; a Pool raises the error, an executor
(``defer_start_errors``) is born broken and every submit raises
WorkerStartError, a BrokenProcessPool.  A helper thread started later (an
imap feeder) that cannot start fails only its call, the same way; a
callback thread that cannot start means callbacks run on the scheduler.
Nothing then waits for a thread that never ran.

Interrupts: workers ignore SIGINT, so Ctrl-C is the caller's.  A face that
catches KeyboardInterrupt asks for interrupt(): the scheduler fails the
matching tasks (a map's, or all) with CancelledError, drops the queued ones
and kills the workers running the others, as for a cancelled task; a with
block or the exit of an interrupted program then has nothing to wait for.
A lazily chunked map (auto_chunksize) sends one item per chunk until the
function has been timed, so no chunk holds seconds of unmeasured work.

Per-worker hooks and the shared object: the engine pickles the pool's
``shared=`` object once (not under fork, where each worker inherits it), and
each worker's hello message carries it, its large buffers as memfds that
every worker maps.  A worker that ends normally (STOP, maxtasksperchild,
max_memory) runs ``worker_exit`` and sends what it returned (EXITED); the
scheduler keeps these for :meth:`Engine.worker_exit_results`.
"""

from __future__ import annotations

import itertools
import mmap
import multiprocessing
import multiprocessing.connection
import multiprocessing.util  # its atexit handler joins children; ours must run first
import os
import pickle
import selectors
import signal
import sys
import threading
import time
import traceback
import types
import weakref
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import cloudpickle

from .._ipc._channel import Channel
from .._ipc._fdpass import _state as _fd_state
from .._ipc._fdpass import collecting_fds
from .._serialization import dumps, loads_with, unpack_exception
from .._shm._segment import create_fd
from .._shm._warm import WarmSegments
from ..exceptions import (
    PoolClosedError,
    RemoteTraceback,
    SerializationError,
    ShoalError,
    TaskTimeoutError,
    WorkerDiedError,
    WorkerStartError,
    serialization_error,
)
from . import _local, _worker
from ._worker import CALL, CALL_KW, STATUS, STATUS_SLOT, WorkerConfig

#: Work per message when tasks are short: large enough that per-message costs
#: (~50 µs) vanish, small enough that the tail of a job stays balanced.
BATCH_SECONDS = 0.004
#: Upper bound on tasks per message whatever the estimate says.
MAX_BATCH = 2048
#: Target duration of one map chunk once the function's speed is known.
CHUNK_SECONDS = 0.05
#: How many batches a worker may hold (one running, one ready to start).
CREDIT = 2
#: Functions a worker keeps unpickled; older ones are forgotten.
FN_CACHE = 128
#: A finished task whose worker died outside any task (while sending its
#: result, most likely) runs again at most this many times, then fails.
MAX_REQUEUES = 3
#: Seconds between SIGTERM and SIGKILL in terminate().
TERMINATE_GRACE = 1.0
#: Workers that die before becoming ready this many times in a row mean the
#: pool cannot start (a broken __main__, an import error under spawn).
MAX_START_FAILURES = 3
#: How often time limits are checked while a timed task runs.
TIMEOUT_TICK = 0.02

_RUN, _CLOSE, _TERMINATE, _BROKEN = "running", "closed", "terminated", "broken"

#: kill_reason values of tasks whose caller already got an error: a result
#: that still arrives for them is dropped.
_ALREADY_FAILED = ("cancelled", "abandoned")


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


class _Task:
    """One unit of work: a call, or a chunk of a map."""

    __slots__ = (
        "data", "fds", "fn_id", "fn_ref", "id", "index", "kill_reason", "mode", "n", "requeues", "sink", "timeout",
    )

    def __init__(self, tid, fn_id, fn_ref, mode, data, fds, sink, index, timeout, n):
        self.id = tid
        self.n = n  # items: 1 for a call, the chunk's length for a map chunk
        self.fn_id = fn_id
        self.fn_ref = fn_ref  # (fn, fn_bytes) for the first send to a worker
        self.mode = mode
        self.data = data
        self.fds = fds
        self.sink = sink
        self.index = index
        self.timeout = timeout
        self.kill_reason: str | None = None
        self.requeues = 0

    def close_fds(self, registry: set[int]) -> None:
        """Close the task's shared-memory descriptors and drop them from the
        engine's *registry* of task descriptors."""
        registry.difference_update(self.fds)
        for fd in self.fds:
            os.close(fd)
        self.fds = ()


class _Worker:
    """The scheduler's view of one worker process."""

    __slots__ = (
        "batches", "channel", "eof", "fns", "inflight", "kill_reason", "pid", "proc", "ready",
        "retire_reason", "sent", "sentinel", "slot", "writing",
    )

    def __init__(self, proc, channel, slot):
        self.proc = proc
        self.pid = proc.pid
        self.channel = channel
        self.sentinel = proc.sentinel
        self.slot = slot
        self.inflight: deque[_Task] = deque()
        # id of the last task of each batch sent and not yet answered in full
        self.batches: deque[int] = deque()
        self.fns: OrderedDict[int, None] = OrderedDict()
        self.ready = False
        self.eof = False
        self.writing = False
        self.sent = 0
        self.retire_reason: str | None = None
        self.kill_reason: str | None = None

    @property
    def accepting(self) -> bool:
        return self.retire_reason is None and self.kill_reason is None and not self.eof


class WorkerProcess:
    """A read-only view of one worker process: what code written for the
    standard library reads from ``executor._processes`` or ``pool._pool``.

    The pool owns the process; a view only looks at it (and can signal it:
    a worker killed this way fails only the task it was running)."""

    __slots__ = ("_proc", "name", "pid")

    def __init__(self, proc) -> None:
        self._proc = proc
        self.pid: int = proc.pid
        self.name: str = proc.name

    def is_alive(self) -> bool:
        try:
            if not self._proc.is_alive():
                return False
            sentinel = self._proc.sentinel
        except ValueError:  # the pool already reaped and closed it
            return False
        # The scheduler reaps its workers from its own thread: when it wins
        # the race for waitpid, Process.is_alive() here sees ECHILD and says
        # "alive" until the scheduler records the exit code.  The sentinel
        # is the truth: readable once the process has exited.
        try:
            return not multiprocessing.connection.wait([sentinel], 0)
        except (OSError, ValueError):  # closed by the scheduler meanwhile: reaped
            return False

    def join(self, timeout: float | None = None) -> None:
        try:
            self._proc.join(timeout)
        except ValueError:
            pass

    @property
    def exitcode(self) -> int | None:
        try:
            return self._proc.exitcode
        except ValueError:
            return None

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, signum: int) -> None:
        if self.is_alive():
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass

    def __repr__(self) -> str:
        return f"<shoal worker process pid={self.pid} {'alive' if self.is_alive() else 'exited'}>"


class _CallbackThread:
    """Runs user callbacks in the parent, one at a time, off the scheduler."""

    def __init__(self) -> None:
        self._queue: deque = deque()
        self._cond = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._busy = False

    def call(self, fn, *args) -> None:
        with self._cond:
            if not self._stopping and (self._thread is not None or self._start()):
                self._queue.append((fn, args))
                self._cond.notify()
                return
        # The pool has shut down (a task failed in the scheduler's last
        # sweep), or no thread can be started: run it here rather than never.
        self._invoke(fn, args)

    def _start(self) -> bool:
        thread = threading.Thread(target=self._run, name="shoal-callbacks", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # "can't create new thread at interpreter shutdown"
            return False
        self._thread = thread
        return True

    @staticmethod
    def _invoke(fn, args) -> None:
        try:
            fn(*args)
        except BaseException:  # noqa: BLE001 - a callback never kills the pool
            print("shoal: exception in a result callback (the pool goes on):", file=sys.stderr)
            traceback.print_exc()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    self._busy = False
                    self._cond.notify_all()
                    return
                fn, args = self._queue.popleft()
                self._busy = True
            self._invoke(fn, args)
            # Drop them now, not when the next callback comes: they may hold
            # the last reference to a result, a future or its traceback.
            fn = args = None
            with self._cond:
                self._busy = False
                if not self._queue:
                    self._cond.notify_all()

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every queued callback has run."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._queue or self._busy:
                if self._thread is not None and threading.current_thread() is self._thread:
                    return False  # called from a callback: cannot wait for ourselves
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def stop(self, wait: bool = True) -> None:
        """Run what is queued, then end the thread (with *wait*, wait for it)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if wait and thread is not None and thread is not threading.current_thread():
            thread.join()


_live_engines: weakref.WeakSet[Engine] = weakref.WeakSet()


def _engine_descriptors() -> list[int]:
    """Every live engine's private descriptors (for a worker started by fork)."""
    fds: list[int] = []
    for engine in list(_live_engines):
        fds.extend(engine._descriptors())
    return fds


def _foreign_descriptors() -> list[int]:
    """Descriptors of this process's multiprocessing helpers that a worker
    started by fork must not keep: the forkserver's "alive" pipe, whose
    holders keep the forkserver running (a live worker would make
    ``multiprocessing.util._cleanup_tests()`` wait forever).  The resource
    tracker's pipe stays: workers register shared memory with it."""
    from multiprocessing import forkserver

    fd = getattr(forkserver._forkserver, "_forkserver_alive_fd", None)
    return [fd] if fd is not None else []


def _terminate_all_at_exit() -> None:
    for engine in list(_live_engines):
        try:
            engine.at_exit()
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass


class Engine:
    """A set of worker processes and the scheduler thread that drives them."""

    def __init__(
        self,
        processes: int | None = None,
        initializer=None,
        initargs=(),
        maxtasksperchild: int | None = None,
        context=None,
        *,
        max_memory: int | None = None,
        task_timeout: float | None = None,
        graceful_exit: bool = False,
        defer_start_errors: bool = False,
        remote_traceback: type[BaseException] = RemoteTraceback,
        shared: Any = _local.NO_SHARED,
        worker_init=None,
        worker_exit=None,
    ) -> None:
        if processes is None:
            processes = os.process_cpu_count() if hasattr(os, "process_cpu_count") else os.cpu_count()
            processes = processes or 1
        _check_int("processes", processes)
        if processes < 1:
            raise ValueError(f"Number of processes must be at least 1, got {processes!r}")
        for hook_name, hook in (("initializer", initializer), ("worker_init", worker_init),
                                ("worker_exit", worker_exit)):
            if hook is not None and not callable(hook):
                raise TypeError(f"{hook_name} must be a callable, got {type(hook).__name__}")
        if maxtasksperchild is not None and (
            not isinstance(maxtasksperchild, int) or isinstance(maxtasksperchild, bool) or maxtasksperchild < 1
        ):
            # A ValueError whatever is wrong, as multiprocessing.Pool raises.
            raise ValueError(f"maxtasksperchild must be a positive int or None, got {maxtasksperchild!r}")
        if max_memory is not None:
            _check_int("max_memory", max_memory, "a number of bytes")
            if max_memory <= 0:
                raise ValueError(f"max_memory must be a positive number of bytes or None, got {max_memory!r}")
        _check_timeout(task_timeout)
        if context is None:
            context = multiprocessing.get_context()
        elif isinstance(context, str):
            context = mp_context(context)
        else:
            context = getattr(context, "_ctx", context)  # a shoal.Context
        self._ctx = context
        self._remote_traceback = remote_traceback
        self._processes = processes
        self._maxtasks = maxtasksperchild
        self._max_memory = max_memory
        self.task_timeout = task_timeout
        self._graceful_exit = graceful_exit
        try:
            self._config_args = (
                (initializer, tuple(initargs), worker_init, worker_exit)
                if initializer is not None or worker_init is not None or worker_exit is not None
                else None
            )
            if self._config_args is not None:
                # Picklable?  Pickled again for each worker, with the
                # descriptors (a SharedArray's) beside the message.
                with collecting_fds() as fds:
                    try:
                        cloudpickle.dumps(self._config_args)
                    finally:
                        for fd in fds:
                            os.close(fd)
        except Exception as exc:
            raise serialization_error(
                f"cannot pickle the initializer, its initargs or the worker_init/worker_exit hooks: {exc}", exc
            ) from exc
        # The shared object: inherited as it is by fork-started workers;
        # otherwise pickled once here, its large buffers in memfds we keep
        # and every worker maps.
        self._shared = shared
        self._shared_data: bytes | None = None
        self._shared_fds: list[int] = []
        if shared is not _local.NO_SHARED and context.get_start_method() != "fork":
            self._shared = _local.NO_SHARED
            self._shared_data, self._shared_fds = _serialize_shared(shared)
        # What workers' worker_exit returned (or raised), in arrival order.
        self._exit_results: list[tuple[bool, Any]] = []

        self._state = _RUN
        self._broken_error: BaseException | None = None
        self._pending: deque[_Task] = deque()
        self._control: deque = deque()
        self._ids = itertools.count(1)
        self._fn_ids = itertools.count(1)
        self._fn_cache: OrderedDict[int, tuple[Any, int, bytes]] = OrderedDict()
        self._fn_lock = threading.Lock()
        self._workers: dict[int, _Worker] = {}  # by sentinel fd... keyed by slot
        self._free_slots = list(range(processes * 2 - 1, -1, -1))
        # Seconds per item, by function id (0: functions sent with each task),
        # as measured by the workers: an exponentially weighted average.
        self._estimates: dict[int, float] = {}
        self._rotate = 0
        # ids of functions whose tasks have killed a worker (0: uncached ones)
        self._crashed: set[int] = set()
        self._timed = 0  # tasks with a time limit held by workers
        self._doomed = 0  # cancelled tasks held by workers, to kill when they start
        # Shared-memory descriptors held by tasks not yet finished, so that
        # workers started by fork can close them (see _descriptors).
        self._task_fds: set[int] = set()
        # Warm shared memory that large task arguments travel in, reused
        # once the task is finished and its worker has dropped them.
        self._segments = WarmSegments()
        self._feeders = 0
        self._helpers: weakref.WeakSet[threading.Thread] = weakref.WeakSet()
        self._start_failures = 0
        self.callbacks = _CallbackThread()
        self.results_cond = threading.Condition(threading.Lock())
        self.waiters = 0
        # counters (written by the scheduler thread only, except submitted)
        self._submitted_n = 0
        self._completed = 0
        self._failed = 0
        self._cancelled = 0
        self._started = 0
        self._replaced: dict[str, int] = {}

        # Status block: one cache line per worker slot (replacements reuse
        # slots; twice the pool size leaves room while one is being reaped).
        self._status_fd = create_fd(STATUS_SLOT * processes * 2, "shoal-status")
        self._status = mmap.mmap(self._status_fd, 0)

        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._sleeping = False
        self._dirty = False
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        self._finished = threading.Event()
        self._owner_pid = os.getpid()

        # Initial workers start from the caller's thread, before the
        # scheduler thread exists: with fork, a single-threaded parent is the
        # safe case (and Python 3.12+ warns about forking with threads).
        _live_engines.add(self)  # before any worker starts: see _descriptors
        self._thread: threading.Thread | None = None
        what = "its first worker process"
        try:
            for _ in range(processes):
                self._start_worker()
            what = "its scheduler thread"
            thread = threading.Thread(target=self._run, name="shoal-scheduler", daemon=True)
            thread.start()
            self._thread = thread
        except BaseException as exc:
            _live_engines.discard(self)
            self._abort_start()
            if not defer_start_errors or not isinstance(exc, Exception):
                exc.add_note(_cannot_start(what, exc))
                raise
            # As concurrent.futures does: the executor exists, and every
            # submit raises BrokenProcessPool (a WorkerStartError) saying why.
            self._state = _BROKEN
            self._broken_error = exc
            self._start_failure = _cannot_start(what, exc)
            self._finished.set()

    # ------------------------------------------------------------------
    # caller side
    # ------------------------------------------------------------------
    @property
    def processes(self) -> int:
        return self._processes

    @property
    def state(self) -> str:
        return self._state

    def _check_running(self) -> None:
        if os.getpid() != self._owner_pid:
            raise PoolClosedError(
                f"this pool belongs to process {self._owner_pid}; a process started by fork inherits the "
                "object but not its workers: create a new pool in this process"
            )
        if self._state == _RUN:
            return
        if self._state == _BROKEN and self._broken_error is not None:
            if self._thread is None:  # it never started (see __init__)
                raise WorkerStartError(self._start_failure) from self._broken_error
            raise WorkerStartError(f"the pool cannot run tasks: {self._broken_error}") from self._broken_error
        raise PoolClosedError("Pool not running: it was closed or terminated; create a new pool to submit work")

    def function_ref(self, fn) -> tuple[int, Any]:
        """An id for *fn* that workers cache, with its pickled form for the
        workers that have not seen it yet; ``(0, None)`` when *fn* must
        travel inside each task instead.

        Only functions that pickle by reference (module-level functions,
        including those of ``__main__``, and builtins) are cached: a worker
        looks them up by name in its own copy of the module, as with the
        standard library.  Lambdas, closures and nested functions are pickled
        by value with cloudpickle, capturing the values they refer to, so
        they are pickled again for every task and always carry the current
        values.  So are partials, bound methods and callable objects.
        """
        if type(fn) is not types.FunctionType and type(fn) is not types.BuiltinFunctionType:
            return 0, None
        key = id(fn)
        entry = self._fn_cache.get(key)  # a dict read is atomic: no lock needed
        if entry is not None and entry[0] is fn:
            return entry[1], entry
        if fn.__module__ == "__main__" and self._ctx.get_start_method() != "fork" and not getattr(
            sys.modules.get("__main__"), "__file__", None
        ):
            return 0, None  # an interactive __main__: a spawned worker cannot import it
        try:
            fn_bytes = pickle.dumps(fn, 5)  # by reference, or it raises
        except Exception:  # noqa: BLE001 - not importable by name: pickle by value per task
            return 0, None
        with self._fn_lock:
            entry = (fn, next(self._fn_ids), fn_bytes)
            self._fn_cache[key] = entry
            if len(self._fn_cache) > 4 * FN_CACHE:
                self._fn_cache.popitem(last=False)
        return entry[1], entry

    def make_task(self, fn, mode: int, payload, sink, index: int = 0, timeout: float | None = None, fn_ref=None) -> _Task:
        """Serialize one task in the caller's thread (errors surface here)."""
        if fn_ref is None:
            fn_ref = self.function_ref(fn)
        fn_id, entry = fn_ref
        n = 1 if mode in (CALL, CALL_KW) else len(payload)
        if fn_id == 0:
            payload = (fn, payload)
        fds: list[int] = []
        data = _serialize(payload, fds, self._segments)
        if fds:
            self._task_fds.update(fds)
        return _Task(next(self._ids), fn_id, entry, mode, data, fds, sink, index, timeout, n)

    def submit_call(self, fn, args: tuple, kwargs: dict, sink, timeout: float | None = None) -> _Task:
        """Serialize and queue ``fn(*args, **kwargs)``: the hot path of
        apply_async and submit, kept short on purpose."""
        if self._state != _RUN or os.getpid() != self._owner_pid:
            self._check_running()
        # Without keyword arguments only the args tuple is pickled: one
        # object fewer per task, which the garbage collector notices.
        # (Every container allocated here counts towards a garbage-collector
        # pass, so this path avoids the small tuples of the general one.)
        if kwargs:
            mode = CALL_KW
            payload = (args, kwargs)
        else:
            mode = CALL
            payload = args
        entry = self._fn_cache.get(id(fn))
        if entry is not None and entry[0] is fn:
            fn_id = entry[1]
        else:
            fn_id, entry = self.function_ref(fn)
            if fn_id == 0:
                payload = (fn, payload)
        fds: list[int] = []
        data = _serialize(payload, fds, self._segments)
        if fds:
            self._task_fds.update(fds)
        if timeout is None:
            timeout = self.task_timeout
        task = _Task(next(self._ids), fn_id, entry, mode, data, fds, sink, 0, timeout, 1)
        self._pending.append(task)
        self._submitted_n += 1
        self._wake()
        if self._finished.is_set():
            self._reject((task,))
        return task

    def submit_tasks(self, tasks: list[_Task], from_feeder: bool = False) -> None:
        """Queue serialized tasks for the workers.

        An imap feeder that started before close() may go on submitting.
        """
        if self._state != _RUN and not (from_feeder and self._state == _CLOSE):
            for t in tasks:
                t.close_fds(self._task_fds)
            self._check_running()
        for t in tasks:
            if t.timeout is None and self.task_timeout is not None:
                t.timeout = self.task_timeout
        self._pending.extend(tasks)
        self._submitted_n += len(tasks)
        self._wake()
        if self._finished.is_set():
            self._reject(tasks)

    def _reject(self, tasks) -> None:
        """The scheduler ended (terminate() in another thread) while these were
        being queued: take them back, or they would wait forever."""
        for t in tasks:
            try:
                self._pending.remove(t)
            except ValueError:
                continue  # the scheduler's last sweep failed it already
            t.close_fds(self._task_fds)
        self._check_running()
        raise PoolClosedError("the pool was terminated while this task was being submitted")

    def feeder_started(self) -> None:
        with self.results_cond:
            self._feeders += 1

    def feeder_finished(self) -> None:
        with self.results_cond:
            self._feeders -= 1
        self._wake()

    def map_chunksize(self, n: int, fn=None) -> int:
        """Chunk size for a map of *n* items when the caller gave none.

        Never larger than the standard library's (n / 4 per worker), and
        smaller when this function's measured duration says chunks of that
        size would take longer than CHUNK_SECONDS: smaller chunks balance the
        tail of uneven work across workers.
        """
        chunksize, extra = divmod(n, self._processes * 4)
        chunksize = max(1, chunksize + (1 if extra else 0))
        est = self._estimates.get(self._fn_key(fn)) if fn is not None else None
        if est is not None and est > 0:
            chunksize = max(1, min(chunksize, int(CHUNK_SECONDS / est)))
        return chunksize

    def auto_chunksize(self, fn, cap: int | None = None) -> int:
        """Size of the next chunk of a lazily chunked map (``chunksize=None``).

        One item until this function's duration has been measured, then
        about CHUNK_SECONDS of work, at most *cap* items: a first guess
        never strands seconds of work in one chunk, where it would spoil
        the balance of the tail and make an interrupt wait for it.
        """
        est = self._estimates.get(self._fn_key(fn))
        if est is None:
            return 1
        size = max(1, min(MAX_BATCH, int(CHUNK_SECONDS / max(est, 1e-9))))
        return size if cap is None else max(1, min(size, cap))

    def _fn_key(self, fn) -> int:
        entry = self._fn_cache.get(id(fn))
        return entry[1] if entry is not None and entry[0] is fn else 0

    def inflight_bound(self, fn=None, chunksize: int = 1) -> int:
        """How many tasks an imap keeps submitted but unconsumed: enough for
        every worker to hold CREDIT full batches, so batching never starves."""
        est = self._estimates.get(self._fn_key(fn)) if fn is not None else None
        per_batch = 1 if est is None else max(1, min(MAX_BATCH, int(BATCH_SECONDS / max(est * chunksize, 1e-7))))
        return max(4 * self._processes, min(2 * CREDIT * per_batch * self._processes, 1 << 16))

    def _wake(self) -> None:
        """Tell the scheduler that something changed (see _loop)."""
        self._dirty = True
        if self._sleeping:
            self._sleeping = False
            try:
                os.write(self._wake_w, b"x")
            except (BlockingIOError, OSError):
                pass

    def cancel(self, task: _Task, exc: BaseException) -> None:
        """Fail *task* with *exc*: drop it if queued, kill its worker if running."""
        self._control.append(("cancel", task, exc))
        self._wake()

    def fail_sink(self, sink, exc: BaseException) -> None:
        """Fail a result object (a cancelled map) from the scheduler thread,
        so it cannot race a result being delivered.  Its tasks not yet sent
        are dropped at dispatch (``sink._skip``)."""
        self._control.append(("fail_sink", sink, exc))
        self._wake()

    def interrupt(self, exc: BaseException, match=None) -> None:
        """Stop work at once (Ctrl-C): every task whose sink satisfies
        *match* (every task, without it) fails with *exc*; queued ones are
        dropped and the workers running the others are killed and replaced.
        Futures among them are cancelled."""
        self._control.append(("interrupt", match, exc))
        self._wake()

    def cancel_pending_futures(self) -> None:
        """Cancel every Future whose task has not been sent to a worker."""
        self._control.append(("cancel_futures", None, None))
        self._wake()

    def close(self) -> None:
        if self._state == _RUN:
            self._state = _CLOSE
        self._wake()
        # imap feeders waiting for room go on: after close() the input is
        # read to the end, as the standard library does.
        with self.results_cond:
            self.results_cond.notify_all()

    def terminate(self, wait: bool = True) -> None:
        """Stop the workers and fail unfinished tasks; with *wait*, return
        once all is done (a garbage-collection finalizer must not wait: it
        may run while its thread holds a lock the scheduler needs)."""
        if os.getpid() != self._owner_pid:
            # A forked child inherited this object but not its threads or
            # workers: nothing here is its to stop.
            return
        if self._state in (_RUN, _CLOSE, _BROKEN):
            self._state = _TERMINATE
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
        # The scheduler ended after every feeder was done: they are exiting.
        for thread in list(self._helpers):
            if thread is not threading.current_thread():
                thread.join()
        self.callbacks.drain()
        self.callbacks.stop()
        return True

    def at_exit(self) -> None:
        """The interpreter is exiting with this pool open."""
        if os.getpid() != self._owner_pid:
            return
        # An uncaught Ctrl-C ends the program: nobody waits for queued work.
        interrupted = isinstance(getattr(sys, "last_value", None), KeyboardInterrupt)
        if self._graceful_exit and self._state in (_RUN, _CLOSE) and not interrupted:
            self.close()
            self.join()
        else:
            self.terminate()

    def worker_exit_results(self) -> list:
        """What the workers' ``worker_exit`` hooks returned so far, in the
        order the workers ended; the first exception a hook raised is raised
        instead (the others' results are then lost to the caller)."""
        results = list(self._exit_results)
        for ok, value in results:
            if not ok:
                raise value
        return [value for _ok, value in results]

    def statistics(self) -> PoolStatistics:
        running = sum(len(w.inflight) for w in list(self._workers.values()))
        return PoolStatistics(
            workers=len(self._workers),
            tasks_submitted=self._submitted_n,
            tasks_pending=len(self._pending),
            tasks_running=running,
            tasks_completed=self._completed,
            tasks_failed=self._failed,
            tasks_cancelled=self._cancelled,
            workers_started=self._started,
            workers_replaced=sum(self._replaced.values()),
            replaced_because=dict(self._replaced),
            task_seconds_estimate=min(self._estimates.values()) if self._estimates else None,
        )

    def start_thread(self, thread: threading.Thread, what: str) -> None:
        """Start a helper thread of this pool (an imap feeder); if Python
        refuses, raise WorkerStartError (a BrokenProcessPool) saying why."""
        try:
            thread.start()
        except RuntimeError as exc:
            raise WorkerStartError(_cannot_start(what, exc)) from exc
        self._helpers.add(thread)  # join() waits for it: no shoal thread outlives shutdown

    def is_scheduler_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def worker_processes(self) -> list[WorkerProcess]:
        return [WorkerProcess(w.proc) for w in list(self._workers.values())]

    @property
    def worker_pids(self) -> list[int]:
        return [w.pid for w in list(self._workers.values())]

    # ------------------------------------------------------------------
    # workers
    # ------------------------------------------------------------------
    def _start_worker(self) -> _Worker:
        slot = self._free_slots.pop()
        STATUS.pack_into(self._status, slot * STATUS_SLOT, 0, 0.0, 0)
        parent_ch, child_ch = Channel.pair()
        # PR_SET_PDEATHSIG fires when the *thread* that started the worker
        # exits, so ask for it only from threads that live as long as the
        # pool, and only when we are the worker's parent (not a forkserver).
        pdeathsig = self._ctx.get_start_method() != "forkserver" and (
            threading.current_thread() is threading.main_thread()
            or threading.current_thread() is getattr(self, "_thread", None)
        )
        config = WorkerConfig(None, (), self._maxtasks, self._max_memory, os.getpid(), pdeathsig, slot)
        if self._config_args is not None:
            config.initializer, config.initargs, config.worker_init, config.worker_exit = self._config_args
        config.shared_data = self._shared_data
        # The first message's descriptors: the status block's, the shared
        # object's, then those the initargs hold (a SharedArray's).
        first_fds = [os.dup(fd) for fd in (self._status_fd, *self._shared_fds)]
        try:
            with collecting_fds() as fds:
                fds.extend(first_fds)
                config_bytes = cloudpickle.dumps(config)
            first_fds = fds
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        # Under fork the worker inherits every descriptor of this process.
        # The engines' own (other workers' sockets, wake-up pipes, the shared
        # memory of queued tasks, and the parent's end of this worker's own
        # channel) it closes at once: it must not keep that memory alive,
        # and holding its own channel's other end would hide our death.
        inherited: tuple[int, ...] = ()
        if self._ctx.get_start_method() == "fork":
            inherited = (parent_ch.fileno(), *_engine_descriptors(), *_foreign_descriptors())
        try:
            proc = self._ctx.Process(
                target=_worker.worker_main,
                args=(child_ch.sock, inherited, self._shared),
                name=f"shoal-worker-{slot}",
                daemon=False,
            )
            proc.start()
        except BaseException:
            for fd in first_fds:
                os.close(fd)
            parent_ch.close()
            child_ch.close()
            self._free_slots.append(slot)
            raise
        child_ch.close()
        worker = _Worker(proc, parent_ch, slot)
        try:
            parent_ch.sock.setblocking(False)
            parent_ch.queue(config_bytes, first_fds)
            self._selector.register(parent_ch.fileno(), selectors.EVENT_READ, ("chan", worker))
            self._selector.register(worker.sentinel, selectors.EVENT_READ, ("dead", worker))
        except BaseException:
            for fileobj in (parent_ch.fileno(), worker.sentinel):
                try:
                    self._selector.unregister(fileobj)
                except (KeyError, ValueError):
                    pass
            proc.kill()
            proc.join()
            parent_ch.close()
            self._free_slots.append(slot)
            raise
        self._workers[slot] = worker
        self._started += 1
        self._flush(worker)
        return worker

    def _descriptors(self) -> list[int]:
        """Descriptors this engine holds that no child process should keep."""
        fds = [self._wake_r, self._wake_w, self._status_fd, *self._shared_fds]
        try:
            fds.append(self._selector.fileno())
        except (AttributeError, ValueError, OSError):
            pass
        for w in list(self._workers.values()):
            fds.append(w.channel.fileno())
        # Not a scan of the queue: with a long queue and maxtasksperchild=1
        # that would cost O(queue) per worker started.
        fds.extend(list(self._task_fds))
        fds.extend(self._segments.descriptors())
        return fds

    def _abort_start(self) -> None:
        for w in list(self._workers.values()):
            try:
                w.proc.kill()
                w.proc.join(5)
            except Exception:  # noqa: BLE001
                pass
            w.channel.close()
        self._workers.clear()
        self._close_resources()

    def _close_resources(self) -> None:
        try:
            self._selector.close()
        except Exception:  # noqa: BLE001
            pass
        for fd in (self._wake_r, self._wake_w, self._status_fd, *self._shared_fds):
            try:
                os.close(fd)
            except OSError:
                pass
        self._shared_fds = []
        try:
            self._status.close()
        except Exception:  # noqa: BLE001
            pass
        self._segments.close()

    def _flush(self, w: _Worker) -> None:
        try:
            done = w.channel.flush()
        except (BrokenPipeError, ConnectionResetError):
            # The worker is gone; its sentinel will tell us how, and the
            # tasks it held go elsewhere.
            done = True
            w.channel.discard_output()
        want = not done
        if want != w.writing:
            w.writing = want
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0)
            if w.eof:
                events &= ~selectors.EVENT_READ
            if events:
                self._selector.modify(w.channel.fileno(), events, ("chan", w))

    # ------------------------------------------------------------------
    # the scheduler thread
    # ------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - never leave callers waiting
            self._broken_error = exc
            self._state = _BROKEN
            traceback.print_exc()
            self._fail_everything(ShoalError(f"the pool's scheduler failed: {exc!r}; this is a bug in shoal"))
            self._kill_workers(graceful=False)
        finally:
            _live_engines.discard(self)  # its descriptors are about to close
            self._close_resources()
            self._finished.set()
            # A caller that queued a task before seeing _finished set gets it
            # failed here; one that queues after sees _finished (_reject).
            while self._pending:
                self._fail(self._pending.popleft(), PoolClosedError("the pool was terminated before this task ran"))
            with self.results_cond:
                self.results_cond.notify_all()
            # No shoal thread outlives its pool, even one never joined.
            self.callbacks.stop(wait=False)

    def _loop(self) -> None:
        select = self._selector.select
        while True:
            # The wake-up protocol.  A caller changes state (queues a task, a
            # request, close/terminate), then sets _dirty, then writes to the
            # wake-up pipe if it sees _sleeping.  We set _sleeping, then look
            # at _dirty: a change made before we set _sleeping is seen here,
            # one made after finds _sleeping set and writes.  No wake-up is
            # lost, and we never spin on work that waits for a free worker.
            timeout = TIMEOUT_TICK if self._timed or self._doomed else None
            self._sleeping = True
            if self._dirty:
                timeout = 0
            events = select(timeout)
            self._sleeping = False
            self._dirty = False
            for key, mask in events:
                kind, w = key.data
                if kind == "chan":
                    if mask & selectors.EVENT_READ:
                        self._read(w)
                    if mask & selectors.EVENT_WRITE:
                        self._flush(w)
                elif kind == "dead":
                    self._reap(w)
                else:
                    try:
                        while os.read(self._wake_r, 4096):
                            pass
                    except BlockingIOError:
                        pass
            while self._control:
                self._handle_control(*self._control.popleft())
            state = self._state
            if state == _TERMINATE:
                self._terminate_now()
                return
            if self._pending:
                self._dispatch()
            if self._timed or self._doomed:
                self._check_time_limits()
            if (
                state in (_CLOSE, _BROKEN)
                and not self._pending
                and not self._feeders
                and not any(w.inflight for w in self._workers.values())
            ):
                if not self._workers:
                    return
                for w in self._workers.values():
                    if w.accepting:
                        w.retire_reason = "shutdown"
                        w.channel.queue(pickle.dumps((_worker.STOP, (), (), False)))
                        self._flush(w)

    # -- dispatch ---------------------------------------------------------
    def _dispatch(self) -> None:
        """Give each worker with room a batch from the head of the queue.

        A worker may hold CREDIT batches.  A batch is about BATCH_SECONDS of
        work by the head task's measured duration (one task while the
        function is new), and never more than a fair share of what is
        pending, so work spreads over every worker.  Idle workers are served
        first, and the starting point rotates so no worker is favoured.
        """
        pending = self._pending
        workers = [w for w in self._workers.values() if w.accepting and len(w.batches) < CREDIT]
        if not workers:
            return
        workers.sort(key=lambda w: len(w.batches))
        self._rotate += 1
        estimates = self._estimates
        maxtasks = self._maxtasks
        while pending and workers:
            progressed = False
            for w in list(workers):
                if not pending:
                    break
                head = pending[0]
                est = estimates.get(head.fn_id)
                if est is None:
                    size = 1
                else:
                    size = max(1, min(MAX_BATCH, int(BATCH_SECONDS / max(est * head.n, 1e-7))))
                fair = -(-len(pending) // len(workers))
                take = min(size, fair)
                if maxtasks:
                    take = min(take, maxtasks - w.sent)
                batch = []
                while pending and len(batch) < take:
                    task = pending.popleft()
                    if task.sink._skip(task):
                        task.close_fds(self._task_fds)
                        self._cancelled += 1
                        continue
                    batch.append(task)
                if batch:
                    self._send_batch(w, batch)
                    progressed = True
                if len(w.batches) >= CREDIT or (maxtasks and w.sent >= maxtasks):
                    workers.remove(w)
            if not progressed:
                break

    def _send_batch(self, w: _Worker, batch: list[_Task]) -> None:
        fn_defs = []
        forget = []
        fds: list[int] = []
        wire = []
        last_fid = -1
        timed = 0
        used: set[int] = set()
        for task in batch:
            fid = task.fn_id
            if fid != last_fid:
                last_fid = fid
                used.add(fid)
                if fid:
                    if fid in w.fns:
                        w.fns.move_to_end(fid)
                    else:
                        fn_defs.append((fid, task.fn_ref[2]))
                        w.fns[fid] = None
            wire.append((task.id, fid, task.mode, task.data, len(task.fds)))
            if task.fds:
                # The channel closes what it sends; the task keeps its own
                # descriptors so it can be sent again if this worker dies.
                fds.extend(os.dup(fd) for fd in task.fds)
            if task.timeout is not None:
                timed += 1
        w.inflight.extend(batch)
        self._timed += timed
        w.sent += len(batch)
        w.batches.append(batch[-1].id)
        # Evict the least recently used functions this batch does not need;
        # the worker forgets them before it loads the new ones.
        for fid in list(w.fns) if len(w.fns) > FN_CACHE else ():
            if len(w.fns) - len(forget) <= FN_CACHE:
                break
            if fid not in used:
                forget.append(fid)
        for fid in forget:
            del w.fns[fid]
        if forget:
            fn_defs.insert(0, (-1, forget))
        # Functions that have killed a worker get their results sent after
        # every task, so another crash makes no finished task run again.
        flush_each = bool(self._crashed) and not used.isdisjoint(self._crashed)
        w.channel.queue(pickle.dumps((_worker.BATCH, fn_defs, wire, flush_each), 5), fds)
        self._flush(w)

    # -- results ----------------------------------------------------------
    def _read(self, w: _Worker) -> None:
        frames, eof = w.channel.recv_available()
        for payload, fds in frames:
            self._on_message(w, payload, fds)
        if eof and not w.eof:
            w.eof = True
            try:
                if w.writing:
                    self._selector.modify(w.channel.fileno(), selectors.EVENT_WRITE, ("chan", w))
                else:
                    self._selector.unregister(w.channel.fileno())
            except (KeyError, ValueError):
                pass

    def _on_message(self, w: _Worker, payload: bytes, fds: list[int]) -> None:
        kind, body = pickle.loads(payload)
        if kind == _worker.RESULTS:
            self._on_results(w, body, fds)
        elif kind == _worker.READY:
            w.ready = True
            self._start_failures = 0
        elif kind == _worker.RETIRE:
            w.retire_reason = body[0]
        elif kind == _worker.EXITED:
            ok, data = body
            if ok:
                try:
                    self._exit_results.append((True, loads_with(data, fds)))
                except Exception as exc:  # noqa: BLE001 - reported by worker_exit_results()
                    self._exit_results.append(
                        (False, SerializationError(f"the value worker_exit returned could not be unpickled: {exc!r}"))
                    )
            else:
                self._exit_results.append((False, unpack_exception(data)))
        elif kind == _worker.INIT_FAILED:
            exc = unpack_exception(body)
            w.retire_reason = "initializer"
            self._break(exc)

    def _on_results(self, w: _Worker, results, fds: list[int]) -> None:
        pos = 0
        inflight = w.inflight
        batches = w.batches
        waiters = self.waiters
        plain_loads = pickle.loads
        completed = failed = timed = doomed = 0
        # Duration estimates are updated once per message, per function.
        seconds: dict[int, list[float]] = {}
        try:
            for tid, ok, data, nfds, elapsed in results:
                task = inflight.popleft()
                if batches and batches[0] == tid:
                    batches.popleft()
                if task.fds:
                    task.close_fds(self._task_fds)
                if task.timeout is not None:
                    timed += 1
                acc = seconds.get(task.fn_id)
                if acc is None:
                    seconds[task.fn_id] = [elapsed, task.n]
                else:
                    acc[0] += elapsed
                    acc[1] += task.n
                task_fds = fds[pos : pos + nfds] if nfds else None
                pos += nfds
                if task.kill_reason in _ALREADY_FAILED:
                    if task.kill_reason == "cancelled":
                        doomed += 1
                    continue  # its caller already has an error; drop the late result
                if not ok:
                    value = self._with_traceback_type(unpack_exception(data))
                    failed += 1
                else:
                    try:
                        # Out-of-band buffers come as shared memory beside the message.
                        value = loads_with(data, task_fds) if task_fds else plain_loads(data)
                        completed += 1
                    except BaseException as exc:  # noqa: BLE001
                        ok = False
                        failed += 1
                        value = SerializationError(
                            f"the task's result could not be unpickled in the parent: {type(exc).__name__}: {exc}"
                        )
                task.sink._deliver(task, ok, value)
        finally:
            for fd in fds:
                os.close(fd)
            self._completed += completed
            self._failed += failed
            self._timed -= timed
            self._doomed -= doomed
            estimates = self._estimates
            for fid, (total, n) in seconds.items():
                per_item = total / n
                est = estimates.get(fid)
                estimates[fid] = per_item if est is None else est * 0.7 + per_item * 0.3
        if waiters or self.waiters:
            with self.results_cond:
                self.results_cond.notify_all()

    def _with_traceback_type(self, exc: BaseException) -> BaseException:
        """Give a worker's exception the face's remote-traceback type as its
        ``__cause__`` (``multiprocessing.pool.RemoteTraceback`` for Pool, as
        code written for the standard library checks)."""
        cause = exc.__cause__
        if isinstance(cause, RemoteTraceback) and self._remote_traceback is not RemoteTraceback:
            exc.__cause__ = self._remote_traceback(cause.tb)
        return exc

    def _fail(self, task: _Task, exc: BaseException, *, cancelled: bool = False) -> None:
        task.close_fds(self._task_fds)
        if cancelled:
            self._cancelled += 1
        else:
            self._failed += 1
        task.sink._deliver(task, False, exc)

    def _notify(self) -> None:
        with self.results_cond:
            self.results_cond.notify_all()

    # -- control requests from callers -----------------------------------
    def _handle_control(self, what: str, obj, exc) -> None:
        if what == "cancel":
            task: _Task = obj
            if task in self._pending:
                self._pending.remove(task)
                self._fail(task, exc, cancelled=True)
                self._notify()
                return
            for w in self._workers.values():
                if task in w.inflight:
                    # Its caller learns at once.  The worker is killed when
                    # it runs the task: now if it is running, or as soon as
                    # it starts it (see _check_time_limits).
                    task.kill_reason = "cancelled"
                    self._fail(task, exc, cancelled=True)
                    self._doomed += 1
                    self._check_time_limits()
                    self._notify()
                    return
        elif what == "cancel_futures":
            # Callers append to _pending concurrently: never iterate it live
            # or rebind it.  Cancelled futures are skipped at dispatch.
            for t in list(self._pending):
                future = getattr(t.sink, "future", None)
                if future is not None:
                    future.cancel()
        elif what == "interrupt":
            match = obj
            # Callers append to _pending concurrently (at the right): take
            # what is there from the left, put back what stays, in order.
            keep = []
            for _ in range(len(self._pending)):
                t = self._pending.popleft()
                if match is None or match(t.sink):
                    self._interrupt_task(t, exc)
                    self._fail(t, exc, cancelled=True)
                else:
                    keep.append(t)
            self._pending.extendleft(reversed(keep))
            for w in self._workers.values():
                for t in w.inflight:
                    if t.kill_reason is None and (match is None or match(t.sink)):
                        # As for "cancel": the worker is killed when it runs it.
                        t.kill_reason = "cancelled"
                        self._interrupt_task(t, exc)
                        self._fail(t, exc, cancelled=True)
                        self._doomed += 1
            self._check_time_limits()
            self._notify()
        elif what == "fail_sink":
            sink = obj
            if not sink._delivered:
                sink._deliver(None, False, exc)
                self._notify()

    @staticmethod
    def _interrupt_task(task: _Task, exc: BaseException) -> None:
        # A future not yet running is cancelled as such; a running one gets
        # *exc* (a CancelledError) as its outcome, through _fail.
        future = getattr(task.sink, "future", None)
        if future is not None:
            future.cancel()

    # -- time limits -------------------------------------------------------
    def _check_time_limits(self) -> None:
        """Kill workers running a task past its time limit, or a task that
        was cancelled while the worker held it."""
        now = time.monotonic()
        for w in list(self._workers.values()):
            if not w.inflight or w.kill_reason is not None:
                continue
            tid, started, _last = STATUS.unpack_from(self._status, w.slot * STATUS_SLOT)
            if not tid or not started:
                continue  # idle, or a task id written before its start time
            for task in w.inflight:
                if task.id == tid:
                    if task.kill_reason == "cancelled":
                        self._kill(w, "cancelled", tid)
                    elif task.timeout is not None and now - started > task.timeout:
                        task.kill_reason = "timeout"
                        self._kill(w, "timeout", tid)
                    break

    def _kill(self, w: _Worker, reason: str, tid: int) -> None:
        # The task may have finished since the status was read: kill only if
        # the worker is still on it, so the next task is not hit instead.
        if STATUS.unpack_from(self._status, w.slot * STATUS_SLOT)[0] != tid:
            return
        if w.kill_reason is None:
            w.kill_reason = reason
        try:
            os.kill(w.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    # -- worker exit -------------------------------------------------------
    def _reap(self, w: _Worker) -> None:
        if not w.eof:
            # Results the worker sent before it died are still in the socket.
            while True:
                frames, eof = w.channel.recv_available()
                for payload, fds in frames:
                    self._on_message(w, payload, fds)
                if eof or not frames:
                    break
        w.proc.join(1)
        exitcode = w.proc.exitcode
        running, _started, last_done = STATUS.unpack_from(self._status, w.slot * STATUS_SLOT)
        for fileobj in (w.sentinel, w.channel.fileno()):
            try:
                self._selector.unregister(fileobj)
            except (KeyError, ValueError):
                pass
        w.channel.close()
        del self._workers[w.slot]
        self._free_slots.append(w.slot)
        try:
            w.proc.close()
        except ValueError:
            pass

        # Attribute the tasks it held, which it runs in order.  The status
        # slot names the task it was running and the last one it finished.
        # The running task fails.  Tasks after it never started and go to
        # another worker as they are.  Tasks before it finished but their
        # results were still in the worker (it sends them at least every
        # FLUSH_SECONDS of work, and after every task once a function has
        # killed a worker): they run again.
        tasks = list(w.inflight)
        w.inflight.clear()
        run_index = finished_upto = -1
        for i, task in enumerate(tasks):
            if task.id == running:
                run_index = i
            elif task.id == last_done:
                finished_upto = i
        if run_index >= 0:
            finished_upto = run_index - 1
        # A worker that died between tasks (no task running) most likely
        # died sending the last finished task's result: that one task is
        # counted, and fails if it keeps killing workers.
        suspect = run_index < 0 and finished_upto >= 0
        failed_any = False
        requeue = []
        for i, task in enumerate(tasks):
            self._leaving(task)
            if task.kill_reason in _ALREADY_FAILED:
                continue
            if i == run_index:
                if task.kill_reason is None:
                    self._crashed.add(task.fn_id)
                failed_any = True
                if task.kill_reason == "timeout":
                    exc: BaseException = TaskTimeoutError(
                        f"the task ran longer than its time limit of {task.timeout} s; worker process "
                        f"{w.pid} was killed and replaced"
                    )
                else:
                    exc = WorkerDiedError(w.pid, exitcode)
                self._fail(task, exc)
            elif w.retire_reason == "initializer" or self._state == _BROKEN:
                failed_any = True
                self._fail(task, WorkerStartError(f"the pool cannot run tasks: {self._broken_error}"))
            elif suspect and task.id == last_done and task.requeues >= MAX_REQUEUES:
                failed_any = True
                self._fail(
                    task,
                    WorkerDiedError(
                        w.pid, exitcode,
                        f"It finished, but each of the {task.requeues + 1} workers that ran it died before "
                        "sending its result; it was not run again.",
                    ),
                )
            else:
                if suspect and task.id == last_done:
                    task.requeues += 1
                    self._crashed.add(task.fn_id)
                requeue.append(task)
        if requeue:
            self._pending.extendleft(reversed(requeue))
        if failed_any:
            self._notify()

        # Why did it go, and does it need a replacement?
        if w.kill_reason is not None:
            reason = w.kill_reason
        elif w.retire_reason is not None:
            reason = w.retire_reason
        else:
            reason = "died"
        if not w.ready and reason == "died":
            self._start_failures += 1
            if self._start_failures >= MAX_START_FAILURES and self._state == _RUN:
                self._break(
                    WorkerStartError(
                        f"worker processes keep exiting before they are ready ({_describe(exitcode)}). "
                        "Under spawn or forkserver the main module is imported again in each worker: "
                        "protect the code that starts the pool with `if __name__ == '__main__':`, and make "
                        "sure the main module imports without errors."
                    )
                )
        if reason in ("shutdown", "initializer") or self._state in (_TERMINATE, _BROKEN):
            return
        if self._state == _CLOSE and not self._pending and not any(x.inflight for x in self._workers.values()):
            return
        self._replaced[reason] = self._replaced.get(reason, 0) + 1
        try:
            self._start_worker()
        except Exception as exc:  # noqa: BLE001
            self._break(WorkerStartError(f"could not start a replacement worker: {exc!r}"))

    def _leaving(self, task: _Task) -> None:
        """Bookkeeping for a task that leaves a worker's hands for good."""
        if task.timeout is not None:
            self._timed -= 1
        if task.kill_reason == "cancelled":
            self._doomed -= 1

    def _break(self, exc: BaseException) -> None:
        """The pool cannot start workers: fail what is queued, refuse new work.

        Tasks that live workers already hold still run and deliver their
        results; then the workers are told to stop.
        """
        if self._state in (_TERMINATE,):
            return
        if self._broken_error is None:
            self._broken_error = exc
        self._state = _BROKEN
        err = WorkerStartError(f"the pool cannot run tasks: {exc}")
        err.__cause__ = exc
        while self._pending:
            self._fail(self._pending.popleft(), err)
        self._notify()

    # -- termination -------------------------------------------------------
    def _fail_everything(self, exc: BaseException) -> None:
        while self._pending:
            self._fail(self._pending.popleft(), exc)
        for w in self._workers.values():
            for task in w.inflight:
                if task.kill_reason not in _ALREADY_FAILED:
                    self._fail(task, exc)
                    task.kill_reason = "abandoned"
        self._notify()

    def _terminate_now(self) -> None:
        self._fail_everything(PoolClosedError("the pool was terminated before this task finished"))
        self._kill_workers(graceful=True)

    def _kill_workers(self, graceful: bool) -> None:
        workers = list(self._workers.values())
        for w in workers:
            try:
                os.kill(w.pid, signal.SIGTERM if graceful else signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + TERMINATE_GRACE
        for w in workers:
            w.proc.join(max(0.0, deadline - time.monotonic()))
            if w.proc.exitcode is None:
                try:
                    os.kill(w.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                w.proc.join()
            w.channel.close()
            try:
                w.proc.close()
            except ValueError:
                pass
        self._workers.clear()


def _serialize(payload, fds: list[int], segments: WarmSegments) -> bytes:
    """Pickle a task's payload; large buffers go to warm shared memory (read
    only in the worker, so it cannot silently write into memory the caller
    thinks private), and the descriptors to pass beside the message are
    appended to *fds*."""
    previous = _fd_state.send
    _fd_state.send = fds
    try:
        return dumps(payload, oob=True, what="the task's arguments", segments=segments, writable=False)
    finally:
        _fd_state.send = previous


def _cannot_start(what: str, exc: BaseException) -> str:
    msg = f"shoal could not start {what} ({type(exc).__name__}: {exc})"
    if isinstance(exc, RuntimeError) and "shutdown" in str(exc):
        msg += (
            "; the interpreter is shutting down (the pool was first used from an atexit handler, a "
            "finalizer or a daemon thread at exit): use the pool before the program ends"
        )
    return msg


def _serialize_shared(obj) -> tuple[bytes, list[int]]:
    """Pickle the pool's shared object once: ``(data, fds)``, its large
    buffers copied into memfds (owned by the caller) that workers map."""
    with collecting_fds() as fds:
        try:
            return dumps(obj, oob=True, what="the pool's shared object"), fds
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise


def _describe(exitcode) -> str:
    from ..exceptions import describe_exitcode

    return describe_exitcode(exitcode)


def _check_timeout(value) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"a timeout must be a number of seconds or None, got {type(value).__name__} {value!r:.40}"
        )
    if value <= 0:
        raise ValueError(f"a task timeout must be a positive number of seconds or None, got {value!r}")


def _check_int(name: str, value, what: str = "an int") -> None:
    """TypeError naming *name* unless *value* is an int (bool is not)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__} {value!r:.40}")


def mp_context(method: str):
    """``multiprocessing.get_context(method)``, with an error that lists the
    start methods this platform has."""
    try:
        return multiprocessing.get_context(method)
    except ValueError:
        valid = ", ".join(repr(m) for m in multiprocessing.get_all_start_methods())
        raise ValueError(f"unknown start method {method!r}: use one of {valid}") from None


import atexit  # noqa: E402 - registered after multiprocessing.util's own handler, so it runs first

atexit.register(_terminate_all_at_exit)
