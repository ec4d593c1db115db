"""A starved machine: when descriptors, processes or memory run out, shoal
raises an error that says what ran out and what to do, never hangs, and
leaves nothing behind; once something is freed the program goes on.

Each case runs in a fresh interpreter (a script of its own), so that the
limits it sets never reach pytest: the script prints what each step gave
and checks itself that no descriptor or child process is left; the test
asserts on what it printed.  The table in ``docs/security.md`` ("A starved
machine") lists every case and its error.

Limits used: ``RLIMIT_NOFILE`` (any user), ``RLIMIT_NPROC`` (an unprivileged
uid: the kernel does not apply it to root), a *pids* cgroup (what a container
limits; it applies to root too, so it stands in for ``RLIMIT_NPROC`` under
spawn, whose interpreter an unprivileged uid cannot execute here), a
*memory* cgroup, ``SHOAL_FAULT`` (``shoal._fd._limits``: memfd creation
failing with ENOMEM, ENOSPC or EMFILE) and a full private tmpfs on
``/dev/shm``.  Cases that need root or a cgroup hierarchy skip, saying why,
where they are missing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from helpers import kill_group

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (another uid, cgroups, mounts)")

#: A uid no other program here uses, so that RLIMIT_NPROC counts only this test's processes.
UNPRIVILEGED_UID = 54321

#: What every script starts with: a watchdog (a hang ends the script with
#: its stack), the functions its pools run, and ``leftovers()``, the check
#: that nothing it made is left.
PROLOGUE = '''
import faulthandler, gc, os, resource, signal, sys, time
faulthandler.dump_traceback_later(int(os.environ.get('WATCHDOG', 80)), exit=True)
import psutil
import shoal

def sq(x):
    return x * x

def slow(x):
    time.sleep(0.02)
    return x

def report_pid_and_sleep(path):
    with open(path + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(path + ".tmp", path)
    time.sleep(60)

def kill_the_worker_running(pool, path):
    """Kill the worker that runs report_pid_and_sleep(path); its result."""
    victim = pool.apply_async(report_pid_and_sleep, (path,))
    deadline = time.monotonic() + 30
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    with open(path) as f:
        os.kill(int(f.read()), signal.SIGKILL)
    return victim

class Counter:
    def __init__(self):
        self.n = 0
    def incr(self):
        self.n += 1
        return self.n

def fds():
    return set(os.listdir("/proc/self/fd"))

def children():
    kids = []
    for k in psutil.Process().children(recursive=True):
        try:
            line = " ".join(k.cmdline())
            helper = "resource_tracker" in line or "forkserver" in line
            if k.status() != psutil.STATUS_ZOMBIE and not helper:
                kids.append(k.pid)
        except psutil.Error:
            pass
    return kids

def helper_fds():
    """The descriptors of the helpers multiprocessing keeps for the whole program."""
    from multiprocessing import forkserver, resource_tracker
    kept = (forkserver._forkserver._forkserver_alive_fd, resource_tracker._resource_tracker._fd)
    return {str(fd) for fd in kept if fd is not None}

def leftovers(base):
    """Wait (bounded) for what shoal made to be gone; what is still there."""
    deadline = time.monotonic() + 10
    while True:
        gc.collect()
        left = (sorted(fds() - base - helper_fds()), children())
        if left == ([], []) or time.monotonic() > deadline:
            return left
        time.sleep(0.05)

def outcome(fn):
    try:
        fn()
        return "ok"
    except Exception as exc:
        text = f"{type(exc).__name__}: {exc}"
        cause = exc.__cause__
        if cause is not None and str(cause) not in text:
            text += f" [cause: {type(cause).__name__}: {cause}]"
        return text.replace("\\n", " ")

def use(kind, method):
    """Make one object of *kind*, use it, close it."""
    ctx = shoal.get_context(method)
    if kind == "Pool":
        with ctx.Pool(2) as p:
            assert p.map(sq, range(20)) == [x * x for x in range(20)]
            assert [r.get(30) for r in [p.apply_async(sq, (i,)) for i in range(5)]] == [0, 1, 4, 9, 16]
            assert sorted(p.imap_unordered(sq, range(10))) == [x * x for x in range(10)]
    elif kind == "ProcessPoolExecutor":
        with shoal.ProcessPoolExecutor(2, mp_context=ctx) as e:
            assert list(e.map(sq, range(20))) == [x * x for x in range(20)]
    elif kind == "Queue":
        import numpy as np
        q = ctx.Queue()
        try:
            q.put([1, 2])
            q.put(np.arange(200_000))  # large: travels in a memfd of its own
            assert q.get(timeout=10) == [1, 2] and int(q.get(timeout=10).sum()) == 19999900000
        finally:
            q.close()
            q.join_thread()
    elif kind == "Pipe":
        a, b = shoal.Pipe()
        with a, b:
            a.send(b"x" * 1_000_000)
            assert len(b.recv()) == 1_000_000
    elif kind == "SharedArray":
        import numpy as np
        arr = shoal.SharedArray((1000,))
        arr[:] = 1
        copy = shoal.SharedArray.from_array(np.ones(1000))
        assert float(arr.sum() + copy.sum()) == 2000.0
        del arr, copy
    elif kind == "SharedDict":
        d = shoal.SharedDict()
        d["x"] = list(range(1000))
        d.incr("n")
        assert d["n"] == 1
        d.close()
    elif kind == "Actor":
        a = ctx.Actor(Counter)
        try:
            assert a.incr() == 1
        finally:
            a.close()
    else:
        raise ValueError(kind)

KINDS = ["Pool", "ProcessPoolExecutor", "Queue", "Pipe", "SharedArray", "SharedDict", "Actor"]
'''


def run_script(
    tmp_path: Path, body: str, *args: str, env: dict | None = None, timeout: float = 100, prefix=()
) -> list[str]:
    """Run PROLOGUE and *body* (as the body of ``main()``, which the script runs
    under ``if __name__ == '__main__'``) as ``[*prefix] python script.py
    *args`` in a fresh interpreter (its own session, killed whole if it
    outlives *timeout*); its stdout lines.  It must exit 0."""
    script = tmp_path / "script.py"
    main = "def main():\n" + textwrap.indent(textwrap.dedent(body), "    ")
    script.write_text(f"{PROLOGUE}\n{main}\n\nif __name__ == '__main__':\n    main()\n", encoding="utf-8")
    proc = subprocess.Popen(
        [*prefix, sys.executable, str(script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        encoding="utf-8",
        env={**os.environ, **(env or {})},
        cwd=tmp_path,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        pytest.fail(f"the script hung (killed after {timeout} s)\nstdout:\n{out}\nstderr:\n{err}")
    finally:
        kill_group(proc)
    assert proc.returncode == 0, f"rc={proc.returncode}\nstdout:\n{out}\nstderr:\n{err[-6000:]}"
    return out.splitlines()


def results(lines: list[str]) -> dict[str, str]:
    """The script's ``name: outcome`` lines (each name once)."""
    out = {}
    for line in lines:
        name, sep, rest = line.partition(" => ")
        if sep:
            out[name] = rest
    return out


