"""The ratios chart of ``shoal bench --plot`` and of the documentation's
benchmark page, drawn with matplotlib (the ``plot`` extra) from results as
``shoal bench --json`` writes them."""

from __future__ import annotations

from typing import IO

from ._framework import baseline_ratio_target, describe

#: One colour per contender, the same in every chart: the suite's contenders
#: by name, shoal's own variants in blues and greens, the peers in warm or
#: neutral colours.  Red is kept for the targets.
CONTENDER_COLORS = {
    "shoal": "#1f5fa8",
    "shoal bs=1": "#6fa8dc",
    "shoal-SA": "#17becf",
    "shoal-share": "#2e8b57",
    "shoal-sync": "#9acd32",
    "shared=": "#4b0082",
    "loky": "#ff8c00",
    "mpire": "#8c564b",
    "joblib": "#e6b800",
    "mp.Lock": "#e377c2",
    "no pool": "#7f7f7f",
    "client.map": "#000000",
    "submit": "#bcbd22",
}
#: For contenders the table does not name (a scenario added later): distinct
#: from the colours above and from each other, handed out in name order.
SPARE_COLORS = ("#9467bd", "#c49c94", "#393b79", "#ad494a", "#637939", "#7b4173", "#d6616b", "#5254a3")


def contender_colors(contenders: list[str]) -> dict[str, str]:
    """A colour for each contender, never one shared by two of them."""
    colors = {c: CONTENDER_COLORS[c] for c in contenders if c in CONTENDER_COLORS}
    spare = [c for c in SPARE_COLORS if c not in colors.values()]
    for i, c in enumerate(sorted(set(contenders) - set(colors))):
        if i < len(spare):
            colors[c] = spare[i]
        else:  # more new contenders than spare colours: grey levels, still distinct
            level = 0.15 + 0.7 * (i - len(spare)) / max(1, len(contenders))
            colors[c] = "#" + f"{round(255 * level):02x}" * 3
    return colors


def draw_ratios(saved: dict, target: str | IO[bytes], fmt: str | None = None) -> None:
    """Draw every contender's ratio to the scenario's baseline (the standard
    library, unless the scenario names another), one group of bars per
    scenario, on a log scale, with shoal's ratio target marked red.  Each bar
    is labelled with its contender and ratio, and each contender has one
    colour throughout, so a bar never has to be matched by colour alone.

    *target* is a path (the format follows its extension) or a binary file
    (then give *fmt*, e.g. ``"svg"``).
    """
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    scenarios = [sc for sc in saved["scenarios"] if any(r["ratio"] for r in sc["results"])]
    groups = []
    for sc in scenarios:
        baseline = sc.get("baseline") or "stdlib"
        bars = [
            (r["contender"], r["ratio"])
            for r in sc["results"]
            if r["ratio"] and r["contender"] not in ("stdlib", baseline)
        ]
        bars.sort(key=lambda bar: (bar[0] != "shoal", not bar[0].startswith("shoal"), bar[0]))
        groups.append((sc, baseline, bars))
    order = sorted(
        {c for _, _, bars in groups for c, _ in bars},
        key=lambda c: (c != "shoal", not c.startswith("shoal"), c),
    )
    colors = contender_colors(order)
    ratios = [r for _, _, bars in groups for _, r in bars] or [1.0]
    # Room beyond the longest bars for their labels.
    low, high = min(min(ratios), 1.0) / 25, max(max(ratios), 1.0) * 25

    rows = sum(len(bars) for _, _, bars in groups) + 0.6 * len(groups)
    fig = Figure(figsize=(11, 1.4 + 0.22 * rows), layout="constrained")
    ax = fig.add_subplot()
    labelled: set[str] = set()
    ticks = []
    y = 0.0
    for sc, baseline, bars in groups:
        top = y
        for contender, ratio in bars:
            # From 1 (the baseline) to the ratio: left of 1 is worse.
            ax.barh(
                -y,
                abs(ratio - 1) or 1e-9,
                0.8,
                left=min(ratio, 1.0),
                color=colors[contender],
                label=None if contender in labelled else contender,
            )
            labelled.add(contender)
            ax.annotate(
                f"{contender} {ratio:,.0f}x" if ratio >= 1000 else f"{contender} {ratio:.3g}x",
                (ratio, -y),
                xytext=(4 if ratio >= 1 else -4, 0),
                textcoords="offset points",
                ha="left" if ratio >= 1 else "right",
                va="center",
                fontsize=6.5,
                color="#333333",
            )
            y += 1
        name = f"{sc['name']} [{sc['unit']}]"
        if baseline != "stdlib" and baseline not in sc["name"]:
            name += f" (vs {baseline})"
        ticks.append((-(top + y - 1) / 2, name))
        mark = baseline_ratio_target(sc.get("target") or "", baseline)
        if mark is not None:  # a ratio target: where shoal's bar must reach
            ax.plot([mark] * 2, [-top + 0.5, -(y - 0.5)], color="#d62728", linewidth=2)
        y += 0.6
    ax.set_ylim(-(y - 0.1), 1.0)
    ax.set_xlim(low, high)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yticks([y for y, _ in ticks], [text for _, text in ticks], fontsize=8)
    ax.set_xlabel(
        "times better than the standard library, or the contender named (speed, or 1/time; log scale); "
        "red: shoal's target"
    )
    ax.set_title(describe(saved), fontsize=9)
    if labelled:
        handles, labels = ax.get_legend_handles_labels()
        by_label = dict(zip(labels, handles, strict=True))
        ax.legend(
            [by_label[c] for c in order if c in by_label],
            [c for c in order if c in by_label],
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            fontsize=8,
            title="contender",
            title_fontsize=8,
        )
    if fmt is None and isinstance(target, str):
        fmt = target.rsplit(".", 1)[-1].lower() if "." in target else "png"
    # No date in SVG/PDF metadata, so the same results draw the same file.
    metadata = {"Date": None} if fmt in ("svg", "pdf") else None
    fig.savefig(target, format=fmt, metadata=metadata, bbox_inches="tight")
