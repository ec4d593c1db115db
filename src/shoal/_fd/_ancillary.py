"""Descriptors beside a message: ``SCM_RIGHTS`` ancillary data.

The one place that builds and reads the control messages a Unix socket
carries descriptors in; the framing of ``_ipc`` (packets, queues, the
engine's channels) calls these and never names ``SCM_RIGHTS`` itself.
"""

from __future__ import annotations

import array
import socket
from collections.abc import Iterable, Sequence

#: The most descriptors one ``sendmsg`` may carry (``SCM_MAX_FD`` in Linux).
MAX_FDS = 253
#: The ancillary buffer a ``recvmsg`` needs to receive MAX_FDS descriptors.
ANC_SIZE = socket.CMSG_SPACE(MAX_FDS * 4)

_SOL_SOCKET = socket.SOL_SOCKET
_SCM_RIGHTS = socket.SCM_RIGHTS


def fds_ancillary(fds: Sequence[int]) -> list[tuple[int, int, bytes]]:
    """The ancillary data of a ``sendmsg`` that passes *fds* (at most MAX_FDS)."""
    return [(_SOL_SOCKET, _SCM_RIGHTS, array.array("i", fds).tobytes())]


def received_fds(anc: Iterable[tuple[int, int, bytes]]) -> list[int]:
    """The descriptors a ``recvmsg``'s ancillary data holds (the caller owns them).
    A partial trailing descriptor (a truncated control message) is ignored."""
    fds: list[int] = []
    for level, kind, data in anc:
        if level == _SOL_SOCKET and kind == _SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - (len(data) % arr.itemsize)])
            fds.extend(arr)
    return fds
