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


@pytest.mark.slow
def test_seed_apply():
    out, _ = run_example("seed_pool_apply.py")
    lines = out.splitlines()
    assert len(lines) == 11
    assert all(re.fullmatch(r"\d+ run", line) for line in lines[:10])
    # Three worker processes do all the work.
    assert len({line.split()[0] for line in lines[:10]}) <= 3
    assert lines[10] == str([i**2 for i in range(10)])


@pytest.mark.slow
def test_seed_apply_async():
    out, _ = run_example("seed_pool_apply_async.py")
    # Workers print concurrently, so only the results' order is fixed.
    runs = re.findall(r"(\d+) run", out)
    assert len(runs) == 10
    assert len(set(runs)) <= 3
    results = [line for line in out.splitlines() if re.fullmatch(r"\d+", line)]
    assert results == [str(i**2) for i in range(10)]


def test_seed_map():
    out, _ = run_example("seed_pool_map.py")
    lines = out.splitlines()
    assert len(lines) == 2
    assert all(float(x) >= 0 for x in lines)


def test_seed_callback_runs_in_the_parent():
    out, _ = run_example("seed_pool_callback.py")
    lines = out.splitlines()
    main_pid = re.fullmatch(r"主进程: (\d+)", lines[0]).group(1)
    assert lines[1].startswith("func1>> ") and lines[1].split()[1] != main_pid
    assert lines[2] == "func1"
    # The callback printed the parent's pid, like the standard library.
    assert lines[3] == f"func2>> {main_pid}"
    assert lines[4:] == ["func2", "100"]


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
