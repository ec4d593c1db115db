"""Pools start, run and end without leaving anything behind, and never hang
at the edges of a program's life.

* When Python refuses to start a thread (``RuntimeError: can't create new
  thread at interpreter shutdown``, e.g. a pool first used from an atexit
  handler), submit / map raise at once (``BrokenProcessPool`` for the
  executor, as the standard library does) and shutdown / close + join return.
* After ``shutdown()`` / ``close()`` + ``join()`` no worker process and no
  shoal thread remains; a process that created many executors under every
  start method can still let ``multiprocessing`` clean up.
* Nothing of a task outlives it: not in the caller once the result is
  delivered, not in the worker once the result is sent.

Scripts that patch the interpreter or end it run in a child interpreter.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import threading
import weakref

import psutil
import pytest

import shoal
import workers

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def run_script(tmp_path, source: str, *args: str, timeout: float = 90) -> str:
    """Run *source* in a child interpreter; return its stdout (it must exit 0)."""
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(source))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS_DIR, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


def shoal_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("shoal")]


def worker_children() -> list[int]:
    from multiprocessing import forkserver, resource_tracker

    helpers = {
        getattr(forkserver._forkserver, "_forkserver_pid", None),
        getattr(resource_tracker._resource_tracker, "_pid", None),
    }
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.pid not in helpers and child.status() != psutil.STATUS_ZOMBIE:
                found.append(child.pid)
        except psutil.NoSuchProcess:
            pass
    return found


# -- no thread can be started ---------------------------------------------

_REFUSE_THREADS = """
import concurrent.futures, multiprocessing, sys, threading
import shoal, workers

def refuse(self):
    raise RuntimeError("can't create new thread at interpreter shutdown")

def attempt(label, fn):
    try:
        out = fn()
    except concurrent.futures.process.BrokenProcessPool as exc:
        print(label, "BrokenProcessPool", str(exc).replace("\\n", " "))
    except RuntimeError as exc:
        print(label, "RuntimeError", str(exc).replace("\\n", " "))
    else:
        print(label, "->", out)
"""


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_no_thread_at_all_fails_fast_and_shutdown_returns(tmp_path, method):
    # What happened: the executor's workers started, its scheduler thread
    # could not, and shutdown() then waited for that thread forever.
    out = run_script(
        tmp_path,
        _REFUSE_THREADS
        + """
if __name__ == "__main__":
    threading.Thread.start = refuse
    ex = shoal.ProcessPoolExecutor(2, mp_context=sys.argv[1])
    attempt("submit", lambda: ex.submit(workers.square, 3).result(timeout=30))
    attempt("map", lambda: list(ex.map(workers.square, [1, 2])))
    ex.shutdown()
    print("shutdown returned")
    attempt("Pool", lambda: shoal.Pool(2, context=sys.argv[1]))
    print("threads", [t.name for t in threading.enumerate()])
    print("children", multiprocessing.active_children())
""",
        method,
    )
    lines = out.splitlines()
    assert lines[0].startswith("submit BrokenProcessPool shoal could not start its scheduler thread")
    assert "interpreter is shutting down" in lines[0]
    assert lines[1].startswith("map BrokenProcessPool shoal could not start its scheduler thread")
    assert lines[2] == "shutdown returned"
    assert lines[3].startswith("Pool RuntimeError can't create new thread")
    assert lines[4:] == ["threads ['MainThread']", "children []"]


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_no_new_thread_after_start_fails_only_what_needs_one(tmp_path, method):
    # A map needs a thread to feed its input; calls and callbacks do not.
    out = run_script(
        tmp_path,
        _REFUSE_THREADS
        + """
if __name__ == "__main__":
    ex = shoal.ProcessPoolExecutor(2, mp_context=sys.argv[1])
    pool = shoal.Pool(2, context=sys.argv[1])
    print("warm", ex.submit(workers.square, 2).result(timeout=30), pool.apply(workers.square, (2,)))
    threading.Thread.start = refuse
    attempt("submit", lambda: ex.submit(workers.square, 3).result(timeout=30))
    attempt("map", lambda: list(ex.map(workers.square, [1, 2])))
    got = []
    attempt(
        "apply_async", lambda: pool.apply_async(workers.square, (4,), callback=got.append).get(timeout=30)
    )
    attempt("imap", lambda: list(pool.imap(workers.square, [1, 2])))
    attempt("pool.map", lambda: pool.map(workers.square, [1, 2]))
    pool.close()
    pool.join()
    ex.shutdown()
    print("callback got", got)
    print("threads", [t.name for t in threading.enumerate()])
    print("children", multiprocessing.active_children())
