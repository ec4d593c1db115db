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
        time.sleep(0.2)
        return x

    if __name__ == "__main__":
        how = sys.argv[1]
        if how.startswith("executor"):
            pool = ex = shoal.ProcessPoolExecutor(2, mp_context=sys.argv[2])
        else:
            pool = shoal.Pool(2, context=sys.argv[2])
        print(" ".join(map(str, pool._engine.worker_pids)), flush=True)
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
        # The executor's faces, with the automatic chunk size: its first
        # guess once made chunks of ~12 s that Ctrl-C waited for.
        elif how == "executor-map":
            list(ex.map(slow, range(200)))
        elif how == "executor-with-map":
            with ex:
                list(ex.map(slow, range(200)))
        elif how == "executor-result":
            futures = [ex.submit(slow, i) for i in range(200)]
            futures[-1].result()
        elif how == "executor-with-submit":
            with ex:
                futures = [ex.submit(slow, i) for i in range(200)]
                futures[-1].result()
    """
)

FACES = [
    "map",
    "imap",
    "get",
    "with",
    "executor-map",
    "executor-with-map",
    "executor-result",
    "executor-with-submit",
]


@pytest.mark.slow
@pytest.mark.parametrize("how", FACES)
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
    # A hang detector, not a speed claim: the failure it guards against took
    # 6-9 s (the executor waiting for chunks of many tasks to finish).
    assert elapsed < 2.5, f"Ctrl-C took {elapsed:.2f} s"
    assert proc.returncode != 0
    assert err.count("KeyboardInterrupt") == 1, err
    assert err.count("Traceback") == 1, err

    def running():
        return [p.pid for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    wait_until(lambda: not running(), timeout=5, interval=0.05)
    left = running()
    assert not left, f"processes left behind: {left}"


def _interrupt_after(seconds: float) -> None:
    """Raise KeyboardInterrupt in the main thread, as Ctrl-C does, soon."""
    import _thread
    import threading

    threading.Timer(seconds, _thread.interrupt_main).start()


@pytest.mark.parametrize("how", ["map", "imap"])
def test_an_interrupted_map_kills_its_running_chunks_and_the_pool_goes_on(how):
    import shoal
    import workers

    with shoal.Pool(2) as pool:
        _interrupt_after(0.5)
        with pytest.raises(KeyboardInterrupt):
            if how == "map":
                pool.map(workers.sleep_for, [600, 600, 600])
            else:
                list(pool.imap(workers.sleep_for, [600, 600, 600]))
        assert pool.apply(workers.square, (7,)) == 49
        # Both workers were running a 600 s task: both are replaced (the
        # second perhaps just after the first answers; pytest-timeout bounds it).
        while pool.statistics().replaced_because.get("cancelled", 0) < 2:
            time.sleep(0.01)
        assert pool.statistics().tasks_running == 0
