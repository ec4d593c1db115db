"""The callback thread: runs user callbacks (``AsyncResult`` callbacks,
``Future`` done-callbacks) in the parent, one at a time, so that the
scheduler never waits on user code.

Data flow: the scheduler thread (or any thread) calls :meth:`CallbackThread.call`,
which queues the callback and wakes the thread, started on first use.  The
thread runs each callback, prints (never raises) what it raised, and lets go
of it at once.  ``stop()`` runs what is queued, then ends the thread;
``drain()`` waits for the queue to empty.  If no thread can be started
(interpreter shutdown), or the thread was stopped, a callback runs in the
calling thread rather than never.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections import deque
from typing import Any


class CallbackThread:
    """Runs user callbacks in the parent, one at a time, off the scheduler."""

    def __init__(self) -> None:
        self._queue: deque = deque()
        self._cond = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._busy = False

    def call(self, fn: Any, *args: Any) -> None:
        with self._cond:
            if not self._stopping and (self._thread is not None or self._start()):
                self._queue.append((fn, args))
                self._cond.notify()
                return
        # The pool has shut down (a task failed in the scheduler's last
        # sweep), or no thread can be started: run it here rather than never.
        self._invoke(fn, args)

    def _start(self) -> bool:
        thread = threading.Thread(target=self._run, name="shoal-callbacks", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # "can't create new thread at interpreter shutdown"
            return False
        self._thread = thread
        return True

    @staticmethod
    def _invoke(fn: Any, args: Any) -> None:
        try:
            fn(*args)
        except BaseException:  # noqa: BLE001 - a callback never kills the pool
            print("shoal: exception in a result callback (the pool goes on):", file=sys.stderr)
            traceback.print_exc()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    self._busy = False
                    self._cond.notify_all()
                    return
                fn, args = self._queue.popleft()
                self._busy = True
            self._invoke(fn, args)
            # Drop them now, not when the next callback comes: they may hold
            # the last reference to a result, a future or its traceback.
            fn = args = None
            with self._cond:
                self._busy = False
                if not self._queue:
                    self._cond.notify_all()

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every queued callback has run."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._queue or self._busy:
                if self._thread is not None and threading.current_thread() is self._thread:
                    return False  # called from a callback: cannot wait for ourselves
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def stop(self, wait: bool = True) -> None:
        """Run what is queued, then end the thread (with *wait*, wait for it)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if wait and thread is not None and thread is not threading.current_thread():
            thread.join()
