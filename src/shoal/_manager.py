"""``shoal.Manager``: the standard library's ``Manager()``, with ``dict()`` in
shared memory.

Data flow::

    Manager ──dict()────────────▶ manager dict: a SharedDict (memfd; no server,
       │                          no round trip) that holds shared objects by
       │                          reference through the server (below)
       │
       └─list(), Lock(), Queue(), Namespace(), Value(), ... (and register()ed
         types) ──▶ a multiprocessing SyncManager, started on first use,
                    whose proxies call into its server process

* ``dict()`` returns a :class:`~shoal.SharedDict`.  It keeps what users rely
  on from the ``DictProxy``: it can be passed to processes and pool tasks,
  single operations are atomic, ``with lock: d[k] -= 1`` works with any
  lock, ``print(d)`` shows a plain dict repr, ``keys()`` / ``values()`` /
  ``items()`` return lists, and iterating it while its size changes (here
  or in another process) raises ``RuntimeError`` as a dict does.  It is
  ~100x faster and adds race-free ``incr`` / ``update_with`` / ``locked()``.
* Everything else is the standard library's, which does it well enough;
  the server process starts when the first of those, or the first dict,
  is asked for (below).

Nested shared objects.  Plain values (str, numbers, bytes, None, and
containers of them) are stored as data, as in any SharedDict: that path
is unchanged and as fast.  A value that is or contains a shared object is
stored by reference, so ``d['inner']['k'] = v`` writes through, as with
the standard library's nested proxies:

* a manager proxy (``m.list()``, ``m.Queue()``, a registered type...) is
  pickled as the standard library pickles it (its token), after one
  ``incref`` in its server, so the object outlives the proxy that stored
  it.  Any process that reads the value gets a live proxy.
* a SharedDict (a manager dict or any other) is pinned in the manager's
  server: the *keeper* object there opens the dict's memfd through
  ``/proc/<pid>/fd/<n>`` of the storing process, which waits in the call,
  and holds it; the value stored is ``(server address, reference id)``.  A
  process that reads it asks the keeper where the descriptor is and opens
  it the same way (no descriptor passing, no resource-sharer thread), and
  caches the handle while it is in use (weakly).  A manager dict sent over
  a manager connection or a ``multiprocessing`` queue travels the same way,
  so ``m.list([m.dict()])[0]['x'] = 1`` works; through shoal's channels
  and at process start its descriptor travels directly, as a SharedDict's.
* The server's address is fixed when the Manager is created (a fresh
  AF_UNIX path unless ``address`` is given), and a manager dict carries it
  to every process it reaches, so any of them finds the keeper.  The server
  starts with the first ``dict()`` (the standard library's starts with
  ``Manager()``): a process given the dict by fork, where nothing is
  pickled, may store a shared object in it at once.
* Whatever is stored by reference stays alive until the manager shuts down,
  even once overwritten (the standard library frees it when its last proxy
  goes): a program that stores many short-lived nested objects grows the
  server until shutdown.

``shutdown()`` (or leaving the ``with`` block) stops the server, if any,
and closes this process's handles on the dicts it made or read from a
nested reference, as the standard library's proxies stop working then (a
thread inside ``d.locked()`` at that moment gets ``ValueError`` from its
next operation on ``d``; the lock is released when its block ends).
Processes that received a dict keep their own handles; the memory goes when
the last handle does.

``register(typeid, callable, ...)`` is ``BaseManager.register``: each
subclass has its own registry (registering on one does not add to another
or to ``Manager``), and the server started for an instance serves its
class's registry, plus the types registered on the standard library's
``SyncManager`` (which ``multiprocessing.Manager()`` serves).  :mod:`shoal.managers` re-exports
``multiprocessing.managers`` for code that builds its own ``BaseManager``.
"""

from __future__ import annotations

