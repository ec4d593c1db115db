"""Hostile and corrupt bytes: every decoder of bytes that another process
wrote, fed truncated, oversized, out-of-range and random input.

What is fuzzed is shoal's own framing and layouts: the packet framing of
pipes and queues (the kind byte, the 8-byte size of a memfd payload, the
descriptors that come with it), the channel framing between the pool
engine and its workers, a queue's ring in shared memory (positions,
capacity, record lengths and kinds, counters), a live SharedDict's memory
(header words, region geometry, index slots, entries, block lengths and
offsets), the results messages of pool workers, an actor's requests and
replies, and the layout of out-of-band buffers (segment size, spans).  For
each the required outcome is the value, or a clear error --
:class:`shoal.CorruptDataError` saying what was wrong, or the error the
API already documents (``EOFError``, ``queue.Empty``, ``MessageTooLarge``
past a limit) -- and never a crash, a hang, or an allocation the size of a
corrupt length field.

Pickled payloads are not fuzzed.  A pickle is code by design: whoever can
put bytes on a shoal channel can run code in the reader, which is why only
processes of the same user reach a shoal endpoint (``docs/security.md``).
Where a decoder unpickles (a queue item, a dict value), the fuzz leaves the
pickled bytes alone or lets the pickler's own error through as the
documented ``SerializationError``.

Each fuzz runs in a fresh interpreter (``helpers.run_code``), so that a
regression (a segfault, SIGBUS) fails one test instead of killing the
session.  There, every example runs under a watchdog (``faulthandler``: an
example that hangs ends the interpreter with the stack that hung), with
``tracemalloc`` measuring what it allocated, and must leave no descriptor
open.  The child prints a summary (examples run, outcomes, seconds) that
the test checks: each fuzz must have met both decoded input and the errors
it is about, or it did not test what it says.  ``tools/sanitize`` runs this
file again with the native code built under AddressSanitizer and UBSan.
"""

from __future__ import annotations

import collections
import faulthandler
import gc
import json
import mmap
import os
import queue
import socket
import struct
import sys
import time
import tracemalloc
from pathlib import Path

import pytest

from helpers import open_fds, run_code

TESTS = Path(__file__).resolve().parent

#: Examples per fuzz (each runs in its own interpreter; see the summary).
EXAMPLES = {
    "packets": 1000,
    "channel": 1000,
    "ring": 500,
    "out_of_band": 1000,
    "shared_dict": 400,
    "results": 60,
    "actor_server": 300,
    "actor_client": 300,
}

#: No example may allocate more than this (tracemalloc's peak): a corrupt
#: length must never become an allocation of that length.
ALLOC_LIMIT = 96 << 20
#: A fuzz running longer than this hangs: the child prints where every thread
#: is and exits (fuzz_in_child sets it a little under its own timeout).
HANG_SECONDS = 225.0

#: Sizes a corrupt length field takes: around every threshold of the
#: layouts, the machine's memory, and the extremes.
INTERESTING = (
    0,
    1,
    7,
    8,
    9,
    255,
    4096,
    65536,
    65537,
    64 << 20,
    (64 << 20) + 1,
    1 << 31,
    1 << 32,
    1 << 40,
    1 << 47,
    1 << 48,
    (1 << 63) - 1,
    1 << 63,
    (1 << 64) - 1,
)


def fuzz_in_child(name: str, examples: int, timeout: float = 240) -> dict:
    """Run ``fuzz_<name>(examples)`` of this module in a fresh interpreter
    and return the summary it printed."""
    out = run_code(
        f"""
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        import test_hostile_bytes
        test_hostile_bytes.HANG_SECONDS = {timeout - 15}
        test_hostile_bytes.fuzz_{name}({examples})
        """,
        timeout=timeout,
    )
    summary = json.loads(out.strip().splitlines()[-1])
    print(f"{name}: {summary}")  # shown with -s or on failure: the counts and how long it took
    assert summary["examples"] >= examples, summary
    return summary


# -- the child's side ---------------------------------------------------------------


def _check_message(exc: BaseException) -> None:
    """An accepted error must say what happened."""
    from shoal import CorruptDataError

    if isinstance(exc, (queue.Empty, queue.Full, KeyError)):
        return  # the standard library's own, without a message (or the key as one)
    text = str(exc)
    assert len(text) > 10, f"{type(exc).__name__} without a useful message: {text!r}"
    if isinstance(exc, CorruptDataError):
        assert "not shoal of this version" in text, text


class Harness:
    """Runs one example at a time under the rules of this module and counts
    the outcomes."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.examples = 0  # Hypothesis examples
        self.operations = 0  # decoder calls (several per example in some fuzzes)
        self.started = time.monotonic()
        self.peak = 0
        faulthandler.enable()
        # One watchdog for the whole fuzz, not one per example: each
        # dump_traceback_later() starts a thread and the last one ends while
        # the next example runs, and a thread ending (it frees its memory)
        # while tracemalloc.stop() runs crashes CPython before 3.12.9 and
        # 3.13.2 (gh-128679): a segfault in the fuzz under AddressSanitizer.
        faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)

    def run(self, example, accepted: tuple[type[BaseException], ...], new_example: bool = True) -> object:
        """Run *example*(); its outcome is what it returned ("decoded" if
        None) or the name of the accepted exception it raised.
        *new_example*: it is the first call of a Hypothesis example."""
        before = open_fds()
        threads = _os_threads()
        error: BaseException | None = None
        tracemalloc.start()  # around the example only: tracing Hypothesis too would slow it down (5x)
        try:
            try:
                outcome = example() or "decoded"
            except accepted as exc:
                _check_message(exc)
                outcome = type(exc).__name__
                error = exc
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            # Stopped only once the threads the example started are gone from
            # the kernel (past their last free): see gh-128679 in __init__.
            _wait_for_threads(threads)
            tracemalloc.stop()
        if peak >= ALLOC_LIMIT and _pickle_reserved(error):
            outcome += " (pickle reserved a corrupt count)"
        else:
            self.peak = max(self.peak, peak)
            assert peak < ALLOC_LIMIT, f"an example allocated {peak} bytes"
        left = open_fds() - before
        deadline = time.monotonic() + 5
        while left and time.monotonic() < deadline:
            # A mapping dropped in a cycle holds its descriptor until it is
            # collected; a pool's threads close theirs as they end.
            gc.collect()
            time.sleep(0.01)
            left = open_fds() - before
        assert not left, f"descriptors left open: {left}"
        self.examples += new_example
        self.operations += 1
        self.outcomes[outcome] += 1
        return outcome

    def report(self) -> None:
        print(
            json.dumps(
                {
                    "examples": self.examples,
                    "operations": self.operations,
                    "outcomes": dict(self.outcomes),
                    "seconds": round(time.monotonic() - self.started, 2),
                    "peak_bytes": self.peak,
                }
            )
        )


def _pickle_reserved(error: BaseException | None) -> bool:
    """Whether *error* is CPython's unpickler finding its data truncated.

    Before the fix of gh-115952 (CPython 3.14), the C unpickler allocates
    the bytes a counted opcode (BINBYTES, BINUNICODE, ...) announces before
    it reads them: a corrupt count inside a pickle payload (a queue item
    overwritten in the ring) reserves up to 4 GiB that is never touched,
    since the read finds the data truncated at once, and the call fails
    with a clear error.  tracemalloc counts the reservation all the same.
    """
    import pickle

    while error is not None:
        if isinstance(error, pickle.UnpicklingError) and "truncated" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _os_threads() -> set[str]:
    """The ids of this process's threads, as the kernel lists them."""
    return set(os.listdir("/proc/self/task"))


