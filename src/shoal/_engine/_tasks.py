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


@dataclass(slots=True, eq=False)
class Task:
    """One unit of work: a call, or a chunk of a map.

    Made once per task on the submit path, so its callers pass the fields
    positionally, in the order below: a keyword call of this ``__init__``
    costs about 0.25 µs more, a few per cent of a trivial task.
    """

    id: int
    #: id of the function workers cache (0: the function travels in ``data``)
    fn_id: int
    #: (fn, fn_id, fn_bytes) for the first send to a worker, or None
    fn_ref: Any
    mode: int
    data: bytes
    #: shared-memory descriptors of the pickled arguments (the task owns them)
    fds: list[int] | tuple[int, ...]
    sink: ResultSink
    #: position of the chunk in its map
    index: int = 0
    #: seconds the task may run, or None
    timeout: float | None = None
    #: items: 1 for a call, the chunk's length for a map chunk
    n: int = 1
    #: why the scheduler killed (or gave up on) it: "timeout", "cancelled", "abandoned"
    kill_reason: str | None = None
    #: times it ran again because its worker died before sending its result
    requeues: int = 0

    def close_fds(self, registry: set[int]) -> None:
        """Close the task's shared-memory descriptors and drop them from the
        engine's *registry* of task descriptors."""
        registry.difference_update(self.fds)
        for fd in self.fds:
            os.close(fd)
        self.fds = ()


@dataclass(slots=True, eq=False)
class Worker:
    """The scheduler's view of one worker process."""

    proc: Any
    channel: Any
    slot: int
    pid: int = field(init=False)
    sentinel: int = field(init=False)
    #: tasks sent and not yet answered, in the order the worker runs them
    inflight: deque[Task] = field(default_factory=deque)
    #: id of the last task of each batch sent and not yet answered in full
    batches: deque[int] = field(default_factory=deque)
    #: ids of the functions the worker has cached, least recently used first
    fns: OrderedDict[int, None] = field(default_factory=OrderedDict)
    ready: bool = False
    eof: bool = False
    writing: bool = False
    sent: int = 0
    retire_reason: str | None = None
    kill_reason: str | None = None

    def __post_init__(self) -> None:
        self.pid = self.proc.pid
        self.sentinel = self.proc.sentinel

    @property
    def accepting(self) -> bool:
        return self.retire_reason is None and self.kill_reason is None and not self.eof


class WorkerProcess:
    """A read-only view of one worker process: what code written for the
    standard library reads from ``executor._processes`` or ``pool._pool``.

    The pool owns the process; a view only looks at it (and can signal it:
    a worker killed this way fails only the task it was running)."""

    __slots__ = ("_proc", "name", "pid")

    def __init__(self, proc) -> None:
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
