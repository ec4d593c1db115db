"""The native core, exercised from Python: atomics, the robust mutex, futex
wait/wake and the stable hash, within one process and across processes."""

from __future__ import annotations

import mmap
import multiprocessing
import os
import signal
import struct
import time

import pytest

from helpers import run_code, run_ok, run_processes, wait_until
from shoal import _native
from shoal._fd import Segment

# -- atomics -------------------------------------------------------------------


def test_load_store_fetch_add_compare_exchange():
    buf = bytearray(64)
    _native.store(buf, 8, -5)
    assert _native.load(buf, 8) == -5
    assert struct.unpack_from("<q", buf, 8)[0] == -5
    assert _native.fetch_add(buf, 8, 7) == -5
    assert _native.load(buf, 8) == 2
    assert _native.compare_exchange(buf, 8, 3, 100) == 2  # expected wrong: unchanged
    assert _native.load(buf, 8) == 2
    assert _native.compare_exchange(buf, 8, 2, 100) == 2  # swapped
    assert _native.load(buf, 8) == 100


def test_fetch_add_wraps_like_int64():
    buf = bytearray(8)
    _native.store(buf, 0, 2**63 - 1)
    assert _native.fetch_add(buf, 0, 1) == 2**63 - 1
    assert _native.load(buf, 0) == -(2**63)


@pytest.mark.parametrize(
    ("offset", "error", "message"),
    [
        (64, IndexError, "out of range"),
        (60, IndexError, "out of range"),
        (-8, IndexError, "out of range"),
        (4, ValueError, "aligned"),
    ],
)
def test_bad_offsets_raise_clear_errors(offset, error, message):
    buf = bytearray(64)
    with pytest.raises(error, match=message):
        _native.load(buf, offset)


def test_read_only_buffer_is_refused():
    with pytest.raises((TypeError, BufferError)):
        _native.store(b"\0" * 16, 0, 1)


def _add_many(segment: Segment, n: int) -> None:
    for _ in range(n):
        _native.fetch_add(segment.mmap, 0, 1)


def test_fetch_add_is_atomic_across_processes(start_method):
    ctx = multiprocessing.get_context(start_method)
    with Segment(4096) as seg:
        assert run_processes(ctx, _add_many, [(seg, 20_000)] * 3, timeout=30) == [0, 0, 0]
        assert _native.load(seg.mmap, 0) == 60_000


# -- robust mutex --------------------------------------------------------------


def test_mutex_acquire_release_and_timeout():
    buf = mmap.mmap(-1, 4096)
    try:
        _native.mutex_init(buf, 64)
        assert _native.mutex_acquire(buf, 64) is False
        # Same thread again: an error, not a hang.
        with pytest.raises(RuntimeError, match="already holds"):
            _native.mutex_acquire(buf, 64, 0.05)
        _native.mutex_release(buf, 64)
        with pytest.raises(RuntimeError, match="does not hold"):
            _native.mutex_release(buf, 64)
    finally:
        buf.close()


def _hold_and_report(seg: Segment, ready, release) -> None:
    _native.mutex_acquire(seg.mmap, 64)
    ready.set()
    release.wait(30)
    _native.mutex_release(seg.mmap, 64)


def test_mutex_timeout_while_another_process_holds_it(start_method):
    ctx = multiprocessing.get_context(start_method)
    ready, release = ctx.Event(), ctx.Event()
    with Segment(4096) as seg:
        _native.mutex_init(seg.mmap, 64)
        p = ctx.Process(target=_hold_and_report, args=(seg, ready, release))
        p.start()
        try:
            assert ready.wait(30)
            t0 = time.monotonic()
            with pytest.raises(TimeoutError):
                _native.mutex_acquire(seg.mmap, 64, 0.2)
            assert time.monotonic() - t0 >= 0.19
        finally:
            release.set()
            p.join(30)
        assert p.exitcode == 0
        assert _native.mutex_acquire(seg.mmap, 64, 10) is False
        _native.mutex_release(seg.mmap, 64)


def _lock_and_die(seg: Segment) -> None:
    _native.mutex_acquire(seg.mmap, 64)
    os.kill(os.getpid(), signal.SIGKILL)


