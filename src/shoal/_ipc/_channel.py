"""Length-prefixed messages over a Unix stream socket, with descriptors beside them.

Frame layout: an 8-byte little-endian header (payload length in the low 48
bits, number of descriptors in the high 16), then the payload.  Descriptors
attached to a message travel as ``SCM_RIGHTS`` ancillary data on the frame's
first bytes; the count in the header lets the reader hand each frame exactly
its own descriptors, even when several frames arrive in one read.

A frame announcing more than this machine's memory
(:data:`shoal._fd.MAX_PEER_SIZE`), or more descriptors than arrived with
it, raises :class:`~shoal.exceptions.CorruptDataError` before anything is
allocated for it; the stream cannot be resynchronised after that, so the
channel is done with.  Reads are at most :data:`_READ_MAX` bytes each, so a
frame's announced length is never allocated at once, only what arrives.

A stream cannot say that a plausible length is wrong: a frame announcing
more bytes than its sender wrote swallows the frames after it, and the
reader waits for the rest forever.  So a sender may count what it sends in
shared memory (:meth:`Channel.count_sent_in`: the running total is stored
*before* each frame goes out), and the reader compares it with what it
received (:attr:`Channel.received`): more bytes received than the sender
ever sent were written by someone else (in a pool worker: a task writing to
a descriptor it does not own), detected by the read that brings them, with
no timeout.  A load and a comparison per read.

:class:`Channel` is the building block for the pool engine's per-worker links
and for :class:`shoal.Connection`.  It is not thread-safe by itself; callers
serialize access (the engine has one scheduler thread per channel end;
connections take a lock).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections import deque
from typing import Any

from .. import _native
from .._fd import ANC_SIZE, MAX_FDS, MAX_PEER_SIZE, fds_ancillary, peer_size_error, received_fds
from ..exceptions import corrupt_data

_HEADER = struct.Struct("<Q")
_SIZE_MASK = (1 << 48) - 1
_CTRUNC = int(socket.MSG_CTRUNC)
#: The most one read asks for (a frame's bytes arrive a socket buffer at a time).
_READ_MAX = 4 << 20


class Channel:
    """One end of a framed, descriptor-carrying socket connection."""

    __slots__ = (
        "_buf",
        "_fds_lost",
        "_outq",
        "_pending_fds",
        "_pos",
        "_sent",
        "_sent_at",
        "received",
        "sock",
    )

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = bytearray()
        self._pos = 0
        self._pending_fds: list[int] = []
        # The kernel dropped descriptors sent to us (we had too many open).
        self._fds_lost = False
        #: bytes read from the socket so far
        self.received = 0
        # Bytes sent, and where their running total is published (count_sent_in).
        self._sent = 0
        self._sent_at: tuple[Any, int] | None = None
        # Frames waiting to be written by a non-blocking sender:
        # [view of the unsent bytes, descriptors or None once sent]
        self._outq: deque[list] = deque()

    @classmethod
    def pair(cls) -> tuple[Channel, Channel]:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        return cls(a), cls(b)

    def fileno(self) -> int:
        return self.sock.fileno()

    def count_sent_in(self, buf: Any, offset: int) -> None:
        """From now on, store the number of bytes :meth:`send` has sent
        (an int64 at *offset* of the shared *buf*), each frame counted
        before it goes out, so that the reader can tell bytes that did not
        come from here (see the module docstring)."""
        self._sent_at = (buf, offset)
        _native.store(buf, offset, self._sent)

    def close(self) -> None:
        self.sock.close()
        for fd in self._pending_fds:
            os.close(fd)
        self._pending_fds.clear()
        self.discard_output()

    # -- sending ----------------------------------------------------------
    def send(self, payload: Any, fds: Any = ()) -> None:
        """Send one frame (blocking)."""
        if self._sent_at is not None:
            self._sent += 8 + len(payload)
            _native.store(*self._sent_at, self._sent)
        header = _HEADER.pack(len(payload) | (len(fds) << 48))
        if not fds:
            sent = self.sock.sendmsg([header, payload])
            if sent < len(header) + len(payload):
                self.sock.sendall(memoryview(header + payload)[sent:])
            return
        entry: list[Any] = [memoryview(header + bytes(payload)), list(fds)]
        while entry[1]:
            self._send_piece(entry, 0)
        if len(entry[0]):
            self.sock.sendall(entry[0])

    def _send_piece(self, entry: list, flags: int) -> None:
        """Send the start of a frame with up to MAX_FDS of its descriptors.

        The kernel takes at most MAX_FDS (253) descriptors per sendmsg, and
        each group must ride on at least one byte, so a frame with more goes
        out in several pieces; the reader collects them in order.
        """
        view, fds = entry
        group = fds[:MAX_FDS]
        rest = fds[MAX_FDS:]
        anc = fds_ancillary(group)
        sent = self.sock.sendmsg([view[:1] if rest else view], anc, flags)
        entry[0] = view[sent:]
        entry[1] = rest or None

    # -- non-blocking sending (for a selector-driven writer) ----------------
    def queue(self, payload: Any, fds: Any = ()) -> None:
        """Append one frame to the outgoing queue; :meth:`flush` writes it.
        The channel takes ownership of *fds* and closes them once sent."""
        if len(fds) > MAX_FDS * (8 + len(payload)):
            raise ValueError(f"too many descriptors ({len(fds)}) for a frame of {len(payload)} bytes")
        header = _HEADER.pack(len(payload) | (len(fds) << 48))
        self._outq.append([memoryview(header + payload), list(fds) if fds else None])

    def discard_output(self) -> None:
        """Drop queued frames (the peer is gone), closing their descriptors."""
        for entry in self._outq:
            for fd in entry[1] or ():
                os.close(fd)
        self._outq.clear()

    def flush(self) -> bool:
        """Write as much queued output as the socket takes without blocking.

        Returns True when everything queued has been written.  Raises OSError
        (BrokenPipeError...) when the peer is gone.
        """
        outq = self._outq
        sock = self.sock
        while outq:
            entry = outq[0]
            try:
                while entry[1]:
                    fds = entry[1]
                    self._send_piece(entry, socket.MSG_DONTWAIT)
                    # The kernel holds its own references to those it took.
                    for fd in fds[: len(fds) - len(entry[1] or ())]:
                        os.close(fd)
                view = entry[0]
                sent = sock.send(view, socket.MSG_DONTWAIT) if len(view) else 0
            except (BlockingIOError, InterruptedError):
                return False
            if sent < len(view):
                entry[0] = view[sent:]
                return False
            outq.popleft()
        return True

    # -- receiving --------------------------------------------------------
    def _fill(self, want: int) -> bool:
        """Read until the buffer holds *want* unread bytes; False on EOF."""
        buf = self._buf
        while len(buf) - self._pos < want:
            if self._pos:
                del buf[: self._pos]
                self._pos = 0
            need = min(max(want - len(buf), 65536), _READ_MAX)
            data, anc, flags, _addr = self.sock.recvmsg(need, ANC_SIZE, socket.MSG_CMSG_CLOEXEC)
            if anc:
                self._pending_fds.extend(received_fds(anc))
            if flags & _CTRUNC:
                self._fds_lost = True
            if not data:
                return False
            self.received += len(data)
            buf += data
        return True

    def recv(self) -> tuple[memoryview, list[int]] | None:
        """Receive one frame: ``(payload, fds)``, or ``None`` at end of stream.

        The caller owns the returned descriptors.
        """
        if not self._fill(8):
            if len(self._buf) - self._pos:
                raise EOFError("the connection closed in the middle of a message")
            return None
        (size,) = _HEADER.unpack_from(self._buf, self._pos)
        nfds = size >> 48
        size &= _SIZE_MASK
        if size > MAX_PEER_SIZE:
            raise peer_size_error(size, "a frame")
        if not self._fill(8 + size):
            raise EOFError("the connection closed in the middle of a message")
        if nfds > len(self._pending_fds):
            raise self._missing_fds(nfds)
        start = self._pos + 8
        payload = bytes(self._buf[start : start + size])
        self._pos = start + size
        fds = self._pending_fds[:nfds]
        del self._pending_fds[:nfds]
        return memoryview(payload), fds

    def _missing_fds(self, nfds: int) -> OSError:
        have = len(self._pending_fds)
        if self._fds_lost:
            return OSError(
                errno.EMFILE,
                f"a frame came with {nfds} descriptors but only {have} could be received: this process has "
                "too many open files (RLIMIT_NOFILE, see `ulimit -n`)",
            )
        return corrupt_data(f"a frame announces {nfds} descriptors, but only {have} arrived with it")

    def recv_available(self) -> tuple[list[tuple[bytes, list[int]]], bool]:
        """Non-blocking: read what the socket has and return the complete frames
        buffered so far, each with its descriptors, and whether the peer
        closed.  For a selector-driven reader."""
        eof = False
        try:
            while True:
                data, anc, flags, _addr = self.sock.recvmsg(
                    1 << 18, ANC_SIZE, socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT
                )
                if anc:
                    self._pending_fds.extend(received_fds(anc))
                if flags & _CTRUNC:
                    self._fds_lost = True
                if not data:
                    eof = True
                    break
                self.received += len(data)
                if self._pos:
                    del self._buf[: self._pos]
                    self._pos = 0
                self._buf += data
                if len(data) < (1 << 18):
                    break
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            eof = True
        frames: list[tuple[bytes, list[int]]] = []
        buf = self._buf
        pos = self._pos
        end = len(buf)
        pending = self._pending_fds
        while end - pos >= 8:
            (size,) = _HEADER.unpack_from(buf, pos)
            nfds = size >> 48
            size &= _SIZE_MASK
            error: OSError | None = None
            if end - pos - 8 < size:
                if size <= MAX_PEER_SIZE:
                    break
                error = peer_size_error(size, "a frame")
            elif nfds > len(pending):
                error = self._missing_fds(nfds)
            if error is not None:
                # The stream cannot be followed past this frame: the channel
                # is done with, and so are the frames read with it.
                self._pos = pos
                for _payload, fds in frames:
                    for fd in fds:
                        os.close(fd)
                raise error
            fds = pending[:nfds]
            del pending[:nfds]
            frames.append((bytes(buf[pos + 8 : pos + 8 + size]), fds))
            pos += 8 + size
        self._pos = pos
        if pos == end:
            buf.clear()
            self._pos = 0
        return frames, eof
