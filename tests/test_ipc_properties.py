"""Property tests: any mix of sizes and operations keeps FIFO order through
the ring's wrap-around, the datagram path and the memfd path."""

from __future__ import annotations

import collections
import os

import numpy as np
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from shoal import Pipe, Queue

# Sizes chosen around the thresholds: inline in a 4 KiB ring (< 1 KiB),
# datagram in band (< 64 KiB), memfd payload (> 64 KiB), and out-of-band
# pickle-5 buffers (numpy arrays >= 256 KiB).
_sizes = st.one_of(
    st.integers(0, 900),
    st.integers(900, 5_000),
    st.integers(60_000, 70_000),
    st.just(-1),  # a numpy array of 300 KiB
)


def _item(n: int, tag: int):
    if n < 0:
        return np.full(300 * 128, tag, dtype=np.int64)
    return (tag, os.urandom(n))


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and np.array_equal(a, b)
    return a == b


_ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), _sizes),
        st.tuples(st.just("put_many"), st.lists(_sizes, min_size=1, max_size=8)),
        st.tuples(st.just("get"), st.just(0)),
        st.tuples(st.just("get_many"), st.integers(1, 10)),
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_ops)
@example([("put_many", [65_515] * 4)])  # more memfd payloads in one batch than the spool keeps
def test_queue_is_fifo_for_any_mix(ops):
    q = Queue(capacity=4096)
    model: collections.deque = collections.deque()
    tag = 0
    try:
        for op, arg in ops:
            if op == "put":
                item = _item(arg, tag)
                tag += 1
                q.put(item)
                model.append(item)
            elif op == "put_many":
                items = [_item(n, tag + i) for i, n in enumerate(arg)]
                tag += len(items)
                q.put_many(items)
                model.extend(items)
            elif op == "get" and model:
                assert _same(q.get(timeout=30), model.popleft())
            elif op == "get_many" and model:
                got = q.get_many(arg, timeout=30)
                assert 1 <= len(got) <= arg
                for item in got:
                    assert _same(item, model.popleft())
        while model:
            assert _same(q.get(timeout=30), model.popleft())
        assert q.empty()
    finally:
        q.close()


@settings(max_examples=30, deadline=None)
@given(st.lists(_sizes, max_size=12))
def test_pipe_delivers_any_mix_in_order(sizes):
    a, b = Pipe()
    with a, b:
        items = [_item(n, i) for i, n in enumerate(sizes)]
        # Few enough to fit the socket buffer without a reader.
        for item in items:
            a.send(item)
        for item in items:
            assert _same(b.recv(), item)
        for n in sizes:
            data = os.urandom(max(n, 0))
            a.send_bytes(data)
            assert b.recv_bytes() == data
