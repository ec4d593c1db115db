"""Module-level task functions for the tests (importable under spawn)."""

from __future__ import annotations

import ctypes
import enum
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


def sleep_pid(seconds):
    time.sleep(seconds)
    return os.getpid()


def sleep_for(seconds):
    time.sleep(seconds)
    return seconds


def wait_for_file(path, value=None):
    """Return *value* once *path* exists: a task the test finishes when it chooses."""
    while not os.path.exists(path):
        time.sleep(0.005)
    return value


def raise_value_error(x):
    raise ValueError(f"bad value {x}")


def kill_self(_=None):
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(10)


def segfault(_=None):
    ctypes.string_at(0)


def exit_now(code=3):
    os._exit(code)


def call_sys_exit(code=3):
    """A task that ends its process the polite way: sys.exit(code)."""
    import sys

    sys.exit(code)


def exit_on(x, bad=3):
    if x == bad:
        import sys

        sys.exit(bad)
    return x * x


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


class ErrorHoldingLock(Exception):
    """An exception that cannot be pickled: it holds a lock."""

    def __init__(self, message):
        super().__init__(message)
        self.lock = threading.Lock()


def raise_error_holding_lock(_=None):
    raise ErrorHoldingLock("with a lock inside")


def failing_initializer():
    raise RuntimeError("initializer exploded")


_state = {}


def set_state(value):
    _state["value"] = value


def get_state(_=None):
    return _state.get("value")


def state_item(key):
    return _state["value"][key]


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


import multiprocessing as _mp  # noqa: E402 - beside the helpers that use it


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


class BadRecord(Exception):
    """An exception whose __init__ does not take its own args back."""

    def __init__(self, record_id, reason):
        super().__init__(f"record {record_id}: {reason}")
        self.record_id = record_id
        self.reason = reason


def raise_bad_record(record_id):
    raise BadRecord(record_id, "no such field")


def raise_ghost_error(_=None):
    """Raise an exception whose class lives in a module only this process has."""
    import sys
    import types

    module = sys.modules.setdefault("shoal_test_ghost", types.ModuleType("shoal_test_ghost"))
    ghost = type("GhostError", (Exception,), {"__module__": "shoal_test_ghost"})
    module.GhostError = ghost
    raise ghost("only the worker knows this class")


class Payload:
    """A plain object: weak references to it show when it is freed."""

    def __init__(self, data=b""):
        self.data = data


class SignalsOnDelete:
    """Appends its tag to a file when it is freed (in whichever process)."""

    def __init__(self, path, tag):
        self.path = path
        self.tag = tag

    def __call__(self, *args):
        return len(args)

    def __del__(self):
        with open(self.path, "a") as f:
            f.write(f"{self.tag}:{os.getpid()}\n")


def make_signalling(path, tag):
    return SignalsOnDelete(path, tag)


def read_lines(path):
    try:
        with open(path) as f:
            return f.read().split()
    except FileNotFoundError:
        return []


def write_inherited(text):
    """Write to the file the parent stored in _state before a fork."""
    f = _state["inherited_file"]
    f.write(f"{text}\n")
    f.flush()
    return os.getpid()


# -- shared arrays (tests/test_shared_array.py) --------------------------------


def fill(array, value):
    """Write *value* into every element of *array* (in the worker)."""
    array[...] = value
    return os.getpid()


def fill_and_send(conn, array, value):
    array[...] = value
    conn.send("filled")


def describe_array(array):
    """What a worker received: type name, writable, dtype, shape, contents."""
    return (type(array).__name__, bool(array.flags.writeable), array.dtype.str, array.shape, array.tobytes())


def kill_self_holding(array):
    """Die while mapping *array* (a task argument in flight)."""
    array.sum()
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(10)


def full_array(n, value):
    import numpy as np

    return np.full(n, value, dtype=np.float64)


def bytes_like_info(obj):
    return (type(obj).__name__, len(obj), bytes(obj[:4]), bytes(obj[-4:]))


def shoal_mappings(_=None):
    """This process's mappings of shared data: SharedArray segments
    ("memfd:shoal") and large buffers ("memfd:shoal-buffers")."""
    with open("/proc/self/maps") as f:
        return [line.strip() for line in f if "memfd:shoal " in line or "memfd:shoal-buffers" in line]


