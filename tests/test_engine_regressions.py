"""Regression tests for engine bugs found in review: each failed before its fix."""

from __future__ import annotations

import os
import time

import psutil
import pytest
import workers

import shoal

np = pytest.importorskip("numpy")


def test_a_result_that_fails_to_unpickle_does_not_shift_the_next_ones():
    with shoal.Pool(1) as pool:
        for _ in range(20):
            pool.apply(workers.big_result, ("warm",))  # short: the next ones share a batch
        it = pool.imap(workers.big_result, ["bad", "B", "C"])
        with pytest.raises(shoal.SerializationError, match="could not be unpickled in the parent"):
            next(it)
        assert bytes(next(it)[:1]) == b"B"
        assert bytes(next(it)[:1]) == b"C"


def test_a_pickling_failure_leaves_no_stale_buffers_for_the_next_task():
    import threading

    big = np.full(400_000, 7, dtype=np.uint8)
    zeros = np.zeros(400_000, dtype=np.uint8)
    with shoal.Pool(1) as pool:
        with pytest.raises(TypeError):
            pool.apply_async(workers.identity, ((big, threading.Lock()),))
        assert int(pool.apply(workers.identity, (zeros,))[0]) == 0


def test_more_than_253_descriptors_in_one_message_both_ways():
    arrays = workers.many_arrays(300)
    with shoal.Pool(1) as pool:
        assert len(pool.apply(workers.many_arrays, (300,))) == 300
        assert pool.apply(workers.count_arrays, (arrays,)) == 300


def test_unprintable_unpicklable_exception_fails_only_its_task():
    with shoal.Pool(1) as pool:
        with pytest.raises(shoal.SerializationError, match="UnprintableError"):
            pool.apply(workers.raise_unprintable)
        assert pool.statistics().workers_replaced == 0


def test_innocent_tasks_survive_workers_dying_around_them():
    payloads = [bytes([1 if i % 50 == 7 else 0]) * 10 for i in range(1000)]
    with shoal.Pool(2) as pool:
        results = [pool.apply_async(workers.exit_if_one, (p,)) for p in payloads]
        died = ok = 0
        for r in results:
            try:
                assert r.get(timeout=60) == 10
                ok += 1
            except shoal.WorkerDiedError:
                died += 1
    assert died == 20  # exactly the tasks that exit
    assert ok == 980


def test_closures_carry_their_current_values():
    scale = {"k": 1}

    def scaled(x):
        return x * scale["k"]

    with shoal.Pool(1) as pool:
        assert pool.map(scaled, [1, 2]) == [1, 2]
        scale["k"] = 10
        assert pool.map(scaled, [1, 2]) == [10, 20]


def test_many_functions_in_one_batch(monkeypatch):
    from shoal._engine import _engine

    monkeypatch.setattr(_engine, "FN_CACHE", 4)
    fns = [workers.square, workers.identity, workers.getpid, workers.add, workers.sleep_for, workers.array_sum]
    with shoal.Pool(1) as pool:
        pool.apply(workers.square, (1,))
        results = []
        for i in range(60):
            fn = fns[i % 3]
            results.append(pool.apply_async(fn, (i,)))
        assert len([r.get(timeout=30) for r in results]) == 60


def _links(pid: int) -> set[str]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return out


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
        for fd in engine._descriptors():
            try:
                link = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if link.startswith(("socket:", "pipe:")):  # unique inode numbers
                private.add(link)
        assert len(private) >= 3  # the wake-up pipe and a channel per worker
        for pid in engine.worker_pids:
            assert not (private & _links(pid)), "a worker holds the engine's own descriptors"


def test_broken_initializer_in_a_replacement_lets_running_tasks_finish(tmp_path, monkeypatch):
    mark = tmp_path / "mark"
    monkeypatch.setenv("SHOAL_TEST_MARK", str(mark))
    with shoal.Pool(2, initializer=workers.fail_if_marked) as pool:
        healthy = pool.apply_async(workers.sleep_for, (1.0,))
        victim = pool.apply_async(workers.sleep_for, (30,))
        time.sleep(0.3)
        mark.write_text("")
        victim_pid = next(w.pid for w in pool._engine._workers.values() if victim._task in w.inflight)
        psutil.Process(victim_pid).kill()
        with pytest.raises(shoal.WorkerDiedError):
            victim.get(timeout=30)
        assert healthy.get(timeout=30) == 1.0
        with pytest.raises(shoal.WorkerStartError):
            pool.apply(workers.square, (2,))
