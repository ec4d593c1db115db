"""Pool control: time limits, cancellation, worker recycling, progress, lazy input."""

from __future__ import annotations

import concurrent.futures
import itertools
import os
import time

import pytest

import shoal
import workers
from helpers import wait_until


def test_late_task_is_killed_and_others_finish(fork_or_spawn):
    with shoal.Pool(2, context=fork_or_spawn) as pool:
        late = pool.apply_async(workers.sleep_for, (30,), task_timeout=0.3)
        others = [pool.apply_async(workers.sleep_then, (i, 0.05)) for i in range(10)]
        with pytest.raises(TimeoutError, match="time limit"):
            late.get(timeout=30)
        assert [r.get(timeout=30) for r in others] == list(range(10))
        stats = pool.statistics()
        assert stats.replaced_because.get("timeout") == 1
        assert stats.workers == 2


def test_pool_wide_time_limit_applies_to_map():
    with shoal.Pool(2, task_timeout=0.3) as pool:
        results = []
        for item in pool.imap(workers.sleep_for, [0.01, 30, 0.01]):
            results.append(item)
            if len(results) == 1:
                break
        it = pool.imap(workers.sleep_for, [0.01, 30, 0.02])
        assert next(it) == 0.01
        with pytest.raises(shoal.TaskTimeoutError):
            next(it)
        assert next(it) == 0.02


def test_cancel_queued_future():
    with shoal.Pool(1) as pool:
        blocker = pool.submit(workers.sleep_for, 0.5)
        queued = [pool.submit(workers.square, i) for i in range(5)]
        cancelled = [f.cancel() for f in queued]
        assert any(cancelled)
        assert blocker.result(timeout=30) == 0.5
        for f, ok in zip(queued, cancelled, strict=False):
            if ok:
                assert f.cancelled()
                with pytest.raises(concurrent.futures.CancelledError):
                    f.result()
        assert pool.apply(workers.square, (3,)) == 9


def test_cancel_running_task_replaces_its_worker():
    with shoal.Pool(1) as pool:
        pid = pool.apply(workers.getpid)
        running = pool.submit(workers.sleep_for, 30)
        time.sleep(0.2)
        assert running.running()
        assert not running.cancel()  # the standard library's cancel() leaves it running
        assert running.cancel(running=True)
        with pytest.raises(concurrent.futures.CancelledError):
            running.result(timeout=10)
        assert pool.apply(workers.getpid) != pid
        assert pool.statistics().replaced_because.get("cancelled") == 1

        async_result = pool.apply_async(workers.sleep_for, (30,))
        time.sleep(0.2)
        assert async_result.cancel()
        with pytest.raises(concurrent.futures.CancelledError):
            async_result.get(timeout=10)


@pytest.mark.slow
def test_maxtasksperchild_recycles_workers(start_method):
    with shoal.Pool(2, maxtasksperchild=3, context=start_method) as pool:
        pids = pool.map(workers.getpid, range(24), chunksize=1)
        counts = {pid: pids.count(pid) for pid in set(pids)}
        assert all(n <= 3 for n in counts.values())
        assert len(counts) >= 8
        assert pool.statistics().replaced_because.get("maxtasksperchild", 0) >= 6


def test_memory_ceiling_recycles_a_worker():
    with shoal.Pool(1, max_memory=200 * 1024 * 1024) as pool:
        first = pool.apply(workers.allocate, (10,))
        assert pool.apply(workers.getpid) == first
        grown = pool.apply(workers.allocate, (250,))
        assert grown == first
        # Over the ceiling: the worker was replaced between tasks.
        assert pool.apply(workers.getpid) != first
        assert pool.statistics().replaced_because.get("max_memory") == 1


def test_endless_generator_through_imap():
    with shoal.Pool(2) as pool:
        got = []
        for value in pool.imap(workers.square, itertools.count()):
            got.append(value)
            if len(got) == 1000:
                break
        assert got == [i * i for i in range(1000)]
        unordered = pool.imap_unordered(workers.square, itertools.count(), chunksize=10)
        assert len(set(itertools.islice(unordered, 500))) == 500