import os
import pickle
import threading
import weakref
from collections.abc import Callable, Iterator
from multiprocessing import ProcessError, current_process
from multiprocessing.connection import arbitrary_address, default_family  # type: ignore[attr-defined]  # not in typeshed
from multiprocessing.context import get_spawning_popen
from multiprocessing.managers import (  # type: ignore[attr-defined]  # not in typeshed
    BaseManager,
    BaseProxy,
    SyncManager,
    Token,
    dispatch,
    listener_client,
)
from typing import Any

from ._fd import collecting
from ._serialization import dumps, pickle_code, starting_process
from ._shm import SharedDict
from ._util import public

__all__ = ("Manager",)


# -- the keeper: shared dicts pinned in the manager's server -------------------


class _Keeper:
    """Lives in the server process (one per server): holds a descriptor for
    each SharedDict stored by reference in a manager dict."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fds: dict[int, int] = {}
        self._ids: dict[tuple[int, int], int] = {}

    def pin(self, pid: int, fd: int) -> int:
        """Open descriptor *fd* of process *pid* (which waits in this call)
        and keep it; the same dict pinned twice has one id."""
        new = os.dup(fd) if pid == os.getpid() else os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
        st = os.fstat(new)
        key = (st.st_dev, st.st_ino)
        with self._lock:
            ref = self._ids.get(key)
            if ref is None:
                ref = self._ids[key] = len(self._ids) + 1
                self._fds[ref] = new
                return ref
        os.close(new)
        return ref

    def where(self, ref: int) -> tuple[int, int]:
        """(pid, fd) through which another process opens dict *ref*."""
        return os.getpid(), self._fds[ref]


_KEEPER: _Keeper | None = None
_KEEPER_LOCK = threading.Lock()


def _keeper() -> _Keeper:
    global _KEEPER
    with _KEEPER_LOCK:
        if _KEEPER is None:
            _KEEPER = _Keeper()
        return _KEEPER


class _KeeperProxy(BaseProxy):
    _exposed_ = ("pin", "where")

    def pin(self, pid: int, fd: int) -> int:
        return self._callmethod("pin", (pid, fd))  # type: ignore[func-returns-value,return-value]  # typeshed: None

    def where(self, ref: int) -> tuple[int, int]:
        return self._callmethod("where", (ref,))  # type: ignore[func-returns-value,return-value]  # typeshed: None


class _SyncManager(SyncManager):
    """The server side of everything but dict(); each Manager class's
    registry is handed to it at start."""


_SyncManager.register("_shoal_keeper", _keeper, _KeeperProxy)


def _in_server(address: Any) -> bool:
    server = getattr(current_process(), "_manager_server", None)
    return server is not None and server.address == address


# -- references from a manager dict --------------------------------------------


class _Refs:
    """A manager dict's way to its manager's keeper (StorageRefs for
    SharedDict): pins what is stored by reference and resolves it back.
    One per manager in its creator; one per server address elsewhere, which
    reaches the keeper by the server's address (fixed before the server
    starts, so a process given a dict before then finds it once it runs)."""

    def __init__(self, address: Any, manager: Manager | None = None, authkey: bytes | None = None) -> None:
        self.address = address
        self._manager = manager
        self._authkey = authkey  # None: this process's authkey
        self._pid = os.getpid()
        self._proxy: _KeeperProxy | None = None
        self._lock = threading.Lock()

    def keeper(self) -> _KeeperProxy:
        proxy = self._proxy
        if proxy is not None:
            return proxy
        with self._lock:
            if self._proxy is None:
                if self._manager is not None and self._pid == os.getpid():
                    self._proxy = self._manager._keeper()  # starts the server if needed
                else:
                    self._proxy = _connect_keeper(self.address, self._authkey)
            return self._proxy

    def __reduce__(self) -> tuple[Any, ...]:
        # A custom authkey travels only to a process being started, as a
        # proxy's does.
        authkey = self._authkey if get_spawning_popen() is not None else None
        return _refs_for, (self.address, authkey)

    # StorageRefs
    def dumps(self, obj: Any, what: str) -> bytes:
        errors: list[Exception] = []

        def by_reference(value: Any) -> Any:
            try:
                if isinstance(value, SharedDict):
                    return self.reduce(value)
                if isinstance(value, BaseProxy):
                    _pin_proxy(value)
            except Exception as exc:
                errors.append(exc)
                raise
            return NotImplemented

        try:
            return pickle_code(obj, reduce=by_reference)
        except Exception:  # noqa: BLE001 - the usual message next
            if errors:  # pinning failed: the server is gone, ...
                raise errors[0] from None
        return dumps(obj, what=what)  # raises, with the usual message

    def reduce(self, d: SharedDict) -> tuple:
        """Pin *d* in the keeper; what to pickle instead of it."""
        d._check_open()
        if _in_server(self.address):
            ref = _keeper().pin(os.getpid(), d._fd)
        else:
            ref = self.keeper().pin(os.getpid(), d._fd)
        return _resolve, (self.address, ref)

    def adopt(self, d: SharedDict) -> None:
        if self._manager is not None and self._pid == os.getpid():
            self._manager._adopt(d)


def _connect_keeper(address: Any, authkey: bytes | None) -> _KeeperProxy:
    """A proxy to the keeper of the server at *address*, from a process
    other than the manager's."""
    if address is None:
        raise ProcessError(
            "this manager dict cannot hold shared objects here: its manager listens on an "
            "address chosen when its server starts, and it had not started when this process "
            "got the dict; call manager.start() before handing the dict to other processes"
        )
    authkey = authkey or current_process().authkey
    try:
        conn = listener_client["pickle"][1](address, authkey=authkey)
    except OSError as exc:
        raise ProcessError(
            f"cannot reach the manager's server at {address!r} ({exc}): it has shut down, or it "
            "had not started when this process stored a shared object in one of its dicts; "
            "call manager.start() before starting processes that do"
        ) from exc
    try:
        ident, _ = dispatch(conn, None, "create", ("_shoal_keeper",))
    finally:
        conn.close()
    return _KeeperProxy(Token("_shoal_keeper", address, ident), "pickle", authkey=authkey, incref=False)


