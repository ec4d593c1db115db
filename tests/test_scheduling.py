"""No task waits behind a long one while a worker is idle.

A worker may hold a batch it has not started behind the task it runs, so
that it never waits for its next task.  When that task runs long and another
worker has nothing to do, the scheduler takes back what the busy worker has
not started and hands it to the idle one (``Scheduler.balance``).

The tests park a task that blocks until the test releases it (task 0, the
*blocker*) on one worker, with quick tasks submitted behind it.  Every quick
task must finish while the blocker still blocks, exactly once (each creates
a marker file exclusively: a second run fails with FileExistsError), and
every result must come back right.  There is no timing bound: before the
fix, the quick tasks held behind the blocker never finished until it was
released.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal

import pytest

import shoal
import workers
from helpers import wait_until

#: Tasks per test: the blocker and N - 1 quick ones.
N = 40


def _done(folder: str) -> int:
    return sum(name.startswith("done-") for name in os.listdir(folder))


def _quick_tasks_finish_while_blocked(folder: str) -> None:
    finished = wait_until(lambda: _done(folder) == N - 1, timeout=60)
    assert finished, f"only {_done(folder)} of {N - 1} quick tasks finished while the blocker blocked"
    assert not os.path.exists(os.path.join(folder, "done-0"))


def _release(folder: str) -> None:
    with open(os.path.join(folder, "release"), "w"):
        pass


def _start(pool, face: str, items: list):
    """Submit *items* through *face*; return a function collecting the results in input order."""
    fn = workers.mark_or_block
    if face == "apply_async":
        results = [pool.apply_async(fn, (item,)) for item in items]
        return lambda: [r.get(timeout=60) for r in results]
    if face == "map_async":
        result = pool.map_async(fn, items, chunksize=1)
        return lambda: result.get(timeout=60)
    if face in ("imap", "imap_unordered"):
        it = getattr(pool, face)(fn, items, chunksize=1)
        if face == "imap":
            return lambda: list(it)
        # As they finish: the quick ones first, all while the blocker blocks.
        first = [it.next(timeout=60) for _ in range(N - 1)]
        assert 0 not in first
        return lambda: sorted(first + list(it))
    if face == "submit":
        futures = [pool.submit(fn, item) for item in items]
        return lambda: [f.result(timeout=60) for f in futures]
    if face == "executor.map":
        it = pool.map(fn, items, timeout=60)
        return lambda: list(it)
    raise AssertionError(face)


@pytest.mark.parametrize("face", ["apply_async", "map_async", "imap", "imap_unordered", "submit"])
def test_pool_quick_tasks_do_not_wait_behind_a_long_one(face, fork_or_spawn, tmp_path):
    folder = str(tmp_path)
    with shoal.Pool(2, context=fork_or_spawn) as pool:
        try:
            collect = _start(pool, face, [(i, folder) for i in range(N)])
            _quick_tasks_finish_while_blocked(folder)
        finally:
            _release(folder)
        assert collect() == list(range(N))


@pytest.mark.parametrize("face", ["submit", "executor.map"])
def test_executor_quick_tasks_do_not_wait_behind_a_long_one(face, fork_or_spawn, tmp_path):
    folder = str(tmp_path)
    ctx = multiprocessing.get_context(fork_or_spawn)
    with shoal.ProcessPoolExecutor(2, mp_context=ctx) as ex:
        try:
            collect = _start(ex, face, [(i, folder) for i in range(N)])
            _quick_tasks_finish_while_blocked(folder)
        finally:
            _release(folder)
        assert collect() == list(range(N))


def test_joblib_generator_unordered_returns_the_quick_results_first(tmp_path):
    joblib = pytest.importorskip("joblib")
    import shoal.joblib  # noqa: F401 - registers the backend

    folder = str(tmp_path)
    out = joblib.Parallel(n_jobs=2, backend="shoal", return_as="generator_unordered")(
        joblib.delayed(workers.mark_or_block)((i, folder)) for i in range(10)
    )
    try:
        finished = wait_until(lambda: _done(folder) == 9, timeout=60)
        assert finished, f"only {_done(folder)} of 9 quick tasks finished while the blocker blocked"
        assert sorted(next(out) for _ in range(9)) == list(range(1, 10))
    finally:
        _release(folder)
    assert list(out) == [0]


@pytest.mark.parametrize("face", ["pool", "executor"])
def test_worker_killed_after_its_held_tasks_went_elsewhere_fails_only_its_task(face, fork_or_spawn, tmp_path):
    # The blocker's worker held quick tasks, which another worker ran; killing
    # it then fails the blocker alone, and nothing runs twice.
    folder = str(tmp_path)
    items = [(i, folder) for i in range(N)]
    if face == "pool":
        pool = shoal.Pool(2, context=fork_or_spawn)
        outcomes = [pool.apply_async(workers.mark_or_block, (item,)) for item in items]
        get = [r.get for r in outcomes]
    else:
        pool = shoal.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context(fork_or_spawn))
        futures = [pool.submit(workers.mark_or_block, item) for item in items]
        get = [f.result for f in futures]
    try:
        _quick_tasks_finish_while_blocked(folder)
        assert wait_until(lambda: os.path.exists(os.path.join(folder, "blocker")), timeout=60)
        with open(os.path.join(folder, "blocker")) as f:
            os.kill(int(f.read()), signal.SIGKILL)
        with pytest.raises(shoal.WorkerDiedError):
            get[0](timeout=60)
        assert [g(timeout=60) for g in get[1:]] == list(range(1, N))
        assert _done(folder) == N - 1
        # The pool goes on with a replacement worker.
        assert pool.submit(workers.square, 5).result(timeout=60) == 25
    finally:
        _release(folder)
        if face == "pool":
            pool.terminate()
            pool.join()
        else:
            pool.shutdown()


@pytest.mark.parametrize("maxtasksperchild", [None, 10])
def test_tasks_moved_between_workers_run_once_each(fork_or_spawn, maxtasksperchild, tmp_path):
    # Uneven tasks through a short imap window: workers go idle beside busy
    # ones holding tasks they have not started, over and over.
    folder = str(tmp_path)
    rng = random.Random(19)
    items = [(i, folder, 0.06 if i % 9 == 0 else rng.random() * 0.003) for i in range(150)]
    with shoal.Pool(2, maxtasksperchild=maxtasksperchild, context=fork_or_spawn, task_timeout=60) as pool:
        got = sorted(pool.imap_unordered(workers.mark_after, items, buffersize=3))
    assert got == list(range(150))
    assert _done(folder) == 150


def test_a_maps_items_are_shared_among_the_workers():
    # A map's chunks differ in size (one item first, then large ones that shrink),
    # and a batch was sized by the task at its head: once the function's
    # estimate was known, a batch headed by a small chunk took the large
    # ones behind it, and one worker ran nearly all of a map (down to 16 of
    # 10,000 items for the other) while its peer idled.
    import collections

    for _ in range(3):  # a new pool each time: the first map of a function is the case
        with shoal.Pool(2) as pool:
            # Both workers ready (each seen to run), so the map meets two.
            assert len(set(pool.map(workers.sleep_pid, [0.2, 0.2], chunksize=1))) == 2
            ran = collections.Counter(pool.map(workers.getpid, range(10_000)))
        assert len(ran) == 2 and min(ran.values()) >= 1_000, ran


def test_a_slow_first_call_does_not_set_the_duration_estimate_for_long():
    # Each report of a batch's duration weighed the same, however many items
    # it measured: one cold first call (0.2 s) outweighed tens of thousands
    # of quick ones for a dozen reports, and batches stayed small (a round
    # trip to the scheduler per chunk).  Reports now weigh by their items.
    with shoal.Pool(1) as pool:
        assert pool.map(workers.slow_first_call, range(2_000)) == list(range(2_000))
        estimate = pool.statistics().task_seconds_estimate
    # A call takes about a microsecond; the cold call kept it at 330 µs.
    assert estimate is not None and estimate < 50e-6, estimate
