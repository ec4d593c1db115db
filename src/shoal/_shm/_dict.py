"""SharedDict: a dict in shared memory, safe for many processes at once.

Data flow and ownership::

    process A                         memfd (one per dict)               process B
    SharedDict ── Mapping (mmap of ──▶ ┌──────────────────────────────┐ ◀── Mapping ── SharedDict
       │          max_size bytes)      │ header: magic, file_size,    │
       │                               │   desc ─┐, gen, max_size,    │
       │  pickled as its descriptor    │   robust mutex               │
       └──────── (SCM_RIGHTS / DupFd) ─▶ region ◀┘ (current)          │
                                       │   index  cap x u64           │
                                       │   entries {hash,key,value}   │
                                       │   heap: immutable blocks     │
                                       │ old region: zeros (punched)  │
                                       └──────────────────────────────┘

* The memory is a memfd: no name anywhere, so the kernel frees it when the
  last process holding its descriptor or a mapping is gone, however the
  processes end.  Each process maps the file at the dict's ``max_size``
  (address space only), so growing is ``ftruncate`` + ``fallocate`` and a
  store of the new ``file_size``: nobody remaps, offsets never move.
* Keys are encoded canonically, so that keys a dict treats as one (equal,
  same hash) encode alike in every process: a type tag and bytes for str,
  bytes, int, float, None, tuple and frozenset (``1``, ``1.0`` and ``True``
  encode alike; frozenset members are sorted by their encoding).  A key of
  another type that equals one of those with the same hash is stored as
  that value and comes back as it: numpy scalars as int or float,
  namedtuples as tuples, str subclasses as str.  Enum members (even
  IntEnum) keep their type and do not match the equal int or str.  Any
  other key is pickled by a pickler without a memo (a shared sub-object
  and two equal ones pickle alike) that writes sets and dicts in sorted
  order (a set's order follows the hash seed, which differs between
  spawned processes); its class must be importable (not defined inside a
  function), else ``SerializationError``.  Within such an object, numbers
  are not canonicalised (``P(np.int64(1))`` and ``P(1)`` are two keys).  A
  key holding NaN cannot be stored (``TypeError``) and looking one up
  misses, as in a dict.  The encodings are hashed with xxh64, never
  ``hash()``, which differs between spawned processes.  Values are
  ints inline in the entry's value word (so ``incr`` is one store) or tagged
  blocks: str, bytes, float, None, bools directly, anything else pickled.
* Reads take no lock.  The native core probes the index and copies the
  value between two reads of ``gen``; every mutation is made visible by one
  atomic store (an index slot, a value word, or ``desc`` for a whole new
  region), and visible bytes are never rewritten while their region is
  current, so a reader sees the state before or after a write, never a mix.
  That is per operation: ``gen`` moves only when a region is replaced, so a
  lock-free reader sees the operations of another's ``with d.locked():``
  block one by one, and a whole-dict read (``items()``, ``copy()``) taken
  while others write is not one snapshot.  Readers never wait for a
  transaction (a reader waiting on a writer that waits on it would hang);
  reading under ``locked()`` gives the consistent view.
* Writes hold the robust mutex in the header.  ``with d.locked():`` holds it
  across several operations (re-entrant for the thread holding it, also
  through a second handle of the same dict in that process).  When a
  write does not fit, the writer builds a compacted copy of the live entries
  in a new region (placed at the start of the file if the space before the
  current region is big enough, else after it) and publishes it with one
  store of ``desc``; then it punches the old region out of the file.
* A writer killed at any instant (SIGKILL mid-update) leaves the last
  published state plus unreachable garbage.  The kernel releases its robust
  mutex; the next locker is told the owner died and recomputes the few
  derived counters (entry count, live count) from the published words,
  raises the heap top over every referenced block (never lowers it: a
  lock-free reader may still be copying a block whose value was just
  replaced) and moves ``gen`` before marking the mutex consistent.  An
  unfinished rebuild is an unpublished region, i.e. garbage.  What a dead process had done inside
  ``with d.locked():`` stays as far as it got: each operation is whole,
  the block as a whole is not rolled back.
* Closing (``close()``, ``Manager.shutdown()``) may come from any thread,
  or from a finalizer run in the middle of an operation: the handle is
  marked closed at once, and its mapping is unmapped only when no native
  operation of this process is using it and no thread of this process
  holds the lock (a held robust mutex must stay mapped for glibc); a
  ``with d.locked():`` block that outlives the close gets ``ValueError``
  from its next operation and releases the lock when it ends.
* Errors: an unpicklable key or value raises ``TypeError``
  (:class:`shoal.SerializationError`) before anything is locked or stored;
  a write that would take the file past ``max_size`` (default: physical
  memory, at most 64 GiB), or that the kernel cannot back with memory, raises
  ``MemoryError`` with the dict unchanged.  So does creating or receiving a
  dict when this process has no address space left to reserve its
  ``max_size`` (thousands of open dicts): the message says to close unused
  dicts or pass a smaller ``max_size``.  ``pop`` and ``popitem`` copy the
  encoded value out and remove the entry under the lock, then decode it
  (unpickling runs user code, which may write to the dict): a value that
  fails to unpickle is removed and its error raised.
* Corrupt memory (another process, or a stray write in one, changed bytes
  of the file; see ``docs/security.md``): every word the core reads is
  checked before it is used as an offset or a length, and the file size
  published in the header is trusted only as far as the file goes, so an
  operation on a corrupt dict raises :class:`shoal.CorruptDataError` naming
  what was inconsistent, and never touches memory outside the file.  So
  does receiving a dict whose header records an impossible ``max_size``,
  and reading a key whose encoding is malformed.  A writer that finds the
  dict corrupt changes nothing; the dict stays unusable.  The file can only
  grow: its memfd is sealed against shrinking, and a dict received without
  that seal is refused, so no process can make a mapped page vanish
  (SIGBUS).
"""

