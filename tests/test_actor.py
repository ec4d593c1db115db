"""shoal.Actor: calls, futures, fire-and-forget, handles in other processes,
errors, a dead actor, and that no actor outlives its creator."""

from __future__ import annotations

import concurrent.futures
import os
import pickle
import re
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
from helpers import run_python, wait_until
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


def test_unpicklable_argument_result_or_exception_fail_only_that_call_naming_the_method(fork_or_spawn):
    # The result's error said "the result of Counter", the exception's "the
    # task raised": neither named the method.
    with shoal.get_context(fork_or_spawn).Actor(workers.Counter) as counter:
        with pytest.raises(shoal.SerializationError, match=r"arguments of Counter\.echo\(\)"):
            counter.echo(threading.Lock())
        with pytest.raises(shoal.SerializationError, match=r"cannot pickle the result of Counter\.lock\(\)"):
            counter.lock()
        with pytest.raises(
            shoal.SerializationError, match=r"^Counter\.raise_unpicklable\(\) raised ErrorHoldingLock"
        ):
            counter.raise_unpicklable()
        with pytest.raises(
            shoal.SerializationError, match=r"the result of Counter\.unloadable\(\) could not be unpickled"
        ):
            counter.unloadable.submit().result(timeout=30)
        assert counter.incr() == 1


def test_sys_exit_in_a_method_fails_that_call_and_the_actor_goes_on(fork_or_spawn):
    # The SystemExit came back and was raised in the caller: the caller's
    # program ended, silently, with the method's exit status.
    with shoal.get_context(fork_or_spawn).Actor(workers.Counter) as counter:
        pid = counter.process_id()
        with pytest.raises(shoal.TaskExitError, match=r"Counter\.exit\(\) called sys\.exit\(3\)") as info:
            counter.exit(3)
        assert info.value.code == 3 and not isinstance(info.value, SystemExit)
        assert isinstance(info.value.__cause__, RemoteTraceback)
        assert "sys.exit(code)" in str(info.value.__cause__)  # where it was called
        with pytest.raises(shoal.TaskExitError, match=r"sys\.exit\('done'\)") as info:
            counter.exit.submit("done").result(timeout=30)
        assert info.value.code == "done"
        counter.exit.send(None)  # nobody waits: printed by the actor, which goes on
        assert counter.incr() == 1 and counter.process_id() == pid


def test_sys_exit_in_the_constructor_is_an_error_of_actor(fork_or_spawn):
    with pytest.raises(shoal.TaskExitError, match=r"ExitInit\(\) called sys\.exit\(4\)") as info:
        shoal.get_context(fork_or_spawn).Actor(workers.ExitInit, 4)
    assert info.value.code == 4


_EXITING_METHOD = textwrap.dedent(
    """
    import sys
    import shoal

    class Job:
        def run(self, code):
            sys.exit(code)
        def ping(self):
            return "pong"

    if __name__ == "__main__":
        with shoal.get_context(sys.argv[1]).Actor(Job) as job:
            try:
                job.run(3)
            except shoal.TaskExitError as exc:
                print("error:", exc)
            print("after:", job.ping())
    """
)


