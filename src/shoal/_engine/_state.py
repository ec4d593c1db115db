"""The one record an engine's caller side and its scheduler thread share.

An engine is two halves that run on different threads: the caller side
(:class:`~._base.Engine`: submit, close, terminate, join) and the thread
that drives the workers (the local :class:`~._scheduler.Scheduler`, or
the Dask dispatcher).  What both read and write lives here, in one
:class:`EngineState`, and nowhere else: neither half reaches into the
other's attributes.  Where one half asks the other to act it calls a
method (``Scheduler.mark_dirty``, :meth:`EngineState.mark_broken`).
The functions' measured durations (:class:`Estimates`), written by the
thread and read by the caller side to size chunks, live here too.

The state machine (``EngineState.state``)::

    RUN ──close()──► CLOSE ──(idle: workers told to stop)──► the thread ends
     │                 │
     │   terminate()   │ terminate()
     ├─────────────────┴──────────► TERMINATE ──► fail what is unfinished, kill, end
     │
     └─(workers cannot start, or the thread failed)─► BROKEN ──► as CLOSE, new work refused

Only the caller side moves RUN to CLOSE and anything to TERMINATE; only the
thread (or a start that failed) moves to BROKEN, through ``mark_broken``.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import deque
from typing import Any, Protocol

#: The engine's states (``Engine.state``).
RUN, CLOSE, TERMINATE, BROKEN = "running", "closed", "terminated", "broken"


class EngineState:
    """The state both halves of one engine hold (see the module docstring).

    Plain attributes, read on per-task paths: ``state`` (one of RUN, CLOSE,
    TERMINATE, BROKEN) and ``broken_error`` (why it is BROKEN); the queues
    callers append to and the thread takes from (``pending``, ``control``);
    the wake-up flags (``dirty``: something changed; ``sleeping``: the
    thread is about to wait, so a change must wake it: the protocol of
    ``Scheduler.run``); how many imap feeders still submit (``feeders``);
    ``results_cond``, which result objects wait on, and ``waiters``, how
    many do (so the thread notifies only when someone waits).
    """

    __slots__ = (
        "broken_error",
        "control",
        "dirty",
        "feeders",
        "kill_on_terminate",
        "pending",
        "results_cond",
        "sleeping",
        "state",
        "waiters",
    )

    def __init__(self) -> None:
        self.state = RUN
        self.broken_error: BaseException | None = None
        #: terminate(kill=True): SIGKILL at once, not SIGTERM first
        self.kill_on_terminate = False
        self.pending: deque[Any] = deque()
        self.control: deque[tuple[str, Any, Any]] = deque()
        self.dirty = False
        self.sleeping = False
        self.feeders = 0
        self.results_cond = threading.Condition(threading.Lock())
        self.waiters = 0

    def mark_broken(self, exc: BaseException) -> bool:
        """Enter BROKEN because of *exc* (the first cause is kept); False,
        and nothing changes, once terminate() was asked for."""
        if self.state == TERMINATE:
            return False
        if self.broken_error is None:
            self.broken_error = exc
        self.state = BROKEN
        return True

    @property
    def running(self) -> bool:
        """RUN: new work is accepted."""
        return self.state == RUN

    def accepts(self, from_feeder: bool = False) -> bool:
        """Whether new tasks may be queued: while running, and after close()
        from an imap feeder that started before it (the input is read to
        the end, as the standard library does)."""
        return self.state == RUN or (from_feeder and self.state == CLOSE)

    @property
    def terminating(self) -> bool:
        """TERMINATE: fail what is unfinished and stop."""
        return self.state == TERMINATE

    @property
    def winding_down(self) -> bool:
        """CLOSE or BROKEN: finish what is queued, then stop."""
        return self.state == CLOSE or self.state == BROKEN

    def notify_waiters(self) -> None:
        """Wake every thread waiting on a result of this engine."""
        with self.results_cond:
            self.results_cond.notify_all()


class HoldsDescriptors(Protocol):
    """What :data:`live_engines` holds: an engine, by what a forked child needs of it."""

    owner_pid: int

    def descriptors(self) -> list[int]:
        """Descriptors this engine holds that no child process should keep."""
        ...


#: Every engine of this process whose scheduler may start workers.
live_engines: weakref.WeakSet[HoldsDescriptors] = weakref.WeakSet()


def engine_descriptors() -> list[int]:
    """Every live engine's private descriptors (for a worker started by fork)."""
    fds: list[int] = []
    pid = os.getpid()
    for engine in list(live_engines):
        # A forked worker's copies of its parent's engines hold numbers the
        # worker closed (and may have reused): closing them in a child it
        # forks (an Actor, a nested pool's worker) would close live ones.
        if engine.owner_pid == pid:
            fds.extend(engine.descriptors())
    return fds


__all__ = (
    "BROKEN",
    "CLOSE",
    "RUN",
    "TERMINATE",
    "EngineState",
    "Estimates",
    "HoldsDescriptors",
    "engine_descriptors",
    "live_engines",
)


class Estimates(dict):
    """Seconds per item of each function (by key), as workers measure them:
    what batches and chunks are sized by.

    Each report is the time a run of *n* items took.  The estimate is a
    decayed sum of times over a decayed sum of items, so a report weighs as
    many items as it measured.  An average of per-report figures let the
    first report, often one item slowed by first-use costs (a cold cache, an
    import), outweigh thousands of items after it for a dozen reports: a
    first map got batches of one tiny chunk each, and its workers waited a
    round trip to the scheduler after every chunk.
    """

    __slots__ = ("_sums",)

    #: How much of the past each report keeps.
    DECAY = 0.7

    def __init__(self) -> None:
        super().__init__()
        self._sums: dict[Any, tuple[float, float]] = {}

    def record(self, key: Any, seconds: float, n: int) -> None:
        """*n* items of *key*'s function took *seconds* in all."""
        if n <= 0:
            return
        total, items = self._sums.get(key, (0.0, 0.0))
        total = total * self.DECAY + seconds
        items = items * self.DECAY + n
        self._sums[key] = (total, items)
        self[key] = total / items
