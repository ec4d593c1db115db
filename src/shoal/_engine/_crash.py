"""Crash attribution: what happens to each task a dead worker held.

A pure function of what the scheduler knows once a worker's sentinel fired
and its socket was drained: the tasks it still held (in the order it runs
them), and what the worker wrote into its slot of the status block -- the id
of the task it was running, and of the last one it finished.  It decides;
the scheduler (``_scheduler.Scheduler.reap``) acts, so the rules can be
tested without a process.

The rules:

- A task whose caller already has an error (cancelled, or abandoned by
  terminate) is dropped: nothing more is delivered to it.
- The task the worker was running fails: ``TaskTimeoutError`` when the
  scheduler killed the worker for its time limit, the scheduler's own
  error when it killed the worker for another reason (a message that is not
  shoal's: ``CorruptDataError``), else ``WorkerDiedError`` (pid, exit code
  or signal); its function is *blamed* (the engine then asks for results
  after every task of it, so another crash loses no finished work).  A
  running task that was cancelled is dropped by the rule above: its caller
  already got its ``CancelledError``.
- If the pool is broken (its initializer fails), every other task fails
  with ``WorkerStartError``.
- Otherwise the others go back to the queue as they are, uncounted: those
  after the running one never started, and those before it finished but
  their results were still inside the worker.
- A worker that died *between* tasks most likely died sending the result of
  the last task it finished: that task runs again, counted against
  ``max_requeues``, its function blamed; once it has been run again that
  many times it fails with ``WorkerDiedError`` instead.  When the scheduler
  killed it with an error of its own (a corrupt message, most likely the
  one carrying that task's result), that task fails with that error.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from ..exceptions import TaskTimeoutError, WorkerDiedError, WorkerStartError
from ._tasks import Task

#: A finished task whose worker died outside any task (while sending its
#: result, most likely) runs again at most this many times, then fails.
MAX_REQUEUES = 3

#: kill_reason values of tasks whose caller already got an error: a result
#: that still arrives for them is dropped.
ALREADY_FAILED = ("cancelled", "abandoned")


class Fate(enum.Enum):
    """What happens to one task of a dead worker."""

    #: its caller already has an error: nothing more happens
    DROP = "drop"
    #: it fails with the verdict's ``error``
    FAIL = "fail"
    #: back to the queue as it is, not counted (it never started, or its
    #: result was lost because another task killed the worker)
    REQUEUE = "requeue"
    #: back to the queue, counted in ``task.requeues`` (it finished, but its
    #: worker died between tasks, most likely while sending its result)
    RERUN = "rerun"


@dataclass(frozen=True, slots=True)
class Verdict:
    """The fate of one task, and whether its function killed the worker."""

    task: Task
    fate: Fate
    error: BaseException | None = None
    #: the task's function is taken to have killed the worker
    blame: bool = False


def attribute_crash(
    tasks: Iterable[Task],
    *,
    running: int,
    last_done: int,
    pid: int,
    exitcode: int | None,
    broken: bool = False,
    broken_error: BaseException | None = None,
    max_requeues: int = MAX_REQUEUES,
    kill_error: BaseException | None = None,
) -> list[Verdict]:
    """One :class:`Verdict` per task of *tasks* (what the dead worker *pid*
    held, in the order it runs them), in that order.

    *running* and *last_done* are the ids in the worker's status slot (0:
    none); *exitcode* is the worker's, as ``Process.exitcode``; *broken* says
    the pool cannot start workers any more (*broken_error* says why);
    *kill_error*: the scheduler killed the worker, and why (the running
    task's error, or the suspect's when none was running).  Nothing is
    mutated: the caller applies the verdicts.
    """
    tasks = list(tasks)
    run_index = finished_upto = -1
    for i, task in enumerate(tasks):
        if task.id == running:
            run_index = i
        elif task.id == last_done:
            finished_upto = i
    if run_index >= 0:
        finished_upto = run_index - 1
    # A worker that died between tasks (no task running) most likely died
    # sending the last finished task's result.
    suspect = run_index < 0 and finished_upto >= 0
    verdicts = []
    for i, task in enumerate(tasks):
        if task.kill_reason in ALREADY_FAILED:
            verdicts.append(Verdict(task, Fate.DROP))
        elif i == run_index:
            if task.kill_reason == "timeout":
                exc: BaseException = TaskTimeoutError(
                    f"the task ran longer than its time limit of {task.timeout} s; worker process "
                    f"{pid} was killed and replaced"
                )
            elif kill_error is not None:
                exc = kill_error
            else:
                exc = WorkerDiedError(pid, exitcode)
            verdicts.append(Verdict(task, Fate.FAIL, exc, blame=task.kill_reason is None))
        elif broken:
            exc = WorkerStartError(f"the pool cannot run tasks: {broken_error}")
            exc.__cause__ = broken_error  # as break_pool() gives the tasks still queued
            verdicts.append(Verdict(task, Fate.FAIL, exc))
        elif suspect and task.id == last_done:
            if kill_error is not None:
                verdicts.append(Verdict(task, Fate.FAIL, kill_error, blame=True))
            elif task.requeues >= max_requeues:
                exc = WorkerDiedError(
                    pid,
                    exitcode,
                    f"It finished, but each of the {task.requeues + 1} workers that ran it died before "
                    "sending its result; it was not run again.",
                )
                verdicts.append(Verdict(task, Fate.FAIL, exc))
            else:
                verdicts.append(Verdict(task, Fate.RERUN, blame=True))
        else:
            verdicts.append(Verdict(task, Fate.REQUEUE))
    return verdicts
