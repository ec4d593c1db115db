"""``import shoal.joblib``: a joblib parallel backend named ``"shoal"``.

::

    import joblib
    import shoal.joblib  # registers the backend

    with joblib.parallel_config(backend="shoal", n_jobs=2):
        results = joblib.Parallel()(joblib.delayed(f)(x) for x in xs)

Data flow::

    Parallel (caller's thread)                 shoal engine
      │ configure(**options) ────────────────▶ Engine(n_jobs workers, options): started here
      │ submit(BatchedCalls, callback)
      │   pickled with joblib's array policy ─▶ submit_call ─▶ scheduler thread ─▶ workers
      │                                                             │
      │ ◀── callback(future) on the engine's callback thread ◀──────┘
      │ retrieve_result_callback(future) = future.result()
      │ terminate() at the end of the call ──▶ close + join: no worker left
      └ abort_everything() after an error ───▶ terminate (kill) the workers;
                                                new ones if the Parallel is reused

* Batching is joblib's (``AutoBatchingMixin``): it groups calls into
  ``BatchedCalls`` of about 0.2 s each, so joblib's own per-dispatch cost
  (tens of microseconds in the caller) is paid per batch.  Leaving every
  call its own task and letting shoal's engine batch was measured slower
  (``benchmarks/bench_joblib.py``): joblib's dispatch, not the engine,
  is the bottleneck for trivial calls.
* A worker killed mid-call fails only the batch it was running, with
  :class:`shoal.WorkerDiedError` (so ``Parallel`` raises it, as it raises a
  task's own exception, with the original type); the engine replaces the
  worker, and the backend stays usable for the next ``Parallel`` call.
* Workers live for one ``Parallel`` call (or one ``with Parallel(...)``
  block), so nothing is left running after it; joblib's loky backend keeps
  its workers for reuse instead.  The running engine is the backend's
  ``_workers`` (``None`` between calls), the attribute joblib's loky
  backend uses for its executor.

Options.  Every option joblib hands a backend is honoured or refused, never
dropped (``_configure_options``):

* shoal's own, from ``parallel_config(backend="shoal", ...)`` or
  ``Parallel(backend="shoal", ...)`` (the latter wins):
  :class:`shoal.ProcessPoolExecutor`'s ``mp_context``, ``initializer``,
  ``initargs``, ``max_tasks_per_child``, ``max_memory``, ``task_timeout``.
  With ``n_jobs=1`` joblib runs the calls in the caller's process, where
  ``initializer``, ``task_timeout``, ``max_memory`` and
  ``max_tasks_per_child`` cannot apply: a warning says so (as joblib warns
  about ``timeout``).  Anything else: ``TypeError``.
* joblib's array options (``max_nbytes``, ``mmap_mode``), applied when a
  batch is pickled (:class:`_ArrayPolicy`), as loky's memmapping reducers
  do but without files: an array of more than ``max_nbytes`` bytes arrives
  as a read-only ``numpy.memmap`` (``mmap_mode="r"``, a view of the shared
  memory it travelled in) or a private writable one (``"c"``); smaller
  arrays, and all with ``max_nbytes=None`` or ``mmap_mode=None``, arrive as
  private writable arrays, as pickling makes them.  An array backed by a
  ``numpy.memmap`` of a file travels by reference (file name, offset), so a
  worker writing into an ``np.memmap(..., mode="w+")`` writes into the
  caller's file.  ``"r+"`` and ``"w+"`` (a writable temporary file that the
  caller never sees) are refused with ``ValueError``.
* ``temp_folder`` is accepted and unused: shoal writes no temporary files
  (arrays travel in anonymous shared memory that the kernel frees), so
  there is nothing to place in a folder or to clean up.
* ``context`` (the start method joblib's ``JOBLIB_START_METHOD`` chose)
  is used when ``mp_context`` is not given; ``prefer``, ``require`` and
  ``verbose`` are joblib's own (backend choice, progress messages).
* ``inner_max_num_threads`` is refused by joblib itself
  (``supports_inner_max_num_threads`` is false): the workers' BLAS and
  OpenMP thread pools are not limited.

Inside a daemonic process (a task of :class:`multiprocessing.pool.Pool`, a
Dask worker) no worker process can start: as joblib's loky and
multiprocessing backends do, the loop runs in the caller with ``n_jobs=1``
and a warning.

joblib is an optional dependency (``pip install joblib``, or the ``joblib`` extra); ``import
shoal`` never imports it, and importing this module without it raises an
``ImportError`` that says so.
"""

