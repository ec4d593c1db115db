"""Stopping what a run left behind, for the joblib suite's plugin and for
tests/test_joblib_suite.py (which adds this directory to ``sys.path``)."""

from __future__ import annotations

import psutil


def describe(proc: psutil.Process) -> tuple[int, str]:
    try:
        return proc.pid, " ".join(proc.cmdline())[-100:]
    except psutil.Error:
        return proc.pid, "?"


def stop(procs: list[psutil.Process], grace: float = 10) -> None:
    """Kill *procs*, resource trackers last: a tracker (loky's or
    multiprocessing's) unlinks its processes' semaphores and folders in
    /dev/shm when they are gone, and exits by itself; killed first, it
    would leave them behind."""
    trackers = []
    for proc in procs:
        try:
            if "resource_tracker" in " ".join(proc.cmdline()):
                trackers.append(proc)
            else:
                proc.kill()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(trackers, timeout=grace)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
