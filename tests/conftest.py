"""Shared fixtures: start methods, and a leak check after every test.

After each test no child process, file descriptor or /dev/shm entry that the
test created may remain (the forkserver and resource tracker that
multiprocessing keeps for the whole session are allowed).  Processes already
running when a test starts belong to a class-scoped setup (CPython's test
classes make their pool or manager in ``setUpClass``); a class that sets
``CHECK_CLASS_LEAKS = True`` gets the same check around the whole class.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import time

import psutil
import pytest

from helpers import open_fds

START_METHODS = ["fork", "spawn", "forkserver"]


@pytest.fixture(params=START_METHODS)
def start_method(request) -> str:
    return request.param


@pytest.fixture(params=["fork", "spawn"])
def fork_or_spawn(request) -> str:
    return request.param


def _session_helpers() -> set[int]:
    """PIDs of the long-lived helper processes multiprocessing keeps."""
    pids = set()
    from multiprocessing import forkserver, resource_tracker

    pid = getattr(forkserver._forkserver, "_forkserver_pid", None)
    if pid:
        pids.add(pid)
    pid = getattr(resource_tracker._resource_tracker, "_pid", None)
    if pid:
        pids.add(pid)
    return pids


def _session_fds() -> set[str]:
    fds = set()
    from multiprocessing import forkserver, resource_tracker

    for fd in (
        getattr(forkserver._forkserver, "_forkserver_alive_fd", None),
        getattr(resource_tracker._resource_tracker, "_fd", None),
    ):
        if fd is not None:
            fds.add(str(fd))
    return fds


def _children(already_running: frozenset[int] = frozenset()) -> list[psutil.Process]:
    helpers = _session_helpers() | already_running
    try:
        kids = psutil.Process().children(recursive=True)
    except psutil.Error:
        return []
    return [k for k in kids if k.pid not in helpers and k.is_running() and k.status() != psutil.STATUS_ZOMBIE]


def _shm() -> set[str]:
    try:
        return set(os.listdir("/dev/shm"))
    except FileNotFoundError:
        return set()


@pytest.fixture(autouse=True)
def no_leaks(request):
    yield from _leak_check()


@pytest.fixture(scope="class", autouse=True)
def no_class_leaks(request):
    if getattr(request.cls, "CHECK_CLASS_LEAKS", False):
        yield from _leak_check()
    else:
        yield


def _leak_check():
    running = frozenset(k.pid for k in _children())
    fds_before = open_fds()
    shm_before = _shm()
    yield
    deadline = time.monotonic() + 10
    while True:
        gc.collect()
        kids = _children(running)
        new_fds = open_fds() - fds_before - _session_fds()
        new_shm = _shm() - shm_before
        if not (kids or new_fds or new_shm) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    # Reap whatever is left so one leak does not cascade into later tests.
    for k in kids:
        try:
            k.kill()
        except psutil.Error:
            pass
    multiprocessing.active_children()
    details = []
    if kids:
        details.append(f"child processes left running: {[(k.pid, k.cmdline()[-2:]) for k in kids]}")
    if new_fds:
        described = {}
        for fd in new_fds:
            try:
                described[fd] = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                described[fd] = "?"
        details.append(f"file descriptors left open: {described}")
    if new_shm:
        details.append(f"/dev/shm entries left behind: {sorted(new_shm)}")
    assert not details, "; ".join(details)
