"""shoal.ProcessPoolExecutor behaves like concurrent.futures.ProcessPoolExecutor."""

from __future__ import annotations

import asyncio
import concurrent.futures
import concurrent.futures.process
import itertools
import os
import signal
import textwrap
import threading
import time

import psutil
import pytest

import shoal
import workers
from helpers import run_python, wait_until


def test_submit_map_shutdown(start_method):
    with shoal.ProcessPoolExecutor(2, mp_context=shoal.get_context(start_method)) as ex:
        assert ex.submit(workers.add, 2, b=3).result(timeout=30) == 5
        assert list(ex.map(workers.square, range(20))) == [x * x for x in range(20)]
        assert list(ex.map(workers.add, range(5), range(5), chunksize=2)) == [0, 2, 4, 6, 8]
        assert list(ex.map(workers.square, iter(range(7)))) == [x * x for x in range(7)]
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(workers.square, 1)


def test_is_an_executor_and_works_with_asyncio():
    async def main(ex):
        loop = asyncio.get_running_loop()
        results = await asyncio.gather(*(loop.run_in_executor(ex, workers.square, i) for i in range(10)))
        return results

    with shoal.ProcessPoolExecutor(2) as ex:
        assert isinstance(ex, concurrent.futures.Executor)
        assert asyncio.run(main(ex)) == [i * i for i in range(10)]


def test_future_callbacks_and_exceptions():
    seen = []
    with shoal.ProcessPoolExecutor(1) as ex:
        fut = ex.submit(workers.raise_value_error, 3)
        fut.add_done_callback(lambda f: seen.append(type(f.exception())))
        with pytest.raises(ValueError, match="bad value 3"):
            fut.result(timeout=30)
        assert isinstance(fut.exception(), ValueError)
    assert seen == [ValueError]


def test_map_raises_first_error_and_timeout():
    with shoal.ProcessPoolExecutor(2) as ex:
        with pytest.raises(ValueError):
            list(ex.map(workers.raise_value_error, range(3)))
        with pytest.raises(TimeoutError):
            list(ex.map(workers.sleep_for, [1, 1], timeout=0.2))


def test_shutdown_cancel_futures():
    ex = shoal.ProcessPoolExecutor(1)
    first = ex.submit(workers.sleep_for, 0.5)
    queued = [ex.submit(workers.square, i) for i in range(50)]
    time.sleep(0.1)
    ex.shutdown(wait=True, cancel_futures=True)
    assert first.result() == 0.5
    assert any(f.cancelled() for f in queued)
    for f in queued:
        assert f.cancelled() or f.result() is not None


def test_worker_death_fails_one_future_only(fork_or_spawn):
    with shoal.ProcessPoolExecutor(2, mp_context=shoal.get_context(fork_or_spawn)) as ex:
        bad = ex.submit(workers.kill_self)
        good = [ex.submit(workers.square, i) for i in range(10)]
        with pytest.raises(shoal.WorkerDiedError):
            bad.result(timeout=30)
        assert [f.result(timeout=30) for f in good] == [i * i for i in range(10)]
        # Unlike concurrent.futures, the executor is not broken.
        assert ex.submit(workers.square, 5).result(timeout=30) == 25


def test_sys_exit_in_a_task_or_its_result_pickling_fails_that_future_only(fork_or_spawn):
    # A SystemExit raised while the worker pickled the result used to kill
    # the worker (WorkerDiedError).  The standard library re-raises a task's
    # SystemExit from result(), which ends the caller's program silently:
    # shoal fails the future with TaskExitError, and the worker lives on.
    with shoal.ProcessPoolExecutor(1, mp_context=shoal.get_context(fork_or_spawn)) as ex:
        pid = ex.submit(workers.getpid).result()
        with pytest.raises(shoal.TaskExitError, match=r"pickling the task's result called sys\.exit\(1\)"):
            ex.submit(workers.return_exit_at_pickle).result(timeout=60)
        future = ex.submit(workers.call_sys_exit, 3)
        assert isinstance(future.exception(timeout=60), shoal.TaskExitError)
        with pytest.raises(shoal.TaskExitError, match=r"the task called sys\.exit\(3\)") as info:
            future.result()
        assert info.value.code == 3
        assert type(info.value.__cause__) is concurrent.futures.process._RemoteTraceback
        with pytest.raises(shoal.TaskExitError):
            list(ex.map(workers.exit_on, range(5)))
        assert ex.submit(workers.getpid).result() == pid


