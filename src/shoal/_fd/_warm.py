"""Warm shared-memory segments for large buffers, reused once every reader is done.

A pool sends large buffers (task arguments, results) through memfd segments
instead of its pipes.  Filling *fresh* shared memory is dominated by the
kernel allocating and zeroing pages; filling pages that already exist is a
plain copy, several times faster.  So each sending process (the pool's
parent for arguments, each worker for results) keeps a few segments
(:class:`WarmSegments`) and reuses one as soon as nobody reads it any more.

Who still reads a segment is tracked by the kernel, never by messages, so a
reader that dies, or one that keeps an array for an hour, can never cause a
segment to be overwritten under it nor leak it:

* A *lease* on a segment is an open file description (a fresh ``open`` of
  ``/proc/self/fd/N``, not a ``dup``) holding a shared OFD lock
  (``F_OFD_SETLK``, ``F_RDLCK``) on it.  The lock lives exactly as long as
  that open file description: until the last descriptor on it is closed,
  by whichever process holds it, or by the kernel when it dies.
* The sender takes a lease with :meth:`WarmSegments.lease`, writes the
  buffers, and passes the lease's descriptor beside its message.  While the
  message is in flight the kernel holds the descriptor; the receiver takes
  its *own* lease (:func:`map_leased`) before it closes the one it got, and
  its mapping keeps that lease (a mapping holds its open file description,
  with no descriptor) until the last array built on it is gone, in this
  process or in a process forked from it.  The sender closes its lease when it will not
  send the segment again (the pool: when the task is finished, since a task
  whose worker died is sent again).
* :class:`WarmSegments` owns one descriptor per segment that holds no lock;
  a segment is free when ``F_OFD_GETLK`` through it finds no lock at all.

Ownership: a :class:`WarmSegments` belongs to the process that made it
(a forked child starts empty, forgetting its inherited copies) and is used
from any thread of it (one lock).  ``close()`` drops its descriptors: the
memory of segments still leased lives until their readers let go, the rest
is freed at once.  Idle segments are kept while they fit :data:`BUDGET`
bytes; beyond that the least recently used idle ones are dropped.

Where ``/proc`` is missing (no way to open a second description) leases
are refused and callers fall back to a fresh segment per message.

Snapshots (the pool's parent only, ``WarmSegments(snapshots=True)``):
:meth:`WarmSegments.lease_copy` sends one large buffer in a segment of its
own, and the segment a tracked array was copied into is kept as that
array's *snapshot* (see :mod:`._snapshots`): never picked for other
buffers, leased again without a copy while the kernel reports no write to
the array, and back among the others once the array is written or freed,
or when more than ``MAX_SNAPSHOTS`` are held.  Snapshot segments count in
the budget like the rest.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import threading
import weakref
from typing import Any

from .._native import copy_into
from ._segment import create_fd, map_received
from ._snapshots import ENABLED, MAX_SNAPSHOTS, Snapshot, owner_of

_PAGE = os.sysconf("SC_PAGE_SIZE")

#: struct flock on Linux: l_type, l_whence, l_start, l_len, l_pid (+ padding).
_FLOCK = struct.Struct("hhqqi4x")
_WHOLE_READ = _FLOCK.pack(fcntl.F_RDLCK, os.SEEK_SET, 0, 0, 0)
_WHOLE_WRITE = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)

#: Bytes of idle segments one process keeps warm.
BUDGET = 1 << 30
#: Segments one process keeps, leased or idle.
MAX_SEGMENTS = 32
#: An idle segment is reused for a buffer only if it is at most this many
#: times larger (a huge segment is not tied up by a small message).
MAX_SLACK = 4


def open_lease(fd: int, flags: int = os.O_RDWR) -> int:
    """A new open file description of the memfd *fd*, holding a shared
    lock on it until the description's last descriptor is closed."""
    lease = os.open(f"/proc/self/fd/{fd}", flags | os.O_CLOEXEC)
    try:
        fcntl.fcntl(lease, fcntl.F_OFD_SETLK, _WHOLE_READ)
    except BaseException:
        os.close(lease)
        raise
    return lease


def is_leased(fd: int) -> bool:
    """True while any open file description other than *fd*'s holds a lease."""
    found = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _WHOLE_WRITE)
    return _FLOCK.unpack(found)[0] != fcntl.F_UNLCK


def map_leased(fd: int, size: int, *, writable: bool) -> memoryview:
    """Map *size* bytes of the leased segment *fd* (received beside a
    message; the caller still closes it) under a lease of this process's
    own, which lasts as long as the mapping.

    ``writable=False``: shared and read-only, so arrays built on it are
    read-only.  ``writable=True``: private (copy-on-write), so this process
    may write to what it received without the sender, or the next message
    reusing the segment, seeing it.

    The mapping keeps no descriptor (:func:`~._segment.map_received`): it
    holds the lease's open file description, and with it the lock, by
    itself.  Taking the lease needs one free descriptor for a moment
    (``OSError`` EMFILE when there is none).
    """
    lease = open_lease(fd, os.O_RDONLY)
    try:
        return map_received(lease, size, writable=writable)
    finally:
        os.close(lease)


