"""Shared data: the shared dict (and, loaded on first use because it needs
numpy, SharedArray in :mod:`._array`).  Segments and descriptors are one
layer down, in :mod:`shoal._fd`."""

from ._dict import SharedDict as SharedDict
from ._dict import _SnapshotItems as SnapshotItems
from ._dict import _SnapshotKeys as SnapshotKeys
from ._dict import _SnapshotValues as SnapshotValues

__all__ = ("SharedDict", "SnapshotItems", "SnapshotKeys", "SnapshotValues")
