"""shoal.Pipe / shoal.Connection: the standard library's documented behaviour,
safety under concurrent use, crashes, and large data through shared memory."""

from __future__ import annotations

import multiprocessing
import os
import signal
import textwrap
import threading
import time

import numpy as np
import pytest

import shoal
from helpers import (
    at_fd_limit,
    child_reports,
    gather_in_order,
    limit_descriptors_in_flight,
    open_fds,
    run_python,
)
from shoal import Pipe, SerializationError

# -- helpers run in child processes (module level, so spawn can import them) --


def _send_hello(conn):
    conn.send("Hello 妹妹")
    conn.close()


def _echo(conn, other=None):
    if other is not None:
        other.close()
    while True:
        try:
            obj = conn.recv()
        except EOFError:
            break
        conn.send(obj)
    conn.close()


def _producer(conn, ident, n, big=False):
    blob = b"x" * 100_000 if big else b""
    for i in range(n):
        conn.send((ident, i, blob))
    conn.close()


def _consumer(conn, results, expected):
    got = []
    for _ in range(expected):
        ident, i, _blob = conn.recv()
        got.append((ident, i))
    results.send(got)
    results.close()


def _block_in_recv(conn, ready):
    ready.send("ready")
    conn.recv_bytes()


def _send_forever(conn):
    arr = np.arange(300_000, dtype=np.int64)  # out of band, through a memfd
    while True:
        conn.send(arr)
        conn.send_bytes(b"y" * 200_000)


def _recv_array_sum(conn):
    arr = conn.recv()
    conn.send(int(arr.sum()))
    conn.close()


def _send_through(conn, inner):
    inner.send("through a connection that travelled")
    inner.close()
    conn.close()


# -- the seed's example ------------------------------------------------------

SEED = textwrap.dedent(
    """\
    from shoal import Process, Pipe

    def f(conn):
        conn.send("Hello 妹妹") #子进程发送了消息
        conn.close()

    if __name__ == '__main__':
        {setup}
        parent_conn, child_conn = Pipe() #建立管道,拿到管道的两端,双工通信方式,两端都可以收发消息
        p = Process(target=f, args=(child_conn,)) #将管道的一段给子进程
        p.start() #开启子进程
        print(parent_conn.recv()) #主进程接受了消息
        p.join()
    """
)


@pytest.mark.parametrize("start_method", [None, "spawn", "forkserver"])
def test_seed_pipe_example(tmp_path, start_method):
    setup = (
        f"import multiprocessing; multiprocessing.set_start_method({start_method!r})"
        if start_method
        else "pass"
    )
    script = tmp_path / "seed_pipe.py"
    script.write_text(SEED.format(setup=setup), encoding="utf-8")
    out = run_python(str(script), timeout=60, env={"PYTHONIOENCODING": "utf-8"})
    assert out.returncode == 0, out.stderr
    assert out.stdout == "Hello 妹妹\n"


# -- documented behaviour ------------------------------------------------------


def test_send_recv_objects_both_directions():
    a, b = Pipe()
    with a, b:
        for obj in [1, "text", None, [1, 2, {"k": (3, 4)}], b"bytes", 3.5, {1, 2}]:
            a.send(obj)
            assert b.recv() == obj
            b.send(obj)
            assert a.recv() == obj


def test_lambda_is_sent_with_cloudpickle():
    a, b = Pipe()
    with a, b:
        a.send(lambda x: x * 3)
        assert b.recv()(5) == 15


def test_send_bytes_offset_size_and_recv_bytes():
    a, b = Pipe()
    with a, b:
        a.send_bytes(b"hello world")
        assert b.recv_bytes() == b"hello world"
        a.send_bytes(b"hello world", 6)
        assert b.recv_bytes() == b"world"
        a.send_bytes(b"hello world", 0, 5)
        assert b.recv_bytes() == b"hello"
        a.send_bytes(b"")
        assert b.recv_bytes() == b""
        a.send_bytes(bytearray(b"abc"))
        assert b.recv_bytes() == b"abc"
        a.send_bytes(np.arange(4, dtype=np.int32))  # itemsize > 1: sent as its bytes
        assert np.frombuffer(b.recv_bytes(), dtype=np.int32).tolist() == [0, 1, 2, 3]
        with pytest.raises(ValueError, match="offset is negative"):
            a.send_bytes(b"abc", -1)
        with pytest.raises(ValueError, match="buffer length < offset"):
            a.send_bytes(b"abc", 4)
        with pytest.raises(ValueError, match="size is negative"):
            a.send_bytes(b"abc", 0, -1)
        with pytest.raises(ValueError, match="offset \\+ size"):
            a.send_bytes(b"abc", 1, 3)


