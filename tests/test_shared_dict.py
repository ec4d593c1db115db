"""SharedDict: the MutableMapping API against a plain dict, race-free
operations from several processes under every start method and hash seed,
growth while others read and write, bad input, and lifetime."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import threading

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import shoal
from helpers import run_code, run_ok, run_processes
from shoal import SharedDict, _native


@pytest.fixture
def d():
    with SharedDict() as sd:
        yield sd


def check(sd: SharedDict) -> int:
    """Every structural invariant holds (raises otherwise); returns len."""
    return _native.dict_check(sd._map)


# -- the mapping API -------------------------------------------------------------


def test_basic_mapping_api(d):
    d["a"] = 1
    d["b"] = "two"
    d[3] = [3.0]
    assert d["a"] == 1 and d["b"] == "two" and d[3] == [3.0]
    assert len(d) == 3 and "a" in d and "zz" not in d
    assert list(d) == ["a", "b", 3]  # insertion order, like dict
    assert list(d.keys()) == ["a", "b", 3]
    assert list(d.values()) == [1, "two", [3.0]]
    assert list(d.items()) == [("a", 1), ("b", "two"), (3, [3.0])]
    assert d.get("zz") is None and d.get("zz", 5) == 5
    assert d == {"a": 1, "b": "two", 3: [3.0]} and d != {"a": 1}
    assert d.copy() == {"a": 1, "b": "two", 3: [3.0]} and type(d.copy()) is dict
    with pytest.raises(KeyError):
        d["zz"]
    with pytest.raises(KeyError):
        del d["zz"]
    del d["a"]
    assert "a" not in d and len(d) == 2
    d["a"] = 9  # re-inserted at the end, like dict
    assert list(d) == ["b", 3, "a"]
    assert d.pop("b") == "two" and d.pop("b", None) is None
    with pytest.raises(KeyError):
        d.pop("b")
    assert d.setdefault("a", 0) == 9 and d.setdefault("n", 0) == 0
    assert d.popitem() == ("n", 0)
    d.update({"x": 1}, y=2)
    d.update([("z", 3)])
    assert d == {3: [3.0], "a": 9, "x": 1, "y": 2, "z": 3}
    d.clear()
    assert len(d) == 0 and d == {} and list(d) == []
    with pytest.raises(KeyError):
        d.popitem()
    check(d)


def test_values_of_every_kind_round_trip(d):
    values = [
        0, -1, 2**62 - 1, -(2**62), 2**62, -(2**62) - 1, 10**40, 1.5, float("inf"), -0.0,
        "", "é\U0001f600", "\udc80", b"", b"\0\xff", None, True, False,
        [1, [2]], {"n": {1, 2}}, (1, "a"), bytearray(b"xy"), complex(1, 2),
    ]  # fmt: skip
    for i, v in enumerate(values):
        d[i] = v
    for i, v in enumerate(values):
        got = d[i]
        assert got == v and type(got) is type(v), (v, got)
    check(d)


def test_keys_are_canonical_like_dict_keys(d):
    d[1] = "one"
    assert d[1.0] == "one" and d[True] == "one"
    d[1.0] = "uno"
    assert len(d) == 1 and d[1] == "uno"
    key = ("a" * 3, ("b", 2), frozenset({1, 2}), None, b"x", 2.5)
    twin = ("".join(["a", "aa"]), ("b", 2), frozenset([2, 1]), None, b"x", 2.5)
    d[key] = 1
    assert d[twin] == 1 and list(d)[-1] == key
    with pytest.raises(TypeError, match="unhashable"):
        d[[1, 2]] = 3
    with pytest.raises(TypeError):
        d[float("nan")] = 1
    assert len(d) == 2


def test_incr_and_update_with(d):
    assert d.incr("n") == 1
    assert d.incr("n", 5) == 6
    assert d.incr("m", 2, default=10) == 12
    assert d.incr("n", -7) == -1
    d["f"] = 0.5
    assert d.incr("f", 1) == 1.5  # not an inline int: the locked slow path
    d["big"] = 2**62 - 1
    assert d.incr("big") == 2**62  # crosses out of the inline range
    assert d.incr("big", -1) == 2**62 - 1
    assert d.update_with("s", lambda v: v + "x", default="") == "x"
    assert d.update_with("s", lambda v: v * 3) == "xxx"
    with pytest.raises(ZeroDivisionError):
        d.update_with("s", lambda v: 1 / 0)
    assert d["s"] == "xxx"  # nothing changed
    d["t"] = "text"
    # The error names the key and what is stored there, not just "can only
    # concatenate str".
    with pytest.raises(TypeError, match=r"SharedDict.incr\('t', 1\).*of type str \('text'\)"):
        d.incr("t")
    with pytest.raises(TypeError, match=r"incr\('n', 'x'\): cannot add str .* of type int"):
        d.incr("n", "x")
    assert d["t"] == "text"
    assert d["n"] == -1
    check(d)


def test_locked_is_a_reentrant_transaction(d):
    d["count"] = 0
    with d.locked():
        d["count"] += 1
        with d.locked():
            d.incr("count")
            d["other"] = d.get("other", 0) + 1
    assert d["count"] == 2 and d["other"] == 1


def _hold_lock(sd, ready, release):
    with sd.locked():
        ready.set()
        release.wait(30)


def test_locked_timeout_and_other_threads_wait(d):
    ready, release = threading.Event(), threading.Event()
    t = threading.Thread(target=_hold_lock, args=(d, ready, release))
    t.start()
    try:
        assert ready.wait(10)
        with pytest.raises(TimeoutError), d.locked(timeout=0.1):
            pass
        assert d.get("x") is None  # reads never wait for the lock
    finally:
        release.set()
        t.join(10)
    with d.locked(timeout=5):
        d["x"] = 1


def test_str_is_a_plain_dict_repr_like_the_manager_proxy(d):
    d["count"] = 0
    assert str(d) == "{'count': 0}"
    assert repr(d) == "SharedDict({'count': 0})"
    assert SharedDict.__module__ == "shoal" and shoal.SharedDict is SharedDict


# -- bad input -------------------------------------------------------------------


def test_unpicklable_value_or_key_raises_typeerror_and_stores_nothing(d):
    d["keep"] = 1
    lock = threading.Lock()
    with pytest.raises(TypeError, match="lock"):
        d["x"] = lock
    with pytest.raises(TypeError, match="lock"):
        d["x"] = {"inner": [1, lock]}
    with pytest.raises(TypeError, match="lock"):
        d[("k", lock)] = 1
    with pytest.raises(TypeError, match="lock"):
        d.update({"a": 1, "b": lock})
    with pytest.raises(TypeError, match="lock"):
        d.update_with("keep", lambda v: lock)
    assert d == {"keep": 1}
    with pytest.raises(TypeError) as info:
        d["x"] = lock
    assert isinstance(info.value, shoal.SerializationError)
    check(d)


def test_too_large_raises_memoryerror_and_keeps_the_dict():
    with SharedDict({"a": 1}, max_size=1 << 20) as d:
        for i in range(100):
            d[i] = "v" * 100
        with pytest.raises(MemoryError, match="max_size"):
            d["huge"] = b"x" * (2 << 20)
        assert "huge" not in d and d["a"] == 1 and len(d) == 101
        d["small"] = 2  # still usable
        assert check(d) == 102


# -- hypothesis: the MutableMapping API against a plain dict ---------------------

keys = st.one_of(st.integers(-3, 40), st.text(max_size=4), st.tuples(st.integers(0, 3), st.text(max_size=2)))
values = st.one_of(
    st.integers(), st.text(max_size=30), st.binary(max_size=30), st.floats(allow_nan=False), st.none(),
    st.lists(st.integers(), max_size=4),
)  # fmt: skip


class DictMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.sd = SharedDict()
        self.model: dict = {}

    @rule(k=keys, v=values)
    def set(self, k, v):
        self.sd[k] = v
        self.model[k] = v

    @rule(k=keys)
    def delete(self, k):
        if k in self.model:
            del self.sd[k]
            del self.model[k]
        else:
            with pytest.raises(KeyError):
                del self.sd[k]

    @rule(k=keys, v=values)
    def pop_or_setdefault(self, k, v):
        assert self.sd.pop(k, "d") == self.model.pop(k, "d")
        assert self.sd.setdefault(k, v) == self.model.setdefault(k, v)

    @precondition(lambda self: self.model)
    @rule()
    def popitem(self):
        assert self.sd.popitem() == self.model.popitem()

    @rule(k=keys, n=st.integers(-5, 5))
    def incr(self, k, n):
        current = self.model.get(k, 0)
        if type(current) is not int:
            return
        self.model[k] = current + n
        assert self.sd.incr(k, n) == current + n

    @rule(items=st.dictionaries(keys, values, max_size=20))
    def update(self, items):
        self.sd.update(items)
        self.model.update(items)

    @rule()
    def clear_sometimes(self):
        if len(self.model) > 30:
            self.sd.clear()
            self.model.clear()

    @invariant()
    def same_contents(self):
        assert len(self.sd) == len(self.model)
        assert list(self.sd.items()) == list(self.model.items())

    def teardown(self):
        check(self.sd)
        self.sd.close()


TestDictMachine = DictMachine.TestCase
TestDictMachine.settings = settings(max_examples=40, stateful_step_count=40, deadline=None)
pytest.mark.slow(TestDictMachine)


# -- several processes -----------------------------------------------------------


def _hammer(sd: SharedDict, worker: int, n: int) -> int:
    for i in range(n):
        sd.incr("incr")
        sd.update_with("upd", lambda v: v + 1, default=0)
        sd.update_with(
            ("tuple", "key"), lambda v: [*v, worker] if len(v) < 50 else [*v[1:], worker], default=[]
        )
        if i % 10 == 0:
            with sd.locked():
                sd["txn"] = sd.get("txn", 0) + 1
        sd[f"w{worker}-{i % 64}"] = "v" * (i % 200)
    return hash("probe")


@pytest.mark.slow
@pytest.mark.parametrize("workers", [2, 4])
def test_exact_totals_from_several_processes(start_method, workers):
    ctx = multiprocessing.get_context(start_method)
    n = 2000
    with SharedDict() as sd:
        assert run_processes(ctx, _hammer, [(sd, w, n) for w in range(workers)]) == [0] * workers
        assert sd["incr"] == workers * n
        assert sd["upd"] == workers * n
        assert sd["txn"] == workers * (n // 10)
        assert len(sd[("tuple", "key")]) == 50
        assert check(sd) == len(sd) == 4 + workers * 64


def _report_seed_and_work(sd: SharedDict, worker: int, n: int) -> None:
    sd[("seed", worker)] = hash("probe")
    for _ in range(n):
        sd.incr(("counter", "shared"))
        sd.update_with(frozenset({"a", worker % 2}), lambda v: v + 1, default=0)
    # Keys written by the parent are found although hash() differs here.
    sd[("seen", worker)] = sd[("from", "parent")]


@pytest.mark.slow
def test_processes_with_different_hash_seeds_agree(monkeypatch):
    ctx = multiprocessing.get_context("spawn")
    n = 1000
    with SharedDict() as sd:
        sd[("from", "parent")] = "hello"
        procs = []
        for worker, seed in enumerate(["1", "2", "3"]):
            monkeypatch.setenv("PYTHONHASHSEED", seed)
            p = ctx.Process(target=_report_seed_and_work, args=(sd, worker, n))
            p.start()
            procs.append(p)
        monkeypatch.delenv("PYTHONHASHSEED")
        for p in procs:
            p.join(60)
        assert [p.exitcode for p in procs] == [0, 0, 0]
        assert len({sd[("seed", w)] for w in range(3)}) == 3  # hash() really differed
        assert sd[("counter", "shared")] == 3 * n
        assert sd[frozenset({"a", 0})] + sd[frozenset({"a", 1})] == 3 * n
        assert all(sd[("seen", w)] == "hello" for w in range(3))
        check(sd)


def _grow(sd: SharedDict, n: int, done) -> None:
    for i in range(n):
        sd[f"k{i}"] = (i, "x" * (i % 300))
        if i % 3 == 0:
            del sd[f"k{i // 2}"]
    done.set()


def _read_while_growing(sd: SharedDict, done, errors) -> None:
    reads = 0
    while not done.is_set() or reads < 100:
        stable = sd["stable"]
        if stable != ("s", 12345, "y" * 1000):
            errors.put(f"torn stable value {stable!r:.80}")
            return
        for k, v in list(sd.items())[:50]:
            if k.startswith("k") and (v[0] != int(k[1:]) or v[1] != "x" * (v[0] % 300)):
                errors.put(f"torn value for {k}: {v!r:.80}")
                return
        sd.incr("reads")
        reads += 1


@pytest.mark.slow
def test_growth_while_others_read_and_write(start_method):
    ctx = multiprocessing.get_context(start_method)
    done = ctx.Event()
    errors = ctx.Queue()
    with SharedDict() as sd:
        sd["stable"] = ("s", 12345, "y" * 1000)
        writer = ctx.Process(target=_grow, args=(sd, 3000, done))
        readers = [ctx.Process(target=_read_while_growing, args=(sd, done, errors)) for _ in range(2)]
        for p in [*readers, writer]:
            p.start()
        for p in [writer, *readers]:
            p.join(60)
        assert [p.exitcode for p in [writer, *readers]] == [0, 0, 0]
        assert errors.empty()
        errors.close()
        errors.join_thread()
        assert sd["reads"] >= 200
        assert check(sd) == len(sd)
        expected = {f"k{i}" for i in range(3000)} - {f"k{i // 2}" for i in range(0, 3000, 3)}
        assert {k for k in sd if k.startswith("k")} == expected


def _pool_task(sd: SharedDict, i: int) -> int:
    sd[i] = i * i
    return sd.incr("tasks")


def test_works_as_a_pool_task_argument(fork_or_spawn):
    with SharedDict() as sd:
        with shoal.Pool(2, context=fork_or_spawn) as pool:
            results = pool.starmap(_pool_task, [(sd, i) for i in range(50)])
        assert sorted(results) == list(range(1, 51))
        assert sd["tasks"] == 50 and all(sd[i] == i * i for i in range(50))


def test_pickle_outside_processes_and_close():
    sd = SharedDict({"a": 1})
    # A second handle on the same descriptor's memory (what unpickling builds).
    twin = SharedDict._from_fd(os.dup(sd._fd))
    twin["b"] = 2
    assert sd == {"a": 1, "b": 2}
    twin.close()
    sd.close()
    sd.close()  # idempotent
    assert sd.closed
    with pytest.raises(ValueError, match="closed"):
        sd["a"]
    with pytest.raises(ValueError, match="closed"):
        pickle.dumps(sd)
    assert str(sd) == "<SharedDict closed>"


def _mapped_dicts() -> int:
    with open("/proc/self/maps") as f:
        return f.read().count("shoal-dict")


def test_memory_is_released_when_the_last_handle_goes():
    before = _mapped_dicts()
    sd = SharedDict({"a": "x" * 10000})
    assert _mapped_dicts() == before + 1
    sd.close()
    assert _mapped_dicts() == before
    assert not any(n.startswith("shoal") for n in os.listdir("/dev/shm"))


def test_dict_operators_and_reversed(d):
    d.update(a=1, b=2)
    assert d | {"c": 3} == {"a": 1, "b": 2, "c": 3}
    assert {"a": 0, "z": 9} | d == {"a": 1, "z": 9, "b": 2}
    d |= {"c": 3}
    assert list(reversed(d)) == ["c", "b", "a"]


def test_a_shared_dict_cannot_be_stored_inside_one(d):
    with SharedDict() as inner:
        with pytest.raises(TypeError, match="cannot be stored inside a SharedDict"):
            d["inner"] = inner
        with pytest.raises(TypeError, match="cannot be stored inside a SharedDict"):
            d["inner"] = [inner]
    assert "inner" not in d


def test_initial_by_keyword_and_from_pairs():
    with SharedDict(initial={"a": 1}) as a, SharedDict([("b", 2)]) as b:
        assert a == {"a": 1} and b == {"b": 2}


SEED_SCRIPT = """
import multiprocessing, os, sys
from shoal import SharedDict