_EXITING_TASK = textwrap.dedent(
    """
    import sys
    import concurrent.futures
    import shoal

    def stop(code):
        sys.exit(code)

    if __name__ == "__main__":
        context = shoal.get_context(sys.argv[1])
        with shoal.ProcessPoolExecutor(1, mp_context=context) as ex:
            try:
                ex.submit(stop, 3).result()
            except shoal.TaskExitError as exc:
                print("submit error:", exc)
            try:
                list(ex.map(stop, [3]))
            except shoal.TaskExitError as exc:
                print("map error:", exc)
            print("after:", ex.submit(abs, -2).result())
    """
)


def test_a_program_whose_future_calls_sys_exit_goes_on_and_says_why(tmp_path, fork_or_spawn):
    script = tmp_path / "exits.py"
    script.write_text(_EXITING_TASK)
    out = run_python(str(script), fork_or_spawn, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "submit error: the task called sys.exit(3)" in out.stdout
    assert "map error: the task called sys.exit(3)" in out.stdout
    assert "after: 2" in out.stdout


def test_failing_initializer_is_broken_process_pool():
    from concurrent.futures.process import BrokenProcessPool

    with shoal.ProcessPoolExecutor(1, initializer=workers.failing_initializer) as ex:
        with pytest.raises(BrokenProcessPool):
            ex.submit(workers.square, 2).result(timeout=30)


def test_a_failing_initializer_marks_the_executor_broken_as_the_standard_library_does(fork_or_spawn):
    # ``_broken`` read an engine attribute that the engine contract had moved
    # into its state record, so it stayed False and CPython's own
    # FailingInitializerTest waited 30 s for "executor not broken".
    ctx = shoal.get_context(fork_or_spawn)
    ex = shoal.ProcessPoolExecutor(1, initializer=workers.failing_initializer, mp_context=ctx)
    try:
        assert ex._broken is False or isinstance(ex._broken, str)
        with pytest.raises(concurrent.futures.process.BrokenProcessPool):
            ex.submit(workers.square, 2).result(timeout=30)
        assert wait_until(lambda: ex._broken), "the executor never said it was broken"
        assert isinstance(ex._broken, str) and ex._broken
    finally:
        ex.shutdown()


def test_an_initializer_calling_sys_exit_breaks_the_pool_saying_so(fork_or_spawn):
    # The error said only "the pool cannot run tasks: 3", and a task already
    # handed to the worker got it without the cause.
    ctx = shoal.get_context(fork_or_spawn)
    with shoal.ProcessPoolExecutor(1, initializer=workers.call_sys_exit, initargs=(3,), mp_context=ctx) as ex:
        for _ in range(2):  # the first may reach the worker before its initializer fails
            with pytest.raises(
                shoal.WorkerStartError, match=r"the initializer called sys\.exit\(3\)"
            ) as info:
                ex.submit(workers.square, 2).result(timeout=30)
            assert type(info.value.__cause__) is shoal.TaskExitError and info.value.__cause__.code == 3


def test_max_workers_must_be_positive():
    with pytest.raises(ValueError, match="max_workers"):
        shoal.ProcessPoolExecutor(0)


def test_wrong_types_get_type_errors_that_say_so():
    with pytest.raises(TypeError, match="max_workers must be an int, got str '2'"):
        shoal.ProcessPoolExecutor("2")
    with pytest.raises(TypeError, match="max_tasks_per_child must be an int"):
        shoal.ProcessPoolExecutor(1, max_tasks_per_child="3")
    with pytest.raises(ValueError, match="max_workers must be greater than 0"):
        shoal.ProcessPoolExecutor(0)
    with pytest.raises(ValueError, match="unknown start method 'spwan': use one of"):
        shoal.ProcessPoolExecutor(1, mp_context="spwan")


def test_map_without_chunksize_starts_with_single_items_and_grows_with_measured_time():
    # The first guess used to be len / (4 * workers) items per chunk: 25
    # tasks of 0.2 s made 5 s chunks that Ctrl-C and the tail waited for.
    with shoal.ProcessPoolExecutor(2) as ex:
        assert list(ex.map(workers.sleep_then, range(16))) == list(range(16))
        assert ex.statistics().tasks_submitted == 16  # 50 ms tasks: one per chunk
        before = ex.statistics().tasks_submitted
        assert list(ex.map(workers.square, range(20_000))) == [i * i for i in range(20_000)]
        # Trivial tasks, once measured, travel many to a chunk.
        assert ex.statistics().tasks_submitted - before < 2_000


def test_a_with_block_left_by_keyboard_interrupt_stops_its_work():
    with pytest.raises(KeyboardInterrupt), shoal.ProcessPoolExecutor(1) as ex:
        running = ex.submit(workers.sleep_for, 600)
        queued = [ex.submit(workers.square, i) for i in range(5)]
        while not running.running():
            time.sleep(0.01)
        raise KeyboardInterrupt
    # The block did not wait for the 600 s task (pytest-timeout would say so).
    # Queued ones are cancelled (those already handed to the worker behind
    # the running task fail the same way).
    for future in [running, *queued]:
        with pytest.raises(concurrent.futures.CancelledError):
            future.result(timeout=0)


# Before: the generator behind Executor.map kept the last result it yielded in
# a local variable, alive after the caller dropped it (CPython's
# test_free_reference).
def test_map_keeps_no_reference_to_a_result_the_caller_dropped():
    import gc
    import weakref

    with shoal.ProcessPoolExecutor(2) as ex:
        for obj in ex.map(workers.make_token, range(10)):
            ref = weakref.ref(obj)
            del obj
            gc.collect()
            assert ref() is None


def test_max_tasks_per_child_defaults_to_spawn_as_the_standard_library():
    with shoal.ProcessPoolExecutor(1, max_tasks_per_child=2) as ex:
        assert ex._mp_context.get_start_method() == "spawn"
        assert ex.submit(workers.square, 3).result(timeout=60) == 9
    with shoal.ProcessPoolExecutor(1, max_tasks_per_child=2, mp_context="fork") as ex:
        assert ex._mp_context.get_start_method() == "fork"


# Before: shutdown(cancel_futures=True) right after submit() cancelled every
# future, because nothing had been handed to a worker yet; the standard
# library lets the calls its workers already hold finish.
def test_shutdown_cancel_futures_lets_what_workers_hold_finish(fork_or_spawn):
    ex = shoal.ProcessPoolExecutor(2, mp_context=fork_or_spawn)
    ex.submit(workers.square, 1).result(timeout=60)  # workers are up
    fs = [ex.submit(time.sleep, 0.1) for _ in range(50)]
    ex.shutdown(cancel_futures=True)
    cancelled = [f for f in fs if f.cancelled()]
    others = [f for f in fs if not f.cancelled()]
    assert len(cancelled) > 20
    assert others and all(f.done() and f.exception() is None for f in others)


# Before: initargs were pickled when the executor was made, so a
# multiprocessing.Queue (which travels only with a starting process) could not
# be one, a common logging pattern with the standard library.
def test_a_multiprocessing_queue_can_be_an_initarg(start_method):
    import multiprocessing

    ctx = multiprocessing.get_context(start_method)
    q = ctx.Queue()
    try:
        with shoal.ProcessPoolExecutor(
            2, mp_context=ctx, initializer=workers.init_with_queue, initargs=(q,)
        ) as ex:
            assert list(ex.map(workers.put_in_init_queue, range(4))) == [0, 1, 2, 3]
        assert sorted(q.get(timeout=30) for _ in range(4)) == [0, 1, 2, 3]
    finally:
        q.close()
        q.join_thread()


# -- Future: it makes its condition only when somebody waits, and settles
# -- without a lock round trip per method; none of it may show.


@pytest.fixture
def release(tmp_path):
    """A path whose creation finishes the workers.wait_for_file tasks; made at
    teardown whatever happened, so no task is left waiting."""
    path = tmp_path / "release"
    yield path
    path.touch()


def test_many_threads_waiting_on_the_same_and_different_futures_all_wake():
    # A future's condition is made by its first waiter, while the scheduler
    # thread may be settling it: a wake-up lost in that race would hang a
    # thread here (pytest-timeout), and a result seen twice or not at all
    # would show in the lists.
    with shoal.ProcessPoolExecutor(2) as ex:
        futures = [ex.submit(workers.sleep_then, i, 0.002) for i in range(300)]
        results: dict = {}
        errors: list = []

        def wait_on(key, fs, how):
            try:
                results[key] = [how(f) for f in fs]
            except BaseException as exc:
                errors.append(exc)

        jobs = []
        for k in range(3):
            jobs.append((("same", k), futures, lambda f: f.result()))
            jobs.append((("timeout", k), futures, lambda f: f.result(timeout=120)))
            jobs.append((("reversed", k), futures[::-1], lambda f: f.result()))
        for k in range(6):
            jobs.append((("slice", k), futures[k::6], lambda f: (f.exception(timeout=120), f.result())[1]))
        threads = [threading.Thread(target=wait_on, args=job) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []
    expected = list(range(300))
    for k in range(3):
        assert results["same", k] == expected
        assert results["timeout", k] == expected
        assert results["reversed", k] == expected[::-1]
    for k in range(6):
        assert results["slice", k] == expected[k::6]


def test_wait_and_as_completed_over_done_and_pending_futures(release):
    from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION

    with shoal.ProcessPoolExecutor(2) as ex:
        done = [ex.submit(workers.square, i) for i in range(5)]
        assert [f.result(timeout=60) for f in done] == [0, 1, 4, 9, 16]
        settled = concurrent.futures.Future()  # the standard library's, in the same call
        settled.set_result("x")
        blocked = ex.submit(workers.wait_for_file, str(release), "released")
        with pytest.raises(TimeoutError):
            blocked.result(timeout=0.05)
        with pytest.raises(TimeoutError):
            blocked.exception(timeout=0)

        first = concurrent.futures.wait([*done, blocked, settled], return_when=FIRST_COMPLETED)
        assert first.done == {*done, settled}
        assert first.not_done == {blocked}
        timed_out = concurrent.futures.wait([*done, blocked], timeout=0.05, return_when=ALL_COMPLETED)
        assert timed_out.not_done == {blocked}

        failing = ex.submit(workers.raise_value_error, 7)
        on_error = concurrent.futures.wait([blocked, failing], return_when=FIRST_EXCEPTION)
        assert on_error.done == {failing}
        assert on_error.not_done == {blocked}
        assert isinstance(failing.exception(), ValueError)

        order = concurrent.futures.as_completed([*done, blocked, settled, failing], timeout=120)
        first_seven = {next(order) for _ in range(7)}
        assert first_seven == {*done, settled, failing}
        assert not blocked.done()
        release.touch()
        assert next(order) is blocked
        assert list(order) == []
        assert blocked.result() == "released"
        everything = concurrent.futures.wait([*done, blocked, failing, settled])
        assert everything.not_done == set()


def test_cancel_racing_completion_leaves_each_future_in_one_consistent_state(release):
    # cancel() in one thread while the scheduler thread starts and settles
    # the same futures: each ends cancelled (cancel() said True) or with its
    # result (cancel() said False), never both, and its callback runs once.
    calls: list = []
    with shoal.ProcessPoolExecutor(2) as ex:
        blockers = [ex.submit(workers.wait_for_file, str(release)) for _ in range(2)]
        futures = [ex.submit(workers.square, i) for i in range(3000)]
        for f in futures:
            f.add_done_callback(calls.append)
        said = {futures[-1]: futures[-1].cancel()}  # queued behind the busy workers

        def cancel_the_others():
            for f in futures[:-1]:
                said[f] = f.cancel()

        canceller = threading.Thread(target=cancel_the_others)
        release.touch()  # the workers go on while the canceller runs
        canceller.start()
        canceller.join()
        outcome = concurrent.futures.wait(futures + blockers, timeout=120)
        assert outcome.not_done == set()
        for i, f in enumerate(futures):
            if said[f]:
                assert f.cancelled()
                with pytest.raises(concurrent.futures.CancelledError):
                    f.result()
            else:
                assert not f.cancelled()
                assert f.result() == i * i
        assert said[futures[-1]]
    # Leaving the block ran every pending callback.
    assert sorted(map(id, calls)) == sorted(map(id, futures))


def test_done_callbacks_run_off_the_scheduler_thread_or_at_once_when_added_late(release):
    seen: list = []

    def record(future):
        seen.append((threading.current_thread().name, future.result()))

    with shoal.ProcessPoolExecutor(1) as ex:
        pending = ex.submit(workers.wait_for_file, str(release), 1)
        pending.add_done_callback(record)
        release.touch()
        assert pending.result(timeout=60) == 1
        finished = ex.submit(workers.square, 2)
        assert finished.result(timeout=60) == 4
        finished.add_done_callback(record)
        # Added after completion: it ran at once, in this thread.
        assert (threading.current_thread().name, 4) in seen
    early = [name for name, value in seen if value == 1]
    assert early and early[0] != "shoal-scheduler"


def test_failing_and_unpicklable_tasks_in_a_batch_leave_their_neighbours_alone(fork_or_spawn):
    from concurrent.futures.process import _RemoteTraceback

    with shoal.ProcessPoolExecutor(2, mp_context=fork_or_spawn) as ex:
        futures = []
        for i in range(400):
            if i % 50 == 25:
                # Its error is raised by submit itself, in the caller.
                with pytest.raises(shoal.SerializationError, match="Unpicklable"):
                    ex.submit(workers.identity, workers.Unpicklable())
            elif i % 50 == 10:
                futures.append((i, ex.submit(workers.raise_value_error, i)))
            else:
                futures.append((i, ex.submit(workers.square, i)))
        for i, f in futures:
            if i % 50 == 10:
                with pytest.raises(ValueError, match=f"bad value {i}") as info:
                    f.result(timeout=60)
                assert isinstance(info.value.__cause__, _RemoteTraceback)
                assert f.exception() is info.value
                assert f.done() and not f.cancelled() and not f.running()
            else:
                assert f.result(timeout=60) == i * i
                assert f.exception() is None


def test_futures_cancelled_in_a_pattern_while_queued_leave_the_others_to_run_once(release):
    # Cancelled futures are dropped when their batch is made: the others of
    # the same batch must each run exactly once.
    with shoal.ProcessPoolExecutor(1) as ex:
        try:
            blocker = ex.submit(workers.wait_for_file, str(release), "released")
            futures = [ex.submit(workers.square, i) for i in range(300)]
            pattern = [i for i in range(300) if i % 3 == 0 or i % 7 == 2]
            # (the worker may already hold the first few: those run)
            cancelled = {i for i in pattern if futures[i].cancel()}
            assert len(cancelled) >= len(pattern) - 3
        finally:
            release.touch()
        assert blocker.result(timeout=60) == "released"
        for i, f in enumerate(futures):
            if i in cancelled:
                assert f.cancelled()
                with pytest.raises(concurrent.futures.CancelledError):
                    f.result(timeout=0)
            else:
                assert f.result(timeout=60) == i * i
        assert ex._engine.statistics().tasks_completed == 1 + 300 - len(cancelled)


# -- Executor.map(buffersize=): Python 3.14's argument, on every Python -------------


class _Counted:
    """An input that counts how many items were taken from it."""

    def __init__(self, items):
        self._it = iter(items)
        self.taken = 0
        self._lock = threading.Lock()

    def __iter__(self):
        return self

    def __next__(self):
        with self._lock:
            item = next(self._it)
            self.taken += 1
            return item


def _wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_map_buffersize_reads_an_endless_input_as_results_are_taken():
    # 3.14's test_map_buffersize_on_infinite_iterable(s): the with block ends
    # although the input never does (no more input is read at shutdown).
    with shoal.ProcessPoolExecutor(2) as ex:
        res = ex.map(str, itertools.count(), buffersize=2)
        assert [next(res) for _ in range(3)] == ["0", "1", "2"]
        res = ex.map(workers.add, itertools.count(), itertools.count(), buffersize=2)
        assert [next(res) for _ in range(3)] == [0, 2, 4]


def test_map_buffersize_keeps_at_most_that_many_tasks_outstanding():
    items = _Counted(range(1000))
    with shoal.ProcessPoolExecutor(2) as ex:
        res = ex.map(workers.square, items, buffersize=3)
        _wait_until(lambda: items.taken == 3)
        time.sleep(0.3)  # nobody takes a result: nothing more is read
        assert items.taken == 3
        for k in range(1, 50):
            assert next(res) == (k - 1) ** 2
            assert items.taken <= k + 3
        # With a chunksize, a task is a chunk, as in the standard library.
        items = _Counted(range(1000))
        res = ex.map(workers.square, items, buffersize=2, chunksize=5)
        _wait_until(lambda: items.taken == 10)
        time.sleep(0.3)
        assert items.taken == 10
        assert list(itertools.islice(res, 12)) == [x * x for x in range(12)]
        assert items.taken <= 12 + 10


def test_map_buffersize_reads_no_more_input_at_shutdown():
    # 3.14's test_map_buffersize_when_buffer_is_full: a map nobody iterates
    # has read exactly buffersize items when shutdown(wait=True) returns.
    ints = iter(range(10))
    ex = shoal.ProcessPoolExecutor(2)
    res = ex.map(workers.square, ints, buffersize=2)
    ex.shutdown(wait=True)
    assert next(ints) == 2
    # The results submitted before the shutdown still arrive; then the
    # iterator says why the rest of the input will not be mapped.
    assert next(res) == 0 and next(res) == 1
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        next(res)
    # An input that was read to its end ends normally.
    ex = shoal.ProcessPoolExecutor(2)
    res = ex.map(workers.square, range(2), buffersize=2)
    ex.shutdown(wait=True)
    assert list(res) == [0, 1]


def test_map_buffersize_with_empty_or_no_input():
    with shoal.ProcessPoolExecutor(2) as ex:
        assert next(ex.map(str, [], buffersize=2), None) is None
        assert next(ex.map(str, buffersize=2), None) is None
        # Without any iterable, map is empty, as the standard library's (it
        # was a ValueError from min()).
        assert list(ex.map(str)) == []


def test_map_buffersize_must_be_a_positive_integer():
    with shoal.ProcessPoolExecutor(1) as ex:
        for bad in ("foo", 2.0):
            with pytest.raises(TypeError, match="buffersize must be an integer or None"):
                ex.map(str, range(4), buffersize=bad)
        for bad in (0, -1):
            with pytest.raises(ValueError, match=r"buffersize must be None or > 0"):
                ex.map(str, range(4), buffersize=bad)


# -- terminate_workers() / kill_workers(): Python 3.14's methods, on every Python ----


def _start_then_block(marker, ignore_sigterm=False):
    if ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    open(marker, "w").close()
    time.sleep(60)
    open(marker + ".finished", "w").close()


def _gone(pids, timeout):
    """Whether every pid has exited within *timeout* seconds.  (Without
    reaping them: psutil's wait() would take the exit status the pool's
    own waitpid needs.)"""

    def exited(pid):
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    deadline = time.monotonic() + timeout
    while not all(exited(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.mark.parametrize("method", ["terminate_workers", "kill_workers"])
def test_terminate_or_kill_workers_stops_running_tasks_and_cancels_queued_ones(method, tmp_path):
    with shoal.ProcessPoolExecutor(2) as ex:
        markers = [str(tmp_path / f"task{i}") for i in range(2)]
        running = [ex.submit(_start_then_block, m) for m in markers]
        _wait_until(lambda: all(os.path.exists(m) for m in markers))
        queued = [ex.submit(workers.square, i) for i in range(20)]
        pids = list(ex._processes)
        started = time.monotonic()
        getattr(ex, method)()
        assert time.monotonic() - started < 0.5  # it does not wait, as in 3.14
        with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
            ex.submit(workers.square, 1)
        assert _gone(pids, timeout=10)
        for future in running:
            with pytest.raises(shoal.PoolClosedError, match="terminated"):
                future.result(timeout=10)
        assert isinstance(running[0].exception(), RuntimeError)  # as BrokenProcessPool is
        # What no worker held is cancelled; what a worker held but had not
        # started fails with the running ones (none of it ran to the end).
        for f in queued:
            assert f.cancelled() or isinstance(f.exception(timeout=10), shoal.PoolClosedError)
        assert any(f.cancelled() for f in queued)
    assert not any(os.path.exists(m + ".finished") for m in markers)


def test_kill_workers_does_not_wait_for_a_worker_that_ignores_sigterm(tmp_path):
    marker = str(tmp_path / "task")
    for method, at_least, at_most in (("kill_workers", 0, 0.8), ("terminate_workers", 0.8, 10)):
        ex = shoal.ProcessPoolExecutor(1)
        future = ex.submit(_start_then_block, marker, ignore_sigterm=True)
        _wait_until(lambda: os.path.exists(marker))
        os.unlink(marker)
        (pid,) = ex._processes
        started = time.monotonic()
        getattr(ex, method)()
        assert _gone([pid], timeout=10)
        # SIGKILL at once; terminate_workers' SIGTERM is ignored, then SIGKILL.
        assert at_least <= time.monotonic() - started <= at_most, method
        ex.shutdown(wait=True)
        assert isinstance(future.exception(timeout=10), shoal.PoolClosedError)


@pytest.mark.parametrize("method", ["terminate_workers", "kill_workers"])
def test_terminate_or_kill_workers_of_an_idle_or_already_hurt_executor(method):
    # 3.14's test_force_shutdown_workers_dead_workers and _stops_pool: a pool
    # that lost a worker, or never ran anything, stops without an error.
    with shoal.ProcessPoolExecutor(2) as ex:
        assert ex.submit(workers.square, 3).result(timeout=30) == 9
        pids = list(ex._processes)
        getattr(ex, method)()
        assert _gone(pids, timeout=10)
        getattr(ex, method)()  # twice is harmless
    with shoal.ProcessPoolExecutor(1) as ex:
        with pytest.raises(shoal.WorkerDiedError):
            ex.submit(os._exit, 1).result(timeout=30)
        getattr(ex, method)()
    ex = shoal.ProcessPoolExecutor(1)
    ex.shutdown(wait=True)
    getattr(ex, method)()  # after shutdown: nothing left to stop
