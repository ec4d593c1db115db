"""shoal.ProcessPoolExecutor behaves like concurrent.futures.ProcessPoolExecutor."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time

import pytest

import shoal
import workers


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


def test_result_whose_pickling_exits_raises_system_exit(fork_or_spawn):
    # A SystemExit raised while the worker pickled the result used to kill
    # the worker (WorkerDiedError); the standard library reports it as the
    # task's exception, and the worker lives on.
    with shoal.ProcessPoolExecutor(1, mp_context=shoal.get_context(fork_or_spawn)) as ex:
        pid = ex.submit(workers.getpid).result()
        with pytest.raises(SystemExit):
            ex.submit(workers.return_exit_at_pickle).result(timeout=60)
        assert ex.submit(workers.getpid).result() == pid


def test_failing_initializer_is_broken_process_pool():
    from concurrent.futures.process import BrokenProcessPool

    with shoal.ProcessPoolExecutor(1, initializer=workers.failing_initializer) as ex:
        with pytest.raises(BrokenProcessPool):
            ex.submit(workers.square, 2).result(timeout=30)


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
