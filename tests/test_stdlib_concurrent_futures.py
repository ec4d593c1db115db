"""CPython's own ``concurrent.futures`` process-pool tests, run against shoal.

``Lib/test/test_concurrent_futures/`` (a package since Python 3.13 in the
installed test suite) builds one class per executor with
``create_executor_tests(globals(), SomeTests, executor_mixins=...)``; its
process-pool mixins set ``executor_type = futures.ProcessPoolExecutor`` and
``ctx`` (the start method).  This module builds the same classes with
``executor_type = shoal.ProcessPoolExecutor`` for fork, spawn and forkserver
(``ShoalProcessPoolForkProcessPoolExecutorTest``, ...), from the modules of
the interpreter running the tests; without that package the module is
skipped, naming what is missing.

The bound modules' global ``futures`` (tests call
``futures.ProcessPoolExecutor(...)`` directly and compare ``executor_type``
with it) is replaced by a module whose ``ProcessPoolExecutor`` is shoal's and
whose other names are the standard library's.

``test_future.FutureTests`` (no executor: the ``Future`` class alone) runs
against shoal's ``Future`` (the type ``submit`` returns), on a copy of its
module whose ``Future``, ``create_future`` and sample futures are shoal's:
shoal's future makes its condition lazily and reads its state without a
lock, and these tests check that nothing of it shows.

Not bound: the thread-pool classes, and
``test_init.FailingInitializerResourcesTest``, which runs the standard
library's own classes and then stops the resource tracker of the whole
session.

A test that checks a deliberate difference, or only a private attribute the
standard library keeps, is in ``DIFFERENCES`` (skipped, with the reason); one
that fails for a known shoal bug is in ``KNOWN_FAILURES`` (strict xfail), or in
``NOT_RUN`` when its failure hangs or leaves the executor running.
"""

from __future__ import annotations

import concurrent.futures
import gc
import importlib
import importlib.util
import logging
import sys
import types
from concurrent.futures import _base

import pytest

import shoal
from shoal._executor import Future as ShoalFuture
from workers import mark_stdlib_tests

_MODULES = ("executor", "test_as_completed", "test_deadlock", "test_init", "test_process_pool",
            "test_shutdown", "test_wait")  # fmt: skip
try:
    _util = importlib.import_module("test.test_concurrent_futures.util")
    _mods = {name: importlib.import_module(f"test.test_concurrent_futures.{name}") for name in _MODULES}
except ImportError as exc:
    pytest.skip(
        f"this Python ({sys.version.split()[0]}) has no test.test_concurrent_futures package "
        f"(installed with CPython 3.13; absent from this installation): {exc}",
        allow_module_level=True,
    )

_BROKEN = (
    "a worker that dies or cannot read its task fails only that task (shoal.WorkerDiedError or the "
    "task's own error) and is replaced; the executor does not become broken (BrokenProcessPool)"
)
_EAGER = "shoal starts all max_workers workers when the executor is created, not on demand"
_EXIT = (
    "a task's SystemExit (sys.exit() in the function, or while pickling its result) fails that future "
    "with shoal.TaskExitError: re-raised by result(), a SystemExit ends the caller's program silently"
)

