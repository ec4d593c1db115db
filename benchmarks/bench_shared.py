"""Shared-data scenarios: get, set and locked read-modify-write per second,
from one process and from two at once.

* "dict get / set / locked incr" scenarios: the standard library's ``Manager().dict()`` (with a
  ``Manager().Lock()`` around ``d[k] += 1``, as its documentation and the
  seed do; ``mp.Lock`` uses a ``multiprocessing.Lock`` instead) against
  ``shoal.SharedDict`` (``d[k]``, ``d[k] = v``, ``d.incr(k)``).
* "dict incr ... Value" scenarios: ``multiprocessing.Value`` incremented under its
  ``get_lock()`` against ``SharedDict.incr``.
* "(vs UltraDict)" scenarios, when UltraDict is installed (``pip install
  UltraDict atomics``; the ``bench`` extra has them): its ``shared_lock=True`` dict,
  ``with d.lock: d[k] += 1`` and ``d[k]`` from 4 processes, against
  ``SharedDict.incr`` and ``d[k]``.

Two-process figures are total operations / wall time from a common start
(a barrier) to the last finisher.  Every read-modify-write run checks its
final count, so a racy contender fails instead of looking fast.
"""

from __future__ import annotations

import multiprocessing
import sys
import time

from ._framework import Scenario, optional

# -- the timed loops (module level: spawned children import them) -------------------


def _get(d, lock, n: int) -> None:
    for _ in range(n):
        d["key"]


def _set(d, lock, n: int) -> None:
    for i in range(n):
        d["key"] = i


def _locked_add(d, lock, n: int) -> None:
    for _ in range(n):
        with lock:
            d["count"] += 1


def _shoal_incr(d, lock, n: int) -> None:
    incr = d.incr
    for _ in range(n):
        incr("count")


def _value_add(v, lock, n: int) -> None:
    for _ in range(n):
        with v.get_lock():
            v.value += 1


def _ultra_get(name, lock, n: int) -> None:
    from UltraDict import UltraDict

    _get(UltraDict(name=name, shared_lock=True), lock, n)


def _ultra_locked_add(name, lock, n: int) -> None:
    from UltraDict import UltraDict

    d = UltraDict(name=name, shared_lock=True)
    for _ in range(n):
        with d.lock:
            d["count"] += 1


def _child(loop, target, lock, n, barrier, results) -> None:
    barrier.wait(60)
    t0 = time.perf_counter()
    loop(target, lock, n)
    results.put((t0, time.perf_counter()))


def _rate(loop, target, lock, n: int, procs: int) -> float:
    """Operations per second of `loop` run by `procs` processes at once."""
    if procs == 1:
        t0 = time.perf_counter()
        loop(target, lock, n)
        return n / (time.perf_counter() - t0)
    ctx = multiprocessing.get_context()
    barrier = ctx.Barrier(procs + 1)
    results = ctx.Queue()
    workers = [
        ctx.Process(target=_child, args=(loop, target, lock, n, barrier, results)) for _ in range(procs)
    ]
    for w in workers:
        w.start()
    try:
        barrier.wait(60)
        spans = [results.get(timeout=120) for _ in workers]
    finally:
        for w in workers:
            w.join(30)
        results.close()
        results.join_thread()
    return procs * n / (max(t1 for _, t1 in spans) - min(t0 for t0, _ in spans))


def _check(actual, expected) -> None:
    if actual != expected:
        raise AssertionError(f"lost updates: the count is {actual}, expected {expected}")


# -- contenders ----------------------------------------------------------------------


def _n(quick: bool, fast: bool) -> int:
    """Operations per process: shoal's are ~100x cheaper than a Manager's."""
    if fast:
        return 50_000 if quick else 400_000
    return 1_000 if quick else 8_000


def _manager(op: str, procs: int, lock_kind: str = "manager"):
    def run(quick: bool) -> float:
        n = _n(quick, fast=False) // (4 if op == "incr" else 1)
        with multiprocessing.Manager() as m:
            d = m.dict({"key": 1, "count": 0})
            lock = m.Lock() if lock_kind == "manager" else multiprocessing.Lock()
            loop = {"get": _get, "set": _set, "incr": _locked_add}[op]
            rate = _rate(loop, d, lock, n, procs)
            if op == "incr":
                _check(d["count"], n * procs)
            return rate

    return run


def _shoal(op: str, procs: int):
    def run(quick: bool) -> float:
        from shoal import SharedDict

        n = _n(quick, fast=True)
        with SharedDict({"key": 1, "count": 0}) as d:
            loop = {"get": _get, "set": _set, "incr": _shoal_incr}[op]
            rate = _rate(loop, d, None, n, procs)
            if op == "incr":
                _check(d["count"], n * procs)
            return rate

    return run


def _value(procs: int):
    def run(quick: bool) -> float:
        n = _n(quick, fast=True)
        v = multiprocessing.Value("q", 0)
        rate = _rate(_value_add, v, None, n, procs)
        _check(v.value, n * procs)
        return rate

    return run


def _ultradict(op: str, procs: int):
    def run(quick: bool) -> float:
        from UltraDict import UltraDict

        n = (2_000 if quick else 10_000) if op == "incr" else _n(quick, fast=True) // 4
        d = UltraDict({"key": 1, "count": 0}, shared_lock=True)
        try:
            loop = {"get": _ultra_get, "incr": _ultra_locked_add}[op]
            rate = _rate(loop, d.name, None, n, procs)
            if op == "incr":
                _check(d["count"], n * procs)
            return rate
        finally:
            d.unlink()

    return run


def _scenarios() -> list[Scenario]:
    out = []
    for procs in (1, 2):
        label = "1 proc" if procs == 1 else "2 procs"
        out.append(
            Scenario(
                f"dict get, {label} (vs Manager dict)",
                "ops/s",
                True,
                {"stdlib": _manager("get", procs), "shoal": _shoal("get", procs)},
                target=">= 30x",
                repeat=2,
            )
        )
        out.append(
            Scenario(
                f"dict set, {label} (vs Manager dict)",
                "ops/s",
                True,
                {"stdlib": _manager("set", procs), "shoal": _shoal("set", procs)},
                target=">= 20x",
                repeat=2,
            )
        )
        out.append(
            Scenario(
                f"dict locked incr, {label} (vs Manager+Lock)",
                "ops/s",
                True,
                {
                    "stdlib": _manager("incr", procs),
                    "mp.Lock": _manager("incr", procs, lock_kind="mp"),
                    "shoal": _shoal("incr", procs),
                },
                target=">= 50x",
                repeat=2,
            )
        )
        out.append(
            Scenario(
                f"dict incr, {label} (vs Value+get_lock)",
                "ops/s",
                True,
                {"stdlib": _value(procs), "shoal": _shoal("incr", procs)},
                target=">= 1x",
                repeat=2,
            )
        )
    if optional("UltraDict"):
        out.append(
            Scenario(
                "dict locked incr, 4 procs (vs UltraDict)",
                "ops/s",
                True,
                {"UltraDict": _ultradict("incr", 4), "shoal": _shoal("incr", 4)},
                target=">= 25x (exact totals)",
                repeat=2,
                baseline="UltraDict",
            )
        )
        out.append(
            Scenario(
                "dict get, 4 procs (vs UltraDict)",
                "ops/s",
                True,
                {"UltraDict": _ultradict("get", 4), "shoal": _shoal("get", 4)},
                target=">= 1x",
                repeat=2,
                baseline="UltraDict",
            )
        )
    else:
        print("bench_shared: UltraDict rows skipped (pip install UltraDict atomics)", file=sys.stderr)
    return out


SCENARIOS = _scenarios()