from __future__ import annotations

import mmap
import multiprocessing
import os
import pickle
import sys
import warnings
from typing import Any

try:
    import joblib
    from joblib._parallel_backends import (
        AutoBatchingMixin,
        FallbackToBackend,
        ParallelBackendBase,
        SequentialBackend,
        inside_dask_worker,
    )
except ImportError as exc:
    raise ImportError(
        "shoal.joblib needs joblib, which is not installed: pip install joblib "
        "(or, in shoal's source directory, pip install '.[joblib]')"
    ) from exc

from ._engine import LocalEngine
from ._fd import collecting_fds, providing_fds, reduce_fd
from ._future import Future, submit_future
from ._serialization import OOB_THRESHOLD, LargeBuffers, pickle_code
from ._util import public

__all__ = ("ShoalBackend",)

#: The worker options, :class:`shoal.ProcessPoolExecutor`'s names.
_OPTIONS = ("mp_context", "initializer", "initargs", "max_tasks_per_child", "max_memory", "task_timeout")
#: Options only a worker process can apply: with ``n_jobs=1`` joblib runs
#: the calls in the caller's process, and a warning says they are not applied.
_WORKER_ONLY = ("initializer", "max_tasks_per_child", "max_memory", "task_timeout")
#: What joblib's ``Parallel`` passes to every backend's ``configure()``.
_JOBLIB_OPTIONS = ("max_nbytes", "mmap_mode", "temp_folder", "verbose", "context")
_MMAP_MODES = (None, "r", "c")


class ShoalBackend(AutoBatchingMixin, ParallelBackendBase):
    """joblib's ``ParallelBackendBase`` on shoal's engine (see the module docstring)."""

    supports_retrieve_callback = True
    supports_timeout = True
    supports_return_generator = True
    supports_sharedmem = False
    uses_threads = False
    default_n_jobs = 1

    def __init__(
        self, nesting_level: int | None = None, inner_max_num_threads: int | None = None, **options: Any
    ) -> None:
        _check_names(options, _OPTIONS)
        super().__init__(nesting_level=nesting_level, inner_max_num_threads=inner_max_num_threads, **options)
        #: The running engine, or None (the name joblib's loky backend uses).
        self._workers: LocalEngine | None = None
        self._n_jobs = 1
        self._settings: dict[str, Any] = {}
        self._policy = _ArrayPolicy(None, None)

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None:
            return 1
        if multiprocessing.current_process().daemon:
            # A daemonic process cannot have children (the standard
            # library refuses): run in this process, as loky does.
            if n_jobs != 1:
                warnings.warn(_daemonic_message(), stacklevel=3)
            return 1
        if n_jobs < 0:
            return max(joblib.cpu_count() + 1 + n_jobs, 1)
        return n_jobs

    def configure(
        self,
        n_jobs: int | None = 1,
        parallel: Any = None,
        prefer: Any = None,
        require: Any = None,
        **options: Any,
    ) -> int:
        settings, policy = _configure_options(self.backend_kwargs, options)
        n_jobs = self.effective_n_jobs(n_jobs)
        if n_jobs == 1:
            # joblib runs the calls in this process: what only a worker
            # process can do does not happen (joblib warns the same way
            # about a timeout with n_jobs=1).
            unused = [name for name in _WORKER_ONLY if settings.get(name) is not None]
            if unused:
                warnings.warn(
                    f"with n_jobs=1 joblib runs the calls in this process, so the shoal backend's "
                    f"{', '.join(unused)} (which need worker processes) are not applied; pass n_jobs=2 or "
                    "more to use them",
                    stacklevel=4,
                )
            raise FallbackToBackend(SequentialBackend(nesting_level=self.nesting_level))
        self.parallel = parallel
        self._policy = policy
        if self._workers is not None and (self._n_jobs != n_jobs or not _same(self._settings, settings)):
            # This backend instance (one parallel_config's) serves another
            # Parallel call with other options: that call's tasks finish first.
            self._stop(kill=False)
        self._n_jobs = n_jobs
        self._settings = settings
        if self._workers is None:
            self._workers = self._start()
        return n_jobs

    def _start(self) -> LocalEngine:
        s = self._settings
        return LocalEngine(
            self._n_jobs,
            s.get("initializer"),
            s.get("initargs", ()),
            s.get("max_tasks_per_child"),
            s.get("mp_context"),
            max_memory=s.get("max_memory"),
            task_timeout=s.get("task_timeout"),
        )

    def submit(self, func: Any, callback: Any = None) -> Future:
        if self._workers is None:
            # Another Parallel call sharing this backend ended ours (see configure).
            self._workers = self._start()
        if "numpy" not in sys.modules:  # without numpy there is no array to treat
            future = submit_future(self._workers, func, (), {})
        else:
            try:
                batch = self._policy.pickle(func)
            except Exception as exc:  # noqa: BLE001 - the ordinary path says whether it pickles at all
                future = submit_future(self._workers, func, (), {})
                warnings.warn(
                    f"shoal.joblib could not apply max_nbytes/mmap_mode to this batch "
                    f"({type(exc).__name__}: {exc}); its arrays were sent as shoal sends pool arguments "
                    "(read-only from 256 KiB)",
                    RuntimeWarning,
                    stacklevel=2,
                )
            else:
                try:
                    future = submit_future(self._workers, _run_batch, (batch,), {})
                finally:
                    batch.close()
        if callback is not None:
            future.add_done_callback(callback)
        return future

    apply_async = submit  # the name joblib < 1.5 calls

    def retrieve_result_callback(self, future: Future) -> Any:
        return future.result()

    def retrieve_result(self, out: Future, timeout: float | None = None) -> Any:
        return out.result(timeout)

    def _stop(self, kill: bool) -> None:
        engine, self._workers = self._workers, None
        if engine is not None:
            if kill:
                engine.terminate()
            else:
                engine.close()
                engine.join()

    def terminate(self) -> None:
        """End of a Parallel call: let the workers finish and stop them."""
        self._stop(kill=False)
        self.reset_batch_stats()

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """A task failed: kill the workers, and start new ones (with the
        same options) if the Parallel object is to be used again."""
        self._stop(kill=True)
        if ensure_ready:
            self._workers = self._start()


