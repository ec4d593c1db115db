"""Chaos at scale: processes SIGKILLed every 20 ms while work floods through.

- A pool (``map_async``, ``imap_unordered``, ``apply_async``) and an
  executor get 8,000 tasks while a killer thread SIGKILLs one of their
  workers every 20 ms: every task settles (its result, or
  ``WorkerDiedError`` for the tasks the killed workers were running), the
  results that come back are right, nothing hangs.
- An actor killed again and again while calls pile up on it: the calls
  pending at each kill fail with ``ActorDiedError``; a new actor works.
- Queue producers killed while they put, small and large items: the consumer
  never gets a torn item nor hangs, and each producer's items arrive in order.
- SharedDict writers killed while they write (``test_shared_chaos.py``
  checks the dict between rounds; here a reader checks it *while* they are
  killed).

Each test prints what it did (``-s`` shows it): kills made, tasks that
returned, tasks that failed.  No process, descriptor or segment may outlive
a test (the leak check in ``conftest.py``).

Which worker dies: under fork, any worker, whenever.  Under spawn a worker
takes longer to start (an interpreter and its imports) than the 20 ms between
kills: killing those still starting would leave no worker alive long enough
to run a task (the pool ends such a storm by itself, after 100 workers in a
row killed before they were ready, with a ``WorkerStartError`` that says
so), and a worker that dies as soon as it has run one task makes 8,000
tasks take many minutes.  So under spawn the killer, still every 20 ms,
picks among the workers that have been returning results for at least
SPAWN_GRACE (0.5 s).

For comparison (not a test): the standard library's ``ProcessPoolExecutor``
breaks on the first kill (``BrokenProcessPool`` for every pending future),
and ``multiprocessing.Pool`` waits for the killed worker's task forever.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest

import shoal
from helpers import wait_until
from shoal import SharedDict, _native
from test_shared_chaos import _valid, _writer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

TASKS = 8000
KILL_EVERY = 0.02


def work(i: int) -> tuple[int, int]:
    """A task of about a millisecond: its square, and the pid that ran it."""
    time.sleep(0.001)
    return i * i, os.getpid()


class Killer(threading.Thread):
    """Every KILL_EVERY seconds, SIGKILL one pid of ``victims()``."""

    def __init__(self, victims, seed: int = 0) -> None:
        super().__init__(name="chaos-killer", daemon=True)
        self.victims = victims
        self.rng = random.Random(seed)
        self.kills = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(KILL_EVERY):
            pids = list(self.victims())
            if not pids:
                continue
            try:
                os.kill(self.rng.choice(pids), signal.SIGKILL)
            except ProcessLookupError:
                continue
            self.kills += 1

    def __enter__(self) -> Killer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.join(30)


#: Under spawn, how long a worker serves tasks before the killer may pick it.
SPAWN_GRACE = 0.5


class Seen(dict):
    """pid -> when a result from that worker first came back."""

    def add(self, pid: int) -> None:
        self.setdefault(pid, time.monotonic())


def _pids(workers) -> list[int]:
    """The pids of *workers*, but those the pool has closed since the list
    was taken (``pid`` raises ValueError: the killer thread raised it once,
    under ASan, which makes that race wide)."""
    pids = []
    for p in list(workers()):
        try:
            pids.append(p.pid)
        except ValueError:
            pass
    return pids


def _victims(method: str, workers, seen: Seen):
    """What the killer may pick from (see the module docstring)."""
    if method == "fork":
        return lambda: _pids(workers)

    def serving() -> list[int]:
        now = time.monotonic()
        return [pid for pid in _pids(workers) if now - seen.get(pid, now) >= SPAWN_GRACE]

    return serving


def _report(what: str, kills: int, ok: int, died: int) -> None:
    print(f"\nchaos {what}: {kills} kills, {ok} results, {died} WorkerDiedError ({ok + died} settled)")


@pytest.mark.parametrize("api", ["apply_async", "imap_unordered", "map_async"])
def test_a_pool_flooded_while_workers_are_killed(fork_or_spawn, api):
    ok = died = 0
    seen = Seen()
    with shoal.get_context(fork_or_spawn).Pool(2) as pool:
        with Killer(_victims(fork_or_spawn, lambda: pool._pool, seen)) as killer:
            if api == "apply_async":
                results = [pool.apply_async(work, (i,)) for i in range(TASKS)]
                for i, r in enumerate(results):
                    try:
                        value, pid = r.get(timeout=100)
                    except shoal.WorkerDiedError:
                        died += 1
                        continue
                    assert value == i * i
                    seen.add(pid)
                    ok += 1
            elif api == "imap_unordered":
                values = []
                it = pool.imap_unordered(work, range(TASKS))
                while True:
                    try:
                        value, pid = it.next(timeout=100)
                    except StopIteration:
                        break
                    except shoal.WorkerDiedError:
                        died += 1
                        continue
                    values.append(value)
                    seen.add(pid)
                ok = len(values)
                # Each task once: a killed task is not also delivered, and none twice.
                assert len(set(values)) == ok and set(values) <= {i * i for i in range(TASKS)}
            else:
                # Maps of 10 tasks: a map fails as a whole when one of its tasks died.
                maps = [pool.map_async(work, range(j, j + 10), chunksize=1) for j in range(0, TASKS, 10)]
                for j, r in zip(range(0, TASKS, 10), maps, strict=True):
                    try:
                        out = r.get(timeout=100)
                    except shoal.WorkerDiedError:
                        died += 10  # the map's ten tasks settle with its error
                        continue
                    assert [v for v, _pid in out] == [i * i for i in range(j, j + 10)]
                    for _v, pid in out:
                        seen.add(pid)
                    ok += 10
        kills = killer.kills
        # The pool is whole: its workers replaced, ready for more.
        assert [v for v, _ in pool.map(work, range(20))] == [i * i for i in range(20)]
    _report(f"Pool.{api} under {fork_or_spawn}", kills, ok, died)
    assert ok + died == TASKS
    assert kills > 0 and died > 0  # the chaos happened, and hit tasks
    assert ok > 0


def test_an_executor_flooded_while_workers_are_killed(fork_or_spawn):
    ok = died = 0
    seen = Seen()
    with shoal.ProcessPoolExecutor(2, mp_context=shoal.get_context(fork_or_spawn)) as executor:
        with Killer(_victims(fork_or_spawn, lambda: (executor._processes or {}).values(), seen)) as killer:
            futures = [executor.submit(work, i) for i in range(TASKS)]
            for i, f in enumerate(futures):
                try:
                    value, pid = f.result(timeout=100)
                except shoal.WorkerDiedError:
                    died += 1
                    continue
                assert value == i * i
                seen.add(pid)
                ok += 1
        kills = killer.kills
        assert [v for v, _ in executor.map(work, range(20))] == [i * i for i in range(20)]
    _report(f"ProcessPoolExecutor under {fork_or_spawn}", kills, ok, died)
    assert ok + died == TASKS
    assert kills > 0 and died > 0 and ok > 0


# -- actors ----------------------------------------------------------------------------------------


class Tally:
    """An actor whose calls take a little while and count."""

    def __init__(self) -> None:
        self.n = 0

    def add(self) -> int:
        time.sleep(0.001)
        self.n += 1
        return self.n


def test_actors_killed_while_calls_pile_up(fork_or_spawn):
    # 40 actors, each killed 0-20 ms after 200 calls were submitted to it
    # (and a thread calling it synchronously): every call returns its count
    # or fails with ActorDiedError; the counts that came back are 1, 2, ...
    # in order (calls run one at a time); a new actor then works.
    ctx = shoal.get_context(fork_or_spawn)
    rng = random.Random(7)
    kills = ok = died = 0
    for _ in range(40 if fork_or_spawn == "fork" else 12):
        actor = ctx.Actor(Tally)
        try:
            sync: list = []

            def call_sync(actor=actor, sync=sync) -> None:
                for _ in range(50):
                    try:
                        sync.append(actor.add())
                    except shoal.ActorDiedError:
                        sync.append("died")
                        return

            thread = threading.Thread(target=call_sync)
            thread.start()
            futures = [actor.add.submit() for _ in range(200)]
            time.sleep(rng.uniform(0, KILL_EVERY))
            os.kill(actor.pid, signal.SIGKILL)
            kills += 1
            counts = []
            for f in futures:
                try:
                    counts.append(f.result(timeout=30))
                except shoal.ActorDiedError as exc:
                    assert "SIGKILL" in str(exc)
                    died += 1
            thread.join(30)
            assert not thread.is_alive()
            counts += [c for c in sync if c != "died"]
            ok += len(counts)
            assert sorted(counts) == list(range(1, len(counts) + 1))  # each call ran once
            with pytest.raises(shoal.ActorDiedError):
                actor.add()
        finally:
            actor.close()
    with ctx.Actor(Tally) as fresh:
        assert [fresh.add() for _ in range(3)] == [1, 2, 3]
    print(f"\nchaos actors under {fork_or_spawn}: {kills} kills, {ok} calls returned, {died} ActorDiedError")
    assert died > 0


# -- queues ----------------------------------------------------------------------------------------


#: A restarted producer numbers its items from GENERATION * its generation.
GENERATION = 10**9


def _payload(i: int) -> bytes:
    """Item *i*'s payload: every tenth is large (it travels in a memfd of its own)."""
    return bytes([i % 251]) * (300_000 if i % 10 == 0 else 100)


