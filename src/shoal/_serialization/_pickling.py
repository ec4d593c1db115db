"""Pickling with large buffers through shared memory: :func:`dumps` and :func:`loads`.

* Everything is pickled with the standard pickler first, because it is
  faster; what it refuses (lambdas, closures), and code of the main module
  that the receiver cannot import, goes through :class:`._code.Pickler`
  (cloudpickle with shoal's policy for code: see :mod:`._code`).
* Pickle protocol 5: buffers of at least :data:`OOB_THRESHOLD` bytes (numpy
  arrays and anything wrapped in ``PickleBuffer``; ``bytes``, ``bytearray``
  and ``memoryview`` through a persistent id, since pickle copies those in
  band) are taken out of band and copied once into an anonymous
  shared-memory segment whose descriptor travels beside the message: a
  fresh memfd, or a warm reused one (:mod:`shoal._fd._warm`, the pool's
  path).  The receiver maps the segment and the unpickled object uses that
  memory directly (``bytes`` and ``bytearray`` own their memory: they are
  copied out).  The memory is freed when the receiver drops the object.
  Receivers get private copy-on-write mappings (writable, like in-band
  pickles) or, with ``writable=False``, shared read-only ones.  The layout
  the sender announced (the segment's size, each buffer's offset and
  length) is checked before anything is mapped: a buffer outside the
  segment, or a segment larger than this machine's memory or than its
  memfd, raises :class:`~shoal.exceptions.CorruptDataError`.
* :class:`shoal.SharedArray` never goes through this: it pickles as its
  segment's descriptor and the receiver maps the same memory, writable.
* Failures name the object that could not be pickled and say what to do.

``dumps`` must run inside :func:`shoal._fd.collecting_fds` when
out-of-band buffers are allowed, and ``loads`` inside ``providing_fds``.
"""

from __future__ import annotations

import errno
import io
import os
import pickle
import threading
from typing import Any

from .._fd import (
    MAX_PEER_SIZE,
    SNAPSHOT_MIN,
    WarmSegments,
    check_fd_holds,
    collecting,
    create_fd,
    map_leased,
    map_received,
    peer_size_error,
    providing_fds,
    reduce_fd,
)
from .._native import copy_into
from ..exceptions import CorruptDataError, corrupt_data, serialization_error
from ._code import PROTOCOL, Pickler, main_needs_value


class _Buffers(threading.local):
    # Large buffers met while pickling (pickle's buffer_callback and
    # _LargeBytesIds append here); a class default, not a missing attribute,
    # which would cost an AttributeError inside threading.local per call.
    oob: list | None = None


_buffers = _Buffers()

#: Buffers at least this large go through shared memory instead of the pipe.
#: Below it, the cost of a memfd (~10 µs) exceeds the cost of copying.
OOB_THRESHOLD = 256 * 1024

_PROTOCOL = PROTOCOL


class _OutOfBand:
    """The large buffers of one message, carried in one memfd.

    One descriptor per message however many buffers it holds: the kernel
    passes at most 253 descriptors with one message, and each costs a
    syscall or two.  Buffers start on page boundaries.  *leased*: the memfd
    is a reused segment of a :class:`~shoal._fd._warm.WarmSegments` and
    the receiver takes its own lease on it.  *writable*: the receiver maps
    it privately (copy-on-write); otherwise shared and read-only.
    """

    __slots__ = ("fd", "leased", "size", "spans", "writable")

    def __init__(
        self, fd: int, size: int, spans: list[tuple[int, int]], leased: bool, writable: bool
    ) -> None:
        self.fd = fd
        self.size = size
        self.spans = spans
        self.leased = leased
        self.writable = writable

    def __reduce__(self) -> Any:
        rebuild, args = reduce_fd(self.fd)
        return _rebuild_oob, (rebuild, args, self.size, self.spans, self.leased, self.writable)


def _rebuild_oob(
    rebuild: Any,
    args: Any,
    size: int,
    spans: list[tuple[int, int]],
    leased: bool = False,
    writable: bool = True,
) -> list[memoryview]:
    fd = rebuild(*args)
    try:
        _check_layout(size, spans)
    except BaseException:
        os.close(fd)
        raise
    try:
        return _map_oob(fd, size, spans, leased, writable)
    except CorruptDataError:
        raise
    except (ValueError, OSError) as exc:
        # The mapping refuses a length beyond the file ("the file holds N
        # bytes, fewer than ...") or a descriptor that is not a file.
        raise corrupt_data(f"out-of-band buffers of {size} bytes could not be mapped ({exc})") from exc


