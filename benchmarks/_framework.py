"""The scenario record, timing helpers, target checks, and the table printer."""

from __future__ import annotations

import gc
import importlib
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from . import MODULES


@dataclass
class Scenario:
    """One measured piece of work.

    Attributes:
        name: short label printed in the table.
        unit: what the figure measures ("tasks/s", "ms", "GB/s", "efficiency").
        higher_is_better: True for rates, False for times.
        runners: contender name -> callable(quick) -> figure.  "stdlib" is the
            baseline every ratio is computed against.
        target: what shoal's row must reach, as text: "OP Nx" is a ratio to
            the baseline's figure (">= 12x"), "OP Nx NAME" a ratio to the
            contender NAME's (">= 0.99x no pool"), "WORD OP N" the figure
            itself ("efficiency >= 0.97"); a parenthesised comment may follow.
            Clauses separated by commas must all hold (">= 12x stdlib, >= 2x
            joblib"); one naming a contender this run lacks (a peer that is
            not installed) is not judged.  The table marks shoal's row met or
            MISSED (see target_met).
        repeat: how many times each contender runs (the runs of the
            contenders alternate: see measure); the best figure counts.
        baseline: the contender ratios are computed against, when it is not
            the standard library (joblib's backends against loky, its
            default; fire-and-forget actor calls against waiting ones; Dask
            scenarios against the Dask client); the
            scenario's name says so.
    """

    name: str
    unit: str
    higher_is_better: bool
    runners: dict[str, Callable[[bool], float]]
    target: str = ""
    repeat: int = 3
    notes: str = field(default="")
    #: the contender every ratio is computed against (joblib's backends are
    #: compared with joblib's default, loky)
    baseline: str = "stdlib"


def best_of(figures: list[float], higher_is_better: bool) -> float:
    return max(figures) if higher_is_better else min(figures)


def timed(fn: Callable[[], object]) -> float:
    """Seconds taken by fn()."""
    gc.collect()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def in_fresh_interpreter(fn: Callable[..., float], *args: object, timeout: float = 600) -> float:
    """``fn(*args)`` run in a new Python process: a memory figure there starts
    clean (a process's RSS does not shrink after what the contenders measured
    before it freed).  *fn* is a module-level function, *args* literals; the
    process is killed after *timeout* seconds."""
    code = f"from {fn.__module__} import {fn.__name__} as fn; print(fn(*{args!r}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        last = out.stderr.strip().splitlines()[-1:] or [f"exit code {out.returncode}"]
        raise RuntimeError(f"{fn.__name__} in a fresh interpreter: {last[0]}")
    return float(out.stdout.split()[-1])


def optional(module: str) -> bool:
    """True when a peer library is importable."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def load_scenarios(selector: str | None = None) -> list[Scenario]:
    out: list[Scenario] = []
    for name in MODULES:
        try:
            mod = importlib.import_module(f"{__package__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__package__}.{name}":
                continue
            raise
        for sc in mod.SCENARIOS:
            if selector is None or selector.lower() in sc.name.lower():
                out.append(sc)
    return out


def _fmt(value: float) -> str:
    if value != value:  # NaN
        return "failed"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


# A target is one or more clauses separated by commas (outside parentheses),
# each "OP NUMBERx [NAME]" (a ratio to the baseline's figure, or to contender
# NAME's) or "WORD OP NUMBER ..." (the figure itself, e.g. "efficiency >=
# 0.97"); a parenthesised part is a comment for the reader.
_CLAUSE = re.compile(r"^\s*(?:([A-Za-z][\w -]*?)\s+)?(>=|<=)\s*(\d+(?:\.\d*)?)\s*(?:(x)\s*([^(]*))?")

TARGET_LEGEND = (
    "vs stdlib: how many times better than the standard library (speed, or 1/time);\n"
    "  a scenario named '(vs X)' is compared with X instead.\n"
    "target: what shoal's row must reach; 'Nx' is a ratio vs stdlib ('Nx NAME' vs contender NAME),\n"
    "  a bare number the figure itself; clauses joined by ',' must all hold;\n"
    "met / MISSED: whether this run reached it."
)


def _clauses(target: str) -> list[str]:
    """*target* split at the commas that are not inside parentheses."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(target):
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            out.append(target[start:i])
            start = i + 1
    out.append(target[start:])
    return out


def _parse_target(target: str) -> list[tuple[str, float, bool, str]]:
    """The clauses of *target* it can read: (op, number, is a ratio, the
    contender named: for a ratio the one compared with, "" for the
    baseline; for a figure the one whose figure it is, when the clause
    starts with its name, e.g. "shoal-SA <= 1.2 GB")."""
    out = []
    for clause in _clauses(target):
        m = _CLAUSE.match(clause)
        if m:  # anything else is free text
            is_ratio = bool(m.group(4))
            name = m.group(5) if is_ratio else m.group(1)
            out.append((m.group(2), float(m.group(3)), is_ratio, (name or "").strip()))
    return out


def baseline_ratio_target(target: str, baseline: str = "stdlib") -> float | None:
    """The ratio *target* asks of shoal against *baseline* (what the chart
    marks), or None when it asks none."""
    for _op, number, is_ratio, name in _parse_target(target):
        if is_ratio and name in ("", baseline):
            return number
    return None


