"""`shoal map` and `shoal bench`, run as a user runs them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

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

    class Unprintable:
        def __str__(self):
            raise KeyError("no text for " + self.line)

    def unprintable_on_2(line):
        if line == "2":
            result = Unprintable()
            result.line = line
            return result
        return line

    def slow_first(line):
        n = int(line)
        time.sleep(0.3 if n == 0 else 0)
        return n

    def exits_on_2(line):
        if line == "2":
            import sys
            sys.exit(3)
        return line

    def picky(line):
        if line == "slow":
            time.sleep(60)
        n = int(line)
        if n % 7 == 0:
            return 1 / n - 1 / n + 1 / 0
        if n % 2:
            raise KeyError(n)
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


def test_a_line_whose_function_calls_sys_exit_is_reported_and_others_complete(workdir):
    # The line was reported as "SystemExit: 3", which did not say that the
    # function had ended its worker's turn rather than shoal's run.
    out = shoal(workdir, "map", "tasks:exits_on_2", "-j", "1", stdin="1\n2\n3\n")
    assert out.returncode == 1
    assert out.stdout.splitlines() == ["1", "3"]
    assert "line 2: TaskExitError: the task called sys.exit(3)" in out.stderr


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
        (["map", "tasks:double", "--max-errors", "0"], "--max-errors must be at least 1"),
        # A file name where the module's name belongs gets the module's name.
        (["map", "tasks.py:double"], "'tasks.py' is a file name; MODULE:FUNCTION takes the module's name"),
        (["map", "tasks.py:double"], ": tasks:double (a file mytasks.py is the module mytasks"),
        (["map", "./pkg/tasks.py:double"], "pkg.tasks:double"),
        (["map", "tasks.py"], "for a function in tasks.py: tasks:FUNCTION"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(workdir, args, message):
    out = shoal(workdir, *args, stdin="")
    assert out.returncode == 2
    assert message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_bench_prints_ratios_and_marks_the_target_met_or_missed(workdir):
    out = shoal(workdir, "bench", "--quick", "-k", "pool start", timeout=120)
    assert out.returncode == 0, out.stderr
    rows = re.findall(
        r"^pool start \+ first result\s+(\w+)\s+([\d.,]+)\s+ms\s+([\d.]+)x(.*)$", out.stdout, re.M
    )
    contenders = {name: float(ratio) for name, _figure, ratio, _target in rows}
    assert {"stdlib", "shoal"} <= set(contenders)
    assert contenders["stdlib"] == 1.0
    assert contenders["shoal"] > 0
    verdicts = {name: target.split()[0] if target.strip() else "" for name, _f, _r, target in rows}
    # The row's verdict agrees with its ratio (target: >= 0.67x).
    assert verdicts["shoal"] == ("met" if contenders["shoal"] >= 0.67 else "MISSED")
    assert verdicts["stdlib"] == ""
    assert "target: what shoal's row must reach" in out.stdout  # the column is explained
    assert re.search(r"^targets met: [01] of 1$", out.stdout, re.M)


def test_bench_repeats_alternate_between_contenders_and_a_failed_one_is_not_run_again():
    # Before, each contender ran all its repeats in a row: a machine that
    # got busier during a scenario moved the ratio of whoever ran last.
    import io
    import math

    from shoal.benchmarks._framework import Scenario, measure

    calls: list[str] = []

    def runner(name: str, figure: float):
        def run(quick: bool) -> float:
            calls.append(name)
            if figure < 0:
                raise RuntimeError("this contender cannot run here")
            return figure + len(calls)  # later runs score higher: the best one counts

        return run

    sc = Scenario(
        "s",
        "ops/s",
        True,
        {"stdlib": runner("stdlib", 10), "shoal": runner("shoal", 20), "peer": runner("peer", -1)},
    )
    out = io.StringIO()
    figures = measure(sc, quick=False, out=out)
    assert calls == ["stdlib", "shoal", "peer", "stdlib", "shoal", "stdlib", "shoal"]
    assert figures["stdlib"] == 10 + 6 and figures["shoal"] == 20 + 7 and math.isnan(figures["peer"])
    assert "s / peer failed: RuntimeError: this contender cannot run here" in out.getvalue()
    assert measure(sc, quick=True, out=io.StringIO()) and calls[-3:] == ["stdlib", "shoal", "peer"]


@pytest.mark.parametrize(
    ("target", "value", "ratio", "met"),
    [
        (">= 12x", 100.0, 12.5, True),
        (">= 12x", 100.0, 5.0, False),
        (">= 0.67x (time <= 1.5x the standard library's)", 9.0, 0.7, True),
        ("efficiency >= 0.97 ('no pool' = this machine's ceiling)", 0.98, 1.01, True),
        ("efficiency >= 0.97 ('no pool' = this machine's ceiling)", 0.95, 1.01, False),
        ("<= 2x", 1.0, 3.0, False),
        (">= 3x", float("nan"), None, None),  # a failed measurement is not judged
        ("faster", 1.0, 2.0, None),  # a target the table cannot read is not judged
    ],
)
def test_bench_target_verdict(target, value, ratio, met):
    from shoal.benchmarks._framework import target_met

    assert target_met(target, value, ratio) is met


@pytest.mark.parametrize(
    ("target", "ratios", "met"),
    [
        # Every clause must hold: the one against joblib as much as the stdlib's.
        (">= 10x stdlib, >= 2x joblib", {"stdlib": 12.0, "joblib": 2.5}, True),
        (">= 10x stdlib, >= 2x joblib", {"stdlib": 12.0, "joblib": 1.5}, False),
        (">= 10x stdlib, >= 2x joblib", {"stdlib": 8.0, "joblib": 2.5}, False),
        # A peer that is not installed has no row: its clause is not judged.
        (">= 10x stdlib, >= 2x joblib", {"stdlib": 12.0}, True),
        # A peer that failed leaves the verdict open unless another clause failed.
        (">= 10x stdlib, >= 2x joblib", {"stdlib": 12.0, "joblib": None}, None),
        (">= 10x stdlib, >= 2x joblib", {"stdlib": 8.0, "joblib": None}, False),
        # A ratio to a named contender, not to the standard library.
        (">= 0.99x no pool (this machine's ceiling)", {"stdlib": 1.5, "no pool": 0.995}, True),
        (">= 0.99x no pool (this machine's ceiling)", {"stdlib": 1.5, "no pool": 0.95}, False),
        # A comma inside the comment does not start a clause.
        (">= 2x (memory <= 0.5x the stdlib's, per task)", {"stdlib": 2.5}, True),
    ],
)
def test_bench_target_clauses_name_the_contender_they_compare_with(target, ratios, met):
    from shoal.benchmarks._framework import target_met

    assert target_met(target, 1.0, ratios["stdlib"], ratios) is met


@pytest.mark.parametrize(
    ("figures", "met"),
    [
        ({"stdlib": 3.0, "shoal": 2.0, "shoal-SA": 1.05}, True),
        ({"stdlib": 3.0, "shoal": 1.0, "shoal-SA": 1.5}, False),
    ],
)
def test_a_bench_target_on_a_named_contenders_figure_checks_that_figure(figures, met):
    # "shoal-SA <= 1.2 GB" was free text (a hyphen in the name), so the
    # peak-memory row was never judged.
    from shoal.benchmarks._framework import target_met

    assert target_met("shoal-SA <= 1.2 GB", figures["shoal"], 1.0, None, figures) is met


@pytest.mark.parametrize(
    ("target", "baseline", "mark"),
    [
        (">= 12x stdlib, >= 2x joblib", "stdlib", 12.0),
        (">= 1.0x loky", "loky", 1.0),
        (">= 0.67x (time <= 1.5x the standard library's)", "stdlib", 0.67),
        # The chart's scale is the baseline's: a ratio to another contender
        # or a bare figure has no place on it.
        (">= 0.99x no pool (this machine's ceiling)", "stdlib", None),
        ("efficiency >= 0.97", "stdlib", None),
    ],
)
def test_bench_chart_marks_only_a_target_against_the_baseline(target, baseline, mark):
    from shoal.benchmarks._framework import baseline_ratio_target

    assert baseline_ratio_target(target, baseline) == mark


def _results_file(path, *, shoal_ratio: float):
    saved = {
        "shoal": "0.1.0",
        "python": "3.11.7",
        "machine": "x86_64",
        "cpus": 2,
        "start_method": "fork",
        "quick": True,
        "date": "2026-01-01T00:00:00Z",
        "scenarios": [
            {
                "name": "queue 100 B 1p/1c put/get",
                "unit": "msgs/s",
                "higher_is_better": True,
                "target": ">= 3x",
                "met": shoal_ratio >= 3,
                "notes": "",
                "results": [
                    {"contender": "stdlib", "value": 100.0, "ratio": 1.0},
                    {"contender": "shoal", "value": 100.0 * shoal_ratio, "ratio": shoal_ratio},
                ],
            }
        ],
    }
    path.write_text(json.dumps(saved))
    return saved


def test_bench_json_to_stdout_is_machine_readable_and_the_table_goes_to_stderr(workdir):
    out = shoal(workdir, "bench", "--quick", "-k", "pool start", "--json", "-", timeout=120)
    assert out.returncode == 0, out.stderr
    saved = json.loads(out.stdout)
    assert saved["quick"] is True and saved["cpus"] >= 1
    [scenario] = saved["scenarios"]
    assert scenario["name"] == "pool start + first result" and scenario["unit"] == "ms"
    results = {r["contender"]: r for r in scenario["results"]}
    assert results["stdlib"]["ratio"] == 1.0
    shoal_row = results["shoal"]
    assert shoal_row["ratio"] == pytest.approx(results["stdlib"]["value"] / shoal_row["value"])
    assert scenario["met"] is (shoal_row["ratio"] >= 0.67)
    assert "pool start + first result" in out.stderr


def test_bench_load_reprints_saved_results_and_json_file_round_trips(workdir):
    saved = _results_file(workdir / "saved.json", shoal_ratio=2.0)
    out = shoal(workdir, "bench", "--load", "saved.json", "--json", "copy.json")
    assert out.returncode == 0, out.stderr
    assert re.search(
        r"^queue 100 B 1p/1c put/get\s+shoal\s+200\s+msgs/s\s+2.00x\s+MISSED >= 3x$", out.stdout, re.M
    )
    assert "targets met: 0 of 1" in out.stdout
    assert "  missed: queue 100 B 1p/1c put/get" in out.stdout
    assert json.loads((workdir / "copy.json").read_text()) == saved


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "cannot read nothing.json"), ("{not json", "is not JSON"), ('{"a": 1}', "not a results file")],
)
def test_bench_load_of_a_bad_file_is_a_usage_error(workdir, content, message):
    if content is not None:
        (workdir / "nothing.json").write_text(content)
    out = shoal(workdir, "bench", "--load", "nothing.json")
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize(
    "scenarios",
    [
        [1, 2],
        [{"name": "x"}],
        [{"name": "x", "unit": "ms", "target": "", "met": None, "results": [{"value": 1}]}],
    ],
)
def test_bench_load_of_malformed_scenario_records_is_a_usage_error(workdir, scenarios):
    # A results file whose records had the wrong shape ended in a traceback
    # from the table printer, after half a table.
    (workdir / "bad.json").write_text(json.dumps({"scenarios": scenarios}))
    out = shoal(workdir, "bench", "--load", "bad.json")
    assert out.returncode == 2
    assert "bad.json is not a results file written by `shoal bench --json`" in out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""


@pytest.mark.parametrize("option", ["--json", "--plot"])
def test_bench_output_into_a_missing_directory_fails_before_measuring(workdir, option):
    out = shoal(workdir, "bench", option, "no/such/dir/out.svg")
    assert out.returncode == 2
    assert "cannot write no/such/dir/out.svg: no such directory" in out.stderr
    assert out.stdout == ""  # nothing was measured


@pytest.mark.slow  # several seconds: the whole suite runs it, the quick subset does not
def test_bench_plot_draws_the_ratios(workdir):
    _results_file(workdir / "saved.json", shoal_ratio=4.0)
    out = shoal(workdir, "bench", "--load", "saved.json", "--plot", "ratios.png")
    assert out.returncode == 0, out.stderr
    assert (workdir / "ratios.png").read_bytes().startswith(b"\x89PNG")
    out = shoal(workdir, "bench", "--load", "saved.json", "--plot", "ratios.svg")
    assert out.returncode == 0, out.stderr
    svg = (workdir / "ratios.svg").read_text()
    assert "<svg" in svg and "queue 100 B 1p/1c put/get" in svg


@pytest.mark.slow  # several seconds: the whole suite runs it, the quick subset does not
def test_bench_plot_gives_each_contender_one_colour_of_its_own(workdir):
    # The chart reused colours (shoal and "shoal bs=1" both blue, joblib and
    # shoal-share gold, shoal-SA and client.map grey), so bars could not be
    # told apart.  Drawn from the committed results (13 contenders): the
    # legend lists each contender once, no two with the same colour, and
    # every bar has its contender's colour, in every scenario.
    results = Path(__file__).resolve().parent.parent / "docs" / "benchmarks" / "results.json"
    out = shoal(workdir, "bench", "--load", str(results), "--plot", "ratios.svg")
    assert out.returncode == 0, out.stderr
    axes, legend = (workdir / "ratios.svg").read_text().split('<g id="legend_1">', 1)
    entry = r'style="fill: (#[0-9a-f]{6})"/>\s*</g>\s*<g id="text_\d+">\s*<!-- (.+?) -->'
    entries = re.findall(entry, legend)
    colours = dict((label, colour) for colour, label in entries)
    saved = json.loads(results.read_text())
    bars: dict[str, int] = {}
    for sc in saved["scenarios"]:
        for r in sc["results"]:
            if r["ratio"] and r["contender"] not in ("stdlib", sc.get("baseline") or "stdlib"):
                bars[r["contender"]] = bars.get(r["contender"], 0) + 1
    assert len(bars) >= 10
    assert sorted(colours) == sorted(bars) and len(entries) == len(bars)
    assert len(set(colours.values())) == len(colours), colours
    bar = r'<g id="patch_\d+">\s*<path d="[^"]*" (?:clip-path="[^"]*" )?style="fill: (#[0-9a-f]{6})'
    drawn = re.findall(bar, axes)
    for contender, n in bars.items():
        assert drawn.count(colours[contender]) == n, contender


def test_bench_plot_colours_stay_with_their_contender():
    from shoal.benchmarks._plot import contender_colors

    suite = ["shoal", "shoal bs=1", "shoal-SA", "shoal-share", "joblib", "loky", "client.map", "no pool"]
    assert contender_colors(suite)["joblib"] == contender_colors(["joblib"])["joblib"]
    many = [*suite, *(f"peer{i}" for i in range(30))]
    assert len(set(contender_colors(many).values())) == len(many)


def test_bench_k_matching_no_scenario_is_a_usage_error(workdir):
    # A mistyped -k measured nothing, printed an empty table and exited 0
    # (with --json, writing an empty result as if it were one).
    out = shoal(workdir, "bench", "-k", "no such scenario", "--json", "out.json")
    assert out.returncode == 2
    assert "no scenario name contains 'no such scenario'" in out.stderr and "pool start" in out.stderr
    assert out.stdout == "" and not (workdir / "out.json").exists()


def test_bench_interrupted_exits_130_without_a_traceback(workdir):
    # Ctrl-C during `shoal bench` ended in a KeyboardInterrupt traceback,
    # where `shoal map` says "interrupted" and exits 130.
    import signal

    proc = subprocess.Popen(
        [sys.executable, "-m", "shoal", "bench", "-k", "imap_unordered"],
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in proc.stdout:
            if line.startswith("-----"):  # the table has begun: measuring
                break
        # Again until it ends, as a user would: Python ignores a
        # KeyboardInterrupt raised inside an at-fork handler.
        for _ in range(100):
            proc.send_signal(signal.SIGINT)
            try:
                _, err = proc.communicate(timeout=0.3)
                break
            except subprocess.TimeoutExpired:
                pass
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130, err
    # (Python itself may print "Exception ignored" for a signal that landed
    # in an at-fork handler; no traceback comes from shoal's code.)
    assert err.rstrip().endswith("shoal: interrupted") and "_cli.py" not in err, err


def test_bench_plot_to_a_file_type_matplotlib_cannot_draw_fails_before_measuring(workdir):
    # The type was checked only when drawing, after the whole run had been measured.
    out = shoal(workdir, "bench", "--plot", "ratios.xyz")
    assert out.returncode == 2
    assert "cannot write ratios.xyz: matplotlib cannot draw .xyz files" in out.stderr and ".svg" in out.stderr
    assert out.stdout == ""  # nothing was measured


def test_bench_plot_without_matplotlib_says_how_to_install_it(workdir):
    # A module that fails to import stands in for a missing matplotlib.
    blocker = workdir / "block"
    blocker.mkdir()
    (blocker / "matplotlib.py").write_text("raise ImportError('No module named matplotlib')\n")
    _results_file(workdir / "saved.json", shoal_ratio=4.0)
    out = subprocess.run(
        [sys.executable, "-m", "shoal", "bench", "--load", "saved.json", "--plot", "ratios.png"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=workdir,
        env={**os.environ, "PYTHONPATH": str(blocker)},
    )
    assert out.returncode == 2
    assert "pip install matplotlib" in out.stderr and "Traceback" not in out.stderr
    assert not (workdir / "ratios.png").exists()


def test_version(workdir):
    import shoal as package

    out = shoal(workdir, "--version")
    assert out.returncode == 0
    assert out.stdout.startswith(f"shoal {package.__version__} (Python ")


def test_map_help_explains_module_function_with_an_example(workdir):
    out = shoal(workdir, "map", "--help")
    assert out.returncode == 0
    assert "MODULE:FUNCTION names the function" in out.stdout
    example = out.stdout.split("example:", 1)[1]
    assert "def square(line)" in example and "shoal map mytasks:square" in example


@pytest.mark.parametrize(
    ("mode", "raised", "died"),
    [
        ("blank", r"^$", r"^$"),
        ("error", r"^ValueError: three is not allowed$", r"^WorkerDiedError: .*SIGKILL"),
    ],
)
def test_on_error_keeps_output_lines_aligned_with_input_lines(workdir, mode, raised, died):
    out = shoal(workdir, "map", "tasks:fragile", "--on-error", mode, "-j", "2", stdin="0\n1\n2\n3\n4\n5\n6\n")
    assert out.returncode == 1
    lines = out.stdout.split("\n")[:-1]
    assert len(lines) == 7
    assert lines[:3] == ["0", "10", "20"] and lines[4] == "40" and lines[6] == "60"
    assert re.search(raised, lines[3])  # item 3 raised
    assert re.search(died, lines[5])  # item 5 killed its worker
    assert "line 4: ValueError: three is not allowed" in out.stderr  # still reported


def test_a_result_whose_str_raises_is_an_item_failure_and_the_others_are_written(workdir):
    # str() of the result raised in the parent while writing it: the run
    # died with a traceback and every later result was lost.
    out = shoal(workdir, "map", "tasks:unprintable_on_2", "-j", "2", "--on-error", "error", stdin="1\n2\n3\n")
    assert out.returncode == 1
    assert out.stdout == "1\nresult cannot be written: KeyError: 'no text for 2'\n3\n"
    assert "line 2: result cannot be written: KeyError" in out.stderr and "Traceback" not in out.stderr


def test_on_error_with_json_writes_json_placeholders_and_mirrors_blank_lines(workdir):
    items = '{"name": "ab"}\n\nnot json\n{"nope": 1}\n{"name": "c"}\n'
    out = shoal(workdir, "map", "tasks:as_record", "--json", "--on-error", "error", stdin=items)
    assert out.returncode == 1
    lines = out.stdout.split("\n")[:-1]
    assert len(lines) == 5
    assert json.loads(lines[0]) == {"name": "AB", "size": 2}
    assert lines[1] == ""
    assert json.loads(lines[2])["error"].startswith("invalid JSON")
    assert json.loads(lines[3]) == {"error": "KeyError: 'name'"}
    assert json.loads(lines[4]) == {"name": "C", "size": 1}
    blank = shoal(workdir, "map", "tasks:as_record", "--json", "--on-error", "blank", stdin=items)
    assert blank.stdout.split("\n")[:-1][2:4] == ["null", "null"]


def _map_into_closed_pipe(workdir, lines: list[str]) -> subprocess.CompletedProcess:
    """Run `shoal map tasks:double` with a reader that takes one line and
    leaves, as `| head -1` does."""
    (workdir / "in.txt").write_text("".join(f"{line}\n" for line in lines))
    proc = subprocess.Popen(
        [sys.executable, "-m", "shoal", "map", "tasks:double", "in.txt", "-j", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=workdir,
    )
    try:
        first = proc.stdout.readline()
        proc.stdout.close()  # the reader leaves; more output than a pipe holds is still to come
        err = proc.stderr.read()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    return subprocess.CompletedProcess(proc.args, proc.returncode, first, err)


def test_map_exits_1_when_an_item_failed_before_the_reader_left(workdir):
    out = _map_into_closed_pipe(workdir, ["1", "x", *map(str, range(100_000))])
    assert out.stdout == "2\n"
    assert out.returncode == 1, out.stderr
    assert "line 2: ValueError" in out.stderr
    assert "1 item(s) failed" in out.stderr
    assert "Traceback" not in out.stderr and "Broken pipe" not in out.stderr


def test_map_exits_1_when_an_item_failed_and_stderr_went_to_the_reader_that_left(workdir):
    # With 2>&1 | head, printing the failure summary to the closed pipe
    # raised BrokenPipeError, which main() took for "the reader left, all
    # fine": exit status 0 although an item had failed.
    (workdir / "in.txt").write_text("".join(f"{line}\n" for line in ["1", "x", *map(str, range(100_000))]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "shoal", "map", "tasks:double", "in.txt", "-j", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=workdir,
    )
    try:
        for line in proc.stdout:  # results and reports, until the failure is reported
            if "line 2: ValueError" in line:
                break
        proc.stdout.close()  # the reader leaves
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1


def test_map_exits_0_when_the_reader_left_and_nothing_failed(workdir):
    out = _map_into_closed_pipe(workdir, [str(i) for i in range(100_000)])
    assert out.stdout == "0\n"
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""


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


def test_items_that_all_fail_the_same_way_get_a_summary_not_a_line_each(workdir):
    # 2,000 items failing with the same error printed 2,000 identical lines.
    out = shoal(workdir, "map", "tasks:double", "-j", "2", stdin="".join(f"x{i}\n" for i in range(2000)))
    assert out.returncode == 1 and out.stdout == ""
    err = out.stderr.splitlines()
    assert len(err) == 12, out.stderr  # the first ten, a note, the summary
    assert err[0] == "line 1: ValueError: invalid literal for int() with base 10: 'x0'"
    assert err[10] == (
        "shoal: further failed items are counted, not shown; the summary at the end lists them"
    )
    assert err[11] == (
        "shoal: 2000 item(s) failed, all with ValueError (lines 1, 2, 3, 4, 5 and 1995 more): "
        "invalid literal for int() with base 10: 'x0'"
    )


def test_the_summary_counts_each_kind_of_error(workdir):
    out = shoal(workdir, "map", "tasks:picky", "-j", "2", stdin="".join(f"{i}\n" for i in range(1, 41)))
    assert out.returncode == 1
    assert out.stdout.split() == [str(i) for i in range(1, 41) if i % 2 == 0 and i % 7]
    summary = out.stderr.split("shoal: 22 item(s) failed:\n", 1)[1].splitlines()
    assert summary == [
        "  17 KeyError (lines 1, 3, 5, 9, 11 and 12 more): 1",
        "  5 ZeroDivisionError (lines 7, 14, 21, 28, 35): division by zero",
    ]


def test_max_errors_stops_reading_and_stops_the_running_items(workdir):
    # In order: what came before the N-th failure is written, nothing after.
    lines = ["2", "1", "4", "3", "6", *["5"] * 500]
    out = shoal(workdir, "map", "tasks:picky", "--max-errors", "2", "-j", "2", stdin="\n".join(lines) + "\n")
    assert out.returncode == 1
    assert out.stdout.split() == ["2", "4"]
    assert "line 2: KeyError: 1" in out.stderr and "line 4: KeyError: 3" in out.stderr
    assert "line 6:" not in out.stderr
    assert out.stderr.rstrip().endswith(
        "shoal: stopped after 2 failed item(s) (--max-errors 2), at line 4: no more input was read, "
        "and the items still running were stopped"
    )
    # Items still running (60 s each) are stopped, not waited for.
    started = time.monotonic()
    out = shoal(
        workdir, "map", "tasks:picky", "--max-errors", "1", "--unordered", "-j", "2",
        stdin="1\nslow\nslow\n" + "2\n" * 1000, timeout=30,
    )  # fmt: skip
    assert out.returncode == 1 and "stopped after 1 failed item(s)" in out.stderr
    assert time.monotonic() - started < 20
