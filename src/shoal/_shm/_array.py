"""SharedArray: a numpy array whose memory is shared by every process it reaches.

Data flow and ownership::

    process A                                memfd (one per SharedArray)         process B
    SharedArray ── base: mmap (MAP_SHARED) ──▶ ┌──────────────┐ ◀── mmap ── SharedArray
      │  _shoal_memory: _Memory                │ the elements │      (same pages: writes
      │   (Segment: fd + mmap, address)        └──────────────┘       are seen both ways)
      │  views (a[1:], a.T, a[::2]) share the _Memory
      └─ pickled as (segment descriptor, byte offset, shape, strides, dtype) ─▶ mapped again

* ``SharedArray(shape, dtype, order)`` makes a zero-filled array in a new
  memfd; ``SharedArray.from_array(array)`` makes one holding a copy of
  *array* (written with
  ``pwrite``, so this process pays no page fault per 4 KiB page).
* Handed to another process it travels as its segment's descriptor, never
  as its bytes: beside a shoal message (pool tasks and results, ``Pipe``,
  ``Queue``) or through ``multiprocessing``'s descriptor passing (``Process``
  arguments under spawn and forkserver).  Under fork the child inherits the
  mapping.  The receiver maps the same memory, writable, at the same byte
  offset, with the same strides: any view (non-contiguous, Fortran order,
  reversed) arrives as a view of the same memory.
* Lifetime: each process's mapping lives while an array in that process
  refers to it (numpy's ``base`` chain holds the ``mmap``); the descriptor
  closes with the last :class:`_Memory` reference.  The memfd has no name,
  so the kernel frees the memory once no process maps it or holds its
  descriptor, however they end (SIGKILL included).  Nothing for a
  resource tracker to clean up.
* Arrays derived from a SharedArray that do not share its memory
  (``a + 1``, ``a.copy()``, ``a[[0, 2]]``, ``a.astype(int)``,
  ``numpy.zeros_like(a)``) are plain ``numpy.ndarray`` objects, as with
  ``numpy.memmap``: a SharedArray is always shared memory.  Reductions and
  other 0-d results (``a.sum()``, ``a.max()``, ``a @ a``) are numpy scalars,
  as with a plain ndarray; a 0-d *view* (``a[..., 3]``) stays a SharedArray.
* Concurrent writers are the user's business, as with any numpy array
  (use a ``Lock``, or give each process its own slice).

numpy is optional for shoal: this module imports it, and ``shoal`` imports
this module only when ``SharedArray`` (or the deprecated ``share``) is
first used.
"""

from __future__ import annotations

import ctypes
import errno
import operator
import os
import warnings
import weakref
from multiprocessing import reduction
from typing import Any

from .._fd import Segment, collecting, fd_from_buffer
from .._util import public

_MISSING = "shoal.SharedArray needs numpy, which is not installed: pip install numpy"

try:
    import numpy as np
except ImportError:  # pragma: no cover - exercised by a subprocess test without numpy
    np = None  # type: ignore[assignment]  # SharedArray then raises, saying to install numpy


def _memory_error(exc: OSError, what: str) -> OSError | MemoryError:
    """The system refused memory for *what*: a MemoryError (as numpy's own
    allocations raise) saying so; a shortage of descriptors stays an
    OSError (see shoal._fd.exhausted), which already names what ran out."""
    if exc.errno in (errno.ENOMEM, errno.ENOSPC):
        return MemoryError(f"cannot allocate {what} in shared memory: {exc}")
    return exc


class _Memory:
    """One process's mapping of one SharedArray segment, and its address.

    Pickled as the segment's descriptor (once per message however many
    views of it travel: pickle's memo).  A process receiving a segment it
    already maps reuses that mapping (found by inode), so page tables
    filled by earlier tasks are not filled again.
    """

    __slots__ = ("__weakref__", "address", "segment", "size")

    def __init__(self, segment: Segment) -> None:
        self.segment = segment
        self.size = segment.size
        # The mapping's address, to tell views of it from new arrays.
        anchor = ctypes.c_char.from_buffer(segment.mmap)  # type: ignore[arg-type]  # mapped: a new Segment
        self.address = ctypes.addressof(anchor)
        del anchor  # releases its export of the mapping
        st = os.fstat(segment.fd)
        _mapped[(st.st_dev, st.st_ino)] = self

    def __reduce__(self) -> Any:
        # Plain pickle (to a file, a socket, a cache): the descriptor means
        # nothing there.  multiprocessing's pickler (Process arguments,
        # multiprocessing queues and pipes) uses _reduce_memory, registered
        # below; shoal's channels pickle inside collecting_fds().
        if not collecting():
            raise TypeError(
                "cannot pickle a shoal.SharedArray outside of sending it to another process: its memory "
                "travels as a file descriptor, which only a Process, a Pool task, an Actor, a Pipe or a "
                "Queue can carry. To save or send its contents elsewhere, pickle a plain copy "
                "(numpy.array(shared_array)) or use numpy.save"
            )
        return _rebuild_memory, (self.segment,)


