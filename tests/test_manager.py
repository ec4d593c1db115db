"""shoal.Manager: the standard library's Manager API, with dict() in shared
memory; the seed's Manager example runs with only its import changed."""

from __future__ import annotations

import multiprocessing
import sys
from pathlib import Path

import pytest

import shoal
from helpers import run_code, run_ok, run_processes, run_python
from shoal import Manager, SharedDict
from shoal.managers import BaseManager

# The seed's example, exactly as examples/seed_manager.py has it.
SEED_EXAMPLE = (Path(__file__).resolve().parent.parent / "examples" / "seed_manager.py").read_text(
    encoding="utf-8"
)


def _run_script(tmp_path, text: str) -> str:
    script = tmp_path / "example.py"
    script.write_text(text, encoding="utf-8")
    return run_ok(str(script), cwd=tmp_path)


def test_seed_manager_example_prints_count_zero(tmp_path):
    assert _run_script(tmp_path, SEED_EXAMPLE) == "{'count': 0}\n"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_seed_manager_example_under_other_start_methods(tmp_path, method):
    # The same program with fewer processes (spawning 100 interpreters is slow).
    text = SEED_EXAMPLE.replace("range(100)", "range(12)").replace("'count':100", "'count':12")
    text = text.replace(
        "if __name__ == '__main__':\n",
        "if __name__ == '__main__':\n"
        f"    import multiprocessing; multiprocessing.set_start_method({method!r})\n",
    )
    assert _run_script(tmp_path, text) == "{'count': 0}\n"


def test_dict_is_shared_memory_not_a_proxy():
    with Manager() as m:
        d = m.dict({"a": 1}, b=2)
        assert isinstance(d, SharedDict) and d == {"a": 1, "b": 2}
        assert str(d) == "{'a': 1, 'b': 2}"
    assert d.closed  # the manager's handles close with it, like stdlib proxies


def _decrement(d, lock, n):
    for _ in range(n):
        with lock:
            d["count"] -= 1


@pytest.mark.slow
def test_read_modify_write_under_a_manager_lock(fork_or_spawn):
    ctx = multiprocessing.get_context(fork_or_spawn)
    with Manager(ctx=ctx) as m:
        d = m.dict(count=300)
        lock = m.Lock()
        assert run_processes(ctx, _decrement, [(d, lock, 100)] * 3) == [0, 0, 0]
        assert d["count"] == 0


def _use_proxies(lst, ns, value, array, queue, event, sem, rlock, cond, barrier):
    lst.append("child")
    ns.x += 1
    with rlock:  # a manager Value proxy has no lock of its own
        value.value += 1
    array[0] = 42
    queue.put("from child")
    with sem, rlock, cond:
        cond.notify_all()
    event.set()
    barrier.wait(30)


def test_delegated_types_work_across_processes():
    ctx = multiprocessing.get_context("fork")
    with Manager() as m:
        lst = m.list([1])
        ns = m.Namespace(x=1)
        value = m.Value("i", 5)
        array = m.Array("i", [0, 0])
        queue = m.Queue()
        event = m.Event()
        sem = m.Semaphore(2)
        bsem = m.BoundedSemaphore(1)
        rlock = m.RLock()
        cond = m.Condition()
        barrier = m.Barrier(2)
        jq = m.JoinableQueue()
        p = ctx.Process(
            target=_use_proxies, args=(lst, ns, value, array, queue, event, sem, rlock, cond, barrier)
        )
        p.start()
        barrier.wait(30)
        p.join(30)
        assert p.exitcode == 0
        assert list(lst) == [1, "child"] and ns.x == 2 and value.value == 6 and list(array) == [42, 0]
        assert queue.get(timeout=10) == "from child" and event.is_set()
        with bsem:
            pass
        jq.put(1)
        jq.get()
        jq.task_done()
        jq.join()
        assert m.address is not None and "server running" in repr(m)


class Counter:
    def __init__(self, start=0):
        self.n = start

    def add(self, k):
        self.n += k
        return self.n


class CountingManager(Manager):
    pass


CountingManager.register("Counter", Counter)


def test_register_custom_type():
    with CountingManager() as m:
        c = m.Counter(10)
        assert c.add(5) == 15
        assert c.add(1) == 16


