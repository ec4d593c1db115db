"""``shoal.Actor``: one object living in its own process; calls from any
number of processes run there one at a time.

Data flow::

    caller processes (any number)                     actor process (one thread)
    -----------------------------                     --------------------------
    handle.incr(1)                                    epoll over: the listening
      _Client (one per process and actor):              socket, every caller's
      flush this process's queued send()s,              connection, the creator's pidfd
      then CALL(cid, "incr", args) ────────────────►  (looks ~20-40 µs, then sleeps)
      direct path: no other thread reads, so this     accept → a new caller connection
      one reads its own reply on the connection       CALL → getattr(obj, name)(*args),
      (looks ~20-40 µs, then sleeps in recvmsg);             one call at a time; each
      otherwise it waits on a condition while the            caller's in arrival order
      thread that reads hands it over ◄────────────       REPLY(cid, ok, value)
                                                             on that connection
    handle.incr.submit(1) -> Future
      the same request; a reader thread
      (alive while Futures are pending)
      sets the Future from the reply
    handle.incr(1), small, and this thread reads      lane requests: looked at before
      (the usual case): the same CALL, in the           epoll (without the GIL, ~60 µs),
      connection's lane (shared memory, see             served after the messages that
      _lane) ──────────────────────────────────►       came on the connection before
      looks at the lane's reply slot ~60 µs      ◄────  REPLY in the lane
      without the GIL, then sleeps in poll on
      the connection and the lane's eventfd
    handle.incr.send(1) -> None
      pickled now (plain arguments: with the
      batch), queued in the outbox; sent          SEND [calls] → each in order, no
      as one SEND per SEND_BATCH calls, with        reply; an exception is printed to
      this process's next waiting call, or by       the actor's stderr (nobody waits)
      a flusher thread within about a millisecond
    close() in the creator ── STOP ────────────────►  answers what came before, exits

Waiting.  A round trip costs two sleeps and two wake-ups unless each end
looks for the other's message before it sleeps, as :class:`shoal.Connection`
does; the look adapts to whether it pays (``shoal._ipc.Spin``), so on a
machine with more runnable processes than CPUs, or for a method slower than
the look, neither end keeps a CPU the other needs.

Modules: ``_protocol`` (messages, the peer check, plain pickling),
``_lane`` (the shared-memory lane of a connection),
``_client`` (a process's connection to an actor; the creator's ``_Owner``),
``_handle`` (``Actor`` and its methods), ``_server`` (the actor process).

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

from typing import Any

from ._client import _clients as _clients
from ._handle import Actor as Actor
from ._handle import _rebuild_handle as _rebuild_handle
from ._protocol import CALL as CALL
from ._protocol import SEND as SEND
from ._protocol import STOP as STOP

__all__ = ("Actor",)


def __getattr__(name: str) -> Any:
    # This process's place in a chain of actors, as the actor's loop set it
    # last (module globals it rebinds: read through, never copied).
    if name in ("_serving_address", "_waiting"):
        from . import _protocol

        return getattr(_protocol, name[1:])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