# -- RLIMIT_NOFILE --------------------------------------------------------------------------------

TOO_MANY_FILES = ("too many open files", "RLIMIT_NOFILE", "ulimit -n")
#: How many descriptors are left free under the limit, in turn.
FREE = (0, 2, 4, 6, 9, 12, 16, 24)


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_each_kind_at_every_distance_from_the_descriptor_limit(tmp_path, fork_or_spawn):
    # RLIMIT_NOFILE at 64, and every descriptor but 0, 2, 4, ... 22 taken:
    # each kind of object either works or says that descriptors ran out
    # (before this, a bare "[Errno 24] Too many open files", a MemoryError
    # for a SharedArray, and a pool whose start failed part-way leaked its
    # status memfd, its wake-up pipe and the standard library's fork pipes).
    # Nothing is left behind either way, and once the descriptors are
    # freed each kind works again.
    lines = run_script(
        tmp_path,
        """
        method = sys.argv[1]
        FREE = (0, 2, 4, 6, 9, 12, 16, 24)
        for kind in KINDS:  # first use: imports and caches that live for the whole program
            use(kind, method)
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        base = fds()
        for kind in KINDS:
            for free in FREE:
                hog = []
                try:
                    while True:
                        hog.append(os.open("/dev/null", os.O_RDONLY))
                except OSError:
                    pass
                for fd in hog[len(hog) - free:]:
                    os.close(fd)
                del hog[len(hog) - free:]
                result = outcome(lambda: use(kind, method))
                for fd in hog:
                    os.close(fd)
                print(f"{kind} {free} => {result}", flush=True)
                print(f"{kind} {free} left => {leftovers(base)}", flush=True)
            print(f"{kind} after => {outcome(lambda: use(kind, method))}", flush=True)
        """,
        fork_or_spawn,
        env={"WATCHDOG": "160"},
        timeout=170,
    )
    got = results(lines)
    for kind in ("Pool", "ProcessPoolExecutor", "Queue", "Pipe", "SharedArray", "SharedDict", "Actor"):
        outcomes = [got[f"{kind} {free}"] for free in FREE]
        assert outcomes[-1] == "ok", (kind, outcomes)  # 24 free descriptors are enough for each
        assert outcomes[0] != "ok", (kind, outcomes)  # and none is not
        for free, text in zip(FREE, outcomes, strict=True):
            if text != "ok":
                assert text.startswith(("OSError", "WorkerStartError")), (kind, free, text)
                assert all(word in text for word in TOO_MANY_FILES), (kind, free, text)
            assert got[f"{kind} {free} left"] == "([], [])", (kind, free, got[f"{kind} {free} left"])
        assert got[f"{kind} after"] == "ok"


