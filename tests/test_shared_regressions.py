"""Regression tests for the second SharedDict review (each names its bug).

Scenarios that crashed the interpreter before their fix run in a child
interpreter (``run``), so that a regression fails one test instead of
killing the session.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import textwrap
import threading

import pytest

from shoal import SharedDict, _native


def run(code: str) -> str:
    """Run *code* in a fresh interpreter; it must exit 0.  Returns stdout."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, f"rc={proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


def _lock_briefly(d: SharedDict, q) -> None:
    try:
        with d.locked(timeout=10):
            q.put("locked")
    except BaseException as exc:  # reported to the test
        q.put(repr(exc))


def other_process_can_lock(d: SharedDict) -> bool:
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_lock_briefly, args=(d, q))
    p.start()
    try:
        return q.get(timeout=30) == "locked"
    finally:
        p.join()
        q.close()
        q.join_thread()


# -- bug 1: close() while the lock is held --------------------------------------


def test_close_inside_locked_releases_the_lock_when_the_block_ends():
    d = SharedDict({"a": 1})
    keep = SharedDict._from_fd(os.dup(d._fd))
    try:
        with d.locked():
            d.close()
            with pytest.raises(ValueError, match="closed"):
                d["a"]
        assert d.closed
        assert other_process_can_lock(keep)
        # This thread's robust-mutex list is intact: locking another dict works.
        with SharedDict() as d2:
            d2["c"] = 3
            with d2.locked():
                d2["c"] += 1
            assert d2["c"] == 4
    finally:
        keep.close()


def test_close_from_another_thread_while_a_thread_holds_the_lock():
    out = run(
        """
        import os, threading
        from shoal import SharedDict
        import multiprocessing as mp

        def lock_it(d, q):
            with d.locked(timeout=10):
                q.put("locked")

        d = SharedDict({"n": 0})
        keep = SharedDict._from_fd(os.dup(d._fd))
        other = SharedDict()
        inside, closed = threading.Event(), threading.Event()
        seen = []
        def worker():
            with d.locked():
                inside.set()
                closed.wait(10)
                try:
                    d.incr("n")
                except ValueError as e:
                    seen.append(str(e))
            other["x"] = 1               # the thread's robust list is intact
            with other.locked():
                other["x"] += 1
            seen.append(other["x"])
        t = threading.Thread(target=worker)
        t.start()
        inside.wait(10)
        d.close()
        closed.set()
        t.join()
        ctx = mp.get_context("fork")
        q = ctx.Queue()
        p = ctx.Process(target=lock_it, args=(keep, q))
        p.start()
        print(seen, q.get(timeout=30))
        p.join()
        keep.close()
        """
    )
    assert out.strip() == "['operation on a closed SharedDict', 2] locked"


def test_manager_shutdown_while_a_thread_is_inside_locked():
    out = run(
        """
        import threading
        import shoal
        m = shoal.Manager()
        d = m.dict(count=0)
        other = shoal.SharedDict()   # mapped before d is unmapped, as in real programs
        inside, done = threading.Event(), threading.Event()
        res = []
        def worker():
            try:
                with d.locked():
                    inside.set()
                    done.wait(10)
                    d.incr("count")
            except ValueError as e:
                res.append("ValueError")
            other["x"] = 1
            res.append(other["x"])
        t = threading.Thread(target=worker)
        t.start()
        inside.wait(10)
        m.shutdown()
        done.set()
        t.join()
        print(res)
        """
    )
    assert out.strip() == "['ValueError', 1]"


# -- bug 3: close() while a native operation is reading ---------------------------


def test_finalizer_closing_the_dict_during_items_does_not_crash():
    out = run(
        """
        import gc
        from shoal import SharedDict, _native
        d = SharedDict({i: i for i in range(5000)})
        class Closer:
            def __del__(self):
                d.close()
        gc.collect()
        a = Closer(); a.self = a; del a   # collected by a GC run inside dict_items
        items = _native.dict_items(d._map, 2)
        print(len(items), d.closed)
        """
    )
    assert out.strip() == "5000 True"


