"""The scheduler thread: the loop that owns every worker process.

One :class:`Scheduler` per local engine, driven by the engine's scheduler
thread (``Engine._run``), as the executor-manager thread of CPython's
``concurrent.futures.process`` drives its workers.  Each turn of
:meth:`Scheduler.run` waits in ``select()`` on the worker sockets, their
pidfds and the wake-up pipe, then takes its steps, each a method:

- :meth:`~Scheduler.read_results`: a worker's messages (results, ready,
  retiring, its ``worker_exit`` value) -> ``sink.deliver()``;
- ``reap``: a worker exited (its pidfd, else its sentinel, fired): drain
  its socket, attribute the tasks it held (:func:`._crash.attribute_crash`),
  start a replacement (this and the other steps on worker processes,
  ``start_worker``, ``start_missing`` and ``kill_workers``, are in
  :mod:`._lifecycle`, a base class of the scheduler); replacements the
  system refused (fork's EAGAIN at RLIMIT_NPROC, no descriptor left) are
  tried again after a pause that doubles, while the other workers go on;
  the pool breaks only when no worker is left;
- the callers' control requests (``Engine._handle_control``: cancel,
  interrupt, ...), then :meth:`~Scheduler.cancel` / :meth:`~Scheduler.interrupt`;
- :meth:`~Scheduler.dispatch`: batches from the pending queue to workers with
  room (not to a worker stalled on a long task);
- :meth:`~Scheduler.balance`: when a worker is idle, recall the tasks a
  stalled worker holds but has not started (:meth:`~Scheduler.recall`) and
  dispatch them again;
- :meth:`~Scheduler.check_time_limits`: kill a worker whose task ran past its
  limit or was cancelled;
- :meth:`~Scheduler.stop` (terminate: the workers and what their tasks left
  running, see :mod:`._procs`) or, once closed and idle, STOP to each
  worker.

Ownership: this thread alone reads and writes worker channels, starts
replacement workers (``start_worker``; the first ones start
from the caller's thread, before this thread exists), and mutates per-worker
state, the counters and the duration estimates.  It shares with the caller
side only the containers callers may touch (the pending and control deques,
the descriptors of queued tasks) and the engine's record
(:class:`~._state.EngineState`: the state, why it broke, the wake-up
flags), and wakes waiters through the record.  It never sees the engine:
callers ask it to act through :meth:`~Scheduler.mark_dirty`.
The engine's data-flow overview is in :mod:`._engine`.
"""

from __future__ import annotations

import os
import pickle
import selectors
import signal
import threading
import time
from collections import deque
from typing import Any

from .._native import batch_columns, compare_exchange, deliver_plain, drop_skipped, load
from .._serialization import loads_with, unpack_exception
from ..exceptions import (
    CorruptDataError,
    PoolClosedError,
    SerializationError,
    WorkerStartError,
    corrupt_data,
)
from . import _worker
from ._crash import ALREADY_FAILED
from ._lifecycle import REPLACE_RETRY, WorkerLifecycle, open_status_block
from ._procs import Tree
from ._state import BROKEN, CLOSE, RUN, TERMINATE, EngineState, Estimates
from ._tasks import Task, Worker, fn_bytes, interrupt_task, with_traceback_type
from ._worker import (
    GATE,
    GATE_MASK,
    GATE_MAX_RECALL,
    GATE_SHIFT,
    SENT,
    STATUS,
    STATUS_SLOT,
    check_results,
    describe,
)

#: Work per message when tasks are short: large enough that per-message costs
#: (~50 µs) vanish, small enough that the tail of a job stays balanced.
BATCH_SECONDS = 0.004
#: The least work (seconds, by the estimate) a batch is cut to so that
#: the items pending are shared among the workers (Scheduler._share_items).
SHARE_SECONDS = 0.001
#: Upper bound on tasks per message whatever the estimate says.
MAX_BATCH = 2048
#: How many batches a worker may hold (one running, one ready to start).
CREDIT = 2
#: Functions a worker keeps unpickled; older ones are forgotten.
FN_CACHE = 128
#: How often time limits are checked while a timed task runs.
TIMEOUT_TICK = 0.02
#: A worker whose task has run this long is *stalled*: it gets no second
#: batch, and the tasks it holds but has not started are recalled as soon
#: as another worker has nothing to do (Scheduler.balance).  Long enough
#: that batches of short tasks never count (a batch's tasks each take
#: microseconds), short against any task worth waiting behind.
STALLED_AFTER = 0.01
#: How often stalls are looked for while a worker is idle and another holds
#: tasks it has not started.
STALL_TICK = 0.005


