"""shoal's pool engine on a Dask cluster (``Pool(backend="dask")``).

:class:`DaskEngine` has the interface of :class:`shoal._engine.Engine`, so
``Pool``, ``ProcessPoolExecutor``, ``AsyncResult``, ``map`` and the lazy
``imap`` run unchanged on it; only where tasks run differs.  Dask's
``distributed`` scheduler costs about a millisecond per task, so the engine
never gives it one tiny task at a time: it groups tasks into *batches*, each
one Dask task, and shares large data once instead of sending it with every
task.

Data flow::

    caller threads               dispatcher thread ("shoal-dask")       Dask cluster
    --------------               --------------------------------       ------------
    submit_call / make_task:     pending (deque of _Task)               scheduler
      the function pickled once    │                                      │
      per call (per map), the      ▼                                      ▼
      arguments per task (errors batches: ~BATCH_SECONDS of work by    a worker runs
      surface here); buffers      measured time per item, a fair       _run_batch():
      >= SHARE_THRESHOLD are      share of what is pending, at most     unpickle, run
      scattered once per call    BATCH_BYTES; sent while fewer than     each task, pickle
      and referenced, not copied CREDIT x worker threads are in flight   each result or
                                  ─── client.submit(_run_batch) ─────►   exception
                                 a wait on the client's event   ◄──── (ok, bytes, secs)
                                  loop queues each done batch; the       per task
                                  dispatcher gathers finished batches
                                  in one call and delivers each
                                  task's outcome to its sink ──────► result objects,
                                                                      callback thread

Ownership: the dispatcher thread alone submits batches, reads their results
and calls the sinks (``deliver``).  Callers touch only the ``pending`` and
``control`` deques and the wake-up condition, and may scatter data (the Dask
client is thread-safe).  With no ``address`` the engine starts a
``LocalCluster`` of worker processes and owns it: ``close`` / ``terminate``
shut it down.  With an ``address`` it only connects and never stops what it
did not start.

Sharing: a call's function is pickled once for all its tasks.  Buffers of at
least SHARE_THRESHOLD bytes met while pickling arguments (numpy arrays, and
anything else pickled out of band with protocol 5) are scattered to the
cluster once per call and referenced by every task of that call; workers
fetch them peer to peer and each task unpickles its own writable copy, as
with the standard library.  ``shared=obj`` is scattered once to every worker
(``broadcast=True``) and returned by :func:`shared` inside tasks.  Objects
that hold a file descriptor of this machine (SharedDict, Pipe, Queue, ...)
are refused with a :class:`~shoal.SerializationError` saying they are
node-local: a worker elsewhere could not use them, and writes would be lost.

Worker deaths: Dask runs a task again when its worker dies, up to
``distributed.scheduler.allowed-failures`` times (ALLOWED_FAILURES for the
cluster this engine owns), then reports ``KilledWorker``.  A batch of several
tasks, or a map chunk of several items, that ends so is split into at most
SPLIT_WAYS pieces, each run alone; a single item that still kills its worker
fails with :class:`~shoal.WorkerDiedError` naming the function and the item,
and everything else completes.

Shutdown: ``close()`` lets queued work finish, then the dispatcher closes the
client (and the cluster it owns) and exits; ``terminate()`` fails what is
unfinished with :class:`~shoal.PoolClosedError`, cancels the Dask futures and
does the same.  Not available on Dask: per-task time limits,
``maxtasksperchild`` and ``max_memory`` (Dask's workers are not the pool's
to replace) -- they raise ``ValueError``; a running task cannot be
interrupted, so ``cancel()`` fails it at once and drops its late result.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import pickle
import socket
import threading
import time
import traceback
import types
import uuid
import weakref
from collections import OrderedDict, deque
from typing import Any, cast

import dask
import distributed

from ._engine import (
    CALL,
    CALL_KW,
    MAP,
    NO_SHARED,
    Engine,
    PoolStatistics,
    at_exit_all,
    set_thread_shared,
    with_traceback_type,
)
from ._engine import CallbackThread as _CallbackThread
from ._fd import fd_from_buffer, map_private_fd, sending_fds
from ._serialization import (
    LargeBuffers,
    dumps,
    find_unpicklable,
    loads,
    pack_exception,
    pickle_code,
    starting_process,
    unpack_exception,
)
from .exceptions import (
    PoolClosedError,
    RemoteTraceback,
    SerializationError,
    ShoalError,
    WorkerDiedError,
    WorkerStartError,
)

__all__ = ("DaskEngine",)

#: Work per Dask task: long enough that Dask's ~1 ms per task vanishes.
BATCH_SECONDS = 0.05
#: Most tasks in one batch, whatever the estimate says.
MAX_BATCH = 4096
#: Most pickled bytes of arguments in one batch (Dask warns about large graphs).
BATCH_BYTES = 1 << 20
#: Batches in flight per worker thread: one running, one ready to start.
CREDIT = 2
#: Buffers at least this large are scattered once, not sent with each task.
SHARE_THRESHOLD = 256 * 1024
#: A task whose pickled arguments are this large travels by scatter too.
SCATTER_TASK_BYTES = 1 << 20
#: Target duration of one map chunk once the function's speed is known.
CHUNK_SECONDS = 0.2
#: Times Dask runs a task again after its worker died (the owned cluster).
ALLOWED_FAILURES = 1
#: Pieces a batch or chunk that killed its workers is split into.
SPLIT_WAYS = 64
#: Seconds between refreshes of the cluster's worker count (external cluster).
REFRESH_SECONDS = 2.0

_RUN, _CLOSE, _TERMINATE, _BROKEN = "running", "closed", "terminated", "broken"
_OK, _INIT_FAILED = 0, 1


# -- pickling that refuses node-local objects ----------------------------------


class _NodeLocalError(Exception):
    pass


class _RefuseFds(list):
    """Stands in for the descriptor list of shoal's fd passing: an object that
    would send a descriptor of this machine (shoal._fd.reduce_fd)
    raises instead.  A collecting list owns what is appended to it (objects
    hand it a duplicate), so the descriptor is closed here."""

    def append(self, fd: int) -> None:
        os.close(fd)
        raise _NodeLocalError("a file descriptor of this machine")


_REFUSE = _RefuseFds()


def _node_local_error(obj: Any, what: str) -> SerializationError:
    culprit = find_unpicklable(obj, 0)
    name = type(culprit if culprit is not None else obj).__qualname__
    return SerializationError(
        f"cannot send {what} to a Dask worker: {name} holds a file descriptor of this machine "
        "(SharedDict, SharedArray, Pipe, Queue and Actor are node-local), which a worker on another "
        "machine cannot use, and writes made there would be lost. Pass plain data instead "
        "(for example dict(d) for a SharedDict), or use the local backend (backend=None)"
    )


def _pickle(obj: Any, what: str) -> tuple[bytes, list[pickle.PickleBuffer]]:
    """Pickle *obj* with its buffers of at least SHARE_THRESHOLD bytes out of
    band (returned, to be scattered).  Raises SerializationError."""
    large = LargeBuffers(SHARE_THRESHOLD)
    try:
        with sending_fds(_REFUSE):
            try:
                # A Dask worker runs its own __main__: code of ours travels by value.
                return pickle_code(obj, large, foreign=True), large.taken
            except _NodeLocalError:
                raise _node_local_error(obj, what) from None
            except Exception:  # noqa: BLE001 - shoal's message next
                pass
            dumps(obj, what=what, foreign=True)  # fails again, with shoal's message naming the culprit
            raise SerializationError(f"cannot pickle {what}")
    except SerializationError as exc:
        if isinstance(exc.__cause__, _NodeLocalError):
            raise _node_local_error(obj, what) from None
        raise


def _dumps_result(value: Any) -> bytes:
    try:
        with sending_fds(_REFUSE):
            return dumps(value, what="the task's result")
    except SerializationError as exc:
        if isinstance(exc.__cause__, _NodeLocalError):
            raise _node_local_error(value, "the task's result") from None
        raise


# -- the worker side -------------------------------------------------------------

_NOTHING = object()
_init_lock = threading.Lock()
#: pool token -> None (initializer ran) or the packed exception it raised
_initialized: dict[str, bytes | None] = {}


class _Shared:
    """``shared=obj`` on its way to the workers: unpickled once per worker
    process by Dask (``__reduce__``), or once per object in-process."""

    def __init__(self, data: bytes, buffers: list) -> None:
        self.data = data
        self.buffers = buffers
        self.value: Any = _NOTHING
        self.lock = threading.Lock()

    def __reduce__(self):
        return _unpickle, (self.data, self.buffers)

    def load(self) -> Any:
        with self.lock:
            if self.value is _NOTHING:
                self.value = _unpickle(self.data, self.buffers)
            return self.value


def _unpickle(data: bytes, buffers) -> Any:
    return pickle.loads(data, buffers=buffers)


def _loads_task(data: bytes, buffers, cow: bool) -> Any:
    # Each task gets its own writable copy of shared buffers, as with the
    # standard library: the worker's copy is shared by every task it runs.
    return pickle.loads(data, buffers=[_private_copy(key, b, cow) for key, b in buffers])


#: Scattered buffers at least this large are copied once per worker process
#: into a memfd that each task maps copy-on-write (tens of microseconds, and
#: only the pages a task touches are read) instead of copying per task.
COW_THRESHOLD = 1 << 20
#: Most bytes of such copies a worker process keeps (least recently used go).
COW_CACHE_BYTES = 1 << 30
_cow_lock = threading.Lock()
_cow: OrderedDict[str, tuple[int, int]] = OrderedDict()  # Dask key -> (memfd, size)


def _private_copy(key: str, buffer, cow: bool):
    view = memoryview(buffer)
    if not cow or view.nbytes < COW_THRESHOLD:
        return bytearray(view)
    with _cow_lock:
        entry = _cow.get(key)
        if entry is None:
            entry = _cow[key] = (fd_from_buffer(view), view.nbytes)
            total = sum(size for _, size in _cow.values())
            while total > COW_CACHE_BYTES and len(_cow) > 1:
                fd, size = _cow.popitem(last=False)[1]
                os.close(fd)
                total -= size
        else:
            _cow.move_to_end(key)
        fd = os.dup(entry[0])
    return map_private_fd(fd, entry[1])


def _forget_released() -> None:
    """Close the copies of buffers this worker no longer holds (their pool
    released them)."""
    if not _cow:
        return
    data = distributed.get_worker().data
    with _cow_lock:
        for key in [k for k in _cow if k not in data]:
            os.close(_cow.pop(key)[0])


class _Unloadable:
    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


def _run_batch(
    token: str, client_pid: int, init: bytes | None, shared_value: tuple, fns: list, entries: list
):
    """Run one batch on a Dask worker (the one Dask task of a batch).

    *entries* are ``(fn index, mode, data, buffers, start, stop)``; a map
    chunk split after a crash runs only ``items[start:stop]``; *buffers*
    are ``(Dask key, buffer)`` pairs.  Returns ``(_OK, [(ok, pickled result
    or exception, seconds), ...])``.
    """
    # A worker in the client's own process (an in-process cluster) copies
    # per task: its copy-on-write cache would outlive the cluster.
    cow = os.getpid() != client_pid
    if cow:
        _forget_released()
    # shoal.shared() works in the initializer too, as on the local backend.
    previous = None
    if shared_value:
        value = shared_value[0]
        previous = set_thread_shared(value.load() if type(value) is _Shared else value)
    try:
        if init is not None:
            with _init_lock:
                if token not in _initialized:
                    try:
                        fn, args = pickle.loads(init)
                        fn(*args)
                        _initialized[token] = None
                    except BaseException as exc:  # noqa: BLE001 - reported to the pool
                        _initialized[token] = pack_exception(exc, "the initializer")
                failure = _initialized[token]
            if failure is not None:
                return _INIT_FAILED, failure
        funcs = []
        for fn_bytes, fn_buffers in fns:
            try:
                funcs.append(_loads_task(fn_bytes, fn_buffers, cow))
            except BaseException as exc:  # noqa: BLE001 - fails the tasks that use it
                funcs.append(_Unloadable(exc))
        results = []
        perf = time.perf_counter
        for fi, mode, data, buffers, start, stop in entries:
            started = perf()
            try:
                fn = funcs[fi]
                if type(fn) is _Unloadable:
                    raise fn.error
                args = _loads_task(data, buffers, cow)
                if mode == CALL:
                    value = fn(*args)
                elif mode == CALL_KW:
                    value = fn(*args[0], **args[1])
                else:
                    if start is not None:
                        args = args[start:stop]
                    value = [fn(x) for x in args] if mode == MAP else [fn(*x) for x in args]
                out = _dumps_result(value)
                ok = True
            except BaseException as exc:  # noqa: BLE001 - a task error is a result
                ok = False
                out = pack_exception(exc)
            results.append((ok, out, perf() - started))
    finally:
        if previous is not None:
            set_thread_shared(previous)
    return _OK, results


# -- the client side ---------------------------------------------------------------


class _Scope:
    """What the tasks of one call share: the function, pickled once, and the
    large buffers of their arguments, scattered once (by object identity;
    the objects are kept alive meanwhile, so identities are not reused)."""

    __slots__ = ("blob", "engine", "fn", "key", "scattered")

    def __init__(self, engine: DaskEngine, fn, blob: tuple, key: str) -> None:
        self.engine = engine
        self.fn = fn
        self.blob = blob
        self.key = key
        self.scattered: dict[int, tuple[Any, Any]] = {}

    def share(self, buffers: list[pickle.PickleBuffer]) -> list:
        futures: list = [None] * len(buffers)
        new = []
        for i, pb in enumerate(buffers):
            owner = pb.raw().obj
            entry = self.scattered.get(id(owner))
            if entry is not None and entry[0] is owner:
                futures[i] = entry[1]
            else:
                new.append(i)
        if new:
            sent = self.engine._scatter([buffers[i] for i in new])
            for i, future in zip(new, sent, strict=False):
                futures[i] = future
                owner = buffers[i].raw().obj
                self.scattered[id(owner)] = (owner, future)
        return futures


class _Task:
    """One unit of work: a call, or a chunk of a map."""

    __slots__ = (
        "batch",
        "buffers",
        "data",
        "fds",
        "id",
        "index",
        "kill_reason",
        "mode",
        "n",
        "nbytes",
        "pieces",
        "ref",
        "scope",
        "sink",
        "timeout",
    )

    def __init__(self, tid, scope, mode, data, buffers, sink, index, n) -> None:
        self.id = tid
        self.scope = scope
        self.mode = mode
        self.data = data
        self.ref = None  # the scattered data, for large tasks
        self.nbytes = len(data)
        self.buffers = buffers
        self.sink = sink
        self.index = index
        self.n = n
        self.fds = ()
        self.timeout = None
        self.kill_reason: str | None = None
        self.batch: _Batch | None = None
        self.pieces: dict[int, Any] | None = None  # start -> result, once split


class _Batch:
    """One Dask task: parts ``(task, start, stop)`` (start None: the whole task)."""

    __slots__ = ("future", "id", "parts")

    def __init__(self, bid: int, parts: list) -> None:
        self.id = bid
        self.parts = parts
        self.future: Any = None  # the distributed.Future, once submitted


class _NoCredentials(OSError):
    """A tls:// address, and no TLS credentials in Dask's configuration."""