from __future__ import annotations

import enum
import io
import math
import numbers
import operator
import os
import pickle
import struct
import threading
from collections.abc import Callable, ItemsView, Iterator, KeysView, Mapping, MutableMapping, ValuesView
from typing import Any, Protocol, Self

from .. import _native
from .._fd import check_sealed, collecting, create_fd, reduce_fd
from .._serialization import dumps
from .._util import public
from ..exceptions import SerializationError, corrupt_data

__all__ = ("SharedDict",)

_HEADER = _native.DICT_HEADER_SIZE
_PAGE = os.sysconf("SC_PAGE_SIZE")
_INITIAL_SIZE = 4 * _PAGE
_MIN_LGCAP = 3
_INLINE_MIN = _native.INLINE_MIN
_INLINE_MAX = _native.INLINE_MAX
_MISSING: Any = object()
_FLOAT = struct.Struct("<cd")
_LEN = struct.Struct("<I")

_get = _native.dict_get
_put = _native.dict_put
_incr = _native.dict_incr
_delete = _native.dict_delete

#: No process can map more (the x86-64 and arm64 user address space).
_ADDRESS_SPACE = 1 << 47


def _default_max_size() -> int:
    """Physical memory, capped at 64 GiB: every process reserves this much
    address space per dict (no memory), and 128 TiB is all there is."""
    try:
        phys = os.sysconf("SC_PHYS_PAGES") * _PAGE
    except (ValueError, OSError):
        phys = 1 << 34
    return min(max(phys, 1 << 30), 1 << 36)


# -- encodings -----------------------------------------------------------------


# Set while pickling a key or value for storage, where a handle to shared
# memory (a SharedDict inside a SharedDict) would not survive.
_storing = threading.local()


class StorageRefs(Protocol):
    """What a dict that can hold references to shared objects supplies (the
    Manager's dict does): it pickles values for storage, replacing each
    shared object inside (a SharedDict, a manager proxy) by a reference that
    stays valid in every process, and raises as :func:`dumps` does."""

    def dumps(self, obj: Any, what: str) -> bytes: ...


