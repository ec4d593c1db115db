"""The pool engine: one scheduler thread that owns every worker.

Data flow::

    caller threads            scheduler thread                     workers
    --------------            ----------------                     -------
    submit(): pickle args ─┐
      (errors raise here)  │  pending (deque of Task)
      append, wake if      └──────────► dispatch: a batch to each     claim each task
      the scheduler sleeps              worker holding < 2 batches ─► (status gate),
                                        (non-blocking writes)         run it, send
                             balance: a worker idle, another          results
                               stalled on a long task: recall ─ ─ ►   (batched);
                               what it has not started (gate),        skip what
                               dispatch it again                      was recalled
                             select() on: worker sockets,
                               worker sentinels, wake-up pipe  ◄────
                             results → sink.deliver() ────────► result objects
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
hold at most two batches, so an idle worker always pulls the next one.  A
lone task goes at once.

No head-of-line blocking: a task never waits behind a long one while
another worker is idle.  A worker whose task has run STALLED_AFTER (10 ms)
is *stalled*: it gets no second batch, and once another worker is idle the
tasks it holds but has not started are recalled and dispatched again
(``Scheduler.balance``).  The worker claims each task, before it starts it,
with a compare-and-exchange on a *gate* word of its status slot; the
scheduler recalls with another on the same word, so each task is either
started there or recalled, never both, and the worker skips recalled tasks
when it reaches them (``_worker.GATE``).  Measured before dispatch time
cannot tell a long task from a short one (one call of a function may take
seconds where the others take microseconds), so the recall, not a guess,
is what keeps the others moving.

Per-task cost: a trivial task costs the parent about a microsecond, so the
submit path does as little as it can.  A call whose arguments are all plain
immutable values (int, float, str, bool, None, complex, short bytes) cannot
fail to pickle: it is queued as it is and pickled inside its batch (see
``_worker``); any other is pickled here, so errors still surface at submit.
The task record (``Task``) and the result object's state (``AsyncResult``'s
C base) are C types; neither is walked by the garbage collector while it
waits (see ``_tasks``), and the scheduler settles runs of plain successes in
C (``_native.deliver_plain``).  Busy callers wake the scheduler once, not
per task (the wake-up protocol of Scheduler.run).

Crash attribution: each worker writes the id of the task it is running (and
when it started, and the last task it finished) into its slot of a shared
*status block* before running it.  When a worker exits (its pidfd fires:
not ``multiprocessing``'s sentinel, whose pipe a grandchild started by fork
may hold open) the scheduler drains its socket, then reads the slot: the running task fails
(WorkerDiedError, or TaskTimeoutError / CancelledError when the scheduler
killed it on purpose); tasks the worker never started go to other workers;
tasks it finished whose results were still inside it run again (results are
sent at least every 1 ms of work, and after every task once a function has
killed a worker, so this is short work, once).  The same slot gives per-task
time limits their start time.  Under fork, a new worker first closes the
descriptors of every engine in this process that it inherited.

Shutdown: close() lets pending work finish, then the scheduler sends STOP to
each worker and exits when all have exited; terminate() fails what is
unfinished, sends SIGTERM, then SIGKILL after TERMINATE_GRACE seconds.
Processes a task started and left running (a ``multiprocessing.Process``,
a nested joblib's loky workers) end with their worker, so that none keeps
the pool waiting or outlives it: a worker ending normally ends its
descendants after ``worker_exit`` (SIGTERM, then SIGKILL after the grace),
terminate() signals each worker's descendants with it, and a worker killed
for a time limit or a cancellation takes them along (see ``_procs``).  When
the scheduler ends, the callback thread ends once its queue is empty, and
join() waits for both and for the imap feeders: after it no shoal thread
and no worker of this pool remains.  The callback thread lets go of each
callback as soon as it ran (a future it held would keep its traceback's
frames, and so perhaps a dropped pool, alive).

Contexts: the scheduler drives the standard library's processes only
(``drivable_context``): another library's context (loky's, the default in
its workers) becomes fork, and a daemonic process refuses at once to start
a pool (``_check_may_have_children``).

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

Where each part lives (one responsibility per module):

- ``_engine.py`` (this module): :class:`LocalEngine`, the caller side of
  worker processes on this machine -- checks and submit (tasks pickled in
  the caller's thread), the function cache, chunk sizes, statistics -- and
  the steps of ``Engine._run``, each the scheduler's;
- ``_base.py``: :class:`~._base.Engine`, the contract this class
  implements (state machine, close / terminate / join, feeders, the
  thread's skeleton ``_run``); ``_state.py``: the record the caller side
  and the scheduler share;
- ``_scheduler.py``: :class:`~._scheduler.Scheduler`, the loop and its
  steps (dispatch, read_results, check_time_limits, cancel / interrupt,
  stop), and the batching constants; ``_lifecycle.py``: its steps on
  worker processes (start_worker, reap, kill_workers);
- ``_crash.py``: crash attribution, a pure function of what a dead worker
  held and what its status slot says;
- ``_tasks.py``: the records (Task, Worker, WorkerProcess) and the
  :class:`~._tasks.ResultSink` protocol that result objects implement;
- ``_callbacks.py``: the callback thread;
- ``_procs.py``: a worker's descendants, found and ended by pidfd;
- ``_worker.py``: the loop a worker process runs; ``_local.py``: what a task
  sees of its worker.
"""