def _produce(q, ident: int, start: int) -> None:
    """Put (ident, i, payload) for i = start, start+1, ... forever."""
    i = start
    while True:
        q.put((ident, i, _payload(i)))
        i += 1


def test_queue_producers_killed_while_putting(fork_or_spawn):
    # Three producers, one of them killed every 20 ms and started again
    # where it left off (as far as the consumer knows): the consumer never
    # gets a torn or foreign item, each producer's items arrive in order,
    # and get() never waits for an item that a dead producer half-put.
    ctx = shoal.get_context(fork_or_spawn)
    rng = random.Random(3)
    q = ctx.Queue(maxsize=64)
    producers = {k: ctx.Process(target=_produce, args=(q, k, 0)) for k in range(3)}
    for p in producers.values():
        p.start()
    last: dict[tuple[int, int], int] = {}  # (producer, generation) -> last i received
    generation = dict.fromkeys(producers, 0)
    kills = got = 0
    deadline = time.monotonic() + 8
    next_kill = time.monotonic() + KILL_EVERY
    try:
        while time.monotonic() < deadline:
            try:
                ident, i, payload = q.get(timeout=10)
            except Exception as exc:  # an empty queue for 10 s would be a hang
                raise AssertionError(f"get() failed after {got} items and {kills} kills: {exc!r}") from exc
            assert payload == _payload(i), (ident, i)
            # In order, for each producer (a restarted one numbers from GENERATION * its generation).
            key = (ident, i // GENERATION)
            assert i > last.get(key, -1), (ident, i, last.get(key))
            last[key] = i
            got += 1
            if time.monotonic() >= next_kill:
                k = rng.randrange(3)
                os.kill(producers[k].pid, signal.SIGKILL)
                producers[k].join(30)
                kills += 1
                generation[k] += 1
                producers[k] = ctx.Process(target=_produce, args=(q, k, GENERATION * generation[k]))
                producers[k].start()
                next_kill = time.monotonic() + KILL_EVERY
    finally:
        for p in producers.values():
            p.kill()
            p.join(30)
    # Drain what is left: every item whole, then the queue still works.
    while True:
        try:
            ident, i, payload = q.get(timeout=0.5)
        except Exception:
            break
        assert payload == _payload(i)
        got += 1
    q.put("after")
    assert q.get(timeout=30) == "after"
    q.close()
    q.join_thread()
    print(f"\nchaos queue producers under {fork_or_spawn}: {kills} kills, {got} items received whole")
    assert kills > 0 and got > 0


# -- SharedDict ------------------------------------------------------------------------------------


def test_shared_dict_read_while_writers_are_killed(fork_or_spawn):
    # Writers (test_shared_chaos's) killed every 20 ms and restarted, for 6 s,
    # while this process reads: every read sees whole values, the dict's
    # invariants hold after, and it stays usable.
    ctx = shoal.get_context(fork_or_spawn)
    rng = random.Random(5)
    kills = reads = 0
    with SharedDict() as sd:
        writers = [ctx.Process(target=_writer, args=(sd, w)) for w in range(2)]
        for p in writers:
            p.start()
        assert wait_until(lambda: sd.get("started", 0) >= 2, 60)
        deadline = time.monotonic() + 6
        next_kill = time.monotonic() + KILL_EVERY
        seed = 100
        try:
            while time.monotonic() < deadline:
                for key, value in sd.copy().items():
                    assert _valid(key, value), (key, value)
                    reads += 1
                if time.monotonic() >= next_kill:
                    k = rng.randrange(len(writers))
                    os.kill(writers[k].pid, signal.SIGKILL)
                    writers[k].join(30)
                    kills += 1
                    seed += 1
                    writers[k] = ctx.Process(target=_writer, args=(sd, seed))
                    writers[k].start()
                    next_kill = time.monotonic() + KILL_EVERY
        finally:
            for p in writers:
                p.kill()
                p.join(30)
        _native.dict_lock(sd._map, 10)
        _native.dict_unlock(sd._map)
        assert _native.dict_check(sd._map) == len(sd)
        sd["after"] = 1
        assert sd["after"] == 1
    print(f"\nchaos SharedDict writers under {fork_or_spawn}: {kills} kills, {reads} values read whole")
    assert kills > 0