# The _Refs of each server address known in this process, while a dict uses it.
_REFS: weakref.WeakValueDictionary[Any, _Refs] = weakref.WeakValueDictionary()
_REFS_LOCK = threading.Lock()


def _refs_for(address: Any, authkey: bytes | None = None) -> _Refs:
    with _REFS_LOCK:
        refs = _REFS.get(address)
        if refs is None:
            refs = _Refs(address, authkey=authkey)
            if address is not None:
                _REFS[address] = refs
        return refs


# Nested dicts opened in this process, while they are in use.
_RESOLVED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def _resolve(address: Any, ref: int) -> _ManagerDict:
    key = (address, ref)
    d = _RESOLVED.get(key)
    if d is not None and not d.closed:
        return d
    refs = _refs_for(address)
    if _in_server(address):
        fd = os.dup(_keeper().where(ref)[1])
    else:
        pid, n = refs.keeper().where(ref)
        fd = os.open(f"/proc/{pid}/fd/{n}", os.O_RDWR | os.O_CLOEXEC)
    d = _ManagerDict._from_fd(fd)
    d._refs = refs
    _RESOLVED[key] = d
    refs.adopt(d)
    return d


def _pin_proxy(proxy: BaseProxy) -> None:
    """One more reference in the proxy's server: the object outlives the
    proxy that stored it (released at the manager's shutdown)."""
    token = proxy._token  # type: ignore[attr-defined]  # not in typeshed
    conn = proxy._Client(token.address, authkey=proxy._authkey)  # type: ignore[attr-defined]  # not in typeshed
    try:
        dispatch(conn, None, "incref", (token.id,))
    finally:
        conn.close()