from __future__ import annotations

import itertools
import multiprocessing
import multiprocessing.util  # its atexit handler joins children; ours must run first
import os
import threading
import types
import weakref
from collections import OrderedDict
from typing import Any

from .._fd import WarmSegments, collecting_fds, swap_sending
from .._native import raw_task
from .._serialization import dumps, function_bytes, pickle_code
from .._util import check_int, check_timeout
from ..exceptions import PoolClosedError, RemoteTraceback, serialization_error
from . import _local
from ._base import CHUNK_SECONDS, Engine, PoolStatistics, at_exit_all, cannot_start
from ._scheduler import BATCH_SECONDS, CREDIT, FN_CACHE, MAX_BATCH, Scheduler
from ._state import CLOSE, RUN, live_engines
from ._tasks import ResultSink, Task, Worker, WorkerProcess
from ._worker import CALL, CALL_KW, CALL_RAW

#: str and bytes arguments shorter than this travel raw (``_native.raw_task``):
#: longer bytes may go through shared memory, which only the per-task pickle
#: arranges, and a long string is pickled in the caller's thread, not on the
#: scheduler's.
RAW_BYTES_LIMIT = 4096

#: How many times this process is a fork of the one before: an engine made
#: in an ancestor must not be used here (its workers are not ours), and
#: comparing this counter is cheaper than os.getpid() on every submit.
_fork_generation = 0


def _forked() -> None:
    global _fork_generation
    _fork_generation += 1


os.register_at_fork(after_in_child=_forked)


def _terminate_all_at_exit() -> None:
    at_exit_all(live_engines)


