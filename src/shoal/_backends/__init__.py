"""Where a pool's tasks run: ``backend=None`` is shoal's own engine on this
machine (:class:`shoal._engine.LocalEngine`); ``backend="dask"`` is the same
engine contract (:class:`shoal._engine.Engine`) on a Dask cluster
(:mod:`._dask`, a package: the engine, the worker side, the wire).  Optional
backends are imported only when asked for, so ``import shoal`` never
imports Dask."""

from __future__ import annotations

from typing import Any

from .._engine import NO_SHARED, Engine, LocalEngine

INSTALL_HINT = (
    'backend="dask" needs Dask\'s distributed scheduler, which is not installed: pip install distributed '
    "(or, in shoal's source directory, pip install '.[dask]')"
)

BACKENDS = (None, "dask")


def make_engine(backend: str | None, address: str | None, *args: Any, **options: Any) -> Engine:
    """The engine a face runs on: shoal's own (``backend=None`` and no
    address) or the one for *backend*, started or connected to *address*.
    Options only the local engine has (``defer_start_errors``) are dropped
    for a remote one."""
    if backend is None and address is None:
        return LocalEngine(*args, **options)
    options.pop("defer_start_errors", None)
    return remote_engine(backend, address, *args, **options)


def remote_engine(
    backend: str | None,
    address: str | None,
    *args: Any,
    shared: Any = NO_SHARED,
    worker_init: Any = None,
    worker_exit: Any = None,
    **options: Any,
) -> Engine:
    """The engine for ``backend`` (not None), started or connected to *address*."""
    if worker_init is not None or worker_exit is not None:
        raise ValueError(
            "worker_init and worker_exit need workers the pool owns: they are not available with "
            "backend='dask' (use initializer= for per-worker set-up there)"
        )
    if backend is None:
        raise ValueError(f"address={address!r} needs backend='dask'")
    if backend != "dask":
        raise ValueError(
            f"unknown backend {backend!r}: use None (worker processes on this machine) or 'dask'"
        )
    try:
        from ._dask import DaskEngine
    except ImportError as exc:
        if (exc.name or "").split(".")[0] in ("dask", "distributed"):
            raise ImportError(INSTALL_HINT) from exc
        raise
    if shared is not NO_SHARED:
        options["shared"] = shared
    return DaskEngine(*args, address=address, **options)