def test_mutex_owner_death_is_reported_and_recoverable(start_method):
    ctx = multiprocessing.get_context(start_method)
    with Segment(4096) as seg:
        _native.mutex_init(seg.mmap, 64)
        p = ctx.Process(target=_lock_and_die, args=(seg,))
        p.start()
        p.join(30)
        assert p.exitcode == -signal.SIGKILL
        assert _native.mutex_acquire(seg.mmap, 64, 10) is True  # owner died
        _native.mutex_consistent(seg.mmap, 64)
        _native.mutex_release(seg.mmap, 64)
        assert _native.mutex_acquire(seg.mmap, 64, 10) is False  # healthy again
        _native.mutex_release(seg.mmap, 64)


def test_mutex_released_without_repair_becomes_unusable():
    ctx = multiprocessing.get_context("fork")
    with Segment(4096) as seg:
        _native.mutex_init(seg.mmap, 64)
        p = ctx.Process(target=_lock_and_die, args=(seg,))
        p.start()
        p.join(30)
        assert _native.mutex_acquire(seg.mmap, 64, 10) is True
        _native.mutex_release(seg.mmap, 64)  # without mutex_consistent
        with pytest.raises(OSError, match="unusable"):
            _native.mutex_acquire(seg.mmap, 64, 1)


def _locked_increments(seg: Segment, n: int) -> None:
    for _ in range(n):
        _native.mutex_acquire(seg.mmap, 64)
        # A plain (non-atomic) read-modify-write: only the mutex makes it safe.
        (v,) = struct.unpack_from("<q", seg.mmap, 0)
        struct.pack_into("<q", seg.mmap, 0, v + 1)
        _native.mutex_release(seg.mmap, 64)


@pytest.mark.slow
def test_mutex_gives_mutual_exclusion_across_processes(fork_or_spawn):
    ctx = multiprocessing.get_context(fork_or_spawn)
    with Segment(4096) as seg:
        _native.mutex_init(seg.mmap, 64)
        assert run_processes(ctx, _locked_increments, [(seg, 5_000)] * 3) == [0, 0, 0]
        assert struct.unpack_from("<q", seg.mmap, 0)[0] == 15_000


def test_mutex_checks_bounds():
    with pytest.raises(IndexError):
        _native.mutex_init(bytearray(16), 0)


# -- futex ---------------------------------------------------------------------


def test_futex_wait_times_out_or_returns_when_value_differs():
    buf = mmap.mmap(-1, 4096)
    try:
        t0 = time.monotonic()
        assert _native.futex_wait(buf, 0, 0, 0.05) is False
        assert time.monotonic() - t0 >= 0.04
        assert _native.futex_wait(buf, 0, 1, 5) is True  # value is 0, not 1: no sleep
        assert _native.futex_wake(buf, 0) == 0
        with pytest.raises(ValueError, match="aligned"):
            _native.futex_wait(buf, 2, 0, 0)
    finally:
        buf.close()


def _futex_waiter(seg: Segment) -> None:
    _native.store(seg.mmap, 8, 1)  # "I am about to wait"
    while struct.unpack_from("<I", seg.mmap, 0)[0] == 0:
        _native.futex_wait(seg.mmap, 0, 0, 10)
    _native.store(seg.mmap, 8, 2)


def test_futex_wake_wakes_a_waiter_in_another_process(start_method):
    ctx = multiprocessing.get_context(start_method)
    with Segment(4096) as seg:
        p = ctx.Process(target=_futex_waiter, args=(seg,))
        p.start()
        assert wait_until(lambda: _native.load(seg.mmap, 8) == 1, interval=0.005)
        time.sleep(0.05)  # let it go to sleep in the kernel
        struct.pack_into("<I", seg.mmap, 0, 1)
        _native.futex_wake(seg.mmap, 0, 1)
        p.join(30)
        assert p.exitcode == 0
        assert _native.load(seg.mmap, 8) == 2


# -- stable hash ---------------------------------------------------------------


def test_hash64_matches_xxh64_reference_values():
    assert _native.hash64(b"") == 0xEF46DB3751D8E999
    assert _native.hash64(b"abc") == 0x44BC2CF5AD770999
    data = bytes(range(256)) * 3
    # Every length through all code paths, and any bytes-like object.
    assert len({_native.hash64(data[:n]) for n in range(len(data))}) == len(data)
    assert _native.hash64(memoryview(data)) == _native.hash64(bytearray(data))
    assert _native.hash64(b"abc", 1) != _native.hash64(b"abc")


