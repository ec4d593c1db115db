"""shoal inside another library's worker process.

loky installs a start method of its own ("loky") as the default in its
workers, and its ``Popen`` lacks ``close()`` and ``kill()``: shoal took that
context and its scheduler thread died with AttributeError ("this is a bug in
shoal", with ``maxtasksperchild=1``).  shoal now drives only the standard
library's contexts (fork there: spawn and forkserver cannot start processes
from such a process, and an explicit request for them says so).  Inside a
daemonic process (a task of the standard library's Pool) no process can
start: ``Pool()`` raises the standard library's AssertionError at once, saying
why and what to do, instead of the scheduler thread failing later.

The loky scenarios run in a child interpreter: loky's resource tracker lives
as long as the process that started it.
"""

from __future__ import annotations

import multiprocessing
import os

import pytest

import workers
from helpers import run_python

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

CASES = [
    ("pool", {}),
    ("pool", {"maxtasksperchild": 1}),
    ("executor", {}),
    ("executor", {"max_tasks_per_child": 1}),
    ("joblib", {}),
]

LOKY_SCRIPT = """
import sys
import workers

if __name__ == "__main__":
    if sys.argv[1] == "loky":
        from loky import ProcessPoolExecutor
    else:
        from joblib.externals.loky import ProcessPoolExecutor
    cases = eval(sys.argv[2])
    ex = ProcessPoolExecutor(max_workers=1)
    try:
        for face, options in cases:
            print(repr(ex.submit(workers.pool_in_task, face, options).result(timeout=120)), flush=True)
    finally:
        ex.shutdown(wait=True, kill_workers=True)
"""


@pytest.mark.parametrize("outer", ["loky", "joblib"])
def test_a_pool_inside_a_loky_worker_runs(outer, tmp_path):
    pytest.importorskip("loky" if outer == "loky" else "joblib")
    script = tmp_path / "inside.py"
    script.write_text(LOKY_SCRIPT)
    cases = [*CASES, ("pool", {"context": "spawn"})]
    out = run_python(str(script), outer, repr(cases), env={"PYTHONPATH": TESTS_DIR}, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == len(cases), out.stdout + out.stderr
    for (face, options), line in zip(cases[:-1], lines, strict=False):
        assert eval(line) == ("ok", [0, 1, 4, 9, 16, 25]), (face, options, line)
    # spawn cannot start processes here (the child would be told to use
    # loky's start method): said at construction, with what to do.
    where, kind, message = eval(lines[-1])
    assert (where, kind) == ("construction", "ValueError")
    assert "'loky'" in message and "context='fork'" in message
    assert "bug in shoal" not in out.stderr


@pytest.mark.parametrize("face", ["pool", "executor"])
def test_a_pool_inside_a_daemonic_process_says_why_it_cannot_start(face, fork_or_spawn):
    with multiprocessing.get_context(fork_or_spawn).Pool(1) as outer:
        outcome = outer.apply(workers.pool_in_task, (face,))
    if face == "pool":
        where, kind, message = outcome
        assert (where, kind) == ("construction", "AssertionError")
    else:
        # As the standard library's executor: it starts, and using it raises
        # (BrokenProcessPool, with the reason).
        where, kind, message = outcome
        assert (where, kind) == ("use", "WorkerStartError")
    assert "daemonic processes are not allowed to have children" in message
    assert "Do the work in this process" in message


INHERITED_SCRIPT = """
import sys
import joblib
import shoal
import workers

if __name__ == "__main__":
    # joblib's default backend first, here: its reusable executor (threads,
    # workers, a lock) lives in this process when the pool's workers fork.
    print(sum(joblib.Parallel(n_jobs=2)(joblib.delayed(abs)(-i) for i in range(4))), flush=True)
    with shoal.Pool(2, context="fork") as pool:
        print(pool.apply(workers.nested_joblib)[0], flush=True)
"""


def test_joblib_in_a_task_of_a_pool_forked_from_a_process_that_used_joblib(tmp_path):
    # The forked worker inherited the parent's reusable loky executor, whose
    # threads and workers stayed in the parent: joblib inside a task handed
    # its calls to it and waited for ever.  The worker now forgets it.
    pytest.importorskip("joblib")
    script = tmp_path / "inherited.py"
    script.write_text(INHERITED_SCRIPT)
    out = run_python(str(script), env={"PYTHONPATH": TESTS_DIR}, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["6", "6"]
