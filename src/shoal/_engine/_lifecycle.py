"""Worker processes: how the scheduler starts, reaps and stops them.

The part of the scheduler thread's work (:class:`~._scheduler.Scheduler`,
which derives from :class:`WorkerLifecycle`) that deals with worker
processes as processes: ``start_worker`` (a slot in the status block, a
channel, the process, its first message), ``reap`` (a worker exited: drain
its socket, attribute the tasks it held with :func:`._crash.attribute_crash`,
start a replacement or break the pool), ``kill_workers`` (terminate: the
workers and what their tasks left running, see :mod:`._procs`) and
``abort_start``.  The state these steps read is the scheduler's, declared
below; the scheduler's other steps they call are declared for the type
checker only.
"""

from __future__ import annotations

import mmap
import os
import selectors
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import wait as wait_for
from typing import TYPE_CHECKING, Any

from .._fd import collecting_fds, create_fd, exhausted
from .._ipc import Channel
from .._native import store
from .._serialization import pickle_code, starting_process
from ..exceptions import WorkerDiedError, WorkerStartError, describe_exitcode
from . import _worker
from ._crash import Fate, attribute_crash
from ._procs import GRACE, Tree, open_pidfd, start_process
from ._state import BROKEN, CLOSE, RUN, TERMINATE, EngineState, engine_descriptors
from ._tasks import Task, Worker
from ._worker import GATE, SENT, STATUS, STATUS_SLOT, WorkerConfig

#: Seconds between SIGTERM and SIGKILL in terminate().
TERMINATE_GRACE = GRACE
#: Workers that die before becoming ready this many times in a row mean the
#: pool cannot start (a broken __main__, an import error under spawn).
MAX_START_FAILURES = 3
#: ... and the number of workers in a row SIGKILLed before they were ready.
MAX_KILLED_STARTS = 100
#: Seconds before a replacement worker that the system refused is tried
#: again (doubling each time it is refused, up to REPLACE_RETRY_MAX).
REPLACE_RETRY = 0.05
REPLACE_RETRY_MAX = 1.0


def _foreign_descriptors() -> list[int]:
    """Descriptors of this process's multiprocessing helpers that a worker
    started by fork must not keep: the forkserver's "alive" pipe, whose
    holders keep the forkserver running (a live worker would make
    ``multiprocessing.util._cleanup_tests()`` wait forever).  The resource
    tracker's pipe stays: workers register shared memory with it."""
    from multiprocessing import forkserver

    fd = getattr(forkserver._forkserver, "_forkserver_alive_fd", None)
    return [fd] if fd is not None else []


