"""Passing file descriptors inside pickled objects.

An object that owns a descriptor (a shared-memory segment, a connection)
reduces it with :func:`reduce_fd`.  Where the descriptor goes depends on who is
pickling:

* a shoal channel is sending (inside :func:`collecting_fds`): the descriptor
  is appended to the message's list and travels beside the bytes as
  ``SCM_RIGHTS`` ancillary data; the pickle holds only its index.  The
  receiver unpickles inside :func:`providing_fds` and each object takes a
  ``dup`` of its descriptor; the channel closes the originals afterwards.
* ``multiprocessing`` is starting a process (spawn, forkserver) or sending
  through its own pipes: :class:`multiprocessing.reduction.DupFd` hands the
  descriptor to the child at spawn, or through the resource sharer.

Under ``fork`` nothing is pickled: the child inherits the descriptor.

Because descriptors, never names, are passed, the kernel frees the memory or
socket behind them when the last process holding one exits, however it exits.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from multiprocessing import reduction
from typing import Any


class _State(threading.local):
    # Class-level defaults: a missing attribute on a threading.local costs
    # an AttributeError internally, ~0.7 µs on every pickling call.
    send: list[int] | None = None
    recv: Sequence[int] | None = None
    base: int = 0
    end: int | None = None


_state = _State()


@contextmanager
def collecting_fds() -> Iterator[list[int]]:
    """While active, :func:`reduce_fd` appends descriptors to the yielded list."""
    previous = _state.send
    fds: list[int] = []
    _state.send = fds
    try:
        yield fds
    finally:
        _state.send = previous


class sending_fds:  # noqa: N801 - used as a function, like contextlib's managers
    """While active (``with sending_fds(fds):``), :func:`reduce_fd` appends
    descriptors to *fds*, the list a sender passes beside its message.

    :func:`collecting_fds` makes a new list; this takes the caller's (a
    class, not a generator: it runs once per task on the pools' hot paths).
    """

    __slots__ = ("fds", "previous")

    def __init__(self, fds: list[int] | None) -> None:
        self.fds = fds
        self.previous: list[int] | None = None

    def __enter__(self) -> list[int] | None:
        self.previous = _state.send
        _state.send = self.fds
        return self.fds

    def __exit__(self, *exc: object) -> None:
        _state.send = self.previous


def swap_sending(fds: list[int] | None) -> list[int] | None:
    """Make *fds* the list :func:`reduce_fd` appends to in this thread and
    return the one before, to restore with another call: :func:`sending_fds`
    without an object per call, for paths run once per task or message."""
    previous = _state.send
    _state.send = fds
    return previous


@contextmanager
def providing_fds(fds: Sequence[int], start: int = 0, stop: int | None = None) -> Iterator[None]:
    """While active, objects unpickled in this thread find their descriptors
    in ``fds[start:stop]`` (one message's part of a batch's list).

    Each object takes a ``dup``.  When no descriptor is free for it (EMFILE,
    ENFILE: a batch's message brought one per result and filled every number
    up to the limit), the object takes the received descriptor itself and its
    place in *fds* becomes -1: whoever closes *fds* afterwards skips those.
    """
    previous = _state.recv, _state.base, _state.end
    _state.recv = fds
    _state.base = start
    _state.end = stop
    try:
        yield
    finally:
        _state.recv, _state.base, _state.end = previous


def collecting() -> bool:
    """True inside :func:`collecting_fds` or :func:`sending_fds` in this thread."""
    return _state.send is not None


def reduce_fd(fd: int) -> tuple:
    """Return a ``(callable, args)`` pair that rebuilds a *new* descriptor for
    the same open file in the process that unpickles it."""
    fds = _state.send
    if fds is not None:
        fds.append(fd)
        return _fd_from_message, (len(fds) - 1,)
    return _fd_from_dupfd, (reduction.DupFd(fd),)


def _fd_from_message(index: int) -> int:
    fds = _state.recv
    if fds is not None:
        start = _state.base
        stop = len(fds) if _state.end is None else _state.end
        index += start
    if fds is None or not start <= index < stop or fds[index] < 0:
        raise RuntimeError(
            "a file descriptor was expected beside this message but none arrived; "
            "objects holding shared memory or connections must travel through shoal "
            "channels, Process arguments or multiprocessing queues"
        )
    try:
        return os.dup(fds[index])
    except OSError as exc:
        if exc.errno not in (errno.EMFILE, errno.ENFILE) or not isinstance(fds, list):
            raise
        fd = fds[index]
        fds[index] = -1  # this object owns it now: the receiver's clean-up skips it
        return fd


def _fd_from_dupfd(dupfd: Any) -> int:
    return dupfd.detach()
