"""``shoal.Actor``: one object living in its own process; calls from any
number of processes run there one at a time.

Data flow::

    caller processes (any number)                     actor process (one thread)
    -----------------------------                     --------------------------
    handle.incr(1)                                    epoll over: the listening
      _Client (one per process and actor):              socket, every caller's
      flush this process's queued send()s,              connection, the creator's pidfd
      then CALL(cid, "incr", args) ────────────────►  accept → a new caller connection
      one waiting thread reads the replies            CALL → getattr(obj, name)(*args),
      for all (leader/follower); the others                  one call at a time; each
      wait on a condition          ◄────────────────         caller's in arrival order
                                   REPLY(cid, ok, value)     reply on that connection
    handle.incr.submit(1) -> Future
      the same request; a reader thread
      (alive while Futures are pending)
      sets the Future from the reply
    handle.incr.send(1) -> None
      pickled now, queued in the outbox; sent     SEND [calls] → each in order, no
      as one SEND per SEND_BATCH calls, with        reply; an exception is printed to
      this process's next waiting call, or by       the actor's stderr (nobody waits)
      a flusher thread within about a millisecond
    close() in the creator ── STOP ────────────────►  answers what came before, exits

Connections.  The creator binds a listening ``AF_UNIX`` ``SOCK_SEQPACKET``
socket at a random abstract address (no file to leak) and makes a socket pair
for its own connection; the actor process gets both.  A handle pickles as
the address (with the actor's pid, class name and method names), so the first
call from another process connects to it: handles work in pool tasks,
``Process`` targets, queues and other actors, under fork, forkserver and
spawn.  Each message is one datagram of shoal's packet layer (large payloads
and numpy buffers travel in memfds).  Arguments and results are pickled
inside a small outer message naming the call, so a value that cannot be
unpickled at the other end fails that call alone, never leaves it waiting.

Ownership.  The actor process alone owns the object and the server ends of
the sockets.  Each caller process owns one ``_Client`` per actor (shared by
its handles, found by address; a forked child starts without any).  The
creator's handle also owns the actor's ``Process``.

How it ends:

* A method raises: the caller gets the exception, its original type, with
  the remote traceback as ``__cause__``; the actor goes on.
* The actor process dies (SIGKILL, os._exit, a segfault): the kernel closes
  its sockets, so every caller's pending call, and every later one, raises
  :class:`~shoal.exceptions.ActorDiedError` (end of stream on the connection,
  or a refused connect).
* ``close()`` in the creator (also the ``with`` block, the creator's handle
  being garbage collected, and the creator exiting normally): STOP is queued
  behind the creator's earlier calls; the actor answers everything it read
  before it and exits; the creator joins it.  ``terminate()`` kills it.
* The creator dies without closing: the actor watches it (a pidfd in its
  epoll set, and ``PR_SET_PDEATHSIG`` when the creator started it from its
  main thread, else a watchdog thread, so a busy actor dies too) and exits.
* Actors wait on each other in a cycle (A's method calls B, whose method
  calls A): each waiting call carries the addresses of the actors waiting
  for it, and the call that would close the cycle raises RuntimeError.
* A caller process dies: its connection closes and the actor drops it.
* A peer (of the same user: no other is served) sends a request that is
  not a shoal caller's (a malformed datagram, a message of unknown kind or
  shape, STOP from another connection than the creator's): the actor tells
  it why, as text, drops that connection and goes on serving the others.
  A reply that is not a shoal actor's fails this process's calls to it with
  :class:`~shoal.exceptions.CorruptDataError` and closes the connection.
"""

from __future__ import annotations

import concurrent.futures
import errno
import inspect
import itertools
import multiprocessing
import multiprocessing.util
import os
import pickle
import secrets
import select
import socket
import struct
import sys
import threading
import time
import traceback
import types
import weakref
from typing import Any

from ._engine import engine_descriptors, start_process
from ._engine import set_pdeathsig as _set_pdeathsig
from ._fd import exhausted
from ._future import settle_future as _settle
from ._ipc import BYTES, SNDBUF, close_fds, encode, recv_packet, refuse_connection, send_packet, socketpair
from ._serialization import loads_with, pack_exception, pickle_code, starting_process, unpack_exception
from .exceptions import ActorDiedError, CorruptDataError, SerializationError, corrupt_data, describe_exitcode

__all__ = ("Actor",)

# Requests (caller -> actor), as outer pickles:
CALL = 0  # (CALL, cid, name, blob[, chain]): blob = the pickled (args, kwargs);
#          chain = the addresses of the actors waiting for this call (see _waiting)
SEND = 1  # (SEND, [(name, blob, number of descriptors), ...]): no replies
STOP = 2  # (STOP,)
# Replies (actor -> caller): (cid, ok, blob); cid 0 answers the creation.

