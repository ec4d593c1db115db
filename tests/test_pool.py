"""shoal.Pool behaves like multiprocessing.Pool (and better where it says so)."""

from __future__ import annotations

import gc
import itertools
import multiprocessing
import os
import pickle
import sys
import textwrap
import threading
import time

import psutil
import pytest

import shoal
import workers
from helpers import kill_group, run_python, wait_until


def test_results_match_the_standard_library(start_method):
    data = list(range(57))
    with shoal.Pool(2, context=start_method) as pool:
        assert pool.apply(workers.add, (2, 3)) == 5
        assert pool.apply(workers.add, (), {"a": 1, "b": 2}) == 3
        assert pool.apply_async(workers.square, (7,)).get(timeout=30) == 49
        assert pool.map(workers.square, data) == [x * x for x in data]
        assert pool.map(workers.square, data, chunksize=5) == [x * x for x in data]
        assert pool.map(workers.square, iter(data)) == [x * x for x in data]
        assert pool.starmap(workers.add, [(i, i) for i in data]) == [2 * i for i in data]
        assert list(pool.imap(workers.square, data)) == [x * x for x in data]
        assert list(pool.imap(workers.square, data, chunksize=4)) == [x * x for x in data]
        assert sorted(pool.imap_unordered(workers.square, data)) == sorted(x * x for x in data)
        assert sorted(pool.imap_unordered(workers.square, data, 3)) == sorted(x * x for x in data)
        assert pool.map_async(workers.square, data).get(timeout=30) == [x * x for x in data]
        assert pool.starmap_async(workers.add, [(1, 2)]).get(timeout=30) == [3]
        assert pool.map(workers.square, []) == []
        assert sorted(pool.map(workers.square, {3: "a", 4: "b"})) == [9, 16]
        assert sorted(pool.map(workers.square, {5, 6})) == [25, 36]
        assert pool.map(workers.identity, "abc") == ["a", "b", "c"]
        assert list(pool.imap(workers.square, [])) == []


def test_lambdas_and_closures_work_under_spawn():
    offset = 10

    def local(x):
        return x + offset

    with shoal.Pool(2, context="spawn") as pool:
        assert pool.map(lambda x: x * 3, range(5)) == [0, 3, 6, 9, 12]
        assert pool.apply(local, (1,)) == 11
        assert list(pool.imap(local, range(3))) == [10, 11, 12]


def test_callbacks_run_in_the_parent():
    got = []
    errors = []
    done = threading.Event()
    with shoal.Pool(2) as pool:
        r = pool.apply_async(workers.getpid, callback=lambda v: got.append((v, os.getpid())))
        r.get(timeout=30)
        # As in the standard library, get() returns after the callback ran.
        assert got and got[0][1] == os.getpid() and got[0][0] != os.getpid()
        r2 = pool.apply_async(
            workers.raise_value_error, (1,), error_callback=lambda e: (errors.append(e), done.set())
        )
        with pytest.raises(ValueError):
            r2.get(timeout=30)
        assert isinstance(errors[0], ValueError)
        m = pool.map_async(workers.square, range(4), callback=got.append)
        m.get(timeout=30)
        assert got[-1] == [0, 1, 4, 9]


def test_exception_in_callback_does_not_kill_the_pool(capfd):
    def bad_callback(_):
        raise RuntimeError("callback failure")

    with shoal.Pool(1) as pool:
        r = pool.apply_async(workers.square, (2,), callback=bad_callback)
        r.wait(timeout=30)
        assert r.ready()
        assert pool.apply(workers.square, (3,)) == 9
    assert "callback failure" in capfd.readouterr().err


def test_remote_exception_keeps_type_and_traceback():
    with shoal.Pool(1) as pool:
        with pytest.raises(ValueError, match="bad value 5") as info:
            pool.apply(workers.raise_value_error, (5,))
        cause = info.value.__cause__
        assert type(cause).__name__ == "RemoteTraceback"
        assert "raise_value_error" in str(cause)
        with pytest.raises(ValueError):
            pool.map(workers.raise_value_error, range(3))
        # The pool still works after task errors.
        assert pool.map(workers.square, range(3)) == [0, 1, 4]


