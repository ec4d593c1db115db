"""The worker process: receive batches of tasks, run them, send results back.

One worker owns one end of one socket (its *channel*); the parent's scheduler
thread owns the other end.  Nothing else is shared except the *status block*,
a few words of shared memory per worker that the worker writes before and
after each task so the parent knows, even after a SIGKILL, exactly which task
was running and since when::

    parent scheduler                       worker (this module)
    ----------------                       --------------------
    _Hello(config, status fd,    ──────►   shared object installed (see _local)
      shared object's buffers)             initializer(*initargs), worker_init()
                                 ◄──────   READY | INIT_FAILED(exception)
    batch: columns ids, fn ids,  ─────►   claim the task (status.gate; a task
      modes, payloads, nfds                the parent recalled is skipped)
                                           status.running = tid, started = now
                                           value = fn(*args)
                                           status.last_done = tid, running = 0
                                 ◄──────   results: columns kinds, values,
                                           nfds, and durations per function
                                           (flushed when the batch ends or
                                           every FLUSH_SECONDS)

Tasks and results travel as parallel lists (columns), not a tuple each, so
a batch of trivial tasks costs the parent one pickle and a few lists.  A
call whose arguments are all plain immutable values (RAW_TYPES) travels with
them unpickled inside the batch (mode CALL_RAW: nothing could fail to pickle
at submit), and a result of those types travels as itself (kind RAW); other
arguments and results are pickled one by one, with large buffers in shared
memory beside the message, so an unpicklable result fails only its task.
    STOP or end of stream        ──────►   worker_exit()
                                 ◄──────   RETIRE(reason)
                                           (maxtasksperchild, memory ceiling)
                                 ◄──────   EXITED(what worker_exit returned
                                           or raised), exit 0

The pool's shared object reaches the worker once: under fork as an argument
of the worker's ``Process`` (inherited, no copy); otherwise pickled once by
the engine, its large buffers in memfds that every worker maps.

A task leaves nothing behind: its function and arguments are dropped as soon
as it returns and its result once pickled, before the results are sent, so
finalizers run and memory returns right after each task.  A worker started
by fork first closes what it inherited and is not its own: the descriptors
of the parent's pools and the parent's forkserver "alive" pipe; and it
forgets the parent's reusable loky executor (joblib's default backend),
whose threads and workers stayed in the parent.

The worker ignores SIGINT: Ctrl-C is the parent's to handle, and a worker
printing a KeyboardInterrupt traceback for every task is noise.  It exits as
soon as its parent goes away (end of stream on the channel; PR_SET_PDEATHSIG
when the parent started it directly).  As it ends it ends the processes its
tasks started and left running (``_procs``): otherwise ``multiprocessing``
would make it wait for each of them before it exits, and the pool with it.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import pickle
import signal
import struct
import sys
import threading
import time
from itertools import repeat
from typing import Any

from .._fd import WarmSegments, providing_fds, sending_fds, swap_sending
from .._ipc import Channel
from .._native import compare_exchange
from .._serialization import dumps, loads_with, pack_exception
from ..exceptions import corrupt_data
from . import _local
from ._procs import end_descendants

# Message kinds, parent -> worker
BATCH = 0
STOP = 1
# Message kinds, worker -> parent
READY = 0
RESULTS = 1
INIT_FAILED = 2
RETIRE = 3
EXITED = 4

# Task modes
CALL = 0  # fn(*args); payload is args
CALL_KW = 3  # fn(*args, **kwargs); payload is (args, kwargs)
MAP = 1  # [fn(x) for x in payload]
STARMAP = 2  # [fn(*x) for x in payload]
CALL_RAW = 4  # fn(*args); args travel unpickled inside the batch message (see RAW_TYPES)

# Result kinds: how a task's outcome travels back
FAILED = 0  # the pickled exception (pack_exception)
PICKLED = 1  # the value pickled on its own, maybe with descriptors beside the message
RAW = 2  # the value itself, inside the results message (see RAW_TYPES)

#: Results of these exact types (not subclasses) are always picklable, hold
#: no buffer that could go through shared memory and are immutable: they
#: travel as themselves inside the results message (kind RAW).  Arguments of
#: the same types (and short bytes) travel unpickled inside the batch (mode
#: CALL_RAW; the engine's submit path decides, in ``_native.raw_task``).
RAW_TYPES = frozenset({int, float, str, bool, type(None), complex})

#: A worker sends the results it has so far when a batch has run this long,
#: so results of quick tasks are not held back by a slow one, and if the
#: worker dies, at most this much finished work has to run again.
FLUSH_SECONDS = 0.001

#: Status block layout, one slot per worker: running task id, its start time
#: (time.monotonic), id of the last finished task; then the gate (GATE,
#: below) and, at SENT, the bytes the worker has sent on its channel (each
#: message counted before it goes out: Channel.count_sent_in), so the
#: scheduler can tell bytes that the worker did not send (a task writing to
#: the channel's descriptor).
STATUS = struct.Struct("qdq")
STATUS_SLOT = 64  # one cache line per worker, so workers do not false-share

#: The *gate*, an int64 after STATUS in each slot, changed only by atomic
#: compare-and-exchange: its low GATE_SHIFT bits count the tasks the worker
#: has consumed from its stream (started, or skipped as recalled), its high
#: bits how many of the following tasks the scheduler has recalled.  The
#: worker claims each task before it starts it (consumed -> consumed + 1);
#: the scheduler recalls the tasks not yet claimed by adding to the high
#: bits.  Exactly one of the two exchanges succeeds, so a recalled task is
#: never started here and a started one never recalled: the scheduler gives
#: recalled tasks to another worker at once (see Scheduler.recall).
GATE = STATUS.size
SENT = GATE + 8
GATE_SHIFT = 48
GATE_MASK = (1 << GATE_SHIFT) - 1
#: Most tasks one recall may cover (a worker never holds more than
#: CREDIT * MAX_BATCH).
GATE_MAX_RECALL = (1 << 15) - 1

_PR_SET_PDEATHSIG = 1


class WorkerConfig:
    """Everything a worker needs, pickled once (its hooks by shoal's policy for code)."""

    __slots__ = (
        "initargs",
        "initializer",
        "max_memory",
        "maxtasks",
        "owner_pid",
        "pdeathsig",
        "shared_data",
        "slot",
        "worker_exit",
        "worker_init",
    )

    def __init__(
        self,
        initializer: Any,
        initargs: Any,
        maxtasks: Any,
        max_memory: Any,
        owner_pid: Any,
        pdeathsig: Any,
        slot: Any,
    ) -> None:
        self.initializer = initializer
        self.initargs = initargs
        self.worker_init = None
        self.worker_exit = None
        # the pickled shared object (its buffers' memfds follow the status
        # block's descriptor), or None: passed to worker_main, or no object
        self.shared_data: bytes | None = None
        self.maxtasks = maxtasks
        self.max_memory = max_memory
        self.owner_pid = owner_pid
        self.pdeathsig = pdeathsig
        self.slot = slot


def set_pdeathsig(owner_pid: int) -> None:
    """Ask the kernel to SIGKILL us when the process that started us dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != owner_pid:  # it died before prctl took effect
        os._exit(0)


def _rss_bytes() -> int:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * mmap.PAGESIZE


def worker_main(
    sock: Any, inherited: tuple[int, ...] = (), shared: Any = _local.NO_SHARED, hooks: tuple | None = None
) -> None:
    """Entry point of a worker process (the ``target`` of its ``Process``).

    *inherited* lists descriptors a fork-started worker got from its parent's
    pool engines and must not keep (see Engine._start_worker).  *shared* is
    the pool's shared object when the worker was started by fork.  *hooks*
    are ``(initializer, initargs, worker_init, worker_exit)`` when they could
    travel only with the starting process (a multiprocessing Queue in
    initargs); otherwise they come in the first message.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    keep = sock.fileno()
    for fd in inherited:
        if fd != keep:
            try:
                os.close(fd)
            except OSError:
                pass
    if inherited:
        _forget_parents_forkserver(inherited)
        _forget_parents_executors()
    channel = Channel(sock)
    try:
        _serve(channel, shared, hooks)
    except (BrokenPipeError, ConnectionResetError, EOFError):
        pass  # the parent went away: nobody is waiting for our results
    finally:
        # Processes our tasks started and left running end with us, or
        # multiprocessing would make us wait for them as we exit (see _procs).
        end_descendants()
        sys.stdout.flush()
        sys.stderr.flush()


def _forget_parents_forkserver(closed: tuple[int, ...]) -> None:
    """After fork: the parent's forkserver is not ours.  Its "alive" pipe
    was closed with the other inherited descriptors; a pool a task starts
    under forkserver gets a forkserver of this worker's own."""
    from multiprocessing import forkserver

    server = forkserver._forkserver
    if getattr(server, "_forkserver_alive_fd", None) in closed:
        # Private attributes of the forkserver, absent from typeshed.
        server._forkserver_alive_fd = None  # type: ignore[attr-defined]
        server._forkserver_pid = None  # type: ignore[attr-defined]
        server._forkserver_address = None  # type: ignore[attr-defined]


#: Modules that keep a process-wide reusable executor: loky's, and the copy
#: joblib ships (its default backend).
_REUSABLE_EXECUTORS = ("joblib.externals.loky.reusable_executor", "loky.reusable_executor")


def _forget_parents_executors() -> None:
    """After fork: the parent's reusable loky executor is not ours.  Its
    threads and workers stayed in the parent, so a task that runs joblib's
    default backend here would hand its calls to an executor nobody serves
    and wait for ever; forgotten, joblib starts one of this worker's own
    (which ends with the worker, see _procs).  Its lock may have been held
    by a parent thread at the fork: a new one."""
    for name in _REUSABLE_EXECUTORS:
        module = sys.modules.get(name)
        if module is not None and getattr(module, "_executor", None) is not None:
            module._executor = None  # type: ignore[attr-defined]  # private state of loky
            module._executor_kwargs = None  # type: ignore[attr-defined]
            module._executor_lock = threading.RLock()  # type: ignore[attr-defined]


def _serve(channel: Channel, shared: Any, hooks: tuple | None = None) -> None:
    # The first message carries the configuration (its hooks pickled by
    # value where this process cannot import them) and the status block's fd.
    first = channel.recv()
    if first is None:
        return
    with providing_fds(first[1]):  # the initargs may hold a SharedArray
        config: WorkerConfig = pickle.loads(first[0])
    if hooks is not None:
        config.initializer, config.initargs, config.worker_init, config.worker_exit = hooks
    if config.pdeathsig:
        set_pdeathsig(config.owner_pid)
    status_fd, *shared_fds = first[1]  # then the initargs' descriptors, unused by the shared object
    status = mmap.mmap(status_fd, 0)
    os.close(status_fd)
    offset = config.slot * STATUS_SLOT
    channel.count_sent_in(status, offset + SENT)

    try:
        try:
            if config.shared_data is not None:
                shared = loads_with(config.shared_data, shared_fds)
        finally:
            for fd in shared_fds:
                if fd >= 0:  # -1: the shared object took it (providing_fds)
                    os.close(fd)
        _local.install(shared)
        if config.initializer is not None:
            config.initializer(*config.initargs)
        if config.worker_init is not None:
            config.worker_init()
    except BaseException as exc:
        # Also logged, as the standard library's executor workers do: an
        # initializer that installs a logging handler (a QueueHandler to the
        # parent) sees its own failure there.
        logging.getLogger("concurrent.futures").critical("Exception in initializer:", exc_info=True)
        channel.send(pickle.dumps((INIT_FAILED, pack_exception(exc, "the initializer"))))
        return
    channel.send(pickle.dumps((READY, os.getpid())))
    try:
        _run_tasks(channel, config, status, offset)
    finally:
        if config.worker_exit is not None:
            _run_worker_exit(channel, config.worker_exit)


def _run_worker_exit(channel: Channel, worker_exit: Any) -> None:
    """Run the worker_exit hook and send the parent what it returned (or
    raised); the parent may be gone already, and the hook runs anyway: it
    closes what worker_init opened."""
    fds: list[int] = []  # a SharedArray's (or a large array's) memory, as for task results
    try:
        value = worker_exit()
        with sending_fds(fds):
            message = (EXITED, (True, dumps(value, oob=True, what="the value worker_exit returned")))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        message = (EXITED, (False, pack_exception(exc, "worker_exit")))
        for fd in fds:
            os.close(fd)
        fds = []
    try:
        channel.send(pickle.dumps(message, 5), fds)
    except OSError:
        pass  # the parent went away: nobody collects it
    finally:
        for fd in fds:
            os.close(fd)


def _take_recall(status: Any, gate: int, found: int) -> int:
    """The scheduler recalled tasks (the gate's high bits, *found*): consume
    them all at once; return how many to skip."""
    while True:
        skip = found >> GATE_SHIFT
        now = compare_exchange(status, gate, found, (found & GATE_MASK) + skip)
        if now == found:
            return skip
        found = now  # the scheduler recalled more meanwhile


def _run_tasks(channel: Channel, config: WorkerConfig, status: Any, offset: int) -> None:
    pack_status = STATUS.pack_into
    claim = compare_exchange
    gate = offset + GATE
    consumed = 0  # the gate's low bits: only this process changes them
    skip = 0  # recalled tasks still to pass over, in this batch or the next

    functions: dict[int, Any] = {}
    # Warm shared memory that large results travel in, reused once the
    # parent has dropped them.
    segments = WarmSegments()
    done = 0
    maxtasks = config.maxtasks
    max_memory = config.max_memory
    monotonic = time.monotonic
    perf = time.perf_counter
    retire = None
    while retire is None:
        message = channel.recv()
        if message is None:
            break
        payload, fds = message
        kind, fn_defs, tasks, flush_each = pickle.loads(payload)
        if kind == STOP:
            break
        flush_after = 0.0 if flush_each else FLUSH_SECONDS
        for fn_id, fn_bytes in fn_defs:
            if fn_id == -1:  # the parent's cache evicted these
                for old in fn_bytes:
                    functions.pop(old, None)
                continue
            try:
                functions[fn_id] = pickle.loads(fn_bytes)
            except BaseException as exc:  # noqa: BLE001 - fails the tasks that use it
                functions[fn_id] = _Unloadable(exc)
        # The results, as parallel lists (the wire format of RESULTS): what
        # each outcome is (RAW, PICKLED, FAILED), the outcome, and how many
        # descriptors each has beside the message.
        kinds: list[int] = []
        values: list[Any] = []
        counts: list[int] = []
        result_fds: list[int] = []
        # Durations, per run of tasks of one function: [fn_id, seconds, items, ...]
        timing: list[Any] = []
        timed_fn = -1
        timed_s = 0.0
        timed_n = 0
        fd_pos = 0
        flushed_at = perf()
        ids, fids, modes, datas, nfds = tasks
        ntasks = len(ids)
        brought = nfds if nfds is not None else repeat(0)  # None: no task brought descriptors
        for tid, fn_id, mode, data, nfd in zip(ids, fids, modes, datas, brought, strict=False):
            if skip:
                # Recalled: another worker runs it.  Its descriptors are
                # closed with the message's.
                skip -= 1
                fd_pos += nfd
                continue
            found = claim(status, gate, consumed, consumed + 1)
            if found != consumed:
                skip = _take_recall(status, gate, found)
                consumed += skip
                skip -= 1
                fd_pos += nfd
                continue
            consumed += 1
            started = perf()
            pack_status(status, offset, tid, monotonic(), done)
            items = 1
            try:
                if mode == CALL_RAW:
                    fn = functions[fn_id]
                    if type(fn) is _Unloadable:
                        raise fn.error
                    value = fn(*data)
                else:
                    args = loads_with(data, fds, fd_pos, fd_pos + nfd)
                    fd_pos += nfd
                    if fn_id:
                        fn = functions[fn_id]
                        if type(fn) is _Unloadable:
                            raise fn.error
                    else:
                        fn, args = args
                    if mode == CALL:
                        value = fn(*args)
                    elif mode == CALL_KW:
                        value = fn(*args[0], **args[1])
                    else:
                        items = len(args)
                        if mode == MAP:
                            value = [fn(x) for x in args]
                        else:
                            value = [fn(*x) for x in args]
                ok = True
            except BaseException as exc:  # noqa: BLE001 - a task error is a result
                value = exc
                ok = False
            # Nothing of the task outlives it here: the arguments (and a
            # function sent with them) are freed now, the result once it
            # is pickled, so their finalizers run and their memory returns
            # right after the task, not when the next batch comes (and shared
            # memory holding arguments is reused once every process let go).
            fn = args = data = None
            elapsed = perf() - started
            pack_status(status, offset, 0, 0.0, tid)
            if fn_id != timed_fn:
                if timed_n:
                    timing += (timed_fn, timed_s, timed_n)
                timed_fn = fn_id
                timed_s = 0.0
                timed_n = 0
            timed_s += elapsed
            timed_n += items
            if ok and type(value) in RAW_TYPES:
                kinds.append(RAW)
                values.append(value)
                counts.append(0)
            elif ok:
                out_fds: list[int] = []
                previous = swap_sending(out_fds)  # once per task: no context-manager object
                try:
                    out = dumps(value, oob=True, what="the task's result", segments=segments)
                    kind = PICKLED
                except BaseException as exc:  # noqa: BLE001 - an unpicklable result fails only this task
                    # (BaseException: a __reduce__ that calls sys.exit() is the
                    # task's error, as in the standard library, not a dead worker)
                    kind = FAILED
                    out = pack_exception(exc, "pickling the task's result")
                    for fd in out_fds:  # what the failed pickle collected (a SharedArray's)
                        os.close(fd)
                    out_fds = []
                finally:
                    swap_sending(previous)
                kinds.append(kind)
                values.append(out)
                counts.append(len(out_fds))
                if out_fds:
                    result_fds.extend(out_fds)
            else:
                kinds.append(FAILED)
                values.append(pack_exception(value))
                counts.append(0)
            del value
            done += 1
            if perf() - flushed_at >= flush_after and len(kinds) < ntasks:
                timing += (timed_fn, timed_s, timed_n)
                timed_n = 0
                timed_s = 0.0
                _send_results(channel, kinds, values, counts, timing, result_fds)
                kinds = []
                values = []
                counts = []
                result_fds = []
                timing = []
                flushed_at = perf()
        for fd in fds:
            if fd >= 0:  # -1: a task's argument took it (providing_fds)
                os.close(fd)
        if maxtasks and done >= maxtasks:
            retire = ("maxtasksperchild", done)
        elif max_memory and _rss_bytes() > max_memory:
            retire = ("max_memory", _rss_bytes())
        if kinds:
            if timed_n:
                timing += (timed_fn, timed_s, timed_n)
            _send_results(channel, kinds, values, counts, timing, result_fds)
    if retire is not None:
        channel.send(pickle.dumps((RETIRE, retire)))


def describe(obj: Any) -> str:
    """*obj*'s type and a short repr, for an error about a malformed message."""
    text = repr(obj)
    return f"{type(obj).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def check_results(body: Any, held: int, nfds: int) -> None:
    """CorruptDataError unless *body* is a RESULTS message a worker holding
    *held* tasks sends with *nfds* descriptors: parallel lists of kinds,
    values and descriptor counts (None: none), at most one per task held,
    and the durations (function id, seconds, items > 0) in threes.  Type
    and length checks per message; the kinds are checked as they are read."""
    try:
        kinds, values, counts, timing = body
        if type(kinds) is not list or type(values) is not list or type(timing) is not list:
            raise TypeError("not lists")
        if len(values) != len(kinds) or len(kinds) > held or len(timing) % 3:
            raise ValueError(
                f"{len(kinds)} kinds, {len(values)} values, {held} tasks held, {len(timing)} timings"
            )
        if counts is None:
            if nfds:
                raise ValueError(f"{nfds} descriptors and no counts")
        elif type(counts) is not list or len(counts) != len(kinds) or sum(counts) != nfds or min(counts) < 0:
            raise ValueError(f"descriptor counts that do not add up to the {nfds} descriptors received")
        for i in range(0, len(timing), 3):
            fid, seconds, items = timing[i : i + 3]
            if type(fid) is not int or type(seconds) is not float or type(items) is not int or items <= 0:
                raise ValueError(f"a duration entry {timing[i : i + 3]!r:.80}")
    except (TypeError, ValueError) as exc:
        raise corrupt_data(f"a results message that is malformed ({exc}; body {describe(body)})") from exc


def _send_results(
    channel: Channel, kinds: list[int], values: list, counts: list[int], timing: list, fds: list[int]
) -> None:
    message = (RESULTS, (kinds, values, counts if fds else None, timing))
    channel.send(pickle.dumps(message, 5), fds)
    for fd in fds:
        os.close(fd)


class _Unloadable:
    """Stands in for a function that could not be unpickled in the worker."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error
