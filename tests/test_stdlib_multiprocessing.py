"""CPython's own ``multiprocessing`` tests, run against shoal.

The standard library's behaviour is shoal's specification, and CPython ships
the tests that define it (``Lib/test/_test_multiprocessing.py``).  This module
binds their Pool, worker-lifetime, Connection, Poll, Queue and Manager-container
classes to shoal, the way CPython's ``install_tests_in_module_dict`` binds them
to a start method and billiard / multiprocess bind them to their forks:

* the test module is the one of the interpreter running the tests (never a
  vendored copy); without it the module is skipped, naming what is missing;
* every selected ``_TestX`` class becomes one ``unittest.TestCase`` per start
  method (``WithShoalForkTestPool``, ...), whose ``self.Pool``, ``self.Pipe``,
  ``self.Queue``, ``self.JoinableQueue`` and ``self.Manager`` come from
  ``shoal.get_context(method)``; the class sets the default start method for
  its duration, as ``setUpModule`` does in CPython;
* the test module's global ``multiprocessing`` (which some tests call
  directly, e.g. ``multiprocessing.Pool(2)``) is replaced by a module whose
  names are shoal's where shoal has one and the standard library's otherwise;
* a test that checks a deliberate difference, or only a private attribute
  the standard library keeps, is listed in ``DIFFERENCES`` with the reason and
  reported as skipped; a test that fails for a known shoal bug being fixed
  elsewhere is listed in ``KNOWN_FAILURES`` (strict xfail, so the fix shows up).

Class-level resources (``_TestPool``'s shared pool, the manager of the
container tests) live from ``setUpClass`` to ``tearDownClass``; conftest's leak
check counts them as the class's, and checks the whole class too
(``CHECK_CLASS_LEAKS``).
"""

from __future__ import annotations

import importlib
import multiprocessing
import sys
import types
import unittest

import pytest

import shoal
from workers import mark_stdlib_tests

try:
    _mp_tests = importlib.import_module("test._test_multiprocessing")
except ImportError as exc:  # pragma: no cover - depends on the Python build
    pytest.skip(
        f"this Python ({sys.version.split()[0]}) has no test._test_multiprocessing "
        f"(CPython's test package is not installed): {exc}",
        allow_module_level=True,
    )

START_METHODS = ("fork", "spawn", "forkserver")

#: (CPython class, test[, start method]) -> why it does not apply to shoal.  Skipped with the
#: reason (README, "Differences from the standard library", says the same).
DIFFERENCES: dict[tuple[str, ...], str] = {
    ("_TestPool", "test_resource_warning"): (
        "forces the private Pool._state back to RUN and expects a ResourceWarning from __del__; "
        "a shoal pool that is dropped while running terminates its workers instead"
    ),
    ("_TestPoolWorkerLifetime", "test_pool_worker_lifetime"): (
        "calls the private Pool._repopulate_pool() to replace workers that exited; shoal's "
        "engine replaces its workers itself (Pool._pool is a read-only view of them)"
    ),
    ("_TestPoolWorkerLifetime", "test_worker_finalization_via_atexit_handler_of_multiprocessing"): (
        "runs `from multiprocessing import Pool` in a child interpreter: it tests the "
        "standard library's pool, not shoal's"
    ),
    ("_TestPoolWorkerErrors", "test_unpickleable_result"): (
        "the 'unpicklable' result is a lambda, which shoal pickles with cloudpickle, "
        "so get() returns it instead of raising MaybeEncodingError"
    ),
    ("_TestQueue", "test_queue_feeder_donot_stop_onexc"): (
        "Queue.put of an unpicklable object raises in the caller (shoal.SerializationError) "
        "instead of printing the error from a feeder thread and dropping the item"
    ),
    ("_TestQueue", "test_queue_feeder_on_queue_feeder_error"): (
        "subclasses the standard library's multiprocessing.queues.Queue to override its "
        "feeder thread's error hook; shoal's Queue has no feeder thread (put raises instead)"
    ),
    ("_TestQueue", "test_closed_queue_empty_exceptions"): (  # Python 3.13+
        "after close(), empty() raises ValueError('... is closed') like get() and put(); the standard "
        "library's returns True if this process never put an item, and raises OSError once it has"
    ),
    ("_TestQueue", "test_no_import_lock_contention"): (
        "imports a module that uses `import multiprocessing` itself: it tests the standard "
        "library's Queue, not shoal's"
    ),
}

#: (CPython class, test[, start method]) -> the shoal bug it hits (fixed on another branch).
#: Strict xfail: an XPASS means the fix landed and the entry must go.
KNOWN_FAILURES: dict[tuple[str, ...], str] = {}