class LocalEngine(Engine):
    """Worker processes on this machine and the scheduler thread that drives them."""

    max_batch = MAX_BATCH

    def __init__(
        self,
        processes: int | None = None,
        initializer: Any = None,
        initargs: Any = (),
        maxtasksperchild: int | None = None,
        context: Any = None,
        *,
        max_memory: int | None = None,
        task_timeout: float | None = None,
        graceful_exit: bool = False,
        defer_start_errors: bool = False,
        remote_traceback: type[BaseException] = RemoteTraceback,
        shared: Any = _local.NO_SHARED,
        worker_init: Any = None,
        worker_exit: Any = None,
    ) -> None:
        if processes is None:
            processes = os.process_cpu_count() if hasattr(os, "process_cpu_count") else os.cpu_count()
            processes = processes or 1
        check_int("processes", processes)
        if processes < 1:
            raise ValueError(f"Number of processes must be at least 1, got {processes!r}")
        for hook_name, hook in (
            ("initializer", initializer),
            ("worker_init", worker_init),
            ("worker_exit", worker_exit),
        ):
            if hook is not None and not callable(hook):
                raise TypeError(f"{hook_name} must be a callable, got {type(hook).__name__}")
        if maxtasksperchild is not None and (
            not isinstance(maxtasksperchild, int)
            or isinstance(maxtasksperchild, bool)
            or maxtasksperchild < 1
        ):
            # A ValueError whatever is wrong, as multiprocessing.Pool raises.
            raise ValueError(f"maxtasksperchild must be a positive int or None, got {maxtasksperchild!r}")
        if max_memory is not None:
            check_int("max_memory", max_memory, "a number of bytes")
            if max_memory <= 0:
                raise ValueError(f"max_memory must be a positive number of bytes or None, got {max_memory!r}")
        check_timeout(task_timeout)
        if context is None:
            context = multiprocessing.get_context()
        elif isinstance(context, str):
            context = mp_context(context)
        else:
            context = getattr(context, "_ctx", context)  # a shoal.Context
        context = drivable_context(context)
        super().__init__(
            processes,
            task_timeout=task_timeout,
            graceful_exit=graceful_exit,
            remote_traceback=remote_traceback,
        )
        self.context = context
        hooks = (initializer, tuple(initargs), worker_init, worker_exit)
        config_inline = None
        try:
            config_args = (
                hooks
                if initializer is not None or worker_init is not None or worker_exit is not None
                else None
            )
            if config_args is not None and context.get_start_method() == "fork":
                # Inherited, as the standard library's fork-started workers
                # get them: nothing pickled.  (Pickled, a 20 MB initargs
                # cost a pickle per worker and a copy through its socket:
                # the first map took 160-190 ms, the standard library's
                # 14-16 ms.)
                config_args, config_inline = None, hooks
            if config_args is not None:
                # Picklable?  Pickled again for each worker, with the
                # descriptors (a SharedArray's) beside its first message.
                with collecting_fds() as fds:
                    try:
                        pickle_code(config_args)
                    finally:
                        for fd in fds:
                            os.close(fd)
        except Exception as exc:
            if "through inheritance" not in str(exc):
                raise serialization_error(
                    "cannot pickle the initializer, its initargs or the worker_init/worker_exit hooks: "
                    f"{exc}",
                    exc,
                ) from exc
            # A multiprocessing Queue, Lock, Value... in initargs (the
            # standard library's logging pattern): such objects travel only
            # with a starting process, so the hooks go in the workers'
            # Process arguments, which multiprocessing pickles as it starts
            # them (under fork: inherited), as the standard library does.
            config_args, config_inline = None, hooks
        # The shared object: inherited as it is by fork-started workers;
        # otherwise pickled once here, its large buffers in memfds that the
        # scheduler keeps and every worker maps.
        shared_data: bytes | None = None
        shared_fds: list[int] = []
        if shared is not _local.NO_SHARED and context.get_start_method() != "fork":
            shared_data, shared_fds = _serialize_shared(shared)
            shared = _local.NO_SHARED

        self._ids = itertools.count(1)
        self._fn_ids = itertools.count(1)
        #: id(fn) -> (fn, fn id, its pickle, None), or for a function sent by value
        #: (a weak reference to fn, fn id, its pickle, whether the pickle is still current)
        self._fn_cache: OrderedDict[int, tuple[Any, int, bytes, Any]] = OrderedDict()
        #: the entry of the function submitted last (most submits repeat it)
        self._last_fn: tuple[Any, int, bytes, Any] = (None, 0, b"", None)
        self._fn_lock = threading.Lock()
        self._workers: dict[int, Worker] = {}  # keyed by status slot; the scheduler's
        # (self._estimates: keyed by function id, 0 for functions sent with
        # each task, as the workers measure them.)
        # Shared-memory descriptors held by tasks not yet finished, so that
        # workers started by fork can close them (see _descriptors).
        self._task_fds: set[int] = set()
        # Warm shared memory that large task arguments travel in, reused
        # once the task is finished and its worker has dropped them.
        self._segments = WarmSegments(snapshots=True)
        # The scheduler thread's state and steps; it owns the workers.  It
        # holds the engine's record and the containers it shares with the
        # caller side, not the engine.
        self._scheduler = Scheduler(
            self.record,
            workers=self._workers,
            estimates=self._estimates,
            task_fds=self._task_fds,
            segments=self._segments,
            exit_results=self._exit_results,
            handle_control=self._handle_control,
            processes=processes,
            context=context,
            maxtasksperchild=maxtasksperchild,
            max_memory=max_memory,
            config_args=config_args,
            config_inline=config_inline,
            shared=shared,
            shared_data=shared_data,
            shared_fds=shared_fds,
            remote_traceback=remote_traceback,
        )
        self._generation = _fork_generation

        # Initial workers start from the caller's thread, before the
        # scheduler thread exists: with fork, a single-threaded parent is the
        # safe case (and Python 3.12+ warns about forking with threads).
        live_engines.add(self)  # before any worker starts: see descriptors
        what = "its first worker process"
        try:
            _check_may_have_children()
            for _ in range(processes):
                self._scheduler.start_worker()
            what = "its scheduler thread"
            self._start_thread("shoal-scheduler")
        except BaseException as exc:
            live_engines.discard(self)
            self._scheduler.abort_start()
            if not defer_start_errors or not isinstance(exc, Exception):
                exc.add_note(cannot_start(what, exc))
                raise
            # As concurrent.futures does: the executor exists, and every
            # submit raises BrokenProcessPool (a WorkerStartError) saying why.
            self.record.mark_broken(exc)
            self._start_failure = cannot_start(what, exc)
            self._ended = True
            self._finished.set()

    # ------------------------------------------------------------------
    # caller side
    # ------------------------------------------------------------------
    def function_ref(self, fn: Any) -> tuple[int, Any]:
        """An id for *fn* that workers cache, with its pickled form for the
        workers that have not seen it yet; ``(0, None)`` when *fn* must
        travel inside each task instead.

        Functions and builtins are cached, pickled by shoal's policy for
        code (:func:`shoal._serialization.function_bytes`): by name where
        the workers can import them, as with the standard library, else by
        value.  A function sent by value is pickled again when a global it
        uses was rebound since (the entry's fourth item checks), so workers
        get the current value.  Closures, partials, bound methods and
        callable objects travel inside each task, so they always carry the
        current values of what they hold.
        """
        if type(fn) is types.FunctionType:
            if fn.__closure__ is not None:
                return 0, None
        elif type(fn) is not types.BuiltinFunctionType:
            return 0, None
        key = id(fn)
        entry = self._fn_cache.get(key)  # a dict read is atomic: no lock needed
        if entry is not None:
            if entry[3] is None:
                if entry[0] is fn:
                    return entry[1], entry
            elif entry[0]() is fn and entry[3]():
                return entry[1], entry
        try:
            fn_bytes, current = function_bytes(fn)
        except Exception:  # noqa: BLE001 - pickled per task instead, which raises with the usual message
            return 0, None
        # A function sent by name lives as long as its module anyway; one
        # sent by value (a lambda) is held weakly: the caller keeps nothing
        # of a finished task.
        held = fn if current is None else weakref.ref(fn)
        with self._fn_lock:
            entry = (held, next(self._fn_ids), fn_bytes, current)
            self._fn_cache[key] = entry
            if len(self._fn_cache) > 4 * FN_CACHE:
                self._fn_cache.popitem(last=False)
        return entry[1], entry

    def make_task(
        self,
        fn: Any,
        mode: int,
        payload: Any,
        sink: ResultSink,
        index: int = 0,
        timeout: float | None = None,
        fn_ref: Any = None,
    ) -> Task:
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
        # Task(id, fn_id, fn_ref, mode, data, fds, sink, index, timeout, n): positional, see Task
        return Task(next(self._ids), fn_id, entry, mode, data, fds, sink, index, timeout, n)

    def submit_call(
        self, fn: Any, args: tuple, kwargs: dict, sink: ResultSink, timeout: float | None = None
    ) -> Task:
        """Serialize and queue ``fn(*args, **kwargs)``: the hot path of
        apply_async and submit, kept short on purpose."""
        record = self.record
        if record.state != RUN or self._generation != _fork_generation:
            self._check_running()
        entry = self._last_fn  # (fn, fn_id, fn_bytes, None), read once: callers may race
        if entry[0] is fn:
            fn_id = entry[1]
        else:
            fn_id, entry = self.function_ref(fn)
            if fn_id and entry[3] is None:  # by name: never pickled again
                self._last_fn = entry
        if timeout is None:
            timeout = self.task_timeout
        task = None
        if not kwargs and fn_id:
            # The fast path: arguments that are all plain immutable values
            # (None, int, float, bool, complex; str and bytes shorter than
            # RAW_BYTES_LIMIT) cannot fail to pickle, so they are not pickled
            # here but inside the batch message, with their neighbours, and
            # the worker gets them without a pickle of their own.  raw_task
            # says None otherwise.
            task = raw_task(next(self._ids), fn_id, entry, CALL_RAW, args, sink, timeout, RAW_BYTES_LIMIT)
        if task is None:
            # Without keyword arguments only the args tuple is pickled: one
            # object fewer per task, which the garbage collector notices.
            if kwargs:
                mode = CALL_KW
                payload: Any = (args, kwargs)
            else:
                mode = CALL
                payload = args
            if fn_id == 0:
                payload = (fn, payload)
            fds: list[int] = []
            data = _serialize(payload, fds, self._segments)
            if fds:
                self._task_fds.update(fds)
            # (positional: see Task)
            task = Task(next(self._ids), fn_id, entry, mode, data, fds, sink, 0, timeout)
        self._pending.append(task)
        self._submitted_n += 1
        record.dirty = True  # Scheduler.mark_dirty(), inline: the per-task path
        if record.sleeping:
            self._scheduler.mark_dirty()
        if self._ended:
            self._reject((task,))
        return task

    def submit_tasks(self, tasks: list[Task], from_feeder: bool = False) -> None:
        """Queue serialized tasks for the workers.

        An imap feeder that started before close() may go on submitting.
        """
        state = self.record.state
        if state != RUN and not (from_feeder and state == CLOSE):
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

    def _reject(self, tasks: Any) -> None:
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

    def map_chunksize(self, n: int, fn: Any = None) -> int:
        """Chunk size for a map of *n* items when the caller gave none.

        Never larger than the standard library's (n / 4 per worker), and
        smaller when this function's measured duration says chunks of that
        size would take longer than CHUNK_SECONDS: smaller chunks balance the
        tail of uneven work across workers.
        """
        chunksize, extra = divmod(n, self._processes * 4)
        chunksize = max(1, chunksize + (1 if extra else 0))
        est = self._estimates.get(self.fn_key(fn)) if fn is not None else None
        if est is not None and est > 0:
            chunksize = max(1, min(chunksize, int(CHUNK_SECONDS / est)))
        return chunksize

    def fn_key(self, fn: Any) -> int:
        entry = self._fn_cache.get(id(fn))
        if entry is None:
            return 0
        held = entry[0] if entry[3] is None else entry[0]()
        return entry[1] if held is fn else 0

    def inflight_bound(self, fn: Any = None, chunksize: int = 1) -> int:
        """How many tasks an imap keeps submitted but unconsumed: enough for
        every worker to hold CREDIT full batches, so batching never starves."""
        est = self._estimates.get(self.fn_key(fn)) if fn is not None else None
        if est is None:
            per_batch = 1
        else:
            per_batch = max(1, min(MAX_BATCH, int(BATCH_SECONDS / max(est * chunksize, 1e-7))))
        return max(4 * self._processes, min(2 * CREDIT * per_batch * self._processes, 1 << 16))

    def _wake(self) -> None:
        """Tell the scheduler that something changed (see Scheduler.run)."""
        self._scheduler.mark_dirty()

    def statistics(self) -> PoolStatistics:
        sched = self._scheduler
        running = sum(len(w.inflight) for w in list(self._workers.values()))
        return PoolStatistics(
            workers=len(self._workers),
            tasks_submitted=self._submitted_n,
            tasks_pending=len(self._pending),
            tasks_running=running,
            tasks_completed=sched.completed,
            tasks_failed=sched.failed,
            tasks_cancelled=sched.cancelled,
            workers_started=sched.started,
            workers_replaced=sum(sched.replaced.values()),
            replaced_because=dict(sched.replaced),
            task_seconds_estimate=min(self._estimates.values()) if self._estimates else None,
        )

    def worker_processes(self) -> list[WorkerProcess]:
        return [WorkerProcess(w.proc) for w in list(self._workers.values())]

    @property
    def worker_pids(self) -> list[int]:
        return [w.pid for w in list(self._workers.values())]

    # ------------------------------------------------------------------
    # the scheduler thread: Engine._run's steps, each the Scheduler's
    # ------------------------------------------------------------------
    def _loop(self) -> None:
        self._scheduler.run()

    def _dispatch(self) -> None:
        self._scheduler.dispatch()

    def _cancel(self, task: Task, exc: BaseException) -> None:
        self._scheduler.cancel(task, exc)

    def _interrupt(self, match: Any, exc: BaseException) -> None:
        self._scheduler.interrupt(match, exc)

    def _fail(self, task: Task, exc: BaseException, *, cancelled: bool = False) -> None:
        self._scheduler.fail(task, exc, cancelled=cancelled)

    def _fail_everything(self, exc: BaseException) -> None:
        self._scheduler.fail_everything(exc)

    def _kill_workers(self, graceful: bool) -> None:
        self._scheduler.kill_workers(graceful)

    def _close_resources(self) -> None:
        self._scheduler.close_resources()

    def descriptors(self) -> list[int]:
        """Descriptors this engine holds that no child process should keep."""
        return self._scheduler.descriptors()


