"""Where a pool's tasks run: ``backend=None`` is shoal's own engine on this
machine; ``backend="dask"`` is the same engine's interface on a Dask cluster
(:mod:`shoal._dask`).  Optional backends are imported only when asked for,
so ``import shoal`` never imports Dask."""

from __future__ import annotations

from typing import Any

#: ``shared=`` left out (``None`` is a valid shared object).
class _NotShared:
    def __repr__(self) -> str:
        return "NOT_SHARED"


NOT_SHARED: Any = _NotShared()

INSTALL_HINT = 'backend="dask" needs Dask\'s distributed scheduler: pip install "shoal[dask]"'

BACKENDS = (None, "dask")


def remote_engine(backend: str | None, address: str | None, *args, shared: Any = NOT_SHARED, **options):
    """The engine for ``backend`` (not None), started or connected to *address*."""
    if backend is None:
        raise ValueError(f"address={address!r} needs backend='dask'")
    if backend != "dask":
        raise ValueError(f"unknown backend {backend!r}: use None (worker processes on this machine) or 'dask'")
    try:
        from ._dask import DaskEngine
    except ImportError as exc:
        if (exc.name or "").split(".")[0] in ("dask", "distributed"):
            raise ImportError(INSTALL_HINT) from exc
        raise
    if shared is not NOT_SHARED:
        options["shared"] = shared
    return DaskEngine(*args, address=address, **options)
