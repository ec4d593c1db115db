"""What a task can see of the worker process running it.

``shoal.shared()`` returns the pool's read-only shared object and
``shoal.worker_state()`` a dict private to the worker.  The worker loop
(:mod:`shoal._engine._worker`) fills this module's globals once, when the
worker starts and before the initializer and ``worker_init`` run; tasks only
read them.  A process forked from a worker (a task starting a ``Process``)
has them cleared by an at-fork hook, so it is told it is not a pool worker
instead of silently using a copy; tasks pay no system call to check that.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from .._util import public

__all__ = ("install", "shared", "worker_state")


class _NoShared:
    """Marks "the pool was created without shared=" (None is a valid shared object)."""

    def __repr__(self) -> str:
        return "<no shared object>"

    def __reduce__(self) -> str:
        return "NO_SHARED"  # the same singleton in every process


NO_SHARED: Any = _NoShared()

_in_worker = False  # True only in a pool worker, once install() ran


class _PerThread(threading.local):
    # The class attribute is what a thread that set nothing reads: no
    # AttributeError raised and caught on every shared() call (that cost
    # 2 µs a task, more than the task itself in a pool of tiny tasks).
    shared: Any = NO_SHARED


# A backend whose workers run tasks in threads of a process it does not own
# (Dask) sets the shared object per thread, around each batch.
_thread = _PerThread()
#: Whether a backend ever set a per-thread object in this process: until one
#: does, shared() skips the thread-local read (a third of its cost).
_per_thread = False
_shared: Any = NO_SHARED
_state: dict | None = None


def install(shared_obj: Any) -> None:
    """Called once by the worker loop, in the worker, before any user code."""
    global _in_worker, _shared, _state
    _shared = shared_obj
    _state = {}
    _in_worker = True


def _forget_after_fork() -> None:
    global _in_worker, _shared, _state
    _in_worker = False
    _shared = NO_SHARED
    _state = None


os.register_at_fork(after_in_child=_forget_after_fork)


def set_thread_shared(obj: Any) -> Any:
    """Make shared() return *obj* in this thread (NO_SHARED: undo); returns
    what it returned before.  For backends whose tasks run in threads."""
    global _per_thread
    _per_thread = True
    previous = _thread.shared
    _thread.shared = obj
    return previous


def shared() -> Any:
    """The read-only object given to the pool as ``shared=``.

    Call it inside a task (or an initializer, ``worker_init`` or
    ``worker_exit``) run by a ``shoal.Pool`` or ``shoal.ProcessPoolExecutor``
    worker.  The object was sent to the worker once, when it started (under
    fork it is inherited without a copy; large buffers inside it, such as
    numpy arrays, are mapped from shared memory under every start method).
    Treat it as read-only: changes stay in the worker that made them.

    Raises:
        RuntimeError: called outside a pool worker, or the pool was created
            without ``shared=``.
    """
    if _per_thread:
        value = _thread.shared
        if value is not NO_SHARED:
            return value
    value = _shared
    if value is not NO_SHARED:  # set only in a pool worker (install())
        return value
    if not _in_worker:
        raise RuntimeError(
            "shoal.shared() was called outside a pool worker: it returns the object given as "
            "Pool(shared=obj) / ProcessPoolExecutor(shared=obj), and works only inside the tasks, "
            "initializer and worker_init/worker_exit hooks run by that pool's workers"
        )
    raise RuntimeError(
        "shoal.shared() was called in a worker of a pool created without shared=: "
        "create the pool with shoal.Pool(..., shared=obj) to give every worker obj"
    )


def worker_state() -> dict:
    """A dict private to the current pool worker, kept between the tasks it runs.

    Fill it in ``worker_init`` (open a connection, load a model) and read it
    in tasks; ``worker_exit`` runs when the worker ends and may clean it up.
    Each worker has its own dict; a replacement worker (after a crash or
    ``maxtasksperchild``) starts with an empty one.

    Raises:
        RuntimeError: called outside a pool worker.
    """
    if not _in_worker:
        raise RuntimeError(
            "shoal.worker_state() was called outside a pool worker: it returns a dict private to the "
            "worker process running the current task, and works only inside tasks and hooks run by a "
            "shoal.Pool or shoal.ProcessPoolExecutor worker"
        )
    return _state  # type: ignore[return-value]


public(shared)
public(worker_state)
