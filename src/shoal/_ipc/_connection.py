"""``Pipe()`` and ``Connection``: the standard library's API, safe to share.

Data flow::

    sender (any thread, any process)          receiver (any thread, any process)
    send(obj)                                 recv()
      dumps(obj): pickle 5; buffers >= 256 KiB  recvmsg(): one whole datagram
        copied once into memfds                   + its descriptors
      sendmsg(): one datagram                   loads(): large buffers become
        [kind | pickle] + memfd descriptors       mappings of the memfds (no copy)
      close our memfd copies                    close the received descriptors

A connection end is one ``AF_UNIX`` ``SOCK_SEQPACKET`` socket (see
:mod:`shoal._ipc._packet`).  Each message is a single datagram, so the
kernel makes sends and receives atomic: any number of threads and processes
may share an end without a lock, and nothing they do (including dying with
SIGKILL) can leave a partial message.  Payloads above 64 KiB ride in a memfd
whose descriptor is attached to the datagram.

Who owns what: each process owns its copy of each end's descriptor and
closes it in :meth:`Connection.close` (or when the object is collected).
Descriptors in flight belong to the kernel.  A received message's
descriptors belong to the receiver, which closes them once the objects built
on them hold their own mappings.

Waiting: ``recv`` polls the socket for a few tens of microseconds before
it blocks in ``recvmsg``; a reply that comes that soon is then taken without
the sleep and wake-up, which on a virtual machine cost more than the reply.
The look shortens, down to none, while it does not find the message (a
machine busier than its CPUs, a slow peer): see :class:`~._spin.Spin`.

How it ends: when every copy of the other end is closed (including by the
death of the processes holding them), a blocked or later ``recv`` raises
``EOFError`` and ``send`` raises ``BrokenPipeError``.  ``duplex=False``
shuts down the unused direction of each end, so misuse fails loudly.
"""

from __future__ import annotations

import errno
import math
import os
import pickle
import select
import socket
from multiprocessing import BufferTooShort
from typing import TYPE_CHECKING, Any

from .._fd import ANC_SIZE, collecting, providing_fds, reduce_fd
from .._serialization import TooLarge, loads
from .._util import public
from ..exceptions import SerializationError
from ._packet import (
    _CLOEXEC,
    _RECV_SIZE,
    BYTES,
    INBAND_MAX,
    MEMFD,
    SNDBUF,
    MessageTooLarge,
    Spool,
    close_fds,
    encode,
    finish_packet,
    recv_packet,
    send_packet,
    socketpair,
)
from ._spin import Spin

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

__all__ = ("Connection", "Pipe")

_POLLIN = select.POLLIN | select.POLLHUP | select.POLLERR
_EOF_MESSAGE = "the other end of the pipe was closed (or every process holding it exited)"
_pickle_loads = pickle.loads


def Pipe(duplex: bool = True, *, max_message_size: int | None = None) -> tuple[Connection, Connection]:  # noqa: N802 - the standard library's name
    """Return a pair ``(conn1, conn2)`` of connected :class:`Connection` objects.

    With *duplex* (the default) both ends can send and receive; otherwise
    ``conn1`` only receives and ``conn2`` only sends, as in the standard
    library.  *max_message_size* (bytes, optional) makes both ends refuse
    larger messages with a clear error; a message's size counts its pickle
    and the large buffers that travel beside it in shared memory.
    """
    if max_message_size is not None and max_message_size < 0:
        raise ValueError(f"max_message_size must be >= 0 or None, got {max_message_size}")
    a, b = socketpair(SNDBUF)
    if duplex:
        return (
            Connection(a, max_message_size=max_message_size),
            Connection(b, max_message_size=max_message_size),
        )
    # Shut down the unused directions so a send on the reading end fails with
    # EPIPE in every process, not only where the flags below are checked.
    a.shutdown(socket.SHUT_WR)
    b.shutdown(socket.SHUT_RD)
    return (
        Connection(a, writable=False, max_message_size=max_message_size),
        Connection(b, readable=False, max_message_size=max_message_size),
    )