#: send() calls queued before they go as one message.
SEND_BATCH = 512
#: Descriptors (large buffers) queued send() calls may hold before a flush.
SEND_MAX_FDS = 128
#: How long the flusher thread lets send() calls pile up.
FLUSH_DELAY = 0.0005
#: Seconds a closing creator waits for the actor at interpreter exit (or
#: after its handle was garbage collected) before killing it.
EXIT_TIMEOUT = 5.0

_DONTWAIT = int(socket.MSG_DONTWAIT)
_CREDS = struct.Struct("3i")

#: In an actor process, its own address (to refuse a call that would wait on itself).
_serving_address: str | None = None
#: In an actor process: the addresses of the actors whose waiting calls led to
#: the call it runs now, its own last.  Sent with its waiting calls, so a call
#: that would close a cycle (A waits on B, which calls A) raises, not hangs.
_waiting: tuple[str | None, ...] = ()


# -- the caller's side --------------------------------------------------------


class _Call:
    """One request waiting for its reply."""

    __slots__ = ("done", "future", "name", "ok", "value")

    def __init__(self, future: concurrent.futures.Future | None, name: str = "") -> None:
        self.future = future
        self.name = name  # the method's, for errors ("": the construction)
        self.done = False
        self.ok = False
        self.value: Any = None

    def result(self):
        value = self.value
        self.value = None
        if self.ok:
            return value
        raise value


