"""The documentation site builds with warnings as errors, and shows what the
repository holds (API reference, benchmark results, README's differences)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert build.returncode == 0, build.stdout + build.stderr
    return out


def test_docs_build_strict_with_api_reference(site):
    reference = (site / "reference" / "index.html").read_text()
    for name in (
        "shoal.Pool",
        "shoal.ProcessPoolExecutor",
        "shoal.SharedDict",
        "shoal.WorkerDiedError",
        "shoal.Actor",
        "shoal.shared",
        "shoal.worker_state",
        "shoal.ActorDiedError",
    ):
        assert f'id="{name}"' in reference, name
    # Sphinx roles in docstrings become links or code, not literal text.
    assert ":class:" not in reference and "The tree::" not in reference
    assert 'href="#shoal.WorkerStartError"' in reference
    # shoal.SharedArray / shoal.share are loaded lazily (numpy is optional):
    # the reference shows the real class, not the stub for "no numpy".
    shared_array = reference.split('id="shoal.SharedArray"', 1)[1].split('id="shoal.share"', 1)[0]
    assert "zero-filled" in shared_array and "Needs numpy" not in shared_array


def test_benchmark_page_shows_the_committed_results_as_table_and_chart(site):
    saved = json.loads((ROOT / "docs" / "benchmarks" / "results.json").read_text())
    page = (site / "benchmarks" / "index.html").read_text()
    for scenario in saved["scenarios"]:
        assert scenario["name"].replace("&", "&amp;") in page
    assert 'src="ratios.svg"' in page  # the chart drawn at build time
    chart = (site / "benchmarks" / "ratios.svg").read_text()
    assert "<svg" in chart and saved["scenarios"][0]["name"].replace("&", "&amp;") in chart


def test_differences_page_mirrors_the_readme_section(site):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Differences from the standard library", 1)[1].split("\n## ", 1)[0]
    first_bullet = next(line for line in section.splitlines() if line.startswith("- **"))
    title = first_bullet.split("**")[1]
    assert title in (site / "guide" / "differences" / "index.html").read_text()


def test_no_page_or_hint_installs_shoal_from_a_package_index():
    # shoal is not published on a package index: `pip install shoal` and
    # `pip install "shoal[dask]"` fail with "No matching distribution", so no
    # page, guide or error hint may tell users to run them (a clone's
    # `pip install '.[dask]'`, a wheel, or the extra's own PyPI package work).
    pages = [ROOT / "README.md", ROOT / "CHANGES.md", *sorted((ROOT / "docs").rglob("*.md"))]
    sources = [*sorted((ROOT / "src" / "shoal").rglob("*.py")), *sorted((ROOT / "benchmarks").glob("*.py"))]
    wrong = re.compile(r"pip install\s+['\"]?shoal\b|\bshoal\[\w")
    offenders = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in pages + sources
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if wrong.search(line) and "cannot install" not in line  # saying that it does not work is right
    ]
    assert not offenders, "\n".join(offenders)


def test_no_address_is_published_that_does_not_exist():
    # Neither the package metadata nor the site configuration may send users
    # to a documentation site or repository that was never published.
    for name in ("pyproject.toml", "mkdocs.yml"):
        text = (ROOT / name).read_text(encoding="utf-8")
        assert "readthedocs.io" not in text and "github.com/shoal-dev" not in text, name
    assert "\n[project.urls]" not in (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "readthedocs" not in readme and "mkdocs serve" in readme