def _check_listening(address: str) -> None:
    """Fail at once, with OSError, when nothing listens at a tcp:// or tls://
    address (Dask's client would retry for its whole connect timeout, then
    leave its event loop's descriptors open), or when a tls:// address is
    given without TLS credentials in Dask's configuration."""
    try:
        scheme, location = distributed.comm.parse_address(address)
        host, port = distributed.comm.parse_host_port(location)
    except (ValueError, TypeError):
        return  # Dask reports a malformed address itself
    if scheme in ("tcp", "tls") and port:
        socket.create_connection((host, port), timeout=10).close()
    if scheme == "tls" and distributed.Security().get_connection_args("client").get("ssl_context") is None:
        raise _NoCredentials(
            "it speaks TLS and this process has no TLS credentials: set Dask's "
            "distributed.comm.tls.ca-file, distributed.comm.tls.client.cert and "
            "distributed.comm.tls.client.key (its configuration file or DASK_DISTRIBUTED__COMM__TLS__... "
            "environment variables)"
        )


def _fn_key(fn) -> str:
    """What task-duration estimates are kept by."""
    return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"


def _keyed(futures) -> list:
    """Scattered buffers as (key, future) pairs: Dask replaces each future
    by its value on the worker, which caches its copy by key."""
    return [(f.key, f) for f in futures] if futures else []


