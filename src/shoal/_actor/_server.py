"""The actor process: builds the object, then serves calls one at a time.

One thread (``_Server.run``) owns the object, the listening socket and every
caller's connection: it waits in one ``epoll`` on all of them and on the
creator's pidfd, after looking for a message for a few tens of microseconds
first (:class:`shoal._ipc.Spin`), takes one request per wake-up so that
callers take turns, runs it and replies on the connection it came on.  A
caller that sent its lane (see ``_lane``) also calls through shared memory:
then the loop looks at the lanes before it sleeps, wakes on their eventfds
as well, serves a lane's call after the messages its caller sent on the
connection before it, and replies in the same lane.  A request that is not
a shoal caller's is refused as text and its connection dropped; the loop
ends on STOP from the creator's connection, or when the creator exits.
"""

from __future__ import annotations

import inspect
import os
import pickle
import select
import socket
import sys
import threading
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .._engine import set_pdeathsig as _set_pdeathsig
from .._ipc import MEMFD, SNDBUF, close_fds, recv_packet, refuse_connection, send_packet
from .._serialization import loads_with, pack_exception
from ..exceptions import CorruptDataError
from . import _protocol
from ._lane import LANE_CAP, REPLIES, REQUESTS, Budget, Lane, drain, lane_awake, lane_get, lane_wait
from ._protocol import CALL, CREDS, DONTWAIT, LANE, SEND, STOP, Spin, encode_result, refusal

if TYPE_CHECKING:
    from ._handle import _Constructor


