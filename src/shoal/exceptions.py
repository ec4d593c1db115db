"""Every exception shoal raises for failures of its own machinery.

Exceptions raised by *your* code in a worker are not wrapped: they reach the
caller as their original type, with the remote traceback attached as
``__cause__`` (``multiprocessing.pool.RemoteTraceback`` from a Pool,
``concurrent.futures.process._RemoteTraceback`` from an executor, as with the
standard library; :class:`RemoteTraceback` elsewhere).  An exception whose
``__init__`` does not take its own ``args`` back is rebuilt without calling
``__init__`` (same ``args`` and attributes); one whose class cannot be
imported in the parent arrives as a :class:`RemoteError` naming it.  Timeouts raise the builtin
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
    │                                       pickled or unpickled; when the pickler
    │                                       raised another type (PicklingError,
    │                                       AttributeError, ...), also that type
    ├── PoolClosedError(…, ValueError, RuntimeError)  the pool was closed
    ├── RemoteError                         a task raised an exception whose
    │                                       class does not exist in the parent
    │                                       (.type_name, .message, .tb)
    ├── TaskExitError                       a task (or an actor's method) called
    │                                       sys.exit(): it fails that call instead
    │                                       of ending the caller's program (.code)
    ├── ActorDiedError                      the actor's process exited (it died,
    │                                       was closed, or its creator exited)
    ├── BrokenResourceError(…, OSError)     the other end of a pipe, queue or
    │                                       shared structure died
    └── CorruptDataError(…, OSError)        bytes another process wrote (a message's
                                            framing, a queue's ring, a SharedDict's
                                            memory) are not what shoal writes: the
                                            peer is not shoal of this version, or
                                            something overwrote the memory

Every exception here survives a pickle round trip, so it can itself be sent
between processes.
"""

from __future__ import annotations

import signal
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from ._util import public

