"""Pipe and queue scenarios: shoal against multiprocessing, same run.

Queue rows time ``get(timeout=60)`` and, beside them, a plain ``get()`` (the
standard library's faster path, and how most code calls it); faster-fifo
(``Queue(max_size_bytes=10 MB)``) joins the plain and the batched rows when
it is installed (``pip install faster-fifo``; the ``bench`` extra has it).

Every scenario starts its helper processes outside the timed region, times
only the transfer, and joins (or, on an error, kills) them before returning.
"""

from __future__ import annotations

import multiprocessing
import sys
import time
from contextlib import contextmanager

from ._framework import Scenario, optional

_MIB = 1 << 20


def _pipes(contender: str):
    if contender == "shoal":
        import shoal

        return shoal.Pipe
    return multiprocessing.Pipe


def _queues(contender: str):
    if contender == "shoal":
        import shoal

        return shoal.Queue
    if contender == "faster-fifo":
        import faster_fifo

        return lambda: faster_fifo.Queue(max_size_bytes=10 << 20)
    return multiprocessing.Queue


@contextmanager
def _running(procs):
    for p in procs:
        p.start()
    try:
        yield procs
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():  # pragma: no cover - only when a contender breaks
                p.kill()
                p.join()


# -- pipe: 1 MiB bytes messages -------------------------------------------------------


def _drain_bytes(conn, other, n):
    other.close()
    for _ in range(n):
        conn.recv_bytes()
    conn.send_bytes(b"done")
    conn.close()


_WARMUP = 8  # messages sent before timing: both contenders reach steady state


def _pipe_mib(contender: str, quick: bool) -> float:
    n = 100 if quick else 400
    a, b = _pipes(contender)()
    message = b"x" * _MIB
    with _running([multiprocessing.Process(target=_drain_bytes, args=(b, a, n + _WARMUP))]):
        b.close()
        for _ in range(_WARMUP):
            a.send_bytes(message)
        t0 = time.perf_counter()
        for _ in range(n):
            a.send_bytes(message)
        a.recv_bytes()
        dt = time.perf_counter() - t0
        a.close()
    return n * len(message) / dt / 1e9


# -- pipe: a 100 MB numpy array -----------------------------------------------------------


def _array_echo_sum(conn, other):
    other.close()
    while True:
        try:
            arr = conn.recv()
        except EOFError:
            break
        conn.send(float(arr[-1]))  # touch it: the receiver has the data
    conn.close()


