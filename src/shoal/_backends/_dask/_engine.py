"""The client side of the Dask backend: :class:`DaskEngine`.

The engine contract (:class:`shoal._engine.Engine`) with a dispatcher
thread ("shoal-dask") that batches tasks onto a Dask cluster; the package
docstring (:mod:`shoal._backends._dask`) draws the data flow.
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
from collections import deque
from typing import Any, cast

import dask
import distributed

from ..._engine import CALL, CALL_KW, NO_SHARED, Engine, PoolStatistics
from ..._serialization import loads, pickle_code, starting_process, unpack_exception
from ...exceptions import (
    PoolClosedError,
    RemoteTraceback,
    SerializationError,
    ShoalError,
    WorkerDiedError,
    WorkerStartError,
)
from ._wire import INIT_FAILED, SharedValue, pickle_for_dask
from ._worker import run_batch

#: Work per Dask task: long enough that Dask's ~1 ms per task vanishes.
BATCH_SECONDS = 0.05
#: Most tasks in one batch, whatever the estimate says.
MAX_BATCH = 4096
#: Most pickled bytes of arguments in one batch (Dask warns about large graphs).
BATCH_BYTES = 1 << 20
#: Batches in flight per worker thread: one running, one ready to start.
CREDIT = 2
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
#: Longest one gather of finished results may take.  Past it (a worker that
#: held the results died and Dask computes them again) the batches wait for
#: their futures again, so the dispatcher thread, which terminate() waits
#: for, is never stuck in a gather.
GATHER_SECONDS = 5.0


class _Scope:
    """What the tasks of one call share: the function, pickled once, and the
    large buffers of their arguments, scattered once (by object identity;
    the objects are kept alive meanwhile, so identities are not reused)."""

    __slots__ = ("blob", "engine", "fn", "key", "scattered")

    def __init__(self, engine: DaskEngine, fn: Any, blob: tuple, key: str) -> None:
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

    def __init__(
        self, tid: Any, scope: Any, mode: Any, data: Any, buffers: Any, sink: Any, index: Any, n: Any
    ) -> None:
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


def _fn_key(fn: Any) -> str:
    """What task-duration estimates are kept by."""
    return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"


def _keyed(futures: Any) -> list:
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
    for engine in list(_live_engines):
        try:
            engine.at_exit()
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass


class DaskEngine(Engine):
    """Tasks batched onto a Dask cluster: the engine contract
    (:class:`shoal._engine.Engine`: state, close / terminate / join, the
    feeders, the thread's skeleton) with Dask's submit path and dispatcher.
    """

    # A Dask task costs ~1 ms: lazily chunked maps aim for longer chunks.
    chunk_seconds = CHUNK_SECONDS
    max_batch = MAX_BATCH

    def __init__(
        self,
        processes: int | None = None,
        initializer: Any = None,
        initargs: Any = (),
        maxtasksperchild: int | None = None,
        context: Any = None,  # unused: Dask starts its own workers
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
            shared_blob = pickle_for_dask(shared, "the shared object")

        super().__init__(
            processes or 1,  # the cluster's worker threads, once connected (below)
            task_timeout=None,
            graceful_exit=graceful_exit,
            remote_traceback=remote_traceback,
        )
        self._token = uuid.uuid4().hex
        self._isolated: deque[tuple[_Task, int | None, int | None]] = deque()
        self._done: deque[_Batch] = deque()
        self._inflight: dict[int, _Batch] = {}
        self._cond = threading.Condition(threading.Lock())
        self._ids = itertools.count(1)
        self._batch_ids = itertools.count(1)
        self._fn_blobs: dict[int, tuple[Any, tuple, str]] = {}
        self._completed = self._failed = self._cancelled = self._worker_deaths = 0

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
                self._shared = (self._client.scatter(SharedValue(data, buffers), broadcast=True, hash=False),)
        except BaseException:
            self._close_client()
            raise
        self._processes = processes if processes is not None else self._slots
        _live_engines.add(self)
        self._start_thread("shoal-dask")

    # ------------------------------------------------------------------
    # caller side (the contract's submit path, sizing and statistics)
    # ------------------------------------------------------------------
    @property
    def client(self) -> distributed.Client:
        """The Dask client this pool submits through."""
        return self._client

    @property
    def worker_pids(self) -> list[int]:
        return sorted(self._client.run(os.getpid).values())

    def function_ref(self, fn: Any) -> _Scope:
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
        data, buffers = pickle_for_dask(fn, "the function")
        scope = _Scope(self, fn, (data, []), key)
        if buffers:
            scope.blob = (data, scope.share(buffers))
        if cacheable and not buffers:
            if len(self._fn_blobs) > 512:
                self._fn_blobs.clear()
            self._fn_blobs[id(fn)] = (fn, scope.blob, key)
        return scope

    def make_task(
        self,
        fn: Any,
        mode: int,
        payload: Any,
        sink: Any,
        index: int = 0,
        timeout: Any = None,
        fn_ref: Any = None,
    ) -> _Task:
        """Serialize one task in the caller's thread (errors surface here)."""
        if timeout is not None:
            raise ValueError(
                "task_timeout is not supported with backend='dask' "
                "(a running Dask task cannot be interrupted)"
            )
        scope = fn_ref if fn_ref is not None else self.function_ref(fn)
        n = 1 if mode in (CALL, CALL_KW) else len(payload)
        data, buffers = pickle_for_dask(payload, "the task's arguments")
        scattered = scope.share(buffers) if buffers else ()
        task = _Task(next(self._ids), scope, mode, data, scattered, sink, index, n)
        if len(data) >= SCATTER_TASK_BYTES:
            task.ref = self._scatter([data])[0]
            task.data = b""
        return task

    def submit_call(
        self, fn: Any, args: tuple, kwargs: dict, sink: Any, timeout: float | None = None
    ) -> _Task:
        if not self.record.running or os.getpid() != self.owner_pid:
            self._check_running()
        if kwargs:
            task = self.make_task(fn, CALL_KW, (args, kwargs), sink, 0, timeout)
        else:
            task = self.make_task(fn, CALL, args, sink, 0, timeout)
        self._queue([task])
        return task

    def submit_tasks(self, tasks: list[_Task], from_feeder: bool = False) -> None:
        if not self.record.accepts(from_feeder):
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
            if self.record.terminating or self._finished.is_set():
                raise PoolClosedError("the pool was terminated while this task was being submitted") from exc
            raise

    def map_chunksize(self, n: int, fn: Any = None) -> int:
        """The standard library's chunk size (n / 4 per worker), smaller when
        the function's measured speed says chunks would run over CHUNK_SECONDS."""
        chunksize, extra = divmod(n, self._slots * 4)
        chunksize = max(1, chunksize + (1 if extra else 0))
        est = self._estimate(fn)
        if est:
            chunksize = max(1, min(chunksize, int(CHUNK_SECONDS / est)))
        return chunksize

    def inflight_bound(self, fn: Any = None, chunksize: int = 1) -> int:
        """Tasks an imap keeps submitted and unconsumed: enough for CREDIT
        full batches per worker thread."""
        est = self._estimate(fn)
        if est is None:
            per_batch = 1
        else:
            per_batch = max(1, min(MAX_BATCH, int(BATCH_SECONDS / max(est * chunksize, 1e-7))))
        return max(4 * self._slots, min(2 * CREDIT * per_batch * self._slots, 1 << 16))

    def fn_key(self, fn: Any) -> str:
        return _fn_key(fn)

    def _wake(self) -> None:
        with self._cond:
            self.record.dirty = True
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
    # Engine._run runs _loop, fails everything if it raises, then calls
    # _close_resources and fails what was queued meanwhile.

    def _kill_workers(self, graceful: bool) -> None:
        pass  # Dask's workers are Dask's: _close_resources closes the cluster the pool owns

    def _close_resources(self) -> None:
        _live_engines.discard(self)
        try:
            self._close_client()
        except Exception:  # noqa: BLE001 - callers must still be released (_run sets _finished next)
            traceback.print_exc()

    def _loop(self) -> None:
        record = self.record
        while True:
            with self._cond:
                if not record.dirty:
                    self._cond.wait(REFRESH_SECONDS if self._address is not None else None)
                record.dirty = False
            while self._control:
                self._handle_control(*self._control.popleft())
            if self._done:
                self._collect()
            if record.terminating:
                self._fail_everything(PoolClosedError("the pool was terminated before this task finished"))
                return
            if self._pending or self._isolated:
                self._dispatch()
            if (
                record.winding_down
                and not self._pending
                and not self._isolated
                and not self._inflight
                and not record.feeders
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
            run_batch,
            self._token,
            self.owner_pid,
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
                outputs = self._gather({b.id: b.future for b in finished})
            except TimeoutError:
                outputs = {}  # waited for again below (see GATHER_SECONDS)
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

    def _gather(self, futures: dict[Any, Any]) -> dict[Any, Any]:
        """``Client.gather(futures, errors="skip")``, TimeoutError after
        GATHER_SECONDS (Client.gather takes no timeout; its sync does)."""
        client = self._client
        return cast(
            "dict[Any, Any]",
            client.sync(client._gather, futures, errors="skip", callback_timeout=GATHER_SECONDS),
        )

    def _wait_again(self, batch: _Batch) -> None:
        # Its result was lost with a worker that died after the batch
        # finished: Dask computes it again; wait for that.
        self._inflight[batch.id] = batch
        self._watch(batch)

    def _deliver_batch(self, batch: _Batch, output: Any) -> None:
        kind, payload = output
        if kind == INIT_FAILED:
            cause = unpack_exception(payload)
            err = WorkerStartError(f"the pool's initializer raised on a Dask worker: {cause!r}")
            err.__cause__ = cause
            self._break(err)
            self._fail_batch(batch, err)
            return
        record = self._estimates.record
        for (task, start, stop), (ok, data, seconds) in zip(batch.parts, payload, strict=False):
            record(task.scope.key, seconds, max(task.n if start is None else stop - start, 1))
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
                value = self.with_traceback_type(unpack_exception(data))
            if start is None:
                self._finish(task, ok, value)
            else:
                self._piece_done(task, start, ok, value)

    def _finish(self, task: _Task, ok: bool, value: Any) -> None:
        task.kill_reason = "done"
        task.batch = None
        if ok:
            self._completed += 1
        else:
            self._failed += 1
        task.sink.deliver(task, ok, value)

    def _piece_done(self, task: _Task, start: int, ok: bool, value: Any) -> None:
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

    def _worker_died(self, batch: _Batch, exc: Any) -> None:
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

    def _died_error(self, task: _Task, start: int | None, exc: Any) -> WorkerDiedError:
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

    def _fail(self, task: _Task, exc: BaseException, *, cancelled: bool = False) -> None:
        if cancelled:
            self._cancelled += 1
            task.kill_reason = "cancelled"
            task.batch = None
            task.sink.deliver(task, False, exc)
        else:
            self._finish(task, False, exc)

    def _cancel(self, task: _Task, exc: BaseException) -> None:
        self._cancel_task(task, exc)
        self._notify()

    def _interrupt(self, match: Any, exc: BaseException) -> None:
        # Ctrl-C in a map (match: its tasks) or at exit (every task): fail
        # them at once.  A Dask task cannot be stopped once it runs; a batch
        # nothing is wanted from is dropped if not started.
        tasks = list(self._pending) + [t for b in list(self._inflight.values()) for t, _, _ in b.parts]
        tasks += [t for t, _, _ in list(self._isolated)]  # split off after worker deaths
        for task in tasks:
            if task.kill_reason is None and (match is None or match(task.sink)):
                self._interrupt_task(task, exc)
                self._cancel_task(task, exc)
        self._notify()

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

    def worker_processes(self) -> list:
        """No local worker processes: Dask's workers are not the pool's."""
        return []

    def _break(self, exc: BaseException) -> None:
        if self.record.mark_broken(exc):
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


__all__ = ("DaskEngine",)