def test_an_exception_whose_init_takes_two_arguments_arrives_as_itself(fork_or_spawn):
    # It used to arrive as SerializationError: unpickling it calls
    # BadRecord("record 7: ...") and __init__ wants two arguments.
    with shoal.Pool(1, context=fork_or_spawn) as pool:
        with pytest.raises(workers.BadRecord) as info:
            pool.apply(workers.raise_bad_record, (7,))
        assert info.value.args == ("record 7: no such field",)
        assert (info.value.record_id, info.value.reason) == (7, "no such field")
        assert "raise_bad_record" in str(info.value.__cause__)
        with pytest.raises(workers.BadRecord, match="record 2"):
            pool.map(workers.raise_bad_record, [2, 3])


MAIN_EXCEPTION_SCRIPT = """
import sys
import shoal

class BadRecord(Exception):
    def __init__(self, record_id, reason):
        super().__init__(f"record {record_id}: {reason}")
        self.record_id = record_id

def check(record_id):
    raise BadRecord(record_id, "no such field")

if __name__ == "__main__":
    with shoal.Pool(1, context=sys.argv[1]) as pool:
        try:
            pool.apply(check, (7,))
        except BadRecord as exc:
            print("caught", exc.record_id, exc)
"""


def test_an_exception_class_of_the_main_script_is_caught_by_its_own_except(fork_or_spawn, tmp_path):
    # Under fork it used to be pickled by value: an identical but different
    # class that `except BadRecord` did not catch.
    import subprocess

    script = tmp_path / "main_exception.py"
    script.write_text(MAIN_EXCEPTION_SCRIPT)
    out = subprocess.run(
        [sys.executable, str(script), fork_or_spawn], capture_output=True, text=True, timeout=60
    )
    assert out.stdout.strip() == "caught 7 record 7: no such field", out.stderr


def test_an_exception_whose_class_the_parent_lacks_arrives_as_remote_error(fork_or_spawn):
    with shoal.Pool(1, context=fork_or_spawn) as pool, pytest.raises(shoal.RemoteError) as info:
        pool.apply(workers.raise_ghost_error)
    err = info.value
    assert err.type_name == "shoal_test_ghost.GhostError"
    assert err.message == "only the worker knows this class"
    assert "raise_ghost_error" in err.tb and "raise_ghost_error" in str(err.__cause__)
    assert "shoal_test_ghost.GhostError: only the worker knows this class" in str(err)
    copy = pickle.loads(pickle.dumps(err))
    assert (type(copy), copy.type_name, copy.message, copy.tb) == (
        shoal.RemoteError,
        err.type_name,
        err.message,
        err.tb,
    )


def test_a_task_calling_sys_exit_fails_with_task_exit_error_and_the_worker_goes_on(fork_or_spawn):
    # The task's SystemExit was raised again by get(): the caller's program
    # ended with the task's exit status and no message.
    with shoal.Pool(1, context=fork_or_spawn) as pool:
        pid = pool.apply(workers.getpid)
        with pytest.raises(shoal.TaskExitError, match=r"the task called sys\.exit\(3\)") as info:
            pool.apply(workers.call_sys_exit, (3,))
        err = info.value
        assert err.code == 3 and isinstance(err, shoal.ShoalError) and not isinstance(err, SystemExit)
        assert type(err.__cause__) is multiprocessing.pool.RemoteTraceback
        assert "in call_sys_exit" in str(err.__cause__) and "SystemExit: 3" in str(err.__cause__)
        clone = pickle.loads(pickle.dumps(err))
        assert type(clone) is shoal.TaskExitError and (clone.code, str(clone)) == (3, str(err))
        with pytest.raises(shoal.TaskExitError, match=r"sys\.exit\(\)") as info:
            pool.apply(workers.call_sys_exit, (None,))
        assert info.value.code is None
        with pytest.raises(shoal.TaskExitError, match=r"sys\.exit\('bad input'\)"):
            pool.map(workers.call_sys_exit, ["bad input"])
        it = pool.imap(workers.exit_on, range(5))
        assert [next(it) for _ in range(3)] == [0, 1, 4]
        with pytest.raises(shoal.TaskExitError):
            next(it)  # item 3
        assert list(it) == [16]
        errors = []
        r = pool.apply_async(workers.call_sys_exit, (5,), error_callback=errors.append)
        r.wait(30)
        assert not r.successful() and [e.code for e in errors] == [5]
        assert pool.apply(workers.getpid) == pid  # the same worker served every task


