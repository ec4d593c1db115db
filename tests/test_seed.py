"""The seed's examples run with only their import line changed to shoal.

They live in examples/ (verbatim apart from the import).  Each runs as a
script, as a user runs it, and its output is checked against what the
standard library prints for the same code (pids and timings differ run to
run, so those are checked for shape, not value).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from helpers import run_ok, run_python

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, timeout: float = 60) -> tuple[str, str]:
    proc = run_python(str(EXAMPLES / name), timeout=timeout, cwd=EXAMPLES)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stdout, proc.stderr


def test_seed_uses_only_the_changed_import():
    for path in EXAMPLES.glob("seed_*.py"):
        text = path.read_text(encoding="utf-8")
        assert "multiprocessing" not in text.split("\n", 1)[1], path.name
        assert re.search(r"^from shoal import ", text, re.M), path.name


# What each example prints, as the standard library prints it for the same
# code; pids and timings are checked for shape.  tests/test_wheel.py runs the
# examples from an installed wheel against the same checks.


def _check_apply(out: str) -> None:
    lines = out.splitlines()
    assert len(lines) == 11
    assert all(re.fullmatch(r"\d+ run", line) for line in lines[:10])
    # Three worker processes do all the work.
    assert len({line.split()[0] for line in lines[:10]}) <= 3
    assert lines[10] == str([i**2 for i in range(10)])


def _check_apply_async(out: str) -> None:
    # Workers print concurrently, so only the results' order is fixed.
    runs = re.findall(r"(\d+) run", out)
    assert len(runs) == 10
    assert len(set(runs)) <= 3
    results = [line for line in out.splitlines() if re.fullmatch(r"\d+", line)]
    assert results == [str(i**2) for i in range(10)]


def _check_map(out: str) -> None:
    lines = out.splitlines()
    assert len(lines) == 2
    assert all(float(x) >= 0 for x in lines)


def _check_callback(out: str) -> None:
    lines = out.splitlines()
    main_pid = re.fullmatch(r"主进程: (\d+)", lines[0]).group(1)
    assert lines[1].startswith("func1>> ") and lines[1].split()[1] != main_pid
    assert lines[2] == "func1"
    # The callback printed the parent's pid, like the standard library.
    assert lines[3] == f"func2>> {main_pid}"
    assert lines[4:] == ["func2", "100"]


def _check_pipe(out: str) -> None:
    assert out == "Hello 妹妹\n"


def _check_manager(out: str) -> None:
    assert out == "{'count': 0}\n"


#: example file -> the check of what it prints.
CHECKS = {
    "seed_pool_apply.py": _check_apply,
    "seed_pool_apply_async.py": _check_apply_async,
    "seed_pool_map.py": _check_map,
    "seed_pool_callback.py": _check_callback,
    "seed_pipe.py": _check_pipe,
    "seed_manager.py": _check_manager,
}


def test_every_example_has_its_output_checked():
    assert sorted(CHECKS) == sorted(path.name for path in EXAMPLES.glob("seed_*.py"))


@pytest.mark.slow
def test_seed_apply():
    _check_apply(run_example("seed_pool_apply.py")[0])


@pytest.mark.slow
def test_seed_apply_async():
    _check_apply_async(run_example("seed_pool_apply_async.py")[0])


def test_seed_map():
    _check_map(run_example("seed_pool_map.py")[0])


def test_seed_callback_runs_in_the_parent():
    _check_callback(run_example("seed_pool_callback.py")[0])


def test_seed_pipe_and_manager():
    _check_pipe(run_example("seed_pipe.py")[0])
    _check_manager(run_example("seed_manager.py")[0])


def test_seed_callback_output_matches_the_standard_library(tmp_path):
    name = "seed_pool_callback.py"
    source = (
        (EXAMPLES / name)
        .read_text(encoding="utf-8")
        .replace("from shoal import", "from multiprocessing import")
    )
    stdlib_script = tmp_path / name
    stdlib_script.write_text(source, encoding="utf-8")
    ours, _ = run_example(name)
    theirs = run_ok(str(stdlib_script), timeout=60)

    def shape(text: str) -> list[str]:
        return [re.sub(r"\d{3,}", "PID", line) for line in text.splitlines()]

    assert shape(ours) == shape(theirs)
