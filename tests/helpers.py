"""Plain helper functions shared by the test files (fixtures live in
conftest.py; functions that run as a child's target live in workers.py or
next to their test).  Every wait here has a bound: a regression fails a test
instead of hanging the session."""

from __future__ import annotations

import ast
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

# -- running Python in a fresh interpreter ----------------------------------------


def run_python(
    *args: str, cwd=None, env: dict | None = None, input: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``python *args`` (a script and its arguments, ``-c code`` or
    ``-m module``) with its output captured as UTF-8 text.  *env* adds to
    this process's environment."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env={**os.environ, **env} if env else None,
        input=input,
        capture_output=True,
        encoding="utf-8",
        timeout=timeout,
    )


def run_ok(*args: str, **kwargs) -> str:
    """run_python() that must exit 0; returns its stdout."""
    proc = run_python(*args, **kwargs)
    assert proc.returncode == 0, f"rc={proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


def run_code(code: str, **kwargs) -> str:
    """Run the (indented) *code* in a fresh interpreter; it must exit 0.
    Scenarios that could crash the interpreter run this way, so that a
    regression fails one test instead of killing the session."""
    return run_ok("-c", textwrap.dedent(code), **kwargs)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group of *proc* (started with
    ``start_new_session=True``) if anything of it is left, and reap *proc*."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


# -- running a program the ways users do -------------------------------------------

#: sitecustomize.py there sets the start method a user's program runs with.
SITE = Path(__file__).resolve().parent / "programs" / "site"
#: A file, python -c, stdin, python -i fed on stdin, IPython, notebook cells in a Jupyter kernel.
USER_WAYS = ("file", "-c", "stdin", "interactive", "ipython", "notebook")


def statements(source: str) -> list[str]:
    """The top-level statements of *source*, each as typed at a prompt: no
    docstring (it would be echoed), no blank or comment line inside a block."""
    lines = source.splitlines()
    body = ast.parse(source).body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    out = []
    for node in body:
        first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", ()))])
        chunk = [
            line
            for line in lines[first - 1 : node.end_lineno]
            if line.strip() and not line.lstrip().startswith("#")
        ]
        out.append("\n".join(chunk))
    return out


def _interactive(source: str) -> str:
    """*source* for ``python -i``: a blank line ends each top-level statement."""
    return "".join(statement + "\n\n" for statement in statements(source))


#: A log record of Dask's own at a local cluster's shutdown: a worker whose
#: heartbeat is in flight when the scheduler drops its connection logs it at
#: ERROR, traceback included (dask/distributed#7105, open).  It is Dask's
#: noise, not a failure of the program, and appears only on a loaded machine.
_DASK_SHUTDOWN_NOISE = re.compile(
    r"^\S+ \S+ - distributed\.worker - ERROR - Failed to communicate with scheduler during heartbeat\.\n"
    r"(?:.*\n)*?distributed\.comm\.core\.CommClosedError: .*\n?",
    re.MULTILINE,
)


def program_errors(stderr: str) -> str:
    """*stderr* of a user program without Dask's shutdown noise
    (_DASK_SHUTDOWN_NOISE): what is left of it is the program's."""
    return _DASK_SHUTDOWN_NOISE.sub("", stderr)