@pytest.mark.slow
def test_holding_pools_queues_arrays_and_actors_until_descriptors_run_out(tmp_path, fork_or_spawn):
    # A program that keeps making pools, executors, queues, arrays and
    # actors under RLIMIT_NOFILE=64: those that fit work; the first that
    # does not says so; closing the others lets the program go on.
    lines = run_script(
        tmp_path,
        """
        method = sys.argv[1]
        ctx = shoal.get_context(method)
        import numpy as np
        np.ones(3)
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        base = fds()
        held = []
        error = None
        try:
            for n in range(100):
                kind = n % 5
                if kind == 0:
                    p = ctx.Pool(2)
                    held.append(p)
                    assert p.map(sq, range(10)) == [x * x for x in range(10)]
                elif kind == 1:
                    e = shoal.ProcessPoolExecutor(2, mp_context=ctx)
                    held.append(e)
                    assert list(e.map(sq, range(10))) == [x * x for x in range(10)]
                elif kind == 2:
                    q = ctx.Queue()
                    held.append(q)
                    q.put(n)
                    assert q.get(timeout=10) == n
                elif kind == 3:
                    held.append(shoal.SharedArray.from_array(np.full(100, n)))
                else:
                    a = ctx.Actor(Counter)
                    held.append(a)
                    assert a.incr() == 1
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        print(f"held => {len(held)}")
        print(f"error => {error}")
        for h in held:
            if isinstance(h, shoal.ProcessPoolExecutor):
                h.shutdown()
            elif isinstance(h, shoal.Actor):
                h.close()
            elif hasattr(h, "terminate"):
                h.terminate()
                h.join()
            elif hasattr(h, "join_thread"):
                h.close()
                h.join_thread()
        held.clear()
        print(f"left => {leftovers(base)}")
        print(f"after => {outcome(lambda: [use(kind, method) for kind in KINDS])}")
        """,
        fork_or_spawn,
    )
    got = results(lines)
    assert int(got["held"]) >= 3, got  # some fit
    assert all(word in got["error"] for word in TOO_MANY_FILES), got  # the first that did not says why
    assert got["left"] == "([], [])"
    assert got["after"] == "ok"