_EXITING_TASK = textwrap.dedent(
    """
    import os
    import sys
    import shoal

    def stop(code):
        sys.exit(code)

    if __name__ == "__main__":
        with shoal.Pool(1, context=sys.argv[1]) as pool:
            pid = pool.apply(os.getpid)
            for name, call in [
                ("apply", lambda: pool.apply(stop, (3,))),
                ("map", lambda: pool.map(stop, [3])),
                ("imap", lambda: list(pool.imap(stop, [3]))),
            ]:
                try:
                    call()
                except shoal.TaskExitError as exc:
                    print(name, "error:", exc)
            print("same worker:", pool.apply(os.getpid) == pid)
            if sys.argv[2] == "uncaught":
                pool.apply(stop, (3,))
        print("the end")
    """
)


def test_a_program_whose_task_calls_sys_exit_goes_on_and_says_why(tmp_path, fork_or_spawn):
    script = tmp_path / "exits.py"
    script.write_text(_EXITING_TASK)
    out = run_python(str(script), fork_or_spawn, "caught", timeout=60)
    assert out.returncode == 0, out.stderr
    for name in ("apply", "map", "imap"):
        assert f"{name} error: the task called sys.exit(3)" in out.stdout
    assert "same worker: True" in out.stdout and "the end" in out.stdout
    # Uncaught, the error ends the program as any error does: status 1 and a
    # traceback, where the SystemExit ended it with status 3 and no word.
    out = run_python(str(script), fork_or_spawn, "uncaught", timeout=60)
    assert out.returncode == 1
    assert "shoal.exceptions.TaskExitError: the task called sys.exit(3)" in out.stderr
    assert "in stop" in out.stderr and "the end" not in out.stdout


def test_imap_continues_after_an_item_raises():
    with shoal.Pool(2) as pool:
        it = pool.imap(workers.raise_value_error, range(3))
        for _ in range(3):
            with pytest.raises(ValueError):
                next(it)
        with pytest.raises(StopIteration):
            next(it)


def test_async_result_api():
    with shoal.Pool(1) as pool:
        r = pool.apply_async(workers.sleep_for, (0.5,))
        assert not r.ready()
        with pytest.raises(ValueError):
            r.successful()
        with pytest.raises(multiprocessing.TimeoutError):
            r.get(timeout=0.01)
        r.wait(timeout=0.01)
        assert r.get(timeout=30) == 0.5
        assert r.ready() and r.successful()
        bad = pool.apply_async(workers.raise_value_error, (1,))
        bad.wait(30)
        assert bad.ready() and not bad.successful()
        # a finished result still checks get()'s arguments, as the standard library's
        with pytest.raises(TypeError, match="unexpected keyword argument 'timeuot'"):
            r.get(timeuot=1)
        with pytest.raises(TypeError, match="at most 1 argument"):
            r.get(1, 2)


def test_async_result_can_be_subscripted_in_annotations_as_the_standard_librarys():
    import multiprocessing.pool
    import types

    assert isinstance(shoal.AsyncResult[int], types.GenericAlias)
    assert shoal.AsyncResult[int].__origin__ is shoal.AsyncResult
    assert isinstance(multiprocessing.pool.AsyncResult[int], types.GenericAlias)  # the specification


