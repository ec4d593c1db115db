"""``shoal.Manager``: the standard library's ``Manager()``, with ``dict()`` in
shared memory.

Data flow::

    Manager ──dict()────────────▶ SharedDict (memfd; no server, no round trip)
       │
       └─list(), Lock(), Queue(), Namespace(), Value(), ... (and register()ed
         types) ──▶ a multiprocessing SyncManager, started on first use,
                    whose proxies call into its server process

* ``dict()`` returns a :class:`~shoal.SharedDict`.  It keeps what users rely
  on from the ``DictProxy``: it can be passed to processes and pool tasks,
  single operations are atomic, ``with lock: d[k] -= 1`` works with any
  lock, and ``print(d)`` shows a plain dict repr.  It is ~100x faster and
  adds race-free ``incr`` / ``update_with`` / ``locked()``.
* Everything else is the standard library's, which does it well enough;
  the server process starts only when one of those is first asked for, so
  a manager used only for dicts never starts a process.
* ``shutdown()`` (or leaving the ``with`` block) stops the server, if any,
  and closes this process's handles on the dicts it made, as the standard
  library's proxies stop working then (a thread inside ``d.locked()`` at
  that moment gets ``ValueError`` from its next operation on ``d``; the
  lock is released when its block ends).  Processes that received a dict
  keep their own handles; the memory goes when the last handle does.
"""

from __future__ import annotations

import threading
import weakref
from multiprocessing import ProcessError
from multiprocessing.managers import SyncManager
from typing import Any

from ._shm._dict import SharedDict

__all__ = ("Manager",)


class _SyncManager(SyncManager):
    """The server side of everything but dict(); ``Manager.register`` adds to it."""


class Manager:
    """A manager of shared objects: ``with Manager() as m: d = m.dict()``.

    Same signature and methods as ``multiprocessing.Manager()``'s
    ``SyncManager``: ``dict``, ``list``, ``Namespace``, ``Value``, ``Array``,
    ``Lock``, ``RLock``, ``Semaphore``, ``BoundedSemaphore``, ``Event``,
    ``Condition``, ``Barrier``, ``Queue``, ``JoinableQueue``, ``Pool``,
    ``register``, ``start``, ``shutdown``, ``join``, ``address``, context
    manager.
    """

    def __init__(
        self,
        address: Any = None,
        authkey: bytes | None = None,
        serializer: str = "pickle",
        ctx: Any = None,
        *,
        shutdown_timeout: float = 1.0,
    ) -> None:
        self._options = {
            "address": address,
            "authkey": authkey,
            "serializer": serializer,
            "ctx": ctx,
            "shutdown_timeout": shutdown_timeout,
        }
        self._server: SyncManager | None = None
        self._mutex = threading.Lock()
        # Weak references (a SharedDict, like a dict, is unhashable).
        self._dicts: list[weakref.ref[SharedDict]] = []
        self._shut_down = False

    # -- dict: shared memory --

    def dict(self, *args: Any, **kwargs: Any) -> SharedDict:
        """A :class:`~shoal.SharedDict` initialised like ``dict(*args, **kwargs)``."""
        self._check_running()
        d = SharedDict(dict(*args, **kwargs))
        with self._mutex:
            self._dicts = [r for r in self._dicts if r() is not None]
            self._dicts.append(weakref.ref(d))
        return d

    # -- everything else: the standard library's server --

    def _sync(self) -> SyncManager:
        with self._mutex:
            self._check_running()
            if self._server is None:
                server = _SyncManager(**self._options)
                server.start()
                self._server = server
            return self._server

    def _check_running(self) -> None:
        if self._shut_down:
            raise ProcessError("the manager has been shut down")

    def start(self, initializer: Any = None, initargs: tuple = ()) -> None:
        """Start the server process now (it otherwise starts on first use)."""
        with self._mutex:
            self._check_running()
            if self._server is not None:
                raise ProcessError("Already started server")
            server = _SyncManager(**self._options)
            server.start(initializer, initargs)
            self._server = server

    def shutdown(self) -> None:
        """Stop the server process (if it started) and close the dicts made
        here (in this process).  Idempotent."""
        with self._mutex:
            self._shut_down = True
            server, self._server = self._server, None
            dicts, self._dicts = self._dicts, []
        for ref in dicts:
            d = ref()
            if d is not None:
                d.close()
        if server is not None:
            server.shutdown()

    def join(self, timeout: float | None = None) -> None:
        if self._server is not None:
            self._server.join(timeout)

    @property
    def address(self) -> Any:
        return self._sync().address

    def connect(self) -> None:
        raise NotImplementedError(
            "shoal.Manager starts its own server; to connect to a remote manager use "
            "multiprocessing.managers.BaseManager.connect"
        )

    def __enter__(self) -> Manager:
        self._check_running()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        state = "shut down" if self._shut_down else ("server running" if self._server else "no server")
        return f"<shoal.Manager {state}>"

    @classmethod
    def register(
        cls,
        typeid: str,
        callable: Any = None,
        proxytype: Any = None,
        exposed: Any = None,
        method_to_typeid: Any = None,
        create_method: bool = True,
    ) -> None:
        """Register a type with the server, as ``BaseManager.register``:
        ``m.<typeid>(*args)`` then returns a proxy to a new object living in
        the server process."""
        _SyncManager.register(typeid, callable, proxytype, exposed, method_to_typeid, create_method)
        if create_method:
            setattr(cls, typeid, _delegate(typeid))


def _delegate(typeid: str):
    def method(self: Manager, /, *args: Any, **kwargs: Any) -> Any:
        return getattr(self._sync(), typeid)(*args, **kwargs)

    method.__name__ = method.__qualname__ = typeid
    method.__doc__ = f"A proxy to a new shared {typeid} in the manager's server process (as SyncManager.{typeid})."
    return method


for _typeid in (
    "Array", "Barrier", "BoundedSemaphore", "Condition", "Event", "JoinableQueue", "Lock",
    "Namespace", "Pool", "Queue", "RLock", "Semaphore", "Value", "list",
):  # fmt: skip
    setattr(Manager, _typeid, _delegate(_typeid))
del _typeid

Manager.__module__ = "shoal"
