"""The handle: ``shoal.Actor``, what the creator starts and what any
process calls through (see the package's docstring for the data flow).

A handle holds the actor's address, pid, class name and method names; it
pickles as those, and the first call in another process connects
(:func:`~._client.client_for`).  The creator's handle also holds the
``_Owner``: the actor's process, which ``close()`` and ``terminate()`` end.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import pickle
import secrets
import socket
import threading
import types
import weakref
from collections.abc import Callable, Iterable
from typing import Any

from .._engine import engine_descriptors, start_process
from .._fd import exhausted
from .._ipc import SNDBUF, socketpair
from .._serialization import pickle_code, starting_process
from .._util import public
from ..exceptions import SerializationError
from . import _protocol
from ._client import (
    _Call,
    _Client,
    _client_for,
    _ensure_exit_hook,
    _Owner,
    _owners,
    _stop,
    _stop_in_background,
    register_client,
)
from ._protocol import EXIT_TIMEOUT
from ._server import _actor_main

__all__ = ("Actor",)


class _Constructor:
    """``cls(*args, **kwargs)`` on its way to the actor process: pickled by
    shoal's policy for code (a class the actor process cannot import, as in
    a notebook under spawn, travels by value), inside the standard library's
    process pickling (so descriptors inside the arguments reach the child)."""

    def __init__(self, cls: Callable[..., Any], args: tuple, kwargs: dict) -> None:
        self.spec = (cls, args, kwargs)

    def __reduce__(self) -> tuple[Any, ...]:
        return _load_constructor, (pickle_code(self.spec),)

    def build(self) -> Any:
        cls, args, kwargs = self.spec
        return cls(*args, **kwargs)


def _load_constructor(data: bytes) -> _Constructor:
    return _Constructor(*pickle.loads(data))


# -- the handle -------------------------------------------------------------------


class _Control:
    """One of the handle's own controls (``close``, ``terminate``, ``pid``),
    which gives way to a method of the actor's object of the same name.

    A class with its own ``close()`` (a file, a connection) is common and
    must stay usable through its handle, so on a handle whose object has a
    method of this name the attribute is that method (``__getattr__`` puts
    it in the handle's ``__dict__``, which wins over this non-data
    descriptor).  On the class it is the control itself, a function of the
    handle, which never collides: ``shoal.Actor.close(handle)``,
    ``shoal.Actor.pid(handle)``.  ``value=True`` makes it read like a
    property on a handle (``handle.pid``).
    """

    def __init__(self, func: Callable[..., Any], value: bool = False) -> None:
        self.func = func
        self.value = value
        self.name = func.__name__
        self.__doc__ = func.__doc__

    def __get__(self, handle: Actor | None, owner: type | None = None) -> Any:
        if handle is None:
            return self.func
        if self.name in handle._methods:
            return handle.__getattr__(self.name)  # the object's method (then cached)
        if self.value:
            return self.func(handle)
        return types.MethodType(self.func, handle)


def _control(func: Callable[..., Any] | None = None, *, value: bool = False) -> Any:
    """Decorator: ``@_control`` or ``@_control(value=True)`` (see _Control)."""
    if func is None:
        return lambda f: _Control(f, value)
    return _Control(func, value)


#: What a handle may set on itself (everything else is refused: see Actor.__setattr__).
_HANDLE_STATE = frozenset(
    {"_address", "_pid", "_name", "_methods", "_client", "_owner", "_closed", "_finalizer"}
)


class Actor:
    """An object living in its own process; a handle to call its methods.

    ``Actor(cls, *args, **kwargs)`` starts a process, builds
    ``cls(*args, **kwargs)`` there and returns a handle.  For each public
    method of the object:

    * ``handle.method(*args, **kwargs)`` runs it in the actor and returns
      its result (an exception it raises is raised here, its original type,
      the remote traceback as ``__cause__``);
    * ``handle.method.submit(*args, **kwargs)`` returns a
      ``concurrent.futures.Future`` at once;
    * ``handle.method.send(*args, **kwargs)`` returns ``None`` at once and
      never reports the result (fire and forget; fastest).  An exception is
      printed to the actor's stderr.  The calls are queued briefly and sent
      in batches, in order with this process's other calls to the actor.

    Calls run one at a time, in the order each caller made them, so the
    object's state never races.  The handle pickles: pass it to pool tasks,
    ``Process`` targets, queues and other actors (under any start method).

    ``close()`` (or leaving a ``with`` block) in the creating process stops
    the actor after the calls made before it; ``terminate()`` kills it.  The
    actor also stops when the creator's handle is garbage collected and when
    the creating process exits.  Once it is gone, calls raise
    :class:`~shoal.exceptions.ActorDiedError`.  A method that calls
    ``sys.exit()`` fails that call with
    :class:`~shoal.exceptions.TaskExitError` (it cannot end the caller's
    program) and the actor goes on.

    The object's methods come first on the handle: when the object has a
    method named ``close``, ``terminate`` or ``pid`` (a file, a connection),
    ``handle.close()`` calls it, and the handle's own controls stay
    reachable through the class, which never collides:
    ``shoal.Actor.close(handle)``, ``shoal.Actor.terminate(handle)`` and
    ``shoal.Actor.pid(handle)``.  A handle has no attributes of its own to
    set: the object's attributes live in the actor (add a method that sets
    them).  ``dir(handle)`` lists the object's methods and the controls.
    """

    def __init__(self, cls: Callable[..., Any], /, *args: Any, **kwargs: Any) -> None:
        self._start(multiprocessing.get_context(), cls, args, kwargs)

    @classmethod
    def _in_context(cls, ctx: Any, target: Callable[..., Any], args: tuple, kwargs: dict) -> Actor:
        """``Context.Actor``: an actor started with *ctx*'s start method."""
        self = cls.__new__(cls)
        self._start(ctx, target, args, kwargs)
        return self

    def _start(self, ctx: Any, target: Callable[..., Any], args: tuple, kwargs: dict) -> None:
        if not callable(target):
            raise TypeError(f"Actor() takes a class (or a callable returning the object), got {target!r:.60}")
        name = getattr(target, "__qualname__", type(target).__qualname__)
        address = f"\0shoal-actor-{os.getpid()}-{secrets.token_hex(8)}"
        try:
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except OSError as exc:
            raise exhausted(exc, f"start the {name} actor") from exc
        try:
            mine, theirs = socketpair(SNDBUF)
        except OSError as exc:
            listener.close()
            raise exhausted(exc, f"start the {name} actor") from exc
        try:
            listener.bind(address)
            listener.listen(128)
            # PR_SET_PDEATHSIG fires when the *thread* that started the child
            # exits: only from the main thread, and only when we are its parent.
            pdeathsig = (
                ctx.get_start_method() != "forkserver"
                and threading.current_thread() is threading.main_thread()
            )
            # Under fork the child inherits our descriptors: our end of its
            # connection and the pool engines' must not stay open in it.
            inherited = (mine.fileno(), *_inherited_descriptors()) if ctx.get_start_method() == "fork" else ()
            proc = ctx.Process(
                target=_actor_main,
                args=(
                    listener,
                    theirs,
                    _Constructor(target, args, kwargs),
                    os.getpid(),
                    pdeathsig,
                    name,
                    inherited,
                ),
                name=f"shoal-actor-{name}",
                daemon=False,
            )
            try:
                with starting_process():
                    start_process(proc, f"start the {name} actor's process")
            except (pickle.PicklingError, TypeError, AttributeError) as exc:
                raise SerializationError(
                    f"cannot send the class or constructor arguments of the {name} actor "
                    f"to its process: {exc}"
                ) from exc
        except BaseException:
            mine.close()
            raise
        finally:
            listener.close()
            theirs.close()
        client = _Client(address, mine, proc.pid, name, proc)
        hello = _Call(None)
        client.pending[0] = hello  # the actor answers its construction with cid 0
        try:
            methods = client.wait(hello)
        except BaseException as exc:
            # The constructor raised or the process died: it exits by itself.
            # Interrupted (Ctrl-C) while it still builds the object: kill it now.
            proc.join(0 if isinstance(exc, KeyboardInterrupt) else EXIT_TIMEOUT)
            if proc.exitcode is None:
                proc.kill()
                proc.join()
            client.close()
            proc.close()
            raise
        owner = _Owner(proc, client)
        _owners.add(owner)
        _ensure_exit_hook()
        register_client(address, client)
        self._init(address, proc.pid, name, tuple(methods), client, owner)
        self._finalizer = weakref.finalize(self, _stop_in_background, owner)

    def _init(
        self,
        address: str,
        pid: int,
        name: str,
        methods: Iterable[str],
        client: _Client | None,
        owner: _Owner | None,
    ) -> None:
        self._address = address
        self._pid = pid
        self._name = name
        self._methods = frozenset(methods)
        self._client = client
        self._owner = owner
        self._closed = False

    def __getattr__(self, name: str) -> _Method:
        """``handle.method``: a callable that runs that method in the actor."""
        if name.startswith("_"):
            raise AttributeError(name)
        if name not in self.__dict__.get("_methods", ()):
            raise AttributeError(
                f"the {self.__dict__.get('_name', '?')} actor has no method {name!r}; its methods are: "
                f"{', '.join(sorted(self.__dict__.get('_methods', ()))) or 'none'} (attributes are not "
                "reachable through a handle: add a method that returns them)"
            )
        method = _Method(self, name)
        # Found in the instance dict from now on, before the class (and its
        # non-data _Control descriptors): one dict lookup per later call.
        self.__dict__[name] = method
        return method

    def _get_client(self) -> _Client:
        client = self._client
        # (A forked child's inherited clients have no socket: see _forget_clients_after_fork.)
        if client is None or client.sock is None:
            if self._closed:
                owner = self._owner
                if owner is not None and owner.pid == os.getpid():
                    raise owner.client.died()  # the creator closed it: the actor is gone
                raise ValueError(f"this handle to the {self._name} actor was closed")
            client = self._client = _client_for(self._address, self._pid, self._name)
        return client

    def _call(self, name: str, args: tuple, kwargs: dict, what: str) -> Any:
        if _protocol.serving_address == self._address:
            raise RuntimeError(
                f"the {self._name} actor called one of its own methods through a handle and would wait for "
                "itself forever: call the method directly (self.method()), or use .send()/.submit()"
            )
        if self._address in _protocol.waiting:
            raise RuntimeError(
                f"this call to the {self._name} actor would wait forever: the {self._name} actor is itself "
                "waiting for the call that led here (actors calling each other in a cycle). Use .send() for "
                "one of the calls, or return a value instead of calling back"
            )
        return self._get_client().call(name, args, kwargs, what)

    # -- life cycle: the handle's own controls (see _Control) --
    @_control(value=True)
    def pid(self) -> int:
        """The actor's process id: ``handle.pid``, or ``shoal.Actor.pid(handle)``
        when the object has a method named ``pid``."""
        return self._pid

    @_control
    def close(self) -> None:
        """In the creating process: stop the actor once the calls made before
        this one have run, and wait for it to exit.  In any other process:
        send the calls this process queued with ``.send()`` and stop using
        this handle (the actor goes on).  Idempotent.

        ``shoal.Actor.close(handle)`` when the object has a method named
        ``close`` (``handle.close()`` calls that method)."""
        owner = self._owner
        if owner is not None and owner.pid == os.getpid():
            self._closed = True
            _stop(owner)
            return
        self._closed = True
        client, self._client = self._client, None
        if client is not None and client.pid == os.getpid():
            client.flush()

    @_control
    def terminate(self) -> None:
        """In the creating process: kill the actor now (SIGKILL).  Pending
        calls raise :class:`~shoal.exceptions.ActorDiedError`.

        ``shoal.Actor.terminate(handle)`` when the object has a method named
        ``terminate``."""
        owner = self._owner
        if owner is None or owner.pid != os.getpid():
            raise ValueError("only the process that created an actor can terminate it")
        self._closed = True
        _stop(owner, kill=True)

    def __enter__(self) -> Actor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        Actor.close(self)  # the handle's own, whatever the object's methods are called

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _HANDLE_STATE:
            object.__setattr__(self, name, value)
            return
        raise AttributeError(
            f"cannot set {name!r} on a handle to the {self.__dict__.get('_name', '?')} actor: the object's "
            "attributes live in the actor's process, and a handle only calls its methods. Add a method "
            f"that sets it (def set_{name.lstrip('_')}(self, value): self.{name} = value) and call it "
            f"through the handle (handle.set_{name.lstrip('_')}(value))"
        )

    def __delattr__(self, name: str) -> None:
        raise AttributeError(
            f"cannot delete {name!r} from a handle to the {self.__dict__.get('_name', '?')} actor: the "
            "object's attributes live in the actor's process, and a handle only calls its methods. Add a "
            f"method that deletes it (del self.{name}) and call it through the handle"
        )

    def __dir__(self) -> list[str]:
        # The object's methods (for tab completion) and the handle's own
        # public controls; not the handle's private state.
        names = {name for name in object.__dir__(self) if not name.startswith("_") or name.startswith("__")}
        return sorted(names | self._methods)

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild_handle, (self._address, self._pid, self._name, tuple(sorted(self._methods)))

    def __repr__(self) -> str:
        return f"<shoal.Actor {self._name} pid={self._pid}>"


