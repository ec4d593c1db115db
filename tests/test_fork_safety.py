"""What a child made by ``os.fork()`` inherits from a process that uses
shoal: pool workers hold none of their engine's descriptors, a lock another
thread held at the fork does not deadlock the child, a queue closed before
the fork is closed in the child."""

from __future__ import annotations

import os
import pickle
import time

import pytest

import shoal
import workers
from helpers import child_reports, fd_links, wait_child
from shoal import Pipe, Queue

# -- pool workers -----------------------------------------------------------------


# Before: fork workers inherited the engines' descriptors (wake-up pipe, the
# other workers' channels), so a dead engine's pipes never reached EOF.
def test_fork_workers_do_not_keep_the_engines_descriptors():
    with shoal.Pool(2, context="fork") as pool:
        with pytest.raises(shoal.WorkerDiedError):
            pool.apply(workers.kill_self)
        engine = pool._engine
        # Wait until every worker, the replacement started by the scheduler
        # thread among them, has started up (it closes what it inherited
        # before it says it is ready).
        deadline = time.monotonic() + 30
        while not (len(engine._workers) == 2 and all(w.ready for w in list(engine._workers.values()))):
            assert time.monotonic() < deadline
            pool.apply(workers.square, (1,))
            time.sleep(0.01)
        private = set()
        for fd in engine.descriptors():
            try:
                link = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if link.startswith(("socket:", "pipe:")):  # unique inode numbers
                private.add(link)
        assert len(private) >= 3  # the wake-up pipe and a channel per worker
        for pid in engine.worker_pids:
            assert not (private & fd_links(pid)), "a worker holds the engine's own descriptors"


# -- a fork in the middle of a Spool.take (review 3, bug 2) ------------------------
# Before: the child waited forever for the spool lock the parent's thread held.


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
        assert wait_child(pid) == 0
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
        assert wait_child(pid) == 0
        assert q.get(timeout=10) == b"y" * 100_000
    finally:
        q.close()


# -- a queue closed before a fork is closed in the child (review 3, bug 8) ---------
# Before: the child could use it and got 'mmap closed or invalid'.


def _use_closed(q):
    out = []
    for op in (lambda: q.put(1), lambda: q.get(timeout=1), q.qsize):
        try:
            op()
            out.append("ok")
        except Exception as exc:
            out.append(f"{type(exc).__name__}: {exc}")
    out.append(f"ring fd {q._ring.fd}")
    return "\n".join(out)


def test_a_queue_closed_before_fork_is_closed_in_the_child():
    q = Queue()
    q.close()
    report = child_reports(lambda: _use_closed(q)).split("\n")
    assert all(line.startswith("ValueError") and "is closed" in line for line in report[:3]), report
    assert report[3] == "ring fd -1"


def test_a_queue_closed_while_its_feeder_runs_is_closed_in_the_child():
    q = Queue(capacity=4096)
    n_fill = 0
    while q._ring.put_inline(pickle.dumps(n_fill, 5)):
        n_fill += 1
    q.put("buffered")  # the ring is full: the feeder waits for room
    q.close()
    report = child_reports(lambda: _use_closed(q)).split("\n")
    assert all(line.startswith("ValueError") and "is closed" in line for line in report[:3]), report
    assert report[3] == "ring fd -1"
    # Let the feeder finish; then the parent's descriptors close.
    for _ in range(n_fill):  # the parent's feeder then writes its item
        assert len(q._ring.get(1, q._reader, None)) == 1
    q.join_thread()
    for _ in range(1000):  # the closing thread runs right after the feeder
        if q._ring.fd < 0:
            break
        time.sleep(0.01)
    assert q._ring.fd < 0
