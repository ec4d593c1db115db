"""The processes a task leaves behind, and how they end with their worker.

A task may start processes and return without waiting for them: a
``multiprocessing.Process``, a nested joblib ``Parallel`` (whose loky
workers stay for reuse), a ``subprocess.Popen``.  They are the worker's
descendants, and they end with it:

- a worker that ends normally (``close()`` / ``join()``, ``shutdown()``,
  ``maxtasksperchild``, ``max_memory``) ends its own descendants first,
  after ``worker_exit``: SIGTERM, then SIGKILL after a grace period
  (otherwise ``multiprocessing`` would make it wait for every child it
  started, and the pool with it);
- ``terminate()`` (and a ``with`` block, and the interpreter's exit) signal
  each worker's descendants with the worker: SIGTERM, then SIGKILL after
  the grace period;
- a worker killed for a time limit, a cancelled task or Ctrl-C has its
  descendants killed with it.

A process started so that it outlives its parent (detached: a double fork,
``setsid`` and exit) is no longer a descendant and is left alone; so are the
children of a worker that crashed on its own, which the system adopts.  So
is a *resource tracker* (``multiprocessing``'s or loky's): it ignores SIGTERM
on purpose, and exits by itself once every process that holds its pipe is
gone, after it freed the semaphores and shared memory they leaked; killing
it would leak them.

Processes are held by *pidfd* (Linux 5.3): a signal reaches the process
found, never one that reused its pid, and its exit is seen whoever else holds
its pipes.  A grandchild started by fork inherits the worker's descriptors,
the end of ``multiprocessing``'s sentinel pipe among them, so the sentinel of
a dead worker whose children live on never fires: the scheduler watches a
pidfd of each worker instead (:func:`open_pidfd`).
"""

from __future__ import annotations

import os
import select
import signal
import time
from typing import Any

from .._fd import exhausted

#: Seconds between SIGTERM and SIGKILL when processes are ended.
GRACE = 1.0

#: pidfd_send_signal, where Python has it.
_send = getattr(signal, "pidfd_send_signal", None)


def open_pidfd(pid: int) -> int | None:
    """A pidfd of process *pid* (close-on-exec), or None where the system
    has none (a kernel before 5.3, a sandbox that forbids it)."""
    opener = getattr(os, "pidfd_open", None)
    if opener is None:
        return None
    try:
        return opener(pid)
    except OSError:
        return None


def _children(pid: int) -> list[int]:
    """The pids of *pid*'s children, from each of its threads' ``children``
    file in /proc (a child belongs to the thread that forked it)."""
    kids: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                kids.extend(int(k) for k in f.read().split())
        except (OSError, ValueError):
            continue
    return kids


def _is_tracker(pid: int) -> bool:
    """Whether *pid* runs a resource tracker (multiprocessing's, loky's)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"resource_tracker" in f.read()
    except OSError:
        return False


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # pid (comm) state ppid ...: comm may hold spaces and parentheses
    try:
        return int(stat[stat.rindex(b")") + 2 :].split()[1])
    except (ValueError, IndexError):
        return None


class Tree:
    """The descendants of one process, found now and held by pidfd (by pid
    where the system has no pidfd)."""

    __slots__ = ("_fds", "pids")

    def __init__(self, pid: int) -> None:
        self.pids: list[int] = []
        self._fds: list[int | None] = []
        stack = [pid]
        while stack:
            parent = stack.pop()
            for child in _children(parent):
                if _is_tracker(child):
                    continue
                fd = open_pidfd(child)
                # Still the child found (not a process that took its pid
                # since)?  A pidfd pins the process: if its parent is right
                # now, the pidfd is the right one.
                if _parent(child) != parent:
                    if fd is not None:
                        os.close(fd)
                    continue
                self.pids.append(child)
                self._fds.append(fd)
                stack.append(child)

    def __bool__(self) -> bool:
        return bool(self.pids)

    def send_signal(self, signum: int) -> None:
        for pid, fd in zip(self.pids, self._fds, strict=True):
            _signal(pid, fd, signum)

    def wait(self, timeout: float) -> bool:
        """Wait up to *timeout* seconds for every process to exit; whether
        they all did (those held by pid only are polled)."""
        deadline = time.monotonic() + timeout
        while True:
            left = [(pid, fd) for pid, fd in zip(self.pids, self._fds, strict=True) if _alive(pid, fd)]
            remaining = deadline - time.monotonic()
            if not left or remaining <= 0:
                return not left
            fds = [fd for _pid, fd in left if fd is not None]
            if len(fds) == len(left):
                poller = select.poll()
                for fd in fds:
                    poller.register(fd, select.POLLIN)
                poller.poll(remaining * 1000)
            else:
                time.sleep(min(remaining, 0.01))

    def end(self, grace: float) -> None:
        """SIGTERM every process, then SIGKILL those left after *grace* seconds."""
        if not self:
            return
        self.send_signal(signal.SIGTERM)
        if not self.wait(grace):
            self.send_signal(signal.SIGKILL)
            self.wait(grace)

    def close(self) -> None:
        for fd in self._fds:
            if fd is not None:
                os.close(fd)
        self._fds = [None] * len(self.pids)
        self.pids = []


def _signal(pid: int, fd: int | None, signum: int) -> None:
    try:
        if fd is not None and _send is not None:
            _send(fd, signum)
        else:
            os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass  # gone already (or, by pid, no longer ours)


def exited(fd: int) -> bool:
    """Whether the process of pidfd *fd* has exited (a zombie has)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def _alive(pid: int, fd: int | None) -> bool:
    if fd is not None:
        return not exited(fd)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still has its pid: it has exited.
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3] != b"Z"
    except (OSError, ValueError):
        return False


def end_descendants(grace: float = GRACE) -> None:
    """End this process's descendants (a worker, as it exits)."""
    tree = Tree(os.getpid())
    try:
        tree.end(grace)
    finally:
        tree.close()


def start_process(proc: Any, what: str) -> None:
    """``proc.start()``; when the system refuses (no process, no descriptor,
    no memory), an OSError that says what ran out (:func:`shoal._fd.exhausted`).

    A start that fails leaves the descriptors the standard library made for
    it open: its fork start (``popen_fork.Popen._launch``) makes two pipes
    and then forks, and closes neither when the second pipe or the fork
    fails; its spawn start leaves its pipes to a finalizer of the ``Popen``
    object, which the exception's traceback keeps alive (a
    ProcessPoolExecutor keeps that exception to raise at each submit).  At a
    descriptor or process limit, every failed start would leak a few.  The
    ``Popen`` and its pipes are still named in the failed call's frame: close
    them from there.
    """
    try:
        proc.start()
    except OSError as exc:
        _close_launch_pipes(exc)
        raise exhausted(exc, what) from exc


def _close_launch_pipes(exc: BaseException) -> None:
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        tb = tb.tb_next
        if frame.f_code.co_name != "_launch":
            continue
        names = frame.f_locals
        popen = names.get("self")
        if getattr(popen, "pid", None) is not None:
            continue  # it started: its finalizer owns the pipes
        finalizer = getattr(popen, "finalizer", None)
        if finalizer is not None:
            finalizer()  # what multiprocessing would close later, now (and only once)
        elif frame.f_code.co_filename.endswith("popen_fork.py"):
            for name in ("parent_r", "child_w", "child_r", "parent_w"):
                fd = names.get(name)
                if isinstance(fd, int):
                    try:
                        os.close(fd)
                    except OSError:
                        pass
