"""pytest plugin for the inner run of joblib's ``test_parallel.py`` against
the shoal backend (``tests/test_joblib_suite.py`` starts that run; this
directory's ``pytest.ini`` loads the plugin, and its ``sitecustomize.py``
registers ``backend="shoal"`` in every process of the run).

joblib's file is used as it is shipped (``--pyargs
joblib.test.test_parallel``); the plugin only does what a joblib developer
adding a backend would do by editing its lists:

* ``import shoal.joblib`` before the file is imported, so the lists built
  from joblib's registry (``ALL_VALID_BACKENDS``, ``RETURN_GENERATOR_BACKENDS``,
  and ``BACKENDS`` itself) include ``"shoal"`` and a ``ShoalBackend()``;
* append ``"shoal"`` to the lists joblib writes by hand
  (``PROCESS_BACKENDS``, ``PARALLEL_BACKENDS``, the context-manager list
  copied from it, and the ``PROCESS_BACKENDS + ["spawn"]`` list of the
  script tests), in place, after the import and before collection reads
  them;
* keep only the cases that run shoal (a parameter is ``"shoal"`` or a
  ``ShoalBackend``): the others test joblib's own backends;
* mark the cases listed in the file named by ``$SHOAL_JOBLIB_EXPECTED``
  (written by the outer test from its tables) as strict xfails, each with
  its reason and, for one that would otherwise wait, a shorter timeout;
* after each case, fail it if a process it started is still running (the
  shoal suite's rule), and kill what is left so that one leak does not
  spill into the next case.
"""

from __future__ import annotations

import gc
import json
import os
import time

import psutil
import pytest
from leftovers import describe, stop

import shoal.joblib

#: Module-level lists of test_parallel.py that name process backends by hand.
_LISTS = ("PROCESS_BACKENDS", "PARALLEL_BACKENDS", "all_backends_for_context_manager")
#: Tests parametrized with a list built inline from PROCESS_BACKENDS.
_INLINE = ("test_parallel_with_unpicklable_functions_in_args",)


@pytest.hookimpl(wrapper=True)
def pytest_pycollect_makemodule(module_path, parent):
    module = yield
    if module_path.name == "test_parallel.py":
        _add_shoal(module.obj)
    return module


def _add_shoal(mod) -> None:
    for name in _LISTS:
        backends = getattr(mod, name, None)
        if not isinstance(backends, list):
            raise RuntimeError(
                f"joblib's test_parallel.py has no list {name} any more: update {__file__} for this "
                "joblib version (the lists of process backends to which 'shoal' is added)"
            )
        backends.append("shoal")
    for name in _INLINE:
        marks = [
            m
            for m in getattr(getattr(mod, name), "pytestmark", [])
            if m.name == "parametrize" and m.args[0] == "backend"
        ]
        if len(marks) != 1 or not isinstance(marks[0].args[1], list):
            raise RuntimeError(
                f"joblib's {name} is no longer parametrized with a list of backends: update {__file__}"
            )
        marks[0].args[1].append("shoal")


def _runs_shoal(item) -> bool:
    params = getattr(getattr(item, "callspec", None), "params", {})
    return any(v == "shoal" or isinstance(v, shoal.joblib.ShoalBackend) for v in params.values())


def _expected() -> dict[str, dict]:
    path = os.environ.get("SHOAL_JOBLIB_EXPECTED")
    if not path:
        return {}
    with open(path) as f:
        return json.load(f)


def pytest_collection_modifyitems(config, items):
    expected = _expected()
    keep, drop = [], []
    for item in items:
        (keep if _runs_shoal(item) else drop).append(item)
    config.hook.pytest_deselected(items=drop)
    items[:] = keep
    for item in keep:
        entry = expected.get(item.name)
        if entry is None:
            continue
        item.add_marker(pytest.mark.xfail(reason=entry["reason"], strict=True))
        if entry.get("timeout"):
            item.add_marker(pytest.mark.timeout(entry["timeout"]))


# -- no process outlives a case -------------------------------------------------


def _helpers() -> set[int]:
    """Processes kept for the whole run: multiprocessing's forkserver and
    resource tracker, loky's reusable executor (joblib's loky cases nested
    in shoal's) and its resource tracker."""
    from multiprocessing import forkserver, resource_tracker

    pids = {
        getattr(forkserver._forkserver, "_forkserver_pid", None),
        getattr(resource_tracker._resource_tracker, "_pid", None),
    }
    try:
        from joblib.externals.loky import reusable_executor
        from joblib.externals.loky.backend import resource_tracker as loky_tracker
    except ImportError:
        return {p for p in pids if p}
    pids.add(getattr(loky_tracker._resource_tracker, "_pid", None))
    executor = reusable_executor._executor
    if executor is not None:
        pids.update((getattr(executor, "_processes", None) or {}).keys())
    return {p for p in pids if p}


def _running_children(exclude: set[int]) -> list[psutil.Process]:
    out = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.pid not in exclude and child.status() != psutil.STATUS_ZOMBIE:
                out.append(child)
        except psutil.Error:
            pass
    return out


@pytest.fixture(autouse=True)
def _no_process_left(request):
    before = {p.pid for p in _running_children(set())}
    yield
    # A case listed as failing may leave what its bug leaves: killed at once.
    expected_to_fail = any(m.name == "xfail" for m in request.node.iter_markers())
    deadline = time.monotonic() + (0 if expected_to_fail else 10)
    while True:
        gc.collect()  # a Manager the case dropped stops when its object is collected
        left = _running_children(before | _helpers())
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    described = [describe(p) for p in left]
    stop(left)
    if described and not expected_to_fail:
        pytest.fail(f"processes started by this case still run 10 s after it: {described}")


def pytest_sessionfinish(session):
    """Stop loky's reusable executor (started by the cases that nest loky),
    so that the run ends with nothing of it left."""
    try:
        from joblib.externals.loky import reusable_executor
    except ImportError:
        return
    executor = reusable_executor._executor
    if executor is not None:
        executor.shutdown(wait=True, kill_workers=True)