class _Client:
    """This process's connection to one actor, shared by its handles."""

    def __init__(self, address: str, sock: socket.socket, actor_pid: int, name: str, proc=None) -> None:
        self.address = address
        self.pid = os.getpid()
        self.sock: socket.socket | None = sock
        self.actor_pid = actor_pid
        self.name = name
        self.proc = proc  # the creator's Process, for the exit code
        self.cond = threading.Condition(threading.Lock())  # pending, reading, futures, reader, dead
        self.send_lock = threading.Lock()  # the socket's send side and the outbox
        self.pending: dict[int, _Call] = {}
        self.ids = itertools.count(1)
        self.reading = False  # a thread is receiving replies
        self.reading_thread = 0  # which one
        self.futures = 0  # pending calls with a Future
        self.reader = False  # the reader thread runs
        self.dead: str | None = None  # why the actor is unreachable
        self.corrupt = False  # it is because the actor sent a reply that is not shoal's
        self.closing = False  # the creator stopped it on purpose
        self.outbox: list = []
        self.outbox_fds: list[int] = []
        self.flush_wanted = threading.Event()
        self.flusher: threading.Thread | None = None
        self.waiting = 0  # threads waiting on cond

    # -- sending --
    def request(self, name: str, args: tuple, kwargs: dict, future, what: str) -> _Call:
        if self.dead is not None:
            raise self.died()
        blob, fds = encode((args, kwargs or None), what)
        call = _Call(future, name)
        start_reader = False
        try:
            with self.send_lock:
                with self.cond:
                    if self.dead is not None:
                        raise self.died()
                    cid = next(self.ids)
                    self.pending[cid] = call
                    if future is not None:
                        self.futures += 1
                        if not self.reader:
                            self.reader = start_reader = True
                try:
                    if self.outbox:
                        self._flush_locked()
                    message: tuple[Any, ...] = (CALL, cid, name, blob)
                    if _waiting and future is None:  # an actor waits for this call
                        message = (*message, _waiting)
                    send_packet(self.sock, 0, pickle.dumps(message, 5), fds)  # type: ignore[arg-type]  # None only once closed, after dead is set
                except OSError as exc:
                    self._lost()
                    raise self.died() from exc
        finally:
            if fds:
                close_fds(fds)
        if start_reader:
            threading.Thread(
                target=self._reader_loop, name=f"shoal-actor-reader-{self.name}", daemon=True
            ).start()
        return call

    def post(self, name: str, args: tuple, kwargs: dict, what: str) -> None:
        """Queue a call whose result nobody waits for (see the module docstring)."""
        if self.dead is not None:
            raise self.died()
        blob, fds = encode((args, kwargs or None), what)
        with self.send_lock:
            self.outbox.append((name, blob, len(fds)))
            if fds:
                self.outbox_fds.extend(fds)
            if len(self.outbox) >= SEND_BATCH or len(self.outbox_fds) >= SEND_MAX_FDS:
                try:
                    self._flush_locked()
                except OSError as exc:
                    self._lost()
                    raise self.died() from exc
                return
            first = len(self.outbox) == 1
        if first:
            if self.flusher is None:
                _ensure_exit_hook()
                # It holds the client weakly: a process that drops its
                # handles closes the connection (and ends the thread).
                self.flusher = threading.Thread(
                    target=_flusher_loop,
                    args=(weakref.ref(self), self.flush_wanted),
                    name=f"shoal-actor-flusher-{self.name}",
                    daemon=True,
                )
                self.flusher.start()
            self.flush_wanted.set()

    def _flush_locked(self) -> None:
        """Send the outbox as one message (the caller holds send_lock)."""
        entries, fds = self.outbox, self.outbox_fds
        self.outbox, self.outbox_fds = [], []
        try:
            send_packet(self.sock, 0, pickle.dumps((SEND, entries), 5), fds)  # type: ignore[arg-type]  # None only once closed, after dead is set
        finally:
            close_fds(fds)

    def flush(self) -> None:
        with self.send_lock:
            if self.outbox and self.dead is None and self.sock is not None:
                try:
                    self._flush_locked()
                except OSError:
                    self._lost()

    def send_stop(self) -> None:
        with self.send_lock:
            sock = self.sock
            if sock is None:  # closed meanwhile: the actor is already stopping
                raise BrokenPipeError("the connection to the actor is closed")
            if self.outbox:
                self._flush_locked()
            send_packet(sock, 0, pickle.dumps((STOP,), 5))

    # -- receiving --
    def wait(self, call: _Call):
        """Wait for *call*'s reply, reading replies for every waiter while
        no other thread does."""
        cond = self.cond
        if self.reading and self.reading_thread == threading.get_ident():
            # A Future's done-callback, run by this thread while it reads
            # replies, made a waiting call: read on (nobody else may).
            while not call.done:
                self._read_one()
            return call.result()
        with cond:
            while not call.done:
                if not self.reading:
                    self.reading = True
                    self.reading_thread = threading.get_ident()
                    break
                self.waiting += 1
                try:
                    cond.wait()
                finally:
                    self.waiting -= 1
            else:
                return call.result()
        try:
            while not call.done:
                self._read_one()
        finally:
            with cond:
                self.reading = False
                if self.waiting:
                    cond.notify_all()
        return call.result()

    def _reader_loop(self) -> None:
        """Receive replies while Futures are pending (a waiting caller may
        take turns with it)."""
        cond = self.cond
        while True:
            with cond:
                while self.reading and self.futures and self.dead is None:
                    self.waiting += 1
                    try:
                        cond.wait()
                    finally:
                        self.waiting -= 1
                if not self.futures or self.dead is not None:
                    self.reader = False
                    return
                self.reading = True
                self.reading_thread = threading.get_ident()
            try:
                while True:
                    self._read_one()
                    with cond:
                        if not self.futures or self.dead is not None:
                            break
            finally:
                with cond:
                    self.reading = False
                    cond.notify_all()

    def _read_one(self) -> None:
        try:
            packet = recv_packet(self.sock)  # type: ignore[arg-type]  # None only once closed, after dead is set
        except CorruptDataError as exc:
            self._corrupt_reply(str(exc))
            return
        except (OSError, ValueError, AttributeError):  # the socket was closed under us
            packet = None
        if packet is None:
            self._lost()
            return
        kind, payload, fds = packet
        if kind & BYTES:  # the actor refused us (see _Server.accept): text, not a pickle
            close_fds(fds)
            self.dead = f"it refused this process: {bytes(payload[:1000]).decode(errors='replace')}"
            self._lost()
            return
        try:
            try:
                reply = pickle.loads(payload)
                cid, ok, blob = reply
                if type(cid) is not int or type(ok) is not bool or type(blob) is not bytes:
                    raise TypeError(f"not (int, bool, bytes): {tuple(type(x).__name__ for x in reply)}")
            except Exception as exc:  # noqa: BLE001 - garbage of any kind: not a reply of ours
                self._corrupt_reply(f"{type(exc).__name__}: {exc}")
                return
            if ok:
                try:
                    value = loads_with(blob, fds)
                except Exception as exc:  # noqa: BLE001 - fails this call only
                    ok = False
                    value = SerializationError(
                        f"the result of {self._called(cid)} could not be unpickled here: {exc!r}. Return "
                        "objects whose classes this process can import (plain data, or classes defined in "
                        "a module rather than in the actor's own code)"
                    )
            else:
                value = unpack_exception(blob, self._called(cid))
        finally:
            if fds:
                close_fds(fds)
        with self.cond:
            call = self.pending.pop(cid, None)
            if call is None:
                return
            if call.future is None:
                call.ok = ok
                call.value = value
                call.done = True
                if self.waiting:
                    self.cond.notify_all()
                return
            self.futures -= 1
        call.done = True
        _settle(call.future, ok, value)

    def _corrupt_reply(self, detail: str) -> None:
        """The actor sent something that is not a reply: no call can trust
        what comes on this connection any more."""
        with self.cond:
            if self.dead is None:
                self.corrupt = True
                self.dead = f"it sent a reply that is not a shoal actor's ({detail:.300})"
        self._lost()

    def _called(self, cid: int) -> str:
        """``Counter.incr()``: the call *cid* names, for an error about it."""
        call = self.pending.get(cid)  # one atomic read, no lock: a call gone meanwhile is named generally
        if call is None:
            return f"a call to the {self.name} actor"
        return f"{self.name}.{call.name}()" if call.name else f"{self.name}()"

    # -- the end --
    def _lost(self) -> None:
        """The actor's end closed: fail every pending call."""
        reason = self._how_it_ended()
        with self.cond:
            if self.dead is None:
                self.dead = reason
            calls = list(self.pending.values())
            self.pending.clear()
            self.futures = 0
            for call in calls:
                if call.future is None:
                    call.ok = False
                    call.value = self.died()
                    call.done = True
            self.cond.notify_all()
        self.flush_wanted.set()  # lets the flusher thread end
        for call in calls:
            if call.future is not None:
                call.done = True
                _settle(call.future, False, self.died())

    def _how_it_ended(self) -> str:
        if self.closing:
            return "it was closed"
        proc = self.proc
        if proc is not None:
            try:
                proc.join(1.0)
                if proc.exitcode is not None:
                    return f"its process exited with {describe_exitcode(proc.exitcode)}"
            except (ValueError, AssertionError):
                pass
        return "its process exited or was killed"

    def died(self) -> ActorDiedError | CorruptDataError:
        """A new exception for one failed call (never one instance shared by
        several callers: its traceback would collect all their frames)."""
        if self.corrupt:
            return corrupt_data(
                f"the {self.name} actor (process {self.actor_pid}) {self.dead}; this process's connection to "
                "it is closed and its calls to it fail"
            )
        return ActorDiedError(
            f"the {self.name} actor (process {self.actor_pid}) is gone: {self.dead}. "
            "Its state is lost and calls "
            "to it fail; create a new Actor",
            self.actor_pid,
            self.proc.exitcode if self.proc is not None and self.dead != "it was closed" else None,
        )

    def drain_and_close(self) -> None:
        """The actor has exited: hand out the replies still buffered, then
        close the connection."""
        cond = self.cond
        if self.reading and self.reading_thread == threading.get_ident():
            # A Future's done-callback, run by this thread while it reads
            # replies, closed the actor: read on (waiting for ourselves hung).
            while self.dead is None and self.sock is not None:
                self._read_one()
            self.close()
            return
        with cond:
            while self.reading:
                self.waiting += 1
                try:
                    cond.wait()
                finally:
                    self.waiting -= 1
            self.reading = True
            self.reading_thread = threading.get_ident()
        try:
            while self.dead is None and self.sock is not None:
                self._read_one()  # ends with end-of-stream: the actor is gone
        finally:
            with cond:
                self.reading = False
                cond.notify_all()
        self.close()

    def close(self) -> None:
        if self.dead is None:
            self.dead = "this process closed its connection to it"
            self._lost()
        with self.send_lock:
            sock, self.sock = self.sock, None
            close_fds(self.outbox_fds)
            self.outbox, self.outbox_fds = [], []
        if sock is not None:
            sock.close()
        self.flush_wanted.set()

    def __del__(self) -> None:
        wanted = getattr(self, "flush_wanted", None)
        if wanted is not None:
            wanted.set()  # ends the flusher thread
        sock = getattr(self, "sock", None)
        if sock is not None:
            self.sock = None
            try:
                sock.close()
            except Exception:  # noqa: BLE001 - interpreter shutdown
                pass

    def forget_after_fork(self) -> None:
        """In a forked child: drop this process's copy of the parent's connection."""
        self.dead = "this handle was inherited through fork"
        sock, self.sock = self.sock, None
        if sock is not None:
            sock.close()
        self.outbox_fds = []  # the parent's to close