def _reduce_memory(memory: _Memory) -> tuple:
    return _rebuild_memory, (memory.segment,)


reduction.register(_Memory, _reduce_memory)


#: This process's mappings of SharedArray segments, by (device, inode).
_mapped: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def _rebuild_memory(segment: Segment) -> _Memory:
    st = os.fstat(segment.fd)
    known = _mapped.get((st.st_dev, st.st_ino))
    if known is not None and known.size == segment.size:
        segment.close()
        return known
    return _Memory(segment)


def _address(arr: Any) -> int:
    return arr.__array_interface__["data"][0]


def _check_shape(shape: Any) -> tuple[int, ...]:
    try:
        dims: tuple[int, ...] = (operator.index(shape),)
    except TypeError:
        try:
            dims = tuple(operator.index(n) for n in shape)
        except TypeError:
            raise TypeError(
                f"SharedArray shape must be an int or a sequence of ints, got {shape!r}"
            ) from None
    if any(n < 0 for n in dims):
        raise ValueError(
            f"SharedArray shape must not be negative, got {dims!r}: every dimension must be >= 0"
        )
    return dims


def _check_dtype(dtype: Any) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise TypeError(
            f"SharedArray cannot hold dtype {dtype!r}: Python objects live in one process's memory "
            "and cannot be shared; use a numeric, bool, bytes/str or structured dtype without objects "
            "(or a SharedDict for Python objects)"
        )
    return dtype