def _pipe_array(contender: str, quick: bool) -> float:
    import numpy as np

    arr = np.ones(100_000_000 // 8)
    rounds = 2 if quick else 5
    a, b = _pipes(contender)()
    best = float("inf")
    with _running([multiprocessing.Process(target=_array_echo_sum, args=(b, a))]):
        b.close()
        for _ in range(rounds):
            t0 = time.perf_counter()
            a.send(arr)
            a.recv()
            best = min(best, time.perf_counter() - t0)
        a.close()
    return best * 1e3


# -- pipe: small-message round trip --------------------------------------------------------


def _echo(conn, other):
    other.close()
    while True:
        try:
            conn.send(conn.recv())
        except EOFError:
            break
    conn.close()


def _pipe_round_trip(contender: str, quick: bool) -> float:
    a, b = _pipes(contender)()
    batches, per_batch = (5, 1000) if quick else (20, 2000)
    best = float("inf")
    with _running([multiprocessing.Process(target=_echo, args=(b, a))]):
        b.close()
        for _ in range(200):
            a.send(1)
            a.recv()
        for _ in range(batches):
            t0 = time.perf_counter()
            for i in range(per_batch):
                a.send(i)
                a.recv()
            best = min(best, (time.perf_counter() - t0) / per_batch)
        a.close()
    return best * 1e6


# -- queues: 100-byte messages ---------------------------------------------------------------


def _produce(q, start, n, batch):
    message = b"m" * 100
    start.wait()
    if batch > 1:
        chunk = [message] * batch
        for _ in range(n // batch):
            q.put_many(chunk)
    else:
        for _ in range(n):
            q.put(message)


def _queue_rate(contender: str, quick: bool, producers: int, batched: bool, plain: bool = False) -> float:
    """Messages per second from *producers* processes to this one: ``put``
    and ``get`` (a plain ``get()`` with *plain*, else ``get(timeout=60)``),
    or ``put_many``/``get_many`` when *batched* (where the contender has them)."""
    per_producer = (20_000 if quick else 100_000) // producers
    batch = 250 if batched and contender in ("shoal", "faster-fifo") else 1
    per_producer -= per_producer % batch
    total = per_producer * producers
    q = _queues(contender)()
    start = multiprocessing.Event()
    procs = [
        multiprocessing.Process(target=_produce, args=(q, start, per_producer, batch))
        for _ in range(producers)
    ]
    try:
        with _running(procs):
            time.sleep(0.05)  # let them reach start.wait()
            t0 = time.perf_counter()
            start.set()
            got = 0
            if batch > 1 and contender == "faster-fifo":
                while got < total:
                    got += len(q.get_many(timeout=60, max_messages_to_get=1000))
            elif batch > 1:
                while got < total:
                    got += len(q.get_many(1000, timeout=60))
            elif plain:
                get = q.get
                for _ in range(total):
                    get()
            else:
                get = q.get
                for _ in range(total):
                    get(timeout=60)
            dt = time.perf_counter() - t0
    finally:
        if contender != "faster-fifo":  # (which has neither: its buffer is freed with it)
            q.close()
            q.join_thread()
    return total / dt


def _scenario_queue(producers: int, batched: bool, plain: bool = False) -> Scenario:
    what = "put_many/get_many" if batched else "put/get()" if plain else "put/get"
    runners = {
        "stdlib": lambda quick: _queue_rate("stdlib", quick, producers, batched, plain),
        "shoal": lambda quick: _queue_rate("shoal", quick, producers, batched, plain),
    }
    if (batched or plain) and optional("faster_fifo"):  # pip install faster-fifo (the bench extra has it)
        runners["faster-fifo"] = lambda quick: _queue_rate("faster-fifo", quick, producers, batched, plain)
    if batched:
        target = ">= 5x, >= 1x faster-fifo"
        notes = "the standard library has no batch API: its figure is put/get"
    elif plain:
        target = ">= 3x, >= 2x faster-fifo"
        notes = "a plain get(), as most code calls it (the standard library's faster path)"
    else:
        target, notes = ">= 3x", "get(timeout=60)"
    return Scenario(
        name=f"queue 100 B {producers}p/1c {what}",
        unit="msgs/s",
        higher_is_better=True,
        runners=runners,
        target=target,
        notes=notes,
    )


SCENARIOS = [
    Scenario(
        name="pipe 1 MiB bytes messages",
        unit="GB/s",
        higher_is_better=True,
        runners={
            "stdlib": lambda quick: _pipe_mib("stdlib", quick),
            "shoal": lambda quick: _pipe_mib("shoal", quick),
        },
        target=">= 1.0x",
    ),
    Scenario(
        name="pipe small-message round trip",
        unit="µs",
        higher_is_better=False,
        runners={
            "stdlib": lambda quick: _pipe_round_trip("stdlib", quick),
            "shoal": lambda quick: _pipe_round_trip("shoal", quick),
        },
        target=">= 1.0x",
    ),
    _scenario_queue(1, False),
    _scenario_queue(1, False, plain=True),
    _scenario_queue(4, False),
    _scenario_queue(4, False, plain=True),
    _scenario_queue(1, True),
    _scenario_queue(4, True),
]

if optional("numpy"):  # pip install numpy (or the bench extra) to run it
    SCENARIOS.insert(
        1,
        Scenario(
            name="pipe 100 MB numpy array send + recv",
            unit="ms",
            higher_is_better=False,
            runners={
                "stdlib": lambda quick: _pipe_array("stdlib", quick),
                "shoal": lambda quick: _pipe_array("shoal", quick),
            },
            target=">= 5x",
        ),
    )

if not optional("faster_fifo"):
    print("bench_ipc: faster-fifo rows skipped (pip install faster-fifo)", file=sys.stderr)
