"""Snapshots: a large array sent again, and not written since, is not copied again.

A pool's parent copies each large task argument into a warm segment
(:mod:`._warm`).  A program that passes the same arrays to task after task
(``pool.map(fit, params)`` over one ``X``, or joblib's ``Parallel`` calls
with the same ``X, y``) paid that copy on every send.  Comparing the bytes
with the last copy costs as much as copying them; the kernel can say
instead whether anything wrote to them (``shoal._native.track_writes``:
userfaultfd write protection without a handler thread, then
``PAGEMAP_SCAN``)::

    a send of a buffer of >= MIN_BYTES whose memory a live numpy array
    owns, in private anonymous memory of this process
        first time: copied into a warm segment as any buffer is, and
            remembered as sent (an array sent only once, as each of a stream
            of new arrays is, must not pin a segment of its own)
        second time: WarmSegments.lease_copy ─▶ Snapshot.track():
            write-protect the buffer's whole pages, then copy it into a
            segment that is kept (the snapshot) and leased like any other
    a later send of the same array (the same owner object, address, length)
        Snapshot.clean(): no whole page written since (the kernel's record)
        and the partial pages at each end (shared with other data, so not
        tracked) equal to the snapshot's (a compare of < 8 KiB)
            clean   ─▶ a new lease on the snapshot: no copy
            written ─▶ the snapshot is forgotten (tracking stops) and the
                       owner is remembered as one that changes: it is copied
                       on every send from now on, as before, and its writes
                       no longer pay the page fault that tracking costs

Who owns what: a :class:`Snapshot` belongs to the ``WarmSegments`` entry it
describes, and its tracked page range to this module's registry, one per
process: two ranges never overlap, so write-protecting one never hides a
write that another still has to report.  The owner is held by a weak
reference: when the array is freed its snapshot is forgotten at the next
send (never sent again: its memory may hold another array by then).  A
snapshot segment is never written after it is filled, so any number of
readers may hold it at once.

What the kernel cannot see, and so is never tracked: memory that another
process can write (shared or file-backed mappings: ``SharedArray``,
``np.memmap``, ``multiprocessing`` shared memory), memory a numpy array
does not own (bytes, ``mmap``), and kernels without userfaultfd's
asynchronous write protection or a correct ``PAGEMAP_SCAN`` (older than 6.9
and 6.8.10): those are copied on every send.  Not seen either: a device writing by DMA into pages
pinned before the protection (RDMA, a GPU's registered host memory, io_uring
fixed buffers) and ``MADV_DONTNEED`` on the live array; ``SHOAL_SNAPSHOTS=0``
turns snapshots off for such programs.
"""

from __future__ import annotations

import os
import sys
import threading
import weakref
from typing import Any

from .. import _native

#: Buffers at least this large are tracked; smaller ones copy in microseconds.
MIN_BYTES = 1 << 20
#: Snapshots one process keeps at once (each pins its segment); beyond this
#: the least recently used is forgotten.
MAX_SNAPSHOTS = 16
#: ``SHOAL_SNAPSHOTS=0``: copy every send.
ENABLED = os.environ.get("SHOAL_SNAPSHOTS", "1") != "0"

_PAGE = os.sysconf("SC_PAGE_SIZE")


def owner_of(view: memoryview) -> tuple[Any, int] | None:
    """(the numpy array that owns *view*'s memory, *view*'s address), or
    None when *view* is not a buffer that can be tracked."""
    np = sys.modules.get("numpy")
    obj = view.obj
    if np is None or not isinstance(obj, np.ndarray) or view.nbytes < MIN_BYTES:
        return None
    owner = obj
    while isinstance(owner.base, np.ndarray):
        owner = owner.base
    if owner.base is not None:  # memory of something else: bytes, mmap, a SharedArray's segment
        return None
    # The address of the bytes the view exports (not what the array says
    # its data is: a subclass may say otherwise).
    return owner, np.frombuffer(view, dtype=np.uint8, count=1).__array_interface__["data"][0]


