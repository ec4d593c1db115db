"""Chaos: writers SIGKILLed at random moments, many times, while they set,
delete, increment, transact and grow the dict.  After every round the dict
must be consistent (every structural invariant, no torn value, counters
never going back) and usable; at the end nothing may be left behind."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time

import pytest

from helpers import wait_until
from shoal import SharedDict, _native

pytestmark = pytest.mark.slow  # stress: many rounds of processes killed at random


def _valid(key, value) -> bool:
    if isinstance(key, str) and key.startswith("obj"):
        j, n, pad, check = value
        return check == n * 7 + j and pad == "x" * (n % 1500)
    if isinstance(key, str) and key.startswith("str"):
        n, _, pad = value.partition(":")
        return pad == "y" * (int(n) % 700)
    if key in ("counter", "started", "parent") or (isinstance(key, tuple) and key[0] == "txn"):
        return type(value) is int
    return False


def _writer(sd: SharedDict, seed: int) -> None:
    rng = random.Random(seed)
    sd.incr("started")
    n = 0
    while True:
        n += 1
        op = rng.random()
        j = rng.randrange(40)
        if op < 0.3:
            sd[f"obj{j}"] = (j, n, "x" * (n % 1500), n * 7 + j)
        elif op < 0.5:
            sd[f"str{j}"] = f"{n}:" + "y" * (n % 700)
        elif op < 0.6:
            sd.pop(f"obj{j}", None)
            sd.pop(f"str{j}", None)
        elif op < 0.8:
            sd.incr("counter")
        else:
            with sd.locked():
                for i in range(3):
                    sd[("txn", i)] = sd.get(("txn", i), 0) + 1
                sd.update_with("counter", lambda v: v + 1, default=0)


def _wait_started(sd: SharedDict, target: int, timeout: float = 30) -> None:
    assert wait_until(lambda: sd.get("started", 0) >= target, timeout, interval=0.002), (
        "writers did not start"
    )


def _chaos(start_method: str, rounds: int, writers: int = 2) -> None:
    ctx = multiprocessing.get_context(start_method)
    rng = random.Random(1234)
    owner_died = 0
    last_counter = 0
    with SharedDict() as sd:
        for rnd in range(rounds):
            started = sd.get("started", 0)
            procs = [ctx.Process(target=_writer, args=(sd, rnd * 100 + w)) for w in range(writers)]
            for p in procs:
                p.start()
            _wait_started(sd, started + writers)
            time.sleep(rng.uniform(0.0005, 0.02))
            for p in procs:
                os.kill(p.pid, signal.SIGKILL)
            for p in procs:
                p.join(30)
                assert p.exitcode == -signal.SIGKILL
            # Taking the lock reports (and repairs) a writer that died holding it.
            owner_died += _native.dict_lock(sd._map, 10)
            _native.dict_unlock(sd._map)
            assert _native.dict_check(sd._map) == len(sd)
            items = sd.copy()
            for key, value in items.items():
                assert _valid(key, value), (key, value)
            assert list(sd) == list(items)
            counter = sd.get("counter", 0)
            assert counter >= last_counter
            last_counter = counter
            sd["parent"] = rnd  # still usable by everyone
            assert sd["parent"] == rnd and sd.incr("counter", 0) == counter
    return owner_died


def test_writers_killed_at_random_moments_leave_the_dict_consistent():
    owner_died = _chaos("fork", rounds=60)
    # Writers hold the lock much of the time: some kills must have hit a holder.
    assert owner_died >= 1


@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_chaos_under_other_start_methods(start_method):
    _chaos(start_method, rounds=4)


def test_nothing_is_left_after_chaos():
    before = set(os.listdir("/dev/shm"))
    _chaos("fork", rounds=5)
    with open("/proc/self/maps") as f:
        assert "shoal-dict" not in f.read()
    assert set(os.listdir("/dev/shm")) == before
    # Descriptors and child processes are checked by the conftest fixture.