def _serialize(payload: Any, fds: list[int], segments: WarmSegments) -> bytes:
    """Pickle a task's payload; large buffers go to warm shared memory (read
    only in the worker, so it cannot silently write into memory the caller
    thinks private), and the descriptors to pass beside the message are
    appended to *fds*."""
    previous = swap_sending(fds)  # once per task: no context-manager object
    try:
        return dumps(payload, oob=True, what="the task's arguments", segments=segments, writable=False)
    finally:
        swap_sending(previous)


def _serialize_shared(obj: Any) -> tuple[bytes, list[int]]:
    """Pickle the pool's shared object once: ``(data, fds)``, its large
    buffers copied into memfds (owned by the caller) that workers map."""
    with collecting_fds() as fds:
        try:
            return dumps(obj, oob=True, what="the pool's shared object"), fds
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise


#: The standard library's contexts: the only ones whose processes the
#: scheduler drives (``sentinel``, ``join``, ``close``, ``kill``, fork's and
#: spawn's ``Popen``).
_STDLIB_CONTEXTS = (
    multiprocessing.context.ForkContext,
    multiprocessing.context.SpawnContext,
    multiprocessing.context.ForkServerContext,
)


_STDLIB_METHODS = ("fork", "spawn", "forkserver")


def _foreign_default() -> str | None:
    """This process's default start method when another library set one of
    its own (loky sets ``"loky"`` in its workers), else None."""
    method = multiprocessing.get_start_method(allow_none=True)
    return method if method is not None and method not in _STDLIB_METHODS else None


