"""shoal: process parallelism that never hangs.

A drop-in for the standard library's ``multiprocessing`` process pools, pipes,
queues and managers, plus a fast race-free shared dict (``SharedDict``) and
zero-copy transfer of large buffers through shared memory.  ``import shoal as
multiprocessing`` works for code written against the standard library.

Layers (lower never imports higher; docs/architecture.md draws them all)::

    shoal/__init__.py            public names only
    _cli.py                      the ``shoal`` command
    _pool.py, _executor.py       faces of one engine contract
    _backends/                   which engine: the local one, or Dask's (_backends/_dask/, optional)
    _asyncresult.py, _future.py  the result objects users receive
    _engine/                     the engine contract (_base), the local engine and its scheduler,
                                 the worker loop, crash attribution
    _ipc/                        framing, Connection, queues
    _shm/                        the shared dict, shared arrays
    _serialization/              how objects and code cross processes (the one cloudpickle user)
    _fd/                         descriptor passing (SCM_RIGHTS), memfd segments, warm segments
    _native, exceptions, _util   atomics, robust mutex, futex (C); the exception tree; helpers
"""

from __future__ import annotations

# Re-exported where the standard library is already right.
from multiprocessing import (
    Array as Array,
)
from multiprocessing import (
    AuthenticationError as AuthenticationError,
)
from multiprocessing import (
    Barrier as Barrier,
)
from multiprocessing import (
    BoundedSemaphore as BoundedSemaphore,
)
from multiprocessing import (
    BufferTooShort as BufferTooShort,
)
from multiprocessing import (
    Condition as Condition,
)
from multiprocessing import (
    Event as Event,
)
from multiprocessing import (
    Lock as Lock,
)
from multiprocessing import (
    Process as Process,
)
from multiprocessing import (
    ProcessError as ProcessError,
)
from multiprocessing import (
    RawArray as RawArray,
)
from multiprocessing import (
    RawValue as RawValue,
)
from multiprocessing import (
    RLock as RLock,
)
from multiprocessing import (
    Semaphore as Semaphore,
)
from multiprocessing import (
    TimeoutError as TimeoutError,
)
from multiprocessing import (
    Value as Value,
)
from multiprocessing import (
    active_children as active_children,
)
from multiprocessing import (
    allow_connection_pickling as allow_connection_pickling,
)
from multiprocessing import (
    cpu_count as cpu_count,
)
from multiprocessing import (
    current_process as current_process,
)
from multiprocessing import (
    freeze_support as freeze_support,
)
from multiprocessing import (
    get_all_start_methods as get_all_start_methods,
)
from multiprocessing import (
    get_logger as get_logger,
)
from multiprocessing import (
    get_start_method as get_start_method,
)
from multiprocessing import (
    log_to_stderr as log_to_stderr,
)
from multiprocessing import (
    parent_process as parent_process,
)
from multiprocessing import (
    reducer as reducer,
)
from multiprocessing import (
    set_executable as set_executable,
)
from multiprocessing import (
    set_forkserver_preload as set_forkserver_preload,
)
from multiprocessing import (
    set_start_method as set_start_method,
)
from typing import Any

from . import exceptions as exceptions
from ._actor import Actor as Actor
from ._asyncresult import AsyncResult as AsyncResult
from ._asyncresult import IMapIterator as IMapIterator
from ._asyncresult import MapResult as MapResult
from ._context import Context as Context
from ._context import get_context as get_context
from ._engine import PoolStatistics as PoolStatistics
from ._engine import shared as shared
from ._engine import worker_state as worker_state
from ._executor import ProcessPoolExecutor as ProcessPoolExecutor
from ._future import Future as Future
from ._ipc import Connection as Connection
from ._ipc import JoinableQueue as JoinableQueue
from ._ipc import Pipe as Pipe
from ._ipc import Queue as Queue
from ._ipc import SimpleQueue as SimpleQueue
from ._manager import Manager as Manager
from ._pool import Pool as Pool
from ._shm import SharedDict as SharedDict
from .exceptions import (
    ActorDiedError as ActorDiedError,
)
from .exceptions import (
    BrokenResourceError as BrokenResourceError,
)
from .exceptions import (
    CorruptDataError as CorruptDataError,
)
from .exceptions import (
    PoolClosedError as PoolClosedError,
)
from .exceptions import (
    RemoteError as RemoteError,
)
from .exceptions import (
    SerializationError as SerializationError,
)
from .exceptions import (
    ShoalError as ShoalError,
)
from .exceptions import (
    TaskExitError as TaskExitError,
)
from .exceptions import (
    TaskTimeoutError as TaskTimeoutError,
)
from .exceptions import (
    WorkerDiedError as WorkerDiedError,
)
from .exceptions import (
    WorkerStartError as WorkerStartError,
)

__version__ = "0.1.0"

# numpy is optional: SharedArray (and share, its deprecated alias) load it on first use.
_NUMPY_NAMES = ("SharedArray", "share")


def __getattr__(name: str) -> Any:
    if name in _NUMPY_NAMES:
        from ._shm import _array

        value = getattr(_array, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'shoal' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_NUMPY_NAMES))


__all__ = (
    "Actor",
    "ActorDiedError",
    "Array",
    "AsyncResult",
    "AuthenticationError",
    "Barrier",
    "BoundedSemaphore",
    "BrokenResourceError",
    "BufferTooShort",
    "Condition",
    "Connection",
    "Context",
    "CorruptDataError",
    "Event",
    "Future",
    "IMapIterator",
    "JoinableQueue",
    "Lock",
    "Manager",
    "MapResult",
    "Pipe",
    "Pool",
    "PoolClosedError",
    "PoolStatistics",
    "Process",
    "ProcessError",
    "ProcessPoolExecutor",
    "Queue",
    "RLock",
    "RawArray",
    "RawValue",
    "RemoteError",
    "Semaphore",
    "SerializationError",
    "SharedArray",
    "SharedDict",
    "ShoalError",
    "SimpleQueue",
    "TaskExitError",
    "TaskTimeoutError",
    "TimeoutError",
    "Value",
    "WorkerDiedError",
    "WorkerStartError",
    "active_children",
    "allow_connection_pickling",
    "cpu_count",
    "current_process",
    "exceptions",
    "freeze_support",
    "get_all_start_methods",
    "get_context",
    "get_logger",
    "get_start_method",
    "log_to_stderr",
    "parent_process",
    "reducer",
    "set_executable",
    "set_forkserver_preload",
    "set_start_method",
    "share",
    "shared",
    "worker_state",
)