class Connection:
    """One end of a :func:`Pipe`.  Same API as ``multiprocessing.connection.Connection``.

    Safe to use from several threads and processes at once: each message is
    sent and received whole.  Picklable (it travels as a descriptor), so it
    can be passed to a ``Process`` under fork, forkserver and spawn, to a pool
    task, or through another connection or queue.
    """

    __slots__ = ("__weakref__", "_look", "_max", "_poller", "_readable", "_sock", "_spool", "_writable")

    def __init__(
        self,
        sock: socket.socket,
        readable: bool = True,
        writable: bool = True,
        *,
        max_message_size: int | None = None,
    ) -> None:
        if not readable and not writable:
            raise ValueError("at least one of readable and writable must be True")
        self._sock: socket.socket | None = sock
        self._readable = readable
        self._writable = writable
        self._max = max_message_size
        self._spool: Spool | None = None  # made on the first large send_bytes
        self._poller: select.poll | None = None  # made on the first receive
        self._look = Spin()  # how long a receive looks before it sleeps

    # -- state --------------------------------------------------------------
    @property
    def closed(self) -> bool:
        """True if the connection is closed."""
        return self._sock is None

    @property
    def readable(self) -> bool:
        """True if the connection is readable."""
        return self._readable

    @property
    def writable(self) -> bool:
        """True if the connection is writable."""
        return self._writable

    @property
    def max_message_size(self) -> int | None:
        return self._max

    def fileno(self) -> int:
        """The descriptor of this end (for ``select`` / ``multiprocessing.connection.wait``)."""
        return self._check_open().fileno()

    def close(self) -> None:
        """Close this process's copy of the connection (idempotent)."""
        sock = self._sock
        if sock is not None:
            self._sock = None
            sock.close()
            if self._spool is not None:
                self._spool.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # As the standard library does: a collected connection closes itself.
        # Closing the socket here also keeps it from warning about it.
        sock = getattr(self, "_sock", None)
        if sock is not None:
            self._sock = None
            try:
                sock.close()
                if self._spool is not None:
                    self._spool.close()
            except Exception:  # noqa: BLE001 - finalizer at interpreter shutdown  # pragma: no cover
                pass

    def __repr__(self) -> str:
        if self._sock is None:
            return "<shoal.Connection closed>"
        mode = (
            "duplex"
            if self._readable and self._writable
            else ("read-only" if self._readable else "write-only")
        )
        return f"<shoal.Connection fd={self._sock.fileno()} {mode}>"

    def _check_open(self) -> socket.socket:
        sock = self._sock
        if sock is None:
            raise OSError("handle is closed: this Connection was closed and cannot be used")
        return sock

    def _check_writable(self) -> socket.socket:
        sock = self._sock
        if sock is None:
            raise OSError("handle is closed: this Connection was closed and cannot be used")
        if not self._writable:
            raise OSError("connection is read-only: this is the receiving end of Pipe(duplex=False)")
        return sock

    def _check_readable(self) -> socket.socket:
        sock = self._sock
        if sock is None:
            raise OSError("handle is closed: this Connection was closed and cannot be used")
        if not self._readable:
            raise OSError("connection is write-only: this is the sending end of Pipe(duplex=False)")
        return sock

    def _check_size(self, size: int) -> None:
        if self._max is not None and size > self._max:
            raise self._too_large(size)

    def _too_large(self, size: int) -> ValueError:
        return ValueError(
            f"message of {size} bytes is larger than this connection's max_message_size "
            f"of {self._max} bytes; nothing was sent"
        )

    # -- sending ------------------------------------------------------------
    def send(self, obj: Any) -> None:
        """Send a picklable object; the other end gets it from :meth:`recv`.

        Large buffers inside it (numpy arrays, bytes, ...) travel through
        shared memory.  An object that cannot be pickled raises
        :class:`shoal.SerializationError` here, and the connection stays usable.
        """
        sock = self._sock
        if sock is None or not self._writable:
            sock = self._check_writable()
        try:
            payload, fds = encode(obj, "the object sent through the Connection", self._max)
        except TooLarge as exc:
            # Counting the out-of-band buffers, before copying them.
            raise self._too_large(exc.size) from None
        if not fds and self._max is None and len(payload) <= INBAND_MAX:
            try:
                sock.sendmsg([b"\x00", payload])
            except ConnectionResetError as exc:
                raise _broken_pipe() from exc
            return
        try:
            if self._max is not None:
                self._check_size(len(payload))
            spool = self._spool
            if spool is None and len(payload) > INBAND_MAX:
                spool = self._spool = Spool()
            send_packet(sock, 0, payload, fds, 0, spool)
        except ConnectionResetError as exc:
            raise _broken_pipe() from exc
        finally:
            if fds:
                close_fds(fds)

    def send_bytes(self, buf: ReadableBuffer, offset: int = 0, size: int | None = None) -> None:
        """Send bytes from a bytes-like object as one message (see the standard library)."""
        sock = self._check_writable()
        m = memoryview(buf)
        if m.itemsize > 1 or m.ndim != 1 or not m.c_contiguous:
            m = m.cast("B") if m.c_contiguous else memoryview(m.tobytes())
        n = m.nbytes
        if offset < 0:
            raise ValueError("offset is negative")
        if n < offset:
            raise ValueError("buffer length < offset")
        if size is None:
            size = n - offset
        elif size < 0:
            raise ValueError("size is negative")
        elif offset + size > n:
            raise ValueError("buffer length < offset + size")
        if self._max is not None:
            self._check_size(size)
        if offset or size != n:
            m = m[offset : offset + size]
        spool = self._spool
        if spool is None and size > INBAND_MAX:
            spool = self._spool = Spool()
        try:
            send_packet(sock, BYTES, m, (), 0, spool)
        except ConnectionResetError as exc:
            raise _broken_pipe() from exc

    # -- receiving ----------------------------------------------------------
    def _recv(self, limit: int | None) -> Any:
        sock = self._check_readable()
        if limit is None:
            limit = self._max
        self._spin(sock)
        packet = recv_packet(sock, 0, limit)
        if packet is None:
            raise EOFError(_EOF_MESSAGE)
        return packet

    def _spin(self, sock: socket.socket) -> None:
        """Look for a message for a few tens of microseconds before blocking.

        Sleeping in recvmsg and being woken costs far more than the wait
        itself when the answer is about to come (on virtual machines an idle
        CPU halts, and waking it costs tens of microseconds); a short look
        first makes a request/reply round trip several times faster.
        """
        poller = self._poller
        if poller is None:
            poller = self._poller = select.poll()
            poller.register(sock.fileno(), _POLLIN)
        try:
            self._look.look(poller.poll)
        except RuntimeError:
            # Another thread of this process is looking already (a poll
            # object serves one thread at a time); just block.
            pass

    def recv(self) -> Any:
        """Receive an object sent with :meth:`send`; block until one arrives.

        Raises ``EOFError`` when there is nothing left to receive and the
        other end was closed.
        """
        sock = self._sock
        if sock is None or not self._readable or self._max is not None:
            _kind, payload, fds = self._recv(None)
        else:
            # Fast path for a small message without descriptors.
            self._spin(sock)
            data, anc, flags, _ = sock.recvmsg(_RECV_SIZE, ANC_SIZE, _CLOEXEC)
            if anc or not data or flags or data[0] & MEMFD:
                _kind, payload, fds = finish_packet(data, anc, flags, None)
                if _kind is None:
                    raise EOFError(_EOF_MESSAGE)
            else:
                try:
                    return _pickle_loads(memoryview(data)[1:])
                except Exception:  # noqa: BLE001 - not a plain pickle: decoded below
                    payload = data[1:]
                    fds = []
        if not fds:
            return _loads(payload)
        try:
            with providing_fds(fds):
                return _loads(payload, self._max)
        finally:
            close_fds(fds)

    def recv_bytes(self, maxlength: int | None = None) -> bytes:
        """Receive one message as bytes.  A message longer than *maxlength*
        raises ``OSError`` and is discarded (the connection stays usable)."""
        if maxlength is not None and maxlength < 0:
            raise ValueError("negative maxlength")
        _kind, payload, fds = self._recv(maxlength)
        if fds:
            close_fds(fds)
        return payload

    def recv_bytes_into(self, buf: WriteableBuffer, offset: int = 0) -> int:
        """Receive one message into *buf* at *offset*; return its size.

        If it does not fit, ``multiprocessing.BufferTooShort`` is raised with
        the whole message as ``args[0]``.
        """
        with memoryview(buf) as m:
            if m.readonly:
                raise TypeError("recv_bytes_into() needs a writable buffer")
            itemsize = m.itemsize
            bytesize = itemsize * len(m) if m.ndim == 1 else m.nbytes
            if offset < 0:
                raise ValueError("negative offset")
            if offset > bytesize:
                raise ValueError("offset too large")
            _kind, payload, fds = self._recv(None)
            if fds:
                close_fds(fds)
            size = len(payload)
            if bytesize - offset < size:
                raise BufferTooShort(payload)
            m.cast("B")[offset : offset + size] = payload
            return size

    def poll(self, timeout: float | None = 0.0) -> bool:
        """Whether there is data to read (or the other end closed), waiting
        up to *timeout* seconds (``None``: forever)."""
        sock = self._check_readable()
        return _wait_readable(sock.fileno(), timeout)

    # -- pickling -----------------------------------------------------------
    def __reduce__(self) -> tuple[Any, ...]:
        sock = self._check_open()
        fd = sock.fileno()
        if collecting():
            # A collecting sender owns (and closes) what it collects: give it
            # a duplicate, never our own descriptor.
            fd = os.dup(fd)
        rebuild, args = reduce_fd(fd)
        return _rebuild_connection, (rebuild, args, self._readable, self._writable, self._max)


