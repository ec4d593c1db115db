"""How code crosses a process boundary (shoal._serialization._code): the
details of the policy that the corpus in tests/programs/ does not pin down,
each run as a user's program in a fresh interpreter."""

from __future__ import annotations

import pickle
import sys
import textwrap

import pytest

from helpers import run_python


def _run_program(tmp_path, code: str, way: str, start_method: str, *args: str) -> str:
    """Run *code* (dedented) as a file, through -c or on stdin, with *start_method*
    as the default; it must exit 0; its stdout."""
    code = textwrap.dedent(code).replace("START_METHOD", repr(start_method))
    if way == "file":
        script = tmp_path / "program.py"
        script.write_text(code)
        proc = run_python(str(script), *args, cwd=tmp_path)
    elif way == "-c":
        proc = run_python("-c", code, *args, cwd=tmp_path)
    else:
        proc = run_python("-", *args, cwd=tmp_path, input=code)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stdout


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
@pytest.mark.parametrize("way", ["-c", "stdin"])
def test_a_global_the_caller_rebinds_reaches_the_workers_and_a_workers_own_state_stays(
    tmp_path, way, start_method
):
    # By-value code carries its globals with versions: the caller's new
    # value wins, an unchanged one never overwrites what the worker set.
    out = _run_program(
        tmp_path,
        """
        import shoal
        FACTOR = 2
        SEEN = 0
        def scale(x):
            global SEEN
            SEEN += 1
            return x * FACTOR, SEEN
        if __name__ == "__main__":
            shoal.set_start_method(START_METHOD, force=True)
            with shoal.Pool(1) as pool:
                print(pool.map(scale, [1, 2]))
                FACTOR = 10
                print(pool.map(scale, [1, 2]))
                print(pool.map(lambda x: x * FACTOR, [3]))
        """,
        way,
        start_method,
    )
    assert out.splitlines() == ["[(2, 1), (4, 2)]", "[(10, 3), (20, 4)]", "[30]"]


@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_a_function_defined_under_the_main_guard_runs_under_spawn(tmp_path, start_method):
    # The standard library's spawned workers never run the main guard, so
    # they cannot find such a function; shoal sends it by value, into the
    # worker's copy of the script (whose top-level globals it sees).
    out = _run_program(
        tmp_path,
        """
        import shoal
        BASE = 100
        if __name__ == "__main__":
            shoal.set_start_method(START_METHOD, force=True)
            def late(x):
                return BASE + x
            with shoal.Pool(2) as pool:
                print(pool.map(late, range(3)))
        """,
        "file",
        start_method,
    )
    assert out.splitlines() == ["[100, 101, 102]"]


def test_a_function_whose_globals_cannot_be_pickled_goes_by_name_under_fork(tmp_path):
    # Interactive code goes by value, but a global such as a lock cannot:
    # then it goes by name, which a forked worker resolves (the standard
    # library's way).
    out = _run_program(
        tmp_path,
        """
        import threading
        import shoal
        LOCK = threading.Lock()
        def locked(x):
            with LOCK:
                return x + 1
        if __name__ == "__main__":
            shoal.set_start_method(START_METHOD, force=True)
            with shoal.Pool(2) as pool:
                print(pool.map(locked, range(3)))
        """,
        "-c",
        "fork",
    )
    assert out.splitlines() == ["[1, 2, 3]"]


@pytest.mark.parametrize("way", ["-c", "stdin"])
def test_a_class_of_interactive_code_is_the_forked_workers_own(tmp_path, way):
    # Under fork the worker has the parent's classes: an instance sent by
    # value is an instance of the worker's class, as with the standard library.
    out = _run_program(
        tmp_path,
        """
        import shoal
        class Point:
            def __init__(self, x):
                self.x = x
        def check(p):
            return isinstance(p, Point), type(p) is Point, p.x
        if __name__ == "__main__":
            shoal.set_start_method(START_METHOD, force=True)
            with shoal.Pool(1) as pool:
                print(pool.apply(check, (Point(3),)))
                r = pool.apply(Point, (4,))
                print(isinstance(r, Point), r.x)
        """,
        way,
        "fork",
    )
    assert out.splitlines() == ["(True, True, 3)", "True 4"]


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_a_lambda_of_a_module_shares_the_modules_globals_with_its_functions(tmp_path, start_method):
    # A lambda is pickled by value; its globals are the worker's copy of
    # its module, where the initializer (sent by name) set them.
    (tmp_path / "mymodel.py").write_text(
        textwrap.dedent(
            """
            MODEL = None
            def load(name):
                global MODEL
                MODEL = name
            predict = lambda x: (MODEL, x)
            """
        )
    )
    out = _run_program(
        tmp_path,
        """
        import shoal
        import mymodel
        if __name__ == "__main__":
            shoal.set_start_method(START_METHOD, force=True)
            with shoal.Pool(2, initializer=mymodel.load, initargs=("m1",)) as pool:
                print(pool.map(mymodel.predict, range(2)))
        """,
        "file",
        start_method,
    )
    assert out.splitlines() == ["[('m1', 0), ('m1', 1)]"]


@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_a_program_read_from_stdin_starts_processes_and_actors(tmp_path, start_method):
    # Before: the standard library's spawned child ran "<stdin>" as a file
    # and died (WorkerStartError, asking for a main guard that was there).
    out = _run_program(
        tmp_path,
        """
        import shoal
        class Box:
            def __init__(self):
                self.items = []
            def add(self, x):
                self.items.append(x)
                return len(self.items)
        if __name__ == "__main__":
            shoal.set_start_method(START_METHOD, force=True)
            with shoal.Actor(Box) as box:
                print(box.add("a"), box.add("b"))
            with shoal.ProcessPoolExecutor(2) as ex:
                print(list(ex.map(abs, [-1, -2])))
        """,
        "stdin",
        start_method,
    )
    assert out.splitlines() == ["1 2", "[1, 2]"]


def test_open_files_are_refused_by_value_too():
    from shoal._serialization import pickle_code

    with open(__file__) as f:

        def reads():
            return f.read()

        with pytest.raises(TypeError, match="open file"):
            pickle_code(reads)


def test_foreign_receivers_get_main_code_by_value():
    # A Dask worker runs its own __main__: code of ours must not travel by name.
    from shoal._serialization import pickle_code

    main = sys.modules["__main__"]
    code = compile("def here(x):\n    return x + 1\n", "<test>", "exec")
    exec(code, main.__dict__)
    try:
        fn = main.here
        by_name = pickle.dumps(fn)
        assert b"here" in by_name and len(by_name) < 60
        by_value = pickle_code(fn, foreign=True)
        assert len(by_value) > len(by_name)
        assert pickle.loads(by_value)(1) == 2
    finally:
        del main.here