def test_close_join_terminate_semantics():
    pool = shoal.Pool(2)
    r = pool.apply_async(workers.sleep_then, (1, 0.2))
    with pytest.raises(ValueError, match="still running"):
        pool.join()
    pool.close()
    with pytest.raises(ValueError):
        pool.apply_async(workers.square, (1,))
    with pytest.raises(ValueError):
        pool.map(workers.square, [1])
    pool.join()
    # close() lets queued work finish.
    assert r.get(timeout=1) == 1

    pool = shoal.Pool(2)
    slow = pool.apply_async(workers.sleep_for, (30,))
    time.sleep(0.1)
    pool.terminate()
    pool.join()
    with pytest.raises(ValueError):
        pool.apply(workers.square, (1,))
    # terminate() fails unfinished tasks instead of leaving get() hanging.
    with pytest.raises(shoal.PoolClosedError):
        slow.get(timeout=5)


def test_context_manager_terminates_workers():
    with shoal.Pool(2) as pool:
        pids = pool._engine.worker_pids
        assert len(pids) == 2
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_garbage_collected_pool_shuts_down():
    pool = shoal.Pool(2)
    pids = pool._engine.worker_pids
    assert pool.apply(workers.square, (2,)) == 4
    del pool
    gc.collect()

    def gone():
        multiprocessing.active_children()
        return not any(psutil.pid_exists(p) for p in pids)

    wait_until(gone, timeout=10, interval=0.05)
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)


@pytest.mark.slow
def test_task_can_start_its_own_pool(start_method):
    with shoal.Pool(2, context=start_method) as pool:
        assert pool.apply(workers.nested_pool, (4,)) == [0, 1, 4, 9]


def test_initializer_runs_in_each_worker(start_method):
    with shoal.Pool(2, initializer=workers.set_state, initargs=("ready",), context=start_method) as pool:
        assert set(pool.map(workers.get_state, range(8), chunksize=1)) == {"ready"}


def test_initargs_are_inherited_under_fork_as_in_the_standard_library():
    # Under fork the standard library's workers inherit initializer and
    # initargs: nothing is pickled, so objects that cannot be pickled work,
    # and a large initargs costs nothing to hand over.  shoal pickled them
    # for each worker (a 200 MB initargs made the first map ten times
    # slower than the standard library's).
    state = {"n": 7, "lock": threading.Lock()}
    with shoal.Pool(2, initializer=workers.set_state, initargs=(state,), context="fork") as pool:
        assert pool.map(workers.state_item, ["n"] * 4, chunksize=1) == [7] * 4
    with multiprocessing.get_context("fork").Pool(
        2, initializer=workers.set_state, initargs=(state,)
    ) as pool:  # the specification
        assert pool.map(workers.state_item, ["n"] * 4, chunksize=1) == [7] * 4
    # Spawned workers get them pickled: a clear error when the Pool is made.
    with pytest.raises(shoal.SerializationError, match="cannot pickle the initializer"):
        shoal.Pool(2, initializer=workers.set_state, initargs=(state,), context="spawn")


def test_bad_arguments_get_clear_errors():
    with pytest.raises(ValueError, match="at least 1"):
        shoal.Pool(0)
    with pytest.raises(TypeError, match="initializer"):
        shoal.Pool(1, initializer=5)
    with pytest.raises(ValueError, match="maxtasksperchild"):
        shoal.Pool(1, maxtasksperchild=0)
    with shoal.Pool(1) as pool:
        with pytest.raises(TypeError, match="callable"):
            pool.apply_async(42)
        with pytest.raises(ValueError, match="chunksize"):
            pool.map(workers.square, range(3), chunksize=0)
        with pytest.raises(TypeError, match="callback"):
            pool.apply_async(workers.square, (1,), callback=3)
        with pytest.raises(NotImplementedError, match="cannot be passed between processes"):
            import pickle

            pickle.dumps(pool)


