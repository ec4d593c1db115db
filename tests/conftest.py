"""Shared fixtures: start methods, and a leak check after every test.

After each test no child process, file descriptor or /dev/shm entry that the
test created may remain (the forkserver and resource tracker that
multiprocessing keeps for the whole session are allowed).

/dev/shm is shared with every other program on the machine (joblib, loky,
another test run), so only what this test run made may count: run as root,
the session gets a /dev/shm of its own (a private mount namespace with a
fresh tmpfs there, which every process it starts inherits); otherwise only
entries that name a process of this run (``sem.loky-<pid>-...``) or that no
other program's naming explains are counted (see ``_ours``).  Processes already
running when a test starts belong to a class-scoped setup (CPython's test
classes make their pool or manager in ``setUpClass``); a class that sets
``CHECK_CLASS_LEAKS = True`` gets the same check around the whole class.
"""

from __future__ import annotations

import ctypes
import gc
import multiprocessing
import os
import re
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


def _private_dev_shm() -> bool:
    """Give this process (and every process it starts) a /dev/shm of its
    own: a new mount namespace, with a tmpfs the size of the real one."""
    if os.geteuid() != 0 or not os.path.isdir("/dev/shm"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    clone_newns, ms_rec, ms_private = 0x00020000, 0x4000, 1 << 18
    st = os.statvfs("/dev/shm")
    size = max(st.f_blocks * st.f_frsize, 256 << 20)
    if libc.unshare(clone_newns) != 0:
        return False
    if libc.mount(None, b"/", None, ms_rec | ms_private, None) != 0:
        return False
    options = f"size={size},mode=1777".encode()
    return libc.mount(b"tmpfs", b"/dev/shm", b"tmpfs", 0, options) == 0


PRIVATE_DEV_SHM = False


def pytest_configure(config):
    global PRIVATE_DEV_SHM
    PRIVATE_DEV_SHM = _private_dev_shm()


_METHOD_IN_PARAMS = re.compile(r"(?i)(?<![a-z])(forkserver|spawn|fork)(?![a-z])")
_METHOD_IN_CLASS = re.compile(r"(Forkserver|Spawn|Fork)(?=[A-Z0-9_]|$)")


def _start_method_variant(item) -> tuple[tuple, str | None]:
    """The test *item* is one start method's variant of: (what it is with
    the method left out, the method), from its parameters' ids and its class
    name (``WithShoalSpawnTestPool``); method None when it names none."""
    found: list[str] = []

    def take(match: re.Match) -> str:
        found.append(match.group(1).lower())
        return "{method}"

    callspec = getattr(item, "callspec", None)
    params = _METHOD_IN_PARAMS.sub(take, callspec.id) if callspec is not None else ""
    cls = _METHOD_IN_CLASS.sub(take, item.cls.__name__) if getattr(item, "cls", None) else ""
    return (item.path, cls, getattr(item, "originalname", item.name), params), (found[0] if found else None)


def pytest_collection_modifyitems(config, items):
    """The quick subset (``-m "not slow"``) runs a test that is repeated for
    every start method under fork only: its spawn and forkserver variants
    are marked slow (the whole suite runs them all).  A test that has no
    fork variant (spawn or forkserver is its subject) stays quick."""
    variants: dict[tuple, list] = {}
    for item in items:
        key, method = _start_method_variant(item)
        if method is not None:
            variants.setdefault(key, []).append((method, item))
    for group in variants.values():
        if any(method == "fork" for method, _item in group):
            for method, item in group:
                if method != "fork":
                    item.add_marker(pytest.mark.slow)


def _shm() -> set[str]:
    try:
        return set(os.listdir("/dev/shm"))
    except FileNotFoundError:
        return set()


_PID_IN_NAME = re.compile(r"(?:^|[-_.])(\d{2,})(?=[-_.]|$)")


def _ours(name: str, pids: set[int]) -> bool:
    """Whether a new /dev/shm entry may be this run's (without a private /dev/shm)."""
    if PRIVATE_DEV_SHM:
        return True
    named = {int(n) for n in _PID_IN_NAME.findall(name)}
    if named:
        return bool(named & pids)
    return not name.startswith(("joblib_", "sem.loky-", "loky-"))


@pytest.fixture(autouse=True)
def no_leaks(request):
    yield from _leak_check()


@pytest.fixture(scope="class", autouse=True)
def no_class_leaks(request):
    if getattr(request.cls, "CHECK_CLASS_LEAKS", False):
        yield from _leak_check()
    else:
        yield


def _tree_pids() -> set[int]:
    try:
        return {os.getpid(), *(k.pid for k in psutil.Process().children(recursive=True))}
    except psutil.Error:
        return {os.getpid()}


def _leak_check():
    running = frozenset(k.pid for k in _children())
    pids = _tree_pids()
    fds_before = open_fds()
    shm_before = _shm()
    yield
    deadline = time.monotonic() + 10
    collect = False  # a full collection costs up to 0.1 s in a long session: only when something is left
    while True:
        if collect:
            gc.collect()
        collect = True
        kids = _children(running)
        new_fds = open_fds() - fds_before - _session_fds()
        pids |= _tree_pids()
        new_shm = {name for name in _shm() - shm_before if _ours(name, pids)}
        if not (kids or new_fds or new_shm) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    described_kids = []
    for k in kids:
        try:
            described_kids.append((k.pid, k.cmdline()[-2:]))
        except psutil.Error:
            described_kids.append((k.pid, "?"))
    # Reap whatever is left so one leak does not cascade into later tests.
    for k in kids:
        try:
            k.kill()
        except psutil.Error:
            pass
    multiprocessing.active_children()
    details = []
    if kids:
        details.append(f"child processes left running: {described_kids}")
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
