"""Every Python example in README.md, and every complete one (with an
``if __name__ == "__main__":``) in the documentation under docs/, runs as a
script and prints what it says."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from helpers import run_python

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def _blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), re.S)


BLOCKS = _blocks(README)
DOC_EXAMPLES = [
    pytest.param(block, id=f"{page.relative_to(ROOT / 'docs')}-{i}")
    for page in sorted((ROOT / "docs").rglob("*.md"))
    for i, block in enumerate(_blocks(page))
    if 'if __name__ == "__main__":' in block
]


def test_readme_and_docs_have_examples():
    assert len(BLOCKS) >= 4
    assert len(DOC_EXAMPLES) >= 8


def _runs_and_prints_what_it_says(code: str, tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(code, encoding="utf-8")
    out = run_python(str(script), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    # Each example states its expected output in comments: check the values.
    for expected in re.findall(r"print\(.*?\)\s+# (\S.*)", code):
        for token in re.findall(r"[\w.]+", expected.split(",")[0]):
            if token.isdigit():
                assert token in out.stdout, (expected, out.stdout)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, tmp_path):
    _runs_and_prints_what_it_says(BLOCKS[index], tmp_path)


@pytest.mark.parametrize("code", DOC_EXAMPLES)
def test_docs_example_runs(code, tmp_path):
    _runs_and_prints_what_it_says(code, tmp_path)
