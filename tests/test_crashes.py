"""The crash matrix: every way a task can go wrong, under fork and spawn.

Each row: the function, its argument, the error the caller must see, and a
fragment of its message.  After each crash the pool must still run every
other task, and nothing may hang.
"""

from __future__ import annotations

import time

import numpy as np
import psutil
import pytest

import shoal
import workers

CRASHES = [
    pytest.param(workers.kill_self, None, shoal.WorkerDiedError, "SIGKILL", id="sigkill"),
    pytest.param(workers.segfault, None, shoal.WorkerDiedError, "SIGSEGV", id="segfault"),
    pytest.param(workers.exit_now, 3, shoal.WorkerDiedError, "exit code 3", id="os._exit"),
    pytest.param(
        workers.return_lock,
        None,
        shoal.SerializationError,
        "cannot pickle the task's result",
        id="unpicklable-result",
    ),
    pytest.param(
        workers.raise_error_holding_lock,
        None,
        shoal.SerializationError,
        "ErrorHoldingLock",
        id="unpicklable-exception",
    ),
    # Its __init__ takes two arguments, so plain unpickling fails: rebuilt without __init__.
    pytest.param(
        workers.raise_bad_record,
        7,
        workers.BadRecord,
        "record 7: no such field",
        id="exception-init-two-args",
    ),
    pytest.param(workers.raise_value_error, 7, ValueError, "bad value 7", id="exception"),
    # A SystemExit came back as itself: re-raised in the caller, it ended the
    # caller's program silently with the task's exit status.
    pytest.param(
        workers.call_sys_exit, 3, shoal.TaskExitError, r"the task called sys\.exit\(3\)", id="sys.exit"
    ),
    pytest.param(
        workers.return_exit_at_pickle,
        None,
        shoal.TaskExitError,
        r"pickling the task's result called sys\.exit\(1\)",
        id="sys.exit-at-result-pickle",
    ),
]


@pytest.mark.parametrize(("func", "arg", "expected", "match"), CRASHES)
def test_crash_fails_only_its_task(fork_or_spawn, func, arg, expected, match):
    with shoal.Pool(2, context=fork_or_spawn) as pool:
        before = [pool.apply_async(workers.sleep_then, (i, 0.05)) for i in range(4)]
        bad = pool.apply_async(func, (arg,))
        after = [pool.apply_async(workers.square, (i,)) for i in range(20)]
        with pytest.raises(expected, match=match):
            bad.get(timeout=30)
        assert [r.get(timeout=30) for r in before] == [0, 1, 2, 3]
        assert [r.get(timeout=30) for r in after] == [i * i for i in range(20)]
        # The pool is whole again.
        assert pool.map(workers.square, range(10)) == [i * i for i in range(10)]
        assert pool.statistics().workers == 2


def test_worker_died_error_carries_pid_and_signal():
    with shoal.Pool(1) as pool:
        pid = pool.apply(workers.getpid)
        with pytest.raises(shoal.WorkerDiedError) as info:
            pool.apply(workers.kill_self)
    err = info.value
    assert err.pid == pid
    assert err.exitcode == -9
    assert err.signal_name == "SIGKILL"
    assert "OOM" in str(err)
    import pickle

    clone = pickle.loads(pickle.dumps(err))
    assert (clone.pid, clone.exitcode, clone.signal_name) == (err.pid, err.exitcode, err.signal_name)
    assert err.replaced is True and "The worker was replaced" in str(err)
    # When the system refused the replacement (tests/test_exhaustion.py makes
    # it refuse), the message says so, and survives pickling.
    refused = pickle.loads(pickle.dumps(shoal.WorkerDiedError(pid, -9, replaced=False)))
    assert refused.replaced is False
    assert "was not replaced" in str(refused) and "was replaced" not in str(refused)


@pytest.mark.parametrize("method", ["map", "imap", "imap_unordered"])
def test_map_family_raises_instead_of_hanging(fork_or_spawn, method):
    with shoal.Pool(2, context=fork_or_spawn) as pool:
        if method == "map":
            with pytest.raises(shoal.WorkerDiedError):
                pool.map(workers.crash_on, range(10), chunksize=1)
            assert pool.map(workers.square, range(5)) == [0, 1, 4, 9, 16]
        else:
            results, errors = [], []
            it = getattr(pool, method)(workers.crash_on, range(10))
            while True:
                try:
                    results.append(next(it))
                except StopIteration:
                    break
                except shoal.WorkerDiedError as exc:
                    errors.append(exc)
            # Every other item completes.
            assert len(errors) == 1
            assert sorted(results) == [x * x for x in range(10) if x != 3]


def test_unpicklable_argument_raises_at_submit(fork_or_spawn):
    with shoal.Pool(1, context=fork_or_spawn) as pool:
        with pytest.raises(shoal.SerializationError, match="Unpicklable") as info:
            pool.apply_async(workers.identity, (workers.Unpicklable(),))
        assert isinstance(info.value, TypeError)
        with pytest.raises(TypeError, match="cannot pickle"):
            pool.map(workers.identity, [1, 2, workers.Unpicklable()])
        import threading

        with pytest.raises(TypeError, match="lock"):
            pool.apply(workers.identity, ({"key": threading.Lock()},))
        assert pool.apply(workers.square, (4,)) == 16