def _wait_for_threads(before: set[str], seconds: float = 5) -> None:
    """Wait until every thread started since *before* was listed has ended
    (one still running after *seconds* is left running)."""
    deadline = time.monotonic() + seconds
    while _os_threads() - before and time.monotonic() < deadline:
        time.sleep(0.002)


def _given(examples: int, *strategies, always: tuple = ()):
    """``@given`` with this module's settings, for a fuzz body run once;
    *always*: argument tuples run as explicit examples first."""
    from hypothesis import HealthCheck, example, given, settings

    def wrap(fn):
        test = given(*strategies)(fn)
        for args in always:
            test = example(*args)(test)
        return settings(
            max_examples=examples,
            database=None,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        )(test)

    return wrap


def _sizes():
    from hypothesis import strategies as st

    from shoal._fd import MAX_PEER_SIZE

    return st.one_of(
        st.sampled_from((*INTERESTING, MAX_PEER_SIZE, MAX_PEER_SIZE + 1)),
        st.integers(0, (1 << 64) - 1),
        st.integers(0, 300_000),
    )


def _memfd(size: int, fill: bytes = b"\x00") -> int:
    fd = os.memfd_create("fuzz", os.MFD_CLOEXEC)
    if size:
        os.pwrite(fd, fill * size, 0) if len(fill) == 1 and size <= 1 << 20 else os.ftruncate(fd, size)
    return fd


def _rights(fds: list[int]) -> list:
    """Ancillary data passing *fds* (SCM_RIGHTS), for sendmsg."""
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] if fds else []


