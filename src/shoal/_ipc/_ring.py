"""A ring of records in shared memory, for the queues.

One memfd, mapped by every process holding the queue.  Producers and
consumers each have their own robust process-shared mutex (from
``shoal._native``), so with one producer and one consumer nobody ever waits
for a lock, and each side's fields live on their own cache line::

    0    producers' mutex          64   consumers' mutex
    128  tail, puts, seq, producers waiting        (written by producers)
    192  head, gets, consumers waiting             (written by consumers)
    256  not_empty futex word      320  not_full futex word
    384  unfinished tasks, joiners waiting, all_done futex word (JoinableQueue)
    448  capacity
    512  data: records, 8-byte aligned, wrapping at capacity

    record = length (u32) | kind (u32) | payload, padded to 8 bytes
             kind INLINE: the payload is the pickled item
             kind SOCKET: the payload is a sequence number; the item is the
                          datagram with that number on the queue's socket

A put copies its records in beyond ``tail`` and then publishes them by
storing the new ``tail`` (an atomic, sequentially consistent 8-byte store);
a get reads the records between ``head`` and the ``tail`` it loaded, then
stores the new ``head``.  So a process killed at any instant leaves either
the old or the new state: records beyond ``tail`` were never visible, and a
get killed before it stored ``head`` never returned its items, which stay
for the next consumer.  Nothing is lost or duplicated.  What can go stale
is a counter (``puts``/``gets``, for ``qsize`` and ``maxsize``): the next
locker is told that the owner died and recounts the records.  A live
thread interrupted by an exception (a signal handler's, anywhere) publishes
the records it wrote and releases the mutex, consistent, on its way out;
a ``get`` or ``put`` with a timeout waits for the mutex no longer than that.

Items that carry descriptors (out-of-band buffers, connections) or are too
large to copy through the ring travel as ``SOCK_SEQPACKET`` datagrams, which
alone can carry descriptors.  A producer sends the datagram, tagged with the
next sequence number, and writes a SOCKET record, both under the producers'
mutex; a consumer takes the record and then the datagram under the
consumers' mutex, so datagrams come off the socket in record order.  The
tags make this survive deaths: a datagram whose producer died before
publishing its record has a smaller tag than the record being taken and is
discarded (its descriptors closed); a record whose datagram a dying
consumer had already taken finds a larger tag (or nothing) and is skipped.

Corrupt rings (another process, or a stray write, changed the shared
bytes; see ``docs/security.md``): attaching checks the capacity against
the memfd's size (and that the memfd is sealed against shrinking); every
get checks that ``head`` and ``tail`` are aligned
and at most a capacity apart and that each record it takes (length, kind)
lies between them, and a put checks the same of ``tail`` before it writes
or waits.  A violation raises :class:`~shoal.exceptions.CorruptDataError`
(the lock released, nothing half taken), never reads or writes outside the
ring, and never waits for room that cannot come.  These are comparisons of
words the operation reads anyway.

Waiting: with the mutex released, first spinning for a few tens of
microseconds (a futex sleep and wake-up cost far more, and the other side
usually acts sooner), then on a futex word read before re-checking the
condition, in slices, so that a waker that died costs at most a slice.
Producers facing a full ring wait for a quarter of it to be free, and
consumers wake them only then: one wake-up per quarter, not a lock
hand-off per item.  A producer whose datagram does not fit in the socket
buffer polls for room; one that the kernel refuses more descriptors in
flight (``ETOOMANYREFS``: more than its ``RLIMIT_NOFILE`` sent and not yet
received) waits the same way, sleeping in growing steps up to 50 ms, since
``poll`` cannot wait for that.
"""

from __future__ import annotations

import errno
import mmap
import os
import select
import socket
import struct
import time
from typing import Any

