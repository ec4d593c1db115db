"""shoal.Queue / JoinableQueue / SimpleQueue: the standard library's documented
behaviour, batches, many producers and consumers, crashes, large data."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import queue
import signal
import threading
import time

import numpy as np
import pytest

import shoal
from helpers import (
    at_fd_limit,
    child_reports,
    close_all,
    connections,
    gather_in_order,
    limit_descriptors_in_flight,
    open_fds,
)
from shoal import JoinableQueue, Pipe, Queue, SerializationError, SimpleQueue, _native
from shoal._ipc import _queue, _ring

# -- helpers run in child processes ---------------------------------------------


def _produce(q, ident, n, many=False):
    if many:
        for start in range(0, n, 97):
            q.put_many([(ident, i) for i in range(start, min(n, start + 97))])
    else:
        for i in range(n):
            q.put((ident, i))


def _consume(q, results, done):
    got = []
    while True:
        try:
            got.append(q.get(timeout=0.1))
        except queue.Empty:
            if done.is_set():  # every item was put before done was set
                _drain(q, got)
                break
    results.send(got)
    results.close()


def _consume_many(q, results, done):
    got = []
    while True:
        try:
            got.extend(q.get_many(50, timeout=0.1))
        except queue.Empty:
            if done.is_set():
                _drain(q, got)
                break
    results.send(got)
    results.close()


def _drain(q, got):
    while True:
        try:
            got.extend(q.get_many(50, block=False))
        except queue.Empty:
            return


def _get_forever(q, ready):
    ready.put("ready")
    while True:
        q.get()


def _put_forever(q, ident, progress):
    i = 0
    while True:
        q.put((ident, i))
        i += 1
        if i == 50:
            progress.put("started")


def _hold_lock_and_die(q, which):
    q._ring._lock(which)
    os.kill(os.getpid(), signal.SIGKILL)


def _put_and_exit(q, n):
    for i in range(n):
        q.put(i)
    # Exiting waits for the feeder thread to write what the full ring could
    # not take, as the standard library does.


def _get_one_and_report(q, out):
    out.put(q.get(timeout=30))


def _task_worker(q):
    while True:
        item = q.get()
        if item is None:
            q.task_done()
            break
        q.task_done()


# -- documented behaviour -----------------------------------------------------------


def test_fifo_qsize_empty_full():
    q = Queue()
    try:
        assert q.empty() and q.qsize() == 0 and not q.full()
        for i in range(5):
            q.put(i)
        assert not q.empty() and q.qsize() == 5
        assert [q.get() for _ in range(5)] == list(range(5))
        assert q.empty()
    finally:
        q.close()


def test_nowait_and_timeouts():
    q = Queue(maxsize=2)
    try:
        with pytest.raises(queue.Empty):
            q.get_nowait()
        with pytest.raises(queue.Empty):
            q.get(timeout=0.05)
        with pytest.raises(queue.Empty):
            q.get(False)
        q.put_nowait(1)
        q.put(2)
        assert q.full() and q.qsize() == 2
        with pytest.raises(queue.Full):
            q.put_nowait(3)
        with pytest.raises(queue.Full):
            q.put(3, timeout=0.05)
        with pytest.raises(queue.Full):
            q.put(3, False)
        assert q.get_nowait() == 1
        q.put(3)
        assert [q.get(), q.get()] == [2, 3]
        with pytest.raises(ValueError):
            q.get(timeout=-1)
    finally:
        q.close()
    for cls in (Queue, JoinableQueue):  # unbounded, as in the standard library
        q = cls(maxsize=-1)
        try:
            q.put_many(range(10))
            assert not q.full()
            assert q.get_many(10, timeout=10) == list(range(10))
        finally:
            q.close()


def test_bounded_put_blocks_until_a_get():
    q = Queue(maxsize=1)
    try:
        q.put("first")
        threading.Timer(0.1, q.get).start()
        q.put("second", timeout=30)  # waits for the timer's get
        assert q.get(timeout=30) == "second"
    finally:
        q.close()


def test_blocking_get_wakes_on_put_from_another_thread():
    q = Queue()
    try:
        threading.Timer(0.1, q.put, args=("late",)).start()
        assert q.get(timeout=30) == "late"
    finally:
        q.close()


def test_put_pickles_in_caller_and_names_the_culprit():
    q = Queue()
    try:
        with pytest.raises(SerializationError, match="lock") as info:
            q.put({"ok": 1, "bad": threading.Lock()})
        assert isinstance(info.value, TypeError)
        assert q.empty()
        with pytest.raises(SerializationError):
            q.put_many([1, threading.Lock(), 3])
        assert q.empty()  # nothing of a failed put_many went in
        q.put(lambda x: x + 1)  # cloudpickle handles what pickle cannot
        assert q.get(timeout=30)(1) == 2
    finally:
        q.close()


def test_put_many_get_many():
    q = Queue()
    try:
        q.put_many(range(10))
        q.put_many([])
        assert q.qsize() == 10
        assert q.get_many(3) == [0, 1, 2]
        assert q.get() == 3
        assert q.get_many(100) == [4, 5, 6, 7, 8, 9]
        with pytest.raises(queue.Empty):
            q.get_many(5, timeout=0.05)
        with pytest.raises(queue.Empty):
            q.get_many(5, block=False)
        with pytest.raises(ValueError):
            q.get_many(0)
        q.put_many(iter(["a", "b"]))
        assert q.get_many(10, timeout=30) == ["a", "b"]
    finally:
        q.close()


def test_put_many_with_maxsize_waits_for_room():
    q = Queue(maxsize=3)
    try:
        done = threading.Event()

        def drain():
            got = []
            while len(got) < 10:
                got.extend(q.get_many(2, timeout=30))
            assert got == list(range(10))
            done.set()

        t = threading.Thread(target=drain)
        t.start()
        q.put_many(range(10), timeout=30)
        t.join(60)
        assert done.is_set()
        q.put_many([1, 2, 3])
        with pytest.raises(queue.Full):
            q.put_many([4], timeout=0.05)
    finally:
        q.close()


def test_close_join_thread_cancel_join_thread():
    q = Queue()
    q.put(1)
    with pytest.raises(ValueError, match="not closed"):
        q.join_thread()
    q.cancel_join_thread()
    q.close()
    q.close()  # idempotent
    q.join_thread()
    with pytest.raises(ValueError, match="closed"):
        q.put(2)
    with pytest.raises(ValueError, match="closed"):
        q.get()


def test_joinable_queue_task_done_and_join():
    q = JoinableQueue()
    try:
        q.join()  # nothing put: returns at once
        for i in range(3):
            q.put(i)
        finished = threading.Event()

        def joiner():
            q.join()
            finished.set()

        t = threading.Thread(target=joiner)
        t.start()
        for _ in range(3):
            q.get()
            assert not finished.is_set()
            q.task_done()
        t.join(30)
        assert finished.is_set()
        with pytest.raises(ValueError, match="too many times"):
            q.task_done()
    finally:
        q.close()


def test_joinable_queue_across_processes(fork_or_spawn):
    ctx = multiprocessing.get_context(fork_or_spawn)
    q = JoinableQueue()
    workers = [ctx.Process(target=_task_worker, args=(q,)) for _ in range(2)]
    for w in workers:
        w.start()
    q.put_many(range(200))
    q.put_many([None, None])
    q.join()
    for w in workers:
        w.join(30)
        assert w.exitcode == 0
    q.close()


def test_simple_queue():
    q = SimpleQueue()
    try:
        assert q.empty()
        q.put([1, 2])
        assert not q.empty()
        assert q.get() == [1, 2]
        assert q.empty()
        with pytest.raises(SerializationError):
            q.put(threading.Lock())
    finally:
        q.close()
    with pytest.raises(ValueError):
        q.get()


def test_public_names():
    assert shoal.Queue is Queue and shoal.JoinableQueue is JoinableQueue and shoal.SimpleQueue is SimpleQueue
    q = shoal.Queue(ctx=multiprocessing.get_context("spawn"))  # the stdlib's keyword is accepted
    q.close()


# -- large items, descriptors, and order across both paths -------------------------------


def test_large_and_small_items_keep_their_order():
    q = Queue()
    try:
        arr = np.arange(500_000, dtype=np.int64)  # out of band: a memfd
        big = os.urandom(200_000)  # above the inline limit: a datagram + memfd
        mid = os.urandom(30_000)  # within a datagram
        items = [1, arr, 2, big, 3, mid, 4]
        for item in items:
            q.put(item)
        got = [q.get(timeout=30) for _ in items]
        assert got[0::2] == [1, 2, 3, 4]
        assert np.array_equal(got[1], arr) and got[3] == big and got[5] == mid
        q.put_many(items)
        got = q.get_many(len(items), timeout=30)
        while len(got) < len(items):
            got += q.get_many(len(items), timeout=30)
        assert got[0::2] == [1, 2, 3, 4] and np.array_equal(got[1], arr)
    finally:
        q.close()


def test_a_connection_travels_through_a_queue(fork_or_spawn):
    ctx = multiprocessing.get_context(fork_or_spawn)
    q = Queue()
    out = Queue()
    a, b = Pipe()
    p = ctx.Process(target=_get_one_and_report, args=(q, out))
    p.start()
    q.put(b)  # the descriptor travels beside the item
    b.close()
    got = out.get(timeout=30)
    assert got is not None  # the child received a Connection and pickled it back
    with a, got:
        a.send("hello through a queue")
        assert got.recv() == "hello through a queue"
    p.join(30)
    q.close()
    out.close()


def test_large_array_to_spawned_child_through_queue():
    ctx = multiprocessing.get_context("spawn")
    q = Queue()
    out = Queue()
    p = ctx.Process(target=_get_one_and_report, args=(q, out))
    p.start()
    arr = np.random.default_rng(0).random(1_000_000)
    q.put(arr)
    assert np.array_equal(out.get(timeout=60), arr)
    p.join(30)
    assert p.exitcode == 0
    q.close()
    out.close()


# -- the ring fills -------------------------------------------------------------------


def test_items_whose_records_straddle_the_rings_end_come_back_whole():
    # The one-item put and get (C, ring.c) copy a record in two parts when
    # it reaches past the end of the ring: lengths that are not multiples
    # of 8 put the split at every offset as the positions go round.
    q = Queue(capacity=4096)
    try:
        for i in range(600):
            item = bytes([i % 251]) * (97 + i % 61)
            q.put(item)
            assert q.get() == item
            if i % 7 == 0:  # two records in the ring at once
                q.put(item)
                q.put(i)
                assert q.get() == item
                assert q.get() == i
        assert q.empty()
    finally:
        q.close()


def test_unbounded_put_never_blocks_when_the_ring_is_full():
    q = Queue(capacity=4096)
    try:
        n = 3000  # far more than 4 KiB of ring
        for i in range(n):
            q.put(i)  # returns at once: the rest waits in the feeder
        got = []
        while len(got) < n:
            got.extend(q.get_many(500, timeout=30))
        assert got == list(range(n))
    finally:
        q.close()


@pytest.mark.parametrize("cls", [Queue, JoinableQueue])
def test_a_bounded_queue_takes_maxsize_items_whatever_their_size(cls):
    # maxsize counts items, as in the standard library: Queue(100) took 17
    # items of 60 KB (its 1 MiB ring full), then put() raised Full, or
    # waited for ever without a consumer (a fuzz of the ring hung on it).
    q = cls(100)
    try:
        items = [bytes([i]) * 60_000 for i in range(100)]
        for item in items:
            q.put(item, timeout=10)
        with pytest.raises(queue.Full):
            q.put(b"one too many", timeout=0.2)
        assert q.qsize() == 100
        assert [q.get(timeout=10) for _ in range(100)] == items
        q.put(b"room again", timeout=10)
        assert q.get(timeout=10) == b"room again"
    finally:
        q.close()


def test_simple_queue_put_waits_for_room():
    q = SimpleQueue(capacity=4096)
    try:
        got = []
        t = threading.Thread(target=lambda: got.extend(q.get() for _ in range(2000)))
        t.start()
        for i in range(2000):
            q.put(i)  # blocks whenever the 4 KiB ring is full
        t.join(60)
        assert got == list(range(2000))
    finally:
        q.close()


def test_exiting_producer_flushes_its_buffer(fork_or_spawn):
    ctx = multiprocessing.get_context(fork_or_spawn)
    q = Queue(capacity=4096)
    p = ctx.Process(target=_put_and_exit, args=(q, 2000))
    p.start()
    got = []
    while len(got) < 2000:
        got.extend(q.get_many(100, timeout=30))
    p.join(30)
    assert p.exitcode == 0
    assert got == list(range(2000))
    q.close()


def test_forked_child_does_not_resend_parents_buffer():
    ctx = multiprocessing.get_context("fork")
    q = Queue(capacity=4096)
    for i in range(1000):
        q.put(i)
    p = ctx.Process(target=time.sleep, args=(0,))
    p.start()
    p.join(30)
    got = []
    while len(got) < 1000:
        got.extend(q.get_many(100, timeout=30))
    with pytest.raises(queue.Empty):
        q.get(timeout=0.2)
    assert got == list(range(1000))
    q.close()


# -- many producers and consumers ----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("many", [False, True], ids=["put-get", "put_many-get_many"])
def test_many_producers_many_consumers(fork_or_spawn, many):
    ctx = multiprocessing.get_context(fork_or_spawn)
    producers, consumers, n = 4, 3, 1500
    total = producers * n
    q = Queue(maxsize=0 if many else 500)
    pipes = [Pipe(duplex=False) for _ in range(consumers)]
    target = _consume_many if many else _consume
    done = ctx.Event()
    procs = [ctx.Process(target=_produce, args=(q, k, n, many)) for k in range(producers)]
    procs += [ctx.Process(target=target, args=(q, w, done)) for _r, w in pipes]
    for p in procs:
        p.start()
    for p in procs[:producers]:
        p.join(60)
        assert p.exitcode == 0
    done.set()  # consumers stop once the queue is empty
    got = gather_in_order(pipes, producers)
    for p in procs[producers:]:
        p.join(60)
    assert len(got) == total, "lost or duplicated items"
    assert set(got) == {(k, i) for k in range(producers) for i in range(n)}
    q.close()


def test_threads_as_producers_and_consumers():
    q = Queue(maxsize=64)
    n_threads, n = 4, 2000
    got: list = []
    lock = threading.Lock()

    def consume():
        mine = []
        while True:
            item = q.get(timeout=30)
            if item is None:
                break
            mine.append(item)
        with lock:
            got.extend(mine)

    producers = [
        threading.Thread(target=lambda k=k: [q.put((k, i)) for i in range(n)]) for k in range(n_threads)
    ]
    consumers = [threading.Thread(target=consume) for _ in range(3)]
    for t in producers + consumers:
        t.start()
    for t in producers:
        t.join(60)
    for _ in consumers:
        q.put(None)
    for t in consumers:
        t.join(60)
    q.close()
    assert sorted(got) == sorted((k, i) for k in range(n_threads) for i in range(n))


# -- crashes -----------------------------------------------------------------------------


def test_consumer_killed_while_blocked_in_get(fork_or_spawn):
    ctx = multiprocessing.get_context(fork_or_spawn)
    q = Queue()
    ready = Queue()
    p = ctx.Process(target=_get_forever, args=(q, ready))
    p.start()
    assert ready.get(timeout=30) == "ready"
    time.sleep(0.1)  # let it block in get
    os.kill(p.pid, signal.SIGKILL)
    p.join(30)
    q.put_many(range(100))
    assert q.get_many(100, timeout=30) == list(range(100))
    q.close()
    ready.close()


def test_producer_killed_mid_stream_leaves_a_consistent_queue(fork_or_spawn):
    ctx = multiprocessing.get_context(fork_or_spawn)
    q = Queue()
    progress = Queue()
    p = ctx.Process(target=_put_forever, args=(q, 7, progress))
    p.start()
    assert progress.get(timeout=30) == "started"
    os.kill(p.pid, signal.SIGKILL)
    p.join(30)
    got = []
    try:
        while True:
            got.extend(q.get_many(1000, timeout=0.2))
    except queue.Empty:
        pass
    # What arrived is exactly the producer's first items, in order.
    assert [i for _k, i in got] == list(range(len(got)))
    q.put("after")
    assert q.get(timeout=30) == "after"
    assert q.qsize() == 0
    q.close()
    progress.close()


@pytest.mark.parametrize("which", ["producers", "consumers"])
def test_process_killed_holding_the_lock(fork_or_spawn, which):
    ctx = multiprocessing.get_context(fork_or_spawn)
    q = Queue()
    q.put("before")
    offset = _ring._PMUTEX if which == "producers" else _ring._CMUTEX
    p = ctx.Process(target=_hold_lock_and_die, args=(q, offset))
    p.start()
    p.join(30)
    assert p.exitcode == -signal.SIGKILL
    q.put("after")  # the robust mutex tells us its owner died; we go on
    assert q.get(timeout=30) == "before"
    assert q.get(timeout=30) == "after"
    assert q.qsize() == 0
    q.close()


def test_consumers_killed_while_items_flow(fork_or_spawn):
    """Consumers die at arbitrary moments; the survivors and the parent
    still get whole items, each at most once, in each producer's order."""
    ctx = multiprocessing.get_context(fork_or_spawn)
    q = Queue()
    for k in range(2):
        q.put_many([(k, i) for i in range(3000)])
    ready = Queue()
    victims = [ctx.Process(target=_get_forever, args=(q, ready)) for _ in range(2)]
    for v in victims:
        v.start()
    for _ in victims:
        assert ready.get(timeout=30) == "ready"
    for v in victims:
        os.kill(v.pid, signal.SIGKILL)
        v.join(30)
    got = []
    try:
        while True:
            got.extend(q.get_many(1000, timeout=0.2))
    except queue.Empty:
        pass
    assert len(set(got)) == len(got)
    for k in range(2):
        seq = [i for ident, i in got if ident == k]
        assert seq == sorted(seq)
    q.close()
    ready.close()


