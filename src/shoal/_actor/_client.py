"""The calling side of an actor: this process's connection to it (one
``_Client`` per actor, shared by its handles), and, in the creator, the
actor's process (``_Owner``) and how it is stopped.

See the package's docstring for the whole data flow.  A synchronous call
(:meth:`_Client.call`) takes the direct path when no other thread of this
process reads the connection: it claims the reading before it sends, sends
its request, looks for the reply for a few tens of microseconds (see
:class:`shoal._ipc.Spin`) and then sleeps in ``recvmsg`` on the connection
itself, dispatching any other reply that comes first.  Otherwise the call
follows: it waits on the client's condition while the thread that reads (a
waiting caller, or the reader thread that settles Futures) hands it its
reply.  Either way the reply is decoded and checked the same way
(:meth:`_Client._read_one`), so both paths give the same results and errors.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import multiprocessing
import multiprocessing.util
import os
import pickle
import select
import socket
import threading
import time
import weakref
from multiprocessing.process import BaseProcess
from typing import Any

from .._future import settle_future as _settle
from .._ipc import BYTES, SNDBUF, close_fds, recv_packet, send_packet
from .._serialization import loads_with, unpack_exception
from ..exceptions import ActorDiedError, CorruptDataError, SerializationError, corrupt_data, describe_exitcode
from . import _protocol
from ._lane import LANE_CAP, REPLIES, REQUESTS, Budget, Lane, drain, lane_awake, lane_get, lane_wait
from ._protocol import (
    CALL,
    EXIT_TIMEOUT,
    FLUSH_DELAY,
    LANE,
    SEND,
    SEND_BATCH,
    SEND_MAX_FDS,
    STOP,
    Spin,
    check_peer,
    encode_args,
    plain_args,
)

#: A synchronous call takes the direct path when it can (tests turn it off to
#: check that both paths give the same results and errors).
DIRECT = True
#: ... and carries it through the connection's lane (see ``_lane``) when it
#: can; ``SHOAL_ACTOR_LANES=0`` in a process's environment (read at each new
#: connection) keeps its calls on the connection.
LANES = True
_POLLIN = select.POLLIN | select.POLLHUP | select.POLLERR

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

    def result(self) -> Any:
        value = self.value
        self.value = None
        if self.ok:
            return value
        raise value


class _Client:
    """This process's connection to one actor, shared by its handles."""

    def __init__(
        self, address: str, sock: socket.socket, actor_pid: int, name: str, proc: BaseProcess | None = None
    ) -> None:
        self.address = address
        self.pid = os.getpid()
        self.sock: socket.socket | None = sock
        self.actor_pid = actor_pid
        self.name = name
        self.proc = proc  # the creator's Process, for the exit code
        # cond's own lock, entered directly on the hot paths (a Condition's
        # __enter__ is a Python call around it): pending, reading, futures,
        # reader, dead
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
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
        self.poller: Any = None  # select.poll on sock, for the thread that reads
        self.spin = Spin()
        self.sent = 0  # messages sent on sock (under send_lock): a lane request says how many came before it
        self.lane: Lane | None = None  # made at the first direct call (see _lane)
        self.lane_poller: Any = None  # select.poll on sock and the lane's reply_efd
        self.budget = Budget()

    # -- a synchronous call --
    def call(self, name: str, args: tuple, kwargs: dict, what: str) -> Any:
        """Run *name* in the actor and return its result (or raise its error).

        The direct path (see the module docstring): when no other thread
        reads, this one claims the reading before it sends, so its reply
        never needs another thread to hand it over.
        """
        if not DIRECT:
            return self.wait(self.request(name, args, kwargs, None, what))
        if self.dead is not None:
            raise self.died()
        blob, fds = encode_args(args, kwargs, what)
        if self.lane_poller is None and LANES:
            self._open_lane()
        call = _Call(None, name)
        lead = False
        lane = None
        try:
            with self.send_lock:
                with self.lock:
                    cid = self._enter_locked(call)
                    if not self.reading:
                        self.reading = lead = True
                        self.reading_thread = threading.get_ident()
                try:
                    if self.outbox:
                        self._flush_locked()
                    message: tuple[Any, ...] = (CALL, cid, name, blob)
                    if _protocol.waiting:  # an actor waits for this call
                        message = (*message, _protocol.waiting)
                    payload = pickle.dumps(message, 5)
                    if lead and not fds and len(payload) <= LANE_CAP - 8:
                        lane = self.lane
                    if lane is not None:
                        lane.put(REQUESTS, self.sent.to_bytes(8, "little") + payload)
                    else:
                        send_packet(self.sock, 0, payload, fds)  # type: ignore[arg-type]  # None only once closed, after dead is set
                        self.sent += 1
                except OSError as exc:
                    self._lost()
                    raise self.died() from exc
        except BaseException:
            if lane is not None:  # interrupted as its request went into the lane (Ctrl-C)
                self._abandon_lane(lane, cid)
            if lead:
                self._stop_reading()
            raise
        finally:
            if fds:
                close_fds(fds)
        if not lead:
            return self.wait(call)  # another thread reads: it hands us the reply
        try:
            if lane is not None:
                try:
                    self._await_lane(call, lane)
                except BaseException:
                    if not call.done:  # interrupted (Ctrl-C): its reply may still come
                        self._abandon_lane(lane, cid)
                    raise
            while not call.done:
                self._read_one(True)
        finally:
            self._stop_reading()
        return call.result()

    def _open_lane(self) -> None:
        """Make this connection's lane and hand it to the actor, once, at
        the first synchronous call.  Without one (this process or the
        actor has no descriptor or memory left, or the actor is gone) calls
        go on the connection alone."""
        with self.send_lock:
            if self.lane_poller is not None:
                return  # another thread made the attempt
            self.lane_poller = select.poll()
            if os.environ.get("SHOAL_ACTOR_LANES", "1") == "0":
                return
            try:
                lane, memfd = Lane.create()
            except OSError:
                return
        call = _Call(None, "")
        cid = 0
        try:
            try:
                with self.send_lock:
                    with self.lock:
                        cid = self._enter_locked(call)
                    fds = [memfd, lane.request_efd, lane.reply_efd]
                    send_packet(self.sock, 0, pickle.dumps((LANE, cid), 5), fds)  # type: ignore[arg-type]  # None only once closed, after dead is set
                    self.sent += 1
            finally:
                os.close(memfd)
            taken = self.wait(call)
        except BaseException as exc:
            with self.lock:
                self.pending.pop(cid, None)
            lane.close()
            if isinstance(exc, Exception):
                return  # the call that follows says what is wrong
            raise  # Ctrl-C
        if taken is not True:
            lane.close()
            return
        self.lane_poller.register(self.sock, _POLLIN)
        self.lane_poller.register(lane.reply_efd, select.POLLIN)
        self.lane = lane

    def _abandon_lane(self, lane: Lane, cid: int) -> None:
        """Stop using *lane*: a call through it ended without its reply,
        which may still come and would then meet the next call's in the
        one reply slot.  Later calls go on the connection."""
        with self.send_lock:
            with self.lock:
                self.pending.pop(cid, None)
            if self.lane is lane:
                self.lane = None
        lane.close()

    def _await_lane(self, call: _Call, lane: Lane) -> None:
        """Wait for *call*'s reply in the lane, reading the connection when
        something comes there (see _lane)."""
        budget = self.budget
        lanes = lane.lanes
        fd = self.sock.fileno() if self.sock is not None else -1
        while not call.done:
            found = lane_wait(lanes, REPLIES, budget.next(), fd, 0)
            readable = found == -2  # the connection has something: a reply, or the end
            if found == -1:
                budget.found(False)
                events = self.lane_poller.poll()
                lane_awake(lanes, REPLIES)
                drain(lane.reply_efd)
                readable = any(efd == fd for efd, _ in events)
            elif found == 0:
                budget.found(True)
            # The lane first: a reply there was written before anything the
            # connection says now, the actor's end included.
            if not self._lane_reply(lane):
                return
            if readable and not call.done:
                self._read_one()

    def _lane_reply(self, lane: Lane) -> bool:
        """Deliver the reply waiting in *lane*, if any; False when it is not
        a reply (the connection is then finished with)."""
        try:
            payload = lane_get(lane.mm, REPLIES)
        except CorruptDataError as exc:
            self._corrupt_reply(str(exc))
            return False
        except ValueError:  # closed under us: the connection is finished with
            return False
        if payload is not None:
            self._deliver(payload, [])
        return True

    def _enter_locked(self, call: _Call) -> int:
        """Give *call* its id and make it wait for its reply (self.lock
        held); raises when the actor is gone."""
        if self.dead is not None:
            raise self.died()
        cid = next(self.ids)
        self.pending[cid] = call
        return cid

    def _stop_reading(self) -> None:
        with self.lock:
            self.reading = False
            if self.waiting:
                self.cond.notify_all()

    # -- sending --
    def request(
        self, name: str, args: tuple, kwargs: dict, future: concurrent.futures.Future | None, what: str
    ) -> _Call:
        if self.dead is not None:
            raise self.died()
        blob, fds = encode_args(args, kwargs, what)
        call = _Call(future, name)
        start_reader = False
        try:
            with self.send_lock:
                with self.cond:
                    cid = self._enter_locked(call)
                    if future is not None:
                        self.futures += 1
                        if not self.reader:
                            self.reader = start_reader = True
                try:
                    if self.outbox:
                        self._flush_locked()
                    message: tuple[Any, ...] = (CALL, cid, name, blob)
                    if _protocol.waiting and future is None:  # an actor waits for this call
                        message = (*message, _protocol.waiting)
                    send_packet(self.sock, 0, pickle.dumps(message, 5), fds)  # type: ignore[arg-type]  # None only once closed, after dead is set
                    self.sent += 1
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
        fds = None
        if kwargs or (args and not plain_args(args, None)):
            blob, fds = encode_args(args, kwargs, what)
            entry: tuple = (name, blob, len(fds))
        else:
            entry = (name, args)  # plain: pickled with the batch (see SEND)
        with self.send_lock:
            outbox = self.outbox
            outbox.append(entry)
            queued = len(outbox)
            if fds:
                self.outbox_fds.extend(fds)
            if queued >= SEND_BATCH or (fds and len(self.outbox_fds) >= SEND_MAX_FDS):
                try:
                    self._flush_locked()
                except OSError as exc:
                    self._lost()
                    raise self.died() from exc
                return
        if queued == 1:
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
            self.sent += 1
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
    def wait(self, call: _Call) -> Any:
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
                self._read_one(True)
        finally:
            self._stop_reading()
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

    def _read_one(self, look: bool = False) -> None:
        """Receive one reply and hand it to its call; with *look*, look for
        it briefly before sleeping (see Spin)."""
        try:
            if look and self.sock is not None:
                poller = self.poller
                if poller is None:
                    poller = self.poller = select.poll()
                    poller.register(self.sock, _POLLIN)
                self.spin.look(poller.poll)
            packet = recv_packet(self.sock)  # type: ignore[arg-type]  # None only once closed, after dead is set
        except CorruptDataError as exc:
            self._corrupt_reply(str(exc))
            return
        except (OSError, ValueError, AttributeError):  # the socket was closed under us
            packet = None
        if packet is None:
            lane = self.lane
            if lane is not None:  # a reply written there just before the actor ended is still good
                self._lane_reply(lane)
            self._lost()
            return
        kind, payload, fds = packet
        if kind & BYTES:  # the actor refused us (see _Server.accept): text, not a pickle
            close_fds(fds)
            self.dead = f"it refused this process: {bytes(payload[:1000]).decode(errors='replace')}"
            self._lost()
            return
        self._deliver(payload, fds)

    def _deliver(self, payload: Any, fds: list[int]) -> None:
        """Decode one reply (from the connection or the lane) and hand it to its call."""
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
        with self.lock:
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
        lane, self.lane = self.lane, None
        if lane is not None:
            lane.close()
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
        lane = getattr(self, "lane", None)
        if lane is not None:
            self.lane = None
            try:
                lane.close()
            except Exception:  # noqa: BLE001 - interpreter shutdown
                pass

    def forget_after_fork(self) -> None:
        """In a forked child: drop this process's copy of the parent's connection."""
        self.dead = "this handle was inherited through fork"
        sock, self.sock = self.sock, None
        if sock is not None:
            sock.close()
        lane, self.lane = self.lane, None
        if lane is not None:
            lane.close()
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


def register_client(address: str, client: _Client) -> None:
    with _clients_lock:
        _clients[address] = client


def _client_for(address: str, actor_pid: int, name: str) -> _Client:
    with _clients_lock:
        client = _clients.get(address)
        if client is not None and client.pid == os.getpid() and client.sock is not None:
            return client
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
            sock.connect(address)
            check_peer(sock, actor_pid)
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

    def __init__(self, proc: BaseProcess, client: _Client) -> None:
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
