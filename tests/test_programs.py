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

import re
import subprocess
from pathlib import Path

import pytest

from helpers import USER_WAYS, dask_cluster, program_errors, run_as_user, user_env

PROGRAMS_DIR = Path(__file__).resolve().parent / "programs"
PROGRAMS = sorted(p for p in PROGRAMS_DIR.glob("*.py"))
START_METHODS = ("fork", "spawn", "forkserver")

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


def _failure(proc: subprocess.CompletedProcess[str], expected: str) -> str | None:
    """Why a run is not a success, or None."""
    if proc.returncode != 0:
        return f"exit status {proc.returncode}"
    # An interactive session prints a traceback and goes on to exit 0.
    if "Traceback (most recent call last)" in program_errors(proc.stderr):
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
            for way in USER_WAYS:
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
    proc = run_as_user(source, way, tmp_path, user_env(start_method))
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
    stdlib = run_as_user(stdlib_source, way, tmp_path, user_env(start_method), timeout=60)
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
    with dask_cluster(where, workers=2, env=user_env()) as (address, _processes):
        yield address


@pytest.mark.slow
@pytest.mark.parametrize(
    "program", [p for p in PROGRAMS if _on_dask(p.read_text(encoding="utf-8"))], ids=lambda p: p.stem
)
def test_program_prints_the_same_on_a_dask_cluster(program, cluster, tmp_path):
    pytest.importorskip("distributed")
    source = program.read_text(encoding="utf-8")
    expected = _expected(source)
    proc = run_as_user(source, "file", tmp_path, user_env(DASK_ADDRESS=cluster))
    why = _failure(proc, expected)
    assert why is None, f"on Dask: {why}\n{_report(proc, expected)}"