""",
        method,
    )
    lines = out.splitlines()
    assert lines[0] == "warm 4 4"
    assert lines[1] == "submit -> 9"
    assert lines[2].startswith(
        "map BrokenProcessPool shoal could not start the thread that feeds this map's input"
    )
    assert lines[3] == "apply_async -> 16"
    assert lines[4].startswith(
        "imap BrokenProcessPool shoal could not start the thread that feeds"
    )  # a RuntimeError
    assert lines[5] == "pool.map -> [1, 4]"
    assert lines[6:] == ["callback got [16]", "threads ['MainThread']", "children []"]


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_pool_first_used_from_an_atexit_handler(tmp_path, method):
    # Python 3.12 refuses fork and new threads while atexit handlers run;
    # 3.11 and 3.13 allow them.  Either the work runs or the executor says
    # it is broken; the program always ends.
    out = run_script(
        tmp_path,
        """
import atexit, concurrent.futures, sys
import shoal, workers

def late():
    ex = shoal.ProcessPoolExecutor(2, mp_context=sys.argv[1])
    try:
        print("submit", ex.submit(workers.square, 3).result(timeout=30))
    except concurrent.futures.process.BrokenProcessPool as exc:
        print("submit broken:", exc)
    ex.shutdown()
    print("shutdown returned")

atexit.register(late)
""",
        method,
    )
    first, second = out.splitlines()
    assert first == "submit 9" or first.startswith("submit broken: shoal could not start")
    assert second == "shutdown returned"


# -- nothing left after shutdown -------------------------------------------


def test_shutdown_leaves_no_worker_and_no_shoal_thread(start_method):
    ex = shoal.ProcessPoolExecutor(2, mp_context=start_method)
    futures = [ex.submit(workers.square, i) for i in range(10)]
    futures += [ex.submit(workers.raise_value_error, 1), ex.submit(workers.kill_self)]
    futures[0].add_done_callback(lambda f: None)  # starts the callback thread
    assert list(ex.map(workers.square, range(50), chunksize=3)) == [i * i for i in range(50)]
    for f in futures:
        f.exception(timeout=30)
    assert ex._processes  # the workers are there until shutdown
    ex.shutdown()
    assert shoal_threads() == []
    assert worker_children() == []

    pool = shoal.Pool(2, context=start_method)
    pool.apply_async(workers.square, (3,), callback=lambda v: None)
    assert list(pool.imap_unordered(workers.square, range(20))) != []
    pool.close()
    pool.join()
    assert shoal_threads() == []
    assert worker_children() == []


def test_fork_workers_do_not_keep_the_forkserver_alive(tmp_path):
    # What happened: workers started by fork inherited the forkserver's
    # "alive" pipe, so while one lived, stopping the forkserver (as
    # multiprocessing.util._cleanup_tests() does) waited forever.
    out = run_script(
        tmp_path,
        """
import os
import shoal, workers
from multiprocessing import forkserver

if __name__ == "__main__":
    with shoal.Pool(1, context="forkserver") as pool:
        pool.apply(workers.square, (1,))
    alive = os.readlink(f"/proc/self/fd/{forkserver._forkserver._forkserver_alive_fd}")
    pool = shoal.Pool(2, context="fork")
    pids = pool.map(workers.getpid, range(20), chunksize=1)
    held = [pid for pid in set(pids) for fd in os.listdir(f"/proc/{pid}/fd")
            if os.readlink(f"/proc/{pid}/fd/{fd}") == alive]
    print("workers holding the forkserver's pipe:", held)
    forkserver._forkserver._stop()  # while the fork pool runs
    print("stopped;", pool.apply(workers.square, (4,)))
    pool.close()
    pool.join()
""",
    )
    assert out.splitlines() == ["workers holding the forkserver's pipe: []", "stopped; 16"]


def test_fork_workers_keep_what_the_program_gave_them(tmp_path):
    # Only the pools' own descriptors and the forkserver's pipe are closed:
    # a file (a logging handler, a queue) opened before the pool still works
    # in workers started by fork, as with the standard library.
    path = tmp_path / "inherited.log"
    with open(path, "a") as f:
        workers._state["inherited_file"] = f
        try:
            with shoal.Pool(2, context="fork") as pool:
                assert len(pool.map(workers.write_inherited, ["a", "b", "c"], chunksize=1)) == 3
        finally:
            del workers._state["inherited_file"]
    assert sorted(path.read_text().split()) == ["a", "b", "c"]


@pytest.mark.slow  # several seconds: the whole suite runs it, the quick subset does not
def test_cleanup_after_many_executors_ends(tmp_path):
    # Executors under every start method, some shut down, some dropped, some
    # whose tasks failed in every way; then multiprocessing cleans up.  What
    # happened: the callback thread held the last future it had handled, whose
    # exception's traceback held a dropped executor, whose workers kept the
    # forkserver alive, so stopping the forkserver waited forever.
    out = run_script(
        tmp_path,
        """
