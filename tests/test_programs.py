"""User programs, run the way users run them: the corpus in tests/programs/.

Each program defines its functions, classes and globals in the script
itself and ends with the output it must print (``# Output:``).  It runs in
a fresh interpreter

* as a file (``python program.py``), through ``python -c``, on stdin
  (``python -``), in an interactive session (``python -i`` fed on stdin),
  through IPython (``ipython -c``) and as the cells of a notebook in a
  Jupyter kernel (one top-level statement a cell), those two when IPython
  and ipykernel are installed (the test extra installs them);
* under fork, spawn and forkserver (set by ``tests/programs/site/
  sitecustomize.py``, so the program is unchanged);
* and, unless it says ``# Runs: ... not on Dask``, on a Dask cluster started
  with the ``dask scheduler`` and ``dask worker`` commands on loopback (the
  program reads ``DASK_ADDRESS``), with neither the workers nor the program
  able to import anything from this directory.

Programs that use only the standard library's names run with ``import
shoal`` replaced by the standard library too, where it works (a file under
any start method, any way under fork): it must print the same output, so the
expected output is the standard library's answer.  Where it cannot work
(functions of ``python -c``, stdin or an interactive session under spawn or
forkserver: its pool waits forever), shoal must still work.

The whole matrix is marked slow; one run per program and start method (and
the interactive ways under spawn) stays in the quick subset.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import dask_cluster, kill_group

PROGRAMS_DIR = Path(__file__).resolve().parent / "programs"
PROGRAMS = sorted(p for p in PROGRAMS_DIR.glob("*.py"))
SITE = PROGRAMS_DIR / "site"
START_METHODS = ("fork", "spawn", "forkserver")
WAYS = ("file", "-c", "stdin", "interactive", "ipython", "notebook")

#: What stands in for ``import shoal`` to run a program on the standard library.
STDLIB_IMPORT = (
    "import concurrent.futures\n"
    "import multiprocessing as shoal\n"
    "shoal.ProcessPoolExecutor = concurrent.futures.ProcessPoolExecutor\n"
)


def _expected(source: str) -> str:
    _, marker, tail = source.partition("\n# Output:\n")
    assert marker, "a program ends with its expected output after '# Output:'"
    return "".join(line[2:] + "\n" for line in tail.splitlines())


def _shoal_only(source: str) -> bool:
    return "# Runs: shoal only" in source


def _on_dask(source: str) -> bool:
    return "not on Dask" not in source


def _statements(source: str) -> list[str]:
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
    return "".join(statement + "\n\n" for statement in _statements(source))


def _run_notebook(
    source: str, cwd: Path, env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    """Run *source* as notebook cells (one top-level statement each) in a
    fresh Jupyter kernel; its stdout and stderr streams, errors included."""
    manager = pytest.importorskip("jupyter_client.manager")
    pytest.importorskip("ipykernel")
    km, kc = manager.start_new_kernel(kernel_name="python3", env=env, cwd=str(cwd))
    streams: dict[str, list[str]] = {"stdout": [], "stderr": []}

    def hook(msg) -> None:
        content = msg["content"]
        if msg["msg_type"] == "stream":
            streams[content["name"]].append(content["text"])
        elif msg["msg_type"] == "error":
            streams["stderr"].append("Traceback (most recent call last):\n" + "\n".join(content["traceback"]))

    status = 0
    try:
        for cell in _statements(source):
            reply = kc.execute_interactive(cell, timeout=timeout, output_hook=hook)
            if reply["content"]["status"] != "ok":
                status = 1
                break
    except TimeoutError:
        status = -9
        streams["stderr"].append(f"[a cell ran longer than {timeout} s]")
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    return subprocess.CompletedProcess(
        ["notebook"], status, "".join(streams["stdout"]), "".join(streams["stderr"])
    )


def _run(
    source: str, way: str, cwd: Path, env: dict[str, str], timeout: float = 100
) -> subprocess.CompletedProcess[str]:
    """Run *source* the *way* given; a run that outlives *timeout* is killed
    with its whole process group and reported as exit status -9."""
    if way == "notebook":
        return _run_notebook(source, cwd, env, timeout)
    args: list[str] = [sys.executable]
    stdin = None
    if way == "ipython":
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


def _env(start_method: str | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SHOAL_TEST_START_METHOD")}
    env["PYTHONPATH"] = str(SITE)  # not tests/: the program imports nothing from here
    if start_method:
        env["SHOAL_TEST_START_METHOD"] = start_method
    env.update(extra)
    return env


def _failure(proc: subprocess.CompletedProcess[str], expected: str) -> str | None:
    """Why a run is not a success, or None."""
    if proc.returncode != 0:
        return f"exit status {proc.returncode}"
    # An interactive session prints a traceback and goes on to exit 0.
    if "Traceback (most recent call last)" in proc.stderr:
        return "a traceback"
    if proc.stdout != expected:
        return "other output"
    return None


def _report(proc: subprocess.CompletedProcess[str], expected: str) -> str:
    return f"expected:\n{expected}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"


def _cases() -> list:
    cases = []
    for program in PROGRAMS:
        for method in START_METHODS:
            for way in WAYS:
                quick = way == "file" or (method == "spawn" and way in ("stdin", "notebook"))
                marks = () if quick else (pytest.mark.slow,)
                cases.append(
                    pytest.param(program, method, way, id=f"{program.stem}-{method}-{way}", marks=marks)
                )
    return cases


@pytest.mark.parametrize("program, start_method, way", _cases())
def test_program_prints_the_standard_librarys_answer(program, start_method, way, tmp_path):
    source = program.read_text(encoding="utf-8")
    expected = _expected(source)
    proc = _run(source, way, tmp_path, _env(start_method))
    why = _failure(proc, expected)
    assert why is None, f"shoal: {why}\n{_report(proc, expected)}"
    if _shoal_only(source) or "\nimport shoal\n" not in source:
        return
    if way != "file" and start_method != "fork":
        # The standard library's workers cannot find the functions of a main
        # module that is not a file (or try to run "<stdin>" as one): its
        # pool waits forever, and killing it leaks its semaphores.
        return
    stdlib_source = source.replace("\nimport shoal\n", "\n" + STDLIB_IMPORT, 1)
    stdlib = _run(stdlib_source, way, tmp_path, _env(start_method), timeout=60)
    stdlib_failed = _failure(stdlib, expected)
    # (A run that fails, crashes or hangs is the standard library not working here.)
    if stdlib_failed == "other output":
        pytest.fail(f"the standard library works here and prints something else\n{_report(stdlib, expected)}")


def test_the_corpus_covers_what_users_write():
    sources = {p.stem: p.read_text(encoding="utf-8") for p in PROGRAMS}
    text = "\n".join(sources.values())
    for needle in (
        "initializer=",
        "ProcessPoolExecutor(",
        "CACHE = {}",
        "@dataclasses.dataclass",
        "except BadInput",
        "functools.partial",
        "lambda",
        "imap(",
        "shoal.Actor(",
        "shared=",
        "joblib.Parallel",
    ):
        assert needle in text, needle
    for name, source in sources.items():
        assert _expected(source), name
        assert re.search(r"^if __name__ == \"__main__\":$", source, re.M), name


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A real `dask scheduler` and two `dask worker` processes on loopback,
    started where nothing of this suite can be imported."""
    where = tmp_path_factory.mktemp("dask-cluster")
    with dask_cluster(where, workers=2, env=_env()) as (address, _processes):
        yield address


@pytest.mark.slow
@pytest.mark.parametrize(
    "program", [p for p in PROGRAMS if _on_dask(p.read_text(encoding="utf-8"))], ids=lambda p: p.stem
)
def test_program_prints_the_same_on_a_dask_cluster(program, cluster, tmp_path):
    pytest.importorskip("distributed")
    source = program.read_text(encoding="utf-8")
    expected = _expected(source)
    proc = _run(source, "file", tmp_path, _env(DASK_ADDRESS=cluster))
    why = _failure(proc, expected)
    assert why is None, f"on Dask: {why}\n{_report(proc, expected)}"