# -- passing the queue ---------------------------------------------------------------------


def test_queue_to_process_all_start_methods(start_method):
    ctx = multiprocessing.get_context(start_method)
    q = Queue()
    out = Queue()
    p = ctx.Process(target=_get_one_and_report, args=(q, out))
    p.start()
    q.put({"hello": start_method})
    assert out.get(timeout=60) == {"hello": start_method}
    p.join(30)
    assert p.exitcode == 0
    q.close()
    out.close()


def _put_from_task(q):
    q.put("from a pool task")
    return q.qsize()


def test_queue_to_a_pool_task(fork_or_spawn):
    ctx = multiprocessing.get_context(fork_or_spawn)
    q = Queue()
    with shoal.Pool(1, context=ctx) as pool:
        assert pool.apply(_put_from_task, (q,)) == 1
    assert q.get(timeout=30) == "from a pool task"
    q.close()


def test_queue_through_a_pipe():
    a, b = Pipe()
    q = Queue()
    with a, b:
        a.send(q)
        q2 = b.recv()
    q.put("shared")
    assert q2.get(timeout=30) == "shared"
    q2.close()
    q.close()


class _Unloadable:
    """Pickles fine, fails to unpickle."""

    def __reduce__(self):
        return (_fail_to_load, ())


def _fail_to_load():
    raise RuntimeError("cannot rebuild")