def _flusher_loop(ref: weakref.ref[_Client], wanted: threading.Event) -> None:
    """A client's flusher thread: send queued send() calls a moment after the first."""
    while True:
        wanted.wait()
        time.sleep(FLUSH_DELAY)
        wanted.clear()
        client = ref()
        # Checked after the clear: close() sets the event to end us, and
        # a set that came during the sleep was just cleared.
        if client is None or client.sock is None or client.dead is not None:
            return
        client.flush()
        del client


# This process's clients by actor address.  Weak: a client lives as long as
# a handle uses it, and its connection closes with the last one.
_clients: weakref.WeakValueDictionary[str, _Client] = weakref.WeakValueDictionary()
_clients_lock = threading.Lock()


def refusal(peer_uid: int, actor_uid: int, actor_pid: int) -> str:
    """Why a process of *peer_uid* may not call an actor run by *actor_uid*."""
    return (
        f"the actor in process {actor_pid} runs as uid {actor_uid} and this process as uid {peer_uid}: "
        "an actor serves only processes of its own user (root's actors serve only root, and root "
        "cannot reach other users' actors), because every call is a pickle, which runs code as the "
        "actor's user. Create the actor in a process of the user that calls it"
    )


def _check_peer(sock: socket.socket, actor_pid: int) -> None:
    """Refuse to talk to an actor of another user: its replies are pickles,
    which would run its code as us (and ours would run as it)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDS.size)
    _pid, uid, _gid = _CREDS.unpack(creds)
    if uid != os.geteuid():
        raise PermissionError(errno.EACCES, refusal(os.geteuid(), uid, actor_pid))


def _client_for(address: str, actor_pid: int, name: str) -> _Client:
    with _clients_lock:
        client = _clients.get(address)
        if client is not None and client.pid == os.getpid() and client.sock is not None:
            return client
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
            sock.connect(address)
            _check_peer(sock, actor_pid)
        except PermissionError:
            sock.close()
            raise
        except OSError as exc:
            sock.close()
            raise ActorDiedError(
                f"the {name} actor (process {actor_pid}) is gone: it no longer accepts connections "
                f"({exc.strerror}). It was closed, it died, or the process that created it exited; "
                "its state is lost: create a new Actor",
                actor_pid,
            ) from None
        client = _Client(address, sock, actor_pid, name)
        _clients[address] = client
        return client


def _forget_clients_after_fork() -> None:
    global _clients_lock
    _clients_lock = threading.Lock()
    for client in list(_clients.values()):
        client.forget_after_fork()
    _clients.clear()


os.register_at_fork(after_in_child=_forget_clients_after_fork)


# -- the creator's side ---------------------------------------------------------


class _Owner:
    """What the creator holds: the actor's process and its own connection."""

    __slots__ = ("__weakref__", "client", "lock", "pid", "proc", "stopped")

    def __init__(self, proc, client: _Client) -> None:
        self.proc = proc
        self.client = client
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.stopped = False


