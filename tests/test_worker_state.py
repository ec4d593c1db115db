"""Pool(shared=...), shoal.shared(), shoal.worker_state() and the
worker_init / worker_exit hooks, on Pool and ProcessPoolExecutor."""

from __future__ import annotations

import os
from collections import defaultdict

import numpy as np
import pytest
from tests import workers

import shoal


def test_tasks_read_the_shared_object(start_method):
    obj = {"name": "model", "weights": list(range(10))}
    with shoal.Pool(2, context=start_method, shared=obj) as pool:
        assert pool.map(workers.shared_value, range(6)) == [obj] * 6


def test_shared_object_is_pickled_once_not_per_task_or_worker(start_method):
    # Workers recycled every 3 tasks: many worker starts, one pickling (none under fork).
    workers.PickleCounter.pickled = 0
    obj = workers.PickleCounter(41)
    with shoal.Pool(2, context=start_method, shared=obj, maxtasksperchild=3) as pool:
        values = [v.value for v in pool.map(workers.shared_value, range(24), chunksize=1)]
        assert pool.statistics().workers_started > 2
    assert values == [41] * 24
    # Results come back pickled by the workers, never by this process.
    assert workers.PickleCounter.pickled == (0 if start_method == "fork" else 1)


def test_large_array_in_shared_object_is_not_copied(start_method):
    array = np.arange(1 << 20, dtype=np.int64)  # 8 MiB
    with shoal.Pool(2, context=start_method, shared={"array": array}) as pool:
        located = pool.map(workers.shared_array_location, range(4), chunksize=1)
    for address, mapping, second in located:
        assert second == 1
        if start_method == "fork":
            assert address == array.ctypes.data  # the parent's pages, inherited
        else:
            assert mapping.startswith("/memfd:"), mapping  # mapped from shared memory


def test_shared_outside_a_pool_worker_raises_a_clear_error():
    with pytest.raises(RuntimeError, match="outside a pool worker"):
        shoal.shared()
    with pytest.raises(RuntimeError, match="outside a pool worker"):
        shoal.worker_state()


def test_shared_in_a_pool_without_shared_object_raises_a_clear_error():
    with shoal.Pool(1) as pool, pytest.raises(RuntimeError, match="without shared="):
        pool.apply(workers.shared_value)


def test_shared_in_a_process_started_by_a_task_raises():
    # A Process forked by a task inherits the worker's globals but is not a worker.
    with shoal.Pool(1, context="fork", shared=1) as pool:
        message = pool.apply(_run_in_child_process)
    assert "outside a pool worker" in message


def _run_in_child_process():
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    queue = ctx.SimpleQueue()
    proc = ctx.Process(target=lambda: queue.put(workers.call_shared_outside_pool()))
    proc.start()
    message = queue.get()
    proc.join()
    return message


def test_none_is_a_valid_shared_object():
    with shoal.Pool(1, shared=None) as pool:
        assert pool.apply(workers.shared_value) is None


def test_worker_state_is_private_and_kept_between_tasks(fork_or_spawn):
    with shoal.Pool(2, context=fork_or_spawn) as pool:
        seen = pool.map(workers.count_in_worker_state, range(40), chunksize=1)
    by_pid = defaultdict(list)
    for pid, count, _resource in seen:
        by_pid[pid].append(count)
    # Each worker counts its own tasks 1, 2, 3, ... in the order it ran them.
    for counts in by_pid.values():
        assert sorted(counts) == list(range(1, len(counts) + 1))
    assert sum(len(c) for c in by_pid.values()) == 40


def test_worker_init_and_exit_run_once_per_worker_including_recycled(start_method):
    pool = shoal.Pool(
        2,
        context=start_method,
        worker_init=workers.open_resource,
        worker_exit=workers.close_resource,
        maxtasksperchild=4,
    )
    try:
        seen = pool.map(workers.count_in_worker_state, range(20), chunksize=1)
    finally:
        pool.close()
        pool.join()
    for pid, _count, resource in seen:
        assert resource == f"opened by {pid}"  # worker_init ran before its tasks
    exits = pool.worker_exit_results()
    pids = [pid for pid, _resource, _tasks in exits]
    assert len(pids) == len(set(pids))  # once per worker
    assert {pid for pid, _c, _r in seen} <= set(pids)  # every worker that ran tasks, recycled ones too
    for pid, resource, _tasks in exits:
        assert resource == f"opened by {pid}"
    assert sum(tasks for _pid, _resource, tasks in exits) == 20
    assert len(exits) >= 5  # 20 tasks, 4 per worker


def test_a_shared_array_returned_by_worker_exit_arrives_and_leaves_no_descriptor_open():
    # Its descriptor travels beside the message: the parent kept the one it
    # received open for good, beside the array's own (the teardown's leak
    # check counted it).
    pool = shoal.Pool(2, worker_exit=workers.shared_exit_value)
    worker_pids = {w.pid for w in pool._pool}
    pool.close()
    pool.join()
    exits = pool.worker_exit_results()
    assert {int(a[0]) for a in exits} == worker_pids  # one whole array from each worker
    assert all(a.shape == (100_000,) and (a == a[0]).all() for a in exits)
    del exits


def test_worker_exit_exception_is_raised_by_worker_exit_results():
    pool = shoal.Pool(1, worker_exit=workers.failing_exit)
    pool.apply(os.getpid)
    pool.close()
    pool.join()
    with pytest.raises(KeyError, match="worker_exit failed") as info:
        pool.worker_exit_results()
    assert "failing_exit" in str(info.value.__cause__)


def test_worker_init_failure_stops_the_pool_like_initializer(fork_or_spawn):
    with shoal.Pool(1, context=fork_or_spawn, worker_init=workers.failing_init) as pool:
        with pytest.raises(shoal.WorkerStartError, match="worker_init failed"):
            pool.apply(os.getpid)


def test_bad_hooks_get_clear_errors():
    with pytest.raises(TypeError, match="worker_init must be a callable"):
        shoal.Pool(1, worker_init=3)
    with pytest.raises(TypeError, match="worker_exit must be a callable"):
        shoal.ProcessPoolExecutor(1, worker_exit="x")
    with pytest.raises(shoal.SerializationError, match="shared object"):
        shoal.Pool(1, context="spawn", shared=lambda_holder())


def lambda_holder():
    import threading

    return {"lock": threading.Lock()}


def test_executor_takes_shared_and_hooks(fork_or_spawn):
    with shoal.ProcessPoolExecutor(
        2,
        mp_context=fork_or_spawn,
        shared=[1, 2, 3],
        worker_init=workers.open_resource,
        worker_exit=workers.close_resource,
    ) as executor:
        assert executor.submit(workers.shared_value).result() == [1, 2, 3]
        pid, _count, resource = executor.submit(workers.count_in_worker_state).result()
        assert resource == f"opened by {pid}"
    assert len(executor.worker_exit_results()) == 2