def test_item_that_fails_to_unpickle_raises_in_get_and_the_rest_survive():
    q = Queue()
    try:
        q.put_many([1, _Unloadable(), np.arange(400_000), 3])
        assert q.get_many(10, timeout=30) == [1]
        with pytest.raises(SerializationError, match="cannot rebuild"):
            q.get_many(10, timeout=30)
        rest = q.get_many(10, timeout=30)
        assert np.array_equal(rest[0], np.arange(400_000)) and rest[1] == 3
        q.put(_Unloadable())
        with pytest.raises(SerializationError):
            q.get(timeout=30)
        q.put("fine")
        assert q.get(timeout=30) == "fine"
    finally:
        q.close()


def _take_a_datagram_and_die(q):
    """A consumer that dies holding the consumers' lock, after taking the
    datagram of the oldest record but before moving head."""
    q._ring._lock(_ring._CMUTEX)
    _data, _anc, _flags, _ = q._reader.recvmsg(1 << 17, 4096)
    os.kill(os.getpid(), signal.SIGKILL)


def _send_an_orphan_and_die(q):
    """A producer that dies holding the producers' lock, after sending a
    datagram but before publishing its record."""
    import struct

    ring = q._ring
    ring._lock(_ring._PMUTEX)
    (seq,) = struct.unpack_from("<q", ring.mm, _ring._SEQ)
    struct.pack_into("<q", ring.mm, _ring._SEQ, seq + 1)
    _payload, (kind, body, anc), _fds = q._entry(os.urandom(100_000), "orphan")
    q._writer.sendmsg([kind, struct.pack("<q", seq), body], anc)
    os.kill(os.getpid(), signal.SIGKILL)


