"""Processes a task leaves running end with the pool, and never keep it waiting.

A task may start processes and return without waiting for them: a plain
``multiprocessing.Process``, or joblib's default backend (loky), whose
workers stay for reuse.  Before, ``multiprocessing`` made the worker wait for
every child it had started as it exited, so ``close()`` + ``join()``,
``shutdown()`` and the exit of a program using an executor waited for them
(60 s here, 300 s for loky's idle workers), and ``terminate()`` left them
running.  A child started by fork also holds the worker's sentinel pipe, so a
worker that died while its child lived on was never seen dead: its task
waited for ever.

Now a worker ends its descendants as it ends (SIGTERM, then SIGKILL after a
grace period), ``terminate()`` ends them with the workers, and the scheduler
watches each worker's pidfd.  The bound below (30 s) is a hang detector: the
failures took 60 s or more.  The processes are checked by pid: once their
worker is gone the system adopts them, and the leak check of conftest.py
(which counts this process's descendants) no longer sees them.
"""

from __future__ import annotations

import multiprocessing
import os
import time

import psutil
import pytest

import shoal
import workers
from helpers import run_python, wait_until

#: Seconds any of these may take; the failures took 60 s or more.
BOUND = 30


def _running(pids):
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.Error:
            pass
    return out


def _assert_all_end(pids):
    ended = wait_until(lambda: not _running(pids), timeout=BOUND, interval=0.05)
    left = []
    for pid in _running(pids):  # named, then killed: not left to later tests
        try:
            process = psutil.Process(pid)
            left.append((pid, process.cmdline()))
            process.kill()
        except psutil.Error:
            pass
    assert ended, f"processes left running: {left}"


def _left_by(pool, task: str):
    """Run *task* in *pool*; return the pids it left running (its worker's descendants)."""
    if task == "process":
        pids = pool.submit(workers.leave_child, 60).result(timeout=60)
    else:
        pytest.importorskip("joblib")
        total, pids = pool.submit(workers.nested_joblib).result(timeout=60)
        assert total == 6
    assert pids
    return pids


TASKS = ["process", "joblib"]


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("how", ["with", "close_join", "terminate", "executor_shutdown"])
def test_leaving_the_pool_ends_what_its_tasks_left_running(task, how, fork_or_spawn):
    ctx = multiprocessing.get_context(fork_or_spawn)
    if how == "executor_shutdown":
        pool = shoal.ProcessPoolExecutor(2, mp_context=ctx)
    else:
        pool = shoal.Pool(2, context=ctx)
    worker_pids = pool._engine.worker_pids
    try:
        left = _left_by(pool, task)
        started = time.monotonic()
        if how == "with":
            with pool:
                pass
        elif how == "close_join":
            pool.close()
            pool.join()
        elif how == "terminate":
            pool.terminate()
            pool.join()
        else:
            pool.shutdown()
        elapsed = time.monotonic() - started
    finally:
        if how == "executor_shutdown":
            pool.shutdown(cancel_futures=True)
        else:
            pool.terminate()
    assert elapsed < BOUND, f"{how} took {elapsed:.1f} s"
    _assert_all_end(left + worker_pids)


SCRIPT = """
import sys
import shoal, workers

if __name__ == "__main__":
    task, face, method = sys.argv[1:4]
    pool = shoal.ProcessPoolExecutor(2) if face == "executor" else shoal.Pool(2, context=method)
    if task == "process":
        left = pool.submit(workers.leave_child, 60).result()
    else:
        left = pool.submit(workers.nested_joblib).result()[1]
    print(" ".join(map(str, left + pool._engine.worker_pids)), flush=True)
    # and exit with the pool open
"""


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("face", ["pool", "executor"])
def test_a_program_that_exits_with_the_pool_open_ends_what_its_tasks_left_running(
    task, face, fork_or_spawn, tmp_path
):
    if task == "joblib":
        pytest.importorskip("joblib")
    script = tmp_path / "leave.py"
    script.write_text(SCRIPT)
    tests = os.path.dirname(workers.__file__)
    env = {"PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    # Left-over processes would hold the captured output open: run() would
    # wait for them too (TimeoutExpired).
    out = run_python(str(script), task, face, fork_or_spawn, env=env, timeout=BOUND)
    assert out.returncode == 0, out.stderr
    _assert_all_end([int(pid) for pid in out.stdout.split()])


@pytest.mark.parametrize("then", ["die", "time_out"])
def test_a_worker_whose_child_lives_on_is_seen_dead(then, fork_or_spawn, tmp_path):
    # The child holds the worker's sentinel pipe: the death of the worker
    # (a crash, or killed for its time limit) must still fail the task.
    path = str(tmp_path / "child")
    with shoal.Pool(2, context=fork_or_spawn) as pool:
        result = pool.apply_async(workers.leave_child_then, (path, then), task_timeout=2)
        error = shoal.WorkerDiedError if then == "die" else shoal.TaskTimeoutError
        try:
            with pytest.raises(error):
                result.get(timeout=BOUND)
        finally:
            assert wait_until(lambda: os.path.exists(path), timeout=BOUND)
            with open(path) as f:
                child = int(f.read())
        assert pool.apply(workers.square, (4,)) == 16
    if then == "time_out":
        # killed with its worker, which the pool killed
        _assert_all_end([child])
    else:
        # A worker that dies on its own leaves its children to the system.
        psutil.Process(child).kill()