_owners: set[_Owner] = set()


def _stop(owner: _Owner, kill: bool = False, timeout: float | None = None) -> None:
    """Stop the actor: STOP behind the creator's earlier calls (or SIGKILL),
    wait for it to exit (killing it after *timeout*), then close."""
    if owner.pid != os.getpid():
        return  # a forked child inherited the handle: the actor is not its to stop
    with owner.lock:
        if owner.stopped:
            return
        owner.stopped = True
        client = owner.client
        proc = owner.proc
        client.closing = True
        try:
            if kill:
                proc.kill()
            else:
                try:
                    client.send_stop()
                except OSError:
                    pass  # already gone
            proc.join(timeout)
            if proc.exitcode is None:
                proc.kill()
                proc.join()
        except BaseException:
            # Interrupted (Ctrl-C in close()) before the actor ended: a later
            # terminate(), close() or the exit hook must still be able to end it.
            owner.stopped = False
            raise
        client.drain_and_close()
        proc.close()
        _owners.discard(owner)


def _stop_in_background(owner: _Owner) -> None:
    # A garbage-collection finalizer must not wait: it may run while its
    # thread holds a lock the stopping needs.
    if owner.pid == os.getpid() and not owner.stopped:
        threading.Thread(target=_stop, args=(owner, False, EXIT_TIMEOUT), daemon=True).start()


_exit_hook_pid = 0


def _ensure_exit_hook() -> None:
    """Register, once per process, what runs at its normal exit: flush the
    queued send() calls and stop the actors it created.  A multiprocessing
    finalizer (not atexit) so it also runs in pool workers and Process
    children, and before multiprocessing joins the child processes."""
    global _exit_hook_pid
    if _exit_hook_pid != os.getpid():
        _exit_hook_pid = os.getpid()
        multiprocessing.util.Finalize(None, _at_exit, exitpriority=100)


def _at_exit() -> None:
    for client in list(_clients.values()):
        if client.pid == os.getpid():
            client.flush()
    for owner in list(_owners):
        try:
            _stop(owner, timeout=EXIT_TIMEOUT)
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


class _Constructor:
    """``cls(*args, **kwargs)`` on its way to the actor process: pickled by
    shoal's policy for code (a class the actor process cannot import, as in
    a notebook under spawn, travels by value), inside the standard library's
    process pickling (so descriptors inside the arguments reach the child)."""

    def __init__(self, cls, args, kwargs) -> None:
        self.spec = (cls, args, kwargs)

    def __reduce__(self):
        return _load_constructor, (pickle_code(self.spec),)

    def build(self):
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

    def __init__(self, func, value: bool = False) -> None:
        self.func = func
        self.value = value
        self.name = func.__name__
        self.__doc__ = func.__doc__

    def __get__(self, handle, owner=None):
        if handle is None:
            return self.func
        if self.name in handle._methods:
            return handle.__getattr__(self.name)  # the object's method (then cached)
        if self.value:
            return self.func(handle)
        return types.MethodType(self.func, handle)