def test_unpickling_that_closes_the_dict_during_pop_does_not_crash():
    out = run(
        """
        from shoal import SharedDict
        D = None
        def close_on_load(tag):
            D.close()
            return tag
        class Closes:
            def __init__(self, tag): self.tag = tag
            def __reduce__(self): return (close_on_load, (self.tag,))
        D = SharedDict({"a": 1, "victim": Closes("v"), "b": 2})
        print(D.pop("victim"), D.closed)
        """
    )
    assert out.strip() == "v True"


# -- bug 2: a signal while locked() waits ------------------------------------------


class _Interrupted(Exception):
    pass


def _hold_then_signal(d: SharedDict, started, go) -> None:
    with d.locked():
        started.set()
        go.wait(30)
        # The parent is waiting for the lock by now: make its signal pending,
        # then let it have the lock.  It handles the signal only after
        # acquiring, when dict_lock has returned.
        import time

        time.sleep(0.2)
        os.kill(os.getppid(), __import__("signal").SIGUSR1)


def test_signal_delivered_as_locked_acquires_does_not_leak_the_lock():
    import signal

    def handler(signum, frame):
        raise _Interrupted

    old = signal.signal(signal.SIGUSR1, handler)
    ctx = multiprocessing.get_context("fork")
    try:
        with SharedDict({"a": 1}) as d:
            for _ in range(3):
                started, go = ctx.Event(), ctx.Event()
                p = ctx.Process(target=_hold_then_signal, args=(d, started, go))
                p.start()
                assert started.wait(30)
                go.set()
                with pytest.raises(_Interrupted):
                    with d.locked():
                        # the interrupt lands here (or while waiting), never
                        # between the acquisition and the block
                        for _ in range(1000):
                            pass
                p.join()
                assert not _native.dict_held(d._map)
            assert other_process_can_lock(d)
    finally:
        signal.signal(signal.SIGUSR1, old)


# -- bug 4: repair after a dead holder must not reclaim heap space -----------------


def _region_words(d: SharedDict) -> tuple[int, int]:
    """(heap_top of the current region, gen), read from the file."""
    import struct

    header = os.pread(d._fd, 32, 0)
    desc, gen = struct.unpack_from("<QQ", header, 16)
    (top,) = struct.unpack("<Q", os.pread(d._fd, 8, (desc & ~63) + 32))
    return top, gen


def _die_holding(d: SharedDict) -> None:
    d.locked().__enter__()
    os._exit(0)


def test_repair_after_a_dead_holder_never_lowers_the_heap_top_and_moves_gen():
    with SharedDict() as d:
        d["k"] = 0
        d["k"] = b"A" * 10000  # a block at the top of the heap...
        d["k"] = 5  # ...no longer referenced, but a reader may be copying it
        top, gen = _region_words(d)
        ctx = multiprocessing.get_context("fork")
        p = ctx.Process(target=_die_holding, args=(d,))
        p.start()
        p.join()
        with d.locked():  # owner died: repaired here
            pass
        new_top, new_gen = _region_words(d)
        assert new_top >= top, "repair reclaimed a block a reader may be copying"
        assert new_gen > gen
        assert _native.dict_check(d._map) == 1 and d["k"] == 5


# -- bug 7: pop / popitem whose unpickling writes to the dict ----------------------

_REENTRANT: SharedDict | None = None


def _grow_on_load(tag):
    assert _REENTRANT is not None
    _REENTRANT["filler"] = "y" * 200_000  # forces a rebuild into a new region
    return tag


class _GrowsOnLoad:
    def __init__(self, tag):
        self.tag = tag

    def __reduce__(self):
        return (_grow_on_load, (self.tag,))


class _FailsOnLoad:
    def __reduce__(self):
        return (_fail_on_load, ())


def _fail_on_load():
    raise LookupError("cannot rebuild this value here")


@pytest.mark.parametrize("how", ["popitem", "pop"])
def test_pop_whose_unpickling_rebuilds_the_dict_removes_the_item(how):
    global _REENTRANT
    with SharedDict({"victim": _GrowsOnLoad("v")}) as d:
        _REENTRANT = d
        try:
            got = d.popitem() if how == "popitem" else ("victim", d.pop("victim"))
        finally:
            _REENTRANT = None
        assert got == ("victim", "v")
        assert "victim" not in d and list(d) == ["filler"] and len(d) == 1
        assert _native.dict_check(d._map) == 1