def array_sum_and_segment(a):
    """The array's sum, and the inode of the shared memory it arrived in
    (None when it is not in a mapping of shoal's)."""
    addr = a.__array_interface__["data"][0]
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= addr < hi:
                return float(a.sum()), (fields[4] if "memfd:shoal-buffers" in line else None)
    return float(a.sum()), None


_stash = []


def stash_and_segment(a):
    """array_sum_and_segment, keeping the array (and so its shared memory)."""
    _stash.append(a)
    return array_sum_and_segment(a)


def stash(array):
    """Keep a task's argument after the task returns."""
    _stash.append(array)
    return len(_stash)


def stashed_sums(_=None):
    return [float(a.sum()) for a in _stash]


def fill_stashed(index, value):
    """Write *value* at *index* of the first array stash() kept (the initializer's)."""
    _stash[0][index] = value
    return index


# -- shared objects, worker state and hooks (tests/test_worker_state.py) --------


class PickleCounter:
    """Counts, in the process that pickles it, how often it was pickled."""

    pickled = 0

    def __init__(self, value):
        self.value = value

    def __getstate__(self):
        type(self).pickled += 1
        return self.__dict__


def shared_value(_=None):
    import shoal

    return shoal.shared()


def shared_array_location(_=None):
    """(data address, the mapping it lies in per /proc/self/maps, first item)."""
    import shoal

    arr = shoal.shared()["array"]
    address = arr.ctypes.data
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= address < hi:
                return address, parts[5].strip() if len(parts) > 5 else "", int(arr[1])
    return address, "?", int(arr[1])


def call_shared_outside_pool(_=None):
    import shoal

    try:
        shoal.shared()
    except RuntimeError as exc:
        return str(exc)
    return "no error"


def count_in_worker_state(_=None):
    import shoal

    state = shoal.worker_state()
    state["tasks"] = state.get("tasks", 0) + 1
    return os.getpid(), state["tasks"], state.get("resource")


def open_resource():
    import shoal

    shoal.worker_state()["resource"] = f"opened by {os.getpid()}"


def close_resource():
    import shoal

    state = shoal.worker_state()
    return os.getpid(), state.pop("resource"), state.get("tasks", 0)


def failing_exit():
    raise KeyError("worker_exit failed")


def failing_init():
    raise ValueError("worker_init failed")


# -- actors (tests/test_actor.py) ---------------------------------------------


class Counter:
    def __init__(self, start=0):
        self.n = start

    def incr(self, k=1):
        self.n += k
        return self.n

    def get(self):
        return self.n

    def fail(self, message):
        raise KeyError(message)

    def sleep(self, seconds):
        time.sleep(seconds)
        return seconds

    def echo(self, value):
        return value

    def lock(self):
        return threading.Lock()

    def process_id(self):
        return os.getpid()

    def call_other(self, other, n):
        """Use another actor's handle from inside this actor."""
        for _ in range(n):
            other.incr()
        return other.get()

    def call_myself(self, me):
        return me.get()

    def exit(self, code):
        import sys

        sys.exit(code)

    def raise_unpicklable(self):
        raise ErrorHoldingLock("with a lock inside")

    def unloadable(self):
        return FailsInParentOnly()


def _fail_outside_an_actor():
    if not _in_actor():
        raise ValueError("this object cannot be rebuilt outside the actor")


def _in_actor():
    from shoal import _actor

    return _actor._serving_address is not None


class FailsInParentOnly:
    """Pickles in an actor, refuses to unpickle in its caller."""

    def __reduce__(self):
        return (_fail_outside_an_actor, ())


class Resource:
    """An object with methods named like the handle's own controls, as files
    and connections have."""

    def __init__(self):
        self.closed = False

    def close(self):
        self.closed = True
        return "the resource's own close"

    def terminate(self):
        return "the resource's own terminate"

    def pid(self):
        return "the resource's own pid"

    def is_closed(self):
        return self.closed

    def process_id(self):
        return os.getpid()


def use_resource_handle(handle):
    """In a pool worker: the object's methods through a pickled handle, and
    the handle's own pid through the class."""
    import shoal

    return handle.close(), handle.pid(), handle.terminate(), handle.is_closed(), shoal.Actor.pid(handle)