def drivable_context(context: Any) -> Any:
    """The standard library's context that starts this pool's workers.

    Another library may install a context of its own as the default: loky
    does in its workers (start method ``"loky"``), whose ``Popen`` has
    neither ``close()`` nor ``kill()``.  shoal drives only the standard
    library's process machinery: it takes the standard library's context of
    the same start method, and ``fork`` for a start method of another
    library.  Not ``spawn`` or ``forkserver``: in a process whose default
    start method is another library's, the standard library passes that
    method to every process it starts that way, and the new process, which
    has not imported that library, fails to start.  So an explicit spawn or
    forkserver context there raises ValueError saying so.
    """
    if not isinstance(context, _STDLIB_CONTEXTS):
        try:
            context.get_start_method()
        except Exception:  # noqa: BLE001 - not a context at all: say so
            raise TypeError(
                f"context must be a multiprocessing context or a start method name, got "
                f"{type(context).__name__} {context!r:.60}"
            ) from None
        return multiprocessing.context._concrete_contexts["fork"]  # type: ignore[attr-defined]  # not in typeshed
    foreign = _foreign_default()
    if foreign is not None and context.get_start_method() != "fork":
        raise ValueError(
            f"workers cannot start with {context.get_start_method()!r} in this process: its default start "
            f"method is {foreign!r} (another library's: loky sets 'loky' in its workers), which the standard "
            "library passes to every process it starts with spawn or forkserver, and which such a process "
            "cannot use. Use context='fork', or no context, here"
        )
    return context