def work(d, w, n):
    d[("seed", w)] = hash("probe")
    for _ in range(n):
        d.incr(("count", "x"))
        d.update_with(frozenset({"k", w % 2}), lambda v: v + 1, default=0)
    d[("seen", w)] = d[("from", "parent")]

if __name__ == "__main__":
    ctx = multiprocessing.get_context(sys.argv[1])
    with SharedDict() as d:
        d[("from", "parent")] = "hi"
        procs = []
        for w in range(3):
            # Spawned children, and the forkserver (started with the first
            # child), take their hash seed from the environment.
            os.environ["PYTHONHASHSEED"] = str(10 + w)
            procs.append(ctx.Process(target=work, args=(d, w, 2000)))
            procs[-1].start()
        for p in procs:
            p.join()
        seeds = {d[("seed", w)] for w in range(3)}
        print(d[("count", "x")], d[frozenset({"k", 0})] + d[frozenset({"k", 1})],
              all(d[("seen", w)] == "hi" for w in range(3)), hash("probe") in seeds, len(seeds))
"""


@pytest.mark.slow
def test_exact_totals_with_other_hash_seeds_under_every_start_method(tmp_path, start_method):
    script = tmp_path / "seeds.py"
    script.write_text(SEED_SCRIPT)
    out = run_ok(str(script), start_method, env={"PYTHONHASHSEED": "1"})
    count, updates, seen, parent_seed_among_children, n_seeds = out.split()
    assert (count, updates, seen) == ("6000", "6000", "True")
    if start_method == "fork":
        assert (parent_seed_among_children, n_seeds) == ("True", "1")
    else:  # the children really hashed differently from the parent
        assert parent_seed_among_children == "False"
        assert n_seeds == ("3" if start_method == "spawn" else "1")


# -- lifetime and locking under misuse (regressions from review 2) -------------


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


# Bug 1. Before: close() inside locked() leaked the lock and corrupted glibc's
# robust-mutex list of the thread.
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
    out = run_code(
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


# Bug 3. Before: a finalizer or thread closing the dict during items() or pop()
# unmapped memory a native operation was reading: a segfault.
def test_finalizer_closing_the_dict_during_items_does_not_crash():
    out = run_code(
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
    out = run_code(
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


# Bug 2. Before: a KeyboardInterrupt handled right after locked() acquired
# leaked the lock, and every other process hung.


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
                with pytest.raises(_Interrupted), d.locked():
                    # the interrupt lands here (or while waiting), never
                    # between the acquisition and the block
                    for _ in range(1000):
                        pass
                p.join()
                assert not _native.dict_held(d._map)
            assert other_process_can_lock(d)
    finally:
        signal.signal(signal.SIGUSR1, old)


# Bug 4. Before: the repair after a dead holder lowered the heap top, so the
# next write could overwrite a block a lock-free reader was copying.


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


# Bug 7. Before: unpickling that wrote to the dict rebuilt the region, the
# removal went to the dead one, and the popped item stayed.

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


# Bug 10. Before: a NaN lookup raised instead of missing.
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


# Bug 10. Before: a thread holding the lock through one handle could not use
# another handle of the same dict.
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


# -- keys a dict treats as one are one key in every process (review 2, bug 6) --


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
    return run_code(code, env={"PYTHONHASHSEED": seed})


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

    Pt = _Pt  # noqa: N806 - a class
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
    import numpy as np

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
        assert type(next(iter(d))) is _Color
        assert isinstance(_Color.RED, enum.Enum)


class _Color(__import__("enum").IntEnum):
    RED = 1


# Bug 9. Before: no address space for another handle was a bare OSError ENOMEM.


def test_no_address_space_for_another_dict_is_a_memoryerror_that_says_what_to_do():
    out = run_code(
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


# Bug 5, documented rather than changed: lock-free readers may see half a
# transaction.


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


# Suspected in review 2. Before: a thread that ended holding the lock passed
# its pthread_t, and so the lock, to the next thread started.


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