#: (CPython class, test[, start method]) -> why it does not apply to shoal.
#: Skipped with the reason.
DIFFERENCES: dict[tuple[str, ...], str] = {
    ("ProcessPoolExecutorTest", "test_killed_child"): _BROKEN,
    ("ProcessPoolExecutorTest", "test_idle_process_reuse_one"): _EAGER
    + " (and reads the private _processes)",
    ("ProcessPoolExecutorTest", "test_idle_process_reuse_multiple"): _EAGER
    + " (and reads the private _processes)",
    ("ProcessPoolExecutorTest", "test_max_tasks_per_child", "fork"): (
        "the standard library refuses max_tasks_per_child with the fork start method (ValueError); "
        "shoal's workers support it"
    ),
    ("ProcessPoolShutdownTest", "test_processes_terminate", "spawn"): _EAGER,
    ("ProcessPoolShutdownTest", "test_processes_terminate", "forkserver"): _EAGER,
    ("ProcessPoolShutdownTest", "test_del_shutdown"): "reads the private _executor_manager_thread",
    ("ProcessPoolShutdownTest", "test_shutdown_no_wait"): "reads the private _executor_manager_thread",
    ("ExecutorDeadlockTest", "test_error_at_task_pickle"): (
        "an argument that cannot be pickled raises at submit(), in the caller, not from result()"
    ),
    ("ExecutorDeadlockTest", "test_exit_at_task_unpickle"): _BROKEN,
    ("ExecutorDeadlockTest", "test_error_at_task_unpickle"): _BROKEN,
    ("ExecutorDeadlockTest", "test_crash_at_task_unpickle"): _BROKEN,
    ("ExecutorDeadlockTest", "test_crash_during_func_exec_on_worker"): _BROKEN,
    ("ExecutorDeadlockTest", "test_exit_during_func_exec_on_worker"): _EXIT,
    ("ExecutorDeadlockTest", "test_exit_during_result_pickle_on_worker"): _EXIT,
    ("ExecutorDeadlockTest", "test_crash_during_result_pickle_on_worker"): _BROKEN,
    ("ExecutorDeadlockTest", "test_error_during_result_unpickle_in_result_handler"): _BROKEN,
    ("ExecutorDeadlockTest", "test_exit_during_result_unpickle_in_result_handler"): _BROKEN,
    ("ExecutorDeadlockTest", "test_crash_big_data"): _BROKEN,
    ("ExecutorDeadlockTest", "test_shutdown_deadlock"): _BROKEN,
    ("ExecutorDeadlockTest", "test_shutdown_deadlock_pickle"): "reads the private _executor_manager_thread",
    ("ExecutorDeadlockTest", "test_gh105829_should_not_deadlock_if_wakeup_pipe_full"): (
        "patches the standard library's private concurrent.futures.process._ThreadWakeup"
    ),
    ("ProcessPoolExecutorTest", "test_saturation"): (
        "submit pickles in the caller: its argument, a Semaphore's bound method, cannot be pickled, so "
        "submit raises there (the standard library fails the future later, in its feeder thread)"
    ),
    ("ProcessPoolShutdownTest", "test_processes_terminate", "fork"): (
        "submit pickles in the caller: a Semaphore argument cannot be pickled outside process start, so "
        "submit raises there (the standard library fails the future later, in its feeder thread)"
    ),
}

#: (CPython class, test[, start method]) -> the shoal bug it hits.  Strict
#: xfail: an XPASS means the fix landed and the entry must go.  Entries whose
#: failure hangs or leaves the executor running are not run (``NOT_RUN``).
KNOWN_FAILURES: dict[tuple[str, ...], str] = {}
#: Tests that sleep for seconds by design: marked ``slow`` (CI runs them).
SLOW = {
    "ProcessPoolExecutorTest": ("test_map_timeout",),
    "WaitTests": ("test_first_exception",),
}

NOT_RUN: dict[tuple[str, ...], str] = {}

#: (module, CPython test class) bound to shoal's executor.
BOUND_CLASSES = (
    ("test_process_pool", "ProcessPoolExecutorTest"),
    ("test_shutdown", "ProcessPoolShutdownTest"),
    ("test_wait", "WaitTests"),
    ("test_as_completed", "AsCompletedTests"),
    ("test_deadlock", "ExecutorDeadlockTest"),
    ("test_init", "InitializerMixin"),
    ("test_init", "FailingInitializerMixin"),
)


class _ShoalAsFutures(types.ModuleType):
    """``concurrent.futures`` with shoal's ``ProcessPoolExecutor``."""

    ProcessPoolExecutor = shoal.ProcessPoolExecutor

    def __getattr__(self, name: str):
        return getattr(concurrent.futures, name)