class ExitInit:
    def __init__(self, code):
        import sys

        sys.exit(code)


class BrokenInit:
    def __init__(self):
        raise OSError("cannot open the resource")


def increment_actor(counter, n):
    for _ in range(n):
        counter.incr()
    return os.getpid()


def send_to_actor(counter, n):
    for _ in range(n):
        counter.incr.send()
    counter.get()  # a waiting call: every send() of this process has run
    return os.getpid()


def actor_incr_into(counter, n, queue):
    """A Process target: increment, then report the count seen."""
    for _ in range(n):
        counter.incr()
    queue.put(counter.get())


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


class Token:
    """A plain object a test can hold a weak reference to."""

    def __init__(self, n):
        self.n = n


def make_token(n):
    return Token(n)


def actor_threads_after_gc():
    """The shoal actor threads alive in this process once garbage is collected."""
    import gc

    gc.collect()
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("shoal-actor"))


class Relay:
    """An actor that calls another actor's method (which may call back)."""

    def __init__(self):
        self.other = None

    def connect(self, other):
        self.other = other

    def ping(self):
        return "pong"

    def relay(self, method, *args):
        return getattr(self.other, method)(*args)


class SlowInit:
    def __init__(self, seconds, path):
        time.sleep(seconds)
        with open(path, "w") as f:
            f.write("built")


def count_with_worker_actor(_=None):
    """Start (once per worker, kept in worker_state) a fork-started Counter actor and increment it."""
    import shoal

    state = shoal.worker_state()
    if "actor" not in state:
        state["actor"] = shoal.get_context("fork").Actor(Counter)
    return state["actor"].incr()


def init_with_queue(q):
    global _INIT_QUEUE
    _INIT_QUEUE = q


def put_in_init_queue(x):
    _INIT_QUEUE.put(x)
    return x


def args_and_types(*args):
    """What the worker received: the arguments and their exact types."""
    return args, [type(a).__name__ for a in args]


def return_value(value):
    return value


def return_unpicklable_if(x, bad):
    """x, or an unpicklable result (a lock) when x == bad."""
    if x == bad:
        import threading

        return threading.Lock()
    return x


class Color(enum.IntEnum):
    RED = 1


# -- the joblib backend (tests/test_joblib.py) ---------------------------------


def memmap_info(array):
    """How an array argument arrived: a numpy.memmap?, writable?, its mode."""
    import numpy as np

    return isinstance(array, np.memmap), bool(array.flags.writeable), getattr(array, "mode", None)


def write_first(array, value):
    """Write *value* into the first element of *array*; what it now holds."""
    array.flat[0] = value
    return array.flat[0]


def joblib_in_this_process(n_jobs, options):
    """Run a shoal-backed joblib loop here (a task of multiprocessing.Pool):
    the workers' pids, this pid, the warnings, or the error raised."""
    import warnings

    import joblib

    import shoal.joblib  # noqa: F401 - registers the backend

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            pids = joblib.Parallel(n_jobs=n_jobs, backend="shoal", **options)(
                joblib.delayed(os.getpid)() for _ in range(4)
            )
        except Exception as exc:
            return "error", f"{type(exc).__name__}: {exc}", []
    return set(pids), os.getpid(), [str(w.message) for w in caught]