def _actor_main(
    listener: socket.socket,
    conn: socket.socket,
    constructor: _Constructor,
    creator_pid: int,
    pdeathsig: bool,
    name: str,
    inherited: tuple[int, ...],
) -> None:
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
        self.received: dict[int, int] = {}  # messages received on each connection
        self.lanes: dict[int, Lane] = {}  # each connection's lane, when it sent one
        self.lane_efds: dict[int, int] = {}  # a lane's request_efd -> its connection
        self.lane_order: tuple[int, ...] = ()  # the connections with lanes, in lane_wait's order
        self.lane_maps: tuple[Any, ...] = ()  # their mappings, in the same order
        # A process a method starts by fork must not hold our sockets (their
        # callers would then never see us die).
        os.register_at_fork(after_in_child=self.close)

    def close(self) -> None:
        for sock in (self.listener, *self.conns.values()):
            sock.close()
        self.conns = {}
        for lane in self.lanes.values():
            lane.close()
        self.lanes = {}
        self.lane_maps = ()
        if self.watch is not None:
            try:
                os.close(self.watch)
            except OSError:
                pass
            self.watch = None
        self.epoll.close()

    def run(self, constructor: _Constructor) -> None:
        creator = self.creator_conn
        try:
            obj = constructor.build()
        except BaseException as exc:  # noqa: BLE001 - reported to the creator
            self.reply(creator, 0, False, exc)
            return
        del constructor
        address = self.listener.getsockname()
        if isinstance(address, bytes):
            address = address.decode()
        _protocol.serving_address = address
        _protocol.waiting = (address,)
        if not self.reply(creator, 0, True, _public_methods(obj)):
            return
        self.name = type(obj).__qualname__
        poll = self.epoll.poll
        epoll_fd = self.epoll.fileno()
        look = Spin().look
        budget = Budget()
        listener = self.listener.fileno()
        watch = self.watch
        conns = self.conns
        lane_efds = self.lane_efds
        turn = 0  # the lane lane_wait looks at first: lanes take turns
        in_a_row = 0  # lane calls served since the connections were last looked at
        while True:
            maps = self.lane_maps
            if not maps:
                # A brief look before the sleep (see Spin): a caller's next
                # request often comes within microseconds of our reply.
                events = look(poll) or poll()
            elif in_a_row >= 8:
                in_a_row = 0
                events = poll(0)  # the connections' turn, however busy the lanes
            else:
                found = lane_wait(maps, REQUESTS, budget.next(), epoll_fd, turn)
                if found >= 0:
                    budget.found(True)
                    turn = found + 1
                    in_a_row += 1
                    if not self.serve_lane(self.lane_order[found], obj) and self.stopping:
                        return
                    continue
                in_a_row = 0
                if found == -1:
                    budget.found(False)
                    events = poll()
                    lane_awake(maps, REQUESTS)
                else:
                    events = poll(0)
            for fd, _mask in events:
                sock = conns.get(fd)
                if sock is not None:
                    # One message per wake: every caller's requests take turns.
                    if not self.serve(sock, obj):
                        self.drop(sock)
                        if self.stopping:
                            return
                elif fd in lane_efds:
                    drain(fd)  # the lane's request is found by the next lane_wait
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
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, CREDS.size)
            _pid, uid, _gid = CREDS.unpack(creds)
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
        self.received.pop(fd, None)
        lane = self.lanes.pop(fd, None)
        if lane is not None:
            self.lane_efds.pop(lane.request_efd, None)
            try:
                self.epoll.unregister(lane.request_efd)
            except (KeyError, ValueError, OSError):
                pass
            lane.close()
            self._order_lanes()
        sock.close()

    def _order_lanes(self) -> None:
        self.lane_order = tuple(self.lanes)
        self.lane_maps = tuple(lane.mm for lane in self.lanes.values())

    def answer_without_descriptors(self, sock: socket.socket, datagram: bytes, exc: OSError) -> bool:
        """A request came whose descriptors this process had no room for
        (see fd_limit_error): fail that call, or decline that lane, and keep
        the connection.  False when it is no request of ours."""
        fd = sock.fileno()
        self.received[fd] = self.received.get(fd, 0) + 1
        try:
            if datagram[0] & MEMFD:
                raise ValueError("its bytes came in a memfd")
            message = pickle.loads(memoryview(datagram)[1:])
            op = message[0]
            if op not in (CALL, LANE) or type(message[1]) is not int:
                raise ValueError("neither a call nor a lane")
        except Exception:  # noqa: BLE001 - nothing to answer: the connection goes, as before
            return False
        if op == LANE:
            return self.reply(sock, message[1], True, False)
        return self.reply(sock, message[1], False, exc, message[2] if type(message[2]) is str else "")

    def add_lane(self, sock: socket.socket, fds: list[int]) -> bool:
        """Take the lane a caller sent; False when it cannot be used (a
        second one, or one this process cannot map): the caller then calls
        on the connection alone."""
        fd = sock.fileno()
        if fd in self.lanes or len(self.lanes) >= 64:
            return False
        try:
            lane = Lane.receive(fds)
        except (OSError, ValueError, CorruptDataError):
            return False
        try:
            self.epoll.register(lane.request_efd, select.EPOLLIN)
        except OSError:  # no memory for it: calls go on the connection
            lane.close()
            return False
        self.lanes[fd] = lane
        self.lane_efds[lane.request_efd] = fd
        self._order_lanes()
        return True

    def serve_lane(self, fd: int, obj: Any) -> bool:
        """Run the call waiting in connection *fd*'s lane, after the messages
        its caller sent on the connection before it (False when the
        connection is finished with, as serve())."""
        sock = self.conns[fd]
        lane = self.lanes[fd]
        try:
            payload = lane_get(lane.mm, REQUESTS)
        except CorruptDataError as exc:
            refuse_connection(sock, f"the {self.name} actor refused a request: {exc}", close=False)
            self.drop(sock)
            return False
        if payload is None:
            return True
        before = int.from_bytes(payload[:8], "little")
        while (had := self.received.get(fd, 0)) < before:
            # An honest caller's earlier messages are in the connection's
            # buffer already (its sendmsg returned before it wrote the lane).
            if not self.serve(sock, obj):
                self.drop(sock)
                return False
            if self.received.get(fd, 0) == had:
                refuse_connection(
                    sock,
                    f"the {self.name} actor refused a call that counts {before} messages before it, of which "
                    f"only {had} came; this connection is closed",
                    close=False,
                )
                self.drop(sock)
                return False
        try:
            message = pickle.loads(memoryview(payload)[8:])
            if _check_request(message, 0, False) != CALL:
                raise ValueError("a lane carries calls only")
        except Exception as exc:  # noqa: BLE001 - garbage of any kind: not a request of ours
            self.refuse_garbage(sock, exc)
            self.drop(sock)
            return False
        if not self.call(sock, obj, message[1], message[2], message[3], [], message[4:], lane):
            self.drop(sock)
            return False
        return True

    def serve(self, sock: socket.socket, obj: Any) -> bool:
        """Run the next request waiting on *sock*; False when the connection
        is finished with (closed, broken, or it asked us to stop)."""
        try:
            packet = recv_packet(sock, DONTWAIT)
        except BlockingIOError:
            return True
        except CorruptDataError as exc:
            refuse_connection(sock, f"the {self.name} actor refused a request: {exc}", close=False)
            return False
        except OSError as exc:
            datagram = getattr(exc, "datagram", b"")
            if not datagram:
                return False
            return self.answer_without_descriptors(sock, datagram, exc)
        if packet is None:
            return False
        fd = sock.fileno()
        self.received[fd] = self.received.get(fd, 0) + 1
        _kind, payload, fds = packet
        try:
            try:
                message = pickle.loads(payload)
                op = _check_request(message, len(fds), sock is self.creator_conn)
            except Exception as exc:  # noqa: BLE001 - garbage of any kind: not a request of ours
                self.refuse_garbage(sock, exc)
                return False
            if op == CALL:
                return self.call(sock, obj, message[1], message[2], message[3], fds, message[4:])
            if op == SEND:
                self.run_sends(obj, message[1], fds)
                return True
            if op == LANE:
                return self.reply(sock, message[1], True, self.add_lane(sock, fds))
            self.stopping = True
            return False
        finally:
            if fds:
                close_fds(fds)

    def refuse_garbage(self, sock: socket.socket, exc: Exception) -> None:
        """Tell a peer why its request was refused: as text (never a
        pickle); the connection is done with."""
        refuse_connection(
            sock,
            f"the {self.name} actor refused a request that is not a shoal caller's "
            f"({type(exc).__name__}: {exc}); this connection is closed",
            close=False,
        )

    def call(
        self,
        sock: socket.socket,
        obj: Any,
        cid: int,
        name: str,
        blob: bytes,
        fds: list[int],
        chain: tuple,
        lane: Lane | None = None,
    ) -> bool:
        if chain:
            _protocol.waiting = (*chain[0], _protocol.serving_address)
        try:
            args, kwargs = loads_with(blob, fds)
            value = _method(obj, name)(*args, **(kwargs or {}))
            ok = True
        except BaseException as exc:  # noqa: BLE001 - the caller's to handle
            value = exc
            ok = False
        finally:
            if chain:
                _protocol.waiting = (_protocol.serving_address,)
        return self.reply(sock, cid, ok, value, name, lane)

    def reply(
        self, sock: socket.socket, cid: int, ok: bool, value: Any, method: str = "", lane: Lane | None = None
    ) -> bool:
        """Send the outcome of *method* (``""``: of the construction)."""
        fds: list[int] = []
        if ok:
            try:
                # (The construction's result, a list of names, always pickles.)
                blob, fds = encode_result(value, self.name, method)
            except Exception as exc:  # noqa: BLE001 - an unpicklable result fails this call only
                ok = False
                blob = pack_exception(exc, self.who(method))
        else:
            # A SystemExit (the method called sys.exit()) becomes a
            # TaskExitError there: it must not end the caller's program.
            blob = pack_exception(value, self.who(method))
        del value
        payload = pickle.dumps((cid, ok, blob), 5)
        if lane is not None and not fds and len(payload) <= LANE_CAP:
            lane.put(REPLIES, payload)
            return True
        try:
            send_packet(sock, 0, payload, fds)
        except OSError:
            return False  # the caller went away
        finally:
            if fds:
                close_fds(fds)
        return True

    def who(self, method: str) -> str:
        """``Counter.incr()`` (``Counter()``: the construction), for errors."""
        return f"{self.name}.{method}()" if method else f"{self.name}()"

    def run_sends(self, obj: Any, entries: list[tuple], fds: list[int]) -> None:
        pos = 0
        methods: dict[str, Any] = {}  # looked up once per message
        loads = pickle.loads
        for entry in entries:
            name = entry[0]
            try:
                if len(entry) == 2:  # plain arguments, unpickled with the batch
                    args, kwargs = entry[1], None
                else:
                    blob, nfds = entry[1], entry[2]
                    if nfds:
                        pos += nfds
                        args, kwargs = loads_with(blob, fds, pos - nfds, pos)
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
            if type(entry) is tuple and len(entry) == 2 and type(entry[0]) is str and type(entry[1]) is tuple:
                continue  # (method name, plain arguments)
            if type(entry) is not tuple or len(entry) != 3:
                raise ValueError("a SEND's entries are (name, arguments, descriptors) or (name, arguments)")
            name, blob, n = entry
            if type(name) is not str or not isinstance(blob, (bytes, bytearray)):
                raise ValueError("a SEND's entries are (str, bytes, int >= 0)")
            if type(n) is not int or n < 0:
                raise ValueError(f"a SEND's entry counts {n!r:.20} descriptors")
            total += n
        if total > nfds:
            raise ValueError(f"a SEND's entries count {total} descriptors, {nfds} came with it")
        return op
    if op == LANE and len(message) == 2 and type(message[1]) is int:
        if nfds != 3:
            raise ValueError(f"a LANE comes with 3 descriptors, not {nfds}")
        return op
    if op == STOP and len(message) == 1:
        if not from_creator:
            raise ValueError("only the process that created an actor stops it")
        return op
    raise ValueError(f"a request of unknown kind {op!r:.40}")


def _method(obj: Any, name: str) -> Callable[..., Any]:
    if name.startswith("_"):
        raise AttributeError(f"{type(obj).__qualname__}.{name} is private: actors expose public methods only")
    method = getattr(obj, name)
    if not callable(method):
        raise TypeError(
            f"{type(obj).__qualname__}.{name} is not a method: add a method that returns or changes it"
        )
    return method


def _public_methods(obj: Any) -> list[str]:
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
