"""The ratios chart of ``shoal bench --plot`` and of the documentation's
benchmark page, drawn with matplotlib (the ``plot`` extra) from results as
``shoal bench --json`` writes them."""

from __future__ import annotations

from typing import IO

from ._framework import baseline_ratio_target, describe

PALETTE = ("#1f6fb4", "#9a9a9a", "#c9a227", "#7a9e4b", "#b05a7a", "#5aa0b0", "#6b4c9a")


def draw_ratios(saved: dict, target: str | IO[bytes], fmt: str | None = None) -> None:
    """Draw every contender's ratio to the standard library, one group of
    bars per scenario, on a log scale, with shoal's ratio target marked red.

    *target* is a path (the format follows its extension) or a binary file
    (then give *fmt*, e.g. ``"svg"``).
    """
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    scenarios = [sc for sc in saved["scenarios"] if any(r["ratio"] for r in sc["results"])]
    contenders = sorted(
        {r["contender"] for sc in scenarios for r in sc["results"]} - {"stdlib"},
        key=lambda c: (c != "shoal", c),
    )
    colors = {c: PALETTE[i % len(PALETTE)] for i, c in enumerate(contenders)}
    # One row per bar, top to bottom; a scenario's bars sit together, and
    # only the contenders it measured take room.
    groups = []
    for sc in scenarios:
        ratios = {
            r["contender"]: r["ratio"] for r in sc["results"] if r["ratio"] and r["contender"] != "stdlib"
        }
        groups.append((sc, [(c, ratios[c]) for c in contenders if c in ratios]))
    rows = sum(len(bars) for _, bars in groups) + 0.6 * len(groups)
    fig = Figure(figsize=(10, 1.0 + 0.2 * rows), layout="constrained")
    ax = fig.add_subplot()
    labelled: set[str] = set()
    ticks = []
    y = 0.0
    for sc, bars in groups:
        top = y
        for contender, ratio in bars:
            # From 1 (the standard library) to the ratio: left of it is worse.
            ax.barh(
                -y,
                ratio - 1,
                0.8,
                left=1,
                color=colors[contender],
                label=None if contender in labelled else contender,
            )
            labelled.add(contender)
            y += 1
        ticks.append((-(top + y - 1) / 2, f"{sc['name']} [{sc['unit']}]"))
        mark = baseline_ratio_target(sc.get("target") or "", sc.get("baseline") or "stdlib")
        if mark is not None:  # a ratio target: where shoal's bar must reach
            ax.plot([mark] * 2, [-top + 0.5, -(y - 0.5)], color="#d62728", linewidth=2)
        y += 0.6
    ax.set_ylim(-(y - 0.1), 1.0)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yticks([y for y, _ in ticks], [text for _, text in ticks], fontsize=8)
    ax.set_xlabel("times better than the standard library (speed, or 1/time; log scale); red: shoal's target")
    ax.set_title(describe(saved), fontsize=9)
    if labelled:
        ax.legend(loc="best", fontsize=8)
    if fmt is None and isinstance(target, str):
        fmt = target.rsplit(".", 1)[-1].lower() if "." in target else "png"
    # No date in SVG/PDF metadata, so the same results draw the same file.
    metadata = {"Date": None} if fmt in ("svg", "pdf") else None
    fig.savefig(target, format=fmt, metadata=metadata, bbox_inches="tight")