# -- fork refused: a pids cgroup, RLIMIT_NPROC ------------------------------------------------------


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


@contextlib.contextmanager
def pids_cgroup(name: str):
    """A new cgroup of the (v1 or v2) pids controller, removed at the end
    once its processes are gone; skips the test where there is none."""
    v1, v2 = Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup")
    if (v1 / "cgroup.procs").exists():
        root = v1
    elif "pids" in _read(v2 / "cgroup.subtree_control"):
        root = v2
    else:
        pytest.skip("no pids cgroup controller here")
    group = root / f"shoal-test-{name}-{os.getpid()}"
    try:
        group.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot create a pids cgroup here: {exc}")
    try:
        yield group
    finally:
        deadline = time.monotonic() + 30
        while True:
            try:
                group.rmdir()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


FORK_FAILED = ("fork failed", "EAGAIN", "RLIMIT_NPROC", "pids cgroup")


@needs_root
def test_fork_refused_when_a_pool_an_executor_or_an_actor_starts(tmp_path, fork_or_spawn):
    # A pids cgroup that allows no new process (nor thread): each start says
    # that the fork failed and why, at construction (Pool, Actor) or first
    # use (the executor, as concurrent.futures does); nothing is left; with
    # the limit lifted the same program starts them.
    with pids_cgroup("start") as group:
        lines = run_script(
            tmp_path,
            """
            method, group = sys.argv[1], sys.argv[2]
            ctx = shoal.get_context(method)
            for kind in KINDS:
                use(kind, method)
            base = fds()
            with open(f"{group}/cgroup.procs", "w") as f:
                f.write(str(os.getpid()))
            with open(f"{group}/pids.max", "w") as f:
                f.write("1")
            print(f"Pool => {outcome(lambda: ctx.Pool(2))}", flush=True)
            def executor():
                with shoal.ProcessPoolExecutor(2, mp_context=ctx) as e:
                    e.submit(sq, 2).result(30)
            print(f"ProcessPoolExecutor => {outcome(executor)}", flush=True)
            print(f"Actor => {outcome(lambda: ctx.Actor(Counter))}", flush=True)
            print(f"left => {leftovers(base)}", flush=True)
            with open(f"{group}/pids.max", "w") as f:
                f.write("max")
            print(f"after => {outcome(lambda: [use(kind, method) for kind in KINDS])}", flush=True)
            """,
            fork_or_spawn,
            str(group),
        )
    got = results(lines)
    assert got["Pool"].startswith("BlockingIOError"), got
    assert got["ProcessPoolExecutor"].startswith("WorkerStartError"), got
    assert got["Actor"].startswith("BlockingIOError"), got
    for kind in ("Pool", "ProcessPoolExecutor", "Actor"):
        assert all(word in got[kind] for word in FORK_FAILED), (kind, got[kind])
    assert got["left"] == "([], [])"
    assert got["after"] == "ok"


