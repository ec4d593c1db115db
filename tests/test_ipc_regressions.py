"""Regressions from the third adversarial review of pipes and queues: each
test failed before its fix."""

from __future__ import annotations

import os
import queue
import signal
import threading
import time

import pytest

from shoal import Pipe, Queue
from shoal import _native
from shoal._ipc import _ring

# -- bug 3: an exception from a signal handler must not leave the ring locked --


class _Interrupt(BaseException):
    pass


def _interrupt_after_acquire(monkeypatch, calls=1):
    """Make the ring's next *calls*-th mutex acquisition succeed and then
    raise, as a signal handler (Ctrl-C) does when it runs right after the
    call returns."""
    real = _ring._acquire
    state = {"n": calls}

    def acquire(*args):
        result = real(*args)
        state["n"] -= 1
        if state["n"] == 0:
            raise _Interrupt
        return result

    monkeypatch.setattr(_ring, "_acquire", acquire)


def _assert_free(q, offset):
    # Neither held by this thread (EDEADLK, RuntimeError) nor by anyone
    # (TimeoutError), and consistent (no OSError).
    mm = q._ring.mm
    assert _native.mutex_acquire(mm, offset, 0.0) is False
    _native.mutex_release(mm, offset)


@pytest.mark.parametrize("op", ["get", "get_nowait", "get_many", "put", "put_many", "bounded_put"])
def test_exception_right_after_taking_the_ring_lock_releases_it(monkeypatch, op):
    q = Queue(maxsize=5 if op == "bounded_put" else 0)
    try:
        q.put_many([1, 2, 3])
        _interrupt_after_acquire(monkeypatch)
        with pytest.raises(_Interrupt):
            if op == "get":
                q.get(timeout=10)
            elif op == "get_nowait":
                q.get_nowait()
            elif op == "get_many":
                q.get_many(2, timeout=10)
            elif op == "put":
                q.put(4)
            elif op == "put_many":
                q.put_many([4, 5])
            else:
                q.put(4, timeout=10)
        monkeypatch.undo()
        _assert_free(q, _ring._PMUTEX)
        _assert_free(q, _ring._CMUTEX)
        got = q.get_many(10, timeout=10)
        assert got[:3] == [1, 2, 3]
    finally:
        q.close()


def _die_holding(mm, offset):
    pid = os.fork()
    if pid == 0:
        _native.mutex_acquire(mm, offset)
        os._exit(0)
    os.waitpid(pid, 0)


@pytest.mark.parametrize("where", ["recount", "acquire"])
def test_exception_while_repairing_a_dead_owners_lock_keeps_it_usable(monkeypatch, where):
    q = Queue()
    try:
        q.put_many([1, 2])
        _die_holding(q._ring.mm, _ring._CMUTEX)
        if where == "recount":
            real = _ring.Ring._recount
            state = {"armed": True}

            def recount(self):
                if state["armed"]:
                    state["armed"] = False
                    raise _Interrupt
                real(self)

            monkeypatch.setattr(_ring.Ring, "_recount", recount)
        else:
            # Interrupted between the owner-died acquire and mutex_consistent.
            _interrupt_after_acquire(monkeypatch)
        with pytest.raises(_Interrupt):
            q.get(timeout=10)
        monkeypatch.undo()
        _assert_free(q, _ring._CMUTEX)
        assert q.get(timeout=10) == 1
        assert q.qsize() == 1
    finally:
        q.close()


def test_get_nowait_does_not_wait_for_a_lock_held_elsewhere():
    q = Queue()
    taken, release = threading.Event(), threading.Event()

    def hold():  # as another consumer would, for as long as it likes
        _native.mutex_acquire(q._ring.mm, _ring._CMUTEX)
        taken.set()
        release.wait()
        _native.mutex_release(q._ring.mm, _ring._CMUTEX)

    holder = threading.Thread(target=hold)
    try:
        q.put(1)
        holder.start()
        taken.wait()
        with pytest.raises(queue.Empty):
            q.get_nowait()
        with pytest.raises(queue.Empty):
            q.get(timeout=0.01)
        release.set()
        holder.join()
        assert q.get_nowait() == 1
    finally:
        release.set()
        if holder.is_alive():
            holder.join()
        q.close()


# -- bug 2: a fork in the middle of a Spool.take must not deadlock the child --


def _wait_child(pid) -> int:
    """The child's exit status; kill it if it is still running after a
    long while (a hang guard, not a timing test)."""
    for _ in range(3000):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return -signal.SIGKILL


def test_fork_while_a_thread_holds_the_pipe_spool_lock():
    a, b = Pipe()
    try:
        a.send_bytes(b"x" * 100_000)  # makes the spool
        assert b.recv_bytes() == b"x" * 100_000
        with a._spool._lock:  # a thread in the middle of a large send
            pid = os.fork()
            if pid == 0:
                try:
                    a.send_bytes(b"y" * 100_000)
                    a.close()
                finally:
                    os._exit(0)
        assert _wait_child(pid) == 0
        assert b.recv_bytes() == b"y" * 100_000
    finally:
        a.close()
        b.close()


def test_fork_while_a_thread_holds_the_queue_spool_lock():
    q = Queue()
    try:
        q.put(b"x" * 100_000)
        assert q.get(timeout=10) == b"x" * 100_000
        with q._spool._lock:
            pid = os.fork()
            if pid == 0:
                try:
                    q.put(b"y" * 100_000)
                    q.close()
                finally:
                    os._exit(0)
        assert _wait_child(pid) == 0
        assert q.get(timeout=10) == b"y" * 100_000
    finally:
        q.close()
