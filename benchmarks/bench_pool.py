"""Pool scenarios, 2 workers each, default start method of the platform.

Each contender builds its pool outside the timed region (except in the
start-up scenario), runs the work, and shuts the pool down.

* "apply_async x20k trivial, then get all": 20,000 ``apply_async`` then
  ``get`` on each; joblib's contender is the issue's one-liner,
  ``Parallel(n_jobs=2)(delayed(f)(i) for i in range(20_000))`` with its
  automatic batching, timed after a small call that starts its workers.
* "apply_async x20k, first thing on a new pool": the same burst as the first
  thing a new pool does, timed from the moment its constructor returns
  (workers still starting; the first batches sized before any task time
  is known), against joblib's warm figure.
* "memory per pending task": the bytes a task costs while it waits, the
  growth of the resident set size (RSS) of the process that owns the pool
  and of its workers, divided by the number of tasks.  Each contender runs
  in a fresh interpreter (RSS does not shrink after the earlier scenarios
  free their memory).  There the pool starts, and one blocking task is
  parked on each worker: a blocker creates ``started-PID`` in a temporary
  folder and polls for ``release`` there (more blockers are submitted until
  every worker has said it started, since a pool may queue a second task
  behind a busy worker).  Then, after ``gc.collect()``, RSS is read; 1,000,000
  (200,000 with ``--quick``) ``apply_async(_noop, (i,))`` are queued and
  their results kept, as a caller keeps them; after another ``gc.collect()``
  RSS is read again, and the figure is refused if any of those tasks
  completed meanwhile.  Finally ``release`` is created and the pool
  terminated.  Nothing can hang: a blocker gives up when its parent
  process changes (the owner died) or after ``BLOCK_SECONDS``, the fresh
  interpreter is killed after 600 s, and the folder is removed by the
  process that created it.
* "imap_unordered 400 x 5 ms sleep": efficiency, the sleeping time divided
  by the workers and the elapsed time; "no pool" is the same sleeps in two
  bare processes, this machine's ceiling, and shoal's target is relative to
  it.
* "60 x 10 ms behind one 3 s task": head-of-line blocking.  One 3 s sleep
  then 60 sleeps of 10 ms through ``imap_unordered(chunksize=1)`` (loky:
  ``submit`` each, then ``as_completed``); the figure is the time until all
  60 short results have arrived.  Two workers share the short ones, so
  about 0.6 s is what no blocking costs; a pool that queues short tasks
  behind the long one on the same worker takes the full 3 s.  The long task
  is then stopped with the pool (terminate / shutdown without waiting).
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import tempfile
import time

from ._framework import Scenario, in_fresh_interpreter, optional

WORKERS = 2


def _noop(x):
    return x


def _sleep5ms(x):
    time.sleep(0.005)
    return x


def _stdlib_pool():
    return multiprocessing.Pool(WORKERS)


def _shoal_pool():
    import shoal

    return shoal.Pool(WORKERS)


def _warm(pool) -> None:
    pool.apply(_noop, (1,))


# -- pool start + first result ---------------------------------------------------


def _start_ms(make_pool) -> float:
    t0 = time.perf_counter()
    with make_pool() as pool:
        pool.apply(_noop, (1,))
        return (time.perf_counter() - t0) * 1e3


def _start_loky(quick: bool) -> float:
    from loky import ProcessPoolExecutor

    t0 = time.perf_counter()
    ex = ProcessPoolExecutor(WORKERS)
    ex.submit(_noop, 1).result()
    dt = time.perf_counter() - t0
    ex.shutdown()
    return dt * 1e3


def _start_mpire(quick: bool) -> float:
    from mpire import WorkerPool

    return _start_ms(lambda: WorkerPool(WORKERS))


# -- map of trivial tasks ---------------------------------------------------------

N_MAP = 200_000


def _map_rate(make_pool, warm=_warm) -> float:
    with make_pool() as pool:
        warm(pool)
        t0 = time.perf_counter()
        pool.map(_noop, range(N_MAP))
        return N_MAP / (time.perf_counter() - t0)


def _map_loky(quick: bool) -> float:
    from loky import ProcessPoolExecutor

    ex = ProcessPoolExecutor(WORKERS)
    ex.submit(_noop, 1).result()
    t0 = time.perf_counter()
    list(ex.map(_noop, range(N_MAP), chunksize=N_MAP // (4 * WORKERS)))
    rate = N_MAP / (time.perf_counter() - t0)
    ex.shutdown()
    return rate


def _map_mpire(quick: bool) -> float:
    from mpire import WorkerPool

    # Warm up with a map: an apply() first breaks mpire's map.
    return _map_rate(lambda: WorkerPool(WORKERS), warm=lambda pool: pool.map(_noop, range(10)))


def _map_joblib(quick: bool) -> float:
    from joblib import Parallel, delayed

    with Parallel(n_jobs=WORKERS) as parallel:
        parallel(delayed(_noop)(i) for i in range(10))
        t0 = time.perf_counter()
        parallel(delayed(_noop)(i) for i in range(N_MAP))
        return N_MAP / (time.perf_counter() - t0)


# -- many apply_async --------------------------------------------------------------


N_APPLY = 20_000


def _apply_rate(make_pool) -> float:
    with make_pool() as pool:
        _warm(pool)
        t0 = time.perf_counter()
        results = [pool.apply_async(_noop, (i,)) for i in range(N_APPLY)]
        for r in results:
            r.get()
        return N_APPLY / (time.perf_counter() - t0)


def _apply_rate_cold(make_pool) -> float:
    """The same burst as the first thing a new pool does: timed from the
    moment the constructor returns (its workers may still be starting)."""
    with make_pool() as pool:
        t0 = time.perf_counter()
        results = [pool.apply_async(_noop, (i,)) for i in range(N_APPLY)]
        for r in results:
            r.get()
        return N_APPLY / (time.perf_counter() - t0)


def _submit_rate(executor) -> float:
    with executor:
        executor.submit(_noop, 1).result()
        t0 = time.perf_counter()
        futures = [executor.submit(_noop, i) for i in range(N_APPLY)]
        for f in futures:
            f.result()
        return N_APPLY / (time.perf_counter() - t0)


def _submit_stdlib_ppe(quick: bool) -> float:
    from concurrent.futures import ProcessPoolExecutor

    return _submit_rate(ProcessPoolExecutor(WORKERS))


def _submit_shoal(quick: bool) -> float:
    import shoal

    return _submit_rate(shoal.ProcessPoolExecutor(WORKERS))


def _submit_loky(quick: bool) -> float:
    from loky import ProcessPoolExecutor

    return _submit_rate(ProcessPoolExecutor(WORKERS))


def _apply_joblib(quick: bool) -> float:
    from joblib import Parallel, delayed

    Parallel(n_jobs=WORKERS)(delayed(_noop)(i) for i in range(10))  # starts its (reusable) workers
    t0 = time.perf_counter()
    Parallel(n_jobs=WORKERS)(delayed(_noop)(i) for i in range(N_APPLY))
    return N_APPLY / (time.perf_counter() - t0)


def _apply_mpire(quick: bool) -> float:
    from mpire import WorkerPool

    return _apply_rate(lambda: WorkerPool(WORKERS))


# -- memory per pending task -----------------------------------------------------------

#: The longest a blocker holds its worker, whatever happens to the benchmark.
BLOCK_SECONDS = 900.0


def _n_pending(quick: bool) -> int:
    return 200_000 if quick else 1_000_000


def _blocker(folder: str) -> int:
    """Say this worker started (``started-PID`` in *folder*), then hold it
    until *folder*/release exists, its parent changes or BLOCK_SECONDS pass."""
    pid, parent = os.getpid(), os.getppid()
    with open(os.path.join(folder, f"started-{pid}"), "w"):
        pass
    release = os.path.join(folder, "release")
    deadline = time.monotonic() + BLOCK_SECONDS
    while not os.path.exists(release) and os.getppid() == parent and time.monotonic() < deadline:
        time.sleep(0.005)
    return pid


def _occupy_workers(pool, folder: str) -> None:
    """Park a blocker on every worker of *pool*."""
    deadline = time.monotonic() + 120
    started = sent = 0
    while started < WORKERS:
        if time.monotonic() > deadline or sent > 4 * WORKERS:
            raise RuntimeError(f"only {started} of {WORKERS} workers took a blocking task")
        pool.apply_async(_blocker, (folder,))
        sent += 1
        # A blocker queued behind a busy worker does not start: after a
        # second, send another (a pool holds a limited number per worker).
        wait_until = time.monotonic() + 1.0
        while time.monotonic() < wait_until:
            now = sum(name.startswith("started-") for name in os.listdir(folder))
            if now > started:
                started = now
                break
            time.sleep(0.005)


def _tree_rss(root) -> int:
    """RSS of *root* (a psutil.Process) and of its descendants, in bytes."""
    import psutil

    total = 0
    for p in [root, *root.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:  # a process that ended meanwhile
            pass
    return total


def _pending_in_this_process(pool_name: str, quick: bool, folder: str) -> float:
    """Bytes of RSS per task queued behind blocked workers (see the module docstring)."""
    import psutil

    n = _n_pending(quick)
    me = psutil.Process()
    pool = globals()[pool_name]()
    try:
        _occupy_workers(pool, folder)
        gc.collect()
        before = _tree_rss(me)
        results = [pool.apply_async(_noop, (i,)) for i in range(n)]
        gc.collect()
        grown = _tree_rss(me) - before
        done = sum(r.ready() for r in results)
        if done:
            raise RuntimeError(f"{done} of the {n} tasks completed while every worker was blocked")
    finally:
        with open(os.path.join(folder, "release"), "w"):
            pass
        pool.terminate()
        pool.join()
    return grown / n


def _pending_bytes(pool_name: str, quick: bool) -> float:
    with tempfile.TemporaryDirectory(prefix="shoal-bench-") as folder:
        return in_fresh_interpreter(_pending_in_this_process, pool_name, quick, folder)


# -- imap_unordered of 5 ms tasks: efficiency ---------------------------------------


def _n_sleep(quick: bool) -> int:
    return 200 if quick else 400


def _efficiency(elapsed: float, n: int) -> float:
    return (n * 0.005 / WORKERS) / elapsed


def _imap_efficiency(make_pool, quick: bool) -> float:
    n = _n_sleep(quick)
    with make_pool() as pool:
        _warm(pool)
        t0 = time.perf_counter()
        for _ in pool.imap_unordered(_sleep5ms, range(n)):
            pass
        return _efficiency(time.perf_counter() - t0, n)


def _sleep_loop(n: int) -> None:
    for _ in range(n):
        time.sleep(0.005)


def _imap_ceiling(quick: bool) -> float:
    """Two bare processes doing the same sleeps with no pool at all: the most
    any pool can reach on this machine (sleep itself overshoots)."""
    n = _n_sleep(quick)
    procs = [multiprocessing.Process(target=_sleep_loop, args=(n // WORKERS,)) for _ in range(WORKERS)]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    return _efficiency(time.perf_counter() - t0, n)


def _imap_mpire(quick: bool) -> float:
    from mpire import WorkerPool

    return _imap_efficiency(lambda: WorkerPool(WORKERS), quick)


def _imap_loky(quick: bool) -> float:
    from concurrent.futures import as_completed

    from loky import ProcessPoolExecutor

    n = _n_sleep(quick)
    ex = ProcessPoolExecutor(WORKERS)
    ex.submit(_noop, 1).result()
    t0 = time.perf_counter()
    for _ in as_completed([ex.submit(_sleep5ms, i) for i in range(n)]):
        pass
    eff = _efficiency(time.perf_counter() - t0, n)
    ex.shutdown()
    return eff


# -- short tasks behind a long one: head-of-line blocking ------------------------------

HOL_LONG = 3.0
HOL_SHORT = 0.01
HOL_N = 60


def _sleep_for(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def _short_results_seconds(results, t0: float) -> float:
    """Seconds from *t0* until *results* (an iterator of the sleeps'
    durations, as they finish) has yielded every short one."""
    left = HOL_N
    for seconds in results:
        if seconds == HOL_SHORT:
            left -= 1
            if not left:
                break
    return time.perf_counter() - t0


def _hol_pool(make_pool) -> float:
    with make_pool() as pool:
        pool.apply(_noop, (1,))
        t0 = time.perf_counter()
        results = pool.imap_unordered(_sleep_for, [HOL_LONG] + [HOL_SHORT] * HOL_N, chunksize=1)
        return _short_results_seconds(results, t0)


def _hol_loky(quick: bool) -> float:
    from concurrent.futures import as_completed

    from loky import ProcessPoolExecutor

    ex = ProcessPoolExecutor(WORKERS)
    try:
        ex.submit(_noop, 1).result()
        t0 = time.perf_counter()
        futures = [ex.submit(_sleep_for, s) for s in [HOL_LONG] + [HOL_SHORT] * HOL_N]
        return _short_results_seconds((f.result() for f in as_completed(futures)), t0)
    finally:
        ex.shutdown(wait=False, kill_workers=True)


def _with_peers(runners: dict, peers: dict) -> dict:
    out = dict(runners)
    for name, fn in peers.items():
        if optional(name):
            out[name] = fn
    return out


SCENARIOS = [
    Scenario(
        "pool start + first result",
        "ms",
        False,
        _with_peers(
            {"stdlib": lambda q: _start_ms(_stdlib_pool), "shoal": lambda q: _start_ms(_shoal_pool)},
            {"loky": _start_loky, "mpire": _start_mpire},
        ),
        target=">= 0.67x (time <= 1.5x the standard library's)",
        repeat=5,
    ),
    Scenario(
        "Pool.map 200k trivial tasks",
        "tasks/s",
        True,
        _with_peers(
            {"stdlib": lambda q: _map_rate(_stdlib_pool), "shoal": lambda q: _map_rate(_shoal_pool)},
            {"loky": _map_loky, "mpire": _map_mpire, "joblib": _map_joblib},
        ),
        target=">= 1.0x",
    ),
    Scenario(
        "apply_async x20k trivial, then get all",
        "tasks/s",
        True,
        _with_peers(
            {"stdlib": lambda q: _apply_rate(_stdlib_pool), "shoal": lambda q: _apply_rate(_shoal_pool)},
            {"mpire": _apply_mpire, "joblib": _apply_joblib},
        ),
        target=">= 12x stdlib, >= 2x joblib",
    ),
    Scenario(
        "apply_async x20k, first thing on a new pool",
        "tasks/s",
        True,
        _with_peers(
            {
                "stdlib": lambda q: _apply_rate_cold(_stdlib_pool),
                "shoal": lambda q: _apply_rate_cold(_shoal_pool),
            },
            {"joblib": _apply_joblib},
        ),
        target=">= 12x stdlib, >= 2x joblib (joblib's figure is warm: its workers are reused)",
    ),
    Scenario(
        "memory per pending task, 1M apply_async",
        "bytes/task",
        False,
        {
            "stdlib": lambda q: _pending_bytes("_stdlib_pool", q),
            "shoal": lambda q: _pending_bytes("_shoal_pool", q),
        },
        target=">= 2x (bytes per task <= 0.5x the standard library's)",
        repeat=1,
    ),
    Scenario(
        "executor.submit x20k trivial, then result all",
        "tasks/s",
        True,
        _with_peers({"stdlib": _submit_stdlib_ppe, "shoal": _submit_shoal}, {"loky": _submit_loky}),
        target=">= 12x",
    ),
    Scenario(
        "imap_unordered 400 x 5 ms sleep",
        "efficiency",
        True,
        _with_peers(
            {
                "stdlib": lambda q: _imap_efficiency(_stdlib_pool, q),
                "shoal": lambda q: _imap_efficiency(_shoal_pool, q),
                "no pool": _imap_ceiling,
            },
            {"loky": _imap_loky, "mpire": _imap_mpire},
        ),
        target=">= 0.99x no pool (the same sleeps without a pool: this machine's ceiling)",
    ),
    Scenario(
        "60 x 10 ms behind one 3 s task",
        "s",
        False,
        _with_peers(
            {"stdlib": lambda q: _hol_pool(_stdlib_pool), "shoal": lambda q: _hol_pool(_shoal_pool)},
            {"loky": _hol_loky},
        ),
        target="time <= 1.2 (the short results must not wait for the long task)",
    ),
]