#: Tests that sleep for seconds by design: marked ``slow`` (CI runs them).
SLOW = {"_TestPoll": ("test_boundaries",)}

#: CPython's classes bound here, with the mixin kind ("processes" or "manager").
BOUND_CLASSES = (
    ("_TestPool", "processes"),
    ("_TestPoolWorkerErrors", "processes"),
    ("_TestPoolWorkerLifetime", "processes"),
    ("_TestConnection", "processes"),
    ("_TestPoll", "processes"),
    ("_TestQueue", "processes"),
    ("_TestContainers", "manager"),
)


class _ShoalAsMultiprocessing(types.ModuleType):
    """``multiprocessing`` as ``import shoal as multiprocessing`` sees it: shoal's
    name where shoal has one, the standard library's otherwise (submodules such
    as ``multiprocessing.pool`` are the standard library's)."""

    def __getattr__(self, name: str):
        try:
            return getattr(shoal, name)
        except AttributeError:
            return getattr(multiprocessing, name)


_mp_tests.multiprocessing = _ShoalAsMultiprocessing("multiprocessing")


def _start_method_fixture(method: str):
    class StartMethod:
        @classmethod
        def setUpClass(cls):
            cls._saved_start_method = multiprocessing.get_start_method(allow_none=True)
            multiprocessing.set_start_method(method, force=True)
            super().setUpClass()

        @classmethod
        def tearDownClass(cls):
            try:
                super().tearDownClass()
            finally:
                multiprocessing.set_start_method(cls._saved_start_method, force=True)

    return StartMethod


def _processes_mixin(method: str) -> type:
    ctx = shoal.get_context(method)
    names = {
        "TYPE": "processes",
        "START_METHOD": method,
        "Process": ctx.Process,
        "connection": _mp_tests.multiprocessing.connection,
        "current_process": staticmethod(multiprocessing.current_process),
        "parent_process": staticmethod(multiprocessing.parent_process),
        "active_children": staticmethod(multiprocessing.active_children),
    }
    for name in (
        "Pool", "Pipe", "Queue", "JoinableQueue", "Lock", "RLock", "Semaphore", "BoundedSemaphore",
        "Condition", "Event", "Barrier", "Value", "Array", "RawValue", "RawArray",
    ):  # fmt: skip
        names[name] = staticmethod(getattr(ctx, name))
    return type(
        f"ShoalProcesses{method.capitalize()}Mixin",
        (_start_method_fixture(method), _mp_tests.BaseMixin),
        names,
    )


def _manager_mixin(method: str) -> type:
    ctx = shoal.get_context(method)

    class ShoalManagerMixin(_start_method_fixture(method), _mp_tests.ManagerMixin):
        START_METHOD = method
        Process = ctx.Process

        @classmethod
        def setUpClass(cls):
            # BaseMixin's, skipping ManagerMixin's (which makes a stdlib Manager).
            super(_mp_tests.ManagerMixin, cls).setUpClass()
            cls.manager = ctx.Manager()
            cls.manager.start()
            # Proxies keep one connection to the server per thread, opened
            # by the first method call: open this thread's now, not in the
            # first test (whose leak check would count it).
            cls._warm_proxy = cls.manager.list()
            len(cls._warm_proxy)

        @classmethod
        def tearDownClass(cls):
            # ManagerMixin's also reads the private SyncManager._number_of_objects().
            cls._warm_proxy = None
            cls.manager.shutdown()
            cls.manager.join()
            cls.manager = None
            super(_mp_tests.ManagerMixin, cls).tearDownClass()

    ShoalManagerMixin.__name__ = ShoalManagerMixin.__qualname__ = f"ShoalManager{method.capitalize()}Mixin"
    return ShoalManagerMixin


def _install(globs: dict) -> None:
    mixins = {
        (kind, method): (_processes_mixin if kind == "processes" else _manager_mixin)(method)
        for method in START_METHODS
        for kind in ("processes", "manager")
    }
    for base_name, kind in BOUND_CLASSES:
        base = getattr(_mp_tests, base_name)
        for method in START_METHODS:
            name = f"WithShoal{method.capitalize()}{base_name[1:]}"
            cls = type(
                name,
                (base, mixins[kind, method], unittest.TestCase),
                {"__module__": __name__, "CHECK_CLASS_LEAKS": True},
            )
            cls.__qualname__ = name
            mark_stdlib_tests(cls, base_name, method, DIFFERENCES, KNOWN_FAILURES, {}, SLOW)
            globs[name] = cls


_install(globals())
