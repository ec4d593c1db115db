"""``import shoal.joblib``: a joblib parallel backend named ``"shoal"``.

::

    import joblib
    import shoal.joblib  # registers the backend

    with joblib.parallel_config(backend="shoal", n_jobs=2):
        results = joblib.Parallel()(joblib.delayed(f)(x) for x in xs)

Data flow::

    Parallel (caller's thread)                 shoal engine
      │ configure() ─────────────────────────▶ Engine(n_jobs workers), started lazily
      │ submit(BatchedCalls, callback) ──────▶ submit_call ─▶ scheduler thread ─▶ workers
      │                                                             │
      │ ◀── callback(future) on the engine's callback thread ◀──────┘
      │ retrieve_result_callback(future) = future.result()
      │ terminate() at the end of the call ──▶ close + join: no worker left
      └ abort_everything() after an error ───▶ terminate (kill) the workers;
                                                a new engine if more work follows

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
  its workers for reuse instead.
* Backend options (``parallel_config(backend="shoal", max_tasks_per_child=..,
  mp_context=.., task_timeout=.., max_memory=.., initializer=..,
  initargs=..)``) are :class:`shoal.ProcessPoolExecutor`'s.

joblib is an optional dependency (``pip install shoal[joblib]``); ``import
shoal`` never imports it, and importing this module without it raises an
``ImportError`` that says so.
"""

from __future__ import annotations

from typing import Any

try:
    import joblib
    from joblib._parallel_backends import (
        AutoBatchingMixin,
        FallbackToBackend,
        ParallelBackendBase,
        SequentialBackend,
    )
except ImportError as exc:
    raise ImportError("shoal.joblib needs joblib: pip install 'shoal[joblib]'") from exc

from ._asyncresult import Future, submit_future
from ._engine import Engine

__all__ = ("ShoalBackend",)

_OPTIONS = ("mp_context", "initializer", "initargs", "max_tasks_per_child", "max_memory", "task_timeout")


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
    ):
        unknown = set(options) - set(_OPTIONS)
        if unknown:
            raise TypeError(
                f"unknown option(s) for the shoal joblib backend: {sorted(unknown)}; "
                f"it takes {', '.join(_OPTIONS)}"
            )
        super().__init__(nesting_level=nesting_level, inner_max_num_threads=inner_max_num_threads, **options)
        self._engine: Engine | None = None
        self._n_jobs = 1

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None:
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
        n_jobs = self.effective_n_jobs(n_jobs)
        if n_jobs == 1:
            raise FallbackToBackend(SequentialBackend(nesting_level=self.nesting_level))
        self.parallel = parallel
        if self._engine is not None and self._n_jobs != n_jobs:
            self._stop(kill=False)
        self._n_jobs = n_jobs
        return n_jobs

    def _get_engine(self) -> Engine:
        if self._engine is None:
            kw = self.backend_kwargs
            self._engine = Engine(
                self._n_jobs,
                kw.get("initializer"),
                kw.get("initargs", ()),
                kw.get("max_tasks_per_child"),
                kw.get("mp_context"),
                max_memory=kw.get("max_memory"),
                task_timeout=kw.get("task_timeout"),
            )
        return self._engine

    def submit(self, func: Any, callback: Any = None) -> Future:
        future = submit_future(self._get_engine(), func, (), {})
        if callback is not None:
            future.add_done_callback(callback)
        return future

    apply_async = submit  # the name joblib < 1.5 calls

    def retrieve_result_callback(self, future: Future) -> Any:
        return future.result()

    def retrieve_result(self, out: Future, timeout: float | None = None) -> Any:
        return out.result(timeout)

    def _stop(self, kill: bool) -> None:
        engine, self._engine = self._engine, None
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
        """A task failed: kill the workers (a new engine starts on demand)."""
        self._stop(kill=True)
        if ensure_ready:
            self.configure(n_jobs=self.parallel.n_jobs, parallel=self.parallel)


joblib.register_parallel_backend("shoal", ShoalBackend)
ShoalBackend.__module__ = "shoal.joblib"