def test_consumer_killed_after_taking_a_datagram(fork_or_spawn):
    ctx = multiprocessing.get_context(fork_or_spawn)
    q = Queue()
    q.put(os.urandom(100_000))  # a SOCKET record: its datagram is the item
    q.put(2)
    p = ctx.Process(target=_take_a_datagram_and_die, args=(q,))
    p.start()
    p.join(30)
    assert p.exitcode == -signal.SIGKILL
    # The first item died with that consumer; the record is skipped.
    assert q.get(timeout=30) == 2
    assert q.qsize() == 0 and q.empty()
    q.put("after")
    assert q.get(timeout=30) == "after"
    q.close()


def test_producer_killed_after_sending_an_orphan_datagram(fork_or_spawn):
    ctx = multiprocessing.get_context(fork_or_spawn)
    q = Queue()
    p = ctx.Process(target=_send_an_orphan_and_die, args=(q,))
    p.start()
    p.join(30)
    assert p.exitcode == -signal.SIGKILL
    big = os.urandom(200_000)
    q.put(big)  # the next tag: the orphan (an earlier tag) is discarded
    q.put("small")
    assert q.get(timeout=30) == big
    assert q.get(timeout=30) == "small"
    assert q.qsize() == 0
    q.close()


def test_join_waits_for_items_still_in_the_feeder_buffer():
    q = JoinableQueue(capacity=4096)
    try:
        n = 2000
        for i in range(n):
            q.put(i)  # most of them wait in this process's feeder buffer
        joined = threading.Event()
        t = threading.Thread(target=lambda: (q.join(), joined.set()))
        t.start()
        for _ in range(n - 1):
            q.get(timeout=30)
            q.task_done()
        assert not joined.is_set()
        q.get(timeout=30)
        q.task_done()
        t.join(30)
        assert joined.is_set()
    finally:
        q.close()