def test_start_shutdown_and_errors():
    m = Manager()
    m.start()
    with pytest.raises(multiprocessing.ProcessError, match="Already started"):
        m.start()
    lst = m.list([1, 2])
    assert len(lst) == 2
    m.shutdown()
    m.shutdown()  # idempotent
    m.join(5)
    with pytest.raises(multiprocessing.ProcessError, match="shut down"):
        m.dict()
    with pytest.raises(multiprocessing.ProcessError, match="shut down"):
        m.list()
    assert shoal.Manager is Manager and Manager.__module__ == "shoal"


def test_all_standard_library_manager_methods_exist():
    stdlib = {"dict", "list", "Namespace", "Value", "Array", "Lock", "RLock", "Semaphore",
              "BoundedSemaphore", "Event", "Condition", "Barrier", "Queue", "JoinableQueue",
              "Pool", "register", "start", "shutdown", "join", "address"}  # fmt: skip
    assert all(hasattr(Manager, name) for name in stdlib)


# -- nested shared objects (issue 8): the standard library's nested proxies --


def test_nested_dict_writes_through_and_outlives_its_variable():
    with Manager() as m:
        d = m.dict()
        inner = m.dict()
        d["inner"] = inner
        d["inner"]["k"] = 1
        assert inner["k"] == 1
        del inner
        import gc

        gc.collect()
        d["inner"]["k2"] = 2  # the server holds it, not the variable
        assert d["inner"] == {"k": 1, "k2": 2}
        d["deep"] = {"list": [m.dict(a=1)]}  # inside plain containers too
        d["deep"]["list"][0]["b"] = 2
        assert d["deep"]["list"][0] == {"a": 1, "b": 2}


def test_dict_inside_a_manager_list_writes_through():
    with Manager() as m:
        lst = m.list([m.dict()])
        lst[0]["x"] = 1
        assert lst[0]["x"] == 1 and lst[0] == {"x": 1}
        lst.append(m.dict(y=2))
        assert lst[1]["y"] == 2


def _use_nested(d):
    d["inner"]["k"] = "child"
    d["list"].append(3)
    d["queue"].put("from child")
    d["moved"] = d["spare"]  # a child stores a shared object too
    d["moved"]["by"] = "child"


def test_nested_proxies_from_another_process(fork_or_spawn):
    ctx = multiprocessing.get_context(fork_or_spawn)
    with Manager(ctx=ctx) as m:
        d = m.dict()
        d["inner"] = m.dict(k=0)
        d["list"] = m.list([1])
        d["queue"] = m.Queue()
        spare = m.dict()
        d["spare"] = spare
        p = ctx.Process(target=_use_nested, args=(d,))
        p.start()
        p.join(60)
        assert p.exitcode == 0
        assert d["inner"] == {"k": "child"}
        assert list(d["list"]) == [1, 3]
        assert d["queue"].get(timeout=10) == "from child"
        assert spare["by"] == "child" and d["moved"]["by"] == "child"


def _store_nested(d, out):
    try:
        d["x"] = SharedDict()
    except multiprocessing.ProcessError as exc:
        out.put(str(exc))
    else:
        out.put("stored")


# Before: the server started only on the first store by reference, so a
# child given the dict by fork could not store a shared object in it
# (ProcessError) where the standard library, whose server always runs, can.
def test_a_child_stores_a_shared_object_in_a_dict_made_before_anything_started_the_server():
    ctx = multiprocessing.get_context("fork")
    out = ctx.SimpleQueue()
    with Manager() as m:
        d = m.dict()
        p = ctx.Process(target=_store_nested, args=(d, out))
        p.start()
        assert out.get() == "stored"
        p.join(60)
        assert p.exitcode == 0
        d["x"]["after"] = 1
        assert d["x"] == {"after": 1}
    out.close()


def test_a_started_manager_lets_any_process_store_shared_objects():
    ctx = multiprocessing.get_context("fork")
    out = ctx.SimpleQueue()
    with Manager() as m:
        m.start()
        d = m.dict()
        p = ctx.Process(target=_store_nested, args=(d, out))
        p.start()
        assert out.get() == "stored"
        p.join(60)
        d["x"]["after"] = 1
        assert d["x"] == {"after": 1}
    out.close()


