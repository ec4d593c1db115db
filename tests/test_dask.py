"""Pool and ProcessPoolExecutor with backend="dask".

Most tests run against an in-process Dask cluster (workers are threads of
this process: fast, and enough for the API); the crash tests and the
lifecycle test use a cluster of worker processes that the pool owns; one test
starts a real `dask scheduler` and two `dask worker` processes on loopback.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import multiprocessing.pool
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

distributed = pytest.importorskip(
    "distributed", reason="the dask extra is not installed: pip install '.[dask]'"
)
np = pytest.importorskip("numpy")

import shoal  # noqa: E402
from helpers import dask_cluster, free_port  # noqa: E402
from workers import add, call_sys_exit, crash_on, identity, raise_value_error, sleep_then, square  # noqa: E402

TESTS = Path(__file__).resolve().parent


@pytest.fixture
def cluster():
    """An in-process cluster of two single-thread workers."""
    c = distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=False,
        dashboard_address=None,
        # its HTTP server would take port 8787, or warn when it is in use
        scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
    )
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def pool(cluster):
    with shoal.Pool(backend="dask", address=cluster.scheduler_address) as p:
        yield p


# -- helpers run as tasks (module level: the worker imports them) --------------


def total_after_write(a, i):
    a[0] += 1  # each task has its own copy, as with the standard library
    return float(a.sum()), i


def shared_identity(_=None):
    return id(shoal.shared()), len(shoal.shared())


def worker_pid_and_thread(_=None):
    return os.getpid(), threading.current_thread().name


_initialized_in = []


def remember_init(tag):
    _initialized_in.append((tag, threading.current_thread().name))


def fail_init():
    raise RuntimeError("initializer says no")


# -- the API -----------------------------------------------------------------


def test_apply_map_starmap_give_the_results_of_the_standard_library(pool):
    assert pool.apply(add, (2, 3)) == 5
    assert pool.apply(add, (), {"a": 1, "b": 2}) == 3
    assert pool.map(square, range(50)) == [x * x for x in range(50)]
    assert pool.starmap(add, [(i, i) for i in range(20)]) == [2 * i for i in range(20)]
    assert pool.map_async(square, [3, 4]).get(30) == [9, 16]
    assert pool.map(square, []) == []
    assert pool.apply(lambda: "lambda ran") == "lambda ran"


def test_apply_async_callbacks_run_in_this_process(pool):
    got = []
    errors = []
    ok = pool.apply_async(square, (7,), callback=got.append)
    bad = pool.apply_async(raise_value_error, (1,), error_callback=errors.append)
    assert ok.get(30) == 49
    bad.wait(30)
    assert bad.ready() and not bad.successful()
    assert got == [49]
    assert isinstance(errors[0], ValueError)


def test_a_task_exception_keeps_its_type_and_the_remote_traceback(pool):
    with pytest.raises(ValueError, match="bad value 3") as info:
        pool.apply(raise_value_error, (3,))
    assert type(info.value.__cause__) is multiprocessing.pool.RemoteTraceback
    assert "raise_value_error" in str(info.value.__cause__)
    with pytest.raises(ValueError, match="bad value"):
        pool.map(raise_value_error, range(5))


def test_a_task_calling_sys_exit_fails_with_task_exit_error(pool):
    # Its SystemExit was raised again in the caller, ending the program.
    with pytest.raises(shoal.TaskExitError, match=r"the task called sys\.exit\(3\)") as info:
        pool.apply(call_sys_exit, (3,))
    assert info.value.code == 3 and "in call_sys_exit" in str(info.value.__cause__)
    assert pool.apply(add, (1, 2)) == 3


def test_imap_reads_an_endless_input_lazily(pool):
    read = []

    def numbers():
        for i in itertools.count():
            read.append(i)
            yield i

    it = pool.imap(square, numbers())
    assert [next(it) for _ in range(10)] == [x * x for x in range(10)]
    it.close()
    assert len(read) < 100_000  # a bounded window, not the whole (endless) input


def test_imap_and_imap_unordered_return_every_result(pool):
    assert list(pool.imap(square, range(30), chunksize=4)) == [x * x for x in range(30)]
    assert sorted(pool.imap_unordered(square, range(30))) == sorted(x * x for x in range(30))


def test_progress_bar(pool, capfd):
    assert pool.map(square, range(20), progress=True) == [x * x for x in range(20)]
    assert "20/20" in capfd.readouterr().err


def test_executor_submit_map_and_futures(cluster):
    with shoal.ProcessPoolExecutor(backend="dask", address=cluster.scheduler_address) as ex:
        future = ex.submit(add, 1, b=2)
        assert future.result(30) == 3
        assert list(ex.map(add, range(5), range(5))) == [0, 2, 4, 6, 8]
        failing = ex.submit(raise_value_error, 9)
        assert isinstance(failing.exception(30), ValueError)
        done, _ = concurrent.futures.wait([ex.submit(square, i) for i in range(10)], timeout=30)
        assert sorted(f.result() for f in done) == [i * i for i in range(10)]


def test_tiny_tasks_are_grouped_into_few_dask_tasks(pool):
    with distributed.get_task_stream(client=pool._engine.client) as stream:
        assert pool.map(square, range(10_000)) == [x * x for x in range(10_000)]
        results = [pool.apply_async(square, (i,)) for i in range(2000)]
        assert [r.get(60) for r in results] == [i * i for i in range(2000)]
    # 12,000 tasks; one Dask task each would be 12,000.
    assert len(stream.data) < 600


def test_a_large_argument_of_many_tasks_is_scattered_once(pool, monkeypatch):
    client = pool._engine.client
    scattered = []
    real_scatter = client.scatter

    def counting_scatter(data, *args, **kwargs):
        scattered.append(len(data))
        return real_scatter(data, *args, **kwargs)

    monkeypatch.setattr(client, "scatter", counting_scatter)
    a = np.zeros(1 << 20)  # 8 MB
    out = pool.starmap(total_after_write, [(a, i) for i in range(20)], chunksize=1)
    # Every task saw the array as sent (its own copy, written once), and
    # the caller's array is unchanged.
    assert out == [(1.0, i) for i in range(20)]
    assert a[0] == 0
    assert scattered == [1]


def test_shared_object_is_sent_once_and_seen_by_every_task(cluster):
    big = list(range(100_000))
    with shoal.Pool(backend="dask", address=cluster.scheduler_address, shared=big) as p:
        seen = p.map(shared_identity, range(40), chunksize=1)
    assert {length for _, length in seen} == {100_000}
    # one copy per worker, shared by the tasks it runs (in process: one)
    assert len({ident for ident, _ in seen}) == 1
    with pytest.raises(RuntimeError, match="outside a pool worker"):
        shoal.shared()


def test_node_local_objects_are_refused_with_a_clear_error(pool, cluster):
    with shoal.SharedDict({"a": 1}) as d:
        with pytest.raises(shoal.SerializationError, match="node-local") as info:
            pool.apply(identity, (d,))
        assert "SharedDict" in str(info.value)
        with pytest.raises(shoal.SerializationError, match="node-local"):
            shoal.Pool(backend="dask", address=cluster.scheduler_address, shared=d)
    # the pool goes on
    assert pool.apply(square, (3,)) == 9


def test_unsupported_options_and_bad_backends_raise(cluster):
    address = cluster.scheduler_address
    for option in ({"task_timeout": 1}, {"maxtasksperchild": 1}, {"max_memory": 1 << 30}):
        with pytest.raises(ValueError, match="not supported with backend='dask'"):
            shoal.Pool(backend="dask", address=address, **option)
    with pytest.raises(ValueError, match="unknown backend 'ray'"):
        shoal.Pool(backend="ray")
    with pytest.raises(ValueError, match="needs backend='dask'"):
        shoal.ProcessPoolExecutor(address=address)


def test_an_address_where_no_scheduler_listens_raises_connection_error():
    import dask

    address = f"tcp://127.0.0.1:{free_port()}"
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        with pytest.raises(ConnectionError, match="cannot connect to the Dask scheduler at tcp://127.0.0.1"):
            shoal.Pool(backend="dask", address=address)


def test_unpicklable_argument_raises_at_submit(pool):
    with pytest.raises(shoal.SerializationError, match="lock"):
        pool.apply_async(identity, (threading.Lock(),))


def test_initializer_runs_on_each_worker_once(cluster):
    _initialized_in.clear()
    with shoal.Pool(
        backend="dask", address=cluster.scheduler_address, initializer=remember_init, initargs=("x",)
    ) as p:
        assert p.map(square, range(100), chunksize=1) == [x * x for x in range(100)]
    assert 1 <= len(_initialized_in) <= 2  # two worker threads in this process
    assert len(set(_initialized_in)) == len(_initialized_in)


def test_initializer_that_raises_breaks_the_pool(cluster):
    with shoal.Pool(backend="dask", address=cluster.scheduler_address, initializer=fail_init) as p:
        with pytest.raises(shoal.WorkerStartError, match="initializer says no"):
            p.apply(square, (1,))
        with pytest.raises(shoal.WorkerStartError):
            p.apply(square, (1,))


def test_close_join_finishes_queued_work_and_terminate_fails_the_rest(cluster):
    address = cluster.scheduler_address
    p = shoal.Pool(backend="dask", address=address)
    results = [p.apply_async(sleep_then, (i, 0.01)) for i in range(20)]
    p.close()
    p.join()
    assert [r.get(0) for r in results] == list(range(20))
    with pytest.raises(ValueError, match="Pool not running"):
        p.apply(square, (1,))

    p = shoal.Pool(backend="dask", address=address)
    slow = [p.apply_async(sleep_then, (i, 0.5)) for i in range(8)]
    p.terminate()
    p.join()
    outcomes = []
    for r in slow:
        try:
            outcomes.append(r.get(5))
        except shoal.PoolClosedError:
            outcomes.append("closed")
    assert "closed" in outcomes
    # the cluster the pools connected to is still up
    with distributed.Client(address, set_as_default=False) as client:
        assert client.submit(square, 5).result(30) == 25


def test_cancel_a_queued_task(cluster):
    with shoal.Pool(backend="dask", address=cluster.scheduler_address) as p:
        results = [p.apply_async(sleep_then, (i, 0.1)) for i in range(12)]
        assert results[-1].cancel()
        with pytest.raises(concurrent.futures.CancelledError):
            results[-1].get(30)
        assert [r.get(30) for r in results[:-1]] == list(range(11))


@pytest.mark.slow  # several seconds: the whole suite runs it, the quick subset does not
def test_pools_left_open_at_exit_shut_down_their_cluster(tmp_path):
    script = tmp_path / "left_open.py"
    script.write_text(
        "import shoal\n"
        "def square(x):\n"
        "    return x * x\n"
        "if __name__ == '__main__':\n"
        "    pool = shoal.Pool(2, backend='dask')\n"
        "    print(pool.map(square, range(5)))\n"
        "    ex = shoal.ProcessPoolExecutor(2, backend='dask')\n"
        "    print(ex.submit(square, 3).result(60))\n"
    )
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=90, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[0,", "1,", "4,", "9,", "16]", "9"]
    # no_leaks: the worker processes of both clusters have exited


# -- import and install ----------------------------------------------------------


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_import_shoal_does_not_import_dask():
    out = _run_python(
        "import sys, shoal; shoal.Pool; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed')))"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_backend_dask_without_the_extra_says_how_to_install():
    # sys.modules[name] = None makes `import name` fail as if not installed.
    out = _run_python(
        "import sys; sys.modules['distributed'] = None\n"
        "import shoal\n"
        "try:\n"
        "    shoal.Pool(backend='dask')\n"
        "except ImportError as exc:\n"
        "    print('ImportError:', exc)\n"
    )
    assert out.returncode == 0, out.stderr
    assert "pip install distributed" in out.stdout


# -- a cluster of worker processes --------------------------------------------------


def test_owned_cluster_starts_the_workers_asked_for_and_stops_them():
    with shoal.Pool(2, backend="dask", shared=list(range(1000))) as p:
        assert p.processes == 2
        pids = p._engine.worker_pids
        # shoal.shared() in tasks run by spawned worker processes
        assert {length for _, length in p.map(shared_identity, range(8), chunksize=1)} == {1000}
        assert len(set(pids)) == 2 and os.getpid() not in pids
        got = set(p.map(worker_pid_and_thread, range(40), chunksize=1))
        assert {pid for pid, _ in got} <= set(pids)
        # Worker processes map a large shared argument copy-on-write: each
        # task still gets its own copy.
        a = np.zeros(1 << 18)  # 2 MB
        assert p.starmap(total_after_write, [(a, i) for i in range(30)], chunksize=1) == [
            (1.0, i) for i in range(30)
        ]
    # the no_leaks fixture checks that every worker process has exited


def test_a_worker_killed_mid_map_loses_no_result():
    with shoal.Pool(2, backend="dask") as p:
        it = p.imap(sleep_then, range(60))
        out = [next(it)]
        os.kill(p._engine.worker_pids[0], signal.SIGKILL)
        out.extend(it)
        assert out == list(range(60))


@pytest.mark.slow  # several seconds: the whole suite runs it, the quick subset does not
def test_a_task_that_kills_every_worker_fails_with_worker_died_error_naming_it():
    with shoal.Pool(2, backend="dask") as p:
        with pytest.raises(shoal.WorkerDiedError, match=r"crash_on\(3\)"):
            p.map(crash_on, range(8), chunksize=4)
        results = [p.apply_async(crash_on, (i,)) for i in range(6)]
        outcomes = []
        for r in results:
            try:
                outcomes.append(r.get(60))
            except shoal.WorkerDiedError as exc:
                outcomes.append(type(exc).__name__)
        assert outcomes == [0, 1, 4, "WorkerDiedError", 16, 25]
        assert p.map(square, range(5)) == [0, 1, 4, 9, 16]


def test_a_real_scheduler_and_two_workers(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    with dask_cluster(tmp_path, workers=2, env=env) as (address, procs):
        got = []
        with shoal.Pool(backend="dask", address=address) as p:
            assert p.processes == 2
            r = p.apply_async(worker_pid_and_thread, callback=lambda v: got.append(os.getpid()))
            task_pid, _ = r.get(30)
            assert task_pid != os.getpid() and got == [os.getpid()]
            assert p.map(square, range(100)) == [x * x for x in range(100)]
            assert list(p.imap(square, range(10))) == [x * x for x in range(10)]
            with pytest.raises(ValueError, match="bad value"):
                p.apply(raise_value_error, (1,))
        with shoal.ProcessPoolExecutor(backend="dask", address=address) as ex:
            assert ex.submit(add, 2, 2).result(30) == 4
        # the pools did not stop the cluster they did not start
        assert all(proc.poll() is None for proc in procs)


# Before: Ctrl-C in a Dask pool's map sent "interrupt" to a dispatcher that
# handed it to the local engine's code, which read worker tables Dask has not.
def test_ctrl_c_in_a_dask_map_fails_its_tasks_and_the_pool_goes_on(pool):
    import _thread

    threading.Timer(0.5, _thread.interrupt_main).start()
    with pytest.raises(KeyboardInterrupt):
        pool.starmap(sleep_then, [(i, 0.2) for i in range(200)], chunksize=1)
    assert pool.apply(square, (6,)) == 36


# -- regressions -------------------------------------------------------------------


def test_imap_progress_and_executor_map_run_on_the_engine_inherited_caller_side(cluster):
    # The merged Engine's join/start_thread/auto_chunksize read attributes
    # DaskEngine lacked: imap, progress=True and join raised AttributeError,
    # and executor.map hung.
    with shoal.ProcessPoolExecutor(backend="dask", address=cluster.scheduler_address) as ex:
        assert list(ex.map(square, range(10), timeout=60)) == [x * x for x in range(10)]
        assert ex.worker_exit_results() == []
    p = shoal.Pool(backend="dask", address=cluster.scheduler_address)
    assert list(p.imap_unordered(square, range(5))) != []
    p.close()
    p.join()


def _interrupt_after(seconds: float) -> None:
    import _thread

    threading.Timer(seconds, _thread.interrupt_main).start()


def test_ctrl_c_in_a_map_or_an_executor_block_fails_its_tasks_and_the_pool_goes_on(cluster):
    # The engine's interrupt handler walked the local engine's workers: the
    # dispatcher died with AttributeError and the pool was broken for good.
    with shoal.Pool(backend="dask", address=cluster.scheduler_address) as p:
        _interrupt_after(0.3)
        with pytest.raises(KeyboardInterrupt):
            p.starmap(sleep_then, [(i, 0.5) for i in range(8)], chunksize=1)
        assert p.apply(square, (7,)) == 49
    futures = []
    with pytest.raises(KeyboardInterrupt):
        with shoal.ProcessPoolExecutor(backend="dask", address=cluster.scheduler_address) as ex:
            futures = [ex.submit(sleep_then, i, 0.2) for i in range(20)]
            raise KeyboardInterrupt
    assert all(f.done() for f in futures)
    assert any(f.cancelled() for f in futures)


def test_a_task_exception_has_the_standard_remote_traceback_type_of_each_face(pool, cluster):
    # Dask gave shoal's own RemoteTraceback as __cause__, where the local
    # Pool and executor give the standard library's types.
    with shoal.ProcessPoolExecutor(backend="dask", address=cluster.scheduler_address) as ex:
        cause = ex.submit(raise_value_error, 1).exception(30).__cause__
    assert type(cause) is concurrent.futures.process._RemoteTraceback
    assert "raise_value_error" in str(cause)
    with pytest.raises(ValueError) as info:
        pool.map(raise_value_error, range(3))
    assert type(info.value.__cause__) is multiprocessing.pool.RemoteTraceback


_seen_by_initializer = []


def remember_shared_length():
    _seen_by_initializer.append(len(shoal.shared()))


def test_the_initializer_sees_the_shared_object(cluster):
    # The Dask worker side ran the initializer before setting shoal.shared(),
    # so an initializer reading it broke the pool (it works on the local backend).
    _seen_by_initializer.clear()
    with shoal.Pool(
        backend="dask",
        address=cluster.scheduler_address,
        shared=[1, 2, 3],
        initializer=remember_shared_length,
    ) as p:
        assert p.map(shared_identity, range(4))[0][1] == 3
    assert set(_seen_by_initializer) == {3}