def test_wrong_types_and_names_get_errors_that_say_what_is_wrong():
    # "must be at least 1, got '2'" used to hide that the type was wrong.
    with pytest.raises(TypeError, match="processes must be an int, got str '2'"):
        shoal.Pool("2")
    with pytest.raises(TypeError, match="processes must be an int, got bool"):
        shoal.Pool(True)
    with pytest.raises(TypeError, match="max_memory must be a number of bytes, got str"):
        shoal.Pool(1, max_memory="1GB")
    with pytest.raises(TypeError, match="timeout must be a number of seconds or None, got str '5'"):
        shoal.Pool(1, task_timeout="5")
    with pytest.raises(ValueError, match="unknown start method 'spwan': use one of .*'spawn'"):
        shoal.Pool(1, context="spwan")
    with pytest.raises(ValueError, match="unknown start method 'spwan': use one of .*'fork'"):
        shoal.get_context("spwan")
    with shoal.Pool(1) as pool:
        # "'int' object is not iterable" used to say nothing about args.
        with pytest.raises(TypeError, match=r"args must be a tuple .* got int 3; .* args=\(3,\)"):
            pool.apply(workers.square, 3)
        with pytest.raises(TypeError, match="args must be a tuple"):
            pool.apply_async(workers.square, 3)
        assert pool.apply(workers.square, [3]) == 9  # any iterable, as in the standard library


def test_submit_returns_a_future():
    import concurrent.futures

    with shoal.Pool(2) as pool:
        fut = pool.submit(workers.add, 1, b=2)
        assert isinstance(fut, concurrent.futures.Future)
        assert fut.result(timeout=30) == 3
        futs = [pool.submit(workers.square, i) for i in range(10)]
        assert sorted(f.result() for f in concurrent.futures.as_completed(futs, timeout=30)) == [
            i * i for i in range(10)
        ]


def test_map_accepts_a_generator_and_imap_is_lazy():
    consumed = []

    def gen():
        for i in range(10_000_000):
            consumed.append(i)
            yield i

    with shoal.Pool(2) as pool:
        it = pool.imap(workers.square, gen())
        first = [next(it) for _ in range(5)]
        assert first == [0, 1, 4, 9, 16]
        time.sleep(0.2)
        # Only a bounded window of an endless input has been read.
        assert len(consumed) < 100_000
        it.close()


def test_pool_statistics_counts_tasks():
    with shoal.Pool(2) as pool:
        pool.map(workers.square, range(10), chunksize=1)
        with pytest.raises(ValueError):
            pool.apply(workers.raise_value_error, (1,))
        stats = pool.statistics()
    assert stats.tasks_submitted == 11
    assert stats.tasks_completed == 10
    assert stats.tasks_failed == 1
    assert stats.workers == 2