#: The script's part for replacement workers refused: *how* is "maxtasks"
#: (each worker retires after one task) or "kill" (one worker is SIGKILLed);
#: the limit is set by ``refuse()`` and lifted by ``allow()``, defined by
#: the caller.
REPLACEMENT = """
ctx = shoal.get_context(method)
base = fds()
with ctx.Pool(2, maxtasksperchild=1 if how == "maxtasks" else None) as pool:
    pool.apply_async(sq, (1,), callback=print).get(30)  # every thread the pool will need is running
    refuse()
    if how == "kill":
        path = f"/tmp/shoal-test-victim-{os.getpid()}"  # where any uid may write
        victim = kill_the_worker_running(pool, path)
        print(f"victim => {outcome(lambda: victim.get(60))}")
        os.unlink(path)
    results = [pool.apply_async(slow, (i,)) for i in range(40)]
    outcomes = []
    for r in results:
        try:
            outcomes.append(r.get(60))
        except Exception as exc:
            outcomes.append(f"{type(exc).__name__}: {exc}")
    print(f"values => {sum(1 for o in outcomes if isinstance(o, int))}")
    print(f"errors => {sorted(set(o.split(':')[0] for o in outcomes if isinstance(o, str)))}")
    print(f"error => {next((o for o in outcomes if isinstance(o, str) and 'WorkerStartError' in o), None)}")
    print(f"right => {all(o == i for i, o in enumerate(outcomes) if isinstance(o, int))}")
    allow()
    print(f"after => {outcome(lambda: pool.map(sq, range(5)))}")
    if how == "kill":  # once the limit is lifted, a killed worker is replaced, and its error says so
        victim = kill_the_worker_running(pool, path)
        print(f"after victim => {outcome(lambda: victim.get(60))}")
        os.unlink(path)
print(f"left => {leftovers(base)}")
print(f"new pool => {outcome(lambda: use('Pool', method))}")
"""


def _check_replacement(got: dict[str, str], how: str) -> None:
    if how == "kill":
        # The killed worker's task fails; the pool goes on with the other
        # worker, and gets its second back once the limit is lifted.
        assert got["victim"].startswith("WorkerDiedError") and "SIGKILL" in got["victim"], got
        # and says that it was not replaced, why, and what to do (it said
        # "The worker was replaced" here).
        assert "was replaced" not in got["victim"], got
        for words in (
            "was not replaced",
            "refused a new process",
            "RLIMIT_NPROC",
            "pids cgroup",
            "Raise the limit",
        ):
            assert words in got["victim"], (words, got["victim"])
        assert "The worker was replaced and the pool goes on" in got["after victim"], got
        assert got["errors"] == "[]", got
        assert int(got["values"]) == 40, got
        assert got["after"] == "ok", got
    else:
        # Every worker retires and none can be replaced: what is queued
        # fails, saying why (a worker whose retirement was being replaced as
        # the limit came may not have been replaced).
        assert got["errors"] == "['WorkerStartError']", got
        assert 1 <= int(got["values"]) <= 2, got
        assert all(word in got["error"] for word in (*FORK_FAILED, "none is left")), got
        assert "WorkerStartError" in got["after"] and "fork failed" in got["after"], got
    assert got["right"] == "True"
    assert got["left"] == "([], [])"
    assert got["new pool"] == "ok"


@needs_root
@pytest.mark.parametrize("how", ["maxtasks", "kill"])
def test_rlimit_nproc_reached_when_workers_are_replaced(tmp_path, how):
    # The program runs as an unprivileged uid (RLIMIT_NPROC does not apply to
    # root), under fork (that uid cannot execute this interpreter, which
    # lives under /root): a refused replacement worker used to break the
    # whole pool for good.
    body = f"""
        import multiprocessing.connection, multiprocessing.forkserver, multiprocessing.popen_fork
        import numpy
        os.setgroups([])
        os.setgid({UNPRIVILEGED_UID})
        os.setuid({UNPRIVILEGED_UID})
        method, how = "fork", sys.argv[1]
        hard = resource.getrlimit(resource.RLIMIT_NPROC)[1]
        def refuse():
            resource.setrlimit(resource.RLIMIT_NPROC, (1, hard))
        def allow():
            resource.setrlimit(resource.RLIMIT_NPROC, (hard, hard))
    """
    got = results(run_script(tmp_path, textwrap.dedent(body) + REPLACEMENT, how))
    _check_replacement(got, how)
    if how == "maxtasks":
        assert "RLIMIT_NPROC (1," in got["error"], got


