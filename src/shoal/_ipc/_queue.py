"""``Queue``, ``JoinableQueue`` and ``SimpleQueue``: the standard library's API,
many producers and consumers, nothing lost or duplicated.

Data flow::

    producer (any process, any thread)             consumer (any process, any thread)
    put(obj)                                        get()
      dumps(obj) here: errors name the object         stash non-empty? pop from it
      take a slot (bounded) / count +1                recvmsg(): one whole datagram
      sendmsg(MSG_DONTWAIT) on the shared socket      count -n / give n slots back
        socket full? -> this process's buffer,        loads(); a batch (put_many):
           flushed in order by a feeder thread          first item returned, the rest
                                                        stashed in this process

One ``SOCK_SEQPACKET`` socket pair is shared by every process that holds the
queue: producers send on one end, consumers receive on the other.  Each item
(or each ``put_many`` batch) is one datagram, and the kernel hands each
datagram whole to exactly one reader, so no lock is needed and a process
killed in the middle of ``put`` or ``get`` cannot leave a half message for
the others.  Items above 64 KiB, and pickle-5 buffers above 256 KiB, travel
in memfds attached to the datagram (see :mod:`shoal._ipc._packet`).

Counting, for ``qsize``/``full``/``maxsize``: a bounded queue takes a slot
from an ``eventfd`` semaphore before sending and gives it back when the item
is received; an unbounded one keeps an item count in shared memory (atomic
add via ``shoal._native`` when available, otherwise two eventfd counters).
These are descriptors, not names: nothing outlives the processes.

Blocking and waking: a blocked ``get`` sleeps in ``recvmsg`` or ``poll`` on
the socket; a blocked bounded ``put`` sleeps in ``poll`` on the semaphore.
An unbounded ``put`` never blocks: when the socket buffer (a few MiB) is full
the item waits in this process's buffer, and a feeder thread sends it in
order; at exit the process waits for its feeder unless
:meth:`Queue.cancel_join_thread` was called, as in the standard library.

How it ends: ``close()`` releases this process's descriptors (after its
feeder has flushed); the kernel frees everything when the last process
holding the queue closes it or dies.  What a killed process loses: the item
it was sending or had just received (never a neighbour's), items in its own
feeder buffer, and items of a batch it had received but not yet returned.
Killed between taking and sending (or receiving and releasing), it can leave
``qsize`` off by one, or one slot of a bounded queue taken.
"""

from __future__ import annotations

import collections
import mmap
import os
import queue as _stdqueue
import select
import socket
import threading
import time
import weakref
from multiprocessing import util as _mputil

from .._serialization import dumps, loads
from .._shm._segment import create_fd
from ..exceptions import BrokenResourceError, SerializationError
from ._fdpass import _state as _fd_state
from ._fdpass import collecting, providing_fds, reduce_fd
from ._packet import BATCH, INBAND_MAX, SNDBUF, Spool, close_fds, recv_packet, send_packet, socketpair

try:  # atomics for the item count; optional
    from .. import _native
except ImportError:  # pragma: no cover - the extension is normally built
    _native = None

__all__ = ("JoinableQueue", "Queue", "SimpleQueue")

Empty = _stdqueue.Empty
Full = _stdqueue.Full

_DONTWAIT = int(socket.MSG_DONTWAIT)
_EFD_FLAGS = os.EFD_CLOEXEC | os.EFD_NONBLOCK
_POLLIN = select.POLLIN | select.POLLHUP | select.POLLERR
_BATCH_BYTES = 48 * 1024  # a put_many batch is split into datagrams about this large

_live: weakref.WeakSet = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for q in list(_live):
        q._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _dup_if_collecting(fd: int) -> int:
    # A collecting sender owns and closes what it collects: give it a copy.
    return os.dup(fd) if collecting() else fd


def _deadline(block: bool, timeout: float | None) -> float | None:
    """None = wait forever; otherwise the monotonic time to give up."""
    if not block:
        return 0.0
    if timeout is None:
        return None
    if timeout < 0:
        raise ValueError("'timeout' must be a non-negative number")
    return time.monotonic() + timeout


def _wait_fd(fd: int, deadline: float | None) -> bool:
    """Wait until *fd* is readable or *deadline* passes; False on timeout."""
    poller = select.poll()
    poller.register(fd, _POLLIN)
    if deadline is None:
        return bool(poller.poll(-1))
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return bool(poller.poll(0))
    return bool(poller.poll(max(1, int(remaining * 1000 + 0.999))))


