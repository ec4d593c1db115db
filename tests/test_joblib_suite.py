"""joblib's own ``test_parallel.py``, run against the shoal backend.

joblib ships its tests inside the package (``joblib.test``), so the file is
the one of the joblib installed here, unmodified; without it this module is
skipped, naming what is missing.  It runs in a child pytest (its settings
are joblib's, not shoal's: ``tests/joblib_suite/pytest.ini``) with the
plugin ``tests/joblib_suite/joblib_suite_plugin.py``, which adds ``"shoal"``
to the file's lists of process backends and keeps the cases that run shoal
(about 150: every ``backend`` parameter, nested loops with each other
backend, scripts run with ``python -c`` and as files...).

Every case must pass, except those listed below with the reason; those run
as strict xfails, so a fix shows up as a failure of this test until its
entry goes.  The run must not hang (a time limit per case and for the whole
run), no case may leave a process running (the plugin checks after each),
and nothing the run started may outlive it (processes of its session,
entries in ``/dev/shm``: conftest's leak check).  It takes about 100 s on
two cores (marked ``slow``).
"""

from __future__ import annotations

import faulthandler
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import psutil
import pytest

pytest.importorskip("joblib")
pytest.importorskip("numpy")

SUITE = Path(__file__).parent / "joblib_suite"
sys.path.insert(0, str(SUITE))
from leftovers import describe, stop  # noqa: E402 - the same cleanup as the child run's

#: Cases that check what shoal does differently on purpose: skipped in
#: effect (strict xfail), with the reason.
DIFFERENCES: dict[str, str] = {
    "test_memmapping_leaks[shoal]": (
        "counts the files joblib writes into temp_folder for arrays over max_nbytes; shoal writes no "
        "files (arrays travel in anonymous shared memory), so the folder stays empty"
    ),
}

#: Cases that fail for shoal engine bugs fixed on another branch: strict
#: xfails (check them after the merge).  A timeout, in seconds, bounds a case
#: that would otherwise wait for the bug (it passes in a few seconds).
ENGINE_BUGS: dict[str, tuple[str, float | None]] = {}

#: The whole child run, in seconds (it takes about 100 s).
RUN_TIMEOUT = 900


def _joblib_test_file() -> str:
    spec = importlib.util.find_spec("joblib.test.test_parallel")
    if spec is None or spec.origin is None:
        import joblib

        pytest.skip(
            f"the installed joblib {joblib.__version__} has no joblib.test package (some distributions "
            "strip it): pip install --force-reinstall joblib, or run from joblib's sdist"
        )
    return spec.origin


def _expected_file(tmp_path: Path) -> Path:
    entries = {name: {"reason": f"deliberate difference: {why}"} for name, why in DIFFERENCES.items()}
    entries.update({name: {"reason": why, "timeout": limit} for name, (why, limit) in ENGINE_BUGS.items()})
    path = tmp_path / "expected.json"
    path.write_text(json.dumps(entries))
    return path


def _outcomes(junit: Path) -> dict[str, str]:
    """Case name -> passed, failed, error, skipped or xfailed, from pytest's JUnit XML."""
    out = {}
    for case in ET.parse(junit).iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed" if child.tag == "failure" else "error"
            elif child.tag == "skipped":
                outcome = "xfailed" if child.get("type") == "pytest.xfail" else "skipped"
        out[case.get("name", "?")] = outcome
    return out


def _session_processes(sid: int) -> list[psutil.Process]:
    """Live processes of session *sid*: what the child run started and left."""
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (OSError, psutil.Error):
            pass
    return found


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT + 60)
def test_joblib_test_parallel_passes_with_the_shoal_backend(tmp_path):
    _joblib_test_file()
    # This test waits minutes by design: no traceback dump at the session's
    # faulthandler_timeout (the run's own time limits stand for it).
    faulthandler.cancel_dump_traceback_later()
    junit = tmp_path / "junit.xml"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(SUITE), os.environ.get("PYTHONPATH")])),
        "SHOAL_JOBLIB_EXPECTED": str(_expected_file(tmp_path)),
    }
    cmd = [
        sys.executable, "-m", "pytest", "-c", str(SUITE / "pytest.ini"), "--rootdir", str(SUITE),
        "--pyargs", "joblib.test.test_parallel", "-q", "-rfEX", f"--junitxml={junit}",
    ]  # fmt: skip
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"joblib's test_parallel.py did not finish in {RUN_TIMEOUT} s:\n{output[-6000:]}")
    finally:
        # Helpers that outlive the child by a moment (resource trackers
        # cleaning /dev/shm once their clients are gone) get time to go.
        deadline = time.monotonic() + 30
        while (left := _session_processes(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        described = [describe(p) for p in left]
        stop(left)
    elapsed = time.monotonic() - start
    assert not described, f"the joblib suite left processes running: {described}\n{output[-3000:]}"
    outcomes = _outcomes(junit)
    tally = {k: list(outcomes.values()).count(k) for k in sorted(set(outcomes.values()))}
    print(f"joblib test_parallel.py with shoal: {tally} in {elapsed:.0f} s")
    assert proc.returncode == 0, f"unexpected outcomes {tally}:\n{output[-8000:]}"
    stale = sorted(name for name in {*DIFFERENCES, *ENGINE_BUGS} if outcomes.get(name) != "xfailed")
    assert not stale, f"listed cases that did not run as expected failures (renamed in joblib?): {stale}"
    assert len(outcomes) >= 100, f"only {len(outcomes)} cases ran: the lists were not patched? {tally}"