def test_send_bytes_interoperates_with_recv():
    import pickle

    a, b = Pipe()
    with a, b:
        a.send_bytes(pickle.dumps({"x": 1}))
        assert b.recv() == {"x": 1}
        a.send([1, 2])
        assert pickle.loads(b.recv_bytes()) == [1, 2]


def test_recv_bytes_into():
    a, b = Pipe()
    with a, b:
        buf = bytearray(10)
        a.send_bytes(b"abc")
        assert b.recv_bytes_into(buf) == 3
        assert buf[:3] == b"abc"
        a.send_bytes(b"xyz")
        assert b.recv_bytes_into(buf, 5) == 3
        assert buf == bytearray(b"abc\0\0xyz\0\0")
        arr = np.zeros(4, dtype=np.int32)
        a.send_bytes(np.array([7, 8], dtype=np.int32))
        assert b.recv_bytes_into(arr, 4) == 8  # offset in bytes
        assert arr.tolist() == [0, 7, 8, 0]
        a.send_bytes(b"0123456789abc")
        with pytest.raises(multiprocessing.BufferTooShort) as info:
            b.recv_bytes_into(bytearray(4))
        assert info.value.args[0] == b"0123456789abc"
        with pytest.raises(ValueError):
            b.recv_bytes_into(buf, -1)
        with pytest.raises(ValueError):
            b.recv_bytes_into(buf, 11)


def test_poll():
    a, b = Pipe()
    with a, b:
        assert b.poll() is False
        assert b.poll(0.05) is False
        a.send(1)
        assert b.poll() is True
        assert b.poll(None) is True
        assert b.recv() == 1
        assert b.poll(0) is False
        threading.Timer(0.05, a.send, args=("late",)).start()
        assert b.poll(30) is True
        assert b.recv() == "late"


def test_poll_is_true_at_eof():
    a, b = Pipe()
    a.close()
    try:
        assert b.poll(5) is True
        with pytest.raises(EOFError):
            b.recv()
    finally:
        b.close()


def test_properties_fileno_and_context_manager():
    a, b = Pipe()
    assert isinstance(a, shoal.Connection)
    assert a.readable and a.writable and not a.closed
    assert isinstance(a.fileno(), int) and a.fileno() >= 0
    with a:
        pass
    assert a.closed
    a.close()  # idempotent
    b.close()
    r, w = Pipe(duplex=False)
    with r, w:
        assert r.readable and not r.writable
        assert w.writable and not w.readable
        w.send("one way")
        assert r.recv() == "one way"
        with pytest.raises(OSError, match="read-only"):
            r.send(1)
        with pytest.raises(OSError, match="write-only"):
            w.recv()


def test_works_with_multiprocessing_connection_wait():
    from multiprocessing.connection import wait

    a, b = Pipe()
    c, d = Pipe()
    with a, b, c, d:
        d.send("ready")
        assert wait([b, c], timeout=5) == [c]


def test_eof_when_peer_closed_before_recv():
    a, b = Pipe()
    a.send("last")
    a.close()
    with b:
        assert b.recv() == "last"
        with pytest.raises(EOFError):
            b.recv()
        with pytest.raises(EOFError):
            b.recv_bytes()


def test_eof_when_peer_closes_during_blocking_recv():
    a, b = Pipe()
    timer = threading.Timer(0.1, a.close)
    timer.start()
    with b, pytest.raises(EOFError):
        b.recv()
    timer.join()


def test_send_to_closed_peer_raises_broken_pipe():
    a, b = Pipe()
    b.close()
    with a, pytest.raises(BrokenPipeError):
        a.send("nobody listens")


def test_closed_connection_raises_clear_oserror():
    a, b = Pipe()
    a.close()
    b.close()
    for call in (lambda: a.send(1), a.recv, a.recv_bytes, lambda: a.send_bytes(b"x"), a.poll, a.fileno):
        with pytest.raises(OSError, match="closed"):
            call()


def test_unpicklable_object_raises_in_sender_and_connection_stays_usable():
    a, b = Pipe()
    with a, b:
        lock = threading.Lock()
        with pytest.raises(SerializationError, match="lock") as info:
            a.send({"fine": 1, "bad": lock})
        assert isinstance(info.value, TypeError)
        assert not b.poll()
        a.send("still works")
        assert b.recv() == "still works"