def recycling_context() -> Any:
    """The context of an executor whose workers are recycled
    (``max_tasks_per_child``) when none is given: ``spawn``, as the standard
    library (3.11+) chooses, or ``fork`` where spawn cannot start processes
    (see :func:`drivable_context`)."""
    return mp_context("fork" if _foreign_default() is not None else "spawn")


def _check_may_have_children() -> None:
    """A daemonic process (a task of the standard library's Pool, a
    ``Process(daemon=True)``) cannot start processes: say so before the
    first worker fails to start, and say what to do."""
    if multiprocessing.current_process().daemon:
        raise AssertionError(
            "daemonic processes are not allowed to have children: this code runs in a daemonic process "
            f"({multiprocessing.current_process().name}; a task of multiprocessing.Pool, or a Process "
            "started with daemon=True), which cannot start the pool's worker processes. Do the work "
            "in this process, or run the outer work on shoal.Pool, shoal.ProcessPoolExecutor or "
            "concurrent.futures.ProcessPoolExecutor, whose workers may start processes"
        )


def mp_context(method: str) -> Any:
    """``multiprocessing.get_context(method)``, with an error that lists the
    start methods this platform has."""
    try:
        return multiprocessing.get_context(method)
    except ValueError:
        valid = ", ".join(repr(m) for m in multiprocessing.get_all_start_methods())
        raise ValueError(f"unknown start method {method!r}: use one of {valid}") from None


import atexit  # noqa: E402 - registered after multiprocessing.util's own handler, so it runs first

atexit.register(_terminate_all_at_exit)
