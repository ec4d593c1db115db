"""Sharing class objects with workers: a read-only shared object, and actors.

* "shared 200MB object, 10k tasks": a dict holding a 200 MB numpy array
  (50 MB and 2,000 tasks with ``--quick``), read by tiny tasks on 2 workers.
  The time runs from creating the pool to the last result, because getting
  the object to the workers is the work being compared.  Figure: tasks/s.

  - "vs per task": the standard library passes the object with every task
    (``apply_async(fn, (obj, i))``).  That moves 200 MB per task, so it runs
    only PER_TASK_N tasks; its figure is still tasks per second.
  - "vs initializer": the standard library's ``Pool(initializer=...,
    initargs=(obj,))`` setting a global that the tasks read.
  - shoal: ``Pool(shared=obj)``; tasks read ``shoal.shared()``.
  - shoal-init: the standard library's code with ``shoal.Pool``.

* "actor method round trip": synchronous method calls per second: a class
  registered on a ``BaseManager`` and called through its proxy (stdlib), a
  ``shoal.Actor``, and a Ray actor (``method.remote()`` + ``ray.get``) when
  Ray is installed.
* "actor call vs shoal Pipe round trip": the same synchronous calls, as µs
  per call (best batch), against shoal's own ``Pipe`` ping-pong with a
  forked echo process: the transport an actor call is built on, so the
  ratio is what the actor's own work costs on top of it.
* "actor calls, 4 callers and 4 actors on 2 CPUs": four processes, each
  calling its own actor (or its own ``BaseManager``'s proxy), all timed
  together: twice as many processes that want a CPU as there are CPUs.
  ``shoal-socket`` is shoal with its shared-memory lane turned off, so the
  row shows whether the lane's look before sleeping costs a busy machine.
* "actor send() vs sync call": fire-and-forget calls per second (N sends,
  then one waiting call, so every send has run) against shoal's own
  synchronous calls.
"""

from __future__ import annotations

import sys
import time
from multiprocessing.managers import BaseManager

import shoal

from ._framework import Scenario, optional

WORKERS = 2
PER_TASK_N = 6

# -- the shared object ---------------------------------------------------------------

_global = None


def _set_global(obj) -> None:
    global _global
    _global = obj


def _read_global(i: int) -> float:
    table = _global["table"]
    return float(table[i % len(table)])


def _read_passed(obj, i: int) -> float:
    table = obj["table"]
    return float(table[i % len(table)])


def _read_shared(i: int) -> float:
    # shoal is imported once, at the top of this module, as users write it:
    # an `import shoal` inside the task cost 0.3 µs a call, as much as the rest.
    table = shoal.shared()["table"]
    return float(table[i % len(table)])


def _sizes(quick: bool) -> tuple[int, int]:
    """(bytes of the object, tasks)."""
    return (50 << 20, 2000) if quick else (200 << 20, 10_000)