def test_max_message_size():
    a, b = Pipe(max_message_size=1000)
    with a, b:
        with pytest.raises(ValueError, match="max_message_size"):
            a.send(b"x" * 2000)
        with pytest.raises(ValueError, match="max_message_size"):
            a.send_bytes(b"x" * 2000)
        a.send_bytes(b"x" * 1000)
        assert b.recv_bytes() == b"x" * 1000
    with pytest.raises(ValueError):
        Pipe(max_message_size=-1)


def test_recv_bytes_maxlength_discards_and_stays_usable():
    a, b = Pipe()
    with a, b:
        a.send_bytes(b"x" * 100)
        a.send_bytes(b"y" * 300_000)
        a.send_bytes(b"ok")
        with pytest.raises(OSError, match="bad message length"):
            b.recv_bytes(10)
        with pytest.raises(OSError, match="bad message length"):
            b.recv_bytes(1000)
        assert b.recv_bytes(10) == b"ok"
        with pytest.raises(ValueError):
            b.recv_bytes(-1)


def test_garbage_collected_connection_closes_itself():
    a, b = Pipe()
    del a
    with b, pytest.raises(EOFError):
        b.recv()


# -- large data ------------------------------------------------------------------


def test_large_numpy_array_out_of_band_and_writable():
    a, b = Pipe()
    with a, b:
        arr = np.arange(1_000_000, dtype=np.float64)
        a.send(arr)
        got = b.recv()
        assert np.array_equal(got, arr)
        got[0] = -1.0  # the receiver owns a private, writable copy
        assert arr[0] == 0.0
        del got


def test_large_bytes_bytearray_memoryview_and_mixed_message():
    a, b = Pipe()
    with a, b:
        big = os.urandom(3 << 20)
        message = {"b": big, "ba": bytearray(big[:400_000]), "small": 1, "arr": np.ones(100_000)}
        a.send(message)
        got = b.recv()
        assert got["b"] == big and got["ba"] == bytearray(big[:400_000]) and got["small"] == 1
        assert np.array_equal(got["arr"], np.ones(100_000))
        a.send(memoryview(big))
        assert bytes(b.recv()) == big


def test_large_send_bytes_many_times_reuses_memory_correctly():
    a, b = Pipe()
    with a, b:
        for i in range(20):
            payload = bytes([i]) * (1 << 20) + os.urandom(i * 1000)
            a.send_bytes(payload)
            assert b.recv_bytes() == payload
        # Several in flight before any is read.
        payloads = [os.urandom(200_000 + i) for i in range(6)]
        for p in payloads:
            a.send_bytes(p)
        assert [b.recv_bytes() for _ in payloads] == payloads


def test_large_array_to_child_process(fork_or_spawn):
    ctx = multiprocessing.get_context(fork_or_spawn)
    a, b = Pipe()
    p = ctx.Process(target=_recv_array_sum, args=(b,))
    p.start()
    b.close()
    with a:
        arr = np.arange(2_000_000, dtype=np.int64)
        a.send(arr)
        assert a.recv() == int(arr.sum())
    p.join(30)
    assert p.exitcode == 0


# -- passing connections around ---------------------------------------------------


def test_connection_to_process_all_start_methods(start_method):
    ctx = multiprocessing.get_context(start_method)
    parent, child = Pipe()
    p = ctx.Process(target=_send_hello, args=(child,))
    p.start()
    child.close()
    with parent:
        assert parent.recv() == "Hello 妹妹"
        with pytest.raises(EOFError):
            parent.recv()
    p.join(30)
    assert p.exitcode == 0


def test_connection_sent_through_a_connection(fork_or_spawn):
    ctx = multiprocessing.get_context(fork_or_spawn)
    a, b = Pipe()
    inner_r, inner_w = Pipe(duplex=False)
    p = ctx.Process(target=_send_through_receiver, args=(b,))
    p.start()
    b.close()
    with a, inner_r:
        a.send(inner_w)  # the descriptor travels beside the message
        inner_w.close()
        assert inner_r.recv() == "through a connection that travelled"
    p.join(30)
    assert p.exitcode == 0


def _send_through_receiver(conn):
    inner = conn.recv()
    assert isinstance(inner, shoal.Connection) and inner.writable and not inner.readable
    inner.send("through a connection that travelled")
    inner.close()
    conn.close()


def _send_from_task(conn):
    conn.send("from a pool task")
    return "sent"