def _check_layout(size: int, spans: list[tuple[int, int]]) -> None:
    """The sizes another process announced for out-of-band buffers: each
    span inside the segment, the segment no larger than this machine's
    memory (comparisons only: no system call)."""
    try:
        if not 0 <= size <= MAX_PEER_SIZE:
            raise peer_size_error(size, "a message's out-of-band buffers")
        for offset, n in spans:
            if offset < 0 or n < 0 or offset + n > size:
                raise corrupt_data(
                    f"an out-of-band buffer of {n} bytes at offset {offset} lies outside its segment of "
                    f"{size} bytes"
                )
    except TypeError as exc:  # not numbers, not pairs
        raise corrupt_data(f"a message's out-of-band buffer layout is malformed ({exc})") from exc


def _map_oob(fd: int, size: int, spans: Any, leased: bool, writable: bool) -> list[memoryview]:
    """Map (or copy) the segment *fd*, which this function closes."""
    try:
        view = _map_segment(fd, size, leased, writable)
    finally:
        os.close(fd)
    return [view[offset : offset + n] for offset, n in spans]


def _map_segment(fd: int, size: int, leased: bool, writable: bool) -> memoryview:
    # Private (copy-on-write) when writable: the receiver may write to the
    # arrays it gets, as with in-band pickles, without changing what the
    # sender (or a second receiver of a re-sent task) sees.  A mapping keeps
    # no descriptor, so results kept by the thousand do not use up
    # RLIMIT_NOFILE.
    try:
        if leased:
            return map_leased(fd, size, writable=writable)
        return map_received(fd, size, writable=writable)
    except OSError as exc:
        if exc.errno not in _COPY_INSTEAD:
            raise
    # No descriptor free for the lease for a moment (a message brings many,
    # one per result of a batch, and they can take the last numbers), or no
    # mapping left (vm.max_map_count): the bytes are copied instead.
    return _read_copy(fd, size, writable)


#: Why a mapping can fail when a copy still works.
_COPY_INSTEAD = (errno.EMFILE, errno.ENFILE, errno.ENOMEM)


def _read_copy(fd: int, size: int, writable: bool) -> memoryview:
    """The *size* bytes of *fd* in private memory (read-only unless *writable*)."""
    check_fd_holds(fd, size, "a message's out-of-band buffers")
    view = memoryview(bytearray(size))
    done = 0
    while done < size:
        n = os.preadv(fd, [view[done:]], done)
        if n == 0:
            break
        done += n
    return view if writable else view.toreadonly()


_PAGE = 4096


