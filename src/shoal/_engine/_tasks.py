"""The engine's records: a task, the scheduler's view of a worker, the read-only
view of a worker process handed to callers, and the contract between the
engine and the result objects (:class:`ResultSink`).

Who owns what: a :class:`Task` is made in the caller's thread (its payload
pickled there) and from then on belongs to the scheduler thread, which alone
moves it between the pending queue and a :class:`Worker`'s ``inflight`` queue
and finally hands its outcome to ``task.sink.deliver()``.  A :class:`Worker`
is touched by the scheduler thread only.
"""

from __future__ import annotations

import multiprocessing.connection
import os
import signal
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Protocol

from .. import _native
from ..exceptions import RemoteTraceback


class ResultSink(Protocol):
    """What the engine calls on a task's result object (an ``AsyncResult``, a
    map, an imap, a ``Future``), always from its scheduler thread.

    Sinks never block: user callbacks go to the engine's callback thread.
    """

    def skip(self, task: Any) -> bool:
        """Called before *task* is sent to a worker: True drops it (nobody
        wants its result any more; it counts as cancelled)."""
        ...

    def deliver(self, task: Any, ok: bool, value: Any) -> None:
        """The outcome of *task* (a call, or one chunk of a map): its value
        when *ok*, else the exception to raise.  Called once per task; *task*
        is None when the whole result is failed (``Engine.fail_sink``)."""
        ...


class FailableSink(ResultSink, Protocol):
    """A sink that can be failed as a whole (``Engine.fail_sink``: a map
    cancelled by its caller)."""

    @property
    def delivered(self) -> bool:
        """True once the result has its outcome: failing it again does nothing."""
        ...


#: One unit of work: a call, or a chunk of a map.  Fields, in the order its
#: callers pass them (positionally): ``id``, ``fn_id`` (id of the function
#: workers cache; 0: the function travels in ``data``), ``fn_ref`` ((fn,
#: fn_id, fn_bytes) for the first send to a worker), ``mode``, ``data`` (the
#: pickled payload, or the arguments themselves for CALL_RAW), ``fds``
#: (shared-memory descriptors of the pickled arguments; the task owns them),
#: ``sink``, then ``index`` (position of the chunk in its map, 0),
#: ``timeout`` (seconds it may run, None), ``n`` (items: 1 for a call),
#: ``kill_reason`` ("timeout", "cancelled", "abandoned" or None) and
#: ``requeues`` (times it ran again because its worker died first, 0).
#: ``close_fds(registry)`` closes the descriptors and drops them from the
#: engine's registry.
#:
#: A C type (src/native/task.c): one is made per task, and building it from
#: positional arguments costs a fraction of a dataclass ``__init__``; and it
#: is not tracked by the garbage collector, which otherwise walks every
#: pending task on each collection.  So a task must never sit in a reference
#: cycle the engine does not break: its sink refers to it only until the
#: outcome is delivered (sinks drop their task in ``deliver``), and the
#: scheduler clears ``task.sink`` once it delivered the outcome or dropped
#: the task (``skip``), so the engine never keeps a finished result alive.
Task = _native.Task


@dataclass(slots=True, eq=False)
class Worker:
    """The scheduler's view of one worker process."""

    proc: Any
    channel: Any
    slot: int
    #: a pidfd of the process (see _procs), or None where the system has none
    pidfd: int | None = None
    pid: int = field(init=False)
    #: readable once the process has exited: the pidfd, else multiprocessing's
    #: sentinel (which a grandchild holding its pipe keeps from firing)
    sentinel: int = field(init=False)
    #: tasks sent and not yet answered, in the order the worker runs them
    inflight: deque[Task] = field(default_factory=deque)
    #: how many results each batch sent and not yet answered in full still owes
    batches: deque[int] = field(default_factory=deque)
    #: ids of the functions the worker has cached, least recently used first
    fns: OrderedDict[int, None] = field(default_factory=OrderedDict)
    ready: bool = False
    eof: bool = False
    writing: bool = False
    #: tasks sent so far: the worker's stream position (see _worker.GATE)
    sent: int = 0
    #: of those, how many were recalled and given to other workers
    recalled: int = 0
    retire_reason: str | None = None
    kill_reason: str | None = None
    #: why the scheduler killed it, when that fails a task ("corrupt": it
    #: sent a message that is not shoal's; see Scheduler.corrupt_worker)
    kill_error: BaseException | None = None

    def __post_init__(self) -> None:
        self.pid = self.proc.pid
        self.sentinel = self.pidfd if self.pidfd is not None else self.proc.sentinel

    @property
    def accepting(self) -> bool:
        return self.retire_reason is None and self.kill_reason is None and not self.eof


class WorkerProcess:
    """A read-only view of one worker process: what code written for the
    standard library reads from ``executor._processes`` or ``pool._pool``.

    The pool owns the process; a view only looks at it (and can signal it:
    a worker killed this way fails only the task it was running)."""

    __slots__ = ("_proc", "name", "pid")

    def __init__(self, proc: Any) -> None:
        self._proc = proc
        self.pid: int = proc.pid
        self.name: str = proc.name

    def is_alive(self) -> bool:
        try:
            if not self._proc.is_alive():
                return False
            sentinel = self._proc.sentinel
        except ValueError:  # the pool already reaped and closed it
            return False
        # The scheduler reaps its workers from its own thread: when it wins
        # the race for waitpid, Process.is_alive() here sees ECHILD and says
        # "alive" until the scheduler records the exit code.  The sentinel
        # is the truth: readable once the process has exited.
        try:
            return not multiprocessing.connection.wait([sentinel], 0)
        except (OSError, ValueError):  # closed by the scheduler meanwhile: reaped
            return False

    def join(self, timeout: float | None = None) -> None:
        try:
            self._proc.join(timeout)
        except ValueError:
            pass

    @property
    def exitcode(self) -> int | None:
        try:
            return self._proc.exitcode
        except ValueError:
            return None

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, signum: int) -> None:
        if self.is_alive():
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass

    def __repr__(self) -> str:
        return f"<shoal worker process pid={self.pid} {'alive' if self.is_alive() else 'exited'}>"


def interrupt_task(task: Any, exc: BaseException) -> None:
    """A future not yet running is cancelled as such; a running one gets
    *exc* (a CancelledError) as its outcome, through the engine's ``fail``."""
    future = getattr(task.sink, "future", None)
    if future is not None:
        future.cancel()


def with_traceback_type(exc: BaseException, remote_traceback: type[BaseException]) -> BaseException:
    """Give a worker's exception the face's remote-traceback type as its
    ``__cause__`` (``multiprocessing.pool.RemoteTraceback`` for Pool, as
    code written for the standard library checks)."""
    cause = exc.__cause__
    if isinstance(cause, RemoteTraceback) and remote_traceback is not RemoteTraceback:
        exc.__cause__ = remote_traceback(cause.tb)
    return exc


def fn_bytes(batch: list[Task], fid: int) -> bytes:
    """The pickled function of id *fid*, from the first task of *batch* using it."""
    for task in batch:
        if task.fn_id == fid:
            return task.fn_ref[2]
    raise AssertionError(f"no task of the batch uses function {fid}")