class WarmSegments:
    """The reusable segments one process sends large buffers in."""

    __slots__ = (
        "_budget",
        "_changing",
        "_closed",
        "_dead",
        "_entries",
        "_lock",
        "_pid",
        "_seen",
        "_snapshots",
        "_tick",
    )

    def __init__(self, budget: int = BUDGET, *, snapshots: bool = False) -> None:
        self._budget = budget
        # [fd, capacity, last use, this process's mapping or None,
        #  the Snapshot it holds or None]
        self._entries: list[list[Any]] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._tick = 0
        self._closed = False
        self._snapshots = snapshots and ENABLED
        self._dead: list[Snapshot | None] = []  # snapshots whose array was freed
        # Arrays sent once, and arrays found written (numpy arrays cannot be
        # hashed: by id, address and length, with a weak reference to tell
        # a new array at the same id from them).
        self._seen: dict[tuple[int, int, int], weakref.ref[Any]] = {}
        self._changing: dict[tuple[int, int, int], weakref.ref[Any]] = {}

    @property
    def snapshots(self) -> bool:
        """Whether :meth:`lease_copy` keeps snapshots (made so, and enabled)."""
        return self._snapshots

    def lease(self, size: int) -> int:
        """A lease (a new descriptor, the caller's to close) on a segment of
        at least *size* bytes, whose content is undefined."""
        return self.lease_mapped(size)[0]

    def lease_mapped(self, size: int) -> tuple[int, memoryview | None]:
        """:meth:`lease`, and a writable view of the segment's first *size*
        bytes when it is warm (its pages exist: copying into them through
        this mapping is a plain ``memcpy``); ``None`` for a fresh segment,
        which is best filled with ``pwrite`` (no page fault per page here).
        The view is valid until the lease is closed.

        Raises ``OSError`` if a lease cannot be taken (no ``/proc``, or
        this object is closed): send a fresh segment then."""
        with self._lock:
            lease, view, _entry = self._lease_entry(size)
            return lease, view

    def lease_copy(self, view: memoryview) -> int:
        """A lease on a segment holding *view*'s bytes from offset 0 (its
        size rounded up to whole pages): the snapshot an earlier call made
        of the same array, when nothing has written to it since: no copy
        (see :mod:`._snapshots`);
        else a copy made now, which becomes the array's snapshot the second
        time the array is sent (an array sent once, as a stream of new
        arrays is, keeps the warm segments reusable).

        Raises ``OSError`` as :meth:`lease_mapped` does."""
        n = view.nbytes
        found = owner_of(view) if self._snapshots else None
        snap = None
        with self._lock:
            if self._pid != os.getpid():
                self._forget_inherited()
            self._reap()
            if found is not None:
                owner, addr = found
                entry = next((e for e in self._entries if e[4] and e[4].holds(owner, addr, n)), None)
                if entry is not None:
                    if entry[4].clean(view, entry[0]):
                        self._tick += 1
                        entry[2] = self._tick
                        return open_lease(entry[0])
                    if entry[4].ready:  # written since: copied on every send from now on
                        self._forget(entry)
                        _remember(self._changing, owner, addr, n)
                    found = None  # (not ready: another thread is filling it)
                elif _known(self._changing, owner, addr, n) or not _known(self._seen, owner, addr, n):
                    _remember(self._seen, owner, addr, n)
                    found = None
            lease, target, entry = self._lease_entry(-(-n // _PAGE) * _PAGE)
            if found is not None:
                try:
                    # Tracked before the copy: a write during it shows at the next send.
                    snap = Snapshot.track(found[0], found[1], n, self._dead)
                    if snap is None:  # cannot be tracked: not tried again
                        _remember(self._changing, found[0], found[1], n)
                    else:
                        self._limit_snapshots()
                        entry[4] = snap
                except BaseException:
                    if snap is not None:
                        snap.release()
                    os.close(lease)
                    raise
        try:
            _fill(lease, target, view)
        except BaseException:
            with self._lock:
                if snap is not None and entry[4] is snap:
                    self._forget(entry)
            os.close(lease)
            raise
        if snap is not None:
            snap.ready = True
        return lease

    def _lease_entry(self, size: int) -> tuple[int, memoryview | None, list[Any]]:
        """lease_mapped, and the entry leased; the lock is held."""
        if self._closed:
            raise OSError("these warm segments are closed")
        if self._pid != os.getpid():
            self._forget_inherited()
        self._tick += 1
        entry = self._pick(size)
        view = None
        if entry is None:
            fd = create_fd(size, "shoal-buffers")
            entry = [fd, size, 0, None, None]
            self._entries.append(entry)
        elif entry[1] < size:
            os.ftruncate(entry[0], size)  # grows; the pages it has stay warm
            entry[1] = size
            entry[3] = None  # remapped at its next use, once all its pages exist
        else:
            if entry[3] is None:
                # Written before: its pages exist, map them all at once.
                entry[3] = memoryview(mmap.mmap(entry[0], entry[1], flags=mmap.MAP_SHARED | _POPULATE))
            view = entry[3][:size]
        entry[2] = self._tick
        try:
            lease = open_lease(entry[0])
        except BaseException:
            self._entries.remove(entry)
            _drop(entry)
            raise
        self._trim(entry)
        return lease, view, entry

    def _forget(self, entry: list[Any]) -> None:
        """The entry's segment holds no snapshot any more (the lock is held)."""
        snap, entry[4] = entry[4], None
        if snap is not None:
            snap.release()

    def _reap(self) -> None:
        """Forget the snapshots of arrays that were freed (the lock is held)."""
        while self._dead:
            snap = self._dead.pop()
            for entry in self._entries:
                if entry[4] is snap:
                    self._forget(entry)

    def _limit_snapshots(self) -> None:
        held = [e for e in self._entries if e[4] is not None]
        if len(held) >= MAX_SNAPSHOTS:
            self._forget(min(held, key=lambda e: e[2]))

    def _pick(self, size: int) -> list[Any] | None:
        best = grow = None
        for entry in self._entries:
            cap = entry[1]
            if entry[4] is not None or cap > size * MAX_SLACK + (1 << 20) or is_leased(entry[0]):
                continue
            if cap >= size:
                if best is None or cap < best[1]:
                    best = entry
            elif grow is None or cap > grow[1]:
                grow = entry
        return best if best is not None else grow

    def _trim(self, keep: list[int]) -> None:
        entries = self._entries
        total = sum(e[1] for e in entries)
        if total <= self._budget and len(entries) <= MAX_SEGMENTS:
            return
        for entry in sorted(entries, key=lambda e: e[2]):
            if total <= self._budget and len(entries) <= MAX_SEGMENTS:
                break
            if entry is keep:
                continue
            leased = is_leased(entry[0])
            if leased and len(entries) <= MAX_SEGMENTS:
                continue  # in use: counted, but its readers need it
            # A leased segment dropped here lives on until its readers let
            # go; the kernel frees it then.
            entries.remove(entry)
            _drop(entry)
            if not leased:
                total -= entry[1]

    def descriptors(self) -> list[int]:
        """This process's descriptors of the segments (for a forked worker to close)."""
        return [e[0] for e in self._entries]

    def _forget_inherited(self) -> None:
        # Copies inherited through fork: a pool worker has closed their
        # descriptors already (their numbers may be reused), so only forget
        # them; any other child keeps them until it exits.
        self._entries = []
        self._seen = {}
        self._changing = {}
        self._dead = []
        self._pid = os.getpid()

    def close(self) -> None:
        """Drop every segment (idempotent); leased ones live until released."""
        with self._lock:
            if self._pid != os.getpid():
                self._forget_inherited()
            for entry in self._entries:
                _drop(entry)
            self._entries = []
            self._closed = True


def _drop(entry: list) -> None:
    snap, entry[4] = entry[4], None
    if snap is not None:
        snap.release()
    view = entry[3]
    entry[3] = None
    if view is not None:
        m = view.obj
        view.release()
        try:
            m.close()
        except BufferError:  # a slice handed out by lease_mapped is still alive
            pass
    try:
        os.close(entry[0])
    except OSError:
        pass


#: Arrays one WarmSegments remembers as sent once, or as written.
_REMEMBERED = 256


def _known(seen: dict[tuple[int, int, int], weakref.ref[Any]], owner: Any, addr: int, n: int) -> bool:
    ref = seen.get((id(owner), addr, n))
    return ref is not None and ref() is owner


def _remember(seen: dict[tuple[int, int, int], weakref.ref[Any]], owner: Any, addr: int, n: int) -> None:
    if len(seen) >= _REMEMBERED:
        for key in [k for k, r in seen.items() if r() is None] or list(seen)[: _REMEMBERED // 2]:
            del seen[key]
    seen[(id(owner), addr, n)] = weakref.ref(owner)


def _fill(lease: int, target: memoryview | None, view: memoryview) -> None:
    """Copy *view* to the start of the segment: through *target*, its warm
    mapping (a memcpy without the GIL, which a long copy would keep from the
    pool's scheduler), or with ``pwrite`` into fresh pages (no page fault
    per 4 KiB page)."""
    if target is not None:
        copy_into(target, view)
        return
    n = view.nbytes
    written = 0
    while written < n:
        written += os.pwrite(lease, view[written:], written)