def _eventfd_count(fd: int) -> int:
    """The current value of an eventfd, read without changing it."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("eventfd-count:"):
                return int(line.split(":", 1)[1], 16)
    raise NotImplementedError("cannot read an eventfd's count on this system")


class _Counter:
    """A process-shared signed item count."""

    __slots__ = ("_buf", "_fds")

    def __init__(self, fds: list[int] | None = None) -> None:
        if fds is None:
            if _native is not None:
                fds = [create_fd(64, "shoal-queue-count")]
            else:
                fds = [os.eventfd(0, _EFD_FLAGS), os.eventfd(0, _EFD_FLAGS)]
        self._fds = fds
        self._buf = mmap.mmap(fds[0], 64) if len(fds) == 1 else None

    def add(self, n: int) -> None:
        if self._buf is not None:
            _native.fetch_add(self._buf, 0, n)
        elif n > 0:
            os.eventfd_write(self._fds[0], n)
        elif n < 0:
            os.eventfd_write(self._fds[1], -n)

    def value(self) -> int:
        if self._buf is not None:
            return max(0, _native.load(self._buf, 0))
        return max(0, _eventfd_count(self._fds[0]) - _eventfd_count(self._fds[1]))

    def close(self) -> None:
        if self._buf is not None:
            self._buf.close()
            self._buf = None
        close_fds(self._fds)
        self._fds = []


class _Base:
    """The socket pair, encoding, and the receive side shared by all three queues."""

    _feeds = False  # unbounded put never blocks (Queue); SimpleQueue blocks

    def __init__(self, *, ctx=None) -> None:
        # *ctx* is accepted for the standard library's signature; shoal's
        # queues work the same under every start method.
        self._reader, self._writer = socketpair(SNDBUF)
        self._init_local()
        _live.add(self)

    def _init_local(self) -> None:
        """State private to this process (reset in a forked child)."""
        self._closed = False
        self._stash: collections.deque = collections.deque()
        self._buffer: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._feeder: threading.Thread | None = None
        self._join_cancelled = False
        self._finalizer = None
        self._spool = Spool()

    def _after_fork(self) -> None:
        # The parent's buffered items and stash are the parent's; a child
        # that re-sent them would duplicate them.
        self._init_local()

    # -- pickling (Process args under spawn/forkserver, pool tasks, pipes) --
    def _fds(self) -> list[int]:
        return [self._reader.fileno(), self._writer.fileno()]

    def __reduce__(self):
        if self._closed:
            raise OSError(f"{type(self).__name__} is closed and cannot be sent to another process")
        fds = [reduce_fd(_dup_if_collecting(fd)) for fd in self._fds()]
        return _rebuild_queue, (type(self), fds, self._extra_state())

    def _extra_state(self):
        return None

    def _set_extra_state(self, fds: list[int], state) -> None:
        pass

    # -- encoding -----------------------------------------------------------
    @staticmethod
    def _encode(obj, what: str) -> tuple[bytes, list[int]]:
        fds: list[int] = []
        previous = getattr(_fd_state, "send", None)
        _fd_state.send = fds
        try:
            return dumps(obj, oob=True, what=what), fds
        except BaseException:
            close_fds(fds)
            raise
        finally:
            _fd_state.send = previous

    def _check_closed(self) -> None:
        if self._closed:
            raise ValueError(f"Queue {self!r} is closed")

    # -- sending ------------------------------------------------------------
    def _send(self, kind: int, payload: bytes, fds: list[int]) -> None:
        """Send one datagram in order with this process's earlier ones."""
        if not self._feeds:
            try:
                send_packet(self._writer, kind, payload, fds, 0, self._spool)
            finally:
                close_fds(fds)
            return
        if not self._buffer:
            # Nothing of ours is waiting, so sending now keeps our order.
            try:
                send_packet(self._writer, kind, payload, fds, _DONTWAIT, self._spool)
            except BlockingIOError:
                pass
            else:
                close_fds(fds)
                return
        with self._lock:
            self._buffer.append((kind, payload, fds))
            if self._feeder is None:
                self._start_feeder()

    def _start_feeder(self) -> None:
        t = threading.Thread(target=self._feed, name="shoal.Queue feeder", daemon=True)
        self._feeder = t
        t.start()
        if not self._join_cancelled:
            # Like the standard library: at exit, wait until the buffered
            # items are in the queue.
            self._finalizer = _mputil.Finalize(t, _join_thread, [weakref.ref(t)], exitpriority=-5)

    def _feed(self) -> None:
        """Feeder thread: send the buffered datagrams in order, then exit."""
        buffer = self._buffer
        writer = self._writer
        while True:
            with self._lock:
                if not buffer:
                    self._feeder = None
                    return
                kind, payload, fds = buffer[0]
            try:
                send_packet(writer, kind, payload, fds, 0, None)
            except OSError:
                # Our own end was closed under us (close() with
                # cancel_join_thread): what is left cannot be sent.
                with self._lock:
                    for _k, _p, f in buffer:
                        close_fds(f)
                    buffer.clear()
                    self._feeder = None
                return
            with self._lock:
                buffer.popleft()
            close_fds(fds)

    # -- receiving ----------------------------------------------------------
    def _recv_items(self, deadline: float | None) -> list | None:
        """Receive one datagram's items; None when the deadline passed."""
        reader = self._reader
        while True:
            try:
                if deadline is None:
                    packet = recv_packet(reader)
                else:
                    packet = recv_packet(reader, _DONTWAIT)
            except BlockingIOError:
                if deadline == 0.0 or not _wait_fd(reader.fileno(), deadline):
                    return None
                continue
            break
        if packet is None:
            raise BrokenResourceError(
                "every process holding this queue closed it, so nothing can ever arrive"
            )
        kind, payload, fds = packet
        try:
            if fds:
                with providing_fds(fds):
                    obj = loads(payload)
            else:
                obj = loads(payload)
        except Exception as exc:
            self._received(1)
            raise SerializationError(
                f"an item taken from the queue could not be unpickled ({type(exc).__name__}: {exc}); "
                "is the class or function it refers to importable in this process?"
            ) from exc
        finally:
            if fds:
                close_fds(fds)
        items = obj if kind & BATCH else [obj]
        self._received(len(items))
        return items

    def _received(self, n: int) -> None:
        pass

    def _get(self, block: bool, timeout: float | None):
        self._check_closed()
        stash = self._stash
        if stash:
            try:
                return stash.popleft()
            except IndexError:  # another thread took the last one
                pass
        items = self._recv_items(_deadline(block, timeout))
        if items is None:
            raise Empty
        if len(items) > 1:
            stash.extend(items[1:])
        return items[0]

    def _empty(self) -> bool:
        if self._stash:
            return False
        poller = select.poll()
        poller.register(self._reader.fileno(), select.POLLIN)
        return not poller.poll(0)

    # -- closing ------------------------------------------------------------
    def _close_fds(self) -> None:
        for sock in (self._reader, self._writer):
            sock.close()
        self._spool.close()

    def close(self) -> None:
        """No more puts or gets from this process; its buffered items are
        still flushed (see :meth:`join_thread`).  Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._stash.clear()
            feeder = self._feeder
        if feeder is None:
            self._close_fds()
        else:
            # The feeder closes the descriptors once it has sent everything.
            threading.Thread(target=self._close_after_feeder, args=(feeder,), daemon=True).start()

    def _close_after_feeder(self, feeder: threading.Thread) -> None:
        feeder.join()
        self._close_fds()

    def __del__(self) -> None:
        try:
            if not self._closed and self._feeder is None:
                self._closed = True
                self._close_fds()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"fd={self._reader.fileno()}"
        return f"<shoal.{type(self).__name__} {state}>"


def _join_thread(ref) -> None:
    t = ref()
    if t is not None and t.is_alive():
        t.join()


def _rebuild_queue(cls, fd_reducers, state):
    fds = [rebuild(*args) for rebuild, args in fd_reducers]
    q = cls.__new__(cls)
    q._reader = socket.socket(fileno=fds[0])
    q._writer = socket.socket(fileno=fds[1])
    q._init_local()
    q._set_extra_state(fds[2:], state)
    _live.add(q)
    return q


class SimpleQueue(_Base):
    """``multiprocessing.SimpleQueue``: ``put``, ``get``, ``empty``, ``close``.

    ``put`` pickles in the caller (so an unpicklable object raises there) and
    blocks only while the socket buffer is full.
    """

    def put(self, obj) -> None:
        """Put *obj* on the queue."""
        self._check_closed()
        payload, fds = self._encode(obj, "the object put on the queue")
        self._send(0, payload, fds)

    def get(self):
        """Remove and return an item, waiting for one."""
        return self._get(True, None)

    def empty(self) -> bool:
        """True if the queue is empty (a snapshot)."""
        self._check_closed()
        return self._empty()


class Queue(_Base):
    """``multiprocessing.Queue`` for any number of producers and consumers.

    Differences from the standard library, all in your favour: ``put``
    pickles in the caller, so an unpicklable object raises there, naming it;
    an item put is in the queue when ``put`` returns (``empty()`` and
    ``qsize()`` see it); and ``put_many`` / ``get_many`` move many items per
    system call.
    """

    _feeds = True

    def __init__(self, maxsize: int = 0, *, ctx=None) -> None:
        if maxsize < 0:
            raise ValueError(f"maxsize must be >= 0, got {maxsize}")
        super().__init__(ctx=ctx)
        self._maxsize = maxsize
        if maxsize > 0:
            self._slots = os.eventfd(maxsize, _EFD_FLAGS | os.EFD_SEMAPHORE)
            self._count = None
        else:
            self._slots = -1
            self._count = _Counter()

    # -- pickling -----------------------------------------------------------
    def _fds(self) -> list[int]:
        fds = super()._fds()
        if self._count is not None:
            fds += self._count._fds
        else:
            fds.append(self._slots)
        return fds

    def _extra_state(self):
        return (self._maxsize, self._count is not None and self._count._buf is not None)

    def _set_extra_state(self, fds: list[int], state) -> None:
        self._maxsize, _native_count = state
        if self._maxsize > 0:
            self._slots = fds[0]
            self._count = None
            fds = fds[1:]
        else:
            self._slots = -1
            n = 1 if _native_count else 2
            self._count = _Counter(fds[:n])
            fds = fds[n:]
        self._set_more_state(fds)

    def _set_more_state(self, fds: list[int]) -> None:
        pass

    # -- counting -----------------------------------------------------------
    def _take_slots(self, n: int, block: bool, timeout: float | None) -> None:
        """Take *n* slots of a bounded queue, all or none; Full on timeout."""
        deadline = _deadline(block, timeout)
        taken = 0
        try:
            while taken < n:
                try:
                    os.eventfd_read(self._slots)
                    taken += 1
                except BlockingIOError:
                    if deadline == 0.0 or not _wait_fd(self._slots, deadline):
                        raise Full from None
        except BaseException:
            if taken:
                os.eventfd_write(self._slots, taken)
            raise

    def _count_put(self, n: int, block: bool, timeout: float | None) -> None:
        if self._maxsize > 0:
            self._take_slots(n, block, timeout)
        else:
            self._count.add(n)

    def _received(self, n: int) -> None:
        if self._maxsize > 0:
            os.eventfd_write(self._slots, n)
        else:
            self._count.add(-n)

    # -- the standard library's API ------------------------------------------
    def put(self, obj, block: bool = True, timeout: float | None = None) -> None:
        """Put *obj* on the queue.  With a *maxsize*, wait up to *timeout*
        seconds for room (``queue.Full`` if there is none)."""
        self._check_closed()
        payload, fds = self._encode(obj, "the object put on the queue")
        try:
            self._count_put(1, block, timeout)
        except BaseException:
            close_fds(fds)
            raise
        self._send(0, payload, fds)

    def put_nowait(self, obj) -> None:
        self.put(obj, False)

    def get(self, block: bool = True, timeout: float | None = None):
        """Remove and return an item, waiting up to *timeout* seconds
        (``queue.Empty`` if none arrives)."""
        return self._get(block, timeout)

    def get_nowait(self):
        return self._get(False, None)

    def qsize(self) -> int:
        """Approximate number of items in the queue (not counting items of
        a ``put_many`` batch already taken by a consumer)."""
        self._check_closed()
        if self._maxsize > 0:
            return self._maxsize - _eventfd_count(self._slots)
        return self._count.value()

    def empty(self) -> bool:
        """True if the queue is empty (a snapshot)."""
        self._check_closed()
        return self._empty()

    def full(self) -> bool:
        """True if a bounded queue has no room (a snapshot)."""
        self._check_closed()
        return self._maxsize > 0 and _eventfd_count(self._slots) == 0

    def join_thread(self) -> None:
        """Wait until this process's buffered items are in the queue.  Call
        after :meth:`close`."""
        if not self._closed:
            raise ValueError(f"Queue {self!r} not closed: call close() before join_thread()")
        feeder = self._feeder
        if feeder is not None:
            feeder.join()

    def cancel_join_thread(self) -> None:
        """Let this process exit without waiting for its buffered items to be
        sent (they are lost)."""
        self._join_cancelled = True
        finalizer = self._finalizer
        if finalizer is not None:
            finalizer.cancel()
            self._finalizer = None

    # -- batches --------------------------------------------------------------
    def put_many(self, items, block: bool = True, timeout: float | None = None) -> None:
        """Put every item of *items*, in order, in a few messages.

        Items of one message are taken by the same consumer, so several
        consumers see batches, not single items, interleaved.  With a
        *maxsize*, batches hold at most *maxsize* items and each waits for
        room; on timeout ``queue.Full`` is raised and the items not yet put
        are not put.
        """
        self._check_closed()
        items = list(items)
        if not items:
            return
        for chunk in self._chunks(items):
            payload, fds = self._encode(chunk, "an item passed to put_many")
            try:
                self._count_put(len(chunk), block, timeout)
            except BaseException:
                close_fds(fds)
                raise
            self._send(BATCH, payload, fds)

    def _chunks(self, items: list):
        """Split *items* into batches of about _BATCH_BYTES pickled, so
        several consumers share the work and batches stay in band."""
        n = len(items)
        limit = self._maxsize if self._maxsize > 0 else n
        sample = items[:16]
        try:
            per_item = max(1, len(dumps(sample)) // len(sample))
        except SerializationError:
            per_item = 1
        step = max(1, min(limit, _BATCH_BYTES // per_item))
        for i in range(0, n, step):
            yield items[i : i + step]

    def get_many(self, max_items: int, timeout: float | None = None, *, block: bool = True) -> list:
        """Remove and return between 1 and *max_items* items: wait up to
        *timeout* seconds for the first (``queue.Empty`` if none arrives),
        then take whatever else is already there."""
        self._check_closed()
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {max_items}")
        stash = self._stash
        out: list = []
        while stash and len(out) < max_items:
            try:
                out.append(stash.popleft())
            except IndexError:
                break
        if not out:
            items = self._recv_items(_deadline(block, timeout))
            if items is None:
                raise Empty
            out = items
        while len(out) < max_items:
            items = self._recv_items(0.0)
            if items is None:
                break
            out.extend(items)
        if len(out) > max_items:
            stash.extendleft(reversed(out[max_items:]))
            del out[max_items:]
        return out

    def _close_fds(self) -> None:
        super()._close_fds()
        if self._count is not None:
            self._count.close()
        elif self._slots >= 0:
            os.close(self._slots)
            self._slots = -1


class JoinableQueue(Queue):
    """``multiprocessing.JoinableQueue``: a :class:`Queue` with ``task_done``
    and ``join``."""

    def __init__(self, maxsize: int = 0, *, ctx=None) -> None:
        super().__init__(maxsize, ctx=ctx)
        self._unfinished = os.eventfd(0, _EFD_FLAGS | os.EFD_SEMAPHORE)

    def _fds(self) -> list[int]:
        return super()._fds() + [self._unfinished]

    def _set_more_state(self, fds: list[int]) -> None:
        self._unfinished = fds[0]

    def _count_put(self, n: int, block: bool, timeout: float | None) -> None:
        super()._count_put(n, block, timeout)
        os.eventfd_write(self._unfinished, n)

    def task_done(self) -> None:
        """Mark one item taken with ``get`` as processed."""
        try:
            os.eventfd_read(self._unfinished)
        except BlockingIOError:
            raise ValueError("task_done() called too many times") from None

    def join(self) -> None:
        """Wait until every item put has been marked with ``task_done``."""
        delay = 0.0005
        while _eventfd_count(self._unfinished) > 0:
            time.sleep(delay)
            delay = min(delay * 2, 0.01)

    def _close_fds(self) -> None:
        super()._close_fds()
        if self._unfinished >= 0:
            os.close(self._unfinished)
            self._unfinished = -1
