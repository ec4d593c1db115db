"""What the two ends of an actor's connection agree on: the messages, the
peer check, this process's place in a chain of waiting actors, and how a
call's arguments and results are pickled (``Spin``, how a waiting end looks
for a message before it sleeps, is :mod:`shoal._ipc`'s, shared with
``Connection``).

Written by the actor process's loop (``serving_address``, ``waiting``) and
read by the handles and clients of the same process; nothing here owns a
descriptor.
"""

from __future__ import annotations

import errno
import os
import pickle
import socket
import struct
from typing import Any

from .._ipc import Spin as Spin
from .._ipc import encode

# Requests (caller -> actor), as outer pickles:
CALL = 0  # (CALL, cid, name, blob[, chain]): blob = the pickled (args, kwargs);
#          chain = the addresses of the actors waiting for this call (see waiting)
SEND = 1  # (SEND, [(name, blob, number of descriptors) or (name, args), ...]): no replies; the
#          second form holds plain arguments (see plain_args), pickled with the whole batch
STOP = 2  # (STOP,)
LANE = 3  # (LANE, cid) with the lane's memfd, request_efd and reply_efd (see _lane), answered
#          True (taken) or False; then a synchronous call may come in the lane as
#          (messages sent on the connection before it, 8 bytes) + the CALL's pickle
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


#: Values pickled without shoal's encoder: they hold no buffer and no
#: descriptor and cannot fail to pickle, so plain ``pickle.dumps`` gives the
#: same bytes for a third of the cost.  (A str or bytes only up to
#: PLAIN_MAX long: a longer one may need the encoder's shared memory.)
_SCALARS = frozenset({int, float, bool, complex, type(None)})
PLAIN_MAX = 4096
_NO_FDS: list[int] = []  # never appended to: encode()'s callers only read and close it


def _plain(value: Any) -> bool:
    t = type(value)
    return t in _SCALARS or ((t is str or t is bytes) and len(value) <= PLAIN_MAX)


def plain_args(args: tuple, kwargs: dict | None) -> bool:
    """Whether a call's arguments are all plain values: they cannot fail to
    pickle nor change after the call, so a ``send()`` may keep the tuple
    itself and pickle it later, with its whole batch."""
    if kwargs:
        return False
    for arg in args:
        t = type(arg)
        if not (t in _SCALARS or ((t is str or t is bytes) and len(arg) <= PLAIN_MAX)):
            return False
    return True


def encode_args(args: tuple, kwargs: dict | None, what: str) -> tuple[bytes, list[int]]:
    """A call's ``(args, kwargs)`` as the blob of a CALL or SEND: ``(blob, fds)``."""
    if not kwargs:
        for arg in args:
            if not _plain(arg):
                break
        else:
            return pickle.dumps((args, None), 5), _NO_FDS
    return encode((args, kwargs or None), what)


def encode_result(value: Any, name: str, method: str) -> tuple[bytes, list[int]]:
    """A method's result as the blob of a reply: ``(blob, fds)``."""
    if _plain(value):
        return pickle.dumps(value, 5), _NO_FDS
    return encode(value, f"the result of {name}.{method}()")


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
