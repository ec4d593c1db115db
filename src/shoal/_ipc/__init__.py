"""Inter-process communication: framing over Unix sockets and (built on it)
Connection/Pipe and the queues.

Layers above use these names only: :class:`Channel` (a non-blocking framed
socket with descriptors, the engine's link to each worker), the public
:class:`Connection` / :func:`Pipe` and queues, and the packet helpers an
actor's connections share with Connection.
"""

from ._channel import Channel as Channel
from ._connection import Connection as Connection
from ._connection import Pipe as Pipe
from ._packet import BYTES as BYTES
from ._packet import MEMFD as MEMFD
from ._packet import SNDBUF as SNDBUF
from ._packet import close_fds as close_fds
from ._packet import encode as encode
from ._packet import recv_packet as recv_packet
from ._packet import refuse_connection as refuse_connection
from ._packet import send_packet as send_packet
from ._packet import socketpair as socketpair
from ._queue import JoinableQueue as JoinableQueue
from ._queue import Queue as Queue
from ._queue import SimpleQueue as SimpleQueue
from ._spin import Spin as Spin

__all__ = (
    "BYTES",
    "SNDBUF",
    "Channel",
    "Connection",
    "JoinableQueue",
    "Pipe",
    "Queue",
    "SimpleQueue",
    "Spin",
    "close_fds",
    "encode",
    "recv_packet",
    "refuse_connection",
    "send_packet",
    "socketpair",
)