def mark_or_block(item):
    """``item`` is ``(x, folder)``.  Task 0 writes its pid to ``folder/blocker``
    and waits for ``folder/release`` (at most 120 s); the others take 5 ms.
    Each then creates ``folder/done-x`` exclusively, so a task run twice
    fails with FileExistsError instead of passing unseen."""
    x, folder = item
    if x == 0:
        with open(os.path.join(folder, "blocker.tmp"), "w") as f:
            f.write(str(os.getpid()))
        os.rename(os.path.join(folder, "blocker.tmp"), os.path.join(folder, "blocker"))
        release = os.path.join(folder, "release")
        deadline = time.monotonic() + 120
        while not os.path.exists(release) and time.monotonic() < deadline:
            time.sleep(0.005)
    else:
        time.sleep(0.005)
    os.close(os.open(os.path.join(folder, f"done-{x}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    return x


def mark_after(item):
    """``item`` is ``(x, folder, seconds)``: sleep, then create
    ``folder/done-x`` exclusively (a task run twice fails) and return x."""
    x, folder, seconds = item
    time.sleep(seconds)
    os.close(os.open(os.path.join(folder, f"done-{x}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    return x


def _descendant_pids():
    import psutil

    return [p.pid for p in psutil.Process().children(recursive=True)]


def leave_child(seconds=60):
    """Start a plain, non-daemon multiprocessing.Process that sleeps for
    *seconds* and return without waiting for it: the pids left running."""
    import multiprocessing

    child = multiprocessing.Process(target=time.sleep, args=(seconds,))
    child.start()
    return _descendant_pids()


def nested_joblib(n=4):
    """Run joblib's default (loky) backend with two workers inside the task,
    which keeps its workers for reuse: ``(result, pids left running)``."""
    import joblib

    total = sum(joblib.Parallel(n_jobs=2, backend="loky")(joblib.delayed(abs)(-i) for i in range(n)))
    return total, _descendant_pids()


def leave_child_then(path, then="die"):
    """Start a child that sleeps 60 s, write its pid to *path*, then die
    (SIGKILL) or sleep for an hour."""
    import multiprocessing

    child = multiprocessing.Process(target=time.sleep, args=(60,))
    child.start()
    with open(path + ".tmp", "w") as f:
        f.write(str(child.pid))
    os.rename(path + ".tmp", path)
    if then == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(3600)


def pool_in_task(face, options=None):
    """Run ``square`` over range(6) on a shoal pool made inside this task:
    ``("ok", results)``, or ``(where, type name, message)`` of the error
    and where it was raised ("construction" or "use")."""
    import shoal

    options = options or {}
    try:
        if face == "pool":
            pool = shoal.Pool(2, **options)
        elif face == "executor":
            pool = shoal.ProcessPoolExecutor(2, **options)
        else:
            import joblib

            import shoal.joblib  # registers the backend

            with joblib.parallel_config(backend="shoal", n_jobs=2, **options):
                return "ok", joblib.Parallel()(joblib.delayed(square)(i) for i in range(6))
    except BaseException as exc:  # reported to the test
        return "construction", type(exc).__name__, str(exc)
    try:
        with pool:
            return "ok", list(pool.map(square, range(6)))
    except BaseException as exc:  # reported to the test
        return "use", type(exc).__name__, str(exc)


# -- hostile bytes (tests/test_hostile_bytes.py) ------------------------------


def write_to_own_channel(data: bytes, nfds: int) -> str:
    """A pool task that writes *data*, with *nfds* memfds, onto its worker's
    own channel to the pool, as a task writing to a descriptor it does not
    own would (tests/test_hostile_bytes.py)."""
    import socket
    import struct
    import sys

    frame = sys._getframe()
    while frame is not None and "channel" not in frame.f_locals:
        frame = frame.f_back
    assert frame is not None, "not run by a pool worker"
    sock = frame.f_locals["channel"].sock
    fds = [os.memfd_create("garbage", os.MFD_CLOEXEC) for _ in range(nfds)]
    try:
        if data:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{nfds}i", *fds))] if fds else []
            sock.sendmsg([data], anc)
    finally:
        for fd in fds:
            os.close(fd)
    return "done"


def killed_in_init(path, times):
    """An initializer that SIGKILLs its own worker the first *times* times
    (counted in the file *path*), as the OOM killer might."""
    with open(path, "a+") as f:
        f.seek(0)
        count = len(f.read())
        if times is None or count < times:
            f.write("x")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)


def shared_exit_value():
    import shoal

    a = shoal.SharedArray(100_000)
    a[:] = os.getpid()
    return a


_warmed = []


def slow_first_call(x):
    """0.2 s on its first call in a process (an import, a cold cache), then nothing."""
    if not _warmed:
        _warmed.append(True)
        time.sleep(0.2)
    return x


class DescriptorHog:
    """An actor that can use up its own descriptors (RLIMIT_NOFILE at 64)."""

    def __init__(self):
        self.hog = []

    def starve(self):
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        try:
            while True:
                self.hog.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            pass
        return len(self.hog)

    def free(self):
        for fd in self.hog:
            os.close(fd)
        self.hog = []

    def total(self, a):
        return float(a.sum())
