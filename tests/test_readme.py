"""Every Python example in README.md runs as a script and prints what it says."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import run_python

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, tmp_path):
    script = tmp_path / f"readme_{index}.py"
    script.write_text(BLOCKS[index], encoding="utf-8")
    out = run_python(str(script), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    # Each example states its expected output in comments: check the values.
    for expected in re.findall(r"print\(.*?\)\s+# (\S.*)", BLOCKS[index]):
        for token in re.findall(r"[\w.]+", expected.split(",")[0]):
            if token.isdigit():
                assert token in out.stdout, (expected, out.stdout)
