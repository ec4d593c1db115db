"""Anonymous shared-memory segments that cannot leak.

A :class:`Segment` is a ``memfd`` (anonymous memory with a descriptor, never a
name in ``/dev/shm``) mapped into this process.  It travels to other processes
as a descriptor (see :mod:`shoal._fd`), so the kernel frees the memory
when the last descriptor and mapping are gone, however the processes holding
them end.  Nothing needs a resource tracker and nothing can be left behind.

Every memfd shoal makes is sealed against shrinking (``F_SEAL_SHRINK``; it
can still grow): a page of a mapping beyond the end of its file is SIGBUS,
so a process holding the descriptor could otherwise crash every process
that maps it by truncating it.  Receivers of the long-lived shared
structures (a SharedDict, a queue's ring) refuse a memfd without that seal
(:func:`check_sealed`); one system call when they attach.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import stat
from typing import Any

from .._native import Region
from ..exceptions import CorruptDataError, corrupt_data
from ._limits import exhausted, inject
from ._passing import collecting, reduce_fd

_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # pragma: no cover - every Linux has both
        return 1 << 40


#: The largest size another process may announce for what it sends (a
#: message, a frame, a shared-memory payload): this machine's physical
#: memory.  A length field above it is refused before anything is allocated
#: or read; no shoal peer can have written that much for us to read.
MAX_PEER_SIZE = _physical_memory()


def peer_size_error(size: int, what: str) -> CorruptDataError:
    """The error for *what* (``"a message"``) announcing *size* bytes, more
    than :data:`MAX_PEER_SIZE`: a corrupt length field."""
    return corrupt_data(
        f"{what} announces a size of {size} bytes ({size / 2**30:.1f} GiB), more than this machine's "
        f"memory ({MAX_PEER_SIZE / 2**30:.1f} GiB), so nothing was allocated or read"
    )


def check_fd_holds(fd: int, end: int, what: str) -> None:
    """Raise :class:`CorruptDataError` unless *fd* is a regular file (a
    memfd) of at least *end* bytes: what *what* announced it holds.  One
    ``fstat``: for paths where the read that follows costs far more."""
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise corrupt_data(f"{what} came with a descriptor that cannot be examined ({exc})") from exc
    if not stat.S_ISREG(st.st_mode):
        raise corrupt_data(f"{what} came with a descriptor that is not shared memory (mode {st.st_mode:o})")
    if st.st_size < end:
        raise corrupt_data(f"{what} announces {end} bytes, but its shared memory holds only {st.st_size}")


def create_fd(size: int, name: str = "shoal") -> int:
    """A new memfd of *size* bytes (zero-filled, sparse until written),
    sealed against shrinking.  When the system refuses (no descriptor, no
    memory), an OSError that says what ran out (see :mod:`._limits`)."""
    try:
        inject("memfd")
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    except OSError as exc:
        raise exhausted(exc, f"create {size} bytes of shared memory ({name})") from exc
    try:
        if size:
            inject("ftruncate")
            os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    except BaseException as exc:
        os.close(fd)
        if isinstance(exc, OSError):
            raise exhausted(exc, f"create {size} bytes of shared memory ({name})") from exc
        raise
    return fd


def check_sealed(fd: int, what: str) -> None:
    """Raise :class:`CorruptDataError` unless the memfd *fd* (received as
    *what*) is sealed against shrinking, as :func:`create_fd` makes them:
    mapped, one that another process can truncate could crash this one."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as exc:  # not a memfd (EINVAL)
        raise corrupt_data(f"{what} came as a descriptor that is not shoal's shared memory ({exc})") from exc
    if not seals & fcntl.F_SEAL_SHRINK:
        raise corrupt_data(
            f"{what} came as shared memory that any process holding it can shrink (shoal seals its own "
            "against that: a mapping of a file that shrinks crashes the processes using it)"
        )