from .. import _native
from .._fd import ANC_SIZE, check_sealed, create_fd, received_fds
from ..exceptions import corrupt_data
from ._packet import (
    _CLOEXEC,
    _CTRUNC,
    _RECV_SIZE,
    _TRUNCATED,
    INFLIGHT_BACKOFF_MAX,
    close_fds,
    fd_limit_error,
)

_PMUTEX = 0
_CMUTEX = 64
_TAIL = 128
_PUTS = 136
_SEQ = 144
_PWAIT = 152
_HEAD = 192
_GETS = 200
_CWAIT = 208
_NOT_EMPTY = 256
_NOT_FULL = 320
_UNFINISHED = 384
_JWAIT = 392
_ALL_DONE = 400
_CAPACITY = 448
_DATA = 512

INLINE = 0
SOCKET = 1

_PAIR = struct.Struct("<qq")
_REC = struct.Struct("<II")
_Q = struct.Struct("<q")

_DONTWAIT = int(socket.MSG_DONTWAIT)
_PEEK = int(socket.MSG_PEEK) | _DONTWAIT
_SLICE = 0.5  # longest single sleep; a waker that died costs at most this
_SPINS = 300  # ~30 µs of looking before sleeping
_YIELD_EVERY = 16

_load = _native.load
_yield = os.sched_yield
_store = _native.store
_fetch_add = _native.fetch_add
_cas = _native.compare_exchange
_acquire = _native.mutex_acquire
_release = _native.mutex_release
_futex_wait = _native.futex_wait
_futex_wake = _native.futex_wake
_put_one = _native.ring_put_inline
_get_one = _native.ring_get_inline
if _native.RING_LAYOUT != (
    _PMUTEX,
    _CMUTEX,
    _TAIL,
    _PUTS,
    _PWAIT,
    _HEAD,
    _GETS,
    _CWAIT,
    _NOT_EMPTY,
    _NOT_FULL,
    _DATA,
    INLINE,
):  # pragma: no cover - a build of another version's C code
    raise ImportError(
        f"shoal._native's ring layout {_native.RING_LAYOUT} is not this module's: rebuild shoal"
    )

DEFAULT_CAPACITY = 1 << 20