def _make_object(nbytes: int) -> dict:
    import numpy as np

    return {"name": "lookup table", "table": np.arange(nbytes // 8, dtype=np.float64)}


def _shared_shoal(quick: bool) -> float:
    nbytes, n = _sizes(quick)
    obj = _make_object(nbytes)
    t0 = time.perf_counter()
    with shoal.Pool(WORKERS, shared=obj) as pool:
        out = pool.map(_read_shared, range(n))
    dt = time.perf_counter() - t0
    assert out[-1] == float((n - 1) % len(obj["table"]))
    return n / dt


def _shared_per_task(quick: bool) -> float:
    import multiprocessing

    nbytes, _n = _sizes(quick)
    n = 2 if quick else PER_TASK_N
    obj = _make_object(nbytes)
    t0 = time.perf_counter()
    with multiprocessing.Pool(WORKERS) as pool:
        results = [pool.apply_async(_read_passed, (obj, i)) for i in range(n)]
        out = [r.get() for r in results]
    dt = time.perf_counter() - t0
    assert out[-1] == float(n - 1)
    return n / dt


def _shared_initializer(quick: bool, module: str = "multiprocessing") -> float:
    import importlib

    nbytes, n = _sizes(quick)
    obj = _make_object(nbytes)
    pool_class = importlib.import_module(module).Pool
    t0 = time.perf_counter()
    with pool_class(WORKERS, initializer=_set_global, initargs=(obj,)) as pool:
        out = pool.map(_read_global, range(n))
    dt = time.perf_counter() - t0
    assert out[-1] == float((n - 1) % len(obj["table"]))
    return n / dt


# -- actors --------------------------------------------------------------------------


class Counter:
    def __init__(self) -> None:
        self.n = 0

    def incr(self, k: int = 1) -> int:
        self.n += k
        return self.n

    def get(self) -> int:
        return self.n


class _Manager(BaseManager):
    pass


_Manager.register("Counter", Counter)


def _calls(quick: bool) -> int:
    return 500 if quick else 3000


def _rate_of(call, n: int) -> float:
    call()  # warm
    t0 = time.perf_counter()
    for _ in range(n):
        call()
    return n / (time.perf_counter() - t0)


def _round_trip_manager(quick: bool) -> float:
    with _Manager() as manager:
        counter = manager.Counter()
        return _rate_of(counter.incr, _calls(quick))


def _round_trip_shoal(quick: bool) -> float:
    with shoal.Actor(Counter) as counter:
        return _rate_of(counter.incr, _calls(quick))


def _call_us_shoal(quick: bool) -> float:
    """µs per synchronous call, the best of several batches (as the Pipe's row)."""
    batches, per_batch = (5, 1000) if quick else (20, 2000)
    best = float("inf")
    with shoal.Actor(Counter) as counter:
        incr = counter.incr
        for _ in range(200):
            incr()
        for _ in range(batches):
            t0 = time.perf_counter()
            for _ in range(per_batch):
                incr()
            best = min(best, (time.perf_counter() - t0) / per_batch)
    return best * 1e6


def _pipe_us_shoal(quick: bool) -> float:
    from .bench_ipc import _pipe_round_trip

    return _pipe_round_trip("shoal", quick)


# -- a busy machine: 4 callers, each with its own actor, on 2 CPUs ------------------------

BUSY_CALLERS = 4


def _busy_caller(kind: str, n: int, start, out) -> None:
    """One of BUSY_CALLERS processes: make its own actor (or manager), warm
    it, wait for the others, then time n synchronous calls."""
    import os

    if kind == "stdlib":
        manager = _Manager()
        manager.start()
        counter = manager.Counter()
        close = manager.shutdown
    else:
        os.environ["SHOAL_ACTOR_LANES"] = "1" if kind == "shoal" else "0"  # this forked caller's only
        counter = shoal.get_context("fork").Actor(Counter)
        close = counter.close
    try:
        for _ in range(50):
            counter.incr()
        start.wait()
        t0 = time.perf_counter()
        for _ in range(n):
            counter.incr()
        out.put(n / (time.perf_counter() - t0))
    finally:
        close()


def _busy_rate(kind: str, quick: bool) -> float:
    """Calls per second of all BUSY_CALLERS together: 8 processes that each
    want a CPU (4 callers, 4 actors) on this 2-CPU machine."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    n = 300 if quick else 1500
    start = ctx.Barrier(BUSY_CALLERS)
    out = ctx.SimpleQueue()
    procs = [ctx.Process(target=_busy_caller, args=(kind, n, start, out)) for _ in range(BUSY_CALLERS)]
    for p in procs:
        p.start()
    rates = [out.get() for _ in procs]
    for p in procs:
        p.join()
    return sum(rates)


_ray_started = False


def _round_trip_ray(quick: bool) -> float:
    import ray

    global _ray_started
    if not _ray_started:
        import atexit

        ray.init(num_cpus=WORKERS, include_dashboard=False, log_to_driver=False, logging_level="error")
        atexit.register(ray.shutdown)
        _ray_started = True
    counter = ray.remote(Counter).remote()
    try:
        return _rate_of(lambda: ray.get(counter.incr.remote()), _calls(quick) // 5)
    finally:
        ray.kill(counter)


def _send_shoal(quick: bool) -> float:
    n = 20_000 if quick else 200_000
    with shoal.Actor(Counter) as counter:
        counter.get()
        send = counter.incr.send
        t0 = time.perf_counter()
        for _ in range(n):
            send()
        total = counter.get()  # runs after every send of this process
        dt = time.perf_counter() - t0
    assert total == n
    return n / dt


_round_trip = {"stdlib": _round_trip_manager, "shoal": _round_trip_shoal}
if optional("ray"):
    _round_trip["ray"] = _round_trip_ray


# The shared-object scenarios need numpy (the 200 MB object is an array).
_SHARED_SCENARIOS = [
    Scenario(
        "shared 200MB object, 10k tasks vs per task",
        "tasks/s",
        True,
        {"stdlib": _shared_per_task, "shoal": _shared_shoal},
        target=">= 50x",
        repeat=1,
    ),
    Scenario(
        "shared 200MB object, 10k tasks vs initializer",
        "tasks/s",
        True,
        {
            "stdlib": _shared_initializer,
            "shoal": _shared_shoal,
            # The same initializer code with shoal's Pool: the drop-in path.
            "shoal-init": lambda quick: _shared_initializer(quick, "shoal"),
        },
        target=">= 1.0x",
        repeat=7,  # ~50 ms a run, most of it starting and stopping the pool: noisy
    ),
]
if not optional("numpy"):
    print("bench_actor: shared-object scenarios skipped (need numpy: pip install numpy)", file=sys.stderr)
    _SHARED_SCENARIOS = []

SCENARIOS = [
    *_SHARED_SCENARIOS,
    Scenario(
        "actor method round trip",
        "calls/s",
        True,
        _round_trip,
        target=">= 3x (>= 10x ray)",
    ),
    Scenario(
        "actor call vs shoal Pipe round trip",
        "µs",
        False,
        {"Pipe": _pipe_us_shoal, "shoal": _call_us_shoal},
        target=">= 0.67x (time <= 1.5x shoal's own Pipe round trip)",
        baseline="Pipe",
    ),
    Scenario(
        "actor calls, 4 callers and 4 actors on 2 CPUs",
        "calls/s",
        True,
        {
            "stdlib": lambda q: _busy_rate("stdlib", q),
            "shoal": lambda q: _busy_rate("shoal", q),
            # The same calls on the connection alone: the lane's look must
            # not take the CPU its peer needs when there are more
            # runnable processes than CPUs.
            "shoal-socket": lambda q: _busy_rate("shoal-socket", q),
        },
        target=">= 1x, >= 1x shoal-socket",
    ),
    Scenario(
        "actor send() vs sync call (shoal)",
        "calls/s",
        True,
        {"shoal-sync": _round_trip_shoal, "shoal": _send_shoal},
        target=">= 10x (vs the same calls made synchronously)",
        baseline="shoal-sync",
    ),
]