@needs_root
@pytest.mark.parametrize("how", ["maxtasks", "kill"])
def test_pids_cgroup_full_when_workers_are_replaced(tmp_path, fork_or_spawn, how):
    # The same with a pids cgroup (a container's limit; it applies to root).
    body = """
        method, how, group = sys.argv[1], sys.argv[2], sys.argv[3]
        with open(f"{group}/cgroup.procs", "w") as f:
            f.write(str(os.getpid()))
        def refuse():
            with open(f"{group}/pids.max", "w") as f:
                f.write("1")
        def allow():
            with open(f"{group}/pids.max", "w") as f:
                f.write("max")
    """
    with pids_cgroup("replace") as group:
        lines = run_script(tmp_path, textwrap.dedent(body) + REPLACEMENT, fork_or_spawn, how, str(group))
    _check_replacement(results(lines), how)


# -- shared memory refused ---------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["memfd:ENOMEM", "ftruncate:ENOMEM", "ftruncate:ENOSPC", "memfd:EMFILE"])
def test_shared_memory_refused(tmp_path, fault):
    # SHOAL_FAULT makes memfd_create or ftruncate fail as they do when memory
    # (or descriptors) run out: each object that needs new shared memory
    # says how much it asked for and what to do; one that exists goes on
    # working; nothing is left; with memory back, everything works.
    lines = run_script(
        tmp_path,
        """
        import numpy as np
        from shoal._fd import FAULTS
        faults = dict(FAULTS)
        FAULTS.clear()
        for kind in KINDS:
            use(kind, "fork")
        pool = shoal.Pool(2)
        d = shoal.SharedDict()
        base = fds()
        FAULTS.update(faults)
        print(f"SharedArray => {outcome(lambda: shoal.SharedArray((1000,)))}")
        print(f"share => {outcome(lambda: shoal.SharedArray.from_array(np.ones(1000)))}")
        print(f"SharedDict => {outcome(shoal.SharedDict)}")
        print(f"Queue => {outcome(shoal.Queue)}")
        print(f"Pool => {outcome(lambda: shoal.Pool(2))}")
        big = np.ones(1_000_000)  # a large argument travels in shared memory
        print(f"large argument => {outcome(lambda: pool.apply(np.sum, (big,)))}")
        print(f"existing pool => {outcome(lambda: pool.map(sq, range(10)))}")
        d["k"] = "v" * 10  # fits in the memory it has
        print(f"existing dict => {d['k']}")
        FAULTS.clear()
        print(f"large argument after => {outcome(lambda: pool.apply(np.sum, (big,)))}")
        pool.close()
        pool.join()
        d.close()
        print(f"left => {leftovers(base)}")
        print(f"after => {outcome(lambda: [use(kind, 'fork') for kind in KINDS])}")
        """,
        env={"SHOAL_FAULT": fault},
    )
    got = results(lines)
    call, _, code = fault.partition(":")
    if code == "EMFILE":
        expect_type, words = "OSError", TOO_MANY_FILES
    else:
        expect_type, words = "OSError", ("out of memory", "bytes of shared memory", "Free memory")
    for name in ("SharedArray", "share"):
        text = got[name]
        if code == "EMFILE":
            assert text.startswith("OSError"), got
        else:
            assert text.startswith("MemoryError"), got  # as numpy's own allocations
            assert "8000 bytes" in text, got
        assert all(word in text for word in words), (name, text)
    for name in ("SharedDict", "Queue", "Pool", "large argument"):
        text = got[name]
        if name == "SharedDict" and call == "ftruncate":
            continue  # a new SharedDict is 0 bytes: it grows by posix_fallocate, not covered by SHOAL_FAULT
        assert text.startswith((expect_type, "MemoryError", "SerializationError")), (name, text)
        assert all(word in text for word in words), (name, text)
    assert got["existing pool"] == "ok"
    assert got["existing dict"] == "v" * 10
    assert got["left"] == "([], [])"
    assert got["large argument after"] == "ok"
    assert got["after"] == "ok"