def test_imap_input_error_is_raised_in_order():
    def gen():
        yield 1
        yield 2
        raise RuntimeError("input broke")

    with shoal.Pool(2) as pool:
        it = pool.imap(workers.square, gen())
        assert next(it) == 1
        assert next(it) == 4
        with pytest.raises(RuntimeError, match="input broke"):
            next(it)
        with pytest.raises(StopIteration):
            next(it)


def test_progress_bar_on_stderr(capfd):
    with shoal.Pool(2) as pool:
        assert pool.map(workers.square, range(50), progress=True) == [i * i for i in range(50)]
        assert list(pool.imap(workers.square, range(20), progress=True)) == [i * i for i in range(20)]
        assert sorted(pool.imap_unordered(workers.square, range(20), progress=True)) == sorted(
            i * i for i in range(20)
        )
        assert pool.starmap(workers.add, [(1, 2)] * 30, progress=True) == [3] * 30
    err = capfd.readouterr().err
    assert "50/50" in err
    assert "20/20" in err
    assert "30/30" in err


def test_progress_takes_a_dict_of_tqdm_options(capfd):
    # As the docstrings promise: the dict goes to tqdm as keyword arguments.
    with shoal.Pool(2) as pool:
        assert pool.map(workers.square, range(12), progress={"desc": "squaring", "unit": "sq"}) == [
            i * i for i in range(12)
        ]
    err = capfd.readouterr().err
    assert "squaring" in err
    assert "12/12" in err and "sq/s" in err


def test_map_chunksize_follows_measured_duration():
    with shoal.Pool(2) as pool:
        n = 4000
        pool.map(workers.square, range(n))
        assert pool._engine.map_chunksize(n, workers.square) == n // 8
        pool.map(workers.sleep_then, range(20), chunksize=1)
        # 50 ms per item: chunks of one item keep the tail balanced.
        assert pool._engine.map_chunksize(n, workers.sleep_then) == 1


def test_statistics_reports_replacements():
    with shoal.Pool(1) as pool:
        with pytest.raises(shoal.WorkerDiedError):
            pool.apply(workers.kill_self)
        pool.apply(workers.square, (1,))
        stats = pool.statistics()
    assert stats.workers_replaced == 1
    assert stats.replaced_because == {"died": 1}
    assert stats.workers_started == 2
    assert os.getpid()


def test_cancelled_running_future_is_cancelled_and_callbacks_run_off_the_scheduler():
    import threading

    seen = []
    with shoal.ProcessPoolExecutor(1) as ex:
        fut = ex.submit(workers.sleep_for, 30)
        fut.add_done_callback(lambda f: seen.append((f.cancelled(), threading.current_thread().name)))
        time.sleep(0.2)
        assert fut.cancel(running=True)
        assert fut.cancelled()
        with pytest.raises(concurrent.futures.CancelledError):
            fut.result(timeout=10)
        done = ex.submit(workers.square, 3)
        done.add_done_callback(lambda f: seen.append((f.result(), threading.current_thread().name)))
        assert done.result(timeout=30) == 9
        wait_until(lambda: len(seen) >= 2, timeout=10)
    assert seen[0][0] is True
    assert seen[1][0] == 9
    assert all(name != "shoal-scheduler" for _, name in seen)


def test_cancel_of_a_task_held_but_not_started_kills_it_when_it_starts():
    with shoal.Pool(1) as pool:
        first = pool.submit(workers.sleep_for, 0.5)
        held = pool.submit(workers.sleep_for, 3600)  # sent to the worker behind `first`
        time.sleep(0.1)
        assert held.cancel(running=True)
        assert first.result(timeout=30) == 0.5
        assert held.cancelled()
        # The worker was replaced instead of sleeping for an hour.
        assert pool.apply(workers.square, (2,), task_timeout=30) == 4
        pool.close()
        pool.join()


def test_results_keep_an_unreferenced_pool_alive():
    result = shoal.Pool(2).apply_async(workers.square, (7,))
    import gc

    gc.collect()
    assert result.get(timeout=30) == 49
    it = shoal.Pool(2).imap(workers.square, range(5))
    gc.collect()
    assert list(it) == [0, 1, 4, 9, 16]
    del result, it
    gc.collect()


def test_close_join_finishes_an_unconsumed_imap():
    pool = shoal.Pool(2)
    it = pool.imap(workers.square, range(2000))
    pool.close()
    pool.join()
    assert sum(1 for _ in it) == 2000
