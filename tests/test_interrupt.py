"""Ctrl-C during a long map, imap or get: KeyboardInterrupt once, promptly,
no traceback spam from workers, no process left behind.

Ctrl-C in a terminal sends SIGINT to the whole foreground process group, so
the test starts the script in its own group and signals the group.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
from helpers import kill_group, wait_until

SCRIPT = textwrap.dedent(
    """
    import sys, time
    import shoal

    def slow(x):
        time.sleep(0.5)
        return x

    if __name__ == "__main__":
        pool = shoal.Pool(2, context=sys.argv[2])
        print(" ".join(map(str, pool._engine.worker_pids)), flush=True)
        how = sys.argv[1]
        if how == "map":
            pool.map(slow, range(200), chunksize=1)
        elif how == "imap":
            for _ in pool.imap(slow, range(200)):
                pass
        elif how == "get":
            pool.apply_async(slow, (1,))
            pool.apply_async(time.sleep, (60,)).get()
        elif how == "with":
            with shoal.Pool(2) as other:
                other.map(slow, range(200))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["map", "imap", "get", "with"])
def test_ctrl_c_interrupts_promptly_and_cleanly(tmp_path, how, fork_or_spawn):
    script = tmp_path / "long_map.py"
    script.write_text(SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), how, fork_or_spawn],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2
        time.sleep(1.0)  # well into the work
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        sent = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        elapsed = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            kill_group(proc)
    assert elapsed < 2.5, f"Ctrl-C took {elapsed:.2f} s"
    assert proc.returncode != 0
    assert err.count("KeyboardInterrupt") == 1, err
    assert err.count("Traceback") == 1, err

    def running():
        return [p.pid for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    wait_until(lambda: not running(), timeout=5, interval=0.05)
    left = running()
    assert not left, f"processes left behind: {left}"
