"""shoal installs from its wheel where there is no compiler, as users install it.

``tools/build-wheels`` (the command README gives) builds the wheel for the
Python running the tests and repairs it with ``auditwheel``; the wheel is
installed into a fresh virtual environment whose ``PATH`` has no compiler
(only the environment's own ``bin``; ``CC`` is ``/bin/false``), with pip
allowed to install wheels only, so nothing can have been compiled.  Then,
from a directory outside the checkout, the seed tutorial's examples run with
the installed shoal and print what ``tests/test_seed.py`` checks, and
``shoal bench`` finds its benchmark suite in the installed package.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from test_seed import CHECKS, EXAMPLES

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _run(args: list, *, env: dict | None = None, cwd: Path | None = None, timeout: float = 300) -> str:
    proc = subprocess.run(
        [str(a) for a in args], capture_output=True, encoding="utf-8", env=env, cwd=cwd, timeout=timeout
    )
    assert proc.returncode == 0, f"{args}: rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def test_the_wheel_installs_without_a_compiler_and_runs_the_seed_examples(tmp_path):
    # Build and repair, as README says: tools/build-wheels PYTHON.
    dist = tmp_path / "dist"
    build = [sys.executable, ROOT / "tools" / "build-wheels", sys.executable, "--out", dist]
    shown = _run(build, timeout=600)
    (wheel,) = dist.glob("shoal-*.whl")
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    assert re.fullmatch(rf"shoal-[\w.]+-{tag}-{tag}-manylinux_2_\d+_x86_64\.whl", wheel.name), wheel.name
    # auditwheel show reports a manylinux tag for it.
    assert re.search(r'consistent with the following platform tag: "manylinux_2_\d+_x86_64"', shown), shown
    show = _run([sys.executable, "-m", "auditwheel", "show", wheel])
    assert re.search(r'platform tag:\s+"manylinux_2_\d+_x86_64"', show), show

    # What it holds: the package, its C extension and the benchmark suite
    # `shoal bench` runs; no tests, no C sources.
    names = zipfile.ZipFile(wheel).namelist()
    files = [n for n in names if ".dist-info/" not in n]
    assert all(n.startswith("shoal/") for n in files), files
    assert any(re.fullmatch(rf"shoal/_native\.cpython-{tag[2:]}-x86_64-linux-gnu\.so", n) for n in files)
    assert "shoal/py.typed" in files and "shoal/benchmarks/bench_pool.py" in files
    assert not [n for n in files if re.search(r"(^|/)(tests?|conftest|test_\w+)(/|\.py$)|\.[ch]$", n)]

    # A fresh environment with no compiler on PATH; pip may not build anything.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv])
    bindir = venv / "bin"
    empty = tmp_path / "no-compiler-here"
    empty.mkdir()
    env = {
        **os.environ,
        "PATH": f"{bindir}{os.pathsep}{empty}",
        "CC": "/bin/false",
        "CXX": "/bin/false",
        "PYTHONIOENCODING": "utf-8",
    }
    env.pop("PYTHONPATH", None)
    for compiler in ("cc", "gcc", "clang", "c++"):
        assert shutil.which(compiler, path=env["PATH"]) is None
    installed = _run([bindir / "python", "-m", "pip", "install", "--only-binary=:all:", wheel], env=env)
    assert "Building wheel" not in installed and "setup.py" not in installed, installed

    # From outside the checkout: the installed shoal, not the source tree.
    here = tmp_path / "user"
    here.mkdir()
    code = "import shoal, shoal._native; print(shoal.__file__)"
    where = _run([bindir / "python", "-c", code], env=env, cwd=here)
    assert where.strip().startswith(str(venv)) and str(ROOT) not in where
    for name, check in CHECKS.items():
        shutil.copy(EXAMPLES / name, here / name)
        out = _run([bindir / "python", name], env=env, cwd=here, timeout=120)
        check(out)

    # `shoal bench` finds every benchmark module in the installed package
    # (asked for no scenario, it lists them all).
    proc = subprocess.run(
        [bindir / "shoal", "bench", "-k", "no such scenario"],
        capture_output=True,
        encoding="utf-8",
        env=env,
        cwd=here,
        timeout=120,
    )
    assert proc.returncode == 2 and "pool start + first result" in proc.stderr, proc.stderr
