"""joblib scenarios: ``Parallel(n_jobs=2)`` on shoal's backend (``import
shoal.joblib``) against joblib's default backend, loky, in the same run.

Each contender keeps its workers for a ``with Parallel(...)`` block, warms
them with a few calls, then runs the timed calls.  "shoal bs=1" turns
joblib's auto-batching off (one call per task, batching left to shoal's
engine): it shows why the backend keeps joblib's batching.
"""

from __future__ import annotations

import time

from ._framework import Scenario, optional

WORKERS = 2
N_CALLS = 20_000


def _noop(x):
    return x


def _parallel_rate(backend: str, n: int, batch_size="auto") -> float:
    from joblib import Parallel, delayed

    if backend == "shoal":
        import shoal.joblib  # noqa: F401 - registers the backend

    with Parallel(n_jobs=WORKERS, backend=backend, batch_size=batch_size) as parallel:
        parallel(delayed(_noop)(i) for i in range(10))
        t0 = time.perf_counter()
        out = parallel(delayed(_noop)(i) for i in range(n))
        rate = n / (time.perf_counter() - t0)
    if out != list(range(n)):
        raise AssertionError("wrong results")
    return rate


SCENARIOS = []
if optional("joblib"):
    SCENARIOS.append(
        Scenario(
            "joblib Parallel 20k trivial (vs loky)",
            "calls/s",
            True,
            {
                "loky": lambda q: _parallel_rate("loky", N_CALLS),
                "shoal": lambda q: _parallel_rate("shoal", N_CALLS),
                "shoal bs=1": lambda q: _parallel_rate("shoal", N_CALLS // 4, batch_size=1),
            },
            target=">= 1.0x loky",
            baseline="loky",
        )
    )
