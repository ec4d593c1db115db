"""``Queue``, ``JoinableQueue`` and ``SimpleQueue``: the standard library's API,
many producers and consumers, nothing lost or duplicated.

Data flow::

    producer (any process, any thread)           consumer (any process, any thread)
    put(obj)                                      get()
      dumps(obj) here: errors name the object       lock the ring
      small, no descriptors:                        take the oldest record
        lock the ring, copy the pickle in           SOCKET record: take its datagram
      large or with descriptors (arrays):           move head, unlock, wake producers
        lock the ring, send a tagged datagram     loads() outside the lock; large
        on the queue's socket, write a SOCKET       buffers are mappings of memfds
        record                                      (no copy)
      move tail, unlock, wake consumers
      ring full? (unbounded Queue) -> this
        process's buffer, written in order by
        a feeder thread

The items live in a ring buffer in shared memory (:mod:`shoal._ipc._ring`):
one memfd, a robust process-shared mutex, futex waits.  Taking an item is a
copy out of shared memory, not a system call, so one consumer can take items
one by one as fast as a producer batches them, and ``get`` takes exactly one
item: several consumers share the work fairly.  Items with descriptors
(pickle-5 buffers of 256 KiB and more go out of band into memfds) and items
above 64 KiB travel as datagrams on a ``SOCK_SEQPACKET`` pair that every
holder shares, in ring order.

Who owns what: every process holding the queue maps the ring and holds the
socket pair; the kernel frees them when the last holder closes them or
dies.  A process's feeder thread and its buffer are its own (a forked child
starts with none); a queue closed before a fork is closed in the child too.

Blocking: ``get`` sleeps on the ring's not-empty futex; a bounded ``put``
(and ``SimpleQueue.put`` when the ring is full) on its not-full futex, both
in slices, so a waker that died costs at most half a second.  An unbounded
``put`` never blocks; at exit a process waits for its feeder unless
:meth:`Queue.cancel_join_thread` was called, as in the standard library.

How it ends, on every error: a process killed while holding the ring's lock
leaves either the old or the new state (see the ring's docstring); the next
locker recounts and goes on.  A killed ``get`` that had not yet moved
``head`` never returned its item, which the next consumer gets; one that had
loses only that item.  A ``get`` interrupted by an exception (Ctrl-C, a
signal handler's) after taking its item keeps it for this process's next
``get`` (only an interruption while unpickling it still loses it).  A killed
``put`` loses only its own item and its own buffered items.  An item whose
datagram the kernel refuses (an item with more than 252 descriptors is
refused before that, with ``ValueError``) raises ``OSError`` in ``put``; in the feeder it is dropped with a
``RuntimeWarning``, the items around it still go in.  ``close()`` releases
this process's descriptors after its feeder has flushed.
"""

from __future__ import annotations

import collections
import os
import pickle
import queue as _stdqueue
import socket
import threading
import time
import warnings
import weakref
from collections.abc import Iterable
from multiprocessing import util as _mputil
from typing import Any

from .._fd import (
    MAX_FDS,
    collecting,
    create_fd,
    fds_ancillary,
    providing_fds,
    received_fds,
    reduce_fd,
    sending_fds,
)
from .._serialization import loads
from .._util import public
from ..exceptions import CorruptDataError, SerializationError, corrupt_data
from ._packet import (
    INBAND_MAX,
    MEMFD,
    SNDBUF,
    Spool,
    _pwrite_all,
    close_fds,
    encode,
    small_buffers_only,
    socketpair,
    take_memfd_payload,
)
from ._ring import DEFAULT_CAPACITY, Ring, SendFailed

__all__ = ("JoinableQueue", "Queue", "SimpleQueue")

Empty = _stdqueue.Empty
Full = _stdqueue.Full

