"""`shoal map` and `shoal bench`, run as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from helpers import run_python

TASKS = textwrap.dedent(
    """
    import os, signal, time

    def double(line):
        return int(line) * 2

    def fragile(line):
        n = int(line)
        if n == 3:
            raise ValueError("three is not allowed")
        if n == 5:
            os.kill(os.getpid(), signal.SIGKILL)
        if n == 7:
            time.sleep(60)
        return n * 10

    def as_record(item):
        return {"name": item["name"].upper(), "size": len(item["name"])}

    def slow_first(line):
        n = int(line)
        time.sleep(0.3 if n == 0 else 0)
        return n
    """
)


@pytest.fixture()
def workdir(tmp_path):
    (tmp_path / "tasks.py").write_text(TASKS)
    return tmp_path


def shoal(workdir, *args, stdin: str | None = None, timeout: float = 60):
    return run_python("-m", "shoal", *args, input=stdin, timeout=timeout, cwd=workdir)


def test_map_writes_results_in_input_order(workdir):
    (workdir / "in.txt").write_text("".join(f"{i}\n" for i in range(200)))
    out = shoal(workdir, "map", "tasks:double", "in.txt", "-j", "2")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [str(i * 2) for i in range(200)]


def test_map_reads_stdin(workdir):
    out = shoal(workdir, "map", "tasks:double", stdin="1\n2\n3\n")
    assert out.returncode == 0
    assert out.stdout == "2\n4\n6\n"


@pytest.mark.slow
def test_failing_and_crashing_lines_are_reported_and_others_complete(workdir):
    (workdir / "in.txt").write_text("".join(f"{i}\n" for i in range(10)))
    out = shoal(workdir, "map", "tasks:fragile", "in.txt", "-j", "2", "--timeout", "2")
    assert out.returncode == 1
    assert out.stdout.splitlines() == [str(i * 10) for i in range(10) if i not in (3, 5, 7)]
    err = out.stderr
    assert "line 4: ValueError: three is not allowed" in err
    assert "line 6: WorkerDiedError" in err and "SIGKILL" in err
    assert "line 8: TaskTimeoutError" in err
    assert "3 item(s) failed" in err


def test_unordered_and_json(workdir):
    items = [json.dumps({"name": n}) for n in ("ab", "cde", "f")]
    out = shoal(workdir, "map", "tasks:as_record", "--json", "--unordered", stdin="\n".join(items) + "\n")
    assert out.returncode == 0, out.stderr
    got = sorted(json.loads(line)["name"] for line in out.stdout.splitlines())
    assert got == ["AB", "CDE", "F"]
    bad = shoal(workdir, "map", "tasks:as_record", "--json", stdin='{"name": "x"}\nnot json\n')
    assert bad.returncode == 1
    assert "line 2: invalid JSON" in bad.stderr
    assert json.loads(bad.stdout) == {"name": "X", "size": 1}


def test_unordered_writes_fast_results_first(workdir):
    out = shoal(workdir, "map", "tasks:slow_first", "--unordered", "-j", "2", stdin="0\n1\n2\n3\n")
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    assert sorted(lines) == ["0", "1", "2", "3"]
    assert lines[0] != "0"  # results that finished first came first


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["map", "no_such_module:f"], "no module named 'no_such_module'"),
        (["map", "tasks:nope"], "has no attribute 'nope'"),
        (["map", "tasks"], "expected MODULE:FUNCTION"),
        (["map", "tasks:double", "missing.txt"], "cannot read missing.txt"),
        (["map", "tasks:double", "-j", "0"], "at least 1"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(workdir, args, message):
    out = shoal(workdir, *args, stdin="")
    assert out.returncode == 2
    assert message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_bench_prints_ratios(workdir):
    out = shoal(workdir, "bench", "--quick", "-k", "pool start", timeout=120)
    assert out.returncode == 0, out.stderr
    import re

    rows = re.findall(r"^pool start \+ first result\s+(\w+)\s+([\d.,]+)\s+ms\s+([\d.]+)x", out.stdout, re.M)
    contenders = {name: float(ratio) for name, _figure, ratio in rows}
    assert {"stdlib", "shoal"} <= set(contenders)
    assert contenders["stdlib"] == 1.0
    assert contenders["shoal"] > 0


def test_map_streams_results_before_the_input_ends(workdir):
    proc = subprocess.Popen(
        [sys.executable, "-m", "shoal", "map", "tasks:double", "-j", "2"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=workdir,
    )
    try:
        first = []
        for i in range(20):
            proc.stdin.write(f"{i}\n")
            proc.stdin.flush()
            import time

            time.sleep(0.05)
        # The input is still open, and results are already out.
        import select

        ready, _, _ = select.select([proc.stdout], [], [], 20)
        assert ready, "no output before the end of the input"
        first.append(proc.stdout.readline().strip())
        assert first == ["0"]
        proc.stdin.close()
        rest = proc.stdout.read().split()
        assert rest == [str(2 * i) for i in range(1, 20)]
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
