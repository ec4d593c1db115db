"""``shoal.managers``: the standard library's ``multiprocessing.managers``.

Code that builds its own manager (``class MyManager(BaseManager): pass;
MyManager.register('Foo', Foo)``) imports it from here when ``multiprocessing``
is replaced by ``shoal``; the proxies it makes work in shoal's pool tasks,
processes and actors.  Every name is the standard library's own
(``BaseManager``, ``SyncManager``, ``BaseProxy``, ``Token``, ``DictProxy``,
``NamespaceProxy``, ...): they are already right, and ``connect()`` to a
remote manager needs them unchanged.  ``shoal.Manager()`` is the faster
``SyncManager`` (its ``dict()`` lives in shared memory).
"""

from __future__ import annotations

import multiprocessing.managers as _managers
from multiprocessing.managers import *  # noqa: F403 - the standard library's names
from typing import Any

__all__ = tuple(_managers.__all__)


def __getattr__(name: str) -> Any:
    # The names outside __all__ that code imports (DictProxy, ListProxy,
    # AutoProxy, NamespaceProxy, MakeProxyType, ...).
    try:
        return getattr(_managers, name)
    except AttributeError:
        raise AttributeError(f"module 'shoal.managers' has no attribute {name!r}") from None