def fd_from_buffer(data: Any) -> int:
    """A new memfd holding a copy of *data* (any contiguous buffer)."""
    view = memoryview(data).cast("B")
    fd = create_fd(view.nbytes)
    try:
        # write() copies into the page cache without a user-space page fault
        # per 4 KiB page, which is several times faster than copying into a
        # fresh mapping.
        written = 0
        while written < view.nbytes:
            written += os.pwrite(fd, view[written:], written)
    except BaseException as exc:
        os.close(fd)
        if isinstance(exc, OSError):
            raise exhausted(exc, f"copy {view.nbytes} bytes into shared memory") from exc
        raise
    return fd


class Segment:
    """A shared-memory segment: a memfd and its mapping in this process.

    Pickling a segment sends its descriptor; the receiver maps the same pages.
    ``close()`` drops this process's descriptor and mapping; the memory itself
    lives until every process has done so (or exited).
    """

    __slots__ = ("__weakref__", "buf", "fd", "mmap", "size")

    def __init__(self, size: int, *, fd: int | None = None, populate: bool = False) -> None:
        if size < 0:
            raise ValueError(f"segment size must be >= 0, got {size}")
        self.fd = create_fd(size) if fd is None else fd
        self.size = size
        flags = mmap.MAP_SHARED | (_POPULATE if populate else 0)
        self.mmap = mmap.mmap(self.fd, size, flags=flags) if size else None
        self.buf = memoryview(self.mmap) if self.mmap is not None else memoryview(b"")

    @classmethod
    def from_buffer(cls, data: Any) -> Segment:
        """A new segment holding a copy of *data* (any contiguous buffer)."""
        view = memoryview(data).cast("B")
        return cls(view.nbytes, fd=fd_from_buffer(view))

    def __reduce__(self) -> Any:
        # A shoal channel owns (and closes after sending) the descriptors it
        # collects: give it a duplicate so this segment stays usable.
        fd = os.dup(self.fd) if collecting() else self.fd
        rebuild, args = reduce_fd(fd)
        return _rebuild_segment, (rebuild, args, self.size)

    def close(self) -> None:
        """Release this process's view of the segment (idempotent)."""
        if self.fd < 0:
            return
        try:
            self.buf.release()
        except BufferError:
            # Someone still holds a view (an array built on it); the mapping
            # then lives until they drop it.
            pass
        else:
            if self.mmap is not None:
                self.mmap.close()
        os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> Segment:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1
        except Exception:  # noqa: BLE001 - finalizer at interpreter shutdown
            pass

    def __repr__(self) -> str:
        return f"<Segment fd={self.fd} size={self.size}>"


def _rebuild_segment(rebuild: Any, args: Any, size: int) -> Segment:
    return Segment(size, fd=rebuild(*args))


def map_received(fd: int, size: int, *, writable: bool) -> memoryview:
    """Map *size* bytes of the memfd *fd* that another process sent (the
    caller still closes *fd*), keeping no descriptor (unlike ``mmap.mmap``,
    which holds a duplicate for as long as it lives: a program keeping
    thousands of results would run out of them).

    ``writable=True``: copy-on-write; the view reads the shared pages, and
    writes through it stay in this process.  ``writable=False``: shared and
    read-only.  Dropping the last reference to the view (and to whatever was
    built on it) unmaps it.  ``OSError`` if the kernel refuses the mapping
    (ENOMEM: address space, or ``vm.max_map_count`` mappings)."""
    if size == 0:
        return memoryview(bytearray()) if writable else memoryview(b"")
    inject("map")
    return memoryview(Region(fd, size, writable))


def map_private(fd: int, size: int) -> memoryview:
    """:func:`map_received`, writable (copy-on-write)."""
    return map_received(fd, size, writable=True)


def map_private_fd(fd: int, size: int) -> memoryview:
    """:func:`map_private`, and close *fd*."""
    try:
        return map_private(fd, size)
    finally:
        os.close(fd)