def test_bounded_joinable_put_that_times_out_is_not_counted():
    q = JoinableQueue(maxsize=1)
    try:
        q.put(1)
        with pytest.raises(queue.Full):
            q.put(2, timeout=0.05)
        q.get(timeout=30)
        q.task_done()
        q.join()  # returns: the item that did not fit is not waited for
    finally:
        q.close()


def test_put_many_of_large_items_keeps_every_payload():
    q = Queue()
    try:
        items = [os.urandom(70_000 + i) for i in range(8)]  # each in its own memfd
        q.put_many(items)
        got = []
        while len(got) < len(items):
            got.extend(q.get_many(8, timeout=30))
        assert got == items
    finally:
        q.close()


# -- an exception from a signal handler never leaves the ring locked -----------
# (review 3, bug 3) Before: a KeyboardInterrupt right after the ring's mutex
# was taken left it held, and every other process using the queue hung.


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
    # The one-item fast paths lock and unlock in one C call, with no Python
    # code (no signal handler) in between: send those to the general path.
    monkeypatch.setattr(_ring, "_get_one", lambda *args: None)
    monkeypatch.setattr(_ring, "_put_one", lambda *args: 0)


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


# Before: the lock waits ignored the get/put deadlines.
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


# Suspected in review 3. Before: a get interrupted after taking a datagram lost it.
def _interrupt_first_store_of(monkeypatch, offset):
    real = _ring._store
    state = {"armed": True}

    def store(mm, off, value):
        real(mm, off, value)
        if off == offset and state["armed"]:
            state["armed"] = False
            raise _Interrupt  # as a signal handler would, right after

    monkeypatch.setattr(_ring, "_store", store)


