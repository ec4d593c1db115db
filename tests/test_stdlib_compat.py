"""Code written for the standard library keeps working with shoal: every
public name, the private attributes widely used code reads, and the
exception and traceback types it catches or inspects."""

from __future__ import annotations

import concurrent.futures.process
import multiprocessing
import multiprocessing.pool
import pickle

import pytest

import shoal
import workers

# -- names ------------------------------------------------------------------


def test_every_multiprocessing_name_is_importable_from_shoal():
    missing = [name for name in multiprocessing.__all__ if not hasattr(shoal, name)]
    assert missing == []
    assert set(multiprocessing.__all__) <= set(shoal.__all__)


@pytest.mark.parametrize(
    "name",
    [
        "ProcessError",
        "BufferTooShort",
        "AuthenticationError",
        "RawArray",
        "RawValue",
        "get_logger",
        "log_to_stderr",
        "allow_connection_pickling",
        "reducer",
        "set_executable",
        "set_forkserver_preload",
        "parent_process",
        "get_all_start_methods",
    ],
)
def test_names_the_standard_library_gets_right_are_its_own(name):
    assert getattr(shoal, name) is getattr(multiprocessing, name)


def test_a_context_has_every_attribute_of_a_standard_context(start_method):
    ours = shoal.get_context(start_method)
    theirs = multiprocessing.get_context(start_method)
    public = {name for name in dir(theirs) if not name.startswith("_")}
    assert public - set(dir(ours)) == set()
    assert [name for name in public if not hasattr(ours, name)] == []
    assert ours.get_start_method() == start_method
    assert ours.cpu_count() >= 1


# -- attributes read by code in the wild -------------------------------------


def test_executor_keeps_the_standard_attributes(start_method):
    context = multiprocessing.get_context(start_method)
    ex = shoal.ProcessPoolExecutor(2, mp_context=context)
    try:
        assert ex._max_workers == 2
        assert ex._mp_context is context
        processes = ex._processes
        assert sorted(processes) == sorted(
            set(ex.submit(workers.getpid).result(timeout=30) for _ in range(1)) | set(processes)
        )
        assert len(processes) == 2
        for pid, process in processes.items():
            assert process.pid == pid
            assert process.is_alive()
        # A worker killed through it fails only the task it runs; the pool goes on.
        victim = next(iter(processes.values()))
        victim.kill()
        victim.join(timeout=30)
        assert not victim.is_alive()
        assert ex.submit(workers.square, 5).result(timeout=30) == 25
        with pytest.raises(AttributeError):
            ex._max_workers = 3  # a view of the pool, not a setting
    finally:
        ex.shutdown()
    assert ex._processes is None  # as the standard library does after shutdown


def test_executor_default_context_is_the_default_start_method():
    with shoal.ProcessPoolExecutor(1, mp_context="spawn") as ex:
        assert ex._mp_context.get_start_method() == "spawn"


def test_pool_keeps_the_standard_attributes(fork_or_spawn):
    with shoal.Pool(3, context=fork_or_spawn) as pool:
        assert pool._processes == 3
        pids = {p.pid for p in pool._pool}
        assert len(pids) == 3
        assert set(pool.map(workers.getpid, range(30), chunksize=1)) <= pids
        assert all(p.is_alive() for p in pool._pool)


# -- exception and traceback types ---------------------------------------------


class ReduceRaisesRuntimeError:
    def __reduce__(self):
        raise RuntimeError("this object refuses to be pickled")


class ReduceRaisesAttributeError:
    def __reduce__(self):
        raise AttributeError("no such attribute: pickling")


class ReduceRaisesPicklingError:
    def __reduce__(self):
        raise pickle.PicklingError("cannot pickle this one")


UNPICKLABLE = [
    pytest.param(ReduceRaisesRuntimeError(), RuntimeError, "refuses to be pickled", id="RuntimeError"),
    pytest.param(ReduceRaisesAttributeError(), AttributeError, "no such attribute", id="AttributeError"),
    pytest.param(
        ReduceRaisesPicklingError(), pickle.PicklingError, "cannot pickle this one", id="PicklingError"
    ),
    pytest.param(workers.Unpicklable(), TypeError, "refuse to be pickled", id="TypeError"),
]


@pytest.mark.parametrize(("obj", "raised", "match"), UNPICKLABLE)
def test_unpicklable_argument_raises_what_the_pickler_raised(fork_or_spawn, obj, raised, match):
    with shoal.ProcessPoolExecutor(1, mp_context=fork_or_spawn) as ex:
        with pytest.raises(raised, match=match) as info:
            ex.submit(workers.identity, obj)
        assert isinstance(info.value, shoal.SerializationError)
        assert "cannot pickle the task's arguments" in str(info.value)
        assert type(obj).__name__ in str(info.value)  # it names the culprit
        assert ex.submit(workers.square, 3).result(timeout=30) == 9
    with shoal.Pool(1, context=fork_or_spawn) as pool:
        with pytest.raises(raised, match=match):
            pool.apply_async(workers.identity, ([obj],))
        with pytest.raises(shoal.SerializationError, match=match):
            pool.map(workers.identity, [1, obj])


@pytest.mark.parametrize(("obj", "raised", "match"), UNPICKLABLE)
def test_unpicklable_message_raises_what_the_pickler_raised(obj, raised, match):
    q = shoal.Queue()
    a, b = shoal.Pipe()
    try:
        with pytest.raises(raised, match=match) as info:
            q.put(obj)
        assert isinstance(info.value, shoal.SerializationError)
        with pytest.raises(raised, match=match) as info:
            a.send(obj)
        assert isinstance(info.value, shoal.SerializationError)
    finally:
        q.close()
        a.close()
        b.close()


def test_combined_serialization_error_pickles_as_itself():
    with pytest.raises(RuntimeError) as info:
        shoal.Queue().put(ReduceRaisesRuntimeError())
    copy = pickle.loads(pickle.dumps(info.value))
    assert type(copy) is type(info.value)
    assert isinstance(copy, RuntimeError) and isinstance(copy, shoal.SerializationError)
    assert copy.args == info.value.args


def test_pool_remote_traceback_is_the_standard_type(fork_or_spawn):
    with shoal.Pool(1, context=fork_or_spawn) as pool:
        for call in (
            lambda: pool.apply(workers.raise_value_error, (1,)),
            lambda: pool.map(workers.raise_value_error, [2]),
            lambda: list(pool.imap(workers.raise_value_error, [3])),
        ):
            with pytest.raises(ValueError) as info:
                call()
            cause = info.value.__cause__
            assert type(cause) is multiprocessing.pool.RemoteTraceback
            assert "raise_value_error" in cause.tb and "bad value" in str(cause)


def test_executor_remote_traceback_is_the_standard_type(fork_or_spawn):
    with shoal.ProcessPoolExecutor(1, mp_context=fork_or_spawn) as ex:
        for call in (
            lambda: ex.submit(workers.raise_value_error, 1).result(timeout=30),
            lambda: list(ex.map(workers.raise_value_error, [2])),
        ):
            with pytest.raises(ValueError) as info:
                call()
            cause = info.value.__cause__
            assert type(cause) is concurrent.futures.process._RemoteTraceback
            assert "raise_value_error" in cause.tb and "bad value" in str(cause)