def _control(func=None, *, value: bool = False):
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

    def __init__(self, cls, /, *args, **kwargs) -> None:
        self._start(multiprocessing.get_context(), cls, args, kwargs)

    @classmethod
    def _in_context(cls, ctx, target, args, kwargs) -> Actor:
        """``Context.Actor``: an actor started with *ctx*'s start method."""
        self = cls.__new__(cls)
        self._start(ctx, target, args, kwargs)
        return self

    def _start(self, ctx, target, args, kwargs) -> None:
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
        with _clients_lock:
            _clients[address] = client
        self._init(address, proc.pid, name, tuple(methods), client, owner)
        self._finalizer = weakref.finalize(self, _stop_in_background, owner)

    def _init(self, address, pid, name, methods, client, owner) -> None:
        self._address = address
        self._pid = pid
        self._name = name
        self._methods = frozenset(methods)
        self._client = client
        self._owner = owner
        self._closed = False

    def __getattr__(self, name: str):
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

    def _call(self, name: str, args: tuple, kwargs: dict, what: str):
        if _serving_address == self._address:
            raise RuntimeError(
                f"the {self._name} actor called one of its own methods through a handle and would wait for "
                "itself forever: call the method directly (self.method()), or use .send()/.submit()"
            )
        if self._address in _waiting:
            raise RuntimeError(
                f"this call to the {self._name} actor would wait forever: the {self._name} actor is itself "
                "waiting for the call that led here (actors calling each other in a cycle). Use .send() for "
                "one of the calls, or return a value instead of calling back"
            )
        client = self._get_client()
        return client.wait(client.request(name, args, kwargs, None, what))

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

    def __exit__(self, *exc_info) -> None:
        Actor.close(self)  # the handle's own, whatever the object's methods are called

    def __setattr__(self, name: str, value) -> None:
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

    def __reduce__(self):
        return _rebuild_handle, (self._address, self._pid, self._name, tuple(sorted(self._methods)))

    def __repr__(self) -> str:
        return f"<shoal.Actor {self._name} pid={self._pid}>"


Actor.__module__ = "shoal"


def _rebuild_handle(address, pid, name, methods) -> Actor:
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

    def __call__(self, *args, **kwargs):
        """Run the method in the actor and return its result."""
        return self._handle._call(self._name, args, kwargs, self._what)

    def submit(self, *args, **kwargs) -> concurrent.futures.Future:
        """Run the method in the actor; return a ``concurrent.futures.Future`` at once."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        future.set_running_or_notify_cancel()  # sent at once: it cannot be cancelled
        self._handle._get_client().request(self._name, args, kwargs, future, self._what)
        return future

    def send(self, *args, **kwargs) -> None:
        """Run the method in the actor without waiting and without a result."""
        self._handle._get_client().post(self._name, args, kwargs, self._what)

    def __repr__(self) -> str:
        return f"<method {self._name} of {self._handle!r}>"


def _inherited_descriptors() -> list[int]:
    return engine_descriptors()


# -- the actor process ------------------------------------------------------------


def _actor_main(listener, conn, constructor, creator_pid, pdeathsig, name, inherited) -> None:
    """Entry point of the actor process."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the creator's to handle
    for fd in inherited:  # under fork: descriptors that are not ours to keep
        try:
            os.close(fd)
        except OSError:
            pass
    if pdeathsig:
        _set_pdeathsig(creator_pid)
    try:
        watch: int | None = os.pidfd_open(creator_pid)
    except ProcessLookupError:
        return  # the creator is gone already
    except OSError:  # pragma: no cover - kernels before 5.3
        watch = None
    if watch is not None and not pdeathsig:
        # No PR_SET_PDEATHSIG (started by a thread, or by the forkserver):
        # the epoll loop sees the creator exit only between calls, so a long
        # call would outlive it.
        watchdog = threading.Thread(target=_die_with, args=(creator_pid,), daemon=True)
        watchdog.name = "shoal-actor-watchdog"
        watchdog.start()
    server = _Server(listener, conn, watch, name)
    try:
        server.run(constructor)
    finally:
        server.close()
        sys.stdout.flush()
        sys.stderr.flush()


def _die_with(creator_pid: int) -> None:
    """A thread of the actor process: SIGKILL it when its creator exits."""
    import signal

    try:
        fd = os.pidfd_open(creator_pid)
    except ProcessLookupError:
        fd = None  # gone already
    except OSError:  # pragma: no cover - kernels before 5.3
        return
    if fd is not None:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while not poller.poll():
            pass
    os.kill(os.getpid(), signal.SIGKILL)