public(Actor)


def _rebuild_handle(address: str, pid: int, name: str, methods: Iterable[str]) -> Actor:
    handle = Actor.__new__(Actor)
    handle._init(address, pid, name, methods, None, None)
    return handle


class _Method:
    """``handle.name``: call it, ``.submit()`` it or ``.send()`` it."""

    __slots__ = ("_handle", "_name", "_what")

    def __init__(self, handle: Actor, name: str) -> None:
        self._handle = handle
        self._name = name
        self._what = f"the arguments of {handle._name}.{name}()"  # for errors; made once

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the method in the actor and return its result."""
        return self._handle._call(self._name, args, kwargs, self._what)

    def submit(self, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        """Run the method in the actor; return a ``concurrent.futures.Future`` at once."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        future.set_running_or_notify_cancel()  # sent at once: it cannot be cancelled
        self._handle._get_client().request(self._name, args, kwargs, future, self._what)
        return future

    def send(self, *args: Any, **kwargs: Any) -> None:
        """Run the method in the actor without waiting and without a result."""
        client = self._handle._client
        if client is None or client.sock is None:  # (_get_client's test, inlined: send() is a hot path)
            client = self._handle._get_client()
        client.post(self._name, args, kwargs, self._what)

    def __repr__(self) -> str:
        return f"<method {self._name} of {self._handle!r}>"


def _inherited_descriptors() -> list[int]:
    return engine_descriptors()