@pytest.mark.parametrize("where", [_ring._GETS, _ring._HEAD])
def test_a_get_interrupted_after_taking_items_keeps_them_for_the_next(monkeypatch, where):
    q = Queue()
    try:
        big = b"x" * 100_000  # a datagram
        q.put_many([big, 1, big, 2])
        _interrupt_first_store_of(monkeypatch, where)
        with pytest.raises(_Interrupt):
            q.get(timeout=10)
        _interrupt_first_store_of(monkeypatch, where)
        with pytest.raises(_Interrupt):
            # Takes the stashed item, then one from the ring: both go back.
            q.get_many(2, timeout=10)
        monkeypatch.undo()
        _assert_free(q, _ring._CMUTEX)
        got = [q.get_nowait() for _ in range(4)]
        assert got == [big, 1, big, 2]
        assert q.empty() and q.qsize() == 0
    finally:
        q.close()


# -- an item whose datagram cannot be sent (review 3, bug 4) ---------------------
# Before: a failed send lost the items around it, leaked their descriptors and
# left the item counted as unfinished.


def test_queue_refuses_an_item_with_too_many_descriptors_clearly():
    ends = connections(150)
    q = Queue()
    try:
        before = open_fds()
        with pytest.raises(ValueError, match="at most 252"):
            q.put(ends)
        with pytest.raises(ValueError, match="at most 252"):
            q.put_many([1, ends, 2])
        assert open_fds() == before
        q.put(1)
        assert q.get(timeout=10) == 1
        assert q.empty()
    finally:
        q.close()
        close_all(ends)