if np is not None:

    class SharedArray(np.ndarray):
        """A numpy array in shared memory: every process it is handed to (a
        ``Process``, a pool task, a ``Pipe``, a ``Queue``) sees the same
        memory, so writes made there are visible here.

        ``SharedArray(shape, dtype=float, order='C')`` is zero-filled; use
        :meth:`SharedArray.from_array` to copy an existing array into shared
        memory.
        """

        def __new__(cls, shape: Any, dtype: Any = float, order: str = "C") -> Any:
            dims = _check_shape(shape)
            dtype = _check_dtype(dtype)
            if order not in ("C", "F"):
                raise ValueError(f"SharedArray order must be 'C' or 'F', got {order!r}")
            nbytes = dtype.itemsize
            for n in dims:
                nbytes *= n
            try:
                # One byte at least: mmap refuses empty mappings.
                segment = Segment(max(nbytes, 1))
            except OSError as exc:
                raise _memory_error(exc, f"a SharedArray of {nbytes} bytes") from exc
            return _on_segment(cls, _Memory(segment), 0, dims, dtype, None, order)

        @classmethod
        def from_array(cls, array: Any) -> SharedArray:
            """A :class:`SharedArray` holding a copy of *array* (any
            array-like), with its shape, dtype and memory order; a
            SharedArray is returned as is."""
            return _from_array(array)

        def __array_finalize__(self, obj: Any) -> None:
            memory = getattr(obj, "_shoal_memory", None)
            if memory is not None:
                address = _address(self)
                if not memory.address <= address <= memory.address + memory.size:
                    memory = None  # new memory (a copy, a ufunc's output)
            self._shoal_memory = memory

        def __array_wrap__(self, arr: Any, context: Any = None, return_scalar: Any = None) -> Any:
            # The result of a ufunc, a reduction (a.sum(), a.max()) or a
            # method computed by one.  numpy 2 says with *return_scalar*
            # when a plain ndarray would give a scalar; numpy 1 (and
            # callers that pass only *arr*, as numpy.linalg does) says
            # nothing, and a 0-d result is then a scalar, as numpy.memmap does.
            if arr is self or (type(arr) is SharedArray and arr._shoal_memory is not None):
                return arr  # written into shared memory (out=): that array itself
            if type(arr) is not np.ndarray:
                arr = arr.view(np.ndarray)  # new memory: not shared, so not a SharedArray
            if return_scalar or (return_scalar is None and arr.ndim == 0):
                return arr[()]
            return arr

        def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
            # numpy functions that make new arrays of the input's class
            # (zeros_like, copy(subok=True), roll, tile...): private memory.
            return _plain(super().__array_function__(func, types, args, kwargs))

        def __getitem__(self, index: Any) -> Any:
            res = super().__getitem__(index)
            if type(res) is SharedArray and res._shoal_memory is None:
                return res.view(np.ndarray)  # fancy indexing: a copy
            return res

        @property
        def imag(self) -> Any:
            """The imaginary part: a view of shared memory for a complex
            array, a new (plain) array of zeros for a real one."""
            return _plain(np.ndarray.imag.__get__(self))

        @imag.setter
        def imag(self, value: Any) -> None:
            self.view(np.ndarray).imag = value  # the same memory

        def copy(self, order: str = "C") -> np.ndarray:  # type: ignore[override]  # a plain ndarray on purpose: the copy is private memory
            """A copy in private memory (a plain ``numpy.ndarray``)."""
            return super().copy(order).view(np.ndarray)  # type: ignore[arg-type]  # numpy checks order

        def __copy__(self) -> np.ndarray:  # type: ignore[override]  # a plain ndarray on purpose: the copy is private memory
            return self.copy("K")

        def __deepcopy__(self, memo: Any) -> np.ndarray:  # type: ignore[override]  # a plain ndarray on purpose: the copy is private memory
            return self.copy("K")

        def __reduce_ex__(self, protocol: Any) -> Any:
            memory = self._shoal_memory
            if memory is None:
                return self.view(np.ndarray).__reduce_ex__(protocol)
            offset = _address(self) - memory.address
            return _rebuild, (memory, offset, self.shape, self.strides, self.dtype)

        def __reduce__(self) -> Any:
            return self.__reduce_ex__(2)

        def __repr__(self) -> str:
            text = repr(self.view(np.ndarray))
            return "SharedArray" + text[len("array") :] if text.startswith("array") else text

    def _plain(res: Any) -> Any:
        """*res*, or a plain ndarray where it is a SharedArray of private memory."""
        kind = type(res)
        if kind is SharedArray:
            if res._shoal_memory is None:
                return res.view(np.ndarray)
        elif (kind is tuple or kind is list) and any(
            type(r) is SharedArray and r._shoal_memory is None for r in res
        ):
            return kind(_plain(r) for r in res)
        return res

    def _returning_plain(name: str) -> Any:
        method = getattr(np.ndarray, name)

        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            return _plain(method(self, *args, **kwargs))

        wrapper.__name__ = wrapper.__qualname__ = name
        wrapper.__doc__ = method.__doc__
        return wrapper

    # Methods that may return new memory of the caller's class (the others
    # return views, plain arrays, or go through __array_wrap__).
    for _name in (
        "argpartition",
        "argsort",
        "astype",
        "byteswap",
        "choose",
        "compress",
        "dot",
        "flatten",
        "ravel",
        "repeat",
        "reshape",
        "take",
    ):
        setattr(SharedArray, _name, _returning_plain(_name))
    del _name

    def _from_array(array: Any) -> SharedArray:
        if isinstance(array, SharedArray) and array._shoal_memory is not None:
            return array
        array = np.asarray(array)
        dtype = _check_dtype(array.dtype)
        order = "F" if array.flags.f_contiguous and not array.flags.c_contiguous else "C"
        contiguous = array.T if order == "F" else array
        if not contiguous.flags.c_contiguous or array.nbytes == 0:
            out = SharedArray(array.shape, dtype, order)
            out[...] = array
            return out
        try:
            # As bytes: memoryview refuses some dtypes (datetime64, timedelta64).
            fd = fd_from_buffer(contiguous.reshape(-1).view(np.uint8))
        except OSError as exc:
            raise _memory_error(exc, f"a shared copy of {array.nbytes} bytes") from exc
        try:
            segment = Segment(array.nbytes, fd=fd)
        except BaseException:
            os.close(fd)
            raise
        return _on_segment(SharedArray, _Memory(segment), 0, array.shape, dtype, None, order)

    def _on_segment(
        cls: Any, memory: _Memory, offset: int, shape: Any, dtype: Any, strides: Any, order: str = "C"
    ) -> SharedArray:
        arr = np.ndarray.__new__(
            cls,
            shape,
            dtype,
            buffer=memory.segment.mmap,
            offset=offset,
            strides=strides,
            order=order,  # type: ignore[arg-type]  # numpy checks order
        )
        arr._shoal_memory = memory
        return arr

    def _rebuild(memory: _Memory, offset: int, shape: Any, strides: Any, dtype: Any) -> SharedArray:
        return _on_segment(SharedArray, memory, offset, shape, dtype, strides)

else:  # pragma: no cover - see the subprocess test without numpy

    class SharedArray:  # type: ignore[no-redef]
        """Needs numpy (not installed)."""

        def __new__(cls, *args: Any, **kwargs: Any) -> None:
            raise ModuleNotFoundError(_MISSING, name="numpy")

        @classmethod
        def from_array(cls, array: Any) -> Any:
            raise ModuleNotFoundError(_MISSING, name="numpy")

    def _rebuild(*args: Any) -> None:
        raise ModuleNotFoundError(_MISSING, name="numpy")


def share(array: Any) -> Any:
    """Deprecated alias of :meth:`SharedArray.from_array` (removed in the
    next release): the name differed from :func:`shoal.shared` by one letter
    and meant something unrelated."""
    warnings.warn(
        "shoal.share(array) is deprecated; use shoal.SharedArray.from_array(array)",
        DeprecationWarning,
        stacklevel=2,
    )
    return SharedArray.from_array(array)


public(SharedArray)
public(share)
