"""The scenario record, timing helpers, and the table printer."""

from __future__ import annotations

import gc
import importlib
import statistics
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
        target: the ratio shoal must reach (for the table's last column), as
            text, e.g. ">= 12x".
        repeat: how many times each contender runs; the best figure counts.
        baseline: the contender ratios are computed against.
    """

    name: str
    unit: str
    higher_is_better: bool
    runners: dict[str, Callable[[bool], float]]
    target: str = ""
    repeat: int = 3
    notes: str = field(default="")
    baseline: str = "stdlib"


def best_of(figures: list[float], higher_is_better: bool) -> float:
    return max(figures) if higher_is_better else min(figures)


def timed(fn: Callable[[], object]) -> float:
    """Seconds taken by fn()."""
    gc.collect()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


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


def run(selector: str | None = None, quick: bool = False, out=sys.stdout) -> list[dict]:
    """Run the scenarios and print one row per contender; return the rows."""
    rows: list[dict] = []
    scenarios = load_scenarios(selector)
    header = f"{'scenario':44} {'contender':10} {'figure':>14} {'unit':12} {'vs stdlib':>10}  target"
    print(header, file=out)
    print("-" * len(header), file=out)
    for sc in scenarios:
        results: dict[str, float] = {}
        for contender, fn in sc.runners.items():
            figures = []
            for _ in range(1 if quick else sc.repeat):
                try:
                    figures.append(float(fn(quick)))
                except Exception as exc:  # a failing contender is shown, not fatal
                    print(f"  {sc.name} / {contender} failed: {type(exc).__name__}: {exc}", file=out)
                    break
            results[contender] = best_of(figures, sc.higher_is_better) if figures else float("nan")
        base = results.get(sc.baseline)
        for contender, value in results.items():
            ratio = ""
            if base and value == value and base == base and value:
                r = value / base if sc.higher_is_better else base / value
                ratio = f"{r:.2f}x"
            target = sc.target if contender == "shoal" else ""
            print(f"{sc.name:44} {contender:10} {_fmt(value):>14} {sc.unit:12} {ratio:>10}  {target}", file=out)
            rows.append({"scenario": sc.name, "contender": contender, "value": value, "unit": sc.unit, "ratio": ratio})
        out.flush()
    if not quick:
        print(
            "\nratio = how many times better than the standard library (speed, or 1/time);"
            " dask scenarios: than the Dask client.",
            file=out,
        )
    return rows


def median(values: list[float]) -> float:
    return statistics.median(values)