__all__ = (
    "ActorDiedError",
    "BrokenResourceError",
    "CorruptDataError",
    "PoolClosedError",
    "RemoteError",
    "RemoteTraceback",
    "SerializationError",
    "ShoalError",
    "TaskExitError",
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
        replaced: ``True`` if a new worker took its place, ``False`` if the
            system refused a new process (fork failed: ``RLIMIT_NPROC``, a
            *pids* cgroup, no memory or descriptor left), ``None`` if none
            was needed (the pool was closing) or it is not shoal's to say
            (a cluster's worker).
    """

    def __init__(
        self, pid: int | None, exitcode: int | None, detail: str = "", replaced: bool | None = True
    ) -> None:
        self.pid = pid
        self.exitcode = exitcode
        self.replaced = replaced
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
        msg = f"{who} died ({how}) while running this task; likely cause: {cause}."
        if replaced:
            msg += " The worker was replaced and the pool goes on."
        elif replaced is not None:
            msg += (
                " The worker was not replaced: the system refused a new process (fork failed: "
                "RLIMIT_NPROC, see `ulimit -u`, a pids cgroup's pids.max in a container, or no memory or "
                "descriptor left). The pool goes on with the workers it has and tries again later; if none "
                "is left, what is queued fails with WorkerStartError. Raise the limit, free processes, or "
                "use fewer workers."
            )
        if detail:
            msg += f" {detail}"
        super().__init__(msg)

    def __reduce__(self) -> tuple[Any, ...]:  # keyword state must survive pickling
        return (type(self), (self.pid, self.exitcode, self.detail, self.replaced))


class WorkerStartError(ShoalError, BrokenProcessPool):
    """Workers cannot start: the initializer raised, or they die while starting.

    The pool then refuses work.  It is a ``BrokenProcessPool``, as in
    ``concurrent.futures``."""


class TaskTimeoutError(ShoalError, TimeoutError):
    """A task ran longer than its time limit; its worker was killed and replaced."""


class SerializationError(ShoalError, TypeError):
    """An object could not be pickled or unpickled on its way between processes.

    When the pickler raised something else than a ``TypeError`` (a
    ``PicklingError``, an ``AttributeError``, the ``RuntimeError`` of a
    ``__reduce__``), the error raised is also an instance of that type, so
    ``except pickle.PicklingError`` keeps working as with the standard
    library (see :func:`serialization_error`)."""

    _pickler_error: type  # set on the combined classes only


_COMBINED: dict[type, type] = {}


def serialization_error(message: str, cause: BaseException) -> SerializationError:
    """A :class:`SerializationError` that is also an instance of
    ``type(cause)`` (the error the pickler raised), with ``__cause__`` set.

    The combined class is made once per type.  Where the two cannot be
    combined (a final class, a constructor that needs other arguments) it is
    a plain SerializationError."""
    combined = _combined_type(type(cause))
    if combined is not SerializationError:
        try:
            error = combined(message)
            str(error)
        except Exception:  # noqa: BLE001 - an exotic constructor or __str__
            error = SerializationError(message)
    else:
        error = SerializationError(message)
    error.__cause__ = cause
    return error


def _combined_type(kind: type) -> type:
    if issubclass(SerializationError, kind) or not issubclass(kind, Exception):
        return SerializationError
    combined = _COMBINED.get(kind)
    if combined is None:
        try:
            combined = type(
                "SerializationError",
                (SerializationError, kind),
                {"__module__": __name__, "__reduce__": _reduce_combined, "_pickler_error": kind},
            )
        except TypeError:  # a final class, or incompatible layouts
            combined = SerializationError
        _COMBINED[kind] = combined
    return combined


def _reduce_combined(self: SerializationError) -> tuple[Any, ...]:
    # The combined class is not importable by name: rebuild it from its parts.
    return _rebuild_combined, (type(self)._pickler_error, self.args)


def _rebuild_combined(kind: type, args: tuple) -> BaseException:
    return _combined_type(kind)(*args)


class PoolClosedError(ShoalError, ValueError, RuntimeError):
    """The pool is closed or terminated and takes no more work.

    A ``ValueError`` like ``multiprocessing.Pool``'s "Pool not running", and a
    ``RuntimeError`` like ``concurrent.futures``' "cannot schedule new futures
    after shutdown"."""


class RemoteError(ShoalError):
    """A task raised an exception that cannot be rebuilt in this process
    (its class is not importable here).

    Attributes:
        type_name: the qualified name of the original exception's type,
            with its module (``"mymodule.BadRecord"``).
        message: ``str()`` of the original exception.
        tb: the formatted remote traceback (also the ``__cause__``).
    """

    def __init__(self, type_name: str, message: str, tb: str = "") -> None:
        self.type_name = type_name
        self.message = message
        self.tb = tb
        super().__init__(
            f"the task raised {type_name}: {message} (that class cannot be imported in this process, "
            "so the exception could not be rebuilt; the remote traceback is the __cause__)"
        )

    def __reduce__(self) -> tuple[Any, ...]:  # keyword state must survive pickling
        return (type(self), (self.type_name, self.message, self.tb))


class TaskExitError(ShoalError):
    """A task, an actor's method or another piece of your code that shoal ran
    in another process called ``sys.exit()`` (raised ``SystemExit``).

    The standard library's executor re-raises that ``SystemExit`` in the
    caller, whose program then ends silently with the task's exit status.
    Code running in a worker or an actor cannot end the caller's program:
    that call fails with this error (the remote traceback, showing where
    ``sys.exit()`` was called, is the ``__cause__``) and the worker or actor
    goes on.  It is not a ``SystemExit``, so an uncaught one is reported.  (An
    initializer that calls ``sys.exit()`` breaks the pool: the
    :class:`WorkerStartError` has this error as its ``__cause__``.)

    Attributes:
        code: what was passed to ``sys.exit()`` (``SystemExit.code``): an
            exit status, a message, or ``None``.
    """

    def __init__(self, code: object = None, who: str = "the task") -> None:
        self.code = code
        self.who = who
        called = "sys.exit()" if code is None else f"sys.exit({code!r})"
        super().__init__(
            f"{who} called {called} in a worker or actor process, which cannot end the caller's program: "
            "shoal reports it as an error (TaskExitError) instead. To report a failure, raise an exception; "
            "to end the program, catch TaskExitError in the caller and call sys.exit(exc.code)"
        )

    def __reduce__(self) -> tuple[Any, ...]:  # keyword state must survive pickling
        return (type(self), (self.code, self.who))


class ActorDiedError(ShoalError):
    """The actor's process is gone, so this call cannot run (or its result
    never came back).  The actor's state is lost; start a new actor.

    Attributes:
        pid: the actor's process id.
        exitcode: its exit code when known (negative for a signal), else None.
    """

    def __init__(self, message: str, pid: int | None = None, exitcode: int | None = None) -> None:
        super().__init__(message)
        self.pid = pid
        self.exitcode = exitcode

    def __reduce__(self) -> tuple[Any, ...]:  # keyword state must survive pickling
        return (type(self), (self.args[0], self.pid, self.exitcode))


class BrokenResourceError(ShoalError, OSError):
    """The process at the other end of a pipe, queue or shared structure died."""


class CorruptDataError(ShoalError, OSError):
    """Bytes that another process wrote are not what shoal writes.

    Raised by every decoder of shoal's own layouts, never by a crash, a hang
    or an attempt to allocate what a corrupt length announces: a message's
    framing on a pipe, a queue or a pool worker's channel (a length larger
    than this machine's memory, a truncated header, a descriptor missing), a
    queue's ring in shared memory, a SharedDict's memory (an offset outside
    the file, an index slot naming no entry).  The message says what was
    wrong.  The other process is not shoal of this version, or something in
    it (a C extension, a stray write to a descriptor it holds) overwrote the
    bytes.  The structure that raised it stays unusable; the data in it
    cannot be trusted.

    (Pickled payloads are not checked: a pickle is code, and shoal accepts
    them only from processes of the same user; see the security page.)
    """


def corrupt_data(what: str) -> CorruptDataError:
    """A :class:`CorruptDataError` saying *what* was wrong (``"a message
    announces 1099511627776 bytes"``), and what that means."""
    return CorruptDataError(
        f"{what}: the process that wrote it is not shoal of this version, or the bytes were overwritten "
        "(by a C extension, or a stray write to a descriptor or shared memory it holds)"
    )


for _name in __all__:
    public(globals()[_name], "shoal.exceptions")
del _name