def _finish_all(q, n):
    """Mark the *n* items taken from JoinableQueue *q* done: nothing is left
    counted as unfinished, and join() returns."""
    for _ in range(n):
        q.task_done()
    assert _native.load(q._ring.mm, _ring._UNFINISHED) == 0
    q.join()


def _let_the_kernel_refuse(monkeypatch):
    # Skip the early check: the kernel's sendmsg then fails (EINVAL), as any
    # send failure would.
    monkeypatch.setattr(_queue, "MAX_FDS", 10_000)


@pytest.mark.parametrize("cls", [Queue, JoinableQueue])
def test_a_failed_send_in_put_loses_nothing_else_and_leaks_nothing(monkeypatch, cls):
    ends = connections(150)
    q = cls()
    try:
        _let_the_kernel_refuse(monkeypatch)
        before = open_fds()
        q.put("first")
        with pytest.raises(OSError, match="not put"):
            q.put(ends)
        with pytest.raises(OSError, match="not put"):
            q.put_many(["second", ends, "never"])
        assert open_fds() == before
        q.put("third")
        assert [q.get(timeout=10) for _ in range(3)] == ["first", "second", "third"]
        assert q.empty()
        if cls is JoinableQueue:
            _finish_all(q, 3)
    finally:
        q.close()
        close_all(ends)


