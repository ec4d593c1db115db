"""Atomic messages over a ``SOCK_SEQPACKET`` socket pair, for pipes and queues.

Every message is one datagram: the kernel delivers it whole to exactly one
reader, with its descriptors (``SCM_RIGHTS``) attached, or not at all.  That
is what makes :class:`shoal.Connection` and :class:`shoal.Queue` safe with
any number of threads and processes at either end without a lock: two
senders cannot interleave, two readers cannot split a message, and a process
killed in the middle of ``sendmsg``/``recvmsg`` leaves no half message behind
(the kernel closes whatever descriptors were in flight to it).

Datagram layout::

    kind (1 byte) | body

    kind & MEMFD == 0   body is the payload itself (at most INBAND_MAX bytes)
    kind & MEMFD        body is the payload size (8 bytes, little endian); the
                        payload is in a memfd, the *last* descriptor attached
    kind & BYTES        informational: sent by send_bytes (not pickled)

(The queues' datagrams carry an 8-byte sequence tag between the kind byte
and the body; see :mod:`shoal._ipc._ring`.)

Payloads larger than :data:`INBAND_MAX` are written once into a memfd whose
descriptor travels with a small datagram: a message of any size is still
atomic, and a socket buffer of a few hundred KiB never has to hold it.  The
memfd starts with an 8-byte state word that the reader sets to READ once it
has copied the payload out.  A sender with a :class:`Spool` keeps a few such
memfds and reuses one whose word says READ: allocating fresh pages costs
more than copying into them, so reuse roughly triples large-message
throughput.  A memfd whose reader died before reading is simply never
reused; it is closed when the spool is, and the kernel frees it once the
last descriptor is gone, whoever dies first.

EOF: a datagram is never empty (it has at least the kind byte), so a read of
zero bytes means every copy of the other end is closed.

Hostile or corrupt datagrams (see ``docs/security.md``): a truncated one,
a memfd header that is not exactly 8 bytes, a size above this machine's
memory (:data:`shoal._fd.MAX_PEER_SIZE`, checked before anything is
allocated), a missing descriptor, or one that is not a memfd holding what
was announced raise :class:`~shoal.exceptions.CorruptDataError`; the
message is consumed and its descriptors closed.  Sizes above
:data:`_CHECKED_ABOVE` are also checked against the memfd's own size (one
``fstat``, negligible beside reading that much); below it a short memfd is
found by the read itself, so the per-message path costs a comparison.
"""

from __future__ import annotations

import errno
import os
import pickle
import socket
import threading
import time
from typing import Any

from .._fd import (
    ANC_SIZE,
    MAX_FDS,
    MAX_PEER_SIZE,
    check_fd_holds,
    create_fd,
    exhausted,
    fds_ancillary,
    peer_size_error,
    received_fds,
    swap_sending,
)
from .._serialization import OOB_THRESHOLD, dumps
from ..exceptions import CorruptDataError, corrupt_data

MEMFD = 0x01
BYTES = 0x04

#: Payloads up to this size travel inside the datagram.  Above it, a memfd
#: (~10 µs to set up) is cheaper than a socket buffer large enough for them.
INBAND_MAX = 64 * 1024

_RECV_SIZE = INBAND_MAX + 16
_KINDS = [bytes([k]) for k in range(8)]
_SOL_SOCKET = socket.SOL_SOCKET
_CLOEXEC = int(socket.MSG_CMSG_CLOEXEC)  # plain ints: IntFlag arithmetic costs microseconds
_TRUNCATED = int(socket.MSG_TRUNC | socket.MSG_CTRUNC)
_CTRUNC = int(socket.MSG_CTRUNC)
_DONTWAIT = int(socket.MSG_DONTWAIT)

#: Send-buffer size asked for: enough for thousands of small messages in
#: flight before a sender waits (the kernel caps it at net.core.wmem_max).
SNDBUF = 4 << 20