class _Registry(dict):
    """The types a manager's server makes, on their way to its process:
    pickled by shoal's policy for code, so a class of a notebook or of a
    program read from stdin reaches a spawned server (the standard library
    pickles them by name, which such a server cannot find)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return pickle.loads, (pickle_code(dict(self)),)


# -- the manager's dict ----------------------------------------------------------


class _ManagerDict(SharedDict):
    """A SharedDict that holds shared objects by reference (see the module
    docstring) and whose iteration fails when its size changes, as a dict's."""

    __slots__ = ("_refs",)
    _refs: _Refs

    def __reduce__(self) -> tuple[Any, ...]:
        if collecting() or get_spawning_popen() is not None:
            _, (rebuild, args) = SharedDict.__reduce__(self)  # the descriptor travels
            return _rebuild_manager_dict, (rebuild, args, self._refs)
        # A manager connection, a multiprocessing queue, pickle.dumps: by reference.
        return self._refs.reduce(self)

    def __iter__(self) -> Iterator[Any]:
        return _checked(self, SharedDict.__iter__(self))

    # Lists, as the standard library's DictProxy returns: changing the dict
    # while looping over d.keys() / d.items() is fine there (only iter(d)
    # follows the live dict), and d.keys()[0] works.
    def keys(self) -> list:  # type: ignore[override]
        return list(SharedDict.__iter__(self))

    def values(self) -> list:  # type: ignore[override]
        return list(SharedDict.values(self))

    def items(self) -> list:  # type: ignore[override]
        return list(SharedDict.items(self))

    def fromkeys(self, iterable: Any, value: Any = None, /) -> dict:
        """A new plain dict with the keys of *iterable*, each set to *value*
        (Python 3.14's ``DictProxy.fromkeys``, on every Python)."""
        return dict.fromkeys(iterable, value)


def _checked(d: SharedDict, it: Iterator[Any]) -> Iterator[Any]:
    """Iterate a snapshot of *d*, raising as a dict does if d's size
    changes from now on."""
    return _checking(d, len(d), it)


def _checking(d: SharedDict, n: int, it: Iterator[Any]) -> Iterator[Any]:
    for x in it:
        if len(d) != n:
            raise RuntimeError("dictionary changed size during iteration")
        yield x
    if len(d) != n:  # a dict checks before it stops, too
        raise RuntimeError("dictionary changed size during iteration")


def _rebuild_manager_dict(rebuild: Callable[..., int], args: tuple, refs: _Refs) -> _ManagerDict:
    d = _ManagerDict._from_fd(rebuild(*args))
    d._refs = refs
    return d