_INLINE_KIND = b"\x00"
_MEMFD_KIND = bytes([MEMFD])
_pickle_dumps = pickle.dumps
#: Items put without shoal's encoder: they hold no buffer and no descriptor,
#: and cannot fail to pickle, so plain ``pickle.dumps`` gives the same bytes
#: (a third of the cost of a small put).
#: (A str or bytes only up to _PLAIN_MAX long: a longer one may need the
#: encoder's shared memory, and is not pickled twice to find out.)
_PLAIN = {bytes: True, str: True, int: False, float: False, bool: False, type(None): False}
_PLAIN_MAX = 4096
_pickle_loads = pickle.loads

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


class _Raise:
    """Stands in the stash for an item that failed to unpickle."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _close_entries(entries: Any) -> None:
    for _payload, _datagram, fds in entries:
        if fds:
            close_fds(fds)


def _join_thread(ref: Any) -> None:
    t = ref()
    if t is not None and t.is_alive():
        t.join()


class _Base:
    """The ring, the socket pair, encoding, and the feeder shared by all
    three queues."""

    #: An unbounded put never blocks: when the ring is full the item waits
    #: in this process's buffer for the feeder thread (Queue).  SimpleQueue
    #: blocks instead, as the standard library's does.
    _feeds = False
    _joinable = False

    def __init__(self, maxsize: int = 0, *, ctx: Any = None, capacity: int = DEFAULT_CAPACITY) -> None:
        # *ctx* is accepted for the standard library's signature; shoal's
        # queues work the same under every start method.
        # As in the standard library, maxsize <= 0 means unbounded.
        self._maxsize = max(0, maxsize)
        self._ring = Ring(capacity)
        try:
            self._reader, self._writer = socketpair(SNDBUF)
        except BaseException:
            self._ring.close()
            raise
        self._init_local()
        _live.add(self)

    def _init_local(self) -> None:
        """State private to this process (reset in a forked child)."""
        self._closed = False
        # Items this process took in a get_many that raised before
        # returning them (an item that would not unpickle).
        self._stash: collections.deque = collections.deque()
        self._buffer: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._feeder: threading.Thread | None = None
        self._join_cancelled = False
        self._finalizer: _mputil.Finalize | None = None
        self._spool = Spool()
        self._inline_max = min(INBAND_MAX, self._ring.capacity // 4)

    def _after_fork(self) -> None:
        # The parent's buffered items are the parent's: a child that sent
        # them too would duplicate them.  The spool stays: it notices the
        # fork and drops (closes) its inherited descriptors itself.
        # A queue closed here stays closed there (with the same clear error).
        spool, closed, feeder = self._spool, self._closed, self._feeder
        self._init_local()
        self._spool = spool
        if closed:
            self._closed = True
            if feeder is not None:
                # Closed while the parent's feeder was still writing: the
                # parent closes its descriptors once it is done; ours are
                # not needed here.
                self._close_fds()

    # -- pickling (Process args under spawn/forkserver, pool tasks, pipes) --
    def __reduce__(self) -> tuple[Any, ...]:
        if self._closed:
            raise OSError(f"{type(self).__name__} is closed and cannot be sent to another process")
        fds = [
            reduce_fd(_dup_if_collecting(fd))
            for fd in (self._ring.fd, self._reader.fileno(), self._writer.fileno())
        ]
        return _rebuild_queue, (type(self), fds, self._maxsize)

    def _check_closed(self) -> None:
        if self._closed:
            raise ValueError(f"Queue {self!r} is closed")

    # -- encoding -------------------------------------------------------------
    def _entry(self, obj: Any, what: str) -> Any:
        """``(payload, datagram, fds)`` for Ring.put, pickled here."""
        payload, fds = encode(obj, what)
        if not fds and len(payload) <= self._inline_max:
            return payload, None, None
        if len(fds) >= MAX_FDS:
            close_fds(fds)
            raise ValueError(
                f"an item can carry at most {MAX_FDS - 1} shared-memory buffers or descriptors, "
                f"{what} has {len(fds)}: put them in several items; nothing was put"
            )
        return self._datagram(payload, fds)

    def _spill(self, payload: bytes) -> Any:
        """An inline entry that does not fit in the ring, as a datagram whose
        payload is in a memfd of its own (not the spool's, which this rare
        path would keep open): the socket's buffer holds many such small
        datagrams where it would hold few of the payloads themselves."""
        return self._datagram(payload, [], spool=False)

    def _datagram(self, payload: bytes, fds: list[int], spool: bool = True) -> Any:
        """An entry sent as a datagram.  *fds* (closed once it is sent) are
        the descriptors the pickle collected, plus, for a large payload (any
        payload without *spool*), a memfd holding it (last)."""
        size = len(payload)
        if size <= INBAND_MAX and spool:
            kind, body = _INLINE_KIND, payload
        else:
            try:
                # The entry owns this descriptor (a spool keeps its own
                # copy): entries of a put_many are all prepared before any
                # is sent.
                if spool and size <= Spool.MAX_SIZE:
                    fds.append(self._spool.take(size))
                else:
                    fds.append(create_fd(size + 8, "shoal-message"))
                _pwrite_all(fds[-1], payload, size)
            except BaseException:
                close_fds(fds)
                raise
            kind, body = _MEMFD_KIND, size.to_bytes(8, "little")
        anc = fds_ancillary(fds) if fds else []
        return None, (kind, body, anc), fds

    def _decode(self, raw: Any) -> Any:
        """An item from what Ring.get returned."""
        if type(raw) is _Raise:
            raise raw.exc
        if type(raw) is bytes:
            try:
                return _pickle_loads(raw)
            except Exception as exc:
                raise _unpickle_error(exc) from exc
        data, anc = raw
        fds = received_fds(anc) if anc else []
        try:
            payload: bytes | memoryview
            if data[0] & MEMFD:
                if len(data) != 17:
                    raise corrupt_data(f"a large queue item's header is {len(data)} bytes long instead of 17")
                payload = take_memfd_payload(fds, int.from_bytes(data[9:17], "little"), "queue item")
            else:
                payload = memoryview(data)[9:]
            try:
                if fds:
                    with providing_fds(fds):
                        return loads(payload)
                return loads(payload)
            except Exception as exc:
                raise _unpickle_error(exc) from exc
        finally:
            if fds:
                close_fds(fds)

    # -- sending --------------------------------------------------------------
    def _put_entries(self, entries: list, block: bool, timeout: float | None) -> None:
        """Put *entries* (which this call owns: their descriptors are closed
        whatever happens)."""
        ring = self._ring
        # A JoinableQueue counts items when they are published (Ring.put
        # does, under the lock), or when they go to our buffer: counted
        # when put, as in the standard library, so join() waits for them.
        joinable = self._joinable
        if self._feeds and not self._maxsize:
            # Unbounded: never block.  Write directly only if nothing of
            # ours is waiting in the buffer, which keeps our order.
            if not self._buffer:
                try:
                    n = ring.put(entries, self._writer, 0, 0.0, joinable)
                except BaseException as exc:
                    _close_entries(entries)
                    if type(exc) is SendFailed:
                        raise _send_error(exc) from exc.error
                    raise
                _close_entries(entries[:n])
                if n == len(entries):
                    return
                entries = entries[n:]
            if joinable:
                ring.add_unfinished(len(entries))
            with self._lock:
                self._buffer.extend(entries)
                if self._feeder is None:
                    self._start_feeder()
            return
        try:
            n = ring.put(
                entries,
                self._writer,
                self._maxsize,
                _deadline(block, timeout),
                joinable,
                self._spill if self._maxsize else None,
            )
        except SendFailed as exc:
            raise _send_error(exc) from exc.error
        finally:
            _close_entries(entries)
        if n < len(entries):
            raise Full

    def _start_feeder(self) -> None:
        t = threading.Thread(target=self._feed, name="shoal.Queue feeder", daemon=True)
        try:
            t.start()
        except RuntimeError as exc:  # "can't create new thread at interpreter shutdown"
            # Without a feeder the items would wait forever: take them back
            # (with no feeder running, the buffer holds only this put's).
            entries = list(self._buffer)
            self._buffer.clear()
            _close_entries(entries)
            if self._joinable:
                self._ring.add_unfinished(-len(entries))
            exc.add_note(
                f"shoal.{type(self).__name__}.put could not start its feeder thread; the item was not put. "
                "Put items before the interpreter starts shutting down."
            )
            raise
        self._feeder = t
        if not self._join_cancelled:
            # Like the standard library: at exit, wait until the buffered
            # items are in the queue.
            self._finalizer = _mputil.Finalize(t, _join_thread, [weakref.ref(t)], exitpriority=-5)

    def _feed(self) -> None:
        """Feeder thread: write the buffered items in order, then exit.

        An item that cannot be sent is dropped with a warning (its
        descriptors closed, and for a JoinableQueue no longer counted);
        the items around it still go in, in order."""
        buffer = self._buffer
        while True:
            with self._lock:
                if not buffer:
                    self._feeder = None
                    return
                entries = list(buffer)
            dropped = 0
            try:
                # Already counted as unfinished when they were buffered.
                n = self._ring.put(entries, self._writer, 0, None)
            except SendFailed as exc:
                n, dropped = exc.done, 1
                error: BaseException = _send_error(exc)
            except Exception as exc:  # noqa: BLE001 - the ring is unusable: the items are dropped and reported  # pragma: no cover
                n, dropped = 0, len(entries)
                error = exc
            with self._lock:
                for _ in range(n + dropped):
                    buffer.popleft()
            _close_entries(entries[: n + dropped])
            if dropped:
                if self._joinable:
                    try:
                        self._ring.add_unfinished(-dropped)
                    except Exception:  # noqa: BLE001 - the ring is unusable  # pragma: no cover
                        pass
                warnings.warn(
                    f"shoal.{type(self).__name__}: {dropped} item(s) put earlier could not be "
                    f"written to the queue by its feeder thread and were dropped: {error}",
                    RuntimeWarning,
                    stacklevel=1,
                )

    # -- receiving ------------------------------------------------------------
    def _get(self, block: bool, timeout: float | None) -> Any:
        if self._closed:
            self._check_closed()
        if self._stash:
            try:
                return self._decode(self._stash.popleft())
            except IndexError:
                pass
        deadline = _deadline(block, timeout)
        data = self._ring.get_inline(deadline)
        if data is not None:
            try:
                return _pickle_loads(data)
            except Exception as exc:
                raise _unpickle_error(exc) from exc
        # Interrupted (Ctrl-C) after taking an item, the ring leaves it in
        # our stash for the next get.
        got = self._ring.get(1, self._reader, deadline, self._stash)
        if not got:
            raise Empty
        return self._decode(got[0])

    def _empty(self) -> bool:
        return not self._stash and self._ring.count() == 0

    # -- closing --------------------------------------------------------------
    def _close_fds(self) -> None:
        self._ring.close()
        self._reader.close()
        self._writer.close()
        self._spool.close()

    def close(self) -> None:
        """No more puts or gets from this process; its buffered items are
        still written (see :meth:`Queue.join_thread`).  Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            feeder = self._feeder
        for raw in self._stash:
            if type(raw) is tuple and raw[1]:  # a datagram never decoded
                close_fds(received_fds(raw[1]))
        self._stash.clear()
        if feeder is None:
            self._close_fds()
        else:
            # The feeder's items still go in; then the descriptors close.
            try:
                threading.Thread(target=self._close_after_feeder, args=(feeder,), daemon=True).start()
            except RuntimeError:  # at interpreter shutdown: the descriptors close with the process
                pass

    def _close_after_feeder(self, feeder: threading.Thread) -> None:
        feeder.join()
        self._close_fds()

    def __del__(self) -> None:
        try:
            if not self._closed and self._feeder is None:
                self._closed = True
                self._close_fds()
        except Exception:  # noqa: BLE001 - finalizer of a half-built object  # pragma: no cover
            pass

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"maxsize={self._maxsize}"
        return f"<shoal.{type(self).__name__} {state}>"