def target_met(
    target: str,
    value: float,
    ratio: float | None,
    ratios: dict[str, float | None] | None = None,
    figures: dict[str, float] | None = None,
) -> bool | None:
    """Whether shoal's *value* (its *ratio* to the baseline, and *ratios* to
    each contender by name) reached every clause of *target*; None when the
    target cannot be checked (no target, an unrecognised one, or a failed
    measurement).  A clause on a figure that names a contender (*figures*:
    each contender's) checks that contender's figure."""
    verdicts: list[bool | None] = []
    for op, number, is_ratio, name in _parse_target(target):
        if not is_ratio and figures is not None and name in figures:
            actual: float | None = figures[name]
        elif not is_ratio:
            actual = value
        elif not name:
            actual = ratio
        elif ratios is not None and name in ratios:
            actual = ratios[name]
        else:
            continue  # a contender that did not run here
        if actual is None or actual != actual:
            verdicts.append(None)
        else:
            verdicts.append(actual >= number if op == ">=" else actual <= number)
    if False in verdicts:
        return False
    if not verdicts or None in verdicts:
        return None
    return True


def ratio_to(value: float, base: float | None, higher_is_better: bool) -> float | None:
    """How many times better than *base* (speed, or 1/time); None if either failed."""
    if not base or base != base or not value or value != value:
        return None
    return value / base if higher_is_better else base / value


def scenario_record(sc: Scenario, figures: dict[str, float]) -> dict:
    """The machine-readable result of one scenario (what ``--json`` writes)."""
    base = figures.get(sc.baseline)
    results = []
    met = None
    for contender, value in figures.items():
        ratio = ratio_to(value, base, sc.higher_is_better)
        results.append({"contender": contender, "value": value if value == value else None, "ratio": ratio})
        if contender == "shoal":
            ratios = {name: ratio_to(value, other, sc.higher_is_better) for name, other in figures.items()}
            met = target_met(sc.target, value, ratio, ratios, figures)
    return {
        "name": sc.name,
        "unit": sc.unit,
        "higher_is_better": sc.higher_is_better,
        "target": sc.target,
        "baseline": sc.baseline,
        "met": met,
        "notes": sc.notes,
        "results": results,
    }


HEADER = f"{'scenario':44} {'contender':10} {'figure':>14} {'unit':12} {'vs stdlib':>10}  target"


def print_header(out=sys.stdout) -> None:
    print(TARGET_LEGEND, file=out)
    print(HEADER, file=out)
    print("-" * len(HEADER), file=out)


def table_rows(record: dict) -> list[tuple[str, str, str, str, str | None]]:
    """A scenario record as table cells, one row per contender: contender,
    figure, ratio, target (shoal's row only) and its verdict ("met",
    "MISSED", "?"; None on other rows)."""
    rows = []
    for row in record["results"]:
        figure = _fmt(float("nan") if row["value"] is None else row["value"])
        ratio = "" if row["ratio"] is None else f"{row['ratio']:.2f}x"
        if row["contender"] == "shoal" and record["target"]:
            verdict = {True: "met", False: "MISSED", None: "?"}[record["met"]]
            rows.append((row["contender"], figure, ratio, record["target"], verdict))
        else:
            rows.append((row["contender"], figure, ratio, "", None))
    return rows


def print_record(record: dict, out=sys.stdout) -> None:
    """One table row per contender; shoal's row carries the target and its verdict."""
    for contender, figure, ratio, target, verdict in table_rows(record):
        mark = f"{verdict:6} {target}" if verdict else ""
        print(
            f"{record['name']:44} {contender:10} {figure:>14} {record['unit']:12} {ratio:>10}  {mark}",
            file=out,
        )
    out.flush()


def print_summary(records: list[dict], out=sys.stdout) -> None:
    checked = [r for r in records if r["met"] is not None]
    missed = [r["name"] for r in checked if not r["met"]]
    print(f"\ntargets met: {len(checked) - len(missed)} of {len(checked)}", file=out)
    for name in missed:
        print(f"  missed: {name}", file=out)


def run(selector: str | None = None, quick: bool = False, out=sys.stdout) -> list[dict]:
    """Run the scenarios, print one row per contender, and return one
    :func:`scenario_record` per scenario."""
    records: list[dict] = []
    print_header(out)
    for sc in load_scenarios(selector):
        record = scenario_record(sc, measure(sc, quick, out))
        print_record(record, out)
        records.append(record)
    print_summary(records, out)
    return records


def measure(sc: Scenario, quick: bool, out=sys.stdout) -> dict[str, float]:
    """Each contender's best figure over the scenario's repeats (NaN for
    one that failed; its error is printed, and it is not run again).

    The repeats go round the contenders (A, B, C, A, B, C, ...), not each
    contender's in a row: a machine that gets busier or quieter during a
    scenario then moves every contender's figures alike, instead of the
    ratio of whoever ran last."""
    measured: dict[str, list[float]] = {name: [] for name in sc.runners}
    failed: set[str] = set()
    for _ in range(1 if quick else sc.repeat):
        for contender, fn in sc.runners.items():
            if contender in failed:
                continue
            try:
                measured[contender].append(float(fn(quick)))
            except Exception as exc:  # a failing contender is shown, not fatal
                print(f"  {sc.name} / {contender} failed: {type(exc).__name__}: {exc}", file=out)
                failed.add(contender)
    return {
        name: best_of(figures, sc.higher_is_better) if figures else float("nan")
        for name, figures in measured.items()
    }


def median(values: list[float]) -> float:
    return statistics.median(values)


def describe(saved: dict) -> str:
    """One line saying where and how results (as ``shoal bench --json``
    writes them) were measured."""
    return (
        f"shoal {saved.get('shoal', '?')}, Python {saved.get('python', '?')} on {saved.get('machine', '?')}, "
        f"{saved.get('cpus', '?')} CPUs, start method {saved.get('start_method', '?')}, "
        f"{'quick' if saved.get('quick') else 'full'} run"
        + (f", {saved['date']}" if saved.get("date") else "")
    )