def _descriptor(what: str, size: int) -> list[int]:
    """Descriptors to attach: what a peer might send instead of (or with)
    the memfd of a large payload."""
    if what == "none":
        return []
    if what == "memfd":
        return [_memfd(8 + size)]
    if what == "short memfd":
        return [_memfd(8 + size // 2)]
    if what == "sparse memfd":
        fd = os.memfd_create("fuzz", os.MFD_CLOEXEC)
        os.ftruncate(fd, 8 + size)
        return [fd]
    if what == "read-only memfd":
        fd = _memfd(8 + size)
        ro = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
        os.close(fd)
        return [ro]
    if what == "pipe":
        r, w = os.pipe()
        os.close(w)
        return [r]
    if what == "socket":
        a, b = socket.socketpair()
        b.close()
        return [a.detach()]
    if what == "two":
        return [_memfd(8 + size), os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)]
    raise AssertionError(what)


DESCRIPTORS = ("none", "memfd", "short memfd", "sparse memfd", "read-only memfd", "pipe", "socket", "two")


# -- packets: pipes and queues ------------------------------------------------------


def fuzz_packets(examples: int) -> None:
    from hypothesis import strategies as st

    from shoal import Pipe
    from shoal._ipc._packet import MEMFD, MessageTooLarge, close_fds, recv_packet, socketpair
    from shoal.exceptions import CorruptDataError

    harness = Harness("packets")
    body = st.one_of(
        st.binary(max_size=80),
        _sizes().map(lambda n: n.to_bytes(8, "little")),
        st.tuples(_sizes(), st.binary(min_size=1, max_size=16)).map(
            lambda t: t[0].to_bytes(8, "little") + t[1]
        ),
        st.just(b"x" * 70_000),  # longer than any datagram shoal sends: truncated
    )

    @_given(
        examples,
        st.integers(0, 255) | st.sampled_from((MEMFD, MEMFD | 4)),
        body,
        st.sampled_from(DESCRIPTORS),
        st.none() | st.integers(0, 1 << 20),
        st.sampled_from(("recv_packet", "recv_bytes")),
    )
    def packet(kind, body, descriptor, limit, via):
        size = int.from_bytes(body[:8], "little") if len(body) >= 8 else 0
        fds = _descriptor(descriptor, min(size, 1 << 20))

        def example():
            if via == "recv_packet":
                a, b = socketpair()
            else:
                conn_a, conn_b = Pipe()
                a, b = conn_a._sock, conn_b._sock
            try:
                anc = _rights(fds)
                a.sendmsg([bytes([kind]) + body], anc)
                close_fds(fds)
                fds.clear()
                if via == "recv_packet":
                    _kind, payload, got_fds = recv_packet(b, socket.MSG_DONTWAIT, limit)
                    close_fds(got_fds)
                else:
                    payload = conn_b.recv_bytes(limit)
                if kind & MEMFD:
                    assert len(payload) == size
                return "decoded memfd" if kind & MEMFD else "decoded"
            finally:
                close_fds(fds)
                if via == "recv_packet":
                    a.close()
                    b.close()
                else:
                    conn_a.close()
                    conn_b.close()

        harness.run(example, (CorruptDataError, MessageTooLarge))

    packet()
    harness.report()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_packet_framing_refuses_corrupt_datagrams():
    """A datagram with any kind byte, any body (a memfd header of any size,
    truncated, oversized) and any descriptors (none, a short or sparse
    memfd, a read-only one, a pipe, a socket) decodes or raises
    CorruptDataError / MessageTooLarge, and allocates no more than it read."""
    summary = fuzz_in_child("packets", EXAMPLES["packets"])
    outcomes = summary["outcomes"]
    assert outcomes.get("CorruptDataError", 0) > 0, outcomes
    assert outcomes.get("decoded", 0) + outcomes.get("decoded memfd", 0) > 0, outcomes


def test_a_length_of_2_to_the_40_is_refused_before_anything_is_read():
    """What the brief names: a memfd payload announcing 2**40 bytes raises
    at once, saying how large and that the peer is not shoal (no MemoryError,
    no read of that size)."""
    out = run_code(
        """
        import os, socket, tracemalloc
        from shoal import CorruptDataError, Pipe
        from shoal._ipc._packet import MEMFD

        a, b = Pipe()
        fd = os.memfd_create("small", os.MFD_CLOEXEC)
        os.ftruncate(fd, 4096)
        a._sock.sendmsg([bytes([MEMFD]) + (1 << 40).to_bytes(8, "little")],
                       [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fd.to_bytes(4, "little"))])
        tracemalloc.start()
        try:
            b.recv_bytes()
        except CorruptDataError as exc:
            print(exc)
        print(tracemalloc.get_traced_memory()[1] < 1 << 20)
        """
    )
    message, small = out.strip().splitlines()
    assert "1099511627776 bytes (1024.0 GiB)" in message
    assert "not shoal of this version" in message
    assert small == "True"


# -- the engine's channel -----------------------------------------------------------


def fuzz_channel(examples: int) -> None:
    from hypothesis import strategies as st

    from shoal._ipc import Channel
    from shoal._ipc._packet import close_fds
    from shoal.exceptions import CorruptDataError

    harness = Harness("channel")
    # None: the truth (as many as follow, or as were attached)
    frame = st.tuples(
        st.one_of(st.none(), st.integers(0, 400), _sizes().map(lambda n: n & ((1 << 48) - 1))),  # size
        st.one_of(st.none(), st.integers(0, 3), st.integers(0, (1 << 16) - 1)),  # descriptors
        st.binary(max_size=400),  # the bytes that follow
        st.integers(0, 3),  # descriptors sent with its first byte
    )

    @_given(
        examples,
        st.lists(frame, min_size=1, max_size=4),
        st.binary(max_size=12),
        st.sampled_from(("recv", "recv_available")),
    )
    def channel(frames, tail, how):
        ours, theirs = Channel.pair()

        def example():
            try:
                for size, nfds, payload, attach in frames:
                    size = len(payload) if size is None else size
                    nfds = attach if nfds is None else nfds
                    data = struct.pack("<Q", size | (nfds << 48)) + payload
                    fds = [_memfd(16) for _ in range(attach)]
                    anc = _rights(fds)
                    theirs.sock.sendmsg([data], anc)
                    close_fds(fds)
                theirs.sock.sendall(tail)
                theirs.close()  # end of stream after what was sent
                got = 0
                if how == "recv":
                    while (frame := ours.recv()) is not None:
                        close_fds(frame[1])
                        got += 1
                else:
                    ours.sock.setblocking(False)
                    for _ in range(1000):
                        ready, eof = ours.recv_available()
                        for _payload, fds in ready:
                            close_fds(fds)
                        got += len(ready)
                        if eof:
                            break
                    else:
                        raise AssertionError("recv_available never saw the end of the stream")
                if how == "recv_available" and len(ours._buf) > ours._pos:
                    return "end of stream inside a frame"  # what recv() reports as EOFError
                return "decoded" if got else "nothing"
            finally:
                theirs.close()
                ours.close()

        harness.run(example, (CorruptDataError, EOFError))

    channel()
    harness.report()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_channel_framing_refuses_corrupt_frames():
    """Frames whose header announces any size (up to 2**48) and any number
    of descriptors, followed by too few or too many bytes and descriptors,
    decode, end in EOFError (the stream ended inside a frame), or raise
    CorruptDataError before anything of the announced size is allocated."""
    summary = fuzz_in_child("channel", EXAMPLES["channel"])
    outcomes = summary["outcomes"]
    assert outcomes.get("CorruptDataError", 0) > 0, outcomes
    assert outcomes.get("EOFError", 0) + outcomes.get("end of stream inside a frame", 0) > 0, outcomes
    assert outcomes.get("decoded", 0) > 0, outcomes


# -- the queue's ring ---------------------------------------------------------------


def fuzz_ring(examples: int) -> None:
    from hypothesis import strategies as st

    from shoal import Queue, SerializationError
    from shoal._ipc import _ring
    from shoal._ipc._packet import MEMFD, close_fds
    from shoal.exceptions import CorruptDataError

    harness = Harness("ring")
    fields = {
        "head": (_ring._HEAD, "<q"),
        "tail": (_ring._TAIL, "<q"),
        "puts": (_ring._PUTS, "<q"),
        "gets": (_ring._GETS, "<q"),
        "seq": (_ring._SEQ, "<q"),
        "capacity": (_ring._CAPACITY, "<q"),
        "unfinished": (_ring._UNFINISHED, "<q"),
        "not_empty": (_ring._NOT_EMPTY, "<I"),
        "record length": (None, "<I"),
        "record kind": (None, "<I"),
        "data": (None, "<Q"),
    }
    value = st.one_of(
        st.sampled_from(INTERESTING).map(lambda n: n % (1 << 63)),
        st.integers(-(1 << 63), (1 << 63) - 1),
        st.integers(-64, 4200),
    )
    corruption = st.tuples(st.sampled_from(sorted(fields)), value, st.integers(0, 4095))
    op = st.sampled_from(
        (
            "get_nowait",
            "get",
            "get_many",
            "put",
            "put_many",
            "put_large",
            "put_inline",
            "put_unbounded",
            "qsize",
            "attach",
            "datagram",
        )
    )

    @_given(
        examples,
        st.lists(st.integers(0, 1500), max_size=6),
        st.lists(corruption, min_size=1, max_size=3),
        st.lists(op, min_size=1, max_size=6),
        st.integers(1, 6),
        st.binary(max_size=24),
    )
    def ring(items, corruptions, ops, maxsize, datagram):
        # Bounded, so that no put leaves an item to a feeder thread; the
        # unbounded paths are called on the ring itself (put_inline, put_unbounded).
        q = Queue(maxsize, capacity=4096)
        try:
            for n in items[:maxsize]:
                q.put(bytes(n))
            mm = mmap.mmap(q._ring.fd, _ring._DATA + 4096)  # another process's view of the same memory
            try:
                for name, number, where in corruptions:
                    offset, fmt = fields[name]
                    if offset is None:  # inside the records: at the head, or anywhere
                        head = struct.unpack_from("<q", mm, _ring._HEAD)[0] % 4096
                        at = head if where % 2 else where & ~7
                        offset = _ring._DATA + min(at + (4 if name == "record kind" else 0), 4096 - 8)
                    size = struct.calcsize(fmt)
                    mm[offset : offset + size] = (number % (1 << (8 * size))).to_bytes(size, "little")
            finally:
                mm.close()
            for i, what in enumerate(ops):
                harness.run(lambda what=what: _ring_op(q, what, datagram), ring_errors, new_example=i == 0)
        finally:
            q.close()

    ring_errors = (CorruptDataError, queue.Empty, queue.Full, SerializationError)

    def _ring_op(q, what, datagram):
        if what == "get_nowait":
            q.get_nowait()
        elif what == "get":
            q.get(timeout=0.01)
        elif what == "get_many":
            q.get_many(5, timeout=0.01)
        elif what == "put":
            q.put(b"p" * 40, timeout=0.01)
        elif what == "put_many":
            q.put_many([b"m" * 200] * 3, timeout=0.01)
        elif what == "put_large":
            q.put(b"L" * 5000, timeout=0.01)  # larger than a quarter of the ring: a datagram
        elif what == "put_inline":
            q._ring.put_inline(b"i" * 24)
        elif what == "put_unbounded":
            q._ring.put([(b"u" * 100, None, None)] * 3, q._writer, 0, 0.0)
        elif what == "qsize":
            q.qsize()
            q.empty()
        elif what == "attach":
            fd = os.dup(q._ring.fd)
            try:
                _ring.Ring(fd=fd).close()
                fd = -1
            finally:
                if fd >= 0:
                    os.close(fd)
        elif what == "datagram":
            # A producer's datagram for the record at the head: its tag,
            # then a fuzzed body (a memfd header of any length, or not).
            tag = struct.unpack_from("<q", q._ring.mm, _ring._SEQ)[0]
            fd = _memfd(64)
            try:
                q._writer.sendmsg([bytes([MEMFD]), struct.pack("<q", tag), datagram], _rights([fd]))
            finally:
                close_fds([fd])
            q.get_nowait()
        else:
            raise AssertionError(what)

    ring()
    harness.report()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_queue_ring_refuses_corrupt_shared_memory():
    """A queue whose ring another process overwrote (positions, capacity,
    counters, record lengths and kinds, any data word) and whose socket
    carries a fuzzed datagram: every get, put, qsize and attach works,
    reports Empty / Full, or raises CorruptDataError; none reads or writes
    outside the ring or waits for room that cannot come."""
    summary = fuzz_in_child("ring", EXAMPLES["ring"])
    outcomes = summary["outcomes"]
    assert outcomes.get("CorruptDataError", 0) > 0, outcomes
    assert outcomes.get("decoded", 0) > 0, outcomes


# -- out-of-band buffers ------------------------------------------------------------


def fuzz_out_of_band(examples: int) -> None:
    import errno

    from hypothesis import strategies as st

    from shoal._fd import FAULTS
    from shoal._serialization import _pickling
    from shoal.exceptions import CorruptDataError

    harness = Harness("out_of_band")
    span = st.tuples(
        st.one_of(st.integers(-8192, 1 << 20), st.sampled_from(INTERESTING)),
        st.one_of(st.integers(-8192, 1 << 20), st.sampled_from(INTERESTING)),
    )

    @_given(
        examples,
        st.integers(0, 1 << 20),  # the memfd's real size
        st.one_of(st.integers(-1, 1 << 21), _sizes()),  # the announced size
        st.lists(span, max_size=4),
        st.booleans(),
        st.booleans(),
        st.booleans(),
    )
    def oob(real, size, spans, leased, writable, copy):
        fd = _memfd(real, b"\x07")

        def example():
            if copy:  # the path taken when no mapping can be made: a copy
                FAULTS["map"] = errno.EMFILE
            try:
                views = _pickling._rebuild_oob(os.dup, (fd,), size, spans, leased, writable)
            finally:
                FAULTS.pop("map", None)
            assert [v.nbytes for v in views] == [n for _off, n in spans]
            for v in views:
                v.release()

        try:
            harness.run(example, (CorruptDataError,))
        finally:
            os.close(fd)

    oob()
    harness.report()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_out_of_band_layout_is_checked():
    """Out-of-band buffer descriptors (the segment's size, each buffer's
    offset and length) that lie outside the segment, or a segment announced
    larger than its memfd or than the machine, raise CorruptDataError; valid
    ones map exactly the announced lengths, on every path (mapped privately
    or shared, leased, copied near the descriptor limit)."""
    summary = fuzz_in_child("out_of_band", EXAMPLES["out_of_band"])
    outcomes = summary["outcomes"]
    assert outcomes.get("CorruptDataError", 0) > 0, outcomes
    assert outcomes.get("decoded", 0) > 0, outcomes


# -- SharedDict's memory -------------------------------------------------------------

#: Word offsets in a SharedDict's memory (see src/native/dict.h).
_H_FILE_SIZE, _H_DESC, _H_GEN, _H_MAX_SIZE = 8, 16, 24, 32
_R_SIZE, _R_LGCAP, _R_NENTRIES, _R_COUNT, _R_HEAP_TOP = 0, 8, 16, 24, 32


def _dict_layout(mm) -> dict[str, int]:
    """Offsets of the words of a SharedDict's current region."""
    from shoal import _native

    desc = struct.unpack_from("<Q", mm, _H_DESC)[0]
    off, lg = desc & ~63, desc & 63
    cap = 1 << lg
    idx = off + _native.DICT_REGION_HEADER
    ent = idx + cap * 8
    return {"region": off, "index": idx, "entries": ent, "heap": ent + cap // 2 * _native.DICT_ENTRY_SIZE}


def _corrupt_from_another_process(fd: int, size: int, writes: list[tuple[int, bytes]]) -> None:
    """Write *writes* (offset, bytes) into the dict's memory from a forked
    process with a mapping of its own, as a buggy or hostile peer would."""
    from helpers import wait_child

    pid = os.fork()
    if pid == 0:
        try:
            with mmap.mmap(fd, size) as mm:
                for offset, data in writes:
                    mm[offset : offset + len(data)] = data
        finally:
            os._exit(0)
    assert wait_child(pid) == 0


def fuzz_shared_dict(examples: int) -> None:
    from hypothesis import strategies as st

    from shoal import SharedDict, _native
    from shoal.exceptions import CorruptDataError

    harness = Harness("shared_dict")
    targets = (
        "magic",
        "file_size",
        "desc",
        "gen",
        "max_size",
        "region size",
        "lgcap",
        "nentries",
        "count",
        "heap_top",
        "index slot",
        "entry hash",
        "entry key",
        "entry value",
        "key length",
        "value length",
        "value tag",
        "any word",
        "any byte",
    )
    value = st.one_of(
        st.sampled_from(INTERESTING),
        st.integers(0, (1 << 64) - 1),
        st.integers(0, 70_000),  # offsets inside and just past the file
        st.integers(-64, 64),  # nudges to what is there (applied as a delta)
    )
    corruption = st.tuples(st.sampled_from(targets), value, st.integers(0, 1 << 16))
    op = st.sampled_from(
        (
            "get",
            "get missing",
            "len",
            "keys",
            "items",
            "values",
            "copy",
            "set",
            "set new",
            "delete",
            "pop",
            "popitem",
            "incr",
            "update",
            "setdefault",
            "clear",
            "locked get",
            "attach",
            "check",
        )
    )

    def writes_for(mm, target: str, number: int, where: int) -> list[tuple[int, bytes]]:
        layout = _dict_layout(mm)
        nent = max(1, struct.unpack_from("<Q", mm, layout["region"] + _R_NENTRIES)[0] % 64)
        entry = layout["entries"] + (where % nent) * _native.DICT_ENTRY_SIZE
        fixed = {
            "magic": 0,
            "file_size": _H_FILE_SIZE,
            "desc": _H_DESC,
            "gen": _H_GEN,
            "max_size": _H_MAX_SIZE,
            "region size": layout["region"] + _R_SIZE,
            "lgcap": layout["region"] + _R_LGCAP,
            "nentries": layout["region"] + _R_NENTRIES,
            "count": layout["region"] + _R_COUNT,
            "heap_top": layout["region"] + _R_HEAP_TOP,
            "index slot": layout["index"] + (where % 8) * 8,
            "entry hash": entry,
            "entry key": entry + 8,
            "entry value": entry + 16,
        }
        if target in fixed:
            offset = fixed[target]
        elif target in ("key length", "value length", "value tag"):
            ref = struct.unpack_from("<Q", mm, entry + (8 if target == "key length" else 16))[0]
            if ref & 1 or ref + 16 > len(mm):  # an inline int: no block
                return []
            offset = ref + (8 if target == "value tag" else 0)
        elif target == "any word":
            offset = (where * 8) % (len(mm) - 8)
        else:
            return [(where % len(mm), bytes([number & 0xFF]))]
        if target == "value tag":
            return [(offset, bytes([number & 0xFF]))]
        old = struct.unpack_from("<Q", mm, offset)[0]
        new = (old + number) if -64 <= number <= 64 else number
        return [(offset, (new % (1 << 64)).to_bytes(8, "little"))]

    @_given(
        examples,
        st.integers(0, 12),
        st.lists(corruption, min_size=1, max_size=3),
        st.lists(op, min_size=1, max_size=5),
    )
    def shared_dict(n, corruptions, ops):
        d = SharedDict(max_size=4 << 20)
        try:
            for i in range(n):
                d[f"k{i}"] = (i, f"v{i}" * i, b"b" * i, i / 4, None)[i % 5]
            if n > 2:
                del d["k1"]
            size = os.fstat(d._fd).st_size
            with mmap.mmap(d._fd, size) as mm:
                writes = [w for t, number, where in corruptions for w in writes_for(mm, t, number, where)]
            _corrupt_from_another_process(d._fd, size, writes)
            for i, what in enumerate(ops):
                harness.run(lambda what=what: _dict_op(d, what), (CorruptDataError, KeyError), i == 0)
        finally:
            d.close()

    def _dict_op(d, what):
        if what == "get":
            d.get("k0")
            d.get("k3")
        elif what == "get missing":
            assert "nope" not in d
        elif what == "len":
            assert len(d) >= 0
        elif what == "keys":
            list(d.keys())
        elif what == "items":
            list(d.items())
        elif what == "values":
            list(d.values())
        elif what == "copy":
            d.copy()
        elif what == "set":
            d["k0"] = "changed"
        elif what == "set new":
            d["new"] = 12345
        elif what == "delete":
            del d["k2"]
        elif what == "pop":
            d.pop("k3", None)
        elif what == "popitem":
            d.popitem()
        elif what == "incr":
            d.incr("counter")
        elif what == "update":
            d.update({f"u{i}": "x" * (50 * i) for i in range(20)})  # grows: a rebuild
        elif what == "setdefault":
            d.setdefault("k4", 0)
        elif what == "clear":
            d.clear()
        elif what == "locked get":
            with d.locked(timeout=5):
                d.get("k0")
        elif what == "attach":
            try:
                SharedDict._from_fd(os.dup(d._fd)).close()
            except MemoryError as exc:
                # A max_size a creator could reserve and this process cannot
                # (AddressSanitizer's shadow takes part of the address space):
                # the error says so, and nothing was allocated or left open.
                if "cannot reserve" not in str(exc):
                    raise
                return "refused: no address space for its max_size"
        elif what == "check":
            _native.dict_check(d._map)
        else:
            raise AssertionError(what)

    shared_dict()
    harness.report()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_shared_dict_refuses_corrupt_shared_memory():
    """A live SharedDict whose memory another process overwrote (header
    words, region geometry, index slots, entries, block lengths, value tags,
    any word or byte): every read, write, growth, attach and check of it
    works or raises CorruptDataError (KeyError for a key it no longer
    finds); no access outside the file (SIGBUS), no misaligned access, no
    hang, no allocation the size of a corrupt length."""
    summary = fuzz_in_child("shared_dict", EXAMPLES["shared_dict"])
    outcomes = summary["outcomes"]
    assert outcomes.get("CorruptDataError", 0) > 0, outcomes
    assert outcomes.get("decoded", 0) > 0, outcomes


def test_a_shared_dict_whose_max_size_is_the_whole_address_space_is_refused():
    # No process can reserve all of it, so no creator made such a dict: it
    # is corrupt.  Attaching it raised MemoryError ("cannot reserve
    # 140737488355328 bytes of address space"), found by the SharedDict fuzz
    # under AddressSanitizer.
    import mmap
    import struct

    from shoal import CorruptDataError, SharedDict

    d = SharedDict(max_size=4 << 20)
    try:
        with mmap.mmap(d._fd, os.fstat(d._fd).st_size) as mm:
            struct.pack_into("<Q", mm, 32, 1 << 47)  # the header's max_size
        fd = os.dup(d._fd)
        with pytest.raises(CorruptDataError, match="max_size of 140737488355328"):
            SharedDict._from_fd(fd)
        with pytest.raises(OSError):
            os.fstat(fd)  # closed by the refusal
    finally:
        d.close()


def test_shared_dict_refuses_a_corrupt_lock_type():
    """The lock's type word (glibc's __kind, 16 bytes into the mutex at 64)
    overwritten by another process: every value but the one shoal writes
    raises CorruptDataError at the next lock.  It used to reach glibc,
    which aborted on a priority-protected type (0x40), trapped on the
    elision bit (0x100) or followed the robust-list pointers beside it.
    Found by test_shared_dict_refuses_corrupt_shared_memory ("any byte")."""
    run_code(
        """
        import mmap, os
        from shoal import CorruptDataError, SharedDict

        for kind in (0x40, 0x41, 0x42, 0xC2, 0x100, 0x01, 0x02, 0x12, 0x22, 0xFFFFFFFF):
            d = SharedDict(max_size=4 << 20)
            try:
                d["k0"] = 1
                with mmap.mmap(d._fd, os.fstat(d._fd).st_size) as mm:
                    good = mm[80:84]
                    mm[80:84] = kind.to_bytes(4, "little")
                for op in (lambda: d.__setitem__("k1", "x"), d.clear, lambda: d.pop("k0"), d.popitem):
                    try:
                        op()
                    except CorruptDataError as exc:
                        assert "lock's type word" in str(exc), exc
                    else:
                        raise AssertionError(f"kind {kind:#x}: no CorruptDataError")
                assert d.get("k0") == 1  # lock-free reads still work
                with mmap.mmap(d._fd, os.fstat(d._fd).st_size) as mm:
                    mm[80:84] = good
                d["k1"] = "x"  # and the restored lock works again
            finally:
                d.close()
        """
    )


@pytest.mark.slow  # several seconds: the whole suite runs it, the quick subset does not
def test_shared_dict_refuses_a_lock_word_naming_a_live_thread_that_does_not_hold_it():
    """The lock's futex word overwritten with the id of a thread that exists
    (1, a kernel thread, the parent) but never took the lock: the next
    locker waited forever (the fuzz above hung in d[k] = v).  Now it raises
    CorruptDataError within a few seconds: the mutex's owner field never
    named that thread."""
    run_code(
        """
        import mmap, os, time
        from shoal import CorruptDataError, SharedDict

        for word in (1, 2, os.getppid()):
            d = SharedDict(max_size=4 << 20)
            try:
                with mmap.mmap(d._fd, os.fstat(d._fd).st_size) as mm:
                    mm[64:68] = word.to_bytes(4, "little")
                started = time.monotonic()
                try:
                    d["k"] = 1
                except CorruptDataError as exc:
                    assert "held by no live thread" in str(exc), exc
                else:
                    raise AssertionError(f"word {word}: no CorruptDataError")
                assert time.monotonic() - started < 10
            finally:
                d.close()
        """,
        timeout=60,
    )


# -- pool workers' results ------------------------------------------------------------


def fuzz_results(examples: int) -> None:
    import multiprocessing
    import multiprocessing.forkserver
    import pickle

    from hypothesis import strategies as st

    from shoal import Pool, SerializationError, WorkerDiedError, _native
    from shoal._engine import _worker
    from shoal.exceptions import CorruptDataError
    from workers import square, write_to_own_channel

    harness = Harness("results")
    anything = st.one_of(
        st.none(),
        st.integers(-3, 5),
        st.integers(-(1 << 70), 1 << 70),
        st.floats(allow_nan=False),
        st.binary(max_size=16),
        st.text(max_size=8),
    )
    small_list = st.lists(anything, max_size=4)
    body = st.one_of(
        st.tuples(  # a RESULTS body: parallel lists, maybe of the wrong lengths or types
            st.lists(st.integers(-1, 4), max_size=3) | anything,
            small_list | anything,
            st.none() | st.lists(st.integers(-2, 3), max_size=3) | anything,
            st.lists(st.one_of(st.integers(-1, 3), st.floats(0, 1), anything), max_size=7) | anything,
        ),
        st.tuples(anything, anything),
        anything,
    )
    message = st.one_of(
        st.tuples(st.sampled_from((_worker.RESULTS, _worker.READY, _worker.RETIRE, _worker.EXITED)), body),
        st.tuples(st.integers(-2, 99), anything),
        st.just((_worker.RESULTS, ([_worker.RAW], ["forged"], None, []))),  # well formed: a forged result
        st.tuples(anything),
        anything,
    )
    frame = st.one_of(
        message.map(lambda m: pickle.dumps(m)),  # a pickle of a message that is not one
        st.binary(max_size=40),  # not a pickle
    ).flatmap(
        lambda payload: st.tuples(
            st.just(payload),
            st.sampled_from((len(payload),)) | _sizes().map(lambda n: n & ((1 << 48) - 1)),
            st.integers(0, 3),
        )
    )
    garbage = st.one_of(
        frame.map(lambda f: struct.pack("<Q", f[1] | (f[2] << 48)) + f[0]),  # a header, a payload
        st.binary(max_size=40),  # not even a frame header
    )
    # Workers forked from this process, which has just closed a pool (whose
    # threads may still be ending); except under AddressSanitizer
    # (tools/sanitize), whose allocator a child forked then can find locked
    # for good: there from a server process without threads (slower).
    if "libasan" in os.environ.get("LD_PRELOAD", ""):
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["shoal", "workers"])  # imported once, not by each worker
        multiprocessing.forkserver.ensure_running()  # its descriptors are not an example's
    else:
        context = multiprocessing.get_context("fork")

    @_given(examples, garbage, st.integers(0, 2), always=((b"", 0),))  # nothing written: its value
    def results(data, nfds):
        def example():
            with Pool(1, context=context) as pool:
                try:
                    outcome = f"returned {pool.apply_async(write_to_own_channel, (data, nfds)).get(30)!r:.12}"
                except (CorruptDataError, SerializationError, WorkerDiedError) as exc:
                    _check_message(exc)
                    outcome = type(exc).__name__
                # The pool goes on: at most the call after it fails too (it
                # may be running on the worker when its corrupt message is read).
                for attempt in range(2):
                    try:
                        assert pool.apply(square, (7,)) == 49
                        break
                    except CorruptDataError:
                        assert attempt == 0
                pool.close()
                pool.join()
            return outcome

        harness.run(example, ())

    results()

    # The native loop that delivers plain results, given lists that do not
    # match (lengths, types): an error or an index, never a read past a list.
    @_given(
        examples,
        st.lists(st.one_of(anything, st.just(_native.Task)), max_size=4),
        st.lists(st.integers(-1, 3) | anything, max_size=4),
        small_list,
        st.integers(-2, 6),
    )
    def deliver(tasks, kinds, values, start):
        def example():
            _native.deliver_plain(tasks, kinds, values, start, _worker.RAW)

        harness.run(example, (TypeError, ValueError))

    deliver()
    harness.report()


@pytest.mark.parametrize("message", [(0, None), (3, ("maxtasksperchild", 1))], ids=["READY", "RETIRE"])
def test_descriptors_beside_a_message_that_carries_none_are_refused(message):
    # The results fuzz, under AddressSanitizer on CI: a READY message (its
    # kind and body well formed) that came with a descriptor was taken, and
    # nothing closed the descriptor, which the pool's process kept for good.
    import pickle

    from shoal import CorruptDataError, Pool
    from workers import square, write_to_own_channel

    payload = pickle.dumps(message)
    frame = struct.pack("<Q", len(payload) | (1 << 48)) + payload
    with Pool(1) as pool:
        with pytest.raises(CorruptDataError, match="brought 1 descriptors"):
            pool.apply(write_to_own_channel, (frame, 1))
        assert pool.apply(square, (7,)) == 49  # a new worker
    # (the leak check of conftest.py finds a descriptor left open)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_pool_survives_workers_that_send_corrupt_results():
    """A task writes garbage onto its worker's channel to the pool: bytes
    that are not a frame, frames of any announced size and descriptor count,
    pickles of messages of unknown kinds or malformed bodies (lists of the
    wrong lengths or types, counts that do not add up, durations of zero
    items), a forged result.  Before, the first such message killed the
    pool's scheduler ("this is a bug in shoal") and failed every task; now
    the worker is killed and replaced, its running task fails with
    CorruptDataError, and the pool goes on."""
    summary = fuzz_in_child("results", EXAMPLES["results"])
    outcomes = summary["outcomes"]
    assert outcomes.get("CorruptDataError", 0) > 0, outcomes
    assert any(o.startswith("returned") for o in outcomes), outcomes
    assert outcomes.get("TypeError", 0) + outcomes.get("ValueError", 0) > 0, outcomes


# -- actors: requests and replies --------------------------------------------------------


class Counter:
    """The object the actor fuzz calls."""

    def __init__(self) -> None:
        self.n = 0

    def incr(self, k: int = 1) -> int:
        self.n += k
        return self.n


def _payloads():
    """What a peer might put in an actor datagram: bytes that are not a
    pickle, and pickles of messages of the wrong shape (arguments that are
    valid pickles of plain data: the fuzz is about the envelope)."""
    import pickle

    from hypothesis import strategies as st

    blob = st.sampled_from(
        (
            pickle.dumps(((), None)),
            pickle.dumps(((2,), None)),
            pickle.dumps("not a tuple"),
            b"",
            b"\x80\x05\xff",  # a pickle header, then an invalid opcode
        )
    )
    plain = st.one_of(st.none(), st.integers(-3, 3), st.text(max_size=6), st.binary(max_size=6), blob)
    name = st.sampled_from(("incr", "nope", "_private", "__class__")) | st.text(max_size=6)
    message = st.one_of(
        st.tuples(st.just(0), st.integers(-1, 5) | plain, name | plain, blob | plain),  # CALL
        st.tuples(st.just(0), st.integers(0, 5), name, blob, st.tuples(st.text(max_size=4) | st.none())),
        st.tuples(st.just(1), st.lists(st.tuples(name, blob, st.integers(-1, 2)), max_size=3)),  # SEND
        st.tuples(st.just(1), plain),
        st.just((2,)),  # STOP, from a connection that is not the creator's
        st.tuples(st.integers(-2, 9), plain),
        st.tuples(plain, plain, plain),  # what a reply looks like
        plain,
    )
    return st.one_of(message.map(pickle.dumps), st.binary(max_size=40))


def fuzz_actor_server(examples: int) -> None:
    import select

    from hypothesis import strategies as st

    from shoal import Actor
    from shoal._ipc._packet import BYTES, MEMFD, close_fds

    harness = Harness("actor_server")
    handle = Actor(Counter)
    handle.incr(0)  # the handle's first call makes its lane, which lives as long as its connection
    datagram = st.one_of(
        st.tuples(st.sampled_from((0, BYTES)), _payloads()),
        st.tuples(st.sampled_from((MEMFD,)), _sizes().map(lambda n: n.to_bytes(8, "little"))),
        st.tuples(st.integers(0, 255), st.binary(max_size=24)),
    )

    @_given(examples, datagram, st.sampled_from(DESCRIPTORS))
    def server(datagram, descriptor):
        kind, body = datagram
        fds = _descriptor(descriptor, 64)

        def example():
            peer = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                peer.connect(handle._address)
                anc = _rights(fds)
                peer.sendmsg([bytes([kind]) + body], anc)
                close_fds(fds)
                fds.clear()
                # The actor answers, refuses (text, then the end), or says
                # nothing (a SEND); either way it serves the others.
                before = handle.incr(0)
                assert isinstance(before, int)
                if not select.select([peer], [], [], 0.5)[0]:
                    return "nothing"
                data, anc, _flags, _addr = peer.recvmsg(1 << 16, socket.CMSG_SPACE(64 * 4))
                for _level, _type, raw in anc:
                    close_fds(struct.unpack(f"{len(raw) // 4}i", raw[: len(raw) // 4 * 4]))
                if not data:
                    return "closed"
                if data[0] & BYTES:
                    assert b"refused" in data, data
                    return "refused"
                return "reply"
            finally:
                close_fds(fds)
                peer.close()

        harness.run(example, ())

    try:
        server()
        assert handle.incr(0) >= 0  # still there after all of it
    finally:
        handle.close()
    harness.report()


def fuzz_actor_client(examples: int) -> None:
    import pickle
    import threading

    from hypothesis import strategies as st

    from shoal import ActorDiedError, SerializationError
    from shoal._actor import _clients, _rebuild_handle
    from shoal._actor._protocol import LANE
    from shoal._ipc._packet import MEMFD, close_fds, recv_packet
    from shoal.exceptions import CorruptDataError

    harness = Harness("actor_client")
    reply = st.one_of(
        st.tuples(st.sampled_from((0,)), _payloads()),
        st.tuples(st.sampled_from((MEMFD,)), _sizes().map(lambda n: n.to_bytes(8, "little"))),
        st.tuples(st.integers(0, 255), st.binary(max_size=24)),
        # a reply to the call made, with a result or an error that is garbage or a value
        st.tuples(
            st.just("to the call"),
            st.booleans(),
            st.sampled_from((pickle.dumps(5), b"\x80\x05\xff", pickle.dumps("x") + b"trailing")),
        ),
    )
    count = iter(range(1 << 30))

    @_given(examples, reply, st.sampled_from(DESCRIPTORS))
    def client(reply, descriptor):
        fds = _descriptor(descriptor, 64)
        address = f"\0shoal-fuzz-actor-{os.getpid()}-{next(count)}"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        listener.bind(address)
        listener.listen(1)

        def fake_actor():
            conn, _ = listener.accept()
            with conn:
                _kind, request, got = recv_packet(conn)
                close_fds(got)
                if pickle.loads(request)[0] == LANE:  # the handle's lane: declined, so the call comes here
                    conn.sendmsg(
                        [bytes([0]) + pickle.dumps((pickle.loads(request)[1], True, pickle.dumps(False)))]
                    )
                    _kind, request, got = recv_packet(conn)
                    close_fds(got)
                if reply[0] == "to the call":
                    cid = pickle.loads(request)[1]
                    data = bytes([0]) + pickle.dumps((cid, reply[1], reply[2]))
                else:
                    data = bytes([reply[0]]) + reply[1]
                anc = _rights(fds)
                conn.sendmsg([data], anc)
                close_fds(fds)
                fds.clear()
            # and the connection ends: a call still waiting learns the actor is gone

        def example():
            thread = threading.Thread(target=fake_actor, daemon=True)
            thread.start()
            handle = _rebuild_handle(address, os.getpid(), "Fake", ("incr",))
            try:
                return f"returned {handle.incr()!r:.12}"
            finally:
                handle.close()
                client = _clients.pop(address, None)
                if client is not None:
                    client.close()
                thread.join(30)

        try:
            harness.run(example, (CorruptDataError, ActorDiedError, SerializationError))
        finally:
            listener.close()
            close_fds(fds)

    client()
    harness.report()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_actor_refuses_malformed_requests_and_goes_on():
    """A peer of the same user (no other is served) sends the actor
    datagrams of any kind byte and body, with any descriptors: bytes that
    are not a pickle, requests of unknown kinds or of the wrong shape (a
    CALL without a name, a SEND whose entries count descriptors that never
    came), STOP from a connection that is not the creator's.  Before, a
    malformed SEND or a CALL too short raised out of the actor's loop and
    the actor died, and any unknown kind stopped it; now it tells that peer
    why, as text, drops the connection, and goes on serving the others."""
    summary = fuzz_in_child("actor_server", EXAMPLES["actor_server"])
    outcomes = summary["outcomes"]
    assert outcomes.get("refused", 0) > 0, outcomes
    assert outcomes.get("reply", 0) + outcomes.get("nothing", 0) > 0, outcomes


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_actor_handle_refuses_malformed_replies():
    """An "actor" (a socket of the same user) replies to a call with a
    datagram of any kind byte and body: not a pickle, not a (call id, ok,
    bytes) reply, a memfd header of any size, a reply whose result does not
    unpickle.  The call returns the value, or raises CorruptDataError
    (ActorDiedError once the connection ends, SerializationError for a
    result that does not unpickle); it never hangs."""
    summary = fuzz_in_child("actor_client", EXAMPLES["actor_client"])
    outcomes = summary["outcomes"]
    assert outcomes.get("CorruptDataError", 0) > 0, outcomes
    assert any(o.startswith("returned") for o in outcomes), outcomes


def test_shared_memory_cannot_be_shrunk_under_its_mappings():
    """A page of a mapping beyond the end of its file is SIGBUS, so a
    process holding a SharedDict's or a queue's memfd could crash every
    process using it by truncating it.  shoal's memfds are sealed against
    shrinking (ftruncate fails with EPERM, and the structure works on), and
    a SharedDict or a ring received as a memfd without that seal is refused
    with CorruptDataError."""
    out = run_code(
        """
        import os
        from shoal import CorruptDataError, Queue, SharedDict
        from shoal._ipc._ring import Ring

        d = SharedDict({"a": 1}, max_size=1 << 20)
        q = Queue()
        q.put(2)
        for fd in (d._fd, q._ring.fd):
            try:
                os.ftruncate(fd, 0)
                print("shrunk")
            except PermissionError:
                print("refused")
        print(d["a"], q.get(timeout=5))
        for fd, attach in ((d._fd, SharedDict._from_fd), (q._ring.fd, Ring)):
            size = os.fstat(fd).st_size
            copy = os.memfd_create("same bytes, no seal", os.MFD_CLOEXEC)
            os.pwrite(copy, os.pread(fd, size, 0), 0)
            try:
                attach(fd=copy) if attach is Ring else attach(copy)
                print("attached")
            except CorruptDataError as exc:
                print("refused:", "can shrink" in str(exc))
            finally:
                if attach is Ring:
                    os.close(copy)
        d.close()
        q.close()
        """
    )
    assert out.split("\n")[:5] == ["refused", "refused", "1 2", "refused: True", "refused: True"], out


# -- the robust mutexes in shared memory ------------------------------------------------

#: Words written over a lock (glibc's pthread_mutex_t: the futex word first,
#: the mutex kind at offset 16): a holder that does not exist, the waiters
#: bit without any holder, and a kind that is no mutex.
_LOCK_CORRUPTIONS = {
    "dead holder": (0, "<I", "pid_max + 1"),
    "no holder, waiters": (0, "<I", 0x80000000),
    "not a mutex": (16, "<i", 0x7777),
}


@pytest.mark.slow  # several seconds: the whole suite runs it, the quick subset does not
def test_a_corrupt_lock_raises_instead_of_waiting_forever():
    """The lock of a SharedDict and the two locks of a queue's ring, whose
    bytes another process overwrote: naming a thread that does not exist as
    the holder (the kernel marks a holder that died; nothing marks this), no
    holder but waiters, or no mutex at all.  Before, a writer waited forever
    (or got a bare EINVAL); now it raises CorruptDataError within about a
    second of waiting."""
    out = run_code(
        f"""
        import mmap, os, struct, time
        from shoal import CorruptDataError, Queue, SharedDict
        from shoal._ipc import _ring

        with open("/proc/sys/kernel/pid_max") as f:
            pid_max = int(f.read())
        corruptions = {_LOCK_CORRUPTIONS!r}

        def corrupt(fd, base, offset, fmt, value):
            with mmap.mmap(fd, 4096) as mm:
                struct.pack_into(fmt, mm, base + offset, eval(value) if isinstance(value, str) else value)

        def outcome(fn):
            start = time.monotonic()
            try:
                fn()
                return "no error"
            except CorruptDataError as exc:
                assert "not shoal of this version" in str(exc), exc
                return f"CorruptDataError after {{time.monotonic() - start:.0f}} s"

        for name, (offset, fmt, value) in corruptions.items():
            d = SharedDict({{"a": 1}}, max_size=1 << 20)
            corrupt(d._fd, 64, offset, fmt, value)
            print("dict", name, outcome(lambda: d.__setitem__("b", 2)))
            d.close()
            for lock, op in ((_ring._PMUTEX, "put"), (_ring._CMUTEX, "get")):
                q = Queue(4)
                q.put(1)
                corrupt(q._ring.fd, lock, offset, fmt, value)
                act = (lambda: q.put(2, timeout=30)) if op == "put" else (lambda: q.get(timeout=30))
                print(f"queue {{op}}", name, outcome(act))
                q.close()
        """,
        timeout=100,
    )
    lines = out.strip().splitlines()
    assert len(lines) == 9, out
    for line in lines:
        assert line.endswith(("CorruptDataError after 0 s", "CorruptDataError after 1 s")), line


@pytest.mark.slow  # several seconds: the whole suite runs it, the quick subset does not
def test_a_lock_held_for_seconds_by_a_live_process_is_waited_for():
    """The other side of the check above: a holder that exists is waited
    for, however long it holds the lock (here 2.5 s, past the one-second
    look at the holder)."""
    out = run_code(
        """
        import multiprocessing, time
        from shoal import SharedDict

        def hold(d, ready):
            with d.locked():
                ready.set()
                time.sleep(2.5)
                d["held"] = True

        if __name__ == "__main__":
            d = SharedDict(max_size=1 << 20)
            ready = multiprocessing.get_context("fork").Event()
            p = multiprocessing.get_context("fork").Process(target=hold, args=(d, ready))
            p.start()
            ready.wait(30)
            start = time.monotonic()
            d["mine"] = 1
            waited = time.monotonic() - start
            p.join(30)
            print(d["held"], d["mine"], waited > 1.5, p.exitcode)
            d.close()
        """
    )
    assert out.split() == ["True", "1", "True", "0"]


if __name__ == "__main__":  # pragma: no cover - `python tests/test_hostile_bytes.py NAME N` runs one fuzz
    globals()[f"fuzz_{sys.argv[1]}"](int(sys.argv[2]))
