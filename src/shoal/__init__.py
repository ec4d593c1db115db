"""shoal: process parallelism that never hangs.

A drop-in for the standard library's ``multiprocessing`` process pools, pipes,
queues and managers, plus fast race-free shared data, zero-copy shared memory
and actors.  ``import shoal as multiprocessing`` works for code written
against the standard library.

Layers (lower never imports higher)::

    shoal/__init__.py            public names only
    _cli.py                      the ``shoal`` command
    _pool.py, _executor.py       faces of one engine
    _backends.py, _dask.py       the same engine interface on a Dask cluster (optional)
    _engine/                     scheduler thread, worker loop, crash detection
    _ipc/                        framing, descriptor passing, Connection, queues
    _shm/                        memfd segments, shared arrays, shared dict
    _native                      atomics, robust mutex, futex (C)
"""

from __future__ import annotations

# Re-exported where the standard library is already right.
from multiprocessing import (
    Array as Array,
    Barrier as Barrier,
    BoundedSemaphore as BoundedSemaphore,
    Condition as Condition,
    Event as Event,
    Lock as Lock,
    Process as Process,
    RLock as RLock,
    Semaphore as Semaphore,
    TimeoutError as TimeoutError,
    Value as Value,
    active_children as active_children,
    cpu_count as cpu_count,
    current_process as current_process,
    freeze_support as freeze_support,
    get_all_start_methods as get_all_start_methods,
    get_start_method as get_start_method,
    parent_process as parent_process,
    set_start_method as set_start_method,
)

from . import exceptions as exceptions
from ._context import Context as Context
from ._context import get_context as get_context
from ._executor import ProcessPoolExecutor as ProcessPoolExecutor
from ._ipc._connection import Connection as Connection
from ._ipc._connection import Pipe as Pipe
from ._ipc._queue import JoinableQueue as JoinableQueue
from ._ipc._queue import Queue as Queue
from ._ipc._queue import SimpleQueue as SimpleQueue
from ._manager import Manager as Manager
from ._pool import AsyncResult as AsyncResult
from ._pool import Pool as Pool
from ._shm._dict import SharedDict as SharedDict
from .exceptions import (
    BrokenResourceError as BrokenResourceError,
    PoolClosedError as PoolClosedError,
    SerializationError as SerializationError,
    ShoalError as ShoalError,
    TaskTimeoutError as TaskTimeoutError,
    WorkerDiedError as WorkerDiedError,
    WorkerStartError as WorkerStartError,
)

__version__ = "0.1.0"

__all__ = (
    "Array",
    "AsyncResult",
    "Barrier",
    "BoundedSemaphore",
    "BrokenResourceError",
    "Condition",
    "Connection",
    "Context",
    "Event",
    "JoinableQueue",
    "Lock",
    "Manager",
    "Pipe",
    "Pool",
    "PoolClosedError",
    "Process",
    "ProcessPoolExecutor",
    "Queue",
    "RLock",
    "Semaphore",
    "SerializationError",
    "SharedDict",
    "ShoalError",
    "SimpleQueue",
    "TaskTimeoutError",
    "TimeoutError",
    "Value",
    "WorkerDiedError",
    "WorkerStartError",
    "active_children",
    "cpu_count",
    "current_process",
    "exceptions",
    "freeze_support",
    "get_all_start_methods",
    "get_context",
    "get_start_method",
    "parent_process",
    "set_start_method",
)