def _pack_buffers(
    buffers: list[memoryview], segments: WarmSegments | None, writable: bool
) -> _OutOfBand | _Parts:
    """The out-of-band buffers of one message: one segment for all of them;
    or, with *segments* that keep snapshots, a segment of its own for each
    buffer that may have one (see :mod:`shoal._fd._snapshots`: an array
    sent again unchanged is not copied again), the others together."""
    large = (
        sum(v.nbytes >= SNAPSHOT_MIN for v in buffers) if segments is not None and segments.snapshots else 0
    )
    if segments is None or not 0 < large <= _MAX_PARTS:  # (a descriptor each: at most MAX_FDS)
        return _pack_together(buffers, segments, writable)
    parts: list[_OutOfBand] = []
    run: list[memoryview] = []
    try:
        for view in buffers:
            if view.nbytes < SNAPSHOT_MIN:
                run.append(view)
                continue
            if run:
                parts.append(_pack_together(run, segments, writable))
                run = []
            try:
                fd = segments.lease_copy(view)
            except OSError:  # no lease to be had (no /proc): a fresh segment
                parts.append(_pack_together([view], None, writable))
                continue
            size = -(-view.nbytes // _PAGE) * _PAGE
            parts.append(_OutOfBand(fd, size, [(0, view.nbytes)], True, writable))
        if run:
            parts.append(_pack_together(run, segments, writable))
    except BaseException:
        for part in parts:
            os.close(part.fd)
        raise
    return _Parts(parts)


#: Large buffers of one message that get a segment each, at most.
_MAX_PARTS = 64


class _Parts:
    """Out-of-band buffers in several segments, in order (see _pack_buffers)."""

    __slots__ = ("parts",)

    def __init__(self, parts: list[_OutOfBand]) -> None:
        self.parts = parts

    @property
    def fds(self) -> list[int]:
        return [part.fd for part in self.parts]

    def __reduce__(self) -> Any:
        return _join_parts, (self.parts,)


def _join_parts(parts: Any) -> list[memoryview]:
    """The buffers of every part (each rebuilt by _rebuild_oob), in order."""
    if not isinstance(parts, list) or not all(isinstance(views, list) for views in parts):
        raise corrupt_data("a message's out-of-band buffers in several segments are malformed")
    return [view for views in parts for view in views]


def _pack_together(buffers: list[memoryview], segments: WarmSegments | None, writable: bool) -> _OutOfBand:
    spans = []
    offset = 0
    for view in buffers:
        spans.append((offset, view.nbytes))
        offset += -(-view.nbytes // _PAGE) * _PAGE
    leased = False
    target = None
    if segments is not None:
        try:
            fd, target = segments.lease_mapped(offset)
            leased = True
        except OSError:  # no /proc: a fresh segment per message
            fd = create_fd(offset)
    else:
        fd = create_fd(offset)
    try:
        for view, (start, n) in zip(buffers, spans, strict=False):  # PickleBuffer.raw(): flat bytes
            if target is not None:
                # Warm pages: a memcpy, without the GIL (a long copy holding
                # it would keep the pool's scheduler from feeding workers).
                copy_into(target[start : start + n], view)
                continue
            # write() copies into fresh pages without a user-space page
            # fault per 4 KiB page.
            written = 0
            while written < n:
                written += os.pwrite(fd, view[written:], start + written)
    except BaseException:
        os.close(fd)
        raise
    return _OutOfBand(fd, offset, spans, leased, writable)


def _take_large_buffer(pb: pickle.PickleBuffer) -> bool:
    """pickle's buffer_callback: keep large buffers out of band.

    A module-level function and a thread-local list, rather than a closure
    per call: dumps() runs once per task, and the closure's allocation was a
    measurable share of the submit cost.
    """
    view = pb.raw()
    if view.nbytes < OOB_THRESHOLD:
        return True
    if _buffers.oob is None:
        _buffers.oob = []
    _buffers.oob.append(view)
    return False


_BYTES_LIKE: dict[type, int] = {bytes: 0, bytearray: 1, memoryview: 2}


class _LargeBytesIds:
    """pickle's persistent_id: large ``bytes``, ``bytearray`` and
    ``memoryview`` (which pickle always copies in band) go out of band too,
    into the same list as the pickle-5 buffers; ``indices`` says where."""

    def __init__(self) -> None:
        self.indices: list[int] = []

    def __call__(self, obj: Any) -> tuple | None:
        kind = _BYTES_LIKE.get(type(obj))
        if kind is None:
            return None
        view = memoryview(obj)
        if view.nbytes < OOB_THRESHOLD or not view.c_contiguous:
            return None
        flat = view.cast("B")
        if kind == 2:
            try:  # the receiver rebuilds the view's format and shape from flat bytes
                flat.cast(view.format, view.shape)  # type: ignore[call-overload]  # any format, checked here
            except (TypeError, ValueError):
                return None
        oob = _buffers.oob
        if oob is None:
            oob = _buffers.oob = []
        oob.append(flat)
        self.indices.append(len(oob) - 1)
        shape = (view.format, view.shape) if kind == 2 else None
        return (_OOB_MARK, len(oob) - 1, kind, shape)


class _IdPickler(pickle.Pickler):
    """pickle with large bytes-likes out of band (Python 3.13 made the
    ``persistent_id`` attribute of a C pickler read-only: a method it is)."""

    def __init__(
        self, file: io.BytesIO, buffer_callback: Any, ids: _LargeBytesIds, foreign: bool = False
    ) -> None:
        super().__init__(file, _PROTOCOL, buffer_callback=buffer_callback)
        self._ids = ids

    def persistent_id(self, obj: Any) -> Any:
        return self._ids(obj)


def _pickle_with_ids(obj: Any, callback: Any, foreign: bool) -> tuple[bytes, tuple[int, ...]]:
    """Pickle *obj* sending large bytes-likes out of band (see _LargeBytesIds)."""
    picklers: tuple[type, ...] = (_IdPickler, _IdCloudPickler)
    if main_needs_value(foreign):
        picklers = (_IdCloudPickler,)  # plain pickle would send code of __main__ by name
    for pickler_class in picklers:
        out = io.BytesIO()
        _buffers.oob = None
        ids = _LargeBytesIds()
        pickler = pickler_class(out, callback, ids, foreign)
        try:
            pickler.dump(obj)
        except Exception:
            if pickler_class is _IdCloudPickler:
                raise
            continue
        return out.getvalue(), tuple(ids.indices)
    raise AssertionError("unreachable")


class TooLarge(Exception):
    """Raised by :func:`dumps` and :func:`loads` given a *limit*: the
    message (its pickle plus its out-of-band buffers) has ``size`` bytes."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


class _IdCloudPickler(Pickler):
    """Pickler (cloudpickle, shoal's policy) with large bytes-likes out of band."""

    def __init__(
        self, file: io.BytesIO, buffer_callback: Any, ids: _LargeBytesIds, foreign: bool = False
    ) -> None:
        super().__init__(file, _PROTOCOL, buffer_callback, foreign=foreign)
        self._ids = ids

    def persistent_id(self, obj: Any) -> Any:
        return self._ids(obj)


class _HookedPickler(pickle.Pickler):
    """The standard pickler, asking *hook* first (a ``reducer_override``)."""

    def __init__(self, file: io.BytesIO, buffer_callback: Any, hook: Any) -> None:
        super().__init__(file, _PROTOCOL, buffer_callback=buffer_callback)
        self._hook = hook

    def reducer_override(self, obj: Any) -> Any:
        return self._hook(obj)


class _HookedCodePickler(Pickler):
    """Pickler (shoal's policy for code), asking *hook* first."""

    def __init__(self, file: io.BytesIO, buffer_callback: Any, hook: Any, foreign: bool) -> None:
        super().__init__(file, _PROTOCOL, buffer_callback, foreign=foreign)
        self._hook = hook

    def reducer_override(self, obj: Any) -> Any:
        reduced = self._hook(obj)
        return super().reducer_override(obj) if reduced is NotImplemented else reduced


def _cloudpickle_dumps(
    obj: Any, buffer_callback: Any = None, foreign: bool = False, reduce: Any = None
) -> bytes:
    with io.BytesIO() as file:
        if reduce is None:
            Pickler(file, _PROTOCOL, buffer_callback, foreign=foreign).dump(obj)
        else:
            _HookedCodePickler(file, buffer_callback, reduce, foreign).dump(obj)
        return file.getvalue()


def _plain_dumps(obj: Any, buffer_callback: Any, reduce: Any) -> bytes:
    if reduce is None:
        return pickle.dumps(obj, _PROTOCOL, buffer_callback=buffer_callback)
    with io.BytesIO() as file:
        _HookedPickler(file, buffer_callback, reduce).dump(obj)
        return file.getvalue()


class LargeBuffers:
    """A ``buffer_callback`` for :func:`pickle_code`: keeps the buffers of at
    least *threshold* bytes out of band, in :attr:`taken` (in pickling
    order); smaller ones stay in the pickle."""

    __slots__ = ("taken", "threshold")

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold
        self.taken: list[pickle.PickleBuffer] = []

    def __call__(self, buffer: pickle.PickleBuffer) -> bool:
        if buffer.raw().nbytes < self.threshold:
            return True
        self.taken.append(buffer)
        return False

    def reset(self) -> None:
        self.taken = []


def pickle_code(obj: Any, buffer_callback: Any = None, *, foreign: bool = False, reduce: Any = None) -> bytes:
    """Pickle *obj* by shoal's policy for code (the one pickle-then-cloudpickle
    path): plain pickle, unless it refuses *obj* or sends code of the main
    module by name to a receiver that cannot import it; then cloudpickle
    (:class:`._code.Pickler`).  *foreign*: the receiver runs another
    program (a Dask worker).  *reduce*: a ``reducer_override`` both
    picklers ask first.  *buffer_callback*: pickle's; a
    :class:`LargeBuffers` holds what the pickle returned refers to (a
    second attempt starts it afresh).  Raises what the picklers raise."""
    reset = getattr(buffer_callback, "reset", None)
    try:
        data = _plain_dumps(obj, buffer_callback, reduce)
    except Exception:  # noqa: BLE001 - plain pickle refused it: cloudpickle next
        _buffers.oob = None
        if reset is not None:
            reset()
        return _cloudpickle_dumps(obj, buffer_callback, foreign, reduce)
    if (b"__main__" in data or b"__mp_main__" in data) and main_needs_value(foreign):
        oob = _buffers.oob
        taken = getattr(buffer_callback, "taken", None)
        _buffers.oob = None
        if reset is not None:
            reset()
        try:
            return _cloudpickle_dumps(obj, buffer_callback, foreign, reduce)
        except Exception:
            if foreign:
                raise
            _buffers.oob = oob
            if taken is not None:
                buffer_callback.taken = taken
    return data


def dumps(
    obj: Any,
    *,
    oob: bool = False,
    what: str = "object",
    limit: int | None = None,
    segments: WarmSegments | None = None,
    writable: bool = True,
    foreign: bool = False,
) -> bytes:
    """Pickle *obj* (code by shoal's policy: see :func:`pickle_code`).

    With *oob* and inside :func:`shoal._fd.collecting_fds`, buffers
    of at least :data:`OOB_THRESHOLD` bytes (pickle-5 buffers such as
    contiguous numpy arrays, and ``bytes``, ``bytearray`` and contiguous
    ``memoryview`` objects found near the top of *obj*) are copied into one
    memfd segment whose descriptor is appended to the collecting list:
    **the caller owns it** and closes it once the frame carrying it has been
    sent (the kernel keeps its own reference while it is in flight).
    Outside a collecting context everything is pickled in band.

    This is the one path for "large buffers through shared memory":

    * *segments*: reuse warm segments of this :class:`WarmSegments` instead
      of a fresh memfd per message; the descriptor is then a lease on the
      segment (see :mod:`shoal._fd._warm`), and the segment is reused only
      once the caller has closed it and every receiver has dropped what it
      unpickled.
    * *writable*: receivers get private, writable copies-on-write (the
      standard library's semantics); ``False``: shared, read-only memory.
    * *foreign*: the receiver runs another program (a Dask worker), so
      code of the main module travels by value.

    Raises:
        SerializationError: *obj* (or something inside it) cannot be pickled.
        TooLarge: given a *limit*, the pickle and its out-of-band buffers
            together are larger (checked before the buffers are copied; the
            caller checks an in-band pickle's own length).
    """
    callback = _take_large_buffer if oob and collecting() else None
    _buffers.oob = None
    ids: tuple[int, ...] = ()
    try:
        data = pickle_code(obj, callback, foreign=foreign)
        if callback is not None and len(data) >= OOB_THRESHOLD and _holds_large_bytes(obj, 3):
            # pickle copies bytes-likes in band whatever their size: again,
            # with those out of band (rare, so the common path pays nothing).
            data, ids = _pickle_with_ids(obj, callback, foreign)
    except Exception as exc:
        _buffers.oob = None  # what the failed attempts collected must not leak into the next call
        # Also an instance of what the pickler raised: `except PicklingError`
        # (or the RuntimeError of a __reduce__) catches it, as with the
        # standard library.
        raise serialization_error(
            f"cannot pickle {what}: {_describe_failure(obj, exc)}. Objects sent between "
            "processes must be picklable: pass plain data, module-level functions, or "
            "objects that define __reduce__; open files, locks, sockets and generators cannot be sent",
            exc,
        ) from exc
    if callback is None or _buffers.oob is None:
        return data
    buffers, _buffers.oob = _buffers.oob, None
    if limit is not None:
        size = len(data) + sum(view.nbytes for view in buffers)
        if size > limit:
            raise TooLarge(size)
    packed = _pack_buffers(buffers, segments, writable)
    try:
        # reduce_fd appends the descriptor to the collecting list, which now
        # owns it.
        return pickle.dumps((_OOB_MARK, data, packed, ids), _PROTOCOL)
    except BaseException:
        for fd in packed.fds if isinstance(packed, _Parts) else (packed.fd,):
            os.close(fd)
        raise


def _holds_large_bytes(obj: Any, depth: int) -> bool:
    """A large bytes-like in *obj* or its first items, *depth* containers deep."""
    kind = type(obj)
    if kind in _BYTES_LIKE:
        return memoryview(obj).nbytes >= OOB_THRESHOLD
    if depth == 0:
        return False
    if kind is tuple or kind is list:
        items = obj[:64]
    elif kind is dict:
        items = list(obj.values())[:64]
    else:
        return False
    return any(_holds_large_bytes(item, depth - 1) for item in items)


_OOB_MARK = "shoal.oob.v2"


def loads_with(data: Any, fds: Any, start: int = 0, stop: int | None = None) -> Any:
    """:func:`loads` a message whose out-of-band buffers came as
    ``fds[start:stop]`` (an object that takes a descriptor itself, for lack
    of a free one, leaves -1 in its place: see ``providing_fds``)."""
    if not fds:
        return loads(data)
    with providing_fds(fds, start, stop):
        return loads(data)


def loads(data: Any, *, limit: int | None = None) -> Any:
    """Unpickle what :func:`dumps` produced; given a *limit*, raise
    :class:`TooLarge` if the pickle and its out-of-band buffers together
    are larger (the buffers are mapped, not read, before that check)."""
    obj = pickle.loads(data)
    if type(obj) is tuple and len(obj) == 4 and obj[0] == _OOB_MARK:
        _, inner, views, ids = obj
        if limit is not None:
            size = len(inner) + sum(view.nbytes for view in views)
            if size > limit:
                raise TooLarge(size)
        if not ids:
            return pickle.loads(inner, buffers=views)
        taken = set(ids)
        unpickler = _IdUnpickler(
            io.BytesIO(inner), buffers=[v for i, v in enumerate(views) if i not in taken]
        )
        unpickler.views = views
        return unpickler.load()
    return obj


class _IdUnpickler(pickle.Unpickler):
    """Loads what _IdPickler sent out of band from *views*."""

    views: list[memoryview]

    def persistent_load(self, pid: Any) -> Any:
        return _load_bytes_like(self.views, pid)


def _load_bytes_like(views: list[memoryview], pid: Any) -> Any:
    mark, index, kind, shape = pid
    if mark != _OOB_MARK:
        raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
    view = views[index]
    if kind == 0:
        return bytes(view)
    if kind == 1:
        return bytearray(view)
    fmt, dims = shape
    return view.cast(fmt, dims)


def _describe_failure(obj: Any, exc: BaseException) -> str:
    """Name the innermost unpicklable thing, when it can be found cheaply."""
    culprit = find_unpicklable(obj, depth=0)
    base = f"{type(exc).__name__}: {exc}"
    if culprit is not None and culprit is not obj:
        return f"{base} (the unpicklable part is {_short_repr(culprit)} of type {type(culprit).__qualname__})"
    return f"{base} ({_short_repr(obj)} of type {type(obj).__qualname__})"


def find_unpicklable(obj: Any, depth: int) -> Any:
    if depth > 4:
        return None
    items: list[Any]
    if isinstance(obj, dict):
        items = list(obj.keys()) + list(obj.values())
    elif isinstance(obj, (list, tuple, set, frozenset)):
        items = list(obj)
    else:
        return None
    for item in items[:1000]:
        try:
            _cloudpickle_dumps(item)
        except Exception:  # noqa: BLE001 - any pickling error marks the culprit
            return find_unpicklable(item, depth + 1) or item
    return None


def name_unpicklable_item(exc: BaseException, items: Any, start: int) -> None:
    """Say in *exc* (a pickling failure of a chunk of a map's *items*, the
    first of which is item *start* of the input) which item failed."""
    for i, item in enumerate(items):
        try:
            pickle.dumps(item, _PROTOCOL)
            continue
        except Exception:  # noqa: BLE001
            pass
        try:
            _cloudpickle_dumps(item)
        except Exception:  # noqa: BLE001 - this is the one
            if exc.args and isinstance(exc.args[0], str):
                # The same exception object, so its type is what dumps chose.
                exc.args = (f"item {start + i} of the input (counting from 0): {exc.args[0]}", *exc.args[1:])
            return


def _short_repr(obj: Any) -> str:
    try:
        text = repr(obj)
    except Exception:  # noqa: BLE001 - a repr that raises is described by type
        text = f"<{type(obj).__qualname__} object>"
    return text if len(text) <= 80 else text[:77] + "..."
