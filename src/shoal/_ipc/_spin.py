"""How a waiting end looks for a message before it sleeps (see :class:`Spin`).

Used by whichever thread is about to block on a socket: a
:class:`~shoal.Connection`'s receiver, an actor's loop and the thread that
reads an actor's replies.  A ``Spin`` holds only two counters; threads that
share one may race on them, which changes no more than the length of a look.
"""

from __future__ import annotations

from collections.abc import Callable

#: Polls, at most, before a waiting end sleeps (~20-60 µs on this kind of VM).
SPIN_MAX = 40
#: Waits without a look, once looking stopped paying, before a full look again.
SPIN_PROBE = 16


class Spin:
    """How long a waiting end looks for the next message before it sleeps.

    Sleeping in the kernel and being woken costs more than a whole reply
    when it is about to come (on a virtual machine an idle CPU halts, and
    waking it costs tens of microseconds), so both ends of a round trip
    look first.  But a look only pays while the other end runs: on a
    machine with more runnable processes than CPUs, or when the peer takes
    longer than the look, it takes the CPU the other end needs.  So the
    look adapts: one that finds the message keeps the full length; one
    that does not halves it, down to none, and after ``SPIN_PROBE`` waits
    without one a full look is tried again.
    """

    __slots__ = ("idle", "spins")

    def __init__(self) -> None:
        self.spins = SPIN_MAX
        self.idle = 0  # waits without a look since it stopped paying

    def look(self, poll: Callable[[int], list]) -> list:
        """``poll(0)`` until it reports something or the look is over;
        what it reported last (empty: sleep now)."""
        n = self.spins
        if not n:
            self.idle += 1
            if self.idle < SPIN_PROBE:
                return []
            self.idle = 0
            n = SPIN_MAX
        for _ in range(n):
            events = poll(0)
            if events:
                self.spins = SPIN_MAX
                return events
        self.spins = n >> 1
        return []
