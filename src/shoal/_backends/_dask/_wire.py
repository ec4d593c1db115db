"""What travels between the pool and its Dask workers, and how it is pickled.

Both sides import this module: the client pickles functions, arguments and
the shared object (:func:`pickle_for_dask`, refusing objects that hold a
file descriptor of this machine), a worker pickles results
(:func:`dumps_result`) and unpacks the shared object (:class:`SharedValue`).
A batch's outcome is ``(OK, [(ok, bytes, seconds), ...])`` or
``(INIT_FAILED, packed exception)``.
"""

from __future__ import annotations

import os
import pickle
import threading
from typing import Any

from ..._fd import sending_fds
from ..._serialization import LargeBuffers, dumps, find_unpicklable, pickle_code
from ...exceptions import SerializationError

#: Buffers at least this large are scattered once, not sent with each task.
SHARE_THRESHOLD = 256 * 1024

#: What a batch returns: its tasks' outcomes, or the initializer's failure.
OK, INIT_FAILED = 0, 1

_NOTHING = object()


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


def pickle_for_dask(obj: Any, what: str) -> tuple[bytes, list[pickle.PickleBuffer]]:
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


def dumps_result(value: Any) -> bytes:
    try:
        with sending_fds(_REFUSE):
            return dumps(value, what="the task's result")
    except SerializationError as exc:
        if isinstance(exc.__cause__, _NodeLocalError):
            raise _node_local_error(value, "the task's result") from None
        raise


class SharedValue:
    """``shared=obj`` on its way to the workers: unpickled once per worker
    process by Dask (``__reduce__``), or once per object in-process."""

    def __init__(self, data: bytes, buffers: list) -> None:
        self.data = data
        self.buffers = buffers
        self.value: Any = _NOTHING
        self.lock = threading.Lock()

    def __reduce__(self) -> Any:
        return unpickle, (self.data, self.buffers)

    def load(self) -> Any:
        with self.lock:
            if self.value is _NOTHING:
                self.value = unpickle(self.data, self.buffers)
            return self.value


def unpickle(data: bytes, buffers: Any) -> Any:
    return pickle.loads(data, buffers=buffers)


__all__ = (
    "INIT_FAILED",
    "OK",
    "SHARE_THRESHOLD",
    "SharedValue",
    "dumps_result",
    "pickle_for_dask",
    "unpickle",
)
