"""Every Python example in README.md, and every complete one (with an
``if __name__ == "__main__":``) in the documentation under docs/, runs as a
user would run it and prints what it says: as a script under each start
method, on stdin under spawn (where the standard library's workers cannot
find a function of the program), and the Dask examples against a cluster
started with the ``dask`` commands, with the address the text tells users
to add."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from helpers import dask_cluster, program_errors, run_as_user, user_env

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def _blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), re.S)


BLOCKS = [pytest.param(block, id=f"README-{i}") for i, block in enumerate(_blocks(README))]
DOC_EXAMPLES = [
    pytest.param(block, id=f"{page.relative_to(ROOT / 'docs')}-{i}")
    for page in sorted((ROOT / "docs").rglob("*.md"))
    for i, block in enumerate(_blocks(page))
    if 'if __name__ == "__main__":' in block
]
EXAMPLES = BLOCKS + DOC_EXAMPLES


def _code(block: str) -> str:
    """The block without its comments."""
    return "\n".join(line.split("#", 1)[0] for line in block.splitlines())


DASK_EXAMPLES = [
    p for p in EXAMPLES if 'backend="dask"' in _code(p.values[0]) and "address=" not in _code(p.values[0])
]

#: How each example runs: (start method, way); the first in the quick subset.
RUNS = [
    pytest.param("fork", "file", id="fork-file"),
    pytest.param("spawn", "file", id="spawn-file", marks=pytest.mark.slow),
    pytest.param("forkserver", "file", id="forkserver-file", marks=pytest.mark.slow),
    pytest.param("spawn", "stdin", id="spawn-stdin", marks=pytest.mark.slow),
]


def test_readme_and_docs_have_examples():
    assert len(BLOCKS) >= 4
    assert len(DOC_EXAMPLES) >= 8
    assert DASK_EXAMPLES, "the Dask examples are run against a real cluster"


def _prints_what_it_says(code: str, tmp_path: Path, start_method: str, way: str, **env: str) -> None:
    out = run_as_user(code, way, tmp_path, user_env(start_method, **env))
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in program_errors(out.stderr), out.stderr
    # Each example states its expected output in comments: check the values.
    for expected in re.findall(r"print\(.*?\)\s+# (\S.*)", code):
        for token in re.findall(r"[\w.]+", expected.split(",")[0]):
            if token.isdigit():
                assert token in out.stdout, (expected, out.stdout)


@pytest.mark.parametrize("start_method, way", RUNS)
@pytest.mark.parametrize("code", EXAMPLES)
def test_example_runs_and_prints_what_it_says(code, start_method, way, tmp_path):
    if way == "stdin" and "Process(" in _code(code):
        pytest.skip(
            "shoal.Process is the standard library's: under spawn its target must be importable "
            "(README, Differences)"
        )
    _prints_what_it_says(code, tmp_path, start_method, way)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    where = tmp_path_factory.mktemp("dask-cluster")
    with dask_cluster(where, workers=2, env=user_env()) as (address, _processes):
        yield address


@pytest.mark.slow
@pytest.mark.parametrize("code", DASK_EXAMPLES)
def test_dask_example_runs_on_a_real_cluster_with_the_address_given(code, cluster, tmp_path):
    # "Point shoal at it with address=...": the example as the text tells
    # users to change it, on a cluster whose workers have none of its code.
    pointed = code.replace('backend="dask"', f'backend="dask", address="{cluster}"')
    assert pointed != code
    _prints_what_it_says(pointed, tmp_path, "fork", "file")