def test_pop_of_a_value_that_cannot_be_unpickled_removes_it_and_raises():
    with SharedDict({"a": 1, "bad": _FailsOnLoad()}) as d:
        with pytest.raises(LookupError):
            d.pop("bad")
        assert "bad" not in d and d.popitem() == ("a", 1)


# -- bug 8: the private native API raises instead of SIGBUS --------------------------


def test_native_mapping_checks_the_file_instead_of_faulting():
    out = run(
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
    assert out.split("\n")[:6] == ["ValueError"] * 5 + ["False 0"]


# -- bug 10: NaN lookups, futex arguments, two handles in one process ---------------


def test_nan_lookups_miss_like_a_dict(d_nan=float("nan")):
    with SharedDict({1: "one"}) as d:
        for key in (d_nan, (1, d_nan)):
            assert key not in d
            assert d.get(key) is None and d.get(key, 5) == 5
            assert d.pop(key, None) is None
            with pytest.raises(KeyError):
                d[key]
            with pytest.raises(KeyError):
                del d[key]
            with pytest.raises(KeyError):
                d.pop(key)
            with pytest.raises(TypeError, match="NaN"):
                d[key] = 1
        assert d == {1: "one"}
    with pytest.raises(ValueError, match="closed"):
        d.get(d_nan)


def test_futex_wait_infinite_timeout_and_out_of_range_expected():
    buf = bytearray(8)  # the word is 0
    assert _native.futex_wait(buf, 0, 1, float("inf")) is True  # differs: returns at once
    assert _native.futex_wait(buf, 0, 1, 1e20) is True
    assert _native.futex_wait(buf, 0, -1, 5) is True  # 0xffffffff != 0
    for bad in (2**32, -(2**31) - 1, 2**64):
        with pytest.raises(OverflowError):
            _native.futex_wait(buf, 0, bad, 0)
    assert _native.futex_wait(buf, 0, 2**32 - 1, 5) is True


def test_two_handles_to_one_dict_in_one_thread_share_the_lock():
    with SharedDict({"n": 0}) as d, SharedDict._from_fd(os.dup(d._fd)) as d2:
        with d.locked():
            d2.incr("n")  # the thread holds the lock through d: no deadlock, no error
            d2["big"] = "x" * 100_000  # a write that grows the dict under d's lock
            with d2.locked():
                d2["n"] += 1
            assert not _native.dict_held(d2._map)
            assert _native.dict_held(d._map)
        assert d["n"] == 2 and len(d2["big"]) == 100_000
        assert not _native.dict_held(d._map)
        assert other_process_can_lock(d2)


# -- bug 6: keys Python treats as equal are one key ----------------------------------


def _key_bytes_under_hash_seed(seed: str) -> str:
    code = """
        from dataclasses import dataclass
        from shoal._shm._dict import _encode_key
        @dataclass(frozen=True)
        class Tagged:
            name: object
            tags: object
        print(_encode_key(Tagged("x", frozenset({"alpha", "beta", "gamma", "delta", "eps"}))).hex())
        print(_encode_key(Tagged("x", ("k", frozenset({"a", "b", "c", "d"})))).hex())
    """
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONHASHSEED": seed},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_pickled_keys_encode_alike_under_every_hash_seed():
    # Spawned processes have different hash seeds; a key holding a set must
    # be found by all of them.
    outs = {_key_bytes_under_hash_seed(seed) for seed in ("1", "2", "3", "4", "5")}
    assert len(outs) == 1


@__import__("dataclasses").dataclass(frozen=True)
class _Pt:
    x: object
    y: object


def test_equal_keys_are_one_key():
    from collections import namedtuple

    Pt = _Pt
    Tagged = namedtuple("Tagged", "a b")

    class Name(str):
        pass

    s1, s2 = "".join(["ab", "cd"]), "".join(["ab", "cd"])
    with SharedDict() as d:
        d[Pt(s1, s1)] = 1  # pickle's memo would record the shared sub-object
        assert d[Pt(s1, s2)] == 1
        d[Pt(s1, s2)] = 2
        assert len(d) == 1
        d[Tagged(1, 2)] = "nt"
        assert d[(1, 2)] == "nt" and (1, 2) in d
        d[Name("k")] = "str subclass"
        assert d["k"] == "str subclass"
        assert len(d) == 3
        assert _native.dict_check(d._map) == 3


def test_numpy_scalars_are_the_equal_python_numbers():
    np = pytest.importorskip("numpy")
    with SharedDict({1: "one", 2.5: "two and a half"}) as d:
        assert np.int64(1) in d and d[np.float64(2.5)] == "two and a half"
        assert d[np.float32(2.5)] == "two and a half"
        d[np.int64(1)] = "numpy one"
        assert len(d) == 2 and d[1] == "numpy one"
        assert np.float64("nan") not in d
        with pytest.raises(TypeError, match="NaN"):
            d[np.float64("nan")] = 1


def test_enum_keys_keep_their_type():
    import enum

    with SharedDict() as d:
        d[_Color.RED] = "red"
        assert d[_Color.RED] == "red" and list(d) == [_Color.RED]
        assert type(list(d)[0]) is _Color
        assert isinstance(_Color.RED, enum.Enum)


class _Color(__import__("enum").IntEnum):
    RED = 1


# -- bug 9: out of address space -------------------------------------------------------


def test_no_address_space_for_another_dict_is_a_memoryerror_that_says_what_to_do():
    out = run(
        """
        import resource
        from shoal import SharedDict
        keep = SharedDict(max_size=1 << 20)
        with open("/proc/self/status") as f:
            vm = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmSize"))
        resource.setrlimit(resource.RLIMIT_AS, (vm + (64 << 20), resource.RLIM_INFINITY))
        try:
            SharedDict(max_size=1 << 36)
        except MemoryError as e:
            print("MemoryError", "max_size" in str(e) and "close" in str(e))
        keep["still"] = "works"
        print(keep["still"])
        """
    )
    assert out.split() == ["MemoryError", "True", "works"]


# -- bug 5 (documented, not changed): readers do not see transactions -----------------


def _mover(d: SharedDict, stop) -> None:
    while not stop.is_set():
        with d.locked():
            d.incr("a", -10)
            d.incr("b", 10)
        with d.locked():
            d.incr("b", -10)
            d.incr("a", 10)


def test_copy_inside_locked_is_a_snapshot_of_other_processes_transactions():
    # What the docs promise since review 2: lock-free reads may see half a
    # transaction; a copy taken inside locked() never does.
    ctx = multiprocessing.get_context("fork")
    with SharedDict({"a": 1000, "b": 1000}) as d:
        stop = ctx.Event()
        p = ctx.Process(target=_mover, args=(d, stop))
        p.start()
        try:
            totals = set()
            for _ in range(300):
                with d.locked():
                    totals.add(sum(d.copy().values()))
        finally:
            stop.set()
            p.join()
        assert totals == {2000}
    assert "not one snapshot" in SharedDict.copy.__doc__
    assert "Lock-free *readers*" in SharedDict.locked.__doc__


# -- suspected in review 2: a thread that ends holding the lock ------------------------


def test_a_thread_that_ends_holding_the_lock_does_not_make_the_next_thread_an_owner():
    with SharedDict({"n": 0}) as d:
        t = threading.Thread(target=lambda: d.locked().__enter__())  # misuse: never released
        t.start()
        t.join()
        seen = {}

        def later():  # glibc gives this thread the dead one's pthread_t
            seen["before"] = _native.dict_held(d._map)
            with d.locked():  # owner died: this thread takes the lock and repairs
                d["x"] = 1
            seen["after"] = _native.dict_held(d._map)

        t = threading.Thread(target=later)
        t.start()
        t.join()
        assert seen == {"before": False, "after": False}
        assert other_process_can_lock(d)
        assert _native.dict_check(d._map) == 2