def test_connection_to_a_pool_task(fork_or_spawn):
    ctx = multiprocessing.get_context(fork_or_spawn)
    a, b = Pipe()
    with shoal.Pool(1, context=ctx) as pool:
        assert pool.apply(_send_from_task, (b,)) == "sent"
        assert a.recv() == "from a pool task"
    a.close()
    b.close()


def test_connection_through_a_multiprocessing_queue():
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    a, b = Pipe()
    q.put(b)
    got = q.get(timeout=30)
    b.close()
    with a, got:
        a.send("via the resource sharer")
        assert got.recv() == "via the resource sharer"
    q.close()
    q.join_thread()
    # multiprocessing's resource sharer keeps a listening socket for the
    # process's lifetime once used; it is not ours to leave open.
    from multiprocessing import resource_sharer

    resource_sharer.stop(timeout=10)


# -- concurrency -------------------------------------------------------------------


def test_threads_sharing_both_ends():
    a, b = Pipe()
    n_threads, n = 6, 1500
    got: list = []
    lock = threading.Lock()

    def send(ident):
        for i in range(n):
            a.send((ident, i))

    def recv(count):
        mine = [b.recv() for _ in range(count)]
        with lock:
            got.extend(mine)

    senders = [threading.Thread(target=send, args=(k,)) for k in range(n_threads)]
    receivers = [threading.Thread(target=recv, args=(n_threads * n // 3,)) for _ in range(3)]
    for t in senders + receivers:
        t.start()
    for t in senders + receivers:
        t.join(60)
    a.close()
    b.close()
    assert sorted(got) == sorted((k, i) for k in range(n_threads) for i in range(n))


@pytest.mark.slow
@pytest.mark.parametrize("big", [False, True], ids=["small", "large"])
def test_processes_sharing_both_ends(fork_or_spawn, big):
    """Several producer processes on one end, several consumers on the other:
    nothing lost, nothing duplicated, each producer's order kept."""
    ctx = multiprocessing.get_context(fork_or_spawn)
    producers, consumers, n = 3, 2, 300 if big else 2000
    total = producers * n
    a, b = Pipe()
    result_pipes = [Pipe(duplex=False) for _ in range(consumers)]
    procs = [ctx.Process(target=_producer, args=(a, k, n, big)) for k in range(producers)]
    share = [total // consumers + (1 if c < total % consumers else 0) for c in range(consumers)]
    procs += [ctx.Process(target=_consumer, args=(b, w, share[c])) for c, (_r, w) in enumerate(result_pipes)]
    for p in procs:
        p.start()
    a.close()
    b.close()
    got = gather_in_order(result_pipes, producers)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert len(got) == total
    assert set(got) == {(k, i) for k in range(producers) for i in range(n)}


# -- crashes -----------------------------------------------------------------------


def test_peer_killed_while_other_side_blocked_in_recv(fork_or_spawn):
    ctx = multiprocessing.get_context(fork_or_spawn)
    a, b = Pipe()
    ready_r, ready_w = Pipe(duplex=False)
    p = ctx.Process(target=_block_in_recv, args=(a, ready_w))
    p.start()
    a.close()
    ready_w.close()
    with b, ready_r:
        assert ready_r.recv() == "ready"
        # The child is blocked in recv on its end; kill it while we block.
        threading.Timer(0.2, os.kill, args=(p.pid, signal.SIGKILL)).start()
        with pytest.raises(EOFError):
            b.recv()
    p.join(30)
    assert p.exitcode == -signal.SIGKILL


def test_sender_killed_mid_stream_leaves_whole_messages_and_no_leak(fork_or_spawn):
    ctx = multiprocessing.get_context(fork_or_spawn)
    a, b = Pipe()
    p = ctx.Process(target=_send_forever, args=(a,))
    p.start()
    a.close()
    with b:
        for _ in range(3):
            assert b.recv().sum() == np.arange(300_000, dtype=np.int64).sum()
            assert b.recv_bytes() == b"y" * 200_000
        os.kill(p.pid, signal.SIGKILL)
        p.join(30)
        # Whatever was sent before the kill arrives whole; then EOF.
        try:
            while True:
                msg = b.recv_bytes()
                assert len(msg) > 0
        except EOFError:
            pass
    assert p.exitcode == -signal.SIGKILL


def test_receiver_killed_while_sender_blocked_gets_broken_pipe(fork_or_spawn):
    ctx = multiprocessing.get_context(fork_or_spawn)
    a, b = Pipe()
    ready_r, ready_w = Pipe(duplex=False)
    p = ctx.Process(target=_block_in_recv, args=(b, ready_w))
    p.start()
    b.close()
    ready_w.close()
    with a, ready_r:
        assert ready_r.recv() == "ready"
        killer = threading.Timer(0.3, os.kill, args=(p.pid, signal.SIGKILL))
        killer.start()
        with pytest.raises(BrokenPipeError):
            # The child reads one message, then nobody reads: the socket
            # fills, we block, the child dies, we get EPIPE.
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                a.send_bytes(b"z" * 60_000)
        killer.join()
    p.join(30)


def test_threads_sending_large_messages_on_one_end():
    """Many large messages in flight at once from several threads: each
    arrives whole and exact (memfds are recycled only once read)."""
    a, b = Pipe()
    n_threads, n = 5, 12
    payloads = {(k, i): os.urandom(100_000 + 1000 * k + i) for k in range(n_threads) for i in range(n)}

    def send(k):
        for i in range(n):
            a.send_bytes(bytes([k, i]) + payloads[k, i])

    threads = [threading.Thread(target=send, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    got = {}
    for _ in range(n_threads * n):
        msg = b.recv_bytes()
        got[msg[0], msg[1]] = msg[2:]
    for t in threads:
        t.join(30)
    a.close()
    b.close()
    assert got == payloads


# -- max_message_size counts out-of-band buffers (review 3, bug 1) -----------------
# Before: a large numpy array (pickled out of band) passed any limit.


def test_max_message_size_counts_out_of_band_buffers_when_sending():
    a, b = Pipe(max_message_size=100_000)
    try:
        before = open_fds()
        with pytest.raises(ValueError, match="max_message_size"):
            a.send(np.ones(1_000_000, dtype=np.uint8))
        with pytest.raises(ValueError, match="max_message_size"):
            a.send([np.ones(300_000, dtype=np.uint8), a])  # with a descriptor too
        assert open_fds() == before
        assert not b.poll(0)
        a.send(np.ones(50_000, dtype=np.uint8))
        assert b.recv().nbytes == 50_000
    finally:
        a.close()
        b.close()


def test_max_message_size_counts_out_of_band_buffers_when_receiving():
    a, b = Pipe(max_message_size=100_000)
    try:
        a._max = None  # a sender that does not check (another version, say)
        a.send(np.ones(1_000_000, dtype=np.uint8))
        a.send("after")
        with pytest.raises(OSError, match="bad message length") as info:
            b.recv()
        assert info.value.size > 1_000_000
        assert b.recv() == "after"
    finally:
        a.close()
        b.close()


# -- descriptor limits (review 3, bugs 5 and 6) --------------------------------------


# Before: a receiver at RLIMIT_NOFILE blamed the sender or the unpickling.
def test_pipe_recv_at_the_descriptor_limit_says_so():
    a, b = Pipe()
    try:
        a.send(np.arange(100_000))  # out of band: carries a memfd
        a.send("after")
        first, second = at_fd_limit(b.recv)
        assert first.startswith("OSError 24 ") and "too many open files" in first and "lost" in first
        assert second == "'after'"
    finally:
        a.close()
        b.close()


def _pipe_over_the_inflight_limit(a, b):
    limit, n = limit_descriptors_in_flight()
    errors = []
    sent = [0]

    def send():
        try:
            for i in range(n):
                a.send((i, b"x" * 100_000))
                sent[0] += 1
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            a.send((-1, b""))  # no descriptor: this one goes; stop the receiver

    t = threading.Thread(target=send)
    t.start()
    # Receive only once the sender is at the limit (it waits there; before
    # the fix it failed there).
    while sent[0] < limit - 5 and t.is_alive():
        time.sleep(0.01)
    time.sleep(0.2)
    got = []
    while len(got) < n and (i := b.recv()[0]) >= 0:
        got.append(i)
    t.join()
    if errors:
        return errors[0]
    return "ok" if got == list(range(n)) else f"wrong order {got and got[:10]}"


# Before: more descriptors in flight than RLIMIT_NOFILE (ETOOMANYREFS) was a
# cryptic error instead of a full buffer to wait for.
def test_pipe_waits_while_too_many_descriptors_are_in_flight():
    a, b = Pipe()
    try:
        assert child_reports(lambda: _pipe_over_the_inflight_limit(a, b)) == "ok"
    finally:
        a.close()
        b.close()
