"""Every exception shoal raises for failures of its own machinery.

Exceptions raised by *your* code in a worker are not wrapped: they reach the
caller as their original type, with the remote traceback attached as
``__cause__`` (a :class:`RemoteTraceback`).  Timeouts raise the builtin
:class:`TimeoutError` (``multiprocessing.TimeoutError`` for ``AsyncResult``);
cancellation raises :class:`concurrent.futures.CancelledError`.

The tree::

    ShoalError(Exception)                   base for shoal's own failures
    ├── WorkerDiedError                     a worker died while running a task
    │                                       (.pid, .exitcode, .signal_name)
    ├── WorkerStartError(…, BrokenProcessPool)  workers cannot start
    │                                       (the initializer raised)
    ├── TaskTimeoutError(…, TimeoutError)   a task ran past its time limit and
    │                                       its worker was killed
    ├── SerializationError(…, TypeError)    an argument or result could not be
    │                                       pickled or unpickled
    ├── PoolClosedError(…, ValueError, RuntimeError)  the pool was closed
    └── BrokenResourceError                 the other end of a pipe, queue or
                                            shared structure died

Every exception here survives a pickle round trip, so it can itself be sent
between processes.
"""

from __future__ import annotations

import signal
from concurrent.futures.process import BrokenProcessPool

__all__ = (
    "BrokenResourceError",
    "PoolClosedError",
    "RemoteTraceback",
    "SerializationError",
    "ShoalError",
    "TaskTimeoutError",
    "WorkerDiedError",
    "WorkerStartError",
)


class ShoalError(Exception):
    """Base class for failures of shoal's own machinery."""


class RemoteTraceback(Exception):
    """The formatted traceback of an exception raised in another process."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


def describe_exitcode(exitcode: int | None) -> str:
    """'exit code 3' or 'signal SIGKILL' for a process exit code."""
    if exitcode is None:
        return "unknown exit status"
    if exitcode < 0:
        try:
            return f"signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"


_LIKELY_CAUSES = {
    "SIGKILL": "it was killed with SIGKILL, often by the kernel's OOM killer "
    "when memory runs out, or by a user or supervisor",
    "SIGSEGV": "a segmentation fault, usually a bug in a C extension",
    "SIGBUS": "a bus error, often a shared-memory or memory-mapped file that shrank",
    "SIGABRT": "an abort() in native code (a failed assertion or a fatal error)",
    "SIGTERM": "it was terminated with SIGTERM",
}


class WorkerDiedError(ShoalError):
    """A worker process died while it was running the task.

    Attributes:
        pid: the process id of the worker.
        exitcode: its exit code, negative for a signal (as ``Process.exitcode``).
        signal_name: ``"SIGKILL"`` and so on, or ``None`` for a normal exit.
    """

    def __init__(self, pid: int | None, exitcode: int | None, detail: str = "") -> None:
        self.pid = pid
        self.exitcode = exitcode
        self.signal_name: str | None = None
        if exitcode is not None and exitcode < 0:
            try:
                self.signal_name = signal.Signals(-exitcode).name
            except ValueError:
                self.signal_name = f"signal {-exitcode}"
        self.detail = detail
        how = describe_exitcode(exitcode)
        if self.signal_name in _LIKELY_CAUSES:
            cause = _LIKELY_CAUSES[self.signal_name]
        elif exitcode is not None and exitcode >= 0:
            cause = "the task or a library it called exited the process (os._exit, sys.exit in a C extension)"
        elif exitcode is None:
            cause = "not known here (a cluster's worker: see its logs)"
        else:
            cause = "an unexpected signal"
        who = f"worker process {pid}" if pid is not None else "a worker process"
        msg = (
            f"{who} died ({how}) while running this task; likely cause: {cause}. "
            "The worker was replaced and the pool goes on."
        )
        if detail:
            msg += f" {detail}"
        super().__init__(msg)

    def __reduce__(self):  # keyword state must survive pickling
        return (type(self), (self.pid, self.exitcode, self.detail))


class WorkerStartError(ShoalError, BrokenProcessPool):
    """Workers cannot start: the initializer raised, or they die while starting.

    The pool then refuses work.  It is a ``BrokenProcessPool``, as in
    ``concurrent.futures``."""


class TaskTimeoutError(ShoalError, TimeoutError):
    """A task ran longer than its time limit; its worker was killed and replaced."""


class SerializationError(ShoalError, TypeError):
    """An object could not be pickled or unpickled on its way between processes."""


class PoolClosedError(ShoalError, ValueError, RuntimeError):
    """The pool is closed or terminated and takes no more work.

    A ``ValueError`` like ``multiprocessing.Pool``'s "Pool not running", and a
    ``RuntimeError`` like ``concurrent.futures``' "cannot schedule new futures
    after shutdown"."""


class BrokenResourceError(ShoalError, OSError):
    """The process at the other end of a pipe, queue or shared structure died."""


for _name in __all__:
    globals()[_name].__module__ = "shoal.exceptions"
del _name