def _rebuild_connection(
    rebuild: Any, args: Any, readable: bool, writable: bool, max_message_size: Any
) -> Any:
    fd = rebuild(*args)
    sock = socket.socket(fileno=fd)
    return Connection(sock, readable, writable, max_message_size=max_message_size)


public(Connection)
public(Pipe)


def _broken_pipe() -> BrokenPipeError:
    # A datagram socket reports ECONNRESET when the reader closed with
    # messages unread; a pipe says EPIPE.  Say the same thing either way.
    return BrokenPipeError(
        errno.EPIPE, "the other end of the pipe was closed (or every process holding it exited)"
    )


def _loads(payload: Any, limit: int | None = None) -> Any:
    try:
        return loads(payload, limit=limit)
    except TooLarge as exc:
        raise MessageTooLarge(exc.size, limit) from None  # type: ignore[arg-type]  # limit is set
    except SerializationError:
        raise
    except Exception as exc:
        raise SerializationError(
            f"the message received could not be unpickled ({type(exc).__name__}: {exc}); "
            "is the class or function it refers to importable in this process?"
        ) from exc


def _wait_readable(fd: int, timeout: float | None) -> bool:
    poller = select.poll()
    poller.register(fd, _POLLIN)
    if timeout is None:
        ms = -1
    elif timeout <= 0:
        ms = 0
    else:
        ms = math.ceil(timeout * 1000)
    # poll() is retried on EINTR by Python with the remaining time (PEP 475).
    return bool(poller.poll(ms))