class Scheduler(WorkerLifecycle):
    """The scheduler thread's state and steps, for one :class:`~._engine.LocalEngine`.

    It holds the engine's :class:`~._state.EngineState` and the containers
    the caller side shares with it, never the engine itself.
    """

    def __init__(
        self,
        record: EngineState,
        *,
        workers: dict[int, Worker],
        estimates: Estimates,
        task_fds: set[int],
        segments: Any,
        exit_results: list[tuple[bool, Any]],
        handle_control: Any,
        processes: int,
        context: Any,
        maxtasksperchild: int | None,
        max_memory: int | None,
        config_args: tuple | None,
        config_inline: tuple | None = None,
        shared: Any,
        shared_data: bytes | None,
        shared_fds: list[int],
        remote_traceback: type[BaseException],
    ) -> None:
        self._record = record
        # Shared with the caller side: containers, never rebound.
        self._pending: deque[Task] = record.pending
        self._control: deque = record.control
        self._workers = workers  # keyed by slot
        self._estimates = estimates
        self._task_fds = task_fds
        self._segments = segments
        self._exit_results = exit_results
        self._handle_control = handle_control
        self._notify = record.notify_waiters
        # How workers start.
        self._ctx = context
        self._maxtasks = maxtasksperchild
        self._max_memory = max_memory
        self._config_args = config_args
        self._config_inline = config_inline  # hooks that travel in the Process arguments
        self._shared = shared
        self._shared_data = shared_data
        self._shared_fds = shared_fds  # ours from now on: closed with the rest
        self._remote_traceback = remote_traceback
        # This thread's own.
        self._free_slots = list(range(processes * 2 - 1, -1, -1))
        self._rotate = 0
        # ids of functions whose tasks have killed a worker (0: uncached ones)
        self._crashed: set[int] = set()
        self._timed = 0  # tasks with a time limit held by workers
        self._doomed = 0  # cancelled tasks held by workers, to kill when they start
        self._watch_stalls = False  # a worker is idle while others hold tasks (see balance)
        self._start_failures = 0  # workers that exited before they were ready, in a row
        self._killed_starts = 0  # workers SIGKILLed before they were ready, in a row
        # Replacement workers the system refused, to start again at
        # _replace_at (see start_missing).
        self._missing = 0
        self._replace_at = 0.0
        self._replace_delay = REPLACE_RETRY / 2
        # counters (read by Engine.statistics)
        self.completed = 0
        self.failed = 0
        self.cancelled = 0
        self.started = 0
        self.recalled = 0
        self.replaced: dict[str, int] = {}

        # Status block: one cache line per worker slot (replacements reuse
        # slots; twice the pool size leaves room while one is being reaped).
        self._thread: threading.Thread | None = None  # the one that runs run()
        self._status_fd, self._status, self._wake_r, self._wake_w, self._selector = open_status_block(
            STATUS_SLOT * processes * 2, self._shared_fds
        )

    def mark_dirty(self) -> None:
        """Tell the scheduler that something changed, waking it if it
        sleeps (the wake-up protocol of run)."""
        record = self._record
        record.dirty = True
        if record.sleeping:
            record.sleeping = False
            try:
                os.write(self._wake_w, b"x")
            except (BlockingIOError, OSError):
                pass

    # ------------------------------------------------------------------
    # workers (started, reaped and stopped by WorkerLifecycle)
    # ------------------------------------------------------------------
    def descriptors(self) -> list[int]:
        """Descriptors this engine holds that no child process should keep."""
        fds = [self._wake_r, self._wake_w, self._status_fd, *self._shared_fds]
        try:
            fds.append(self._selector.fileno())
        except (AttributeError, ValueError, OSError):
            pass
        for w in list(self._workers.values()):
            fds.append(w.channel.fileno())
            if w.pidfd is not None:
                fds.append(w.pidfd)
        # Not a scan of the queue: with a long queue and maxtasksperchild=1
        # that would cost O(queue) per worker started.
        fds.extend(list(self._task_fds))
        fds.extend(self._segments.descriptors())
        return fds

    def close_resources(self) -> None:
        try:
            self._selector.close()
        except Exception:  # noqa: BLE001
            pass
        for fd in (self._wake_r, self._wake_w, self._status_fd, *self._shared_fds):
            try:
                os.close(fd)
            except OSError:
                pass
        self._shared_fds = []
        try:
            self._status.close()
        except Exception:  # noqa: BLE001
            pass
        self._segments.close()

    def _flush(self, w: Worker) -> None:
        try:
            done = w.channel.flush()
        except (BrokenPipeError, ConnectionResetError):
            # The worker is gone; its sentinel will tell us how, and the
            # tasks it held go elsewhere.
            done = True
            w.channel.discard_output()
        want = not done
        if want != w.writing:
            w.writing = want
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0)
            if w.eof:
                events &= ~selectors.EVENT_READ
            if events:
                self._selector.modify(w.channel.fileno(), events, ("chan", w))

    # ------------------------------------------------------------------
    # the loop
    # ------------------------------------------------------------------
    def run(self) -> None:
        """The scheduler thread's loop; returns once every worker is gone
        (closed and idle) or terminate() was asked for."""
        self._thread = threading.current_thread()
        select = self._selector.select
        record = self._record
        while True:
            # The wake-up protocol.  A caller changes state (queues a task, a
            # request, close/terminate), then sets record.dirty, then writes
            # to the wake-up pipe if it sees record.sleeping (mark_dirty).  We
            # set sleeping, then look at dirty: a change made before we set
            # sleeping is seen here, one made after finds sleeping set and
            # writes.  No wake-up is
            # lost, and we never spin on work that waits for a free worker.
            timeout = TIMEOUT_TICK if self._timed or self._doomed else None
            if self._watch_stalls:
                timeout = STALL_TICK
            if self._missing:
                wait = max(0.0, self._replace_at - time.monotonic())
                timeout = wait if timeout is None else min(timeout, wait)
            record.sleeping = True
            if record.dirty:
                timeout = 0
            events = select(timeout)
            record.sleeping = False
            record.dirty = False
            for key, mask in events:
                kind, w = key.data
                if kind == "chan":
                    if mask & selectors.EVENT_READ:
                        self.read_results(w)
                    if mask & selectors.EVENT_WRITE:
                        self._flush(w)
                elif kind == "dead":
                    self.reap(w)
                else:
                    try:
                        while os.read(self._wake_r, 4096):
                            pass
                    except BlockingIOError:
                        pass
            while self._control:
                self._handle_control(*self._control.popleft())
            state = record.state
            if state == TERMINATE:
                # What was asked just before terminate() (shutdown's
                # cancel_futures) is done first.
                while self._control:
                    self._handle_control(*self._control.popleft())
                self.stop()
                return
            if self._missing and time.monotonic() >= self._replace_at:
                if state == RUN or self._pending:
                    self.start_missing()
                else:
                    self._missing = 0
            if self._pending:
                self.dispatch()
            # (with tasks still queued, an idle worker got some at dispatch)
            self._watch_stalls = not self._pending and self.balance()
            if self._timed or self._doomed:
                self.check_time_limits()
            if (
                state in (CLOSE, BROKEN)
                and not self._pending
                and not record.feeders
                and not any(w.inflight for w in self._workers.values())
            ):
                if not self._workers:
                    return
                for w in self._workers.values():
                    if w.accepting:
                        w.retire_reason = "shutdown"
                        w.channel.queue(pickle.dumps((_worker.STOP, (), (), False)))
                        self._flush(w)

    # -- dispatch ---------------------------------------------------------
    def dispatch(self) -> None:
        """Give each worker with room a batch from the head of the queue.

        A worker may hold CREDIT batches.  A batch is about BATCH_SECONDS of
        work by the head task's measured duration (one task while the
        function is new), and never more than a fair share of what is
        pending, so work spreads over every worker.  Idle workers are served
        first, and the starting point rotates so no worker is favoured.
        """
        pending = self._pending
        now = time.monotonic()
        workers = [
            w
            for w in self._workers.values()
            if w.accepting and len(w.batches) < CREDIT and not (w.batches and self._stalled(w, now))
        ]
        if not workers:
            return
        workers.sort(key=lambda w: len(w.batches))
        self._rotate += 1
        estimates = self._estimates
        maxtasks = self._maxtasks
        popleft = pending.popleft  # only this thread takes from the left
        while pending and workers:
            progressed = False
            for w in list(workers):
                if not pending:
                    break
                head = pending[0]
                est = estimates.get(head.fn_id)
                if est is None:
                    size = 1
                else:
                    size = max(1, min(MAX_BATCH, int(BATCH_SECONDS / max(est * head.n, 1e-7))))
                fair = -(-len(pending) // len(workers))
                take = min(size, fair)
                if maxtasks:
                    take = min(take, maxtasks - (w.sent - w.recalled))
                batch: list[Task] = []
                while pending and len(batch) < take:
                    more = [popleft() for _ in range(min(take - len(batch), len(pending)))]
                    for task in drop_skipped(more):  # nobody wants their outcome any more
                        task.sink = None  # no cycle with the sink (see Task)
                        task.close_fds(self._task_fds)
                        self.cancelled += 1
                    batch += more
                if est is not None and head.n > 1 and len(batch) > 1:
                    # A share for every worker, busy ones too: those with
                    # room now are not the only ones that will want work.
                    self._share_items(batch, est, sum(1 for v in self._workers.values() if v.accepting))
                if batch:
                    self._send_batch(w, batch)
                    progressed = True
                if len(w.batches) >= CREDIT or (maxtasks and w.sent - w.recalled >= maxtasks):
                    workers.remove(w)
            if not progressed:
                break

    def _share_items(self, batch: list[Task], est: float, workers: int) -> None:
        """Cut *batch* (tasks taken from the head of the queue, a map's
        chunks among them) to about BATCH_SECONDS of work and a fair share
        of the *items* pending, and put the rest back at the head.

        Chunks differ in size (a map's first is one item, and its last
        ones shrink), so counting tasks is not sharing work: a batch
        sized by its first, small chunk took the large ones behind it, and
        one worker got nine tenths of a map while the other idled.
        """
        pending = self._pending
        items = sum(t.n for t in batch)
        # The items still queued behind (counted up to a bound: a queue of
        # a million one-item tasks is not walked at every dispatch).
        behind = 0
        for count, task in enumerate(pending):
            if count == 4096:
                behind = behind * len(pending) // count
                break
            behind += task.n
        per_item = max(est, 1e-9)
        fair = -(-(items + behind) // max(workers, 1))
        # Never below SHARE_SECONDS of work: sharing less than a round trip
        # to a worker costs is not worth the round trip (the last items of
        # a map would otherwise go a few at a time).
        budget = max(batch[0].n, int(SHARE_SECONDS / per_item), min(int(BATCH_SECONDS / per_item), fair))
        total = 0
        for k, task in enumerate(batch):
            total += task.n
            if k and total > budget:
                pending.extendleft(reversed(batch[k:]))
                del batch[k:]
                return

    # -- head-of-line blocking ----------------------------------------------
    def _stalled(self, w: Worker, now: float) -> bool:
        """True when *w* has been running one task for STALLED_AFTER or more."""
        tid, started, _last = STATUS.unpack_from(self._status, w.slot * STATUS_SLOT)
        return tid != 0 and started != 0.0 and now - started >= STALLED_AFTER

    def balance(self) -> bool:
        """No task waits behind a long one while a worker is idle.

        A worker may hold a batch it has not started behind the one it
        runs, and one task of a batch may run far longer than the others.
        When a worker is idle (ready, nothing held, nothing queued for it)
        and another is stalled (its task has run STALLED_AFTER or more),
        the stalled worker's tasks not yet started are recalled and
        dispatched again.  Returns whether to look again in STALL_TICK (a
        worker is idle while another holds tasks that may stall).
        """
        idle = held = False
        for w in self._workers.values():
            if not w.inflight:
                if w.ready and w.accepting:
                    idle = True
            elif len(w.inflight) > 1:
                held = True
        if not (idle and held) or self._record.state == TERMINATE:
            return False
        now = time.monotonic()
        recalled = 0
        for w in list(self._workers.values()):
            if len(w.inflight) > 1 and w.kill_reason is None and self._stalled(w, now):
                recalled += self.recall(w)
        if recalled:
            self.dispatch()
        return True

    def recall(self, w: Worker) -> int:
        """Take back the tasks *w* holds but has not started, and queue them
        first; return how many.

        Through the gate of *w*'s status slot (see ``_worker.GATE``): one
        compare-and-exchange settles, for each task, whether the worker
        started it (it stays) or not (it is the worker's no more: the worker
        skips it, unseen, when it gets there).  Nothing runs twice and
        nothing is lost; crash attribution sees only what stays.
        """
        status = self._status
        offset = w.slot * STATUS_SLOT + GATE
        gate = load(status, offset)
        while True:
            consumed = gate & GATE_MASK
            skipping = gate >> GATE_SHIFT
            n = w.sent - consumed - skipping  # neither started nor recalled yet
            if n <= 0 or n > len(w.inflight) or skipping + n > GATE_MAX_RECALL:
                return 0
            found = compare_exchange(status, offset, gate, consumed | ((skipping + n) << GATE_SHIFT))
            if found == gate:
                break
            gate = found  # the worker started one meanwhile
        # The worker runs its tasks in the order it got them: those not
        # started are the last n it holds, and the last n results it owes.
        inflight = w.inflight
        tasks = [inflight.pop() for _ in range(n)]
        tasks.reverse()
        w.recalled += n
        self.recalled += n
        batches = w.batches
        left = n
        while left and batches:
            if batches[-1] > left:
                batches[-1] -= left
                break
            left -= batches.pop()
        requeue = []
        for task in tasks:
            self._leaving(task)
            if task.kill_reason not in ALREADY_FAILED:  # else its caller has its error already
                requeue.append(task)
        self._pending.extendleft(reversed(requeue))
        return n

    def _send_batch(self, w: Worker, batch: list[Task]) -> None:
        # The batch travels as parallel lists, one per field (the wire
        # format of _worker.BATCH): no tuple per task to build, pickle and
        # leave for the garbage collector.
        ids, fids, modes, datas, nfds, timed = batch_columns(batch)
        fn_defs: list[tuple[int, Any]] = []
        forget: list[int] = []
        used = dict.fromkeys(fids)  # in order of first use
        for fid in used:
            if fid:
                if fid in w.fns:
                    w.fns.move_to_end(fid)
                else:
                    fn_defs.append((fid, fn_bytes(batch, fid)))
                    w.fns[fid] = None
        fds: list[int] = []
        if nfds is not None:
            for task in batch:
                # The channel closes what it sends; the task keeps its own
                # descriptors so it can be sent again if this worker dies.
                fds.extend(os.dup(fd) for fd in task.fds)
        wire = (ids, fids, modes, datas, nfds)
        w.inflight.extend(batch)
        self._timed += timed
        w.sent += len(batch)
        w.batches.append(len(batch))
        # Evict the least recently used functions this batch does not need;
        # the worker forgets them before it loads the new ones.
        for fid in list(w.fns) if len(w.fns) > FN_CACHE else ():
            if len(w.fns) - len(forget) <= FN_CACHE:
                break
            if fid not in used:
                forget.append(fid)
        for fid in forget:
            del w.fns[fid]
        if forget:
            fn_defs.insert(0, (-1, forget))
        # Functions that have killed a worker get their results sent after
        # every task, so another crash makes no finished task run again.
        flush_each = bool(self._crashed) and not self._crashed.isdisjoint(used)
        w.channel.queue(pickle.dumps((_worker.BATCH, fn_defs, wire, flush_each), 5), fds)
        self._flush(w)

    # -- results ----------------------------------------------------------
    def read_results(self, w: Worker) -> int:
        """Handle what *w* sent; how many messages that was.  A message
        that is not a worker's makes it corrupt (see corrupt_worker)."""
        try:
            frames, eof = w.channel.recv_available()
        except OSError as exc:  # a frame that cannot be followed (CorruptDataError; EMFILE)
            self.corrupt_worker(w, exc)
            return 0
        for i, (payload, fds) in enumerate(frames):
            try:
                self._on_message(w, payload, fds)
            except CorruptDataError as exc:
                for _payload, later in frames[i + 1 :]:
                    for fd in later:
                        os.close(fd)
                self.corrupt_worker(w, exc)
                return i
        sent = load(self._status, w.slot * STATUS_SLOT + SENT)
        if w.channel.received > sent:
            # Bytes the worker did not send (it counts each message before
            # sending it): a frame of theirs may be waiting for bytes that
            # will never come, so this is the time to say it.
            self.corrupt_worker(
                w,
                corrupt_data(
                    f"its channel carried {w.channel.received - sent} bytes more than the worker sent "
                    "(something else in it wrote to the channel's descriptor)"
                ),
            )
            return len(frames)
        if eof and not w.eof:
            self._stop_reading(w)
        return len(frames)

    def _stop_reading(self, w: Worker) -> None:
        w.eof = True
        try:
            if w.writing:
                self._selector.modify(w.channel.fileno(), selectors.EVENT_WRITE, ("chan", w))
            else:
                self._selector.unregister(w.channel.fileno())
        except (KeyError, ValueError):
            pass

    def corrupt_worker(self, w: Worker, exc: OSError) -> None:
        """*w* sent a message that is not shoal's: stop reading it (its
        stream cannot be followed), kill it, and let reap() fail the task
        it was running (or the one whose result the message most likely
        carried) with a CorruptDataError saying so; the others run again
        elsewhere, as after a crash."""
        if w.kill_error is None:
            error = CorruptDataError(
                f"worker process {w.pid} sent the pool a message that is not shoal's ({exc}); it was "
                "killed and replaced, and the pool goes on. A task that writes to a descriptor it does not "
                "own (the worker's channel to the pool) does this, and so does memory corruption in the "
                "worker (a C extension)"
            )
            error.__cause__ = exc
            w.kill_error = error
            w.kill_reason = w.kill_reason or "corrupt"
        if not w.eof:
            self._stop_reading(w)
        try:
            os.kill(w.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _on_message(self, w: Worker, payload: bytes, fds: list[int]) -> None:
        """One message of *w*; CorruptDataError (its descriptors closed)
        when it is not one a worker sends."""
        try:
            try:
                kind, body = pickle.loads(payload)
            except Exception as exc:  # garbage of any kind: not a message of ours
                raise corrupt_data(f"a message that does not unpickle ({type(exc).__name__}: {exc})") from exc
            if kind == _worker.RESULTS:
                check_results(body, len(w.inflight), len(fds))
            elif kind == _worker.EXITED or kind == _worker.RETIRE:
                if type(body) is not tuple or not body or (kind == _worker.EXITED and len(body) != 2):
                    raise corrupt_data(f"a message of kind {kind} whose body is {describe(body)}")
            elif kind != _worker.READY and kind != _worker.INIT_FAILED:
                raise corrupt_data(f"a message of unknown kind {describe(kind)}")
            if fds and kind != _worker.RESULTS and kind != _worker.EXITED:
                # Nothing would close them: a worker never sends descriptors with these.
                raise corrupt_data(f"a message of kind {kind} that brought {len(fds)} descriptors")
        except CorruptDataError:
            for fd in fds:
                os.close(fd)
            raise
        if kind == _worker.RESULTS:
            self._on_results(w, body, fds)
        elif kind == _worker.READY:
            w.ready = True
            self._start_failures = self._killed_starts = 0
        elif kind == _worker.RETIRE:
            w.retire_reason = body[0]
        elif kind == _worker.EXITED:
            ok, data = body
            try:
                outcome = (True, loads_with(data, fds)) if ok else (False, unpack_exception(data))
            except Exception as exc:  # noqa: BLE001 - reported by worker_exit_results()
                text = f"the value worker_exit returned could not be unpickled: {exc!r}"
                outcome = (False, SerializationError(text))
            finally:
                for fd in fds:
                    if fd >= 0:  # -1: the value took it (providing_fds)
                        os.close(fd)
            self._exit_results.append(outcome)
        elif kind == _worker.INIT_FAILED:
            error = unpack_exception(body)
            w.retire_reason = "initializer"
            self.break_pool(error)

    def _on_results(self, w: Worker, body: Any, fds: list[int]) -> None:
        # Parallel lists (the wire format of _worker.RESULTS): what each
        # outcome is, the outcomes, how many descriptors each brought (None:
        # none did), and the durations per function.
        kinds, values, counts, timing = body
        pos = 0
        inflight = w.inflight
        waiters = self._record.waiters
        plain_loads = pickle.loads
        completed = failed = timed = doomed = 0
        raw = _worker.RAW
        popleft = inflight.popleft
        tasks = [popleft() for _ in kinds]  # the worker answers in the order it got them
        n = len(tasks)
        i = 0
        try:
            while i < n:
                # Plain successes (RAW values for tasks without descriptors,
                # time limit or kill reason) are delivered in C; the loop
                # below handles the others, one at a time, in order.
                start = i
                i = deliver_plain(tasks, kinds, values, i, raw)
                completed += i - start
                if i == n:
                    break
                task = tasks[i]
                kind = kinds[i]
                value = values[i]
                nfds = counts[i] if counts is not None else 0
                i += 1
                if task.fds:
                    task.close_fds(self._task_fds)
                if task.timeout is not None:
                    timed += 1
                if task.kill_reason is not None and task.kill_reason in ALREADY_FAILED:
                    if task.kill_reason == "cancelled":
                        doomed += 1
                    pos += nfds
                    continue  # its caller already has an error; drop the late result
                if kind == raw:
                    completed += 1
                    task.sink.deliver(task, True, value)
                    task.sink = None  # the engine holds no delivered result (see Task)
                    continue
                if kind == _worker.PICKLED:
                    try:
                        if nfds:
                            # Out-of-band buffers come as shared memory beside the message.
                            pos += nfds
                            value = loads_with(value, fds, pos - nfds, pos)
                        else:
                            value = plain_loads(value)
                        completed += 1
                        task.sink.deliver(task, True, value)
                        task.sink = None
                        continue
                    except BaseException as exc:  # noqa: BLE001
                        value = SerializationError(
                            "the task's result could not be unpickled in the parent: "
                            f"{type(exc).__name__}: {exc}"
                        )
                elif kind == _worker.FAILED:
                    value = self._with_traceback_type(unpack_exception(value))
                else:
                    raise corrupt_data(f"a result of unknown kind {kind!r}")
                failed += 1
                task.sink.deliver(task, False, value)
                task.sink = None
        except BaseException:
            # Only a bug gets here: give back every task not yet delivered
            # (its sink is still set), so _run's clean-up fails it and no
            # caller waits for it forever.
            inflight.extendleft(reversed([t for t in tasks if t.sink is not None]))
            raise
        finally:
            for fd in fds:
                if fd >= 0:  # -1: a result took it (providing_fds)
                    os.close(fd)
            self.completed += completed
            self.failed += failed
            self._timed -= timed
            self._doomed -= doomed
            # Every result of a batch is in: the worker has room for another.
            answered = len(kinds)
            batches = w.batches
            while answered and batches:
                if batches[0] > answered:
                    batches[0] -= answered
                    break
                answered -= batches.popleft()
            record = self._estimates.record
            for i in range(0, len(timing), 3):
                record(*timing[i : i + 3])  # (function id, seconds, items)
        if waiters or self._record.waiters:
            self._notify()

    def _with_traceback_type(self, exc: BaseException) -> BaseException:
        return with_traceback_type(exc, self._remote_traceback)

    def fail(self, task: Task, exc: BaseException, *, cancelled: bool = False) -> None:
        task.close_fds(self._task_fds)
        if cancelled:
            self.cancelled += 1
        else:
            self.failed += 1
        if task.sink is not None:  # None: delivered already
            task.sink.deliver(task, False, exc)
            task.sink = None  # the engine holds no delivered result (see Task)

    # -- control requests from callers (see Engine._handle_control) --------
    def cancel(self, task: Task, exc: BaseException) -> None:
        """Fail *task* with *exc*: drop it if queued, kill its worker if it runs."""
        if task in self._pending:
            self._pending.remove(task)
            self.fail(task, exc, cancelled=True)
            self._notify()
            return
        for w in self._workers.values():
            if task in w.inflight:
                # Its caller learns at once.  The worker is killed when
                # it runs the task: now if it is running, or as soon as
                # it starts it (see check_time_limits).
                task.kill_reason = "cancelled"
                self.fail(task, exc, cancelled=True)
                self._doomed += 1
                self.check_time_limits()
                self._notify()
                return

    def interrupt(self, match: Any, exc: BaseException) -> None:
        """Fail every task whose sink satisfies *match* (all, if None) with
        *exc*: queued ones are dropped, running ones' workers killed."""
        # Callers append to _pending concurrently (at the right): take
        # what is there from the left, put back what stays, in order.
        keep = []
        for _ in range(len(self._pending)):
            t = self._pending.popleft()
            if match is None or match(t.sink):
                interrupt_task(t, exc)
                self.fail(t, exc, cancelled=True)
            else:
                keep.append(t)
        self._pending.extendleft(reversed(keep))
        for w in self._workers.values():
            for t in w.inflight:
                if t.kill_reason is None and (match is None or match(t.sink)):
                    # As for cancel: the worker is killed when it runs it.
                    t.kill_reason = "cancelled"
                    interrupt_task(t, exc)
                    self.fail(t, exc, cancelled=True)
                    self._doomed += 1
        self.check_time_limits()
        self._notify()

    # -- time limits -------------------------------------------------------
    def check_time_limits(self) -> None:
        """Kill workers running a task past its time limit, or a task that
        was cancelled while the worker held it."""
        now = time.monotonic()
        for w in list(self._workers.values()):
            if not w.inflight or w.kill_reason is not None:
                continue
            tid, started, _last = STATUS.unpack_from(self._status, w.slot * STATUS_SLOT)
            if not tid or not started:
                continue  # idle, or a task id written before its start time
            for task in w.inflight:
                if task.id == tid:
                    if task.kill_reason == "cancelled":
                        self._kill(w, "cancelled", tid)
                    elif task.timeout is not None and now - started > task.timeout:
                        task.kill_reason = "timeout"
                        self._kill(w, "timeout", tid)
                    break

    def _kill(self, w: Worker, reason: str, tid: int) -> None:
        # The task may have finished since the status was read: kill only if
        # the worker is still on it, so the next task is not hit instead.
        if STATUS.unpack_from(self._status, w.slot * STATUS_SLOT)[0] != tid:
            return
        if w.kill_reason is None:
            w.kill_reason = reason
        # The processes the task started go with it (found before the
        # worker dies: then the system adopts them).
        tree = Tree(w.pid)
        try:
            os.kill(w.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        tree.send_signal(signal.SIGKILL)
        tree.close()

    def _leaving(self, task: Task) -> None:
        """Bookkeeping for a task that leaves a worker's hands for good."""
        if task.timeout is not None:
            self._timed -= 1
        if task.kill_reason == "cancelled":
            self._doomed -= 1

    def break_pool(self, exc: BaseException) -> None:
        """The pool cannot start workers: fail what is queued, refuse new work.

        Tasks that live workers already hold still run and deliver their
        results; then the workers are told to stop.
        """
        if not self._record.mark_broken(exc):
            return
        err = WorkerStartError(f"the pool cannot run tasks: {exc}")
        err.__cause__ = exc
        while self._pending:
            self.fail(self._pending.popleft(), err)
        self._notify()

    # -- termination -------------------------------------------------------
    def fail_everything(self, exc: BaseException) -> None:
        while self._pending:
            self.fail(self._pending.popleft(), exc)
        for w in self._workers.values():
            for task in w.inflight:
                if task.kill_reason not in ALREADY_FAILED:
                    self.fail(task, exc)
                    task.kill_reason = "abandoned"
        self._notify()

    def stop(self) -> None:
        self.fail_everything(PoolClosedError("the pool was terminated before this task finished"))
        self.kill_workers(graceful=not self._record.kill_on_terminate)