def _memory_cgroup() -> Path | None:
    """The memory cgroup this process is in (v1), where a child group can be made."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _id, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            where = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            if (where / "memory.limit_in_bytes").exists():
                return where
    return None


@needs_root
def test_a_real_memory_cgroup(tmp_path):
    # The program in a 256 MiB memory cgroup.  The kernel does not refuse
    # memory there, it kills (the OOM killer picks the biggest process): a
    # pool task that fills more shared memory than the limit allows kills
    # its own worker, and the task fails with WorkerDiedError naming the OOM
    # killer; the pool, the program and the other tasks go on, and the
    # memory the dead worker held is freed with it.
    parent = _memory_cgroup()
    if parent is None:
        pytest.skip("no cgroup v1 memory controller for this process")
    group = parent / f"shoal-test-memory-{os.getpid()}"
    try:
        group.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot create a memory cgroup here: {exc}")
    try:
        (group / "memory.limit_in_bytes").write_text(str(256 << 20))
        lines = run_script(
            tmp_path,
            """
            group = sys.argv[1]
            with open(f"{group}/cgroup.procs", "w") as f:
                f.write(str(os.getpid()))
            import numpy as np

            def fill(n):
                a = shoal.SharedArray((n,), dtype=np.uint8)
                a[:] = 1
                return int(a[::4096].sum())

            base = fds()
            with shoal.Pool(2) as pool:
                small = pool.apply_async(fill, (1 << 20,))
                big = pool.apply_async(fill, (1 << 30,))
                print(f"big => {outcome(lambda: big.get(60))}")
                print(f"small => {small.get(60)}")
                print(f"after => {pool.map(fill, [1 << 20] * 4)}")
            print(f"left => {leftovers(base)}")
            with open(f"{group}/memory.usage_in_bytes") as f:
                print(f"usage => {int(f.read())}")
            """,
            str(group),
        )
    finally:
        deadline = time.monotonic() + 30
        while True:
            try:
                group.rmdir()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    got = results(lines)
    assert got["big"].startswith("WorkerDiedError") and "OOM killer" in got["big"], got
    assert got["small"] == str(256)
    assert got["after"] == str([256] * 4)
    assert got["left"] == "([], [])"
    assert int(got["usage"]) < 200 << 20, got  # the dead worker's shared memory is gone


# -- /dev/shm full -----------------------------------------------------------------------------------


def _private_dev_shm(size: str) -> tuple[str, ...]:
    """A command prefix: run in a mount namespace of its own with a fresh
    tmpfs of *size* on /dev/shm (the machine's is not touched)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("no unshare command")
    mount = f'mount -t tmpfs -o size={size},mode=1777 tmpfs /dev/shm && exec "$@"'
    return (unshare, "--mount", "--propagation", "private", "sh", "-c", mount, "sh")


@needs_root
def test_dev_shm_full(tmp_path, fork_or_spawn):
    # A private 1 MiB tmpfs on /dev/shm, filled.  shoal's own objects never
    # use /dev/shm (memfds have no name): each works.  What the standard
    # library keeps there (the semaphores behind shoal.Lock, Semaphore,
    # Event..., which shoal re-exports) fails at once with ENOSPC, saying so;
    # nothing hangs.
    lines = run_script(
        tmp_path,
        """
        fd = os.open("/dev/shm/filler", os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"x" * 4096)
        except OSError as exc:
            print(f"filled => {exc.errno}")
        os.close(fd)
        method = sys.argv[1]
        base = fds()
        print(f"shoal => {outcome(lambda: [use(kind, method) for kind in KINDS])}")
        print(f"Lock => {outcome(lambda: shoal.get_context(method).Lock())}")
        print(f"left => {leftovers(base)}")
        print(f"entries => {sorted(os.listdir('/dev/shm'))}")
        """,
        fork_or_spawn,
        prefix=_private_dev_shm("1m"),
    )
    got = results(lines)
    assert got["filled"] == "28"  # ENOSPC: /dev/shm is full
    assert got["shoal"] == "ok"
    assert got["Lock"].startswith("OSError") and "No space left on device" in got["Lock"], got
    assert got["left"] == "([], [])"
    assert got["entries"] == "['filler']"