def test_a_program_whose_actor_method_calls_sys_exit_goes_on(tmp_path, fork_or_spawn):
    script = tmp_path / "exits.py"
    script.write_text(_EXITING_METHOD)
    out = run_python(str(script), fork_or_spawn, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "error: Job.run() called sys.exit(3)" in out.stdout
    assert "after: pong" in out.stdout


def test_assigning_or_deleting_an_attribute_of_a_handle_is_refused():
    # h.value = 42 set an attribute of the handle, which the actor never saw.
    with shoal.Actor(workers.Counter) as counter:
        with pytest.raises(AttributeError, match=r"cannot set 'n'.*live in the actor's process.*set_n"):
            counter.n = 42
        with pytest.raises(AttributeError, match="cannot set 'incr'"):
            counter.incr = None
        with pytest.raises(AttributeError, match=r"cannot delete 'incr'.*live in the actor's process"):
            del counter.incr
        with pytest.raises(AttributeError, match="cannot set 'pid'"):
            counter.pid = 0
        assert counter.incr() == 1 and counter.get() == 1
        assert counter.pid == shoal.Actor.pid(counter) == counter.process_id()


def test_the_objects_close_terminate_and_pid_win_over_the_handles(fork_or_spawn):
    # They were shadowed by the handle's own controls: handle.pid() raised
    # "TypeError: 'int' object is not callable", handle.close() stopped the actor.
    resource = shoal.get_context(fork_or_spawn).Actor(workers.Resource)
    try:
        actor_pid = shoal.Actor.pid(resource)
        assert resource.close() == "the resource's own close" and resource.is_closed()
        assert resource.close.submit().result(timeout=30) == "the resource's own close"
        assert resource.terminate() == "the resource's own terminate"
        assert resource.pid() == "the resource's own pid"
        assert actor_pid == resource.process_id() != os.getpid()
        # A handle passed to another process: the same.
        with shoal.Pool(1, context=fork_or_spawn) as pool:
            assert pool.apply(workers.use_resource_handle, (resource,)) == (
                "the resource's own close",
                "the resource's own pid",
                "the resource's own terminate",
                True,
                actor_pid,
            )
        assert resource.process_id() == actor_pid  # still running
        # The handle's own controls, through the class.
        shoal.Actor.close(resource)
        assert _gone(actor_pid)
        with pytest.raises(shoal.ActorDiedError, match="closed"):
            resource.close()
    finally:
        shoal.Actor.terminate(resource)


def test_with_block_and_terminate_through_the_class_reach_the_handle():
    with shoal.Actor(workers.Resource) as resource:
        pid = shoal.Actor.pid(resource)
        assert resource.close() == "the resource's own close"
        assert resource.is_closed()  # the object's close() ran; the actor goes on
    assert _gone(pid)  # leaving the block stopped the actor
    resource = shoal.Actor(workers.Resource)
    shoal.Actor.terminate(resource)
    assert _gone(shoal.Actor.pid(resource))
    with pytest.raises(shoal.ActorDiedError):
        resource.is_closed()


def test_large_arrays_travel_both_ways():
    array = np.arange(1 << 20, dtype=np.float64)
    with shoal.Actor(workers.Counter) as counter:
        back = counter.echo(array)
        assert np.array_equal(back, array)
        assert counter.echo.submit(array).result(timeout=30).sum() == array.sum()


def test_unknown_or_private_method_raises_attribute_error():
    with shoal.Actor(workers.Counter) as counter:
        with pytest.raises(AttributeError, match="has no method 'nope'.*incr") as info:
            counter.nope()
        # Only the object's methods are listed, not the handle's own controls.
        listed = str(info.value).split("its methods are: ")[1].split(" (")[0].split(", ")
        assert listed == sorted(name for name in vars(workers.Counter) if not name.startswith("_"))
        with pytest.raises(AttributeError):
            counter._private  # noqa: B018
        with pytest.raises(AttributeError):
            counter.n  # noqa: B018 - an attribute, not a method


def test_dir_of_a_handle_lists_the_objects_methods_and_the_controls():
    # dir() showed the handle's private state and only the methods already
    # called: tab completion offered _address, _client... and not incr.
    with shoal.Actor(workers.Counter) as counter:
        public = [name for name in dir(counter) if not name.startswith("__")]
        methods = sorted(name for name in vars(workers.Counter) if not name.startswith("_"))
        assert public == sorted({*methods, "close", "pid", "terminate"})
    with shoal.Actor(workers.Resource) as resource:
        assert {"close", "pid", "terminate", "is_closed"} <= set(dir(resource))


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


def _outcomes(counter) -> list:
    """What each kind of synchronous call gives: a value, or the error's
    type, message and (for a method's own exception) its remote traceback."""
    out = []
    for call in (
        lambda: counter.incr(2),
        lambda: counter.echo(np.arange(100_000)).sum(),  # a large result, in shared memory
        lambda: counter.fail("no such thing"),
        lambda: counter.echo(threading.Lock()),  # unpicklable argument
        counter.lock,  # unpicklable result
        counter.unloadable,  # a result this process cannot unpickle
        lambda: counter.exit(3),
        counter.get,
    ):
        try:
            out.append(("value", call()))
        except Exception as exc:  # the outcome compared
            cause = exc.__cause__
            message = re.sub(r" at 0x[0-9a-f]+", "", str(exc))  # an object's address differs
            out.append((type(exc).__name__, message, "in fail" in str(cause) if cause is not None else None))
    return out


#: The ways a synchronous call travels: through the connection's lane
#: (shared memory), on the connection read by the calling thread, or handed
#: over by another thread that reads (see shoal._actor._client).
PATHS = {"lane": (True, True), "direct": (True, False), "handed over": (False, False)}


def _take_path(monkeypatch, path: str) -> None:
    from shoal._actor import _client

    direct, lanes = PATHS[path]
    monkeypatch.setattr(_client, "DIRECT", direct)
    monkeypatch.setattr(_client, "LANES", lanes)


def test_direct_and_handed_over_calls_give_the_same_results_and_errors(monkeypatch, fork_or_spawn):
    # A synchronous call goes through the lane, or reads its own reply when
    # no other thread reads (the direct path), or another thread hands it
    # over: the same results and errors every way.
    seen = {}
    for path in PATHS:
        _take_path(monkeypatch, path)
        with shoal.get_context(fork_or_spawn).Actor(workers.Counter) as counter:
            seen[path] = _outcomes(counter)
    assert seen["lane"] == seen["direct"] == seen["handed over"]
    values = seen["lane"]
    assert values[0] == ("value", 2) and values[1] == ("value", sum(range(100_000)))
    assert values[2] == ("KeyError", "'no such thing'", True)
    assert values[3][0] == values[4][0] == values[5][0] == "SerializationError"
    assert "Counter.unloadable()" in values[5][1]
    assert values[6][0] == "TaskExitError" and values[-1] == ("value", 2)


def test_calls_waiting_behind_another_threads_call_get_their_own_replies_and_errors():
    # Calls from several threads at once: one reads, the others have their
    # replies (and their exceptions) handed over, none mixed up.
    with shoal.get_context("fork").Actor(workers.Counter) as counter:
        failures, values = [], []

        def caller(i):
            for j in range(150):
                if j % 10 == 0:
                    try:
                        counter.fail(f"{i}-{j}")
                    except KeyError as exc:
                        failures.append(exc.args[0])
                else:
                    values.append(counter.incr())

        threads = [threading.Thread(target=caller, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(values) == list(range(1, 4 * 135 + 1))
        assert sorted(failures) == sorted(f"{i}-{j}" for i in range(4) for j in range(0, 150, 10))


@pytest.mark.parametrize("path", list(PATHS))
def test_actor_killed_during_a_synchronous_call_fails_it_on_either_path(monkeypatch, path, fork_or_spawn):
    _take_path(monkeypatch, path)
    counter = shoal.get_context(fork_or_spawn).Actor(workers.Counter)
    try:
        counter.incr()  # the lane exists (and the caller sleeps on it) when the kill comes
        threading.Timer(0.3, os.kill, (counter.pid, signal.SIGKILL)).start()
        with pytest.raises(shoal.ActorDiedError, match="SIGKILL"):
            counter.sleep(30)
        with pytest.raises(shoal.ActorDiedError):
            counter.get()
    finally:
        counter.close()


def test_a_call_never_overtakes_the_sends_and_submits_made_before_it(fork_or_spawn):
    # A synchronous call comes through the lane, the send()s and submitted
    # calls before it on the connection: the actor runs those first.
    with shoal.get_context(fork_or_spawn).Actor(workers.Counter) as counter:
        for i in range(1, 301):
            counter.incr.send()
            if i % 3 == 0:
                counter.incr.submit(0)
            assert counter.get() == i
        for _ in range(2000):
            counter.incr.send()
        assert counter.incr(0) == 2300


def test_calls_too_large_for_the_lane_go_on_the_connection(fork_or_spawn):
    # Arguments and results past the lane's slot travel on the connection,
    # in order with the calls that used the lane.
    from shoal._actor._lane import LANE_CAP

    big = b"x" * (LANE_CAP + 1)
    with shoal.get_context(fork_or_spawn).Actor(workers.Counter) as counter:
        for i in range(20):
            assert counter.echo(big + bytes([i])) == big + bytes([i])
            assert counter.incr() == i + 1
            assert len(counter.echo(b"y" * (LANE_CAP - 200 + i))) == LANE_CAP - 200 + i


def test_a_lane_that_cannot_be_made_leaves_calls_on_the_connection(monkeypatch):
    # No descriptor or memory for a lane in the caller: the calls work as before.
    from shoal._actor import _lane

    def refuse():
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(_lane.Lane, "create", staticmethod(refuse))
    with shoal.get_context("fork").Actor(workers.Counter) as counter:
        assert [counter.incr() for _ in range(50)] == list(range(1, 51))
        with pytest.raises(KeyError):
            counter.fail("x")


def test_a_lane_message_longer_than_its_slot_is_refused_as_corrupt():
    # The peer writes the lane's header too: a length past the slot is
    # CorruptDataError, never a read past the mapping.
    import mmap

    from shoal import CorruptDataError, _native
    from shoal._actor._lane import LANE_CAP, LANE_SIZE, REPLIES, REQUESTS

    lane = mmap.mmap(-1, LANE_SIZE)
    _native.lane_put(lane, REQUESTS, b"abc", -1)
    assert _native.lane_wait((lane,), REQUESTS, 0.0, -1, 0) == 0
    assert _native.lane_get(lane, REQUESTS) == b"abc"
    assert _native.lane_get(lane, REQUESTS) is None
    _native.lane_put(lane, REPLIES, b"", -1)
    lane[128 + 4 : 128 + 8] = (LANE_CAP + 1).to_bytes(4, "little")
    with pytest.raises(CorruptDataError, match="more than"):
        _native.lane_get(lane, REPLIES)
    with pytest.raises(ValueError, match="at most"):
        _native.lane_put(lane, REQUESTS, b"x" * (LANE_CAP + 1), -1)
    lane.close()


def test_a_call_interrupted_by_ctrl_c_leaves_later_calls_their_own_replies(fork_or_spawn):
    # The lane has one reply slot: the interrupted call's reply, still to
    # come, must not meet a later call's there (later calls take the
    # connection), and each later call gets its own value.
    with shoal.get_context(fork_or_spawn).Actor(workers.Counter) as counter:
        counter.incr()
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
        with pytest.raises(KeyboardInterrupt):
            counter.sleep(0.6)
        assert [counter.echo(i) for i in range(300)] == list(range(300))
        assert counter.incr() == 2


def test_a_call_running_when_close_comes_gets_its_result(fork_or_spawn):
    # close() from another thread while a call runs: the actor replies
    # in the lane, reads STOP and exits.  Before, the caller, woken by both
    # its lane and the end of the connection, read the end first and failed
    # a call that had run (ActorDiedError "it was closed", 11 to 21 in 200).
    ctx = shoal.get_context(fork_or_spawn)
    for _ in range(40 if fork_or_spawn == "fork" else 10):
        counter = ctx.Actor(workers.Counter)
        counter.incr()  # the lane exists
        out: list = []
        caller = threading.Thread(target=lambda c=counter, o=out: o.append(c.sleep(0.02)))
        caller.start()
        time.sleep(0.005)  # its request is in: the method runs
        shoal.Actor.close(counter)
        caller.join(30)
        assert out == [0.02]


def test_a_lane_call_that_counts_messages_that_never_came_is_refused_and_the_actor_goes_on():
    # The caller says how many messages it sent on the connection before a
    # lane call; the actor reads those first.  A peer that claims more than
    # it sent used to leave the actor waiting for them forever (every caller
    # and close() hung); now that connection is refused.
    import socket

    from shoal._actor._lane import REQUESTS, Lane
    from shoal._actor._protocol import CALL, LANE
    from shoal._ipc import recv_packet, send_packet

    with shoal.get_context("fork").Actor(workers.Counter) as counter:
        assert counter.incr() == 1
        peer = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        lane, memfd = Lane.create()
        try:
            peer.connect(counter._address)
            send_packet(peer, 0, pickle.dumps((LANE, 1), 5), [memfd, lane.request_efd, lane.reply_efd])
            assert pickle.loads(recv_packet(peer)[1])[:2] == (1, True)
            request = pickle.dumps((CALL, 2, "incr", pickle.dumps(((), None), 5)), 5)
            lane.put(REQUESTS, (5).to_bytes(8, "little") + request)  # 5 messages before it: 1 came
            _kind, text, _fds = recv_packet(peer)
            assert b"counts 5 messages before it" in text
            assert counter.incr() == 2  # the peer's call never ran; the actor serves the others
        finally:
            os.close(memfd)
            lane.close()
            peer.close()


def test_ctrl_c_while_the_lane_is_handed_over_leaks_nothing():
    # The first synchronous call hands the actor its lane and waits for the
    # answer; Ctrl-C there used to drop the lane's two eventfds unclosed.
    import _thread

    def eventfds():
        return sum(1 for fd in os.listdir("/proc/self/fd") if _is_eventfd(fd))

    before = eventfds()
    for _ in range(3):
        counter = shoal.get_context("fork").Actor(workers.Counter)
        try:
            counter.sleep.send(0.3)
            time.sleep(0.02)  # sent: the actor is busy, the lane's answer waits behind it
            threading.Timer(0.1, _thread.interrupt_main).start()
            with pytest.raises(KeyboardInterrupt):
                counter.incr()
            assert counter.incr() == 1  # and calls go on, on the connection
        finally:
            counter.close()
    assert eventfds() == before


def _is_eventfd(fd: str) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    except OSError:
        return False


def test_an_actor_out_of_descriptors_fails_the_call_that_brought_some_and_goes_on(fork_or_spawn):
    # A large argument travels as a descriptor; an actor that has none left
    # used to drop the caller's connection, and close() then waited forever
    # for an actor that no longer heard it.
    with shoal.get_context(fork_or_spawn).Actor(workers.DescriptorHog) as hog:
        assert hog.starve() > 0
        with pytest.raises(OSError, match="too many open files"):
            hog.total(np.ones(1_000_000))
        hog.free()
        assert hog.total(np.ones(1_000_000)) == 1_000_000.0


def test_shoal_actor_lanes_0_keeps_calls_on_the_connection(monkeypatch):
    # The escape hatch: no lane (so no eventfd in this process), same results.
    monkeypatch.setenv("SHOAL_ACTOR_LANES", "0")
    before = sum(1 for fd in os.listdir("/proc/self/fd") if _is_eventfd(fd))
    with shoal.get_context("fork").Actor(workers.Counter) as counter:
        assert [counter.incr() for _ in range(20)] == list(range(1, 21))
        assert sum(1 for fd in os.listdir("/proc/self/fd") if _is_eventfd(fd)) == before
