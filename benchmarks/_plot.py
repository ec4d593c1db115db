"""The ratios chart of ``shoal bench --plot`` and of the documentation's
benchmark page, drawn with matplotlib (the ``plot`` extra) from results as
``shoal bench --json`` writes them."""

from __future__ import annotations

from typing import IO

from ._framework import _TARGET, describe

PALETTE = ("#1f6fb4", "#9a9a9a", "#c9a227", "#7a9e4b", "#b05a7a", "#5aa0b0", "#6b4c9a")


def draw_ratios(saved: dict, target: str | IO[bytes], fmt: str | None = None) -> None:
    """Draw every contender's ratio to the standard library, one group of
    bars per scenario, on a log scale, with shoal's ratio target marked red.

    *target* is a path (the format follows its extension) or a binary file
    (then give *fmt*, e.g. ``"svg"``).
    """
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    scenarios = [sc for sc in saved["scenarios"] if any(r["ratio"] for r in sc["results"])]
    contenders = sorted({r["contender"] for sc in scenarios for r in sc["results"]} - {"stdlib"},
                        key=lambda c: (c != "shoal", c))
    colors = {c: PALETTE[i % len(PALETTE)] for i, c in enumerate(contenders)}
    height = 0.8 / max(1, len(contenders))
    fig = Figure(figsize=(10, 1.2 + 0.22 * len(scenarios) * max(2, len(contenders))), layout="constrained")
    ax = fig.add_subplot()
    labelled: set[str] = set()
    ticks = []
    for i, sc in enumerate(scenarios):
        y = len(scenarios) - 1 - i
        ticks.append((y, f"{sc['name']} [{sc['unit']}]"))
        for j, contender in enumerate(contenders):
            ratio = next((r["ratio"] for r in sc["results"] if r["contender"] == contender), None)
            if ratio:
                # From 1 (the standard library) to the ratio: left of it is worse.
                ax.barh(y + 0.4 - (j + 0.5) * height, ratio - 1, height, left=1, color=colors[contender],
                        label=None if contender in labelled else contender)
                labelled.add(contender)
        m = _TARGET.match(sc.get("target") or "")
        if m and m.group(3):  # a ratio target: where shoal's bar must reach
            ax.plot([float(m.group(2))] * 2, [y - 0.45, y + 0.45], color="#d62728", linewidth=2)
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
    fig.savefig(target, format=fmt, metadata=metadata)