def test_iterating_a_dict_that_changes_size_raises_like_a_dict():
    with Manager() as m:
        d = m.dict(a=1, b=2)
        it = iter(d)
        d["new"] = 0
        with pytest.raises(RuntimeError, match="changed size during iteration"):
            next(it)
        del d["new"]
        with pytest.raises(RuntimeError, match="changed size during iteration"):
            for k in d:
                d[k + "!"] = 0
        for k in d:  # changing values only is fine, as with a dict
            d[k] = 5
        assert len(d) == 3 and set(d.values()) == {5}


def test_adding_a_key_during_the_last_step_of_iteration_raises_like_a_dict():
    # The loop ended silently when the size changed while the last key was
    # being handled; a dict (and the standard library's DictProxy) raises.
    with Manager() as m:
        d = m.dict(only=1)
        with pytest.raises(RuntimeError, match="changed size during iteration"):
            for k in d:
                d[k + "!"] = 0
        with pytest.raises(RuntimeError, match="changed size during iteration"):
            for k in d:
                if k == "only!":
                    del d["only"]


def test_keys_values_items_are_lists_that_survive_changes_to_the_dict():
    # They were views that raised RuntimeError when the dict changed size
    # while a loop ran over them, where the standard library's DictProxy
    # returns lists (for k in d.keys(): del d[k] empties the dict there).
    with Manager() as m:
        d = m.dict(a=1, b=2, c=3)
        assert d.keys() == ["a", "b", "c"] and d.values() == [1, 2, 3]
        assert d.items() == [("a", 1), ("b", 2), ("c", 3)]
        for k in d.keys():  # noqa: SIM118 - keys() itself is what is tested
            del d[k]
        assert len(d) == 0
        d.update(a=1, b=2)
        for k, v in d.items():
            d[k + "!"] = v
        for _ in d.values():
            d.pop("a", None)
        assert d.copy() == {"b": 2, "a!": 1, "b!": 2}


def test_a_plain_value_that_cannot_be_pickled_still_fails_clearly():
    import threading

    with Manager() as m:
        d = m.dict()
        with pytest.raises(TypeError, match="cannot pickle"):
            d["lock"] = threading.Lock()
        assert "lock" not in d


# -- register, and shoal.managers (issue 12) --


class Adder:
    def __init__(self):
        self.n = 0

    def add(self, k):
        self.n += k
        return self.n

    def total(self):
        return self.n


class OtherManager(Manager):
    pass


OtherManager.register("Adder", Adder)


def test_register_is_per_class():
    assert hasattr(OtherManager, "Adder") and hasattr(CountingManager, "Counter")
    assert not hasattr(Manager, "Adder") and not hasattr(Manager, "Counter")
    assert not hasattr(OtherManager, "Counter")
    with Manager() as m, pytest.raises(AttributeError):
        m.Adder()


SYNC_MANAGER_REGISTER = """
import sys
import shoal
from shoal.managers import SyncManager

class Counter:
    def __init__(self, n):
        self.n = n
    def inc(self):
        self.n += 1
        return self.n

SyncManager.register("Counter", Counter)

if __name__ == "__main__":
    shoal.set_start_method(sys.argv[1])
    with shoal.Manager() as m:
        c = m.Counter(10)
        c.inc()
        print(c.inc())
"""


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_types_registered_on_sync_manager_are_served_by_manager(tmp_path, method):
    # multiprocessing.Manager() is a SyncManager, so code registers its types
    # there; shoal.Manager() raised AttributeError for them.
    script = tmp_path / "example.py"
    script.write_text(SYNC_MANAGER_REGISTER, encoding="utf-8")
    out = run_python(str(script), method)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "12\n"


def _add_through_proxy(adder, k):
    return adder.add(k)


def test_manager_types_used_from_pool_workers(fork_or_spawn):
    ctx = shoal.get_context(fork_or_spawn)
    with OtherManager() as m:
        adder = m.Adder()
        with ctx.Pool(2) as pool:
            pool.starmap(_add_through_proxy, [(adder, 1)] * 20)
        assert adder.total() == 20


# The seed's "sharing class objects" pattern, with only the import changed.
class MyManager(BaseManager):
    pass