def test_pool_left_open_at_exit_does_not_hang(tmp_path):
    script = tmp_path / "left_open.py"
    script.write_text(
        "import shoal, time\n"
        "def f(x):\n"
        "    time.sleep(x)\n"
        "    return x\n"
        "if __name__ == '__main__':\n"
        "    p = shoal.Pool(2)\n"
        "    print(p.apply(f, (0,)), flush=True)\n"
        "    p.apply_async(f, (60,))\n"
        "    print(' '.join(map(str, p._engine.worker_pids)), flush=True)\n"
    )
    out = run_python(str(script), timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")
    assert lines[0] == "0"
    for pid in map(int, lines[1].split()):
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert out.stderr == ""


def test_forked_child_exits_cleanly_while_a_pool_is_open(tmp_path):
    script = tmp_path / "fork_child.py"
    script.write_text(
        "import os, sys, shoal\n"
        "pool = shoal.Pool(1)\n"
        "assert pool.apply(abs, (-3,)) == 3\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    sys.exit(0)  # runs atexit and finalizers in the child\n"
        "_, status = os.waitpid(pid, 0)\n"
        "print(os.waitstatus_to_exitcode(status))\n"
        "pool.terminate()\n"
    )
    import subprocess

    proc = subprocess.Popen(
        [sys.executable, "-W", "ignore::DeprecationWarning", str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        kill_group(proc)  # if the forked child hung, it must not outlive the test
    assert proc.returncode == 0, stderr
    assert stdout.strip() == "0"


def test_get_context_gives_shoals_factories():
    ctx = shoal.get_context("spawn")
    assert ctx.get_start_method() == "spawn"
    with ctx.Pool(1) as pool:
        assert isinstance(pool, shoal.Pool)
        assert pool.apply(workers.square, (3,)) == 9
    with shoal.ProcessPoolExecutor(1, mp_context=ctx) as ex:
        assert ex.submit(workers.square, 4).result(timeout=30) == 16
    assert ctx.Process is multiprocessing.get_context("spawn").Process
    a, b = ctx.Pipe()
    with a, b:
        a.send("x")
        assert b.recv() == "x"


# -- what a task carries (regressions from review) ----------------------------


# Before: a message with more than 253 descriptors (SCM_RIGHTS' limit) failed.
def test_more_than_253_out_of_band_arrays_in_one_task_both_ways():
    arrays = workers.many_arrays(300)
    with shoal.Pool(1) as pool:
        assert len(pool.apply(workers.many_arrays, (300,))) == 300
        assert pool.apply(workers.count_arrays, (arrays,)) == 300


# Before: workers cached closures by name and kept the values of the first call.
def test_closures_carry_their_current_values():
    scale = {"k": 1}

    def scaled(x):
        return x * scale["k"]

    with shoal.Pool(1) as pool:
        assert pool.map(scaled, [1, 2]) == [1, 2]
        scale["k"] = 10
        assert pool.map(scaled, [1, 2]) == [10, 20]


# Before: the worker's function cache evicted a function the batch still needed.
def test_a_batch_with_more_functions_than_the_worker_caches(monkeypatch):
    from shoal._engine import _scheduler

    monkeypatch.setattr(_scheduler, "FN_CACHE", 4)
    fns = [
        workers.square,
        workers.identity,
        workers.getpid,
        workers.add,
        workers.sleep_for,
        workers.array_sum,
    ]
    with shoal.Pool(1) as pool:
        pool.apply(workers.square, (1,))
        results = []
        for i in range(60):
            fn = fns[i % 3]
            results.append(pool.apply_async(fn, (i,)))
        assert len([r.get(timeout=30) for r in results]) == 60


# Before: an untimed map's chunks were all the standard library's guess (n / 4
# per worker), so 200 tasks of 0.2 s made 25-task chunks of 5 s: the tail
# left one worker busy while the others idled.  Then they doubled from one
# item to that guess, and every doubling cost the workers a round trip.
@pytest.mark.parametrize(
    "n, size, workers", [(200, 25, 2), (200_000, 25_000, 2), (10, 3, 2), (7, 1, 4), (1000, 63, 4)]
)
def test_an_untimed_map_starts_with_one_item_and_ends_with_small_chunks(n, size, workers):
    from shoal._pool import _chunk_bounds

    bounds = _chunk_bounds(n, size, workers, timed=False)
    assert bounds[0] == (0, 1)
    # Then at once as large as the guess allows: no ramp of round trips.
    assert bounds[1][1] - bounds[1][0] == max(1, min(size, -(-(n - 1) // (2 * workers))))
    assert bounds[-1][1] == n and all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    sizes = [stop - start for start, stop in bounds]
    assert max(sizes) <= size
    assert all(
        s <= -(-(n - start) // (2 * workers)) for (start, _), s in zip(bounds, sizes, strict=True) if s > 1
    )
    assert sizes[-1] == 1
    # A timed function gets the engine's uniform size.
    assert {stop - start for start, stop in _chunk_bounds(n, size, workers, timed=True)[:-1]} <= {size}


def test_a_map_without_chunksize_returns_every_result_in_order(fork_or_spawn):
    with shoal.Pool(2, context=fork_or_spawn) as pool:
        assert pool.map(workers.square, range(1000)) == [x * x for x in range(1000)]
        assert pool.starmap(workers.add, [(i, i) for i in range(333)]) == [2 * i for i in range(333)]


# -- plain arguments and results travel inside the batch message ----------------
# Calls whose arguments are all plain immutable values (int, float, str, bool,
# None, complex, short bytes) are not pickled one by one; other arguments are.
# Both paths must give the same results, types and errors.

PLAIN_ARGS = [
    (1, 2.5, "text", True, None, 3 + 4j, b"short"),
    (-(2**70), float("inf"), "", False),
    (b"x" * 5000, "s" * 5000),  # too long to travel raw
    (b"y" * (300 * 1024),),  # large enough for shared memory
    (workers.Color.RED,),  # an int subclass: pickled on its own
    ([1, 2], {"a": 1}, (1, (2, 3))),
]


def _same(a, b) -> bool:
    return a == b and type(a) is type(b)


@pytest.mark.parametrize("args", PLAIN_ARGS, ids=range(len(PLAIN_ARGS)))
def test_plain_and_pickled_arguments_arrive_with_their_types(fork_or_spawn, args):
    with shoal.Pool(2, context=fork_or_spawn) as pool:
        got, types = pool.apply_async(workers.args_and_types, args).get(timeout=30)
        assert list(got) == list(args)
        assert types == [type(a).__name__ for a in args]
        # and the same through submit, and with a keyword argument
        assert pool.submit(workers.args_and_types, *args).result(timeout=30)[1] == types
        assert pool.apply(workers.return_value, (), {"value": args}) == args


@pytest.mark.parametrize("value", [a for args in PLAIN_ARGS for a in args], ids=repr)
def test_results_of_every_kind_arrive_as_returned(value):
    with shoal.Pool(1) as pool:
        got = pool.apply_async(workers.return_value, (value,)).get(timeout=30)
    assert _same(got, value)


def test_an_unpicklable_argument_among_plain_ones_fails_at_submit_and_only_there(fork_or_spawn):
    with shoal.Pool(2, context=fork_or_spawn) as pool:
        before = [pool.apply_async(workers.square, (i,)) for i in range(200)]
        with pytest.raises(shoal.SerializationError, match="lock"):
            pool.apply_async(workers.identity, (threading.Lock(),))
        after = [pool.apply_async(workers.square, (i,)) for i in range(200, 400)]
        assert [r.get(timeout=30) for r in before + after] == [i * i for i in range(400)]
        assert pool.statistics().tasks_submitted == 400  # the refused one was never queued


def test_an_unpicklable_result_among_plain_ones_fails_only_its_task(fork_or_spawn):
    with shoal.Pool(2, context=fork_or_spawn) as pool:
        results = [pool.apply_async(workers.return_unpicklable_if, (i, 150)) for i in range(300)]
        for i, r in enumerate(results):
            if i == 150:
                with pytest.raises(shoal.SerializationError, match="lock"):
                    r.get(timeout=30)
            else:
                assert r.get(timeout=30) == i


def test_a_worker_crash_among_plain_calls_fails_only_the_crashing_task(fork_or_spawn):
    with shoal.Pool(2, context=fork_or_spawn) as pool:
        results = [pool.apply_async(workers.crash_on, (i, 77)) for i in range(200)]
        for i, r in enumerate(results):
            if i == 77:
                with pytest.raises(shoal.WorkerDiedError):
                    r.get(timeout=30)
            else:
                assert r.get(timeout=30) == i * i


def test_results_and_futures_dropped_before_they_finish_are_freed():
    # A task refers to its result object until the outcome is delivered, and
    # tasks are not tracked by the garbage collector: the engine must break
    # that cycle on every path (delivered, failed, cancelled before it ran).
    import weakref

    with shoal.Pool(1) as pool:
        blocker = pool.apply_async(workers.sleep_for, (0.3,))
        refs = [weakref.ref(pool.apply_async(workers.square, (i,))) for i in range(50)]
        refs += [weakref.ref(pool.apply_async(workers.raise_value_error, (i,))) for i in range(5)]
        cancelled = [pool.submit(workers.square, i) for i in range(5)]
        for f in cancelled:
            assert f.cancel()
        refs += [weakref.ref(f) for f in cancelled]
        del cancelled, f
        blocker.get(timeout=30)
        assert pool.apply(workers.square, (3,)) == 9  # everything before it was handled
    gc.collect()
    assert [(i, r()) for i, r in enumerate(refs) if r() is not None] == []


def test_a_finished_result_in_a_reference_cycle_through_its_pool_is_freed():
    # A plain result is not tracked by the garbage collector while it
    # waits; once finished it must not hold a cycle alive (here its pool's
    # initargs refer to it), which only the collector could free.
    import weakref

    state: dict = {}
    with shoal.Pool(1, initializer=workers.set_state, initargs=(state,)) as pool:
        state["result"] = pool.apply_async(workers.square, (3,))
        assert state["result"].get(timeout=30) == 9
        ref = weakref.ref(state["result"])
    del pool, state
    gc.collect()
    assert ref() is None


def test_a_pool_used_in_a_forked_child_raises_instead_of_hanging():
    pool = shoal.Pool(1)
    try:
        assert pool.apply(workers.square, (3,)) == 9
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: the pool's workers are not its own
            try:
                pool.apply_async(workers.square, (2,))
                os.write(w, b"no error")
            except shoal.PoolClosedError as exc:
                os.write(w, b"ok" if "belongs to process" in str(exc) else str(exc).encode())
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            said = f.read()
        os.waitpid(pid, 0)
        assert said == b"ok"
        assert pool.apply(workers.square, (4,)) == 16  # still the parent's
    finally:
        pool.terminate()


def test_callbacks_of_one_worker_run_in_the_order_of_its_results(fork_or_spawn):
    # Plain successes are delivered by a fast path and the rest one by one:
    # the order of outcomes must still be the order the worker produced them.
    seen: list = []
    with shoal.Pool(1, context=fork_or_spawn) as pool:
        for i in range(300):
            fn = workers.raise_value_error if i % 7 == 3 else workers.square
            pool.apply_async(
                fn,
                (i,),
                callback=lambda v: seen.append(("ok", v)),
                error_callback=lambda e: seen.append(("err", str(e))),
            )
        pool.close()
        pool.join()
    assert seen == [("err", f"bad value {i}") if i % 7 == 3 else ("ok", i * i) for i in range(300)]


def test_plain_results_and_shared_memory_results_in_one_message_all_arrive(fork_or_spawn):
    # One results message can hold plain values, pickled values with
    # descriptors beside it, and a result that fails to unpickle.
    np = pytest.importorskip("numpy")
    tags = ["warm", "B", "warm", "bad", "C", "warm"] * 20
    with shoal.Pool(1, context=fork_or_spawn) as pool:
        results = [pool.apply_async(workers.big_result, (t,)) for t in tags]
        for t, r in zip(tags, results, strict=True):
            if t == "warm":
                assert r.get(timeout=30) == 0
            elif t == "bad":
                with pytest.raises(shoal.SerializationError):
                    r.get(timeout=30)
            else:
                got = r.get(timeout=30)
                assert got.shape == (300 * 1024,) and np.all(got == ord(t))


def test_a_result_whose_exception_was_raised_is_collected():
    # get() raises the task's exception, whose traceback holds the frame that
    # raised it, which holds the result: a cycle the collector must see (a
    # plain result is not tracked while it waits, and is tracked again when
    # it stores an exception).
    import weakref

    with shoal.Pool(1) as pool:
        r = pool.apply_async(workers.raise_value_error, (1,))
        with pytest.raises(ValueError) as info:
            r.get(timeout=30)
        ref = weakref.ref(r)
        del r, info
    gc.collect()
    assert ref() is None