def _send_error(exc: SendFailed) -> OSError:
    err = exc.error
    return OSError(
        err.errno,
        f"the item could not be sent on the queue's socket ({err.strerror or err}); it was not put "
        "(nor any after it in the same put_many)",
    )


def _unpickle_error(exc: BaseException) -> SerializationError:
    return SerializationError(
        f"an item taken from the queue could not be unpickled ({type(exc).__name__}: {exc}); "
        "is the class or function it refers to importable in this process?"
    )


def _rebuild_queue(cls: Any, fd_reducers: Any, maxsize: int) -> Any:
    ring_fd, reader_fd, writer_fd = (rebuild(*args) for rebuild, args in fd_reducers)
    q = cls.__new__(cls)
    q._maxsize = maxsize
    try:
        q._ring = Ring(fd=ring_fd)
    except BaseException:  # a corrupt ring (CorruptDataError): nothing of it is kept
        close_fds((ring_fd, reader_fd, writer_fd))
        raise
    q._reader = socket.socket(fileno=reader_fd)
    q._writer = socket.socket(fileno=writer_fd)
    q._init_local()
    _live.add(q)
    return q


class SimpleQueue(_Base):
    """``multiprocessing.SimpleQueue``: ``put``, ``get``, ``empty``, ``close``.

    ``put`` pickles in the caller (so an unpicklable object raises there) and
    waits only while the shared ring is full.
    """

    def __init__(self, *, ctx: Any = None, capacity: int = DEFAULT_CAPACITY) -> None:
        super().__init__(0, ctx=ctx, capacity=capacity)

    def put(self, obj: Any) -> None:
        """Put *obj* on the queue."""
        self._check_closed()
        self._put_entries([self._entry(obj, "the object put on the queue")], True, None)

    def get(self) -> Any:
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
    an item put is in the queue when ``put`` returns, unless the shared ring
    is full (``empty()`` and ``qsize()`` see it); ``put_many`` and
    ``get_many`` move many items under one lock; a process killed in the
    middle of any of these does not break the queue for the others.

    *capacity* (bytes, default 1 MiB) sizes the shared ring that holds small
    items; when it is full, an unbounded ``put`` leaves the item to this
    process's feeder thread instead of blocking.
    """

    _feeds = True

    def __init__(self, maxsize: int = 0, *, ctx: Any = None, capacity: int = DEFAULT_CAPACITY) -> None:
        super().__init__(maxsize, ctx=ctx, capacity=capacity)

    def put(self, obj: Any, block: bool = True, timeout: float | None = None) -> None:
        """Put *obj* on the queue.  With a *maxsize*, wait up to *timeout*
        seconds for room (``queue.Full`` if there is none)."""
        if self._closed:
            self._check_closed()
        sized = _PLAIN.get(type(obj))
        if sized is not None and (not sized or len(obj) <= _PLAIN_MAX):
            payload = _pickle_dumps(obj, 5)
            entry: tuple = (
                (payload, None, None) if len(payload) <= self._inline_max else self._datagram(payload, [])
            )
        else:
            entry = self._entry(obj, "the object put on the queue")
        if (
            entry[1] is None
            and not self._maxsize
            and not self._buffer
            and not self._joinable
            and self._ring.put_inline(entry[0])
        ):
            return
        self._put_entries([entry], block, timeout)

    def put_nowait(self, obj: Any) -> None:
        """``put(obj, False)``."""
        self.put(obj, False)

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """Remove and return an item, waiting up to *timeout* seconds
        (``queue.Empty`` if none arrives)."""
        return self._get(block, timeout)

    def get_nowait(self) -> Any:
        """``get(False)``."""
        return self._get(False, None)

    def qsize(self) -> int:
        """The number of items in the queue (a snapshot; items still in a
        producer's feeder buffer are not counted)."""
        self._check_closed()
        return self._ring.count() + len(self._stash)

    def empty(self) -> bool:
        """True if the queue is empty (a snapshot)."""
        self._check_closed()
        return self._empty()

    def full(self) -> bool:
        """True if a bounded queue has no room (a snapshot)."""
        self._check_closed()
        return bool(self._maxsize) and self._ring.count() >= self._maxsize

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
        written (they are lost)."""
        self._join_cancelled = True
        finalizer = self._finalizer
        if finalizer is not None:
            finalizer.cancel()
            self._finalizer = None

    # -- batches --------------------------------------------------------------
    def put_many(self, items: Iterable[Any], block: bool = True, timeout: float | None = None) -> None:
        """Put every item of *items*, in order, taking the ring's lock once
        per ring-full rather than once per item.

        Each item is still its own entry: consumers take them one by one.
        With a *maxsize*, waits up to *timeout* for room; on timeout
        ``queue.Full`` is raised and the items before the one that did not
        fit were put.
        """
        self._check_closed()
        entries: list = []
        inline_max = self._inline_max
        fds: list[int] = []
        try:
            with sending_fds(fds):
                for item in items:
                    # The common case inline; anything else (descriptors, large
                    # or unpicklable by plain pickle) through _entry.
                    try:
                        payload = _pickle_dumps(item, 5, buffer_callback=small_buffers_only)
                    except Exception:  # noqa: BLE001 - plain pickle refused it: the slow path next
                        payload = None
                    if payload is None or fds or len(payload) > inline_max:
                        close_fds(fds)
                        fds.clear()
                        entries.append(self._entry(item, "an item passed to put_many"))
                    else:
                        entries.append((payload, None, None))
        except BaseException:
            _close_entries(entries)
            raise
        if entries:
            self._put_entries(entries, block, timeout)

    def get_many(self, max_items: int, timeout: float | None = None, *, block: bool = True) -> list:
        """Remove and return between 1 and *max_items* items, in order: wait
        up to *timeout* seconds for the first (``queue.Empty`` if none
        arrives), then take whatever else is already there."""
        self._check_closed()
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {max_items}")
        raws: list = []
        stash = self._stash
        while stash and len(raws) < max_items:
            raws.append(stash.popleft())
        if len(raws) < max_items:
            deadline = 0.0 if raws else _deadline(block, timeout)
            try:
                raws += self._ring.get(max_items - len(raws), self._reader, deadline, stash)
            except BaseException:
                stash.extendleft(reversed(raws))  # before what the ring stashed
                raise
        if not raws:
            raise Empty
        out = []
        decode = self._decode
        for i, raw in enumerate(raws):
            try:
                out.append(_pickle_loads(raw) if type(raw) is bytes else decode(raw))
            except Exception as exc:
                if not isinstance(exc, (SerializationError, CorruptDataError)):
                    error = _unpickle_error(exc)
                    error.__cause__ = exc
                    exc = error
                # Keep the rest for the next get.  Return what decoded before
                # the bad item; its error comes with the next call.
                stash.extendleft(reversed(raws[i + 1 :]))
                if out:
                    stash.appendleft(_Raise(exc))
                    return out
                raise exc from exc.__cause__
        return out


class JoinableQueue(Queue):
    """``multiprocessing.JoinableQueue``: a :class:`Queue` with ``task_done``
    and ``join``."""

    _joinable = True

    def task_done(self) -> None:
        """Mark one item taken with ``get`` as processed."""
        self._check_closed()
        self._ring.task_done()

    def join(self) -> None:
        """Wait until every item put has been marked with ``task_done``."""
        self._check_closed()
        self._ring.join()


public(Queue)
public(JoinableQueue)
public(SimpleQueue)