def socketpair(sndbuf: int | None = None) -> tuple[socket.socket, socket.socket]:
    """A connected pair of message sockets; at a descriptor limit, an
    OSError that says so (see shoal._fd.exhausted)."""
    try:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    except OSError as exc:
        raise exhausted(exc, "create a connected pair of sockets (a pipe, a queue, an actor)") from exc
    if sndbuf:
        for s in (a, b):
            try:
                s.setsockopt(_SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
            except OSError:  # pragma: no cover - capped silently on Linux
                pass
    return a, b


_pickle_dumps = pickle.dumps


def close_fds(fds: Any) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class _LargeBuffer(Exception):
    pass


def small_buffers_only(pb: pickle.PickleBuffer) -> bool:
    """pickle's buffer_callback for the fast path: keep small buffers in
    band, and give up (raise) at the first one large enough to go out of band."""
    if pb.raw().nbytes >= OOB_THRESHOLD:
        raise _LargeBuffer
    return True


def encode(obj: Any, what: str, limit: int | None = None) -> tuple[bytes, list[int]]:
    """Pickle *obj* for a Connection or a Queue: ``(payload, fds)``.

    Plain pickle first (the small-message fast path); anything it refuses
    (large buffers, lambdas, ...) goes through :func:`shoal._serialization.dumps`
    with out-of-band buffers.  Objects holding descriptors (a Connection, a
    shared segment) hand them to the returned list, which the caller owns.
    On any error the descriptors are closed and the error raised
    (SerializationError naming the culprit, or TooLarge past *limit*).
    """
    fds: list[int] = []
    previous = swap_sending(fds)  # once per message: no context-manager object
    try:
        try:
            payload = _pickle_dumps(obj, 5, buffer_callback=small_buffers_only)
        except Exception:  # noqa: BLE001 - plain pickle refused it: shoal's dumps next
            close_fds(fds)
            fds.clear()
            payload = dumps(obj, oob=True, what=what, limit=limit)
    except BaseException:
        close_fds(fds)
        raise
    finally:
        swap_sending(previous)
    return payload, fds


def take_memfd_payload(fds: list[int], size: int, what: str) -> bytes:
    """Read the *size*-byte payload from the memfd that travelled last in
    *fds*, and close that descriptor.  *size* is what the peer announced:
    :class:`~shoal.exceptions.CorruptDataError` unless the memfd holds it."""
    if size > MAX_PEER_SIZE:
        raise peer_size_error(size, f"a large {what}")
    if not fds:
        raise corrupt_data(f"a large {what} arrived without its shared-memory descriptor")
    mfd = fds.pop()
    try:
        return _read_fd(mfd, size, what)
    finally:
        os.close(mfd)


_UNREAD = bytes(8)
_READ = (1).to_bytes(8, "little")
_HDR = 8


#: Serializes the first use of spools after a fork (re-created in the child,
#: whose copy a parent thread may have held).
_fork_lock = threading.Lock()


def _new_fork_lock() -> None:
    global _fork_lock
    _fork_lock = threading.Lock()


os.register_at_fork(after_in_child=_new_fork_lock)


class Spool:
    """memfds this process sent large payloads in, reusable once read.

    Owned by one Connection or Queue object in one process (a forked child
    starts with an empty spool and a fresh lock, even if the fork happened
    in the middle of a take); closed with it.
    """

    __slots__ = ("_entries", "_lock", "_pid")

    #: Payloads above this size use a fresh memfd that is not kept.
    MAX_SIZE = 8 << 20
    #: memfds kept per spool, read or not.
    KEEP = 3

    def __init__(self) -> None:
        self._pid = os.getpid()
        self._entries: list[list[int]] = []  # [fd, capacity]
        self._lock = threading.Lock()

    def _after_fork(self) -> None:
        # Inherited through fork: the parent still uses these memfds, and
        # our copy of the lock may be held by a parent thread that does not
        # exist here (it forked in the middle of a take): replace both.
        with _fork_lock:
            if self._pid != os.getpid():
                close_fds([e[0] for e in self._entries])
                self._entries = []
                self._lock = threading.Lock()
                self._pid = os.getpid()

    def take(self, size: int) -> int:
        """A new descriptor (the caller's, to close once sent) for a memfd
        with room for *size* payload bytes.  The spool keeps its own: it may
        close that one (evicting it) while the caller's is still in use."""
        if self._pid != os.getpid():
            self._after_fork()
        with self._lock:
            entries = self._entries
            for i, entry in enumerate(entries):
                fd, cap = entry
                if os.pread(fd, _HDR, 0) == _READ:
                    del entries[i]
                    if cap < size + _HDR:
                        os.ftruncate(fd, size + _HDR)
                        entry[1] = size + _HDR
                    # Claimed: unread until the new payload is read.
                    os.pwrite(fd, _UNREAD, 0)
                    entries.append(entry)
                    return os.dup(fd)
            fd = create_fd(size + _HDR, "shoal-message")
            entries.append([fd, size + _HDR])
            if len(entries) > self.KEEP:
                # The oldest one is still unread (its reader is slow or dead):
                # let the kernel free it when the reader is done with it.
                os.close(entries.pop(0)[0])
            return os.dup(fd)

    def close(self) -> None:
        # Our copies, inherited or not: closing them never affects another
        # process.
        if self._pid != os.getpid():
            self._after_fork()
        with self._lock:
            close_fds([e[0] for e in self._entries])
            self._entries = []


def send_packet(
    sock: socket.socket, kind: int, payload: Any, fds: Any = (), flags: int = 0, spool: Spool | None = None
) -> None:
    """Send one message.  The caller keeps ownership of *fds*.

    Raises ``BlockingIOError`` (only with ``MSG_DONTWAIT`` in *flags*) when
    the socket buffer is full; nothing was sent then.  Without it, waits
    both for room in the buffer and, when the kernel refuses more
    descriptors in flight (see :func:`send_fds_msg`), for receivers to take
    some.
    """
    size = payload.nbytes if type(payload) is memoryview else len(payload)
    if len(fds) >= MAX_FDS:
        raise ValueError(
            f"a message can carry at most {MAX_FDS - 1} shared-memory buffers or descriptors, "
            f"this one has {len(fds)}: send them in several messages"
        )
    if size <= INBAND_MAX:
        if fds:
            anc = fds_ancillary(fds)
            send_fds_msg(sock, [_KINDS[kind], payload], anc, flags)
        else:
            sock.sendmsg([_KINDS[kind], payload], (), flags)
        return
    if spool is not None and size <= Spool.MAX_SIZE:
        mfd = spool.take(size)
    else:
        mfd = create_fd(size + _HDR, "shoal-message")
    try:
        _pwrite_all(mfd, payload, size)
        anc = fds_ancillary([*fds, mfd])
        send_fds_msg(sock, [_KINDS[kind | MEMFD], size.to_bytes(8, "little")], anc, flags)
    finally:
        os.close(mfd)


#: Longest sleep between attempts while too many descriptors are in flight.
INFLIGHT_BACKOFF_MAX = 0.05


def send_fds_msg(sock: socket.socket, buffers: Any, anc: Any, flags: int) -> None:
    """``sendmsg`` of a datagram carrying descriptors.

    The kernel refuses (``ETOOMANYREFS``) to let a user have more
    descriptors in flight, sent but not yet received, than the sender's
    ``RLIMIT_NOFILE``: a full buffer of another kind, which empties as
    receivers take messages.  Without ``MSG_DONTWAIT`` wait for that, as
    for room in the socket buffer; with it, raise ``BlockingIOError``.
    """
    backoff = 0.0005
    while True:
        try:
            sock.sendmsg(buffers, anc, flags)
            return
        except OSError as exc:
            if exc.errno != errno.ETOOMANYREFS:
                raise
            if flags & _DONTWAIT:
                raise BlockingIOError(
                    errno.EAGAIN, "too many descriptors in flight (RLIMIT_NOFILE): wait for receivers"
                ) from exc
        time.sleep(backoff)
        backoff = min(backoff * 2, INFLIGHT_BACKOFF_MAX)


def _pwrite_all(fd: int, payload: Any, size: int) -> None:
    view = memoryview(payload).cast("B")
    written = os.pwritev(fd, [_UNREAD, view], 0) - _HDR
    while written < size:
        written += os.pwrite(fd, view[written:], _HDR + written)


def recv_packet(sock: socket.socket, flags: int = 0, limit: int | None = None) -> Any:
    """Receive one message: ``(kind, payload, fds)``, or ``None`` at EOF.

    *payload* is ``bytes`` (in band: the datagram minus its kind byte) or
    ``bytes`` read from the memfd.  The caller owns *fds* (the memfd, if any,
    is already read and closed).  Raises ``BlockingIOError`` with
    ``MSG_DONTWAIT`` when nothing is waiting, and :class:`MessageTooLarge`
    (the message is consumed and dropped) when it is larger than *limit*.
    """
    data, anc, mflags, _ = sock.recvmsg(_RECV_SIZE, ANC_SIZE, _CLOEXEC | flags)
    kind, payload, fds = finish_packet(data, anc, mflags, limit)
    if kind is None:
        return None
    return kind, payload, fds


def finish_packet(data: bytes, anc: Any, mflags: int, limit: int | None) -> Any:
    """Decode what one ``recvmsg`` returned: ``(kind, payload, fds)``, with
    kind ``None`` at EOF."""
    fds = received_fds(anc) if anc else []
    if not data:
        close_fds(fds)
        return None, None, None
    if mflags & _TRUNCATED:
        close_fds(fds)
        if mflags & _CTRUNC:
            raise fd_limit_error(data)
        raise corrupt_data(
            f"a message arrived truncated (longer than the {_RECV_SIZE} bytes of any datagram)"
        )
    kind = data[0]
    if not kind & MEMFD:
        if limit is not None and len(data) - 1 > limit:
            close_fds(fds)
            raise MessageTooLarge(len(data) - 1, limit)
        return kind, data[1:], fds
    try:
        if len(data) != 9:
            raise corrupt_data(f"a large message's header is {len(data)} bytes long instead of 9")
        size = int.from_bytes(data[1:9], "little")
        if size > MAX_PEER_SIZE:
            raise peer_size_error(size, "a large message")
        if limit is not None and size > limit:
            raise MessageTooLarge(size, limit)
        payload = take_memfd_payload(fds, size, "message")
    except BaseException:
        close_fds(fds)
        raise
    return kind, payload, fds


def fd_limit_error(data: bytes = b"") -> OSError:
    """What a receive whose descriptors the kernel could not install (it
    sets ``MSG_CTRUNC``) raises: the message is consumed, hence lost.  Its
    ``datagram`` attribute holds what came without them (an actor answers
    from it instead of dropping the connection)."""
    exc = OSError(
        errno.EMFILE,
        "a message arrived with descriptors (shared memory or connections) that this process could not "
        "receive: it has too many open files (RLIMIT_NOFILE, see `ulimit -n`); the message was lost",
    )
    exc.datagram = data  # type: ignore[attr-defined]
    return exc


class MessageTooLarge(OSError):
    """A received message exceeded the reader's size limit (it was dropped)."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            f"bad message length: received a message of {size} bytes, larger than the limit of "
            f"{limit} bytes (max_message_size or maxlength); the message was discarded"
        )
        self.size = size
        self.limit = limit


#: Payloads larger than this are checked against the memfd's size before
#: the read allocates room for them (smaller ones: by the read itself).
_CHECKED_ABOVE = 64 << 20


def _read_fd(fd: int, size: int, what: str) -> bytes:
    if size > _CHECKED_ABOVE:
        check_fd_holds(fd, _HDR + size, f"a large {what}")
    try:
        data = os.pread(fd, size, _HDR)
        if len(data) != size:
            parts = [data]
            got = len(data)
            while got < size:
                chunk = os.pread(fd, size - got, _HDR + got)
                if not chunk:
                    raise corrupt_data(
                        f"a large {what} announces {size} bytes, but its shared memory holds only {got}"
                    )
                parts.append(chunk)
                got += len(chunk)
            data = b"".join(parts)
        # Tell the sender it may reuse this memfd.
        os.pwrite(fd, _READ, 0)
    except CorruptDataError:
        raise
    except OSError as exc:  # a pipe, a socket, a read-only file: not a memfd of ours
        raise corrupt_data(
            f"a large {what} came with a descriptor that is not writable shared memory ({exc})"
        ) from exc
    return data


def refuse_connection(sock: socket.socket, reason: str, close: bool = True) -> None:
    """Tell the peer of *sock* why it is refused (a ``BYTES`` datagram of
    text: never a pickle, which the peer may not trust), then close (or,
    with *close* false, leave that to the caller).

    The datagrams it sent already are read and dropped first, after our
    receive side is shut (so it cannot add more): closing a socket with
    unread data makes the peer's next read fail with ECONNRESET before it
    sees the reason."""
    try:
        sock.sendmsg([_KINDS[BYTES], reason.encode()], (), _DONTWAIT)
        sock.shutdown(socket.SHUT_RDWR)
        while True:
            _data, anc, _flags, _ = sock.recvmsg(1, ANC_SIZE, _CLOEXEC | _DONTWAIT)
            if not _data:
                break
            close_fds(received_fds(anc))
    except OSError:
        pass  # gone, or nothing left to read
    finally:
        if close:
            sock.close()