def _private_anonymous(start: int, end: int) -> bool:
    """Whether [start, end) lies in private anonymous mappings of this
    process: memory no other process can write."""
    try:
        with open("/proc/self/maps", "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return False
    pos = start
    for line in lines:
        fields = line.split(None, 5)
        lo, _, hi = fields[0].partition(b"-")
        a, b = int(lo, 16), int(hi, 16)
        if b <= pos:
            continue
        if a > pos:
            return False  # a hole
        path = fields[5].strip() if len(fields) > 5 else b""
        anonymous = fields[4] == b"0" and (path in (b"", b"[heap]") or path.startswith(b"[anon:"))
        if fields[1][3:4] != b"p" or not anonymous:
            return False
        pos = b
        if pos >= end:
            return True
    return False


class _Registry:
    """The ranges tracked in this process (never overlapping)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ranges: dict[int, int] = {}  # start -> end
        self.pid = os.getpid()

    def after_fork(self) -> None:
        # A thread may have held the lock while another forked (the pool
        # forks replacement workers from its scheduler thread).
        self.lock = threading.Lock()
        self.ranges = {}
        self.pid = os.getpid()

    def claim(self, start: int, end: int) -> bool:
        with self.lock:
            if self.pid != os.getpid():  # a forked child: the parent's ranges are not ours
                self.ranges = {}
                self.pid = os.getpid()
            if any(s < end and start < e for s, e in self.ranges.items()):
                return False
            if not _native.track_writes(start, end - start):
                if not self.ranges:
                    _native.stop_tracking()
                return False
            self.ranges[start] = end
            return True

    def release(self, start: int, end: int) -> None:
        with self.lock:
            if self.pid == os.getpid() and self.ranges.pop(start, None) == end:
                _native.untrack_writes(start, end - start)
                if not self.ranges:
                    # Its descriptors (a userfaultfd, /proc/self/pagemap)
                    # live only while something is tracked.
                    _native.stop_tracking()


_registry = _Registry()
os.register_at_fork(after_in_child=_registry.after_fork)


class Snapshot:
    """What a segment holds a copy of, and how to tell it is still that."""

    __slots__ = ("__weakref__", "addr", "end", "nbytes", "owner", "ready", "start")

    def __init__(self, owner: Any, addr: int, nbytes: int, start: int, end: int, dead: list) -> None:
        me = weakref.ref(self)
        self.owner = weakref.ref(owner, lambda _ref: dead.append(me()))
        self.addr = addr
        self.nbytes = nbytes
        self.start = start  # the whole pages tracked
        self.end = end
        self.ready = False  # True once the segment holds the copy

    @classmethod
    def track(cls, owner: Any, addr: int, nbytes: int, dead: list) -> Snapshot | None:
        """Start tracking writes to the buffer (before it is copied: a write
        during the copy is then seen at the next send); None when it cannot
        be tracked."""
        start = -(-addr // _PAGE) * _PAGE
        end = (addr + nbytes) // _PAGE * _PAGE
        if not ENABLED or end - start < _PAGE or not _native.can_track():
            return None
        if not _private_anonymous(addr, addr + nbytes) or not _registry.claim(start, end):
            with _registry.lock:
                if not _registry.ranges:
                    _native.stop_tracking()  # (can_track opened its descriptors)
            return None
        return cls(owner, addr, nbytes, start, end, dead)

    def holds(self, owner: Any, addr: int, nbytes: int) -> bool:
        return self.owner() is owner and self.addr == addr and self.nbytes == nbytes

    def clean(self, view: memoryview, fd: int) -> bool:
        """Whether *view* (the buffer this snapshot holds, at the same
        address) still has the bytes the segment *fd* holds."""
        if not self.ready or _native.written(self.start, self.end - self.start):
            return False
        head = self.start - self.addr
        tail = self.addr + self.nbytes - self.end
        flat = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        if head and os.pread(fd, head, 0) != flat[:head]:
            return False
        return not tail or os.pread(fd, tail, self.nbytes - tail) == flat[self.nbytes - tail :]

    def release(self) -> None:
        """Stop tracking (idempotent)."""
        if self.end:
            _registry.release(self.start, self.end)
            self.end = 0
            self.ready = False