def run_as_user(
    source: str, way: str, cwd: Path, env: dict[str, str], timeout: float = 100
) -> subprocess.CompletedProcess[str]:
    """Run the program *source* in a fresh interpreter the *way* a user
    would (one of USER_WAYS), in directory *cwd*, with environment *env*
    (see user_env); a run that outlives *timeout* is killed with its whole
    process group and reported as exit status -9."""
    args: list[str] = [sys.executable]
    stdin = None
    if way == "notebook":
        import pytest

        pytest.importorskip("ipykernel")
        pytest.importorskip("jupyter_client")
        args += [str(SITE / "notebook.py"), str(timeout - 10)]
        stdin = json.dumps(statements(source))
    elif way == "ipython":
        import pytest

        pytest.importorskip("IPython")
        args = [sys.executable, "-m", "IPython", "--quick", "--no-banner", "--colors=NoColor", "-c", source]
    elif way == "file":
        script = cwd / "program.py"
        script.write_text(source, encoding="utf-8")
        args.append(str(script))
    elif way == "-c":
        args += ["-c", source]
    elif way == "stdin":
        args.append("-")
        stdin = source
    elif way == "interactive":
        args.append("-i")
        stdin = _interactive(source)
    proc = subprocess.Popen(
        args,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=cwd,
        env=env,
        encoding="utf-8",
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        err += f"\n[killed after {timeout} s]"
    finally:
        kill_group(proc)  # what it left behind (the standard library's pool may leave workers)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def user_env(start_method: str | None = None, **extra: str) -> dict[str, str]:
    """The environment of a user's program: this one, with nothing of tests/
    importable, and *start_method* made the default (by SITE's sitecustomize)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SHOAL_TEST_START_METHOD")}
    env["PYTHONPATH"] = str(SITE)  # not tests/: the program imports nothing from here
    if start_method:
        env["SHOAL_TEST_START_METHOD"] = start_method
    env.update(extra)
    return env


# -- waiting ------------------------------------------------------------------------


def wait_until(condition, timeout: float = 30, interval: float = 0.01) -> bool:
    """Poll *condition* until it is true or *timeout* seconds have passed;
    whether it became true (a hang guard, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


# -- child processes ----------------------------------------------------------------


def run_processes(ctx, target, args_list, timeout: float = 60) -> list[int | None]:
    """Start one ``ctx.Process(target=target, args=args)`` per *args_list*
    entry, join them all; their exit codes."""
    procs = [ctx.Process(target=target, args=args) for args in args_list]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    return [p.exitcode for p in procs]


def gather_in_order(result_pipes, producers: int) -> list:
    """Receive each consumer's list of (producer, i) items from the read end
    of its ``(read, write)`` pipe (closing both ends); assert that each
    consumer saw each producer's items in the order it sent them.  All the
    items."""
    got = []
    for r, w in result_pipes:
        w.close()
        part = r.recv()
        r.close()
        for k in range(producers):
            seq = [i for ident, i in part if ident == k]
            assert seq == sorted(seq), "a producer's order was not kept"
        got.extend(part)
    return got


def wait_child(pid: int, timeout: float = 30) -> int:
    """The exit status of the ``os.fork()`` child *pid*; SIGKILL it if it is
    still running after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return -signal.SIGKILL


def child_reports(fn) -> str:
    """Run *fn* in an ``os.fork()`` child; the text it returned."""
    r, w = os.pipe()
    try:
        pid = os.fork()
        if pid == 0:
            try:
                os.write(w, fn().encode())
            finally:
                os._exit(0)
        os.close(w)
        w = -1
        assert wait_child(pid) == 0
        chunks = []
        while chunk := os.read(r, 65536):
            chunks.append(chunk)
        return b"".join(chunks).decode()
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


# -- descriptors --------------------------------------------------------------------


def open_fds(pid: int | str = "self") -> set[str]:
    """The descriptor numbers process *pid* has open."""
    return set(os.listdir(f"/proc/{pid}/fd"))


def fd_links(pid: int | str = "self") -> set[str]:
    """What process *pid*'s descriptors point at ("pipe:[123]", a path...)."""
    out = set()
    for fd in open_fds(pid):
        try:
            out.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:  # closed meanwhile
            pass
    return out


def connections(n_pairs: int) -> list:
    """2 * *n_pairs* connected shoal Connections (each holds a descriptor)."""
    from shoal import Pipe

    return [c for _ in range(n_pairs) for c in Pipe()]


def close_all(conns) -> None:
    for c in conns:
        c.close()


def at_fd_limit(recv) -> list[str]:
    """In an ``os.fork()`` child: use every descriptor RLIMIT_NOFILE allows,
    call *recv*, then free them and call it again.  [what the first call
    raised, repr of what the second returned]."""

    def child():
        import resource

        from shoal._ipc._packet import close_fds

        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(64, len(open_fds()) + 16), hard))
        hog = []
        try:
            while True:
                hog.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            pass
        try:
            recv()
            first = "no error"
        except Exception as exc:
            first = f"{type(exc).__name__} {getattr(exc, 'errno', None)} {exc}"
        close_fds(hog)
        try:
            second = repr(recv())
        except Exception as exc:
            second = f"{type(exc).__name__} {exc}"
        return f"{first}\n{second}"

    return child_reports(child).split("\n")


def limit_descriptors_in_flight() -> tuple[int, int]:
    """In an ``os.fork()`` child: make the kernel count descriptors in flight
    against a small RLIMIT_NOFILE (it does not for root).  (the limit, a
    number of messages with a memfd each that is more than it)."""
    import resource

    if os.getuid() == 0:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
    limit = 2 * len(open_fds()) + 256
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    return limit, limit + 100


# -- a real Dask cluster ------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def dask_cluster(where, workers: int = 2, env: dict | None = None, timeout: float = 60):
    """Start ``dask scheduler`` and *workers* ``dask worker`` processes (one
    thread each) on loopback, in directory *where* (their log is
    ``cluster.log`` there), with environment *env*; yield the scheduler's
    address and the list of their processes; stop them all (SIGTERM, then
    SIGKILL) at the end.  Skips the
    test when the ``dask`` command is not installed beside this Python."""
    import pytest

    distributed = pytest.importorskip("distributed")
    dask_cli = Path(sys.executable).parent / "dask"
    if not dask_cli.exists():
        pytest.skip("the `dask` command is not installed beside this Python")
    address = f"tcp://127.0.0.1:{free_port()}"
    port = address.rsplit(":", 1)[1]
    commands = [[str(dask_cli), "scheduler", "--host", "127.0.0.1", "--port", port, "--no-dashboard"]]
    worker = [str(dask_cli), "worker", address, "--nthreads", "1", "--no-dashboard", "--host", "127.0.0.1"]
    commands += [worker] * workers
    procs = []
    with open(Path(where) / "cluster.log", "w") as log:
        try:
            for command in commands:
                procs.append(
                    subprocess.Popen(
                        command, stdout=log, stderr=log, env=env, cwd=where, start_new_session=True
                    )
                )
            with distributed.Client(address, set_as_default=False, timeout=30) as client:
                client.wait_for_workers(workers, timeout=timeout)
            yield address, procs
        finally:
            for proc in reversed(procs):
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            for proc in procs:
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    kill_group(proc)