def test_hash64_is_the_same_in_processes_with_different_hash_seeds():
    code = "from shoal import _native; print(_native.hash64(b'shoal' * 11), hash('shoal'))"
    outputs = []
    for seed in ("1", "2"):
        outputs.append(run_ok("-c", code, env={"PYTHONHASHSEED": seed}).split())
    assert outputs[0][0] == outputs[1][0] == str(_native.hash64(b"shoal" * 11))
    assert outputs[0][1] != outputs[1][1]  # while hash() does differ


# -- the dict mapping object ---------------------------------------------------


def test_dict_functions_refuse_other_objects_and_closed_mappings():
    with pytest.raises(TypeError, match="Mapping"):
        _native.dict_get(bytearray(4096), b"k", None)
    fd = os.memfd_create("t", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 8192)
        m = _native.Mapping(fd, 1 << 20)
        _native.dict_init(m, 8192)
        assert _native.dict_put(m, b"sk", 5)
        assert _native.dict_get(m, b"sk", None) == 5
        m.close()
        with pytest.raises(ValueError, match="closed"):
            _native.dict_get(m, b"sk", None)
    finally:
        os.close(fd)


# -- Region: a mapping of received memory that keeps no descriptor --------------


def _memfd_with(data: bytes) -> int:
    fd = os.memfd_create("test-region")
    os.write(fd, data)
    return fd


def test_a_region_reads_the_file_and_keeps_no_descriptor():
    data = bytes(range(256)) * 64
    fd = _memfd_with(data)
    before = set(os.listdir("/proc/self/fd"))
    shared = memoryview(_native.Region(fd, len(data), False))
    private = memoryview(_native.Region(fd, len(data), True))
    assert set(os.listdir("/proc/self/fd")) == before  # mmap.mmap would hold two dups
    os.close(fd)
    assert bytes(shared) == bytes(private) == data  # still mapped with the file's descriptor closed
    assert shared.readonly and not private.readonly
    with pytest.raises(TypeError):
        shared[0] = 1


def test_a_writable_region_is_private_and_a_shared_one_sees_the_file_change():
    fd = _memfd_with(b"abcd" * 1024)
    shared = memoryview(_native.Region(fd, 4096, False))
    private = memoryview(_native.Region(fd, 4096, True))
    private[0:2] = b"XY"
    assert os.pread(fd, 4, 0) == b"abcd"  # copy-on-write: the file is unchanged
    os.pwrite(fd, b"Z", 3)
    assert bytes(shared[:4]) == b"abcZ"
    assert bytes(private[:4]) == b"XYcd"  # its copied page keeps this process's bytes
    os.close(fd)


def test_a_region_keeps_its_open_file_description_and_its_lock_until_unmapped():
    # The lease of shoal/_fd/_warm.py: a lock on a description that only
    # the mapping holds still tells the sender the segment is being read.
    from shoal._fd._warm import is_leased, open_lease

    fd = _memfd_with(b"x" * 4096)
    lease = open_lease(fd, os.O_RDONLY)
    view = memoryview(_native.Region(lease, 4096, True))
    os.close(lease)
    assert is_leased(fd)
    view.release()
    assert not is_leased(fd)
    os.close(fd)


def test_a_region_refuses_a_short_file_or_an_empty_length_instead_of_faulting():
    fd = _memfd_with(b"x" * 100)
    with pytest.raises(ValueError, match="holds 100 bytes, fewer than the 8192"):
        _native.Region(fd, 8192, False)  # reading page 2 would be SIGBUS
    with pytest.raises(ValueError, match="at least 1 byte"):
        _native.Region(fd, 0, True)
    os.close(fd)
    with pytest.raises(OSError):
        _native.Region(fd, 100, False)  # closed


# -- misuse of the private API (regressions from review 2) ----------------------