MyManager.register("Adder", Adder)


def test_base_manager_subclass_from_shoal_managers_in_pool_workers(fork_or_spawn):
    ctx = shoal.get_context(fork_or_spawn)
    with MyManager(ctx=multiprocessing.get_context(fork_or_spawn)) as m:
        adder = m.Adder()
        with ctx.Pool(2) as pool:
            results = [pool.apply_async(_add_through_proxy, (adder, k)) for k in range(10)]
            assert sorted(r.get(60) for r in results)[-1] == 45
        assert adder.total() == 45


def test_shoal_managers_is_the_standard_library_module():
    import multiprocessing.managers as std

    import shoal.managers as ours

    assert set(ours.__all__) == set(std.__all__)
    for name in (*std.__all__, "DictProxy", "ListProxy", "NamespaceProxy", "AutoProxy", "MakeProxyType"):
        assert getattr(ours, name) is getattr(std, name)
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        ours.Nope  # noqa: B018


def _fill_nested(d, i):
    d["inner"][i] = i * i
    d["list"].append(i)


def test_nested_proxies_from_pool_workers(fork_or_spawn):
    with Manager() as m:
        d = m.dict(inner=m.dict(), list=m.list())
        with shoal.get_context(fork_or_spawn).Pool(2) as pool:
            pool.starmap(_fill_nested, [(d, i) for i in range(20)])
        assert d["inner"] == {i: i * i for i in range(20)}
        assert sorted(d["list"]) == list(range(20))


def _move_nested(d):
    d["inner"]["k"] = "child"
    d["moved"] = d["spare"]


def test_custom_authkey_reaches_spawned_processes():
    ctx = multiprocessing.get_context("spawn")
    with Manager(authkey=b"not the default", ctx=ctx) as m:
        d = m.dict(inner=m.dict(k=0), spare=m.dict(a=1))
        p = ctx.Process(target=_move_nested, args=(d,))
        p.start()
        p.join(60)
        assert p.exitcode == 0
        assert d["inner"] == {"k": "child"} and d["moved"] == {"a": 1}


# -- shutdown while in use ------------------------------------------------------


# Review 2, bug 1. Before: shutdown() unmapped a dict a thread was using inside
# locked(): the lock leaked and the thread's robust-mutex list was corrupted.
def test_manager_shutdown_while_a_thread_is_inside_locked():
    out = run_code(
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


def test_dict_has_the_methods_python_314_gave_the_dict_proxy():
    # 3.14 added fromkeys, reversed(), | and |= to the DictProxy; a
    # Manager().dict() has them on every Python.
    with Manager() as m:
        d = m.dict({"a": 1})
        assert d.fromkeys(["x", "y"], 0) == {"x": 0, "y": 0}
        assert type(d.fromkeys("ab")) is dict and d.fromkeys("ab") == {"a": None, "b": None}
        assert d | {"b": 2} == {"a": 1, "b": 2} and {"z": 0} | d == {"z": 0, "a": 1}
        d |= {"b": 2}
        assert d.copy() == {"a": 1, "b": 2} and list(reversed(d)) == ["b", "a"]


def test_list_set_and_process_are_the_standard_librarys_of_this_python():
    # docs/guide/python-3.14.md: Python 3.14's ListProxy.clear()/copy(),
    # SyncManager.set() and Process.interrupt() come with the standard
    # library, so shoal has exactly what this Python's has.
    import multiprocessing.managers

    assert shoal.Process is multiprocessing.Process
    new_in_314 = sys.version_info >= (3, 14)
    assert hasattr(shoal.Process, "interrupt") is new_in_314
    with Manager() as m, multiprocessing.Manager() as theirs:
        ours_list, their_list = m.list([1, 2]), theirs.list([1, 2])
        for method in ("clear", "copy"):
            assert hasattr(ours_list, method) is hasattr(their_list, method) is new_in_314
        assert hasattr(multiprocessing.managers.SyncManager, "set") is new_in_314
        if new_in_314:
            s = m.set({1, 2})
            s.add(3)
            assert s.copy() == {1, 2, 3} and ours_list.copy() == [1, 2]
        else:
            with pytest.raises(AttributeError):
                m.set()