def _dumps_for_storage(obj: Any, what: str, refs: StorageRefs | None = None) -> bytes:
    _storing.active = True
    try:
        if refs is not None:
            return refs.dumps(obj, what)
        return dumps(obj, what=what)
    finally:
        _storing.active = False


class _NaNKey(TypeError):
    """A key containing NaN: it cannot be stored, so lookups miss."""


def _encode_key(key: Any) -> bytes:
    """Canonical bytes for a key: equal keys (as dict sees them) encode alike."""
    t = type(key)
    if t is str:
        return b"s" + key.encode("utf-8", "surrogatepass")
    if t is int or t is bool:
        return b"i%d" % key
    if t is bytes:
        return b"b" + key
    if t is float:
        if key.is_integer():
            return b"i%d" % int(key)
        if key != key:
            raise _NaNKey("NaN cannot be a SharedDict key: it is not equal to itself")
        return _FLOAT.pack(b"f", key)
    if key is None:
        return b"n"
    if t is tuple:
        parts = [_encode_key(k) for k in key]
        return b"t" + b"".join(_LEN.pack(len(p)) + p for p in parts)
    if t is frozenset:
        parts = sorted(_encode_key(k) for k in key)
        return b"z" + b"".join(_LEN.pack(len(p)) + p for p in parts)
    return _encode_other_key(key)


def _encode_other_key(key: Any) -> bytes:
    """A key of any other type: the builtin value it equals (as a dict sees
    it: equal, same hash), or else its canonical pickle."""
    hash(key)  # unhashable keys fail like they do for dict: TypeError
    if isinstance(key, enum.Enum):  # enum members keep their type
        if type(key._value_) in _SIMPLE:
            # A class reference and one scalar: the C pickler's bytes are
            # canonical here, and 10x faster than _KeyPickler's.
            try:
                return b"p" + pickle.dumps(key, 5)
            except Exception:  # noqa: BLE001 - reported below
                pass  # reported below
    else:
        canon = _builtin_equal(key)
        if canon is not _MISSING:
            return _encode_key(canon)
    _storing.active = True
    try:
        buf = io.BytesIO()
        _KeyPickler(buf).dump(key)
        return b"p" + buf.getvalue()
    except _NaNKey:
        raise
    except Exception as exc:
        raise SerializationError(
            f"cannot use {_short(key)} as a SharedDict key: {type(exc).__name__}: {exc}. Keys of "
            "other types than str, bytes, numbers, None, tuples and frozensets are pickled "
            "(without references to shared sub-objects) and must be picklable and not recursive"
        ) from exc
    finally:
        _storing.active = False


_SIMPLE = frozenset((int, str, bytes, float, bool, type(None)))


def _builtin_equal(key: Any) -> Any:
    """The str, bytes, int, float, tuple or frozenset equal to *key* with
    the same hash (a numpy scalar, a namedtuple, a str subclass...), or
    _MISSING.  Raises _NaNKey for a NaN-like number."""
    try:
        if isinstance(key, str):
            canon: Any = str.__str__(key)
        elif isinstance(key, bytes):
            canon = bytes.__getitem__(key, slice(None))
        elif isinstance(key, tuple):
            canon = tuple.__getitem__(key, slice(None))
        elif isinstance(key, frozenset):
            canon = frozenset(frozenset.__iter__(key))
        elif isinstance(key, numbers.Number):
            if hasattr(type(key), "__index__"):
                canon = operator.index(key)  # type: ignore[arg-type]  # checked: it has __index__
            else:
                canon = float(key)  # type: ignore[arg-type]  # a Number without __index__
                if canon != canon:
                    raise _NaNKey("NaN cannot be a SharedDict key: it is not equal to itself")
        else:
            return _MISSING
        if hash(canon) == hash(key) and canon == key:  # what a dict checks
            return canon
    except _NaNKey:
        raise
    except Exception:  # noqa: BLE001 - not a builtin equivalent: encoded as a pickle
        pass
    return _MISSING