# Bug 8. Before: a mapping of a short or foreign file faulted (SIGBUS).
def test_native_mapping_checks_the_file_instead_of_faulting():
    out = run_code(
        """
        import os
        from shoal import _native as n
        from shoal import SharedDict
        def attempt(f):
            try:
                f()
                return "no error"
            except Exception as e:
                return type(e).__name__
        empty = os.memfd_create("x")
        page = os.memfd_create("y")
        os.ftruncate(page, 4096)
        print(attempt(lambda: n.Mapping(empty, 4096)))
        print(attempt(lambda: n.dict_len(n.Mapping(page, 4096))))
        print(attempt(lambda: n.dict_init(n.Mapping(page, 1 << 20), 1 << 20)))
        print(attempt(lambda: SharedDict._from_fd(os.dup(empty))))
        print(attempt(lambda: SharedDict._from_fd(os.dup(page))))
        m = n.Mapping(page, 1 << 20)
        n.dict_init(m, 4096)                  # what fits: writes that do not fit say so
        print(n.dict_put(m, b"sk", b"b" + b"x" * 100000), n.dict_len(m))
        """
    )
    # A file that is not a SharedDict is CorruptDataError where it is
    # received or used (its bytes are not what shoal writes).
    errors = ["ValueError", "CorruptDataError", "ValueError", "CorruptDataError", "CorruptDataError"]
    assert out.split("\n")[:6] == [*errors, "False 0"]


# Review 2, bug 10. Before: timeout=inf was refused and an expected value
# beyond 32 bits was accepted.
def test_futex_wait_infinite_timeout_and_out_of_range_expected():
    buf = bytearray(8)  # the word is 0
    assert _native.futex_wait(buf, 0, 1, float("inf")) is True  # differs: returns at once
    assert _native.futex_wait(buf, 0, 1, 1e20) is True
    assert _native.futex_wait(buf, 0, -1, 5) is True  # 0xffffffff != 0
    for bad in (2**32, -(2**31) - 1, 2**64):
        with pytest.raises(OverflowError):
            _native.futex_wait(buf, 0, bad, 0)
    assert _native.futex_wait(buf, 0, 2**32 - 1, 5) is True


# -- the pool's result object and the scheduler's loops (issue 14 review) ------


# Before: a result object made without __init__ (its fields NULL), or one
# whose _task/_engine was deleted, crashed the interpreter when delivered
# to or read (a decref of NULL).
def test_a_result_object_without_its_fields_raises_or_answers_instead_of_crashing():
    out = run_code(
        """
        import shoal
        from shoal import _native
        def attempt(f):
            try:
                return repr(f())
            except Exception as e:
                return type(e).__name__
        def fresh():
            return shoal.AsyncResult.__new__(shoal.AsyncResult)
        r = fresh()
        print(attempt(lambda: r.deliver(None, True, 5)), attempt(r.get))
        r = fresh()
        print(attempt(lambda: r.deliver(None, False, ValueError("x"))), attempt(r.get))
        r = fresh()
        r._ready = r._success = True
        print(attempt(r.get))
        s = _native.ResultSlot.__new__(_native.ResultSlot)
        print(attempt(lambda: s.deliver(None, True, 1)))
        for name in ("_task", "_engine", "_pool"):
            r = shoal.AsyncResult(None)
            delattr(r, name)
            print(attempt(lambda: r.deliver(None, True, 7)), attempt(r.get))
        """
    )
    assert out.split("\n")[:7] == [
        "None 5",
        "None ValueError",
        "None",
        "None",
        "None 7",
        "None 7",
        "None 7",
    ]


# Before: a result kind too large for a C long left OverflowError set while
# deliver_plain returned (SystemError); a negative start read out of bounds.
def test_deliver_plain_refuses_what_it_cannot_deliver():
    task = _native.Task(1, 0, None, 0, b"", (), None)
    assert _native.deliver_plain([task], [2**80], [1], 0, 2) == 0  # not RAW: the general path's
    assert task.sink is None  # untouched
    with pytest.raises(ValueError, match="start"):
        _native.deliver_plain([task], [2], [1], -1, 2)


# Before: deleting a task's field left it NULL, and the scheduler's C loops
# (deliver_plain, batch_columns) crashed on it.
def test_a_task_field_cannot_be_deleted():
    out = run_code(
        """
        from shoal import _native
        task = _native.Task(1, 0, None, 0, b"", (), None)
        for name in ("id", "fds", "sink", "timeout"):
            try:
                delattr(task, name)
                print("deleted")
            except AttributeError:
                print("refused")
        print(_native.deliver_plain([task], [1], [1], 0, 2), _native.batch_columns([task]))
        """
    )
    assert out.split("\n")[:5] == ["refused"] * 4 + ["0 ([1], [0], [0], [b''], None, 0)"]
