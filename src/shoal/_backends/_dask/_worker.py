"""The worker side of the Dask backend: what runs inside a Dask worker.

:func:`run_batch` is the one Dask task of a batch: it runs the pool's
initializer once per worker process, loads the batch's functions and each
task's arguments, runs them and pickles each outcome.  Scattered buffers of
at least COW_THRESHOLD bytes are copied once per worker process into a memfd
that each task maps copy-on-write (a per-worker cache, LRU, COW_CACHE_BYTES
at most), so every task still gets its own writable copy, as with the
standard library, without a copy per task.
"""

from __future__ import annotations

import os
import pickle
import threading
import time
from collections import OrderedDict
from typing import Any

import distributed

from ..._engine import CALL, CALL_KW, MAP, set_thread_shared
from ..._fd import fd_from_buffer, map_private_fd
from ..._serialization import pack_exception
from ._wire import INIT_FAILED, OK, SharedValue, dumps_result

_init_lock = threading.Lock()
#: pool token -> None (initializer ran) or the packed exception it raised
_initialized: dict[str, bytes | None] = {}


def _loads_task(data: bytes, buffers: Any, cow: bool) -> Any:
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


def _private_copy(key: str, buffer: Any, cow: bool) -> Any:
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


def run_batch(
    token: str, client_pid: int, init: bytes | None, shared_value: tuple, fns: list, entries: list
) -> Any:
    """Run one batch on a Dask worker (the one Dask task of a batch).

    *entries* are ``(fn index, mode, data, buffers, start, stop)``; a map
    chunk split after a crash runs only ``items[start:stop]``; *buffers*
    are ``(Dask key, buffer)`` pairs.  Returns ``(OK, [(ok, pickled result
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
        previous = set_thread_shared(value.load() if type(value) is SharedValue else value)
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
                return INIT_FAILED, failure
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
                out = dumps_result(value)
                ok = True
            except BaseException as exc:  # noqa: BLE001 - a task error is a result
                ok = False
                out = pack_exception(exc)
            results.append((ok, out, perf() - started))
    finally:
        if previous is not None:
            set_thread_shared(previous)
    return OK, results


__all__ = ("run_batch",)