def _key_order(obj: Any) -> bytes:
    return _encode_key(obj)


class _KeyPickler(pickle._Pickler):  # the Python pickler: it asks reducer_override about every object
    """Pickles equal keys to equal bytes: no memo (a shared sub-object and
    two equal ones pickle alike; a recursive key fails), and set and dict
    contents in a fixed order (a set's order follows the hash seed, which
    differs between spawned processes)."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, 5)
        self.fast = True

    def reducer_override(self, obj: Any) -> Any:
        t = type(obj)
        try:
            if t is frozenset or t is set:
                return t, (sorted(obj, key=_key_order),)
            if t is dict:
                return t, (sorted(obj.items(), key=lambda kv: _key_order(kv[0])),)
        except _NaNKey:
            raise
        except Exception:  # noqa: BLE001 - not a builtin equivalent: encoded as a pickle
            pass
        return NotImplemented


def _decode_key(data: bytes) -> Any:
    """The key *data* encodes (see _encode_key); CorruptDataError when it is
    not an encoding shoal writes (keys are never rewritten in place, so
    only another process's stray write makes one)."""
    try:
        return _decode_key_parts(data)
    except (struct.error, ValueError, RecursionError) as exc:  # truncated parts, not digits, not UTF-8
        raise corrupt_data(f"a SharedDict key's encoding is malformed ({type(exc).__name__}: {exc})") from exc


def _decode_key_parts(data: bytes) -> Any:
    tag = data[:1]
    if tag == b"s":
        return data[1:].decode("utf-8", "surrogatepass")
    if tag == b"i":
        return int(data[1:])
    if tag == b"b":
        return data[1:]
    if tag == b"f":
        return _FLOAT.unpack(data)[1]
    if tag == b"n":
        return None
    if tag == b"t" or tag == b"z":
        items = []
        pos = 1
        while pos < len(data):
            (n,) = _LEN.unpack_from(data, pos)
            if pos + 4 + n > len(data):
                raise ValueError(f"a part of {n} bytes at {pos} overruns the {len(data)}-byte key")
            items.append(_decode_key_parts(data[pos + 4 : pos + 4 + n]))
            pos += 4 + n
        return tuple(items) if tag == b"t" else frozenset(items)
    if tag == b"p":
        import pickle

        return pickle.loads(data[1:])
    raise ValueError(f"unknown tag {tag!r}")


def _encode_value(value: Any, refs: StorageRefs | None = None) -> int | bytes:
    """An int the native core stores inline, or tagged bytes (see src/native/dict.h)."""
    t = type(value)
    if t is int:
        if _INLINE_MIN <= value <= _INLINE_MAX:
            return value
    elif t is str:
        return b"s" + value.encode("utf-8", "surrogatepass")
    elif t is bytes:
        return b"b" + value
    elif t is float:
        return _FLOAT.pack(b"f", value)
    elif value is None:
        return b"n"
    elif value is True:
        return b"T"
    elif value is False:
        return b"F"
    return b"p" + _dumps_for_storage(value, f"SharedDict value {_short(value)}", refs)


def _short(obj: Any) -> str:
    try:
        text = repr(obj)
    except Exception:  # noqa: BLE001 - a repr that raises is described by type
        text = f"<{type(obj).__qualname__} object>"
    return text if len(text) <= 60 else text[:57] + "..."


# -- the dict ------------------------------------------------------------------


def _add(key: Any, value: Any, n: Any) -> Any:
    """``value + n`` for incr, with an error that names the key."""
    try:
        return value + n
    except TypeError:
        raise TypeError(
            f"SharedDict.incr({key!r:.40}, {n!r:.40}): cannot add {type(n).__name__} to the value stored "
            f"there, of type {type(value).__name__} ({value!r:.40}); incr adds numbers (update_with applies "
            "any function)"
        ) from None


class SharedDict(MutableMapping):
    """A dict in shared memory: pass it to processes and pool tasks; every
    process sees the same contents.

    ``SharedDict(initial=None, *, max_size=None)``: *initial* is a mapping
    or an iterable of pairs.  *max_size* caps the size of the shared file
    (default: the machine's physical memory, at most 64 GiB); the dict grows
    on demand, and since a rebuild copies it, it holds up to about a third
    of that.

    Single operations are atomic.  ``d[k] += 1`` is two operations (a read
    and a write): use ``d.incr(k)``, ``d.update_with(k, fn)``, or do it
    inside ``with d.locked():``.

    Reads take no lock and never wait, so they do not see transactions:
    ``locked()`` excludes other *writers* only, and a read from another
    process or thread can observe a ``locked()`` block half done.  Whole-dict
    reads (iteration, ``keys()``, ``values()``, ``items()``, ``copy()``,
    ``==``) see every entry in a state it had while they ran, but not all
    entries at one instant when others write meanwhile.  For a consistent
    view of several keys, read them inside ``with d.locked():`` (there,
    ``d.copy()`` is a snapshot).
    """

    __slots__ = ("__weakref__", "_fd", "_map", "_max_size")

    # A plain SharedDict holds data only; the Manager's dict sets this (see
    # StorageRefs) to hold shared objects by reference.
    _refs: StorageRefs | None = None

    def __init__(self, initial: Any = None, *, max_size: int | None = None) -> None:
        max_size = _default_max_size() if max_size is None else int(max_size)
        max_size = -(-max_size // _PAGE) * _PAGE
        if max_size < _INITIAL_SIZE:
            raise ValueError(f"max_size must be at least {_INITIAL_SIZE} bytes, got {max_size}")
        fd = create_fd(0, "shoal-dict")
        try:
            _grow_file(fd, 0, _INITIAL_SIZE)
            mapping = _native.Mapping(fd, max_size)
            _native.dict_init(mapping, _INITIAL_SIZE)
        except BaseException:
            os.close(fd)
            raise
        self._attach(fd, mapping, max_size)
        if initial is not None:
            self.update(initial)

    def _attach(self, fd: int, mapping: Any, max_size: int) -> None:
        self._fd = fd
        self._map = mapping
        self._max_size = max_size

    @classmethod
    def _from_fd(cls, fd: int) -> Self:
        try:
            header = os.pread(fd, 40, 0)
            magic, max_size = struct.unpack("<Q24xQ", header) if len(header) == 40 else (0, 0)
            if magic != _native.DICT_MAGIC:
                raise corrupt_data(
                    "the descriptor received as a SharedDict does not hold one (no magic number)"
                )
            check_sealed(fd, "a SharedDict")
            # Every process maps the dict at its max_size: a corrupt one must
            # not become a mapping of any size (or one short of the file).
            size = os.fstat(fd).st_size
            # (Less than the whole address space: no process could reserve
            # all of it, so no creator made such a dict.  One this process
            # cannot reserve, as under AddressSanitizer, whose shadow takes
            # an eighth, is a MemoryError that says so.)
            if max_size % _PAGE or not _INITIAL_SIZE <= max_size < _ADDRESS_SPACE or size > max_size:
                raise corrupt_data(
                    f"a SharedDict's header records a max_size of {max_size} bytes, which no SharedDict has "
                    f"(a multiple of {_PAGE} of at least {_INITIAL_SIZE}, less than {_ADDRESS_SPACE}, and at "
                    f"least its file's {size} bytes)"
                )
            mapping = _native.Mapping(fd, max_size)
        except BaseException:
            os.close(fd)
            raise
        self = cls.__new__(cls)
        self._attach(fd, mapping, max_size)
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        self._check_open()
        if getattr(_storing, "active", False):
            raise TypeError(
                "a SharedDict cannot be stored inside a SharedDict (it is a handle to "
                "shared memory, not data); store d.copy(), pass the dicts separately, or "
                "use a Manager().dict(), which holds shared objects by reference"
            )
        # A shoal channel owns (and closes after sending) the descriptors it
        # collects, so it gets a duplicate; multiprocessing's DupFd makes
        # its own.
        fd = os.dup(self._fd) if collecting() else self._fd
        rebuild, args = reduce_fd(fd)
        return _rebuild_shared_dict, (rebuild, args)

    # -- lifetime --

    def close(self) -> None:
        """Release this process's handle (descriptor and mapping).  The
        memory lives on while any other process still holds the dict.

        Safe from any thread at any time: every later operation on this
        handle raises ``ValueError``; an operation already running finishes
        first, and if a thread of this process holds ``locked()`` the
        mapping goes (and the lock is released) when its block ends."""
        if self._fd >= 0:
            self._map.close()
            os.close(self._fd)
            self._fd = -1

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def __enter__(self) -> SharedDict:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if self._fd >= 0:
                self._map.close()  # (it refers to the descriptor by number: it must let go of it first)
                os.close(self._fd)
                self._fd = -1
        except Exception:  # noqa: BLE001 - finalizer at shutdown or after a failed __init__
            pass

    def _check_open(self) -> None:
        if self._fd < 0:
            raise ValueError("operation on a closed SharedDict")

    # -- reads (no lock) --

    def _lookup(self, key: Any) -> Any:
        """The value of *key*, or _MISSING (also for a key that can never
        have been stored: one holding NaN)."""
        try:
            enc = _encode_key(key)
        except _NaNKey:
            self._check_open()
            return _MISSING
        return _get(self._map, enc, _MISSING)

    def __getitem__(self, key: Any) -> Any:
        # __getitem__ and get inline _lookup: they are the hot path.
        try:
            value = _get(self._map, _encode_key(key), _MISSING)
        except _NaNKey:
            value = self._lookup(key)
        if value is _MISSING:
            raise KeyError(key)
        return value

    def get(self, key: Any, default: Any = None) -> Any:
        try:
            value = _get(self._map, _encode_key(key), _MISSING)
        except _NaNKey:
            value = self._lookup(key)
        return default if value is _MISSING else value

    def __contains__(self, key: Any) -> bool:
        try:
            return self._lookup(key) is not _MISSING
        except SerializationError:
            return False  # it could never have been stored

    def __len__(self) -> int:
        return _native.dict_len(self._map)

    def __iter__(self) -> Iterator[Any]:
        # A snapshot: mutating the dict while iterating is allowed (other
        # processes do it all the time) and does not affect this loop.
        return iter([_decode_key(k) for k in _native.dict_items(self._map, 0)])

    def keys(self) -> KeysView[Any]:
        return _SnapshotKeys(self)

    def values(self) -> ValuesView[Any]:
        return _SnapshotValues(self)

    def items(self) -> ItemsView[Any, Any]:
        return _SnapshotItems(self)

    def copy(self) -> dict:
        """A plain dict with the current contents.  Lock-free: while others
        write, not one snapshot; inside ``with d.locked():`` it is one."""
        return {_decode_key(k): v for k, v in _native.dict_items(self._map, 2)}

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SharedDict):
            other = other.copy()
        if isinstance(other, Mapping):
            return self.copy() == dict(other.items())
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __or__(self, other: Any) -> dict:
        if not isinstance(other, Mapping):
            return NotImplemented
        return self.copy() | dict(other.items())

    def __ror__(self, other: Any) -> dict:
        if not isinstance(other, Mapping):
            return NotImplemented
        return dict(other.items()) | self.copy()

    def __ior__(self, other: Any) -> SharedDict:
        self.update(other)
        return self

    def __reversed__(self) -> Iterator[Any]:
        return reversed(list(self))

    def __repr__(self) -> str:
        return f"SharedDict({self.copy()!r})" if self._fd >= 0 else "<SharedDict closed>"

    def __str__(self) -> str:
        # Like the standard library's Manager().dict() proxy, whose str()
        # is the referent's repr: print(d) shows {'count': 0}.
        return repr(self.copy()) if self._fd >= 0 else "<SharedDict closed>"

    # -- writes --

    def __setitem__(self, key: Any, value: Any) -> None:
        enc = _encode_key(key)
        val = _encode_value(value, self._refs)
        if not _put(self._map, enc, val):
            self._put_growing(enc, val)

    def _put_growing(self, enc: bytes, val: int | bytes) -> None:
        with self.locked():
            for _ in range(3):
                if _put(self._map, enc, val):
                    return
                self._grow(len(enc) + (0 if type(val) is int else len(val)))  # type: ignore[arg-type]  # bytes
            raise RuntimeError("SharedDict could not make room for a write; this is a bug in shoal")

    def __delitem__(self, key: Any) -> None:
        if self._remove(key, False) is _MISSING:
            raise KeyError(key)

    def _remove(self, key: Any, want: bool) -> Any:
        try:
            enc = _encode_key(key)
        except _NaNKey:
            self._check_open()
            return _MISSING
        return _delete(self._map, enc, _MISSING, want)

    def pop(self, key: Any, default: Any = _MISSING) -> Any:
        """Remove *key* and return its value (*default*, or KeyError, when
        missing).  The entry is removed first and its value decoded after:
        if decoding raises (say the value's class cannot be imported in
        this process), the entry is gone and the error propagates."""
        value = self._remove(key, True)
        if value is _MISSING:
            if default is _MISSING:
                raise KeyError(key)
            return default
        return value

    def popitem(self) -> tuple[Any, Any]:
        """Remove and return the most recently inserted (key, value) pair
        (removed before its value is decoded, as :meth:`pop`)."""
        pair = _native.dict_popitem(self._map)
        if pair is None:
            raise KeyError("popitem(): SharedDict is empty")
        return _decode_key(pair[0]), pair[1]

    def setdefault(self, key: Any, default: Any = None) -> Any:
        enc = _encode_key(key)
        value = _get(self._map, enc, _MISSING)
        if value is not _MISSING:
            return value
        val = _encode_value(default, self._refs)
        with self.locked():
            value = _get(self._map, enc, _MISSING)
            if value is not _MISSING:
                return value
            if not _put(self._map, enc, val):
                self._put_growing(enc, val)
            return default

    def clear(self) -> None:
        with self.locked():
            self._rebuild(live=0, live_bytes=0, empty=True)

    def update(self, other: Any = (), /, **kwargs: Any) -> None:
        # Encode everything first: an unpicklable item stores nothing.
        if isinstance(other, Mapping):
            pairs = list(other.items())
        elif hasattr(other, "keys"):
            pairs = [(k, other[k]) for k in other.keys()]  # noqa: SIM118 - dict.update's protocol: keys()
        else:
            pairs = list(other)
        pairs.extend(kwargs.items())
        refs = self._refs
        encoded = [(_encode_key(k), _encode_value(v, refs)) for k, v in pairs]
        with self.locked():
            for enc, val in encoded:
                if not _put(self._map, enc, val):
                    self._put_growing(enc, val)

    # -- race-free operations --

    def incr(self, key: Any, n: int | float = 1, default: int | float = 0) -> Any:
        """Atomically add *n* to ``d[key]`` (``default`` when missing) and
        return the new value."""
        enc = _encode_key(key)
        value = _incr(self._map, enc, n, default)  # None when the fast path does not apply (a float)
        if value is None:  # not an inline int, or the dict must grow
            value = self.update_with(key, lambda v: _add(key, v, n), default=default)
        return value

    def update_with(self, key: Any, fn: Callable[[Any], Any], default: Any = None) -> Any:
        """Atomically store ``fn(d[key])`` (``fn(default)`` when the key is
        missing) and return it.  *fn* runs while the dict is locked: keep it
        short.  If it raises, nothing changes."""
        enc = _encode_key(key)
        with self.locked():
            value = _get(self._map, enc, _MISSING)
            new = fn(default if value is _MISSING else value)
            val = _encode_value(new, self._refs)
            if not _put(self._map, enc, val):
                self._put_growing(enc, val)
            return new

    def locked(self, timeout: float | None = None) -> _native.DictLock:
        """Hold the dict's lock: ``with d.locked(): ...``.  Every other
        *writer* (process or thread) waits until the block ends, so the
        operations inside are one transaction for them, and reads inside
        the block see no other writer's changes.  Lock-free *readers*
        elsewhere do not wait: they can see the block's operations one at a
        time (read inside ``locked()`` too when that matters).  Re-entrant
        for the holding thread, also through another handle of the same
        dict.

        Raises TimeoutError when *timeout* seconds pass without the lock.
        The lock is taken by ``__enter__`` itself (in C), so a
        KeyboardInterrupt that arrives while waiting either prevents the
        acquisition or is raised inside the block, whose exit releases it.
        """
        self._check_open()
        return _native.DictLock(self._map, timeout, self)

    # -- growth --

    def _grow(self, extra: int) -> None:
        """Make room for *extra* more heap bytes and one more entry: rebuild
        the live entries into a bigger (or just compacted) region.  Lock held."""
        _, _, _, live, live_bytes = _native.dict_stats(self._map)
        self._rebuild(live + 1, live_bytes + extra + 16)

    def _rebuild(self, live: int, live_bytes: int, empty: bool = False) -> None:
        file_size, cur_off, cur_size, _, _ = _native.dict_stats(self._map)
        # Room for twice the live data, so rebuilds are amortized O(1) per write.
        lgcap = max(_MIN_LGCAP, math.ceil(math.log2(max(4 * live, 1))))
        table = _native.DICT_REGION_HEADER + (8 << lgcap) + _native.DICT_ENTRY_SIZE * (1 << lgcap) // 2
        size = table + max(2 * live_bytes, _PAGE)
        size = -(-size // _PAGE) * _PAGE
        # Place it before the current region when there is room (that space
        # is the previous region, now garbage), else after it.
        if _HEADER + size <= cur_off:
            off = _HEADER
        else:
            off = -(-(cur_off + cur_size) // _PAGE) * _PAGE
        end = off + size
        if end > self._max_size:
            raise MemoryError(
                f"SharedDict is full: it needs {end} bytes and its max_size is {self._max_size}; "
                "create it with a larger max_size"
            )
        _grow_file(self._fd, off, end)
        if end > file_size:
            _native.dict_set_file_size(self._map, end)
        old = _native.dict_rebuild(self._map, off, lgcap, size, empty)
        if old is None:  # cannot happen: the size was computed from the stats
            raise RuntimeError("SharedDict rebuild did not fit")
        old_off, old_size = old
        try:
            _native.punch_hole(self._fd, old_off, old_size)
        except OSError:
            pass  # only memory is lost, until the next rebuild reuses it


def _grow_file(fd: int, start: int, end: int) -> None:
    """Make [start, end) of the file exist and be backed by memory, so that
    writing it cannot SIGBUS; MemoryError when the kernel has no memory."""
    try:
        if os.fstat(fd).st_size < end:
            os.ftruncate(fd, end)
        os.posix_fallocate(fd, start, end - start)
    except OSError as exc:
        raise MemoryError(f"SharedDict cannot get {end - start} more bytes of shared memory: {exc}") from exc


def _rebuild_shared_dict(rebuild: Any, args: Any) -> SharedDict:
    return SharedDict._from_fd(rebuild(*args))


class _SnapshotKeys(KeysView):
    __slots__ = ()
    _mapping: SharedDict  # MappingView's

    def __iter__(self) -> Iterator[Any]:
        return iter(self._mapping)


class _SnapshotValues(ValuesView):
    __slots__ = ()
    _mapping: SharedDict  # MappingView's

    def __iter__(self) -> Iterator[Any]:
        return iter(_native.dict_items(self._mapping._map, 1))


class _SnapshotItems(ItemsView):
    __slots__ = ()
    _mapping: SharedDict  # MappingView's

    def __iter__(self) -> Iterator[Any]:
        return iter([(_decode_key(k), v) for k, v in _native.dict_items(self._mapping._map, 2)])


public(SharedDict)
