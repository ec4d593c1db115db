"""Dask scenarios: shoal's pool on a Dask cluster against Dask's own client.

Both contenders use the same local cluster (2 single-thread worker
processes, started once and shut down at exit):

* "10k trivial tasks": ``shoal.Pool(backend="dask").map`` against
  ``client.map`` + ``client.gather`` (one Dask task per item, Dask's way).
* "100 tasks sharing one 10 MB array": ``pool.starmap`` with the same array in
  every item (shoal scatters it once) against ``client.submit`` with the array
  passed to every call, and ``Pool(shared=array)``.

The ratio is against the Dask client (the baseline), not the standard library.
Skipped, with a note, when ``distributed`` is not installed.
"""

from __future__ import annotations

import atexit
import sys
import time
import warnings

from ._framework import Scenario, optional

WORKERS = 2
N_TASKS = 10_000
N_SHARED = 100
ARRAY_BYTES = 10 * 1024 * 1024

_state: dict = {}


def _noop(x):
    return x


def _array_sum(a, i):
    return float(a[i])


def _shared_sum(i):
    import shoal

    return float(shoal.shared()[i])


def _cluster():
    """The cluster every contender uses, started on first use."""
    if "cluster" not in _state:
        import distributed

        cluster = distributed.LocalCluster(
            n_workers=WORKERS,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
        )
        client = distributed.Client(cluster, set_as_default=False)
        _state.update(cluster=cluster, client=client)
        atexit.register(_shutdown)
    return _state["cluster"], _state["client"]


def _shutdown() -> None:
    _state.pop("client").close()
    _state.pop("cluster").close()


def _shoal_pool(**options):
    import shoal

    cluster, _ = _cluster()
    return shoal.Pool(backend="dask", address=cluster.scheduler_address, **options)


def _n(quick: bool) -> int:
    return N_TASKS // 5 if quick else N_TASKS


def _client_map_rate(quick: bool) -> float:
    _, client = _cluster()
    n = _n(quick)
    client.submit(_noop, 0, pure=False).result()
    t0 = time.perf_counter()
    out = client.gather(client.map(_noop, range(n), pure=False))
    dt = time.perf_counter() - t0
    assert out == list(range(n))
    return n / dt


def _shoal_map_rate(quick: bool) -> float:
    n = _n(quick)
    with _shoal_pool() as pool:
        pool.apply(_noop, (0,))
        t0 = time.perf_counter()
        out = pool.map(_noop, range(n))
        dt = time.perf_counter() - t0
    assert out == list(range(n))
    return n / dt


def _array():
    import numpy as np

    return np.arange(ARRAY_BYTES // 8, dtype=np.float64)


def _client_submit_seconds(quick: bool) -> float:
    _, client = _cluster()
    a = _array()
    client.submit(_noop, 0, pure=False).result()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Dask warns about the large graph: that is the point
        t0 = time.perf_counter()
        out = client.gather([client.submit(_array_sum, a, i, pure=False) for i in range(N_SHARED)])
        dt = time.perf_counter() - t0
    assert out == [float(i) for i in range(N_SHARED)]
    return dt


def _shoal_starmap_seconds(quick: bool) -> float:
    a = _array()
    with _shoal_pool() as pool:
        pool.apply(_noop, (0,))
        t0 = time.perf_counter()
        out = pool.starmap(_array_sum, [(a, i) for i in range(N_SHARED)], chunksize=1)
        dt = time.perf_counter() - t0
    assert out == [float(i) for i in range(N_SHARED)]
    return dt


def _shoal_shared_seconds(quick: bool) -> float:
    a = _array()
    t0 = time.perf_counter()
    with _shoal_pool(shared=a) as pool:  # the scatter is part of the timed work
        out = pool.map(_shared_sum, range(N_SHARED), chunksize=1)
    dt = time.perf_counter() - t0
    assert out == [float(i) for i in range(N_SHARED)]
    return dt


if optional("distributed") and optional("numpy"):
    SCENARIOS = [
        Scenario(
            "dask: 10k trivial tasks",
            "tasks/s",
            True,
            {"client.map": _client_map_rate, "shoal": _shoal_map_rate},
            target=">= 10x client.map",
            repeat=1,
            baseline="client.map",
        ),
        Scenario(
            "dask: 100 tasks sharing one 10 MB array",
            "s",
            False,
            {
                "submit": _client_submit_seconds,
                "shoal": _shoal_starmap_seconds,
                "shared=": _shoal_shared_seconds,
            },
            target=">= 5x submit (Dask's client.submit)",
            repeat=2,
            baseline="submit",
        ),
    ]
else:
    print("bench_dask: skipped (needs distributed and numpy: pip install distributed numpy)", file=sys.stderr)
    SCENARIOS = []