@pytest.mark.parametrize("cls", [Queue, JoinableQueue])
def test_the_feeder_drops_only_the_item_it_cannot_send(monkeypatch, cls):
    ends = connections(150)
    q = cls(capacity=4096)
    try:
        _let_the_kernel_refuse(monkeypatch)
        n_fill = 0
        while q._ring.put_inline(pickle.dumps(("fill", n_fill), 5)):
            n_fill += 1
        if cls is JoinableQueue:
            q._ring.add_unfinished(n_fill)
        with pytest.warns(RuntimeWarning, match="dropped"):
            q.put(("before", 0))  # the ring is full: these wait for the feeder
            q.put(ends)
            for i in range(5):
                q.put(("after", i))
            got = [q.get(timeout=10) for _ in range(n_fill + 6)]
        assert got == [("fill", i) for i in range(n_fill)] + [("before", 0)] + [
            ("after", i) for i in range(5)
        ]
        assert q.empty()
        if cls is JoinableQueue:
            _finish_all(q, len(got))
    finally:
        q.close()
        close_all(ends)


# -- descriptor limits (review 3, bugs 5 and 6) --------------------------------------


# Before: a receiver at RLIMIT_NOFILE blamed the sender or the unpickling.
def test_queue_get_at_the_descriptor_limit_says_so():
    q = Queue()
    try:
        q.put(np.arange(100_000))
        q.put("after")
        first, second = at_fd_limit(lambda: q.get(timeout=10))
        assert first.startswith("OSError 24 ") and "too many open files" in first and "lost" in first
        assert second == "'after'"
    finally:
        q.close()


def _queue_over_the_inflight_limit(q):
    _limit, n = limit_descriptors_in_flight()
    try:
        for i in range(n):
            q.put((i, b"x" * 100_000))
        got = [q.get(timeout=30)[0] for _ in range(n)]
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "ok" if got == list(range(n)) else f"wrong order {got[:10]}"


# Before: more descriptors in flight than RLIMIT_NOFILE (ETOOMANYREFS) was a
# cryptic error instead of a full buffer to wait for.
def test_queue_waits_while_too_many_descriptors_are_in_flight():
    q = Queue()
    try:
        assert child_reports(lambda: _queue_over_the_inflight_limit(q)) == "ok"
    finally:
        q.close()


def test_put_that_cannot_start_its_feeder_raises_and_loses_nothing(monkeypatch):
    # At interpreter shutdown Python refuses new threads: a put that needs
    # the feeder (the ring is full) must say so, not buffer the item forever.
    q = shoal.Queue()
    try:

        def refuse(self):
            raise RuntimeError("can't create new thread at interpreter shutdown")

        monkeypatch.setattr(threading.Thread, "start", refuse)
        put = 0
        with pytest.raises(RuntimeError, match="can't create new thread") as info:
            while put < 10_000_000:
                q.put(put)
                put += 1
        assert "could not start its feeder thread; the item was not put" in " ".join(info.value.__notes__)
        monkeypatch.undo()
        got = q.get_many(put + 1, timeout=10)
        while len(got) < put:
            got += q.get_many(put - len(got), timeout=10)
        assert got == list(range(put))
        q.put("after")
        assert q.get(timeout=10) == "after"
    finally:
        q.close()
