"""MkDocs hooks: pages built from files the repository already keeps.

* ``benchmarks.md``: ``<!-- shoal-bench-table -->`` becomes the table of
  ``docs/benchmarks/results.json`` (written by ``shoal bench --json``), and
  ``benchmarks/ratios.svg`` is drawn from the same file with the chart code
  of ``shoal bench --plot`` -- the table and the chart cannot disagree.
* ``guide/differences.md``: ``<!-- shoal-readme-differences -->`` becomes
  README.md's "Differences from the standard library" section, so the list
  is written once.

A marker whose source is missing is an error, which ``mkdocs build
--strict`` (tests/test_docs.py) turns into a failed build.
"""

from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path

from mkdocs.structure.files import File

log = logging.getLogger("mkdocs.hooks.shoal")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "benchmarks" / "results.json"
README = ROOT / "README.md"
DIFFERENCES = "Differences from the standard library"


def on_files(files, config):
    from shoal.benchmarks._plot import draw_ratios

    svg = io.BytesIO()
    draw_ratios(_results(), svg, fmt="svg")
    files.append(File.generated(config, "benchmarks/ratios.svg", content=svg.getvalue()))
    return files


def on_page_markdown(markdown, page, config, files):
    if "<!-- shoal-bench-table -->" in markdown:
        markdown = markdown.replace("<!-- shoal-bench-table -->", _bench_table(_results()))
    if "<!-- shoal-readme-differences -->" in markdown:
        markdown = markdown.replace("<!-- shoal-readme-differences -->", _readme_section(DIFFERENCES))
    return markdown


def _results() -> dict:
    return json.loads(RESULTS.read_text(encoding="utf-8"))


def _bench_table(saved: dict) -> str:
    from shoal.benchmarks._framework import describe, table_rows

    lines = [
        f"Measured with `shoal bench --json`: {describe(saved)}.",
        "",
        "| scenario | contender | figure | unit | vs stdlib | target |",
        "|---|---|--:|---|--:|---|",
    ]
    for sc in saved["scenarios"]:
        for i, (contender, figure, ratio, target, verdict) in enumerate(table_rows(sc)):
            if verdict:
                contender = f"**{contender}**"
                target = f"{'**missed**' if verdict == 'MISSED' else verdict}: {target}"
            cells = [sc["name"] if i == 0 else "", contender, figure, sc["unit"], ratio, target]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _readme_section(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    if not m:
        log.error("README.md has no '## %s' section for guide/differences.md", title)
        return ""
    body = m.group(1).strip() + "\n"
    # README's relative links point into the repository, which has no public
    # address: a page of docs/ becomes a link within the site (this section
    # lands in guide/), any other file its path in the repository.
    return re.sub(r"\[([^]]+)\]\((?!https?://|#)([^)]+)\)", _repository_link, body)


def _repository_link(m: re.Match) -> str:
    text, target = m.group(1), m.group(2)
    if target.startswith("docs/") and target.endswith(".md"):
        return f"[{text}](../{target.removeprefix('docs/')})"
    return text if text.strip("`") == target else f"{text} (`{target}` in the repository)"