def _check_names(options: dict[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = set(options) - set(allowed)
    if unknown:
        raise TypeError(
            f"unknown option(s) for the shoal joblib backend: {sorted(unknown)}; "
            f"it takes {', '.join(_OPTIONS)} (and joblib's max_nbytes, mmap_mode, temp_folder)"
        )


def _configure_options(backend_kwargs: dict[str, Any], options: dict[str, Any]) -> tuple[dict, _ArrayPolicy]:
    """The worker settings and the array policy of one Parallel call.

    *backend_kwargs* came from ``parallel_config(backend="shoal", ...)``;
    *options* are what ``Parallel`` passes to ``configure()``: its own
    keyword arguments (which win) and joblib's (``_JOBLIB_OPTIONS``).
    """
    _check_names(options, _OPTIONS + _JOBLIB_OPTIONS)
    settings = {**backend_kwargs, **{k: v for k, v in options.items() if k in _OPTIONS}}
    context = options.get("context")
    # Parallel passes multiprocessing's default context, or the one
    # JOBLIB_START_METHOD names: only the latter is a choice to honour (the
    # default is what the engine picks by itself).
    chosen = getattr(joblib.parallel, "DEFAULT_MP_CONTEXT", None)
    if settings.get("mp_context") is None and context is not None and context is chosen:
        settings["mp_context"] = context
    max_nbytes = options.get("max_nbytes")
    mmap_mode = options.get("mmap_mode", "r")
    if max_nbytes is not None:
        if isinstance(max_nbytes, bool) or not isinstance(max_nbytes, (int, float)) or max_nbytes < 0:
            raise ValueError(
                f"max_nbytes must be a number of bytes (or a string such as '1M') or None, got {max_nbytes!r}"
            )
        if mmap_mode not in _MMAP_MODES:
            if mmap_mode in ("r+", "w+"):
                raise ValueError(
                    f"the shoal joblib backend does not support mmap_mode={mmap_mode!r}: with joblib's "
                    "other backends it gives workers a writable copy of each large array in a temporary "
                    "file, which the caller never sees; shoal writes no such file. Use mmap_mode='r' "
                    "(read-only, the default) or 'c' (a private writable copy in each task); to have "
                    "workers write into memory the caller sees, pass a shoal.SharedArray, or a "
                    "numpy.memmap of your own file"
                )
            raise ValueError(f"mmap_mode must be one of None, 'r', 'c', 'r+' or 'w+', got {mmap_mode!r}")
    return settings, _ArrayPolicy(max_nbytes, mmap_mode)


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two settings dicts hold the same options (identical objects,
    or equal numbers and strings: arrays in initargs have no plain ==)."""
    if a.keys() != b.keys():
        return False
    for key, x in a.items():
        y = b[key]
        if isinstance(x, tuple) and isinstance(y, tuple):
            if len(x) != len(y) or not all(p is q for p, q in zip(x, y, strict=True)):
                return False
        elif not (x is y or (type(x) in (int, float, str) and type(x) is type(y) and x == y)):
            return False
    return True


def _daemonic_message() -> str:
    if inside_dask_worker():
        return (
            "Inside a Dask worker with daemon=True, the shoal backend runs this loop with n_jobs=1.\n"
            "Possible work-arounds:\n"
            "- dask.config.set({'distributed.worker.daemon': False})\n"
            "- set the environment variable DASK_DISTRIBUTED__WORKER__DAEMON=False\n"
            "before creating your Dask cluster."
        )
    return (
        "shoal-backed parallel loops cannot start worker processes inside a daemonic process "
        "(a task of multiprocessing.Pool, a daemon Process), setting n_jobs=1"
    )


def _run_batch(batch: Any) -> Any:
    """The task a worker runs: one of joblib's ``BatchedCalls``."""
    return batch()


# -- joblib's array options ---------------------------------------------------


class _ArrayPolicy:
    """``max_nbytes`` / ``mmap_mode`` for the numpy arrays of a batch.

    joblib's other process backends dump arrays larger than ``max_nbytes``
    to files in a temporary folder and workers map them
    (``joblib._memmapping_reducer``).  Here a batch is pickled with reducers
    for ``numpy.ndarray`` and ``numpy.memmap`` that give the same results
    without files (the module docstring lists them); large buffers still go
    through shoal's shared memory.  Everything else, functions and classes
    included, is pickled by shoal's one policy
    (:func:`shoal._serialization.pickle_code`).
    """

    def __init__(self, max_nbytes: float | None, mmap_mode: str | None) -> None:
        self.max_nbytes = max_nbytes
        self.mode = mmap_mode if max_nbytes is not None else None
        self._types: tuple[type, ...] = ()

    def pickle(self, batch: Any) -> _Pickled:
        """*batch* pickled with the policy applied (in the caller's thread)."""
        if not self._types:
            import numpy as np

            # Exactly these: a SharedArray (a subclass) travels as its memory's descriptor.
            self._types = (np.ndarray, np.memmap)
        buffers = LargeBuffers(OOB_THRESHOLD)  # for shoal's shared memory; smaller ones stay in the pickle
        with collecting_fds() as fds:  # a SharedArray's memory: its descriptor travels beside
            try:
                data = pickle_code(batch, buffers, reduce=self._reduce)
            except BaseException:
                _close(fds)
                raise
        return _Pickled(data, buffers.taken, fds)

    def _reduce(self, obj: Any) -> Any:
        return self._reduce_array(obj) if type(obj) in self._types else NotImplemented

    def _reduce_array(self, a: Any) -> Any:
        file_backed = _file_memmap(a)
        if file_backed is not None:
            return _reduce_file_memmap(a, file_backed)
        if a.dtype.hasobject:
            return a.__reduce_ex__(5)
        if self.mode is not None and a.nbytes > self.max_nbytes:
            buffer, order = _flat(a)
            return _memmap_view, (pickle.PickleBuffer(buffer), a.dtype, a.shape, order, self.mode)
        if a.nbytes >= OOB_THRESHOLD:
            # It would arrive read-only (shared memory): joblib's semantics
            # for arrays under max_nbytes is a private, writable copy.
            buffer, order = _flat(a)
            return _private_array, (pickle.PickleBuffer(buffer), a.dtype, a.shape, order)
        return a.__reduce_ex__(5)


class _Pickled:
    """A batch pickled by _ArrayPolicy; its large buffers (out of band)
    and the descriptors of its shared memory travel beside it, through
    shoal's own path.  ``close()`` closes the descriptors it holds (the
    task holds duplicates)."""

    __slots__ = ("buffers", "data", "fds")

    def __init__(self, data: bytes, buffers: list[pickle.PickleBuffer], fds: list[int]) -> None:
        self.data = data
        self.buffers = buffers
        self.fds = fds

    def __reduce__(self) -> Any:
        return _unpickle_batch, (
            pickle.PickleBuffer(self.data),
            self.buffers,
            [_Descriptor(fd) for fd in self.fds],
        )

    def close(self) -> None:
        fds, self.fds = self.fds, []
        _close(fds)


class _Descriptor:
    """Pickles as a duplicate of *fd*, for the message that carries it."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> Any:
        return reduce_fd(os.dup(self.fd))


def _unpickle_batch(data: Any, buffers: list[Any], fds: list[int]) -> Any:
    try:
        with providing_fds(fds):
            return pickle.loads(data, buffers=buffers)
    finally:
        _close(fds)


def _close(fds: list[int]) -> None:
    for fd in fds:
        if fd >= 0:  # -1: an unpickled object took it (providing_fds)
            os.close(fd)


def _flat(a: Any) -> tuple[Any, str]:
    """A contiguous array with *a*'s items in the order returned with it."""
    if a.flags.c_contiguous:
        return a, "C"
    if a.flags.f_contiguous:
        return a.T, "F"
    import numpy as np

    return np.ascontiguousarray(a), "C"


def _memmap_view(buffer: Any, dtype: Any, shape: tuple, order: str, mode: str) -> Any:
    """In the worker: an array larger than max_nbytes, as a ``numpy.memmap``
    over the memory it arrived in; read-only (``"r"``) or a private copy
    (``"c"``)."""
    import numpy as np

    a = np.frombuffer(buffer, dtype=dtype).reshape(shape, order=order)  # type: ignore[call-overload]
    if mode == "c" and not a.flags.writeable:
        a = a.copy(order=order)
    m = a.view(np.memmap)
    if mode == "r":
        m.flags.writeable = False
    m.mode, m.offset, m.filename = mode, 0, None
    return m


def _private_array(buffer: Any, dtype: Any, shape: tuple, order: str) -> Any:
    """In the worker: an array under max_nbytes, private and writable."""
    import numpy as np

    a = np.frombuffer(buffer, dtype=dtype).reshape(shape, order=order)  # type: ignore[call-overload]
    return a if a.flags.writeable else a.copy(order=order)


def _file_memmap(a: Any) -> Any:
    """The ``numpy.memmap`` of a file that *a* is a view of, or None."""
    import numpy as np

    if a.size == 0:
        return None
    b = a
    while b is not None:
        base = getattr(b, "base", None)
        if isinstance(base, mmap.mmap):
            # (numpy keeps the pathlib.Path a memmap was made with, or a str)
            name = b.filename if isinstance(b, np.memmap) else None
            if isinstance(name, (str, os.PathLike)) and not os.fspath(name).startswith("/proc/"):
                return b
            return None
        b = base
    return None


def _reduce_file_memmap(a: Any, m: Any) -> Any:
    """*a*, a view of the file memmap *m*, by reference: the worker maps
    the same bytes of the same file (with ``m``'s mode; ``"w+"`` as
    ``"r+"``, which does not truncate it), and its writes reach the file."""
    try:
        from numpy.lib.array_utils import byte_bounds
    except ImportError:  # numpy < 2
        from numpy import byte_bounds  # type: ignore[attr-defined,no-redef]

    low, high = byte_bounds(a)
    m_low = byte_bounds(m)[0]
    first = a.__array_interface__["data"][0]
    mode = "r+" if m.mode == "w+" else m.mode
    return _map_file, (
        os.fspath(m.filename),
        m.offset + low - m_low,
        high - low,
        mode,
        a.dtype,
        a.shape,
        a.strides,
        first - low,
    )


def _map_file(
    filename: str, offset: int, length: int, mode: Any, dtype: Any, shape: tuple, strides: tuple, start: int
) -> Any:
    import numpy as np

    span = np.memmap(filename, dtype=np.uint8, mode=mode, offset=offset, shape=(length,))
    m = np.ndarray.__new__(np.memmap, shape, dtype=dtype, buffer=span, offset=start, strides=strides)
    m._mmap, m.filename, m.mode, m.offset = span._mmap, span.filename, mode, offset + start  # type: ignore[attr-defined]
    return m


joblib.register_parallel_backend("shoal", ShoalBackend)
public(ShoalBackend, "shoal.joblib")
