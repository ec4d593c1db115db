"""Crash attribution, without a process: given what a dead worker held and
what its status slot says, each task fails, goes back to the queue, runs
again, or is left alone (its caller already has an error)."""

from __future__ import annotations

import signal

import pytest

import shoal
from shoal._engine._crash import MAX_REQUEUES, Fate, attribute_crash
from shoal._engine._tasks import Task

PID = 4242
KILLED = -signal.SIGKILL


def _tasks(n: int, **fields) -> list[Task]:
    return [
        Task(id=i, fn_id=7, fn_ref=None, mode=0, data=b"", fds=(), sink=None, **fields)
        for i in range(1, n + 1)
    ]


def _fates(verdicts) -> list[Fate]:
    return [v.fate for v in verdicts]


def test_the_running_task_fails_with_worker_died_and_the_others_go_back_uncounted():
    tasks = _tasks(5)
    verdicts = attribute_crash(tasks, running=3, last_done=2, pid=PID, exitcode=KILLED)
    assert [v.task for v in verdicts] == tasks  # one verdict per task, in order
    assert _fates(verdicts) == [Fate.REQUEUE, Fate.REQUEUE, Fate.FAIL, Fate.REQUEUE, Fate.REQUEUE]
    died = verdicts[2].error
    assert isinstance(died, shoal.WorkerDiedError)
    assert (died.pid, died.exitcode, died.signal_name) == (PID, KILLED, "SIGKILL")
    # Only the function of the task that killed the worker is blamed.
    assert [v.blame for v in verdicts] == [False, False, True, False, False]
    assert all(t.requeues == 0 for t in tasks)  # the function decides; it changes nothing


def test_a_task_killed_for_its_time_limit_fails_with_task_timeout_and_is_not_blamed():
    tasks = _tasks(2, timeout=1.5)
    tasks[0].kill_reason = "timeout"
    verdicts = attribute_crash(tasks, running=1, last_done=0, pid=PID, exitcode=KILLED)
    assert _fates(verdicts) == [Fate.FAIL, Fate.REQUEUE]
    error = verdicts[0].error
    assert isinstance(error, shoal.TaskTimeoutError) and isinstance(error, TimeoutError)
    assert "1.5 s" in str(error) and str(PID) in str(error)
    assert not verdicts[0].blame


@pytest.mark.parametrize("reason", ["cancelled", "abandoned"])
def test_tasks_whose_caller_already_has_an_error_are_dropped(reason):
    tasks = _tasks(3)
    tasks[1].kill_reason = reason  # the running one: the scheduler killed it on purpose
    tasks[2].kill_reason = reason
    verdicts = attribute_crash(tasks, running=2, last_done=1, pid=PID, exitcode=KILLED)
    assert _fates(verdicts) == [Fate.REQUEUE, Fate.DROP, Fate.DROP]
    assert all(v.error is None and not v.blame for v in verdicts)


def test_a_worker_dying_between_tasks_runs_its_last_finished_task_again_counted():
    tasks = _tasks(3)
    verdicts = attribute_crash(tasks, running=0, last_done=2, pid=PID, exitcode=KILLED)
    assert _fates(verdicts) == [Fate.REQUEUE, Fate.RERUN, Fate.REQUEUE]
    assert [v.blame for v in verdicts] == [False, True, False]


def test_a_task_whose_workers_keep_dying_after_it_finished_fails_after_max_requeues():
    tasks = _tasks(2)
    tasks[0].requeues = MAX_REQUEUES
    verdicts = attribute_crash(tasks, running=0, last_done=1, pid=PID, exitcode=KILLED)
    assert _fates(verdicts) == [Fate.FAIL, Fate.REQUEUE]
    error = verdicts[0].error
    assert isinstance(error, shoal.WorkerDiedError)
    assert f"each of the {MAX_REQUEUES + 1} workers" in str(error) and "not run again" in str(error)
    # A smaller limit is obeyed too.
    fresh = _tasks(1)
    verdicts = attribute_crash(fresh, running=0, last_done=1, pid=PID, exitcode=0, max_requeues=0)
    assert _fates(verdicts) == [Fate.FAIL]


def test_an_idle_worker_dying_blames_nothing_and_requeues_everything():
    tasks = _tasks(3)
    # It had not started any of them, and the last task it finished is not among them.
    verdicts = attribute_crash(tasks, running=0, last_done=99, pid=PID, exitcode=1)
    assert _fates(verdicts) == [Fate.REQUEUE] * 3
    assert not any(v.blame for v in verdicts)


def test_in_a_broken_pool_the_tasks_not_running_fail_with_worker_start_error():
    cause = RuntimeError("the initializer raised")
    tasks = _tasks(3)
    verdicts = attribute_crash(
        tasks, running=2, last_done=1, pid=PID, exitcode=1, broken=True, broken_error=cause
    )
    assert _fates(verdicts) == [Fate.FAIL, Fate.FAIL, Fate.FAIL]
    assert isinstance(verdicts[1].error, shoal.WorkerDiedError)  # the running one died
    for v in (verdicts[0], verdicts[2]):
        assert isinstance(v.error, shoal.WorkerStartError)
        assert "the initializer raised" in str(v.error)


def test_a_worker_that_held_nothing_gets_no_verdicts():
    assert attribute_crash([], running=5, last_done=4, pid=PID, exitcode=KILLED) == []