import gc, multiprocessing, multiprocessing.util, threading
import shoal, workers

def use(method, how):
    ex = shoal.ProcessPoolExecutor(2, mp_context=method)
    errors = []
    for fn in (workers.square, workers.kill_self, workers.return_lock, workers.raise_error_holding_lock,
               workers.raise_value_error):
        try:
            ex.submit(fn, 1).result(timeout=60)  # the traceback refers to this frame, so to `ex`
            errors.append(None)
        except Exception as exc:
            errors.append(type(exc).__name__)
    try:
        ex.submit(workers.identity, workers.Unpicklable())
    except TypeError:
        pass
    if how == "shutdown":
        ex.shutdown()
    elif how == "nowait":
        ex.shutdown(wait=False)
    return errors

if __name__ == "__main__":
    for method in ("fork", "spawn", "forkserver"):
        for how in ("shutdown", "nowait", "drop"):
            errors = use(method, how)
            gc.collect()
    print(errors)
    multiprocessing.util._cleanup_tests()
    print("cleaned up")
""",
        timeout=110,
    )
    assert out.splitlines() == [
        "[None, 'WorkerDiedError', 'SerializationError', 'SerializationError', 'ValueError']",
        "cleaned up",
    ]


# -- nothing kept alive after a task ------------------------------------------


def test_caller_keeps_nothing_of_a_finished_task(start_method):
    def refs(*objs):
        return [weakref.ref(o) for o in objs]

    with shoal.ProcessPoolExecutor(1, mp_context=start_method) as ex:
        arg, fn, callback = workers.Payload(b"x"), (lambda x: x.data), (lambda f: None)
        watched = refs(arg, fn, callback)
        future = ex.submit(fn, arg)
        future.add_done_callback(callback)
        assert future.result(timeout=30) == b"x"
        del arg, fn, callback
        # Callbacks run in order on one thread: once the next one has run,
        # that thread has let go of the first.
        later = threading.Event()
        ex.submit(workers.square, 1).add_done_callback(lambda f: later.set())
        assert later.wait(timeout=30)
        gc.collect()
        assert [r() for r in watched] == [None, None, None]

    with shoal.Pool(1, context=start_method) as pool:
        arg, fn, callback = workers.Payload(b"y"), (lambda x: x.data), (lambda v: None)
        watched = refs(arg, fn, callback)
        result = pool.apply_async(fn, (arg,), callback=callback)
        assert result.get(timeout=30) == b"y"
        items = [workers.Payload(b"z")]
        watched += refs(items[0])
        assert [p.data for p in pool.map(workers.identity, items)] == [b"z"]
        del arg, fn, callback, items
        pool.apply_async(workers.square, (1,), callback=lambda v: None).get(timeout=30)
        gc.collect()
        assert [r() for r in watched] == [None, None, None, None]
        assert result.get() == b"y"  # the result object keeps only the result


def test_worker_frees_a_task_right_after_it(fork_or_spawn, tmp_path):
    # What happened: a worker kept the last task's function, arguments and
    # result until its next task or its exit, so their memory and open
    # resources lingered in every worker.
    log = str(tmp_path / "freed.log")
    with shoal.ProcessPoolExecutor(1, mp_context=fork_or_spawn) as ex:
        pid = ex.submit(workers.getpid).result(timeout=30)
        fn, arg = workers.SignalsOnDelete(log, "fn"), workers.SignalsOnDelete(log, "arg")
        assert ex.submit(fn, arg).result(timeout=30) == 1
        result = ex.submit(workers.make_signalling, log, "result").result(timeout=30)
        # Both results are in: the worker freed its copies before sending them.
        assert sorted(workers.read_lines(log)) == [f"arg:{pid}", f"fn:{pid}", f"result:{pid}"]
        del fn, arg, result
        assert sorted(workers.read_lines(log)) == sorted(
            [
                f"arg:{pid}",
                f"fn:{pid}",
                f"result:{pid}",
                f"arg:{os.getpid()}",
                f"fn:{os.getpid()}",
                f"result:{os.getpid()}",
            ]
        )

    with shoal.Pool(1, context=fork_or_spawn) as pool:
        pid = pool.apply(workers.getpid)
        open(log, "w").close()
        assert pool.map(len, [[workers.SignalsOnDelete(log, "item")]]) == [1]
        assert workers.read_lines(log) == [f"item:{pid}", f"item:{os.getpid()}"]