_futures = _ShoalAsFutures("concurrent.futures")
for _mod in _mods.values():
    _mod.futures = _futures


def _install(globs: dict) -> None:
    executor_mixins = []
    for base in (_util.ProcessPoolForkMixin, _util.ProcessPoolForkserverMixin, _util.ProcessPoolSpawnMixin):
        method = base.ctx
        executor_mixins.append(
            type(
                f"ShoalProcessPool{method.capitalize()}Mixin",
                (base,),
                {"executor_type": shoal.ProcessPoolExecutor, "__module__": __name__},
            )
        )
    for module, name in BOUND_CLASSES:
        tests = getattr(_mods[module], name)
        made: dict = {"__name__": __name__}
        _util.create_executor_tests(made, tests, executor_mixins=executor_mixins)
        del made["__name__"]
        for cls_name, cls in made.items():
            method = cls.ctx
            mark_stdlib_tests(cls, name, method, DIFFERENCES, KNOWN_FAILURES, NOT_RUN, SLOW)
            cls.tearDown = _closing_log_queue(cls.tearDown)
            globs[cls_name] = cls


def _closing_log_queue(teardown):
    """CPython's initializer tests leave their multiprocessing log queue to
    the garbage collector; pytest keeps the test case alive, so the leak check
    would see its pipe and semaphores.  Close and drop it after the test."""

    def tearDown(self) -> None:
        try:
            teardown(self)
        finally:
            q = getattr(self, "log_queue", None)
            if q is not None:
                q.close()
                q.join_thread()
                self.log_queue = self.executor_kwargs = self.executor = None
                gc.collect()

    return tearDown


_install(globals())


def _bind_future_tests(globs: dict) -> None:
    """CPython's ``FutureTests`` on shoal's ``Future`` (see the module docstring)."""
    spec = importlib.util.find_spec("test.test_concurrent_futures.test_future")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)  # a private copy: the real module stays the stdlib's
    spec.loader.exec_module(module)

    def create_future(state=_base.PENDING, exception=None, result=None):
        future = ShoalFuture()
        future._state = state
        future._exception = exception
        future._result = result
        return future

    module.Future = ShoalFuture
    module.create_future = create_future
    module.PENDING_FUTURE = create_future(state=_base.PENDING)
    module.RUNNING_FUTURE = create_future(state=_base.RUNNING)
    module.CANCELLED_FUTURE = create_future(state=_base.CANCELLED)
    module.CANCELLED_AND_NOTIFIED_FUTURE = create_future(state=_base.CANCELLED_AND_NOTIFIED)
    module.EXCEPTION_FUTURE = create_future(state=_base.FINISHED, exception=OSError())
    module.SUCCESSFUL_FUTURE = create_future(state=_base.FINISHED, result=42)

    class ShoalFutureTests(module.FutureTests):
        # The callback tests read what concurrent.futures' logger printed to
        # stderr: with no handler configured (as under unittest) logging's
        # last resort prints there, but pytest's capture handler on the root
        # logger takes its place.  Print to stderr as the last resort would.
        def setUp(self) -> None:
            super().setUp()
            self._stderr_handler = _ToCurrentStderr()
            logging.getLogger("concurrent.futures").addHandler(self._stderr_handler)

        def tearDown(self) -> None:
            logging.getLogger("concurrent.futures").removeHandler(self._stderr_handler)
            super().tearDown()

    ShoalFutureTests.__module__ = __name__
    globs["ShoalFutureTests"] = ShoalFutureTests


class _ToCurrentStderr(logging.Handler):
    """Logging's last-resort handler: writes to the ``sys.stderr`` of the moment."""

    def emit(self, record: logging.LogRecord) -> None:
        sys.stderr.write(self.format(record) + "\n")


_bind_future_tests(globals())