@pytest.mark.parametrize("method", ["map", "imap", "starmap", "imap_unordered", "executor.map"])
def test_an_unpicklable_item_among_many_is_named_by_its_index(fork_or_spawn, method):
    import threading

    items = list(range(50))
    items[37] = threading.Lock()
    with pytest.raises(TypeError, match=r"item 37 of the input .*cannot pickle.*lock"):
        if method == "executor.map":
            with shoal.ProcessPoolExecutor(1, mp_context=fork_or_spawn) as ex:
                list(ex.map(workers.identity, items))
            return
        with shoal.Pool(1, context=fork_or_spawn) as pool:
            if method == "starmap":
                pool.starmap(workers.add, [(i, x) for i, x in enumerate(items)])
            elif method == "map":
                pool.map(workers.identity, items, chunksize=4)
            else:
                list(getattr(pool, method)(workers.identity, items, chunksize=3))


def test_an_open_file_is_refused_at_submit(fork_or_spawn, tmp_path):
    # It used to reach the worker as a StringIO copy of the file's contents
    # (cloudpickle's fallback), while the error text said files cannot be sent.
    path = tmp_path / "data.txt"
    path.write_text("contents")
    with shoal.Pool(1, context=fork_or_spawn) as pool, open(path) as f:
        with pytest.raises(TypeError, match="open file .*data.txt.* cannot be sent to another process"):
            pool.apply_async(workers.identity, (f,))
        with pytest.raises(TypeError, match="open file"):
            pool.map(workers.identity, [f])
        assert pool.apply(workers.square, (4,)) == 16


def test_failing_initializer_is_a_clear_error(fork_or_spawn):
    with shoal.Pool(2, initializer=workers.failing_initializer, context=fork_or_spawn) as pool:
        with pytest.raises(shoal.WorkerStartError, match="initializer exploded"):
            pool.apply(workers.square, (2,))
        stats = pool.statistics()
        # No endless respawning.
        assert stats.workers_started <= 2
        with pytest.raises(shoal.WorkerStartError):
            pool.apply_async(workers.square, (2,))


def test_large_arguments_survive_a_requeue(fork_or_spawn):
    big = np.arange(1_000_000, dtype=np.float64)  # 8 MB: travels through shared memory
    with shoal.Pool(1, context=fork_or_spawn) as pool:
        doomed = pool.apply_async(workers.kill_self)
        queued = pool.apply_async(workers.array_sum, (big,))
        with pytest.raises(shoal.WorkerDiedError):
            doomed.get(timeout=30)
        assert queued.get(timeout=30) == float(big.sum())


def test_large_arrays_travel_both_ways(fork_or_spawn):
    big = np.arange(2_000_000, dtype=np.float64)
    with shoal.Pool(2, context=fork_or_spawn) as pool:
        doubled = pool.apply(workers.array_double, (big,))
        assert isinstance(doubled, np.ndarray)
        assert np.array_equal(doubled, big * 2)
        assert pool.map(workers.array_sum, [big, big[:10]]) == [float(big.sum()), float(big[:10].sum())]


# -- a failure stays with its own task (regressions from review) ----------------


# Before: a result that failed to unpickle left its out-of-band buffers
# behind, and the results after it in the batch got the wrong ones.
def test_a_result_that_fails_to_unpickle_does_not_shift_the_next_ones():
    with shoal.Pool(1) as pool:
        for _ in range(20):
            pool.apply(workers.big_result, ("warm",))  # short: the next ones share a batch
        it = pool.imap(workers.big_result, ["bad", "B", "C"])
        with pytest.raises(shoal.SerializationError, match="could not be unpickled in the parent"):
            next(it)
        assert bytes(next(it)[:1]) == b"B"
        assert bytes(next(it)[:1]) == b"C"


# Before: the buffers of an argument that failed to pickle were sent with
# the next task.
def test_a_pickling_failure_leaves_no_stale_buffers_for_the_next_task():
    import threading

    big = np.full(400_000, 7, dtype=np.uint8)
    zeros = np.zeros(400_000, dtype=np.uint8)
    with shoal.Pool(1) as pool:
        with pytest.raises(TypeError):
            pool.apply_async(workers.identity, ((big, threading.Lock()),))
        assert int(pool.apply(workers.identity, (zeros,))[0]) == 0


# Before: an exception that could be neither pickled nor printed was not
# reported as its task's failure.
def test_unprintable_unpicklable_exception_fails_only_its_task():
    with shoal.Pool(1) as pool:
        with pytest.raises(shoal.SerializationError, match="UnprintableError"):
            pool.apply(workers.raise_unprintable)
        assert pool.statistics().workers_replaced == 0


# Before: a worker's death was blamed on tasks it held besides the one it ran.
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


# Before: a worker SIGKILLed before it was ready (by the OOM killer, a user, a
# chaos test) counted as a main module that cannot import, and three in a row
# broke the pool; killing workers at random every 20 ms broke it in a second.
def test_workers_killed_before_they_are_ready_do_not_break_the_pool(fork_or_spawn, tmp_path):
    kills = tmp_path / "kills"
    ctx = shoal.get_context(fork_or_spawn)
    with ctx.Pool(1, initializer=workers.killed_in_init, initargs=(str(kills), 5)) as pool:
        assert pool.map(workers.square, range(10)) == [x * x for x in range(10)]
        assert kills.read_text() == "x" * 5
        assert pool.statistics().replaced_because == {"died": 5}


def test_workers_always_killed_before_they_are_ready_stop_the_pool_saying_why(tmp_path):
    with shoal.get_context("fork").Pool(
        1, initializer=workers.killed_in_init, initargs=(str(tmp_path / "k"), None)
    ) as pool:
        with pytest.raises(
            shoal.WorkerStartError, match=r"100 worker processes in a row were killed \(SIGKILL\).*OOM killer"
        ):
            pool.apply(workers.square, (3,))


# Before: when a replacement's initializer failed and the pool broke, the
# tasks the healthy workers were running failed with it.
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
