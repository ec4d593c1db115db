"""shoal.Actor: calls, futures, fire-and-forget, handles in other processes,
errors, a dead actor, and that no actor outlives its creator."""

from __future__ import annotations

import concurrent.futures
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import psutil
import pytest
from tests import workers

import shoal
from helpers import wait_until
from shoal.exceptions import RemoteTraceback


def _gone(pid: int, timeout: float = 20.0) -> bool:
    """Wait until *pid* has exited (or is a zombie nobody reaped yet)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def test_calls_futures_and_sends_run_in_order(start_method):
    with shoal.get_context(start_method).Actor(workers.Counter, 10) as counter:
        assert counter.incr() == 11
        assert counter.incr(k=4) == 15
        future = counter.incr.submit(5)
        assert isinstance(future, concurrent.futures.Future)
        assert future.result(timeout=30) == 20
        for _ in range(1000):
            counter.incr.send()
        assert counter.get() == 1020  # a waiting call comes after this process's sends
        assert counter.process_id() == counter.pid != os.getpid()


def test_many_futures_from_several_threads():
    with shoal.Actor(workers.Counter) as counter:
        futures = []

        def submit():
            futures.extend(counter.incr.submit() for _ in range(200))

        threads = [threading.Thread(target=submit) for _ in range(4)]
        for t in threads:
            t.start()
        # A synchronous caller takes turns reading replies with the reader thread.
        sync_values = [counter.incr() for _ in range(100)]
        for t in threads:
            t.join()
        values = [f.result(timeout=30) for f in futures]
        assert counter.get() == 900
        assert sorted(values + sync_values) == list(range(1, 901))


def test_done_callback_may_call_the_actor_again():
    # The callback runs on the thread that reads replies; its own waiting
    # call must not wait for that thread (itself).
    with shoal.Actor(workers.Counter) as counter:
        seen = []
        done = threading.Event()

        def callback(future):
            seen.append((future.result(), counter.get()))
            done.set()

        counter.incr.submit(5).add_done_callback(callback)
        assert done.wait(30)
        assert seen == [(5, 5)]
        assert counter.incr() == 6


def test_counter_from_four_pool_workers_is_exact(fork_or_spawn):
    with shoal.Actor(workers.Counter) as counter:
        with shoal.Pool(4, context=fork_or_spawn) as pool:
            pids = pool.starmap(workers.increment_actor, [(counter, 2500)] * 4, chunksize=1)
        assert counter.get() == 10_000
        assert counter.pid not in pids


def test_fire_and_forget_from_pool_workers_is_exact(fork_or_spawn):
    with shoal.Actor(workers.Counter) as counter:
        with shoal.Pool(4, context=fork_or_spawn) as pool:
            pool.starmap(workers.send_to_actor, [(counter, 2500)] * 4, chunksize=1)
        assert counter.get() == 10_000


def test_handle_works_in_spawned_process_and_in_another_actor():
    ctx = shoal.get_context("spawn")
    with shoal.Actor(workers.Counter) as counter, ctx.Actor(workers.Counter) as caller:
        queue = ctx.SimpleQueue()
        proc = ctx.Process(target=workers.actor_incr_into, args=(counter, 50, queue))
        proc.start()
        assert queue.get() >= 50
        proc.join(30)
        assert proc.exitcode == 0
        # An actor (spawned) calls the first actor through a handle it was given.
        assert caller.call_other(counter, 25) == 75
        assert counter.get() == 75


def test_handle_survives_pickling_in_the_same_process():
    with shoal.Actor(workers.Counter) as counter:
        copy = pickle.loads(pickle.dumps(counter))
        assert copy.incr() == 1
        assert counter.get() == 1
        copy.close()  # not the creator's handle: the actor goes on
        assert counter.incr() == 2


def test_method_exception_keeps_type_and_remote_traceback_and_actor_goes_on(start_method):
    with shoal.get_context(start_method).Actor(workers.Counter) as counter:
        with pytest.raises(KeyError, match="no such thing") as info:
            counter.fail("no such thing")
        assert isinstance(info.value.__cause__, RemoteTraceback)
        assert "in fail" in str(info.value.__cause__)
        with pytest.raises(KeyError):
            counter.fail.submit("again").result(timeout=30)
        assert counter.incr() == 1


def test_exception_in_a_sent_call_is_printed_by_the_actor(capfd):
    with shoal.get_context("fork").Actor(workers.Counter) as counter:
        counter.fail.send("nobody waits")
        assert counter.incr() == 1
    err = capfd.readouterr().err
    assert "Counter.fail() called with .send() raised" in err
    assert "KeyError: 'nobody waits'" in err


def test_unpicklable_argument_and_result_fail_only_that_call():
    with shoal.Actor(workers.Counter) as counter:
        with pytest.raises(shoal.SerializationError, match="arguments of Counter.echo"):
            counter.echo(threading.Lock())
        with pytest.raises(shoal.SerializationError, match="result of Counter"):
            counter.lock()
        assert counter.incr() == 1


def test_large_arrays_travel_both_ways():
    array = np.arange(1 << 20, dtype=np.float64)
    with shoal.Actor(workers.Counter) as counter:
        back = counter.echo(array)
        assert np.array_equal(back, array)
        assert counter.echo.submit(array).result(timeout=30).sum() == array.sum()


def test_unknown_or_private_method_raises_attribute_error():
    with shoal.Actor(workers.Counter) as counter:
        with pytest.raises(AttributeError, match="has no method 'nope'.*incr"):
            counter.nope()
        with pytest.raises(AttributeError):
            counter._private  # noqa: B018
        with pytest.raises(AttributeError):
            counter.n  # noqa: B018 - an attribute, not a method


def test_constructor_exception_is_raised_by_actor(fork_or_spawn):
    with pytest.raises(OSError, match="cannot open the resource") as info:
        shoal.get_context(fork_or_spawn).Actor(workers.BrokenInit)
    assert isinstance(info.value.__cause__, RemoteTraceback)


def test_bad_arguments_get_clear_errors():
    with pytest.raises(TypeError, match="takes a class"):
        shoal.Actor(42)
    with pytest.raises(shoal.SerializationError):
        shoal.get_context("spawn").Actor(workers.Counter, threading.Lock())


def test_actor_waiting_on_its_own_method_raises_instead_of_hanging():
    with shoal.Actor(workers.Counter) as counter:
        with pytest.raises(RuntimeError, match="wait for itself"):
            counter.call_myself(counter)
        assert counter.incr() == 1


def test_actor_killed_with_pending_calls_fails_them_all(fork_or_spawn):
    counter = shoal.get_context(fork_or_spawn).Actor(workers.Counter)
    try:
        futures = [counter.sleep.submit(30) for _ in range(5)]
        errors = []

        def sync_call():
            try:
                counter.sleep(30)
            except shoal.ActorDiedError as exc:
                errors.append(exc)

        thread = threading.Thread(target=sync_call)
        thread.start()
        time.sleep(0.3)
        os.kill(counter.pid, signal.SIGKILL)
        for future in futures:
            with pytest.raises(shoal.ActorDiedError, match="SIGKILL"):
                future.result(timeout=30)
        thread.join(30)
        assert len(errors) == 1 and errors[0].pid == counter.pid
        with pytest.raises(shoal.ActorDiedError):
            counter.get()
        with pytest.raises(shoal.ActorDiedError):
            counter.incr.send()
        # A process that connects afterwards is refused, never left waiting.
        with shoal.Pool(1, context=fork_or_spawn) as pool:
            with pytest.raises(shoal.ActorDiedError, match="no longer accepts connections"):
                pool.apply(workers.increment_actor, (counter, 1))
    finally:
        counter.close()


def test_actor_died_error_pickles():
    exc = shoal.ActorDiedError("gone", 123, -9)
    copy = pickle.loads(pickle.dumps(exc))
    assert (str(copy), copy.pid, copy.exitcode) == ("gone", 123, -9)
    assert isinstance(copy, shoal.ShoalError)


def test_close_stops_the_process_after_earlier_calls():
    counter = shoal.Actor(workers.Counter)
    pid = counter.pid
    futures = [counter.incr.submit() for _ in range(100)]
    counter.close()
    assert [f.result(timeout=30) for f in futures] == list(range(1, 101))
    assert _gone(pid)
    with pytest.raises(shoal.ActorDiedError, match="closed"):
        counter.get()
    counter.close()  # idempotent


def test_terminate_kills_the_actor():
    counter = shoal.Actor(workers.Counter)
    future = counter.sleep.submit(30)
    counter.terminate()
    with pytest.raises(shoal.ActorDiedError):
        future.result(timeout=30)
    assert _gone(counter.pid)


def test_garbage_collected_handle_stops_the_actor():
    counter = shoal.Actor(workers.Counter)
    pid = counter.pid
    del counter
    assert _gone(pid)


_CREATOR = textwrap.dedent(
    """
    import os, sys, signal
    sys.path.insert(0, {root!r})
    import shoal
    from tests import workers
    if __name__ == "__main__":
        counter = shoal.get_context({method!r}).Actor(workers.Counter)
        counter.incr()
        print(counter.pid, flush=True)
        how = {how!r}
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif how == "_exit":
            os._exit(0)
        # "return": a normal exit without close()
    """
)


@pytest.mark.parametrize("how", ["return", "_exit", "kill"])
def test_actor_does_not_outlive_its_creator(tmp_path, fork_or_spawn, how):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "creator.py"
    script.write_text(_CREATOR.format(root=root, method=fork_or_spawn, how=how))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    pid = int(out.stdout.split()[0])
    assert _gone(pid), f"actor {pid} still running after its creator exited ({how})"


def test_close_interrupted_by_ctrl_c_can_still_terminate():
    # close() interrupted while the actor ran a long call marked the actor
    # stopped: terminate() then did nothing and the exit hung joining it.
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGUSR1, interrupt)
    counter = shoal.Actor(workers.Counter)
    try:
        future = counter.sleep.submit(300)
        timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGUSR1))
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            counter.close()
        timer.join()
    finally:
        signal.signal(signal.SIGUSR1, previous)
    counter.terminate()
    assert _gone(counter.pid)
    with pytest.raises(shoal.ActorDiedError):
        future.result(timeout=30)


def test_no_flusher_thread_outlives_a_closed_actor():
    # close() woke the send() flusher thread while it slept before flushing;
    # it cleared the wake-up and then waited forever (one thread per actor).
    for _ in range(30):
        with shoal.Actor(workers.Counter) as counter:
            counter.incr.send()
            counter.incr.submit().result(timeout=30)
    assert wait_until(
        lambda: not [t for t in threading.enumerate() if t.name.startswith("shoal-actor-flusher")]
    )


def test_handles_dropped_in_another_process_free_its_connection(fork_or_spawn):
    # The send() flusher thread held the connection: a pool worker that sent
    # to many actors kept a thread and a socket per actor for good.
    with shoal.Actor(workers.Counter) as counter, shoal.Pool(1, context=fork_or_spawn) as pool:
        pool.apply(workers.send_to_actor, (counter, 10))
        assert wait_until(lambda: pool.apply(workers.actor_threads_after_gc) == [])
        assert counter.get() == 10


def test_actors_calling_each_other_in_a_cycle_raise_instead_of_hanging():
    # A waited on B, whose method called A back: both waited forever.
    with shoal.Actor(workers.Relay) as a, shoal.Actor(workers.Relay) as b, shoal.Actor(workers.Relay) as c:
        a.connect(b)
        b.connect(c)
        c.connect(a)
        assert b.relay("ping") == "pong"  # a chain without a cycle works
        with pytest.raises(RuntimeError, match="actors calling each other in a cycle"):
            a.relay("relay", "relay", "ping")  # a -> b -> c -> a
        assert a.relay("ping") == "pong"  # every actor goes on


_BUSY_CREATOR = textwrap.dedent(
    """
    import os, sys, signal, threading
    sys.path.insert(0, {root!r})
    import shoal
    from tests import workers
    if __name__ == "__main__":
        box = []
        start = lambda: box.append(shoal.get_context({method!r}).Actor(workers.Counter))
        thread = threading.Thread(target=start)
        thread.start()
        thread.join()
        counter = box[0]
        counter.sleep.submit(300)
        print(counter.pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """
)


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_busy_actor_started_by_a_thread_does_not_outlive_its_killed_creator(tmp_path, method):
    # Without PR_SET_PDEATHSIG (a thread or the forkserver started it) the
    # actor noticed its creator's death only between calls: it ran on.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "creator.py"
    script.write_text(_BUSY_CREATOR.format(root=root, method=method))
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    pid = int(proc.stdout.readline())
    proc.wait(60)
    proc.stdout.close()
    try:
        assert _gone(pid), f"actor {pid} still running after its creator was killed"
    finally:
        if not _gone(pid, 0):
            os.kill(pid, signal.SIGKILL)


def test_ctrl_c_while_the_actor_builds_its_object_kills_it_at_once(tmp_path):
    # Interrupted while __init__ ran, Actor() waited 5 s for the process to
    # exit by itself (so __init__ went on and finished) before killing it.
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    built = tmp_path / "built"
    before = {p.pid for p in psutil.Process().children()}  # a forkserver, a resource tracker
    previous = signal.signal(signal.SIGUSR1, interrupt)
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGUSR1))
    try:
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            shoal.get_context("fork").Actor(workers.SlowInit, 3, str(built))
        timer.join()
        # Actor() raised with its process already killed and reaped.
        assert {p.pid for p in psutil.Process().children()} <= before
        assert not built.exists()
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_actor_started_by_fork_inside_a_fork_pool_worker():
    # The actor closed the descriptor numbers of the pool's engine that the
    # worker had inherited (and closed, and reused): its own connection.
    with shoal.Pool(1, context="fork") as pool:
        assert pool.map(workers.count_with_worker_actor, range(3), chunksize=1) == [1, 2, 3]


@pytest.mark.parametrize("stop", ["close", "terminate"])
def test_done_callback_may_close_or_terminate_the_actor(stop):
    # The callback runs on the thread reading replies; stopping waited for
    # that thread to finish reading, i.e. for itself, forever.
    counter = shoal.Actor(workers.Counter)
    stopped = threading.Event()

    def callback(future):
        getattr(counter, stop)()
        stopped.set()

    counter.sleep.submit(0.5).add_done_callback(callback)  # done later, on the reading thread
    try:
        assert stopped.wait(30)
        assert _gone(counter.pid)
    finally:
        counter.terminate()
