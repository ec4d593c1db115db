"""The native code under AddressSanitizer and UndefinedBehaviorSanitizer.

``tools/sanitize`` builds ``shoal._native`` with
``-fsanitize=address,undefined`` into a virtual environment of its own and
runs the tests that drive the native code hardest with the sanitizer
runtime preloaded (``tests/test_native.py``, ``test_shared_dict.py``,
``test_shared_chaos.py`` and ``test_hostile_bytes.py``, whose fuzzers feed
the SharedDict core corrupt memory); any report, in any process, fails it
(see the script).  It takes about three and a half minutes on a 2-core
machine, the virtual environment built from nothing, so it is marked slow
(``.ci/run`` runs the slow tests too); ``docs/security.md`` gives the
command to run it by hand.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import kill_group

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "sanitize"


def _libasan() -> str | None:
    gcc = shutil.which(os.environ.get("CC", "gcc"))
    if gcc is None:
        return None
    path = subprocess.run([gcc, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


@pytest.mark.timeout(1800)
def test_native_code_runs_clean_under_asan_and_ubsan(tmp_path):
    if _libasan() is None:
        pytest.skip("needs gcc with libasan (the sanitizer runtime): none found")
    proc = subprocess.Popen(
        [str(SCRIPT)],
        cwd=ROOT,
        # The build is for the Python running this test (tools/sanitize
        # would take python3 from PATH).
        env={**os.environ, "SHOAL_SANITIZE_DIR": str(tmp_path), "PYTHON": sys.executable},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=1700)
    finally:
        kill_group(proc)  # whatever the run left behind (it should leave nothing)
    tail = "\n".join(out.splitlines()[-60:])
    if proc.returncode == 2:  # no sanitizer runtime, or the packages could not be installed
        pytest.skip(f"tools/sanitize could not set up: {tail}")
    assert proc.returncode == 0, tail
    assert "tools/sanitize: no sanitizer report" in out, tail
