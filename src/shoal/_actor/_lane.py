"""A caller's lane to an actor: shared memory that carries its synchronous
calls and their replies without a system call while both ends are awake.

Why: on a virtual machine each ``sendmsg``/``recvmsg``/``poll`` costs a few
microseconds, and a call over the connection made four of them and a
dozen polls; a message through shared memory costs a copy.

Who owns what:

- The *caller* (``_Client``) makes the lane at its first synchronous call:
  a sealed memfd of ``LANE_SIZE`` bytes (``shoal._native`` lane.c describes
  the two message slots in it) and two eventfds, ``request_efd`` (wakes the
  actor) and ``reply_efd`` (wakes the caller).  It sends the three
  descriptors to the actor in a ``LANE`` message on its connection, which
  the actor checked is a process of the same user.
- The *actor* maps the lane, adds ``request_efd`` to its epoll, and from
  then on looks at the lane's request slot before it sleeps.

A synchronous call, when its thread is the one reading replies (the direct
path, see ``_client``) and its request is small and carries no descriptor:

1. the caller puts ``count + request`` in the request slot, where *count*
   is how many messages it sent on the connection before; the actor reads
   that many first, so a call never overtakes a ``send()`` or a submitted
   call made before it;
2. the actor, looking at its lanes (``lane_wait``, without the GIL, for up
   to ``SPIN_US``) or woken by ``request_efd``, runs the call and puts the
   reply in the reply slot; a reply too large for it, or with descriptors,
   goes on the connection instead;
3. the caller looks at its reply slot and, every few microseconds, at its
   connection (a reply that came there, another thread's, or the end of
   the actor); after ``SPIN_US`` it sleeps in ``poll`` on the connection
   and ``reply_efd``.

How it ends: an actor that dies closes its end of the connection, which
wakes a sleeping caller (``POLLHUP``) and a spinning one (its poll of the
connection), and the call fails as on the connection alone.  A caller that
dies closes its connection; the actor drops the connection and its lane.
"""

from __future__ import annotations

import fcntl
import mmap
import os
from typing import Any

from .. import _native
from .._fd import check_sealed, create_fd
from .._ipc import close_fds

LANE_SIZE = _native.LANE_SIZE
#: Bytes a message in a lane can have (the rest goes on the connection).
LANE_CAP = (LANE_SIZE - 512) // 2
REQUESTS = 0
REPLIES = 1
#: Microseconds an end looks for the next message before it sleeps.
SPIN_US = 60.0
#: Waits without a look, once looking stopped paying, before a full look again.
SPIN_PROBE = 16

lane_put = _native.lane_put
lane_get = _native.lane_get
lane_wait = _native.lane_wait
lane_awake = _native.lane_awake


class Budget:
    """How long the next look lasts: the full ``SPIN_US`` while looks find
    the message, halved by each that does not, none for ``SPIN_PROBE``
    waits once it is down to nothing (see ``shoal._ipc.Spin``, the same
    rule counted in polls)."""

    __slots__ = ("idle", "us")

    def __init__(self) -> None:
        self.us = SPIN_US
        self.idle = 0

    def next(self) -> float:
        us = self.us
        if us:
            return us
        self.idle += 1
        if self.idle < SPIN_PROBE:
            return 0.0
        self.idle = 0
        return SPIN_US

    def found(self, found: bool) -> None:
        if found:
            self.us = SPIN_US
        else:
            us = self.us / 2
            self.us = us if us >= 4 else 0.0


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def drain(efd: int) -> None:
    """Reset an eventfd that woke us."""
    try:
        os.eventfd_read(efd)
    except OSError:
        pass


class Lane:
    """One end's mapping of a lane and its two eventfds."""

    __slots__ = ("lanes", "mm", "reply_efd", "request_efd")

    def __init__(self, mm: mmap.mmap, request_efd: int, reply_efd: int) -> None:
        self.mm = mm
        self.lanes = (mm,)  # what lane_wait takes
        self.request_efd = request_efd
        self.reply_efd = reply_efd

    @classmethod
    def create(cls) -> tuple[Lane, int]:
        """A new lane, and the memfd to send with its eventfds (the caller
        closes it once sent)."""
        fd = create_fd(LANE_SIZE, "shoal-actor-lane")
        efds: list[int] = []
        try:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            efds.append(_eventfd())
            efds.append(_eventfd())
            mm = mmap.mmap(fd, LANE_SIZE)
        except BaseException:
            os.close(fd)
            for efd in efds:
                os.close(efd)
            raise
        return cls(mm, efds[0], efds[1]), fd

    @classmethod
    def receive(cls, fds: list[int]) -> Lane:
        """The actor's end, from the three descriptors of a ``LANE`` message
        (kept open: the Lane owns its two eventfds; the memfd is closed by
        the caller).  ValueError when they are not a lane's."""
        memfd, request_efd, reply_efd = fds
        check_sealed(memfd, "an actor's lane")
        if os.fstat(memfd).st_size != LANE_SIZE:
            raise ValueError(f"a lane is {LANE_SIZE} bytes long, this one {os.fstat(memfd).st_size}")
        for efd in (request_efd, reply_efd):
            if os.readlink(f"/proc/self/fd/{efd}") != "anon_inode:[eventfd]":
                raise ValueError("a lane's wake-ups are eventfds")
        mm = mmap.mmap(memfd, LANE_SIZE)
        kept: list[int] = []
        try:
            kept.append(os.dup(request_efd))
            kept.append(os.dup(reply_efd))
        except OSError:
            close_fds(kept)
            mm.close()
            raise
        return cls(mm, kept[0], kept[1])

    def close(self) -> None:
        for efd in (self.request_efd, self.reply_efd):
            if efd >= 0:
                try:
                    os.close(efd)
                except OSError:
                    pass
        self.request_efd = self.reply_efd = -1
        try:
            self.mm.close()
        except BufferError:  # another thread still looks at it: freed with the last reference
            pass

    def put(self, side: int, payload: Any) -> None:
        lane_put(self.mm, side, payload, self.request_efd if side == REQUESTS else self.reply_efd)