class _Server:
    """The actor process's loop: one thread, one call at a time."""

    def __init__(self, listener: socket.socket, conn: socket.socket, watch: int | None, name: str) -> None:
        self.listener = listener
        self.watch = watch
        self.name = name
        self.conns: dict[int, socket.socket] = {conn.fileno(): conn}
        self.creator_conn = conn
        self.epoll = select.epoll()
        self.epoll.register(listener.fileno(), select.EPOLLIN)
        self.epoll.register(conn.fileno(), select.EPOLLIN)
        if watch is not None:
            self.epoll.register(watch, select.EPOLLIN)
        self.uid = os.geteuid()
        # A process a method starts by fork must not hold our sockets (their
        # callers would then never see us die).
        os.register_at_fork(after_in_child=self.close)

    def close(self) -> None:
        for sock in (self.listener, *self.conns.values()):
            sock.close()
        self.conns = {}
        if self.watch is not None:
            try:
                os.close(self.watch)
            except OSError:
                pass
            self.watch = None
        self.epoll.close()

    def run(self, constructor: _Constructor) -> None:
        global _serving_address, _waiting
        creator = self.creator_conn
        try:
            obj = constructor.build()
        except BaseException as exc:  # noqa: BLE001 - reported to the creator
            self.reply(creator, 0, False, exc)
            return
        del constructor
        _serving_address = self.listener.getsockname()
        if isinstance(_serving_address, bytes):
            _serving_address = _serving_address.decode()
        _waiting = (_serving_address,)
        if not self.reply(creator, 0, True, _public_methods(obj)):
            return
        self.name = type(obj).__qualname__
        poll = self.epoll.poll
        listener = self.listener.fileno()
        watch = self.watch
        conns = self.conns
        while True:
            # No spinning before the wait: measured on a busy 2-core VM, a
            # process polling for the next message slowed the round trip
            # as often as it sped it up, and burnt a CPU doing it.
            for fd, _mask in poll():
                sock = conns.get(fd)
                if sock is not None:
                    # One message per wake: every caller's requests take turns.
                    if not self.serve(sock, obj):
                        self.drop(sock)
                        if self.stopping:
                            return
                elif fd == listener:
                    self.accept()
                elif fd == watch:
                    return  # the creator exited: nobody may stop us any more

    stopping = False

    def accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except OSError:
            return
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDS.size)
            _pid, uid, _gid = _CREDS.unpack(creds)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
        except OSError:
            sock.close()
            return
        if uid != self.uid:
            # Another user's process (root's included, and any user's when we
            # run as root): every call is a pickle, so serving it would run
            # their code as us.  Say why, as text, never as a pickle.
            refuse_connection(sock, refusal(uid, self.uid, os.getpid()))
            return
        self.conns[sock.fileno()] = sock
        self.epoll.register(sock.fileno(), select.EPOLLIN)

    def drop(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        try:
            self.epoll.unregister(fd)
        except (KeyError, ValueError, OSError):
            pass
        self.conns.pop(fd, None)
        sock.close()

    def serve(self, sock: socket.socket, obj) -> bool:
        """Run the next request waiting on *sock*; False when the connection
        is finished with (closed, broken, or it asked us to stop)."""
        try:
            packet = recv_packet(sock, _DONTWAIT)
        except BlockingIOError:
            return True
        except CorruptDataError as exc:
            refuse_connection(sock, f"the {self.name} actor refused a request: {exc}", close=False)
            return False
        except OSError:
            return False
        if packet is None:
            return False
        _kind, payload, fds = packet
        try:
            try:
                message = pickle.loads(payload)
                op = _check_request(message, len(fds), sock is self.creator_conn)
            except Exception as exc:  # noqa: BLE001 - garbage of any kind: not a request of ours
                # Said as text (never a pickle), and this connection is done with.
                refuse_connection(
                    sock,
                    f"the {self.name} actor refused a request that is not a shoal caller's "
                    f"({type(exc).__name__}: {exc}); this connection is closed",
                    close=False,
                )
                return False
            if op == CALL:
                return self.call(sock, obj, message[1], message[2], message[3], fds, message[4:])
            if op == SEND:
                self.run_sends(obj, message[1], fds)
                return True
            self.stopping = True
            return False
        finally:
            if fds:
                close_fds(fds)

    def call(self, sock, obj, cid: int, name: str, blob: bytes, fds, chain: tuple) -> bool:
        global _waiting
        if chain:
            _waiting = (*chain[0], _serving_address)
        try:
            args, kwargs = loads_with(blob, fds)
            value = _method(obj, name)(*args, **(kwargs or {}))
            ok = True
        except BaseException as exc:  # noqa: BLE001 - the caller's to handle
            value = exc
            ok = False
        finally:
            if chain:
                _waiting = (_serving_address,)
        return self.reply(sock, cid, ok, value, name)

    def reply(self, sock, cid: int, ok: bool, value, method: str = "") -> bool:
        """Send the outcome of *method* (``""``: of the construction)."""
        fds: list[int] = []
        if ok:
            try:
                # (The construction's result, a list of names, always pickles.)
                blob, fds = encode(value, f"the result of {self.name}.{method}()")
            except Exception as exc:  # noqa: BLE001 - an unpicklable result fails this call only
                ok = False
                blob = pack_exception(exc, self.who(method))
        else:
            # A SystemExit (the method called sys.exit()) becomes a
            # TaskExitError there: it must not end the caller's program.
            blob = pack_exception(value, self.who(method))
        del value
        try:
            send_packet(sock, 0, pickle.dumps((cid, ok, blob), 5), fds)
        except OSError:
            return False  # the caller went away
        finally:
            if fds:
                close_fds(fds)
        return True

    def who(self, method: str) -> str:
        """``Counter.incr()`` (``Counter()``: the construction), for errors."""
        return f"{self.name}.{method}()" if method else f"{self.name}()"

    def run_sends(self, obj, entries, fds) -> None:
        pos = 0
        methods: dict[str, Any] = {}  # looked up once per message
        loads = pickle.loads
        for name, blob, nfds in entries:
            try:
                if nfds:
                    pos += nfds
                    args, kwargs = loads_with(blob, fds[pos - nfds : pos])
                else:
                    args, kwargs = loads(blob)
                method = methods.get(name)
                if method is None:
                    method = methods[name] = _method(obj, name)
                if kwargs:
                    method(*args, **kwargs)
                else:
                    method(*args)
            except BaseException:  # noqa: BLE001 - nobody waits for it: say so where it happened
                print(
                    f"shoal: {self.name}.{name}() called with .send() raised "
                    "(no caller waits for its result; "
                    "the actor goes on):",
                    file=sys.stderr,
                )
                traceback.print_exc()


def _check_request(message: Any, nfds: int, from_creator: bool) -> int:
    """The kind of a request, after checking that it has the shape a
    caller sends (see CALL, SEND, STOP) with *nfds* descriptors; raises
    (TypeError, ValueError) otherwise.  Only the creator's connection stops
    the actor."""
    if type(message) is not tuple or not message or type(message[0]) is not int:
        raise TypeError(f"a request is a tuple that starts with its kind, not {type(message).__name__}")
    op = message[0]
    if op == CALL:
        if len(message) not in (4, 5) or type(message[1]) is not int or type(message[2]) is not str:
            raise ValueError("a CALL is (CALL, call id, method name, arguments[, waiting actors])")
        if not isinstance(message[3], (bytes, bytearray)):
            raise TypeError(f"a CALL's arguments are bytes, not {type(message[3]).__name__}")
        if len(message) == 5 and not (
            type(message[4]) is tuple and all(type(a) is str or a is None for a in message[4])
        ):
            raise ValueError("a CALL's waiting actors are a tuple of addresses")
        return op
    if op == SEND:
        if len(message) != 2 or type(message[1]) is not list:
            raise ValueError("a SEND is (SEND, [(method name, arguments, descriptors), ...])")
        total = 0
        for entry in message[1]:
            if type(entry) is not tuple or len(entry) != 3:
                raise ValueError("a SEND's entries are (method name, arguments, descriptors)")
            name, blob, n = entry
            if type(name) is not str or not isinstance(blob, (bytes, bytearray)):
                raise ValueError("a SEND's entries are (str, bytes, int >= 0)")
            if type(n) is not int or n < 0:
                raise ValueError(f"a SEND's entry counts {n!r:.20} descriptors")
            total += n
        if total > nfds:
            raise ValueError(f"a SEND's entries count {total} descriptors, {nfds} came with it")
        return op
    if op == STOP and len(message) == 1:
        if not from_creator:
            raise ValueError("only the process that created an actor stops it")
        return op
    raise ValueError(f"a request of unknown kind {op!r:.40}")


def _method(obj, name: str):
    if name.startswith("_"):
        raise AttributeError(f"{type(obj).__qualname__}.{name} is private: actors expose public methods only")
    method = getattr(obj, name)
    if not callable(method):
        raise TypeError(
            f"{type(obj).__qualname__}.{name} is not a method: add a method that returns or changes it"
        )
    return method


def _public_methods(obj) -> list[str]:
    names = []
    for name in dir(obj):
        if name.startswith("_"):
            continue
        try:
            attr = inspect.getattr_static(obj, name)
        except AttributeError:
            continue
        if callable(attr) or isinstance(attr, (staticmethod, classmethod)):
            names.append(name)
    return names
