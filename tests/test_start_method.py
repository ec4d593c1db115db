"""``shoal.get_start_method()`` says how shoal starts its processes.

shoal's default start method is the standard library's on the Python that
runs it (docs/guide/start-methods.md): ``fork`` on Linux with Python 3.11 to
3.13, ``forkserver`` from 3.14, where ``multiprocessing`` and
``concurrent.futures`` made it the default.  Whatever the program chose
(nothing, or ``set_start_method``), every process shoal starts -- pool and
executor workers, an actor, a manager's server -- is started the way
``get_start_method()`` names, as a real script run shows: each child tells
how it was started (a forkserver's child has the forkserver for parent; a
spawned one imported the script again as ``__mp_main__``; a forked one did
not).
"""

from __future__ import annotations

import sys
import textwrap

import pytest

import shoal
from helpers import run_ok

PROGRAM = textwrap.dedent(
    """
    import os
    import sys

    import psutil
    import shoal

    def how_started(parent):
        if os.getppid() != parent:
            command = " ".join(psutil.Process(os.getppid()).cmdline())
            return "forkserver" if "forkserver" in command else f"child of {command!r}"
        return "fork" if sys.modules["__main__"].__name__ == "__main__" else "spawn"

    class Probe:
        def how(self, parent):
            return how_started(parent)

    class ProbeManager(shoal.Manager):
        pass

    ProbeManager.register("Probe", Probe)

    if __name__ == "__main__":
        if sys.argv[1] != "default":
            shoal.set_start_method(sys.argv[1])
        me = os.getpid()
        seen = {}
        with shoal.Pool(2) as pool:
            seen["Pool"] = pool.apply(how_started, (me,))
        with shoal.ProcessPoolExecutor(2) as ex:
            seen["ProcessPoolExecutor"] = ex.submit(how_started, me).result()
        with shoal.Actor(Probe) as probe:
            seen["Actor"] = probe.how(me)
        with ProbeManager() as manager:
            seen["Manager"] = manager.Probe().how(me)
        with shoal.get_context().Pool(1) as pool:
            seen["get_context().Pool"] = pool.apply(how_started, (me,))
        # As the standard library's: recycled workers start with spawn
        # unless a context is given, whatever the default.
        with shoal.ProcessPoolExecutor(1, max_tasks_per_child=2) as ex:
            seen["max_tasks_per_child"] = ex.submit(how_started, me).result()
        print(shoal.get_start_method())
        for name, how in seen.items():
            print(name, how)
    """
)


#: multiprocessing's default on Linux: forkserver from Python 3.14, fork before.
DEFAULT = "forkserver" if sys.version_info >= (3, 14) else "fork"


def test_the_default_start_method_is_the_standard_librarys_for_this_python():
    import multiprocessing

    code = "import shoal, multiprocessing as mp; print(shoal.get_start_method(), mp.get_start_method())"
    assert run_ok("-c", code).split() == [DEFAULT, DEFAULT]
    assert shoal.get_start_method is multiprocessing.get_start_method
    assert shoal.set_start_method is multiprocessing.set_start_method


@pytest.mark.parametrize("chosen", ["default", "fork", "spawn", "forkserver"])
def test_every_process_shoal_starts_is_started_as_get_start_method_says(chosen, tmp_path):
    script = tmp_path / "program.py"
    script.write_text(PROGRAM, encoding="utf-8")
    lines = run_ok(str(script), chosen, cwd=tmp_path, timeout=100).splitlines()
    method = lines[0]
    assert method == (DEFAULT if chosen == "default" else chosen)
    seen = dict(line.split(" ", 1) for line in lines[1:])
    assert seen.pop("max_tasks_per_child") == "spawn"
    kinds = ["Pool", "ProcessPoolExecutor", "Actor", "Manager", "get_context().Pool"]
    assert seen == dict.fromkeys(kinds, method)