class WorkerLifecycle:
    """Start, reap and stop worker processes (a base of the Scheduler)."""

    # The scheduler's state these steps use (set in Scheduler.__init__).
    _record: EngineState
    _pending: deque[Task]
    _workers: dict[int, Worker]
    _exit_results: list[tuple[bool, Any]]
    _ctx: Any
    _maxtasks: int | None
    _max_memory: int | None
    _config_args: tuple | None
    _config_inline: tuple | None
    _shared: Any
    _shared_data: bytes | None
    _shared_fds: list[int]
    _free_slots: list[int]
    _crashed: set[int]
    _start_failures: int
    _killed_starts: int
    _missing: int
    _replace_at: float
    _replace_delay: float
    _status_fd: int
    _status: Any
    _selector: Any  # a selectors.DefaultSelector
    _thread: threading.Thread | None
    started: int
    replaced: dict[str, int]
    _notify: Callable[[], None]

    if TYPE_CHECKING:
        # The scheduler's other steps these call.
        def _flush(self, w: Worker) -> None: ...
        def _leaving(self, task: Task) -> None: ...
        def read_results(self, w: Worker) -> int: ...
        def fail(self, task: Task, exc: BaseException, *, cancelled: bool = False) -> None: ...
        def break_pool(self, exc: BaseException) -> None: ...
        def close_resources(self) -> None: ...

    def start_worker(self) -> Worker:
        slot = self._free_slots.pop()
        STATUS.pack_into(self._status, slot * STATUS_SLOT, 0, 0.0, 0)
        store(self._status, slot * STATUS_SLOT + GATE, 0)
        store(self._status, slot * STATUS_SLOT + SENT, 0)
        try:
            parent_ch, child_ch = Channel.pair()
        except OSError as exc:
            self._free_slots.append(slot)
            raise exhausted(exc, "connect a new worker process") from exc
        # PR_SET_PDEATHSIG fires when the *thread* that started the worker
        # exits, so ask for it only from threads that live as long as the
        # pool, and only when we are the worker's parent (not a forkserver).
        pdeathsig = self._ctx.get_start_method() != "forkserver" and (
            threading.current_thread() is threading.main_thread()
            or threading.current_thread() is self._thread
        )
        config = WorkerConfig(None, (), self._maxtasks, self._max_memory, os.getpid(), pdeathsig, slot)
        if self._config_args is not None:
            config.initializer, config.initargs, config.worker_init, config.worker_exit = self._config_args
        config.shared_data = self._shared_data
        # The first message's descriptors: the status block's, the shared
        # object's, then those the initargs hold (a SharedArray's), pickled
        # for each worker so that each gets its own.
        first_fds = [os.dup(fd) for fd in (self._status_fd, *self._shared_fds)]
        fds: list[int] = first_fds
        try:
            with collecting_fds() as fds:
                fds.extend(first_fds)
                config_bytes = pickle_code(config)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        # Under fork the worker inherits every descriptor of this process.
        # The engines' own (other workers' sockets, wake-up pipes, the shared
        # memory of queued tasks, and the parent's end of this worker's own
        # channel) it closes at once: it must not keep that memory alive,
        # and holding its own channel's other end would hide our death.
        inherited: tuple[int, ...] = ()
        if self._ctx.get_start_method() == "fork":
            inherited = (parent_ch.fileno(), *engine_descriptors(), *_foreign_descriptors())
        try:
            proc = self._ctx.Process(
                target=_worker.worker_main,
                args=(child_ch.sock, inherited, self._shared, self._config_inline),
                name=f"shoal-worker-{slot}",
                daemon=False,
            )
            with starting_process():
                start_process(proc, "start a worker process")
        except BaseException:
            parent_ch.close()
            child_ch.close()
            for fd in fds:
                os.close(fd)
            self._free_slots.append(slot)
            raise
        child_ch.close()
        worker = Worker(proc, parent_ch, slot, open_pidfd(proc.pid))
        try:
            parent_ch.sock.setblocking(False)
            parent_ch.queue(config_bytes, fds)
            self._selector.register(parent_ch.fileno(), selectors.EVENT_READ, ("chan", worker))
            self._selector.register(worker.sentinel, selectors.EVENT_READ, ("dead", worker))
        except BaseException:
            for fileobj in (parent_ch.fileno(), worker.sentinel):
                try:
                    self._selector.unregister(fileobj)
                except (KeyError, ValueError):
                    pass
            proc.kill()
            proc.join()
            parent_ch.close()
            _close_pidfd(worker)
            self._free_slots.append(slot)
            raise
        self._workers[slot] = worker
        self.started += 1
        self._flush(worker)
        return worker

    def abort_start(self) -> None:
        for w in list(self._workers.values()):
            try:
                w.proc.kill()
                w.proc.join(5)
            except Exception:  # noqa: BLE001
                pass
            w.channel.close()
            _close_pidfd(w)
        self._workers.clear()
        self.close_resources()

    def reap(self, w: Worker) -> None:
        # Results the worker sent before it died are still in the socket
        # (read_results stops reading, eof, at the end or at a corrupt message).
        while not w.eof and self.read_results(w):
            pass
        _join_exited(w, self._ctx)
        exitcode = w.proc.exitcode
        running, _started, last_done = STATUS.unpack_from(self._status, w.slot * STATUS_SLOT)
        for fileobj in (w.sentinel, w.channel.fileno()):
            try:
                self._selector.unregister(fileobj)
            except (KeyError, ValueError):
                pass
        w.channel.close()
        _close_pidfd(w)
        del self._workers[w.slot]
        self._free_slots.append(w.slot)
        try:
            w.proc.close()
        except ValueError:
            pass

        # Attribute the tasks it held (see _crash): the running one fails,
        # the others go to another worker or run again.
        tasks = list(w.inflight)
        w.inflight.clear()
        verdicts = attribute_crash(
            tasks,
            running=running,
            last_done=last_done,
            pid=w.pid,
            exitcode=exitcode,
            broken=w.retire_reason == "initializer" or self._record.state == BROKEN,
            broken_error=self._record.broken_error,
            kill_error=w.kill_error,
        )
        requeue = []
        failing = []
        for v in verdicts:
            task = v.task
            self._leaving(task)
            if v.blame:
                self._crashed.add(task.fn_id)
            if v.fate is Fate.FAIL:
                failing.append(v)
            elif v.fate is Fate.RERUN:
                task.requeues += 1
                requeue.append(task)
            elif v.fate is Fate.REQUEUE:
                requeue.append(task)
        if requeue:
            self._pending.extendleft(reversed(requeue))
        # The failed tasks are delivered once the replacement was tried, so
        # that a WorkerDiedError says whether the worker was replaced.
        replaced = self._replace(w, exitcode)
        for v in failing:
            error = v.error
            assert error is not None
            if type(error) is WorkerDiedError and replaced is not True:
                error = WorkerDiedError(error.pid, error.exitcode, error.detail, replaced)
            self.fail(v.task, error)
        if failing:
            self._notify()

    def _replace(self, w: Worker, exitcode: int | None) -> bool | None:
        """Start a replacement for the worker *w* that exited (*exitcode*)
        if the pool needs one; whether it started (``False``: the system
        refused it, see start_missing), ``None`` if none was needed."""
        # Why did it go, and does it need a replacement?
        if w.kill_reason is not None:
            reason = w.kill_reason
        elif w.retire_reason is not None:
            reason = w.retire_reason
        else:
            reason = "died"
        if not w.ready and reason == "died":
            # A worker that exits (or crashes) on its own before it is ready
            # says something about the program: its main module does not
            # import.  One killed by SIGKILL says nothing of the kind (the
            # kernel never sends it for a program's error: the OOM killer, a
            # user, a supervisor did): counting those broke pools whose
            # workers were being killed at random.  Only a long unbroken run
            # of them (nothing can start) stops the pool.
            killed = exitcode == -signal.SIGKILL
            if killed:
                self._killed_starts += 1
            else:
                self._start_failures += 1
            if self._record.state == RUN and self._start_failures >= MAX_START_FAILURES:
                self.break_pool(
                    WorkerStartError(
                        "worker processes keep exiting before they are ready "
                        f"({describe_exitcode(exitcode)}). "
                        "Under spawn or forkserver the main module is imported again in each worker: "
                        "protect the code that starts the pool with `if __name__ == '__main__':`, and make "
                        "sure the main module imports without errors."
                    )
                )
            elif self._record.state == RUN and self._killed_starts >= MAX_KILLED_STARTS:
                self.break_pool(
                    WorkerStartError(
                        f"{self._killed_starts} worker processes in a row were killed (SIGKILL) before they "
                        "were ready, often by the kernel's OOM killer when memory runs out: free memory or "
                        "use fewer workers"
                    )
                )
        if reason in ("shutdown", "initializer") or self._record.state in (TERMINATE, BROKEN):
            return None
        if (
            self._record.state == CLOSE
            and not self._pending
            and not any(x.inflight for x in self._workers.values())
        ):
            return None
        self.replaced[reason] = self.replaced.get(reason, 0) + 1
        self._missing += 1
        return self.start_missing()

    def start_missing(self) -> bool:
        """Start the replacement workers still missing; whether all started.
        When the system refuses (RLIMIT_NPROC, a pids cgroup, no descriptor
        or memory left), the pool goes on with the workers it has and tries
        again later (REPLACE_RETRY, doubling up to REPLACE_RETRY_MAX); only
        when no worker is left does it fail what is queued (break_pool)."""
        while self._missing:
            try:
                self.start_worker()
            except Exception as exc:  # noqa: BLE001
                if not self._workers:
                    self._missing = 0
                    self.break_pool(
                        WorkerStartError(f"could not start a replacement worker and none is left: {exc}")
                    )
                    return False
                self._replace_delay = min(2 * self._replace_delay, REPLACE_RETRY_MAX)
                self._replace_at = time.monotonic() + self._replace_delay
                return False
            self._missing -= 1
            self._replace_delay = REPLACE_RETRY / 2
        return True

    def kill_workers(self, graceful: bool) -> None:
        """Stop every worker and the processes its tasks left running:
        SIGTERM (SIGKILL unless *graceful*), SIGKILL after TERMINATE_GRACE
        seconds; return once they have all exited (see _procs)."""
        workers = list(self._workers.values())
        # Found before any signal: once a worker is dead, the system adopts its children.
        trees = [Tree(w.pid) for w in workers]
        signum = signal.SIGTERM if graceful else signal.SIGKILL
        for w, tree in zip(workers, trees, strict=True):
            try:
                os.kill(w.pid, signum)
            except ProcessLookupError:
                pass
            tree.send_signal(signum)
        deadline = time.monotonic() + TERMINATE_GRACE
        for w in workers:
            if not _wait_exited(w, max(0.0, deadline - time.monotonic())):
                try:
                    os.kill(w.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for tree in trees:
            if not tree.wait(max(0.0, deadline - time.monotonic())):
                tree.send_signal(signal.SIGKILL)
        for w in workers:
            _wait_exited(w, None)
            _join_exited(w, self._ctx)
            w.channel.close()
            _close_pidfd(w)
            try:
                w.proc.close()
            except ValueError:
                pass
        for tree in trees:
            tree.wait(TERMINATE_GRACE)  # SIGKILLed: at once, unless in the kernel's hands
            tree.close()
        self._workers.clear()


def open_status_block(size: int, shared_fds: list[int]) -> tuple[int, mmap.mmap, int, int, Any]:
    """The scheduler's own descriptors: the status block (*size* bytes of
    shared memory, its descriptor and mapping), the wake-up pipe's two ends
    and the poller that watches it.  Made one by one, so that what was made
    is closed when the next one is refused (at a descriptor limit, say),
    along with *shared_fds*, which the scheduler owns from its start."""
    made: list = []
    try:
        status_fd = create_fd(size, "shoal-status")
        made.append(status_fd)
        status = mmap.mmap(status_fd, 0)
        made.append(status)
        try:
            wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            made += [wake_r, wake_w]
            selector = selectors.DefaultSelector()
            made.append(selector)
        except OSError as exc:
            raise exhausted(exc, "create the pool's wake-up pipe and poller") from exc
        selector.register(wake_r, selectors.EVENT_READ, ("wake", None))
    except BaseException:
        for thing in reversed(made):
            if isinstance(thing, int):
                os.close(thing)
            else:
                thing.close()
        for fd in shared_fds:
            os.close(fd)
        raise
    return status_fd, status, wake_r, wake_w, selector


def _wait_exited(w: Worker, timeout: float | None) -> bool:
    """Wait up to *timeout* seconds (None: no limit) for worker *w* to exit;
    whether it has.  Its pidfd says so whoever holds its sentinel's pipe."""
    if w.pidfd is None:
        w.proc.join(timeout)
        return w.proc.exitcode is not None
    return bool(wait_for([w.pidfd], timeout))


def _join_exited(w: Worker, ctx: Any) -> None:
    """Collect the exit status of worker *w*, which has exited (its pidfd
    fired).  multiprocessing's join(timeout) first waits for the sentinel,
    which a grandchild may hold open for ever; a process started by fork or
    spawn is our child, and waiting for it without a timeout takes its
    status at once.  A forkserver's child is reported by the forkserver."""
    if w.pidfd is not None and ctx.get_start_method() != "forkserver":
        w.proc.join()
    else:
        w.proc.join(1)


def _close_pidfd(w: Worker) -> None:
    if w.pidfd is not None:
        try:
            os.close(w.pidfd)
        except OSError:
            pass
        w.pidfd = None


__all__ = (
    "MAX_KILLED_STARTS",
    "MAX_START_FAILURES",
    "REPLACE_RETRY",
    "REPLACE_RETRY_MAX",
    "TERMINATE_GRACE",
    "WorkerLifecycle",
    "open_status_block",
)