class Manager:
    """A manager of shared objects: ``with Manager() as m: d = m.dict()``.

    Same signature and methods as ``multiprocessing.Manager()``'s
    ``SyncManager``: ``dict``, ``list``, ``Namespace``, ``Value``, ``Array``,
    ``Lock``, ``RLock``, ``Semaphore``, ``BoundedSemaphore``, ``Event``,
    ``Condition``, ``Barrier``, ``Queue``, ``JoinableQueue``, ``Pool``,
    ``register``, ``start``, ``shutdown``, ``join``, ``address``, context
    manager.
    """

    # typeid -> (callable, exposed, method_to_typeid, proxytype), as
    # BaseManager._registry; register() copies it per class.
    _registry: dict[str, tuple] = dict(_SyncManager._registry)  # type: ignore[attr-defined]  # not in typeshed

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
        if address is None:  # fixed now: processes given a dict find the server by it
            self._options["address"] = arbitrary_address(default_family)
        refs = self._refs = _Refs(self._fixed_address(), self, None if authkey is None else bytes(authkey))
        if refs.address is not None:
            with _REFS_LOCK:
                _REFS.setdefault(refs.address, refs)
        self._keeper_proxy: _KeeperProxy | None = None

    # -- dict: shared memory --

    def dict(self, *args: Any, **kwargs: Any) -> SharedDict:
        """A :class:`~shoal.SharedDict` initialised like ``dict(*args, **kwargs)``,
        which also holds shared objects (manager dicts and proxies) by reference."""
        self._check_running()
        # The server runs from the first dict on, as the standard library's
        # runs from Manager(): a process the dict is handed to (by fork,
        # where nothing is pickled) may store a shared object in it, and
        # that needs the keeper.  The dict's own operations never use it.
        self._sync()
        d = _ManagerDict()
        d._refs = self._refs
        self._adopt(d)
        d.update(*args, **kwargs)
        return d

    def _adopt(self, d: SharedDict) -> None:
        """Close *d* (this process's handle) at shutdown."""
        with self._mutex:
            self._dicts = [r for r in self._dicts if r() is not None]
            self._dicts.append(weakref.ref(d))

    def _fixed_address(self) -> Any:
        """The server's address if known before it starts, else None (an
        AF_INET address with port 0)."""
        address = self._options["address"]
        return None if isinstance(address, tuple) and address[1] == 0 else address

    def _keeper(self) -> _KeeperProxy:
        server = self._sync()
        with self._mutex:
            if self._keeper_proxy is None:
                self._keeper_proxy = server._shoal_keeper()  # type: ignore[attr-defined]  # registered above
                if self._refs.address is None:  # an AF_INET port picked at start
                    self._refs.address = server.address
                    with _REFS_LOCK:
                        _REFS.setdefault(server.address, self._refs)
            return self._keeper_proxy

    # -- everything else: the standard library's server --

    def _new_server(self) -> SyncManager:
        server = _SyncManager(**self._options)
        # This class's registered types, and those registered on the standard
        # library's SyncManager (which multiprocessing.Manager() serves).
        server._registry = _Registry({**SyncManager._registry, **type(self)._registry})  # type: ignore[attr-defined]  # not in typeshed
        return server

    def __getattr__(self, name: str) -> Any:
        # SyncManager.register("Foo", Foo) then Manager().Foo() works with the
        # standard library, whose Manager() is a SyncManager.
        if not name.startswith("_") and name in SyncManager._registry and name not in type(self)._registry:  # type: ignore[attr-defined]  # not in typeshed
            create = SyncManager.__dict__.get(name)
            if create is not None:
                return _delegate(name, create).__get__(self)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def _sync(self) -> SyncManager:
        with self._mutex:
            self._check_running()
            if self._server is None:
                server = self._new_server()
                with starting_process():
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
            server = self._new_server()
            with starting_process():  # a program read from stdin: its server is not to run "<stdin>"
                server.start(initializer, initargs)
            self._server = server

    def shutdown(self) -> None:
        """Stop the server process (if it started) and close the dicts made
        or opened here (in this process).  Idempotent."""
        with self._mutex:
            self._shut_down = True
            server, self._server = self._server, None
            dicts, self._dicts = self._dicts, []
            self._keeper_proxy = self._refs._proxy = None
        for ref in dicts:
            d = ref()
            if d is not None:
                d.close()
        with _REFS_LOCK:
            if _REFS.get(self._refs.address) is self._refs:
                del _REFS[self._refs.address]
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
            "shoal.managers.BaseManager.connect (the standard library's)"
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
        the server process.  Registers on *cls* (and its subclasses) only."""
        BaseManager.register.__func__(  # type: ignore[attr-defined]  # a classmethod's function
            cls, typeid, callable, proxytype, exposed, method_to_typeid, create_method
        )
        if create_method:  # BaseManager's method, run on the server object
            setattr(cls, typeid, _delegate(typeid, cls.__dict__[typeid]))


def _delegate(typeid: str, create: Any = None) -> Callable[..., Any]:
    def method(self: Manager, /, *args: Any, **kwargs: Any) -> Any:
        server = self._sync()
        return create(server, *args, **kwargs) if create else getattr(server, typeid)(*args, **kwargs)

    method.__name__ = method.__qualname__ = typeid
    method.__doc__ = (
        f"A proxy to a new shared {typeid} in the manager's server process (as SyncManager.{typeid})."
    )
    return method


for _typeid in (
    "Array", "Barrier", "BoundedSemaphore", "Condition", "Event", "JoinableQueue", "Lock",
    "Namespace", "Pool", "Queue", "RLock", "Semaphore", "Value", "list",
):  # fmt: skip
    setattr(Manager, _typeid, _delegate(_typeid))
del _typeid

public(Manager)
