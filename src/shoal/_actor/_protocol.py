"""What the two ends of an actor's connection agree on: the messages, the
peer check, this process's place in a chain of waiting actors, and how a
waiting end looks for a message before it sleeps.

Written by the actor process's loop (``serving_address``, ``waiting``) and
read by the handles and clients of the same process; nothing here owns a
descriptor.
"""

from __future__ import annotations

import errno
import os
import socket
import struct

# Requests (caller -> actor), as outer pickles:
CALL = 0  # (CALL, cid, name, blob[, chain]): blob = the pickled (args, kwargs);
#          chain = the addresses of the actors waiting for this call (see waiting)
SEND = 1  # (SEND, [(name, blob, number of descriptors), ...]): no replies
STOP = 2  # (STOP,)
# Replies (actor -> caller): (cid, ok, blob); cid 0 answers the creation.

#: send() calls queued before they go as one message.
SEND_BATCH = 512
#: Descriptors (large buffers) queued send() calls may hold before a flush.
SEND_MAX_FDS = 128
#: How long the flusher thread lets send() calls pile up.
FLUSH_DELAY = 0.0005
#: Seconds a closing creator waits for the actor at interpreter exit (or
#: after its handle was garbage collected) before killing it.
EXIT_TIMEOUT = 5.0

DONTWAIT = int(socket.MSG_DONTWAIT)
CREDS = struct.Struct("3i")

#: In an actor process, its own address (to refuse a call that would wait on itself).
serving_address: str | None = None
#: In an actor process: the addresses of the actors whose waiting calls led to
#: the call it runs now, its own last.  Sent with its waiting calls, so a call
#: that would close a cycle (A waits on B, which calls A) raises, not hangs.
waiting: tuple[str | None, ...] = ()


def refusal(peer_uid: int, actor_uid: int, actor_pid: int) -> str:
    """Why a process of *peer_uid* may not call an actor run by *actor_uid*."""
    return (
        f"the actor in process {actor_pid} runs as uid {actor_uid} and this process as uid {peer_uid}: "
        "an actor serves only processes of its own user (root's actors serve only root, and root "
        "cannot reach other users' actors), because every call is a pickle, which runs code as the "
        "actor's user. Create the actor in a process of the user that calls it"
    )


def check_peer(sock: socket.socket, actor_pid: int) -> None:
    """Refuse to talk to an actor of another user: its replies are pickles,
    which would run its code as us (and ours would run as it)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, CREDS.size)
    _pid, uid, _gid = CREDS.unpack(creds)
    if uid != os.geteuid():
        raise PermissionError(errno.EACCES, refusal(os.geteuid(), uid, actor_pid))


#: Polls, at most, before a waiting end sleeps (~20-40 µs: see Spin).
SPIN_MAX = 40
#: Waits without a look first, once looking stopped paying, before looking again.
SPIN_PROBE = 16


class Spin:
    """How long a waiting end looks for the next message before it sleeps.

    Sleeping in the kernel and being woken costs more than a whole reply
    when it is about to come (on a virtual machine an idle CPU halts, and
    waking it costs tens of microseconds), so both ends of a call look
    first, as :class:`shoal.Connection` does.  But a look only pays while
    the other end runs: on a machine busier than its CPUs, or when the
    method takes longer than the look, it takes the CPU the other end needs.
    So the look adapts: a look that finds the message keeps the full
    length; one that does not halves it, down to none, and after
    ``SPIN_PROBE`` waits without one a full look is tried again.
    """

    __slots__ = ("idle", "spins")

    def __init__(self) -> None:
        self.spins = SPIN_MAX
        self.idle = 0  # waits without a look since it stopped paying

    def look(self, poll) -> list:
        """``poll(0)`` until it reports something or the look is over;
        what it reported last (empty: sleep now)."""
        n = self.spins
        if not n:
            self.idle += 1
            if self.idle < SPIN_PROBE:
                return []
            self.idle = 0
            n = SPIN_MAX
        for _ in range(n):
            events = poll(0)
            if events:
                self.spins = SPIN_MAX
                return events
        self.spins = n >> 1
        return []