def _timeout(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    return max(0.0, deadline - time.monotonic())


def _attached_capacity(fd: int) -> int:
    """The capacity recorded in the ring *fd* another process made, checked
    against the memfd's size (mapping more than the file holds would turn
    a read into SIGBUS)."""
    check_sealed(fd, "a queue's ring")  # (it cannot shrink under our mapping)
    size = os.fstat(fd).st_size
    if size < _DATA:
        raise corrupt_data(f"a queue's shared memory has {size} bytes, less than its {_DATA}-byte header")
    (capacity,) = _Q.unpack_from(os.pread(fd, 8, _CAPACITY))
    if capacity < 4096 or capacity & 7 or _DATA + capacity > size:
        raise corrupt_data(
            f"a queue's header records a capacity of {capacity} bytes, which its shared memory of {size} "
            "bytes cannot hold (or is not a multiple of 8 of at least 4096)"
        )
    return capacity


def _corrupt_positions(head: int, tail: int, cap: int) -> Exception:
    return corrupt_data(
        f"a queue's ring is inconsistent: head {head} and tail {tail} must be multiples of 8 at most "
        f"its capacity ({cap} bytes) apart, tail last, and they and the item counters below 2**62"
    )


def _corrupt_record(pos: int, length: int, kind: int, tail: int) -> Exception:
    return corrupt_data(
        f"a queue's ring holds a record at {pos} of kind {kind} and length {length}, which does not fit "
        f"before its tail at {tail} (or is of no known kind)"
    )


class SendFailed(Exception):
    """Ring.put could not send an entry's datagram: ``done`` entries before
    it were put (published); the one at index ``done`` was not, nor any
    after it.  ``error`` is the ``OSError`` from ``sendmsg``."""

    def __init__(self, done: int, error: OSError) -> None:
        super().__init__(done, error)
        self.done = done
        self.error = error


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return _SLICE
    left = deadline - time.monotonic()
    return None if left <= 0 else min(left, _SLICE)


class Ring:
    """The shared ring of one queue, mapped into this process."""

    __slots__ = ("_cap", "_peek", "fd", "mm")

    def __init__(self, capacity: int = DEFAULT_CAPACITY, fd: int | None = None) -> None:
        if fd is None:
            capacity = max(4096, (capacity + 7) & ~7)
            fd = create_fd(_DATA + capacity, "shoal-queue")
            try:
                self.mm = mmap.mmap(fd, _DATA + capacity)
                _native.mutex_init(self.mm, _PMUTEX)
                _native.mutex_init(self.mm, _CMUTEX)
                _Q.pack_into(self.mm, _CAPACITY, capacity)
            except BaseException:
                os.close(fd)
                raise
        else:
            capacity = _attached_capacity(fd)
            self.mm = mmap.mmap(fd, _DATA + capacity)
        self.fd = fd
        self._cap = capacity
        self._peek = bytearray(9)

    @property
    def capacity(self) -> int:
        return self._cap

    def close(self) -> None:
        if self.fd >= 0:
            try:
                self.mm.close()
            except BufferError:  # pragma: no cover - a view still exported
                pass
            os.close(self.fd)
            self.fd = -1

    # -- locks ----------------------------------------------------------------
    # Every method that locks follows one pattern: the lock is taken and
    # released inside ``try``, and ``except BaseException`` calls _abandon.
    # An exception can come from a signal handler (Ctrl-C, a SIGALRM
    # timeout) between any two calls: right after the lock was taken, after
    # it was released, between an owner-died acquire and mutex_consistent.
    # No local flag can say for sure whether we hold the lock then; the
    # mutex itself can, and _abandon asks it.
    def _lock(self, which: int, deadline: float | None = None) -> bool:
        """Take *which*; False if *deadline* passed first."""
        try:
            died = _acquire(self.mm, which, _timeout(deadline))
        except TimeoutError:
            return False
        if died:
            self._repair(which)
        return True

    def _repair(self, which: int) -> None:
        # The previous holder died holding it: its counter may be stale.
        try:
            self._recount()
        finally:
            _native.mutex_consistent(self.mm, which)

    def _abandon(self, which: int) -> None:
        """After an exception: make sure this thread does not hold *which*
        (consistent, so that it stays usable), whatever the exception
        interrupted."""
        mm = self.mm
        try:
            died = _acquire(mm, which, 0.0)
        except RuntimeError:  # EDEADLK: this thread holds it
            try:
                _native.mutex_consistent(mm, which)
            except OSError:  # EINVAL: it is consistent (the usual case)
                pass
            else:  # taken from a dead owner, interrupted before the repair
                try:
                    self._recount()
                except Exception:  # noqa: BLE001 - best effort  # pragma: no cover
                    pass
        except (TimeoutError, OSError, ValueError):
            return  # held by another thread or process (or the ring is closed)
        else:
            if died:
                self._repair(which)
        _release(mm, which)

    def _recount(self) -> None:
        """Make ``puts - gets`` the number of records between head and tail
        (best effort: the other side may be moving)."""
        mm, cap = self.mm, self._cap
        head = _load(mm, _HEAD)
        tail = _load(mm, _TAIL)
        if not 0 <= tail - head <= cap or (head | tail) & 7 or (head | tail | _load(mm, _GETS)) >> 62:
            raise _corrupt_positions(head, tail, cap)
        pos, n = head, 0
        while pos < tail:
            length, kind = _REC.unpack_from(mm, _DATA + pos % cap)
            need = 8 + ((length + 7) & ~7)
            if kind not in (INLINE, SOCKET) or need > tail - pos:
                break
            pos += need
            n += 1
        _store(mm, _PUTS, _load(mm, _GETS) + n)

    def _wait(
        self,
        lock: int,
        watch: int,
        seen: int,
        word: int,
        waiters: int,
        deadline: float | None,
        target: int | None = None,
    ) -> bool:
        """With *lock* held: release it, wait until the value at *watch* is
        no longer *seen* (or, given a *target*, has reached it), take *lock*
        again.  False when the deadline has passed: the lock is *not* held
        then."""
        mm = self.mm
        _release(mm, lock)
        slice_ = _remaining(deadline)
        if slice_ is None:
            return False
        if target is None:
            target = seen + 1  # positions and counters only grow
        for i in range(_SPINS):
            if _load(mm, watch) >= target:
                return self._lock(lock, deadline)
            if i % _YIELD_EVERY == _YIELD_EVERY - 1:
                # Sharing a CPU with the other side, looking only keeps
                # it from running: let it.
                _yield()
        _fetch_add(mm, waiters, 1)
        try:
            expected = _load(mm, word) & 0xFFFFFFFF
            # Re-check after announcing ourselves: the other side loads
            # the waiter count after its store (both sequentially
            # consistent), so one of us sees the other.
            if _load(mm, watch) < target:
                _futex_wait(mm, word, expected, slice_)
        finally:
            _fetch_add(mm, waiters, -1)
        return self._lock(lock, deadline)

    def _wake(self, word: int, waiters: int, n: int) -> None:
        mm = self.mm
        if _load(mm, waiters) > 0:
            _fetch_add(mm, word, 1)
            _futex_wake(mm, word, n)

    # -- put ------------------------------------------------------------------
    def put_inline(self, payload: bytes) -> bool:
        """The fast path of an unbounded put of one small item: copy it in
        if there is room right now (False if not: take the general path,
        which waits, or raises on a corrupt ring).  One call into C
        (``ring_put_inline``), which takes and releases the producers' lock."""
        done = _put_one(self.mm, self._cap, payload)
        if done == 2:  # the lock came from a holder that died: held, to repair first
            self._repaired(_PMUTEX)
            return False
        return done == 1

    def put(
        self,
        entries: list,
        sock: socket.socket,
        maxsize: int,
        deadline: float | None,
        count_unfinished: bool = False,
        spill: Any = None,
    ) -> int:
        """Append *entries* in order; return how many were appended before
        *deadline* (``None``: wait as long as it takes, ``0.0``: no waiting).

        An entry is ``(payload, datagram, fds)``: *payload* (bytes) is copied
        into the ring, or *datagram* = ``(kind_byte, body, anc)`` is sent on
        *sock*; the caller closes *fds* afterwards.  With *count_unfinished*
        (JoinableQueue), the entries are counted as unfinished tasks just
        before they are published.

        *spill* (a bounded queue's: *maxsize* counts items, not bytes): an
        entry whose payload does not fit in the ring while the count has
        room is replaced by ``spill(payload)``, a datagram entry, which
        needs only a 16-byte record; so a put waits for the count, as with
        the standard library, not for bytes a consumer may never free.

        Raises :class:`SendFailed` when a datagram cannot be sent (the
        entries before it are put).  Whatever is raised, the records
        written before it are published: none is half put.
        """
        mm, cap = self.mm, self._cap
        done = 0
        total = len(entries)
        backoff = 0.0005
        try:
            if not self._lock(_PMUTEX, deadline):
                return 0
            while True:
                tail, puts = _PAIR.unpack_from(mm, _TAIL)
                head = _load(mm, _HEAD)
                room = cap - (tail - head)
                if not 0 <= room <= cap or tail & 7 or (tail | puts) >> 62:
                    raise _corrupt_positions(head, tail, cap)
                slots = maxsize - (puts - _load(mm, _GETS)) if maxsize else total
                wrote = 0
                blocked_on_socket = inflight = False
                failed = None
                short = 0  # bytes of room the next entry needs, if that stopped us
                try:
                    while done < total and wrote < slots:
                        payload, datagram, _fds = entries[done]
                        if datagram is None:
                            length = len(payload)
                            need = 8 + ((length + 7) & ~7)
                            if room < need and spill is not None and room >= 16:
                                entries[done] = spill(payload)  # the caller closes its descriptor
                                payload, datagram, _fds = entries[done]
                        if datagram is None:
                            if room < need:
                                short = need
                                break
                            self._write(tail, _REC.pack(length, INLINE), payload, length)
                        else:
                            need = 16
                            if room < need:
                                short = need
                                break
                            (seq,) = _Q.unpack_from(mm, _SEQ)
                            if seq >> 62:
                                raise corrupt_data(f"a queue's sequence number is out of range ({seq})")
                            # Taken before sending: a producer that dies after
                            # sending must not leave its tag to the next one.
                            _Q.pack_into(mm, _SEQ, seq + 1)
                            tag = _Q.pack(seq)
                            kind_byte, body, anc = datagram
                            try:
                                sock.sendmsg([kind_byte, tag, body], anc, _DONTWAIT)
                            except BlockingIOError:
                                blocked_on_socket = True
                                break
                            except OSError as exc:
                                if exc.errno == errno.ETOOMANYREFS:
                                    # Too many descriptors in flight (more
                                    # than RLIMIT_NOFILE): a full buffer too,
                                    # which consumers empty; but poll() does
                                    # not wait for it.
                                    blocked_on_socket = inflight = True
                                else:
                                    failed = exc
                                break
                            self._write(tail, _REC.pack(8, SOCKET), tag, 8)
                        # One statement, no call: a signal handler cannot
                        # run between these updates.
                        tail, room, done, wrote = tail + need, room - need, done + 1, wrote + 1
                finally:
                    if wrote:
                        if count_unfinished:
                            _fetch_add(mm, _UNFINISHED, wrote)
                        _store(mm, _PUTS, puts + wrote)
                        _store(mm, _TAIL, tail)  # publishes the records
                        self._wake(_NOT_EMPTY, _CWAIT, wrote)
                if failed is not None:
                    _release(mm, _PMUTEX)
                    raise SendFailed(done, failed) from failed
                if done == total:
                    _release(mm, _PMUTEX)
                    return done
                if maxsize and wrote >= slots:
                    # Full by count: the count must fit the records (at least
                    # 8 bytes each), or nothing any consumer does frees a slot.
                    count = puts + wrote - _load(mm, _GETS)
                    if not 0 <= count <= (tail - head) >> 3:
                        raise corrupt_data(
                            f"a queue's item count ({count}) does not match its ring ({tail - head} bytes "
                            "of records)"
                        )
                if blocked_on_socket:
                    _release(mm, _PMUTEX)
                    left = _remaining(deadline)
                    if left is None:
                        return done
                    if inflight:
                        time.sleep(min(left, backoff))
                        backoff = min(backoff * 2, INFLIGHT_BACKOFF_MAX)
                    else:
                        poller = select.poll()
                        poller.register(sock.fileno(), select.POLLOUT)
                        poller.poll(int(left * 1000) + 1)
                    if not self._lock(_PMUTEX, deadline):
                        return done
                elif short:
                    # Wait for a quarter of the ring, not for the next free
                    # byte: a full ring then costs one wake-up per quarter,
                    # not a lock hand-off per item.
                    want = min(cap, max(short, cap // 4))
                    if not self._wait(_PMUTEX, _HEAD, head, _NOT_FULL, _PWAIT, deadline, tail + want - cap):
                        return done
                elif not self._wait(_PMUTEX, _HEAD, head, _NOT_FULL, _PWAIT, deadline):
                    return done
        except BaseException:
            self._abandon(_PMUTEX)
            raise

    def _write(self, pos: int, header: bytes, payload: Any, length: int) -> None:
        mm, cap = self.mm, self._cap
        off = pos % cap
        # The header never wraps: positions and capacity are multiples of 8.
        if off + 8 + length <= cap:
            mm[_DATA + off : _DATA + off + 8 + length] = header + payload
            return
        mm[_DATA + off : _DATA + off + 8] = header
        off += 8
        if off == cap:
            off = 0
        first = cap - off
        if length <= first:
            mm[_DATA + off : _DATA + off + length] = payload
        else:
            view = memoryview(payload)
            mm[_DATA + off : _DATA + cap] = view[:first]
            mm[_DATA : _DATA + length - first] = view[first:]

    def _read(self, pos: int, length: int) -> bytes:
        mm, cap = self.mm, self._cap
        off = pos % cap
        first = cap - off
        if length <= first:
            return mm[_DATA + off : _DATA + off + length]
        return mm[_DATA + off : _DATA + cap] + mm[_DATA : _DATA + length - first]

    # -- get ------------------------------------------------------------------
    def get_inline(self, deadline: float | None = None) -> Any:
        """The fast path of a get: the oldest record if it is inline and
        there right now, else None (take the general path, which waits, or
        raises on a corrupt ring).  One call into C (``ring_get_inline``),
        which takes and releases the consumers' lock."""
        data = _get_one(self.mm, self._cap, _timeout(deadline))
        if data is False:  # the lock came from a holder that died: held, to repair first
            self._repaired(_CMUTEX)
            return None
        return data

    def _repaired(self, which: int) -> None:
        """*which* was taken from a holder that died (and is held): repair
        what it protects and release it."""
        try:
            self._repair(which)
        except BaseException:
            self._abandon(which)
            raise
        _release(self.mm, which)

    def get(self, max_n: int, sock: socket.socket, deadline: float | None, stash: Any = None) -> list:
        """Take up to *max_n* records, waiting until *deadline* for the first.

        Returns a list of ``bytes`` (an inline item) or ``(data, anc)``
        tuples (a datagram as ``recvmsg`` returned it); empty on timeout.

        Interrupted by an exception (a signal handler's) after taking items,
        it appends them to *stash* (a deque, for this process's next get)
        before re-raising; an inline item whose record it had not yet passed
        stays in the ring instead.
        """
        mm, cap = self.mm, self._cap
        out: list = []
        taking = False
        try:
            if not self._lock(_CMUTEX, deadline):
                return out
            while True:
                head, gets = _PAIR.unpack_from(mm, _HEAD)
                tail = _load(mm, _TAIL)
                if head == tail:
                    if not self._wait(_CMUTEX, _TAIL, tail, _NOT_EMPTY, _CWAIT, deadline):
                        return out
                    continue
                # Until head is stored: out[:kept] are the items of the
                # records before head; out[kept:], at most one, is that of
                # the record at head.  Each update is one statement with no
                # call, which a signal handler cannot split.
                if tail - head > cap or (head | tail) & 7 or (head | tail | gets) >> 62:
                    raise _corrupt_positions(head, tail, cap)
                taken = kept = 0
                taking = True
                append = out.append
                while head != tail and taken < max_n:
                    off = head % cap
                    length, kind = _REC.unpack_from(mm, _DATA + off)
                    if 8 + ((length + 7) & ~7) > tail - head or kind > SOCKET or (kind and length != 8):
                        raise _corrupt_record(head, length, kind, tail)
                    if kind == INLINE:
                        if off + 8 + length <= cap:
                            item = mm[_DATA + off + 8 : _DATA + off + 8 + length]
                        else:
                            item = self._read(head + 8, length)
                    else:
                        (seq,) = _Q.unpack_from(self._read(head + 8, 8))
                        item = self._take_datagram(sock, seq)
                    if item is not None:
                        append(item)
                    head, taken, kept = head + 8 + ((length + 7) & ~7), taken + 1, kept + (item is not None)
                _store(mm, _GETS, gets + taken)
                _store(mm, _HEAD, head)  # frees the space
                taking = False
                if cap - (tail - head) >= cap // 4:  # what waiting producers wait for
                    self._wake(_NOT_FULL, _PWAIT, 1 << 30)
                if out:
                    _release(mm, _CMUTEX)
                    return out
                # Only records whose datagrams died with a consumer: go on.
        except BaseException:
            self._interrupted_get(out, taking and (gets, head, taken, kept), stash)
            raise

    def _interrupted_get(self, out: list, state: Any, stash: Any) -> None:
        mm = self.mm
        try:
            if state:
                # Still holding the lock, before head was stored.
                gets, head, taken, kept = state
                if len(out) > kept and type(out[-1]) is not tuple:
                    # An inline item whose record is still at head: it stays
                    # there.  (A datagram's record is skipped once its
                    # datagram is gone from the socket: keep the datagram.)
                    del out[kept:]
                if taken:
                    _store(mm, _GETS, gets + taken)
                    _store(mm, _HEAD, head)
            if out:
                if stash is not None:
                    stash.extend(out)
                else:
                    for raw in out:
                        if type(raw) is tuple and raw[1]:
                            close_fds(received_fds(raw[1]))
        finally:
            self._abandon(_CMUTEX)

    def _take_datagram(self, sock: socket.socket, seq: int) -> Any:
        peek = self._peek
        while True:
            try:
                n = sock.recv_into(peek, 9, _PEEK)
            except BlockingIOError:
                return None  # taken by a consumer that died: the item is lost
            if n < 9:
                return None
            (tag,) = _Q.unpack_from(peek, 1)
            if tag > seq:
                return None
            data, anc, flags, _ = sock.recvmsg(_RECV_SIZE, ANC_SIZE, _CLOEXEC | _DONTWAIT)
            if tag == seq:
                if flags & _TRUNCATED:
                    # The item is lost; its record is skipped.
                    close_fds(received_fds(anc))
                    if flags & _CTRUNC:
                        # Our descriptor limit: the kernel dropped (some of)
                        # its descriptors.
                        raise fd_limit_error()
                    raise corrupt_data(
                        f"a queue item's datagram was longer than the {_RECV_SIZE} bytes of any datagram"
                    )
                return data, anc
            # Sent by a producer that died before publishing its record.
            close_fds(received_fds(anc))

    # -- counting -------------------------------------------------------------
    def count(self) -> int:
        mm = self.mm
        gets = _load(mm, _GETS)
        return max(0, _load(mm, _PUTS) - gets)

    def add_unfinished(self, n: int) -> None:
        """Count *n* more (or, negative, fewer) unfinished tasks; a
        JoinableQueue counts items before publishing them, so that a
        consumer's task_done() never finds the count short."""
        _fetch_add(self.mm, _UNFINISHED, n)
        if n < 0 and _load(self.mm, _UNFINISHED) <= 0:
            self._wake(_ALL_DONE, _JWAIT, 1 << 30)

    def task_done(self) -> None:
        mm = self.mm
        while True:
            left = _load(mm, _UNFINISHED)
            if left <= 0:
                raise ValueError("task_done() called too many times")
            if _cas(mm, _UNFINISHED, left, left - 1) == left:
                break
        if left == 1:
            self._wake(_ALL_DONE, _JWAIT, 1 << 30)

    def join(self) -> None:
        mm = self.mm
        while True:
            left = _load(mm, _UNFINISHED)
            if left <= 0:
                return
            _fetch_add(mm, _JWAIT, 1)
            try:
                expected = _load(mm, _ALL_DONE) & 0xFFFFFFFF
                if _load(mm, _UNFINISHED) > 0:
                    _futex_wait(mm, _ALL_DONE, expected, _SLICE)
            finally:
                _fetch_add(mm, _JWAIT, -1)
