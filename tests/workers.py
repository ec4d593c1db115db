"""Module-level task functions for the tests (importable under spawn)."""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time


def square(x):
    return x * x


def add(a, b):
    return a + b


def identity(x):
    return x


def getpid(_=None):
    return os.getpid()


def sleep_then(x, seconds=0.05):
    time.sleep(seconds)
    return x


def sleep_for(seconds):
    time.sleep(seconds)
    return seconds


def raise_value_error(x):
    raise ValueError(f"bad value {x}")


def kill_self(_=None):
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(10)


def segfault(_=None):
    ctypes.string_at(0)


def exit_now(code=3):
    os._exit(code)


def return_lock(_=None):
    return threading.Lock()


def crash_on(x, bad=3):
    if x == bad:
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(10)
    return x * x


class Unpicklable:
    def __reduce__(self):
        raise TypeError("Unpicklable objects refuse to be pickled")


class UnpicklableError(Exception):
    """An exception whose constructor needs two arguments: it does not unpickle
    by default (a classic way to hang the standard library's pool)."""

    def __init__(self, a, b):
        super().__init__(f"{a}-{b}")


def raise_unpicklable_error(_=None):
    raise UnpicklableError(1, 2)


def failing_initializer():
    raise RuntimeError("initializer exploded")


_state = {}


def set_state(value):
    _state["value"] = value


def get_state(_=None):
    return _state.get("value")


def nested_pool(n):
    import shoal

    with shoal.Pool(2) as inner:
        return inner.map(square, range(n))


def allocate(mb):
    data = bytearray(mb * 1024 * 1024)
    for i in range(0, len(data), 4096):
        data[i] = 1
    _state.setdefault("hold", []).append(data)
    return os.getpid()


def array_sum(a):
    return float(a.sum())


def array_double(a):
    return a * 2


import multiprocessing as _mp


def _fail_in_parent():
    if _mp.parent_process() is None:
        raise ValueError("this object cannot be rebuilt in the parent")


class FailsInParent:
    """Unpickles in a worker, refuses to unpickle in the parent."""

    def __reduce__(self):
        return (_fail_in_parent, ())


def big_result(tag):
    import numpy as np

    if tag == "bad":
        return (np.full(300 * 1024, ord("A"), dtype=np.uint8), FailsInParent())
    if tag == "warm":
        return 0
    return np.full(300 * 1024, ord(tag), dtype=np.uint8)


def many_arrays(n):
    import numpy as np

    return [np.full(256 * 1024, i % 250, dtype=np.uint8) for i in range(n)]


def count_arrays(arrays):
    return len(arrays)


class UnprintableError(Exception):
    """Cannot be pickled (holds a lock) nor turned into a string."""

    def __init__(self):
        super().__init__()
        self.lock = threading.Lock()

    def __str__(self):
        raise RuntimeError("__str__ is broken")


def raise_unprintable(_=None):
    raise UnprintableError()


def exit_if_one(buf):
    if int(buf[0]) == 1:
        os._exit(7)
    return len(buf)


def fail_if_marked():
    if os.path.exists(os.environ.get("SHOAL_TEST_MARK", "/nonexistent")):
        raise RuntimeError("initializer failed in a replacement worker")



class ExitAtPickle:
    """Calls sys.exit() when pickled."""

    def __reduce__(self):
        import sys

        sys.exit(1)


def return_exit_at_pickle(_=None):
    return ExitAtPickle()


def mark_stdlib_tests(
    cls, name: str, method: str, differences: dict, known_failures: dict, not_run: dict, slow: dict
) -> None:
    """Mark the tests of *cls* (CPython's test class *name*, bound to shoal
    under start *method*) listed in the tables of tests/test_stdlib_*.py.

    A key is ``(class, test)`` or ``(class, test, method)``.  *differences*
    are skipped, *known_failures* are strict xfails, *not_run* are xfails not
    run (their failure hangs or leaves processes); *slow* (class -> test
    names) get the ``slow`` marker (they still run).  A test this Python's
    version of the module lacks is ignored.  Each marked test gets its own
    function, so the class's other start methods are not affected.
    """
    import functools

    import pytest

    marks = (
        ({(name, test): "" for test in slow.get(name, ())}, lambda reason: pytest.mark.slow),
        (differences, lambda reason: pytest.mark.skip(reason=f"deliberate difference: {reason}")),
        (known_failures, lambda reason: pytest.mark.xfail(reason=reason, strict=True)),
        (not_run, lambda reason: pytest.mark.xfail(reason=reason, run=False)),
    )
    for table, mark in marks:
        for key, reason in table.items():
            if key[0] != name or (len(key) == 3 and key[2] != method):
                continue
            original = getattr(cls, key[1], None)
            if original is None:
                continue

            def test(self, *args, _original=original, **kwargs):
                return _original(self, *args, **kwargs)

            setattr(cls, key[1], mark(reason)(functools.wraps(original)(test)))