_live_engines: weakref.WeakSet[DaskEngine] = weakref.WeakSet()


@atexit.register
def _stop_all_at_exit() -> None:
    # Not the local engine's registry and handler: that one is registered
    # when shoal is imported, before distributed, so it would run after
    # distributed's own exit handlers have closed its clients.  This one is
    # registered after them, so it runs first.
    at_exit_all(_live_engines)


class DaskEngine(Engine):
    """Tasks batched onto a Dask cluster, behind the interface of shoal's Engine.

    It inherits the Engine's caller-side lifecycle (close, terminate, join,
    cancel, the imap feeder count, the running-state checks), which touches
    only what both engines have -- ``_state``, ``_control``, ``_wake()``,
    ``_thread``, ``_finished``, ``callbacks``, ``results_cond`` -- and
    replaces the rest; ``Engine.__init__`` (which starts local workers) is
    not called.
    """

    # A Dask task costs ~1 ms: lazily chunked maps aim for longer chunks.
    _chunk_seconds = CHUNK_SECONDS
    _max_batch = MAX_BATCH

    def __init__(
        self,
        processes: int | None = None,
        initializer=None,
        initargs=(),
        maxtasksperchild: int | None = None,
        context=None,  # unused: Dask starts its own workers
        *,
        address: str | None = None,
        max_memory: int | None = None,
        task_timeout: float | None = None,
        shared: Any = NO_SHARED,
        graceful_exit: bool = False,
        remote_traceback: type = RemoteTraceback,
    ) -> None:
        if processes is not None and (
            not isinstance(processes, int) or isinstance(processes, bool) or processes < 1
        ):
            raise ValueError(f"Number of processes must be at least 1, got {processes!r}")
        if address is not None and not isinstance(address, str):
            raise TypeError(f"address must be a string like 'tcp://host:8786', got {type(address).__name__}")
        for name, value, instead in (
            ("maxtasksperchild", maxtasksperchild, "start workers with `dask worker --lifetime`"),
            ("max_memory", max_memory, "start workers with `dask worker --memory-limit`"),
            ("task_timeout", task_timeout, "a running Dask task cannot be interrupted"),
        ):
            if value is not None:
                raise ValueError(
                    f"{name} is not supported with backend='dask' ({instead}); use the local backend"
                )
        if initializer is not None and not callable(initializer):
            raise TypeError(f"initializer must be a callable, got {type(initializer).__name__}")
        try:
            self._init = (
                pickle_code((initializer, tuple(initargs)), foreign=True) if initializer is not None else None
            )
        except Exception as exc:
            raise SerializationError(f"cannot pickle the initializer or its initargs: {exc}") from exc
        shared_blob = None
        if shared is not NO_SHARED:
            shared_blob = _pickle(shared, "the shared object")

        self._token = uuid.uuid4().hex
        self._owner_pid = os.getpid()
        self.task_timeout = None
        self._state = _RUN
        self._broken_error: BaseException | None = None
        self._pending: deque[_Task] = deque()  # type: ignore[assignment]  # this engine's own task type
        self._isolated: deque[tuple[_Task, int | None, int | None]] = deque()
        self._control: deque = deque()
        self._done: deque[_Batch] = deque()
        self._inflight: dict[int, _Batch] = {}
        self._cond = threading.Condition(threading.Lock())
        self._dirty = False
        self._ids = itertools.count(1)
        self._batch_ids = itertools.count(1)
        self._fn_blobs: dict[int, tuple[Any, tuple, str]] = {}
        self._estimates: dict[str, float] = {}  # type: ignore[assignment]  # keyed by _fn_key: a str here
        self._feeders = 0
        # What the inherited caller side (Engine.join, start_thread,
        # worker_exit_results, worker_processes) reads: nothing of it here.
        self._workers: dict = {}
        self.callbacks = _CallbackThread()
        self.results_cond = threading.Condition(threading.Lock())
        self.waiters = 0
        self._finished = threading.Event()
        self._submitted_n = self._completed = self._failed = self._cancelled = self._worker_deaths = 0
        # What the local engine's inherited caller-side methods read.
        self._helpers: weakref.WeakSet[threading.Thread] = weakref.WeakSet()
        self._exit_results: list[tuple[bool, Any]] = []

        self._cluster = None
        self._starting = contextlib.ExitStack()  # see starting_process below
        self._address = address
        if address is None:
            cpus = os.process_cpu_count() if hasattr(os, "process_cpu_count") else os.cpu_count()
            n = processes or cpus or 1
            # A worker that dies counts against every task it holds, queued
            # ones too: with a saturation of 1.0 a worker holds only the one
            # it runs, so an innocent task is never blamed for its neighbour.
            settings = {
                "distributed.scheduler.allowed-failures": ALLOWED_FAILURES,
                "distributed.scheduler.worker-saturation": 1.0,
            }
            # Its nannies start (and restart) worker processes from this
            # process for as long as it runs: none may try to run a main
            # module that is not a file (a program read from stdin).
            self._starting.enter_context(starting_process())
            with dask.config.set(settings):
                self._cluster = distributed.LocalCluster(
                    n_workers=n,
                    threads_per_worker=1,
                    processes=True,
                    host="127.0.0.1",
                    dashboard_address=None,
                    # The scheduler serves HTTP even without a dashboard, on
                    # port 8787 unless told otherwise: any free port instead.
                    scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
                )
            connect_to: distributed.LocalCluster | str = self._cluster
        else:
            connect_to = address
        try:
            if address is not None:
                _check_listening(address)
            self._client = distributed.Client(connect_to, set_as_default=False)
        except OSError as exc:
            self._close_cluster()
            hint = (
                ""
                if isinstance(exc, _NoCredentials)
                else f". Start one with `dask scheduler` and workers with `dask worker {address}`, "
                "or pass address=None for a local cluster"
            )
            raise ConnectionError(f"cannot connect to the Dask scheduler at {address}: {exc}{hint}") from exc
        except BaseException:
            self._close_cluster()
            raise
        try:
            self._cap = processes if address is not None else None
            self._slots = 1
            self._refreshed = 0.0
            self._refresh_slots()
            self._shared: tuple = ()
            if shared_blob is not None:
                data, buffers = shared_blob
                self._shared = (self._client.scatter(_Shared(data, buffers), broadcast=True, hash=False),)
        except BaseException:
            self._close_client()
            raise
        self._processes = processes if processes is not None else self._slots
        _live_engines.add(self)
        self._graceful_exit = graceful_exit
        self._remote_traceback = remote_traceback  # the face's type (Engine._with_traceback_type)
        self._thread = threading.Thread(target=self._run, name="shoal-dask", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------
    # caller side (the interface of shoal._engine.Engine)
    # ------------------------------------------------------------------
    @property
    def client(self) -> distributed.Client:
        """The Dask client this pool submits through."""
        return self._client

    @property
    def worker_pids(self) -> list[int]:
        return sorted(self._client.run(os.getpid).values())

    def function_ref(self, fn) -> _Scope:  # type: ignore[override]  # this engine's own task and function types
        """A new scope for the tasks of one call of *fn* (see _Scope)."""
        cacheable = (
            type(fn) in (types.FunctionType, types.BuiltinFunctionType)
            and getattr(fn, "__module__", None) not in (None, "__main__")
            and "<" not in fn.__qualname__
        )
        if cacheable:  # pickled by reference: the same bytes every time
            entry = self._fn_blobs.get(id(fn))
            if entry is not None and entry[0] is fn:
                return _Scope(self, fn, entry[1], entry[2])
        key = _fn_key(fn)
        data, buffers = _pickle(fn, "the function")
        scope = _Scope(self, fn, (data, []), key)
        if buffers:
            scope.blob = (data, scope.share(buffers))
        if cacheable and not buffers:
            if len(self._fn_blobs) > 512:
                self._fn_blobs.clear()
            self._fn_blobs[id(fn)] = (fn, scope.blob, key)
        return scope

    def make_task(  # type: ignore[override]  # this engine's own task type
        self, fn, mode: int, payload, sink, index: int = 0, timeout=None, fn_ref=None
    ) -> _Task:
        """Serialize one task in the caller's thread (errors surface here)."""
        if timeout is not None:
            raise ValueError(
                "task_timeout is not supported with backend='dask' "
                "(a running Dask task cannot be interrupted)"
            )
        scope = fn_ref if fn_ref is not None else self.function_ref(fn)
        n = 1 if mode in (CALL, CALL_KW) else len(payload)
        data, buffers = _pickle(payload, "the task's arguments")
        scattered = scope.share(buffers) if buffers else ()
        task = _Task(next(self._ids), scope, mode, data, scattered, sink, index, n)
        if len(data) >= SCATTER_TASK_BYTES:
            task.ref = self._scatter([data])[0]
            task.data = b""
        return task

    def submit_call(  # type: ignore[override]  # this engine's own task type
        self, fn, args: tuple, kwargs: dict, sink, timeout: float | None = None
    ) -> _Task:
        if self._state != _RUN or os.getpid() != self._owner_pid:
            self._check_running()
        if kwargs:
            task = self.make_task(fn, CALL_KW, (args, kwargs), sink, 0, timeout)
        else:
            task = self.make_task(fn, CALL, args, sink, 0, timeout)
        self._queue([task])
        return task

    def submit_tasks(self, tasks: list[_Task], from_feeder: bool = False) -> None:  # type: ignore[override]  # this engine's own task and function types
        if self._state != _RUN and not (from_feeder and self._state == _CLOSE):
            self._check_running()
        self._queue(tasks)

    def _queue(self, tasks: list[_Task]) -> None:
        self._pending.extend(tasks)
        self._submitted_n += len(tasks)
        self._wake()
        if self._finished.is_set():
            # The dispatcher ended (terminate() in another thread) while these
            # were being queued: take them back, or they would wait forever.
            for t in tasks:
                try:
                    self._pending.remove(t)
                except ValueError:
                    continue
            self._check_running()
            raise PoolClosedError("the pool was terminated while this task was being submitted")

    def _scatter(self, values: list) -> list:
        try:
            return self._client.scatter(values, hash=False)
        except Exception as exc:
            if self._state == _TERMINATE or self._finished.is_set():
                raise PoolClosedError("the pool was terminated while this task was being submitted") from exc
            raise

    def map_chunksize(self, n: int, fn=None) -> int:
        """The standard library's chunk size (n / 4 per worker), smaller when
        the function's measured speed says chunks would run over CHUNK_SECONDS."""
        chunksize, extra = divmod(n, self._slots * 4)
        chunksize = max(1, chunksize + (1 if extra else 0))
        est = self._estimate(fn)
        if est:
            chunksize = max(1, min(chunksize, int(CHUNK_SECONDS / est)))
        return chunksize

    def inflight_bound(self, fn=None, chunksize: int = 1) -> int:
        """Tasks an imap keeps submitted and unconsumed: enough for CREDIT
        full batches per worker thread."""
        est = self._estimate(fn)
        if est is None:
            per_batch = 1
        else:
            per_batch = max(1, min(MAX_BATCH, int(BATCH_SECONDS / max(est * chunksize, 1e-7))))
        return max(4 * self._slots, min(2 * CREDIT * per_batch * self._slots, 1 << 16))

    def _fn_key(self, fn) -> str:  # type: ignore[override]  # Engine.auto_chunksize reads _estimates by it
        return _fn_key(fn)

    def _estimate(self, fn) -> float | None:
        if fn is None:
            return None
        return self._estimates.get(_fn_key(fn))

    def _wake(self) -> None:
        with self._cond:
            self._dirty = True
            self._cond.notify()

    def statistics(self) -> PoolStatistics:
        inflight = list(self._inflight.values())
        return PoolStatistics(
            workers=self._slots,
            tasks_submitted=self._submitted_n,
            tasks_pending=len(self._pending) + len(self._isolated),
            tasks_running=sum(len(b.parts) for b in inflight),
            tasks_completed=self._completed,
            tasks_failed=self._failed,
            tasks_cancelled=self._cancelled,
            workers_started=0,
            workers_replaced=self._worker_deaths,
            replaced_because={"died": self._worker_deaths} if self._worker_deaths else {},
            task_seconds_estimate=min(self._estimates.values()) if self._estimates else None,
        )

    # ------------------------------------------------------------------
    # the dispatcher thread
    # ------------------------------------------------------------------
    # _run (inherited) runs _loop, fails everything if it raises, then
    # calls _close_resources and fails what was queued meanwhile.

    def _kill_workers(self, graceful: bool) -> None:
        pass  # Dask's workers are Dask's: _close_resources closes the cluster the pool owns

    def _close_resources(self) -> None:
        _live_engines.discard(self)
        try:
            self._close_client()
        except Exception:  # noqa: BLE001 - callers must still be released (_run sets _finished next)
            traceback.print_exc()

    def _loop(self) -> None:
        while True:
            with self._cond:
                if not self._dirty:
                    self._cond.wait(REFRESH_SECONDS if self._address is not None else None)
                self._dirty = False
            while self._control:
                self._handle_control(*self._control.popleft())
            if self._done:
                self._collect()
            if self._state == _TERMINATE:
                self._fail_everything(PoolClosedError("the pool was terminated before this task finished"))
                return
            if self._pending or self._isolated:
                self._dispatch()
            if (
                self._state in (_CLOSE, _BROKEN)
                and not self._pending
                and not self._isolated
                and not self._inflight
                and not self._feeders
            ):
                return

    def _refresh_slots(self) -> None:
        """Worker threads in the cluster (capped by processes= on a cluster
        the pool does not own)."""
        now = time.monotonic()
        if self._refreshed and now - self._refreshed < REFRESH_SECONDS:
            return
        self._refreshed = now
        threads = sum(self._client.nthreads().values()) or 1
        self._slots = min(threads, self._cap) if self._cap else threads

    def _dispatch(self) -> None:
        if self._address is not None:
            self._refresh_slots()
        free = CREDIT * self._slots - len(self._inflight)
        # Pieces of a batch that killed its workers go first, each alone.
        while self._isolated and free > 0:
            task, start, stop = self._isolated.popleft()
            if task.kill_reason is None:
                self._submit(_Batch(next(self._batch_ids), [(task, start, stop)]))
                free -= 1
        pending = self._pending
        while pending and free > 0:
            head = pending[0]
            est = self._estimates.get(head.scope.key)
            size = 1 if est is None else max(1, min(MAX_BATCH, int(BATCH_SECONDS / max(est * head.n, 1e-7))))
            take = min(size, -(-len(pending) // free))
            parts: list[tuple[_Task, int | None, int | None]] = []
            nbytes = 0
            while pending and len(parts) < take and nbytes < BATCH_BYTES:
                task = pending.popleft()
                if task.sink.skip(task):
                    self._cancelled += 1
                    continue
                parts.append((task, None, None))
                nbytes += task.nbytes
            if parts:
                self._submit(_Batch(next(self._batch_ids), parts))
                free -= 1

    def _submit(self, batch: _Batch) -> None:
        fns: list = []
        fn_index: dict[int, int] = {}
        entries = []
        for task, start, stop in batch.parts:
            blob = task.scope.blob
            fi = fn_index.get(id(blob))
            if fi is None:
                fi = fn_index[id(blob)] = len(fns)
                fns.append((blob[0], _keyed(blob[1])))
            data = task.ref if task.ref is not None else task.data
            entries.append((fi, task.mode, data, _keyed(task.buffers), start, stop))
            task.batch = batch
        future = self._client.submit(
            _run_batch,
            self._token,
            self._owner_pid,
            self._init,
            self._shared,
            fns,
            entries,
            pure=False,
            key=f"shoal-batch-{batch.id}-{self._token}",
        )
        batch.future = future
        self._inflight[batch.id] = batch
        self._watch(batch)

    def _watch(self, batch: _Batch) -> None:
        """Queue *batch* for the dispatcher once its future is done.

        Not Future.add_done_callback: it runs callbacks through a thread pool
        that the interpreter shuts down before atexit handlers run, so a pool
        finishing its work at exit would never hear of it.  This is the same
        wait on the client's event loop, with a callback that only appends
        and notifies.
        """
        future = batch.future

        async def when_done() -> None:
            while future.status in ("pending", "lost"):  # lost: Dask computes it again
                await future._state.wait()
            self._done.append(batch)
            self._wake()

        self._client.loop.add_callback(when_done)  # type: ignore[union-attr]  # a connected client has a loop

    def _collect(self) -> None:
        """Deliver the outcomes of finished batches."""
        batches = []
        while self._done:
            batch = self._done.popleft()
            if self._inflight.pop(batch.id, None) is not None:
                batches.append((batch, batch.future.status))
        finished = [b for b, status in batches if status == "finished"]
        if finished:
            try:
                outputs = self._client.gather({b.id: b.future for b in finished}, errors="skip")
            except Exception as exc:  # noqa: BLE001 - e.g. the connection to the scheduler is lost
                outputs = {}
                for b in finished:
                    error = ShoalError(f"the results of Dask tasks could not be fetched: {exc!r}")
                    self._fail_batch(b, error)
                    b.future = None
            for b in finished:
                if b.id in outputs:
                    self._deliver_batch(b, outputs[b.id])
                    b.future = None
                elif b.future is not None:
                    self._wait_again(b)
        for batch, status in batches:
            if status == "finished":
                continue
            if status in ("lost", "pending"):
                self._wait_again(batch)
                continue
            if status == "error":
                failure = batch.future.exception()
                if isinstance(failure, distributed.KilledWorker):
                    self._worker_died(batch, failure)
                else:
                    self._fail_batch(batch, failure)
            elif any(task.kill_reason is None for task, _, _ in batch.parts):
                error = ShoalError(f"the Dask cluster dropped this task (its future is {status})")
                self._fail_batch(batch, error)
            batch.future = None
        self._notify()

    def _wait_again(self, batch: _Batch) -> None:
        # Its result was lost with a worker that died after the batch
        # finished: Dask computes it again; wait for that.
        self._inflight[batch.id] = batch
        self._watch(batch)

    def _deliver_batch(self, batch: _Batch, output) -> None:
        kind, payload = output
        if kind == _INIT_FAILED:
            cause = unpack_exception(payload)
            err = WorkerStartError(f"the pool's initializer raised on a Dask worker: {cause!r}")
            err.__cause__ = cause
            self._break(err)
            self._fail_batch(batch, err)
            return
        estimates = self._estimates
        for (task, start, stop), (ok, data, seconds) in zip(batch.parts, payload, strict=False):
            n = task.n if start is None else stop - start
            est = estimates.get(task.scope.key)
            per_item = seconds / max(n, 1)
            estimates[task.scope.key] = per_item if est is None else est * 0.7 + per_item * 0.3
            if task.kill_reason is not None:
                continue  # its caller already has an error: drop the late result
            if ok:
                try:
                    value = loads(data)
                except BaseException as exc:  # noqa: BLE001
                    ok = False
                    value = SerializationError(
                        f"the task's result could not be unpickled here: {type(exc).__name__}: {exc}"
                    )
            else:
                value = with_traceback_type(unpack_exception(data), self._remote_traceback)
            if start is None:
                self._finish(task, ok, value)
            else:
                self._piece_done(task, start, ok, value)

    def _finish(self, task: _Task, ok: bool, value) -> None:
        task.kill_reason = "done"
        task.batch = None
        if ok:
            self._completed += 1
        else:
            self._failed += 1
        task.sink.deliver(task, ok, value)

    def _piece_done(self, task: _Task, start: int, ok: bool, value) -> None:
        if not ok:
            self._finish(task, False, value)
            return
        pieces = cast("dict[int, Any]", task.pieces)  # set when the task was split
        pieces[start] = value
        if all(v is not None for v in pieces.values()):
            out: list = []
            for key in sorted(pieces):
                out.extend(pieces[key])
            self._finish(task, True, out)

    def _fail_batch(self, batch: _Batch, exc: BaseException) -> None:
        for task, _start, _stop in batch.parts:
            if task.kill_reason is None:
                self._finish(task, False, exc)

    def _worker_died(self, batch: _Batch, exc) -> None:
        """Dask gave up on a batch whose workers kept dying: split it, or
        fail the one item that kills them."""
        self._worker_deaths += 1
        parts = [p for p in batch.parts if p[0].kill_reason is None]
        if len(parts) == 1:
            task, start, stop = parts[0]
            n = task.n if start is None else stop - start
            if n == 1:
                self._finish(task, False, self._died_error(task, start, exc))
                return
        split = []
        for task, start, stop in parts:
            task.batch = None
            if task.mode in (CALL, CALL_KW) or task.n == 1 or (start is not None and stop - start == 1):
                split.append((task, start, stop))
                continue
            lo, hi = (0, task.n) if start is None else (start, stop)
            step = -(-(hi - lo) // SPLIT_WAYS)
            if task.pieces is None:
                task.pieces = {}
            task.pieces.pop(lo, None)
            for s in range(lo, hi, step):
                task.pieces[s] = None
                split.append((task, s, min(s + step, hi)))
        self._isolated.extendleft(reversed(split))

    def _died_error(self, task: _Task, start: int | None, exc) -> WorkerDiedError:
        fn = task.scope.fn
        name = getattr(fn, "__qualname__", None) or repr(fn)
        what = f"{name}(...)"
        try:
            if task.ref is None and not task.buffers:
                args = loads(task.data)
                if task.mode == CALL:
                    what = f"{name}{args!r}"
                elif task.mode == CALL_KW:
                    what = f"{name}(*{args[0]!r}, **{args[1]!r})"
                else:
                    what = f"{name}({args[start or 0]!r})"
        except Exception:  # noqa: BLE001 - only a description
            pass
        if len(what) > 200:
            what = what[:197] + "..."
        worker = getattr(exc, "last_worker", None)
        where = getattr(worker, "address", None) or "unknown"
        return WorkerDiedError(
            None,
            None,
            f"The task was {what}. It ran on Dask workers, and each worker running it died (the last was "
            f"{where}); Dask gave up after distributed.scheduler.allowed-failures retries.",
        )

    def _fail(self, task: _Task, exc: BaseException, *, cancelled: bool = False) -> None:  # type: ignore[override]  # this engine's own task and function types
        if cancelled:
            self._cancelled += 1
            task.kill_reason = "cancelled"
            task.batch = None
            task.sink.deliver(task, False, exc)
        else:
            self._finish(task, False, exc)

    def _handle_control(self, what: str, obj, exc) -> None:
        if what == "cancel":
            self._cancel_task(obj, exc)
            self._notify()
        elif what == "interrupt":
            # Ctrl-C in a map (match: its tasks) or at exit (every task):
            # fail them at once.  A Dask task cannot be stopped once it
            # runs; a batch nothing is wanted from is dropped if not started.
            match = obj
            tasks = list(self._pending) + [t for b in list(self._inflight.values()) for t, _, _ in b.parts]
            tasks += [t for t, _, _ in list(self._isolated)]  # split off after worker deaths
            for task in tasks:
                if task.kill_reason is None and (match is None or match(task.sink)):
                    Engine._interrupt_task(task, exc)
                    self._cancel_task(task, exc)
            self._notify()
        else:  # cancel_futures, fail_sink: as the local engine does them
            super()._handle_control(what, obj, exc)

    def _cancel_task(self, task: _Task, exc: BaseException) -> None:
        if task.kill_reason is not None:
            return
        batch = task.batch
        try:
            self._pending.remove(task)
        except ValueError:
            pass
        self._fail(task, exc, cancelled=True)
        if batch is not None and batch.future is not None and all(t.kill_reason for t, _, _ in batch.parts):
            batch.future.cancel()  # nothing in it is wanted; Dask drops it if not started

    def _dispatch_before_cancel(self) -> None:
        self._dispatch()

    def worker_processes(self) -> list:
        """No local worker processes: Dask's workers are not the pool's."""
        return []

    def _break(self, exc: BaseException) -> None:
        if self._state == _TERMINATE:
            return
        if self._broken_error is None:
            self._broken_error = exc
        self._state = _BROKEN
        self._fail_queued(exc)

    def _fail_queued(self, exc: BaseException) -> None:
        while self._pending:
            self._finish(self._pending.popleft(), False, exc)
        while self._isolated:
            task = self._isolated.popleft()[0]
            if task.kill_reason is None:
                self._finish(task, False, exc)

    def _fail_everything(self, exc: BaseException) -> None:
        self._fail_queued(exc)
        futures: list[Any] = []
        for batch in self._inflight.values():
            self._fail_batch(batch, exc)
            if batch.future is not None:
                futures.append(batch.future)
        self._inflight.clear()
        if futures:
            try:
                self._client.cancel(futures, force=True)
            except Exception:  # noqa: BLE001 - the client may already be gone
                pass
        self._notify()

    # -- shutdown ------------------------------------------------------------
    def _close_client(self) -> None:
        try:
            self._shared = ()
            self._fn_blobs.clear()
            self._client.close()
        finally:
            self._close_cluster()

    def _close_cluster(self) -> None:
        cluster, self._cluster = self._cluster, None
        if cluster is not None:
            cluster.close()
        self._starting.close()
