"""The joblib backend: ``import shoal.joblib`` registers ``backend="shoal"``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

joblib = pytest.importorskip("joblib")

from joblib import Parallel, delayed  # noqa: E402

import shoal  # noqa: E402
import shoal.joblib  # noqa: E402 - registers the backend
import workers  # noqa: E402


def test_import_shoal_does_not_import_joblib():
    code = "import sys, shoal; print('joblib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_parallel_config_runs_calls_in_shoal_workers(method):
    import os

    with joblib.parallel_config(backend="shoal", n_jobs=2, mp_context=method):
        results = Parallel()(delayed(workers.square)(x) for x in range(2000))
        pids = set(Parallel()(delayed(workers.getpid)() for _ in range(20)))
    assert results == [x * x for x in range(2000)]
    assert pids and os.getpid() not in pids


def test_return_as_generator_and_the_default_backend_unchanged():
    out = Parallel(n_jobs=2, backend="shoal", return_as="generator")(
        delayed(workers.square)(x) for x in range(50)
    )
    assert list(out) == [x * x for x in range(50)]
    assert isinstance(joblib.parallel.get_active_backend()[0], joblib._parallel_backends.LokyBackend)


def test_task_exception_keeps_its_type_and_remote_traceback():
    with pytest.raises(ValueError, match="bad value 7") as info:
        Parallel(n_jobs=2, backend="shoal")(
            [delayed(workers.square)(1), delayed(workers.raise_value_error)(7)]
        )
    assert "raise_value_error" in "".join(str(c) for c in _causes(info.value))


def _causes(exc):
    while exc is not None:
        yield exc
        exc = exc.__cause__


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_killed_worker_raises_worker_died_error_and_the_backend_goes_on(method):
    # (A fresh Parallel for the next call: joblib reuses a Parallel's
    # queued batches after an error, with loky too.)
    with joblib.parallel_config(backend="shoal", n_jobs=2, mp_context=method):
        with pytest.raises(shoal.WorkerDiedError) as info:
            Parallel()(delayed(workers.crash_on)(x) for x in range(10))
        assert info.value.signal_name == "SIGKILL"
        assert Parallel()(delayed(workers.square)(x) for x in range(10)) == [x * x for x in range(10)]
    with Parallel(n_jobs=2, backend="shoal", mp_context=method) as parallel:  # ensure_ready=True
        with pytest.raises(shoal.WorkerDiedError):
            parallel(delayed(workers.crash_on)(x) for x in range(10))


def test_n_jobs_one_runs_in_this_process_and_minus_one_uses_every_cpu():
    import os

    assert Parallel(n_jobs=1, backend="shoal")(delayed(os.getpid)() for _ in range(3)) == [os.getpid()] * 3
    backend = shoal.joblib.ShoalBackend()
    assert backend.effective_n_jobs(-1) == joblib.cpu_count()
    with pytest.raises(ValueError, match="n_jobs == 0"):
        backend.effective_n_jobs(0)


def test_unknown_option_says_which_options_exist():
    with pytest.raises(TypeError, match="unknown option.*'processes'.*max_tasks_per_child"):
        with joblib.parallel_config(backend="shoal", n_jobs=2, processes=3):
            Parallel()(delayed(workers.square)(1) for _ in range(2))
    # The same option given to Parallel itself (it used to be dropped).
    with pytest.raises(TypeError, match="unknown option.*'processes'.*max_tasks_per_child"):
        Parallel(n_jobs=2, backend="shoal", processes=3)(delayed(workers.square)(1) for _ in range(2))


def test_executor_options_pass_through_parallel_config():
    with joblib.parallel_config(backend="shoal", n_jobs=2, task_timeout=0.5):
        with pytest.raises(shoal.TaskTimeoutError):
            Parallel()(delayed(workers.sleep_for)(s) for s in (0, 30))


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_options_given_to_parallel_reach_the_workers(method):
    # Parallel(backend="shoal", initializer=...) ran no initializer: the
    # options joblib passes to configure() were dropped.
    out = Parallel(
        n_jobs=2, backend="shoal", mp_context=method, initializer=workers.set_state, initargs=(7,)
    )(delayed(workers.get_state)() for _ in range(20))
    assert out == [7] * 20
    with pytest.raises(shoal.TaskTimeoutError):
        Parallel(n_jobs=2, backend="shoal", task_timeout=0.5)(delayed(workers.sleep_for)(s) for s in (0, 30))


def test_an_option_given_to_parallel_wins_over_parallel_config():
    with joblib.parallel_config(backend="shoal", n_jobs=2, initializer=workers.set_state, initargs=(1,)):
        assert Parallel(initargs=(2,))(delayed(workers.get_state)() for _ in range(4)) == [2] * 4
        assert Parallel()(delayed(workers.get_state)() for _ in range(4)) == [1] * 4


def test_workers_restarted_after_an_error_keep_the_options():
    # abort_everything() restarts the workers of a `with Parallel(...)` block:
    # with the block's options, not without them.
    with Parallel(n_jobs=2, backend="shoal", initializer=workers.set_state, initargs=(5,)) as parallel:
        first = parallel._backend._workers
        with pytest.raises(ValueError, match="bad value 3"):
            parallel(delayed(workers.raise_value_error)(x) for x in (3,))
        assert parallel._backend._workers is not first  # killed and replaced
        assert parallel(delayed(workers.get_state)() for _ in range(4)) == [5] * 4
    assert parallel._backend._workers is None  # nothing left running after the block


def test_n_jobs_one_runs_here_and_warns_about_options_only_workers_apply():
    import os

    alone = Parallel(n_jobs=1, backend="shoal", mp_context="spawn")(delayed(os.getpid)() for _ in range(3))
    assert alone == [os.getpid()] * 3
    with pytest.warns(
        UserWarning, match=r"n_jobs=1 .* in this process.*initializer, task_timeout.*not applied"
    ):
        out = Parallel(
            n_jobs=1, backend="shoal", task_timeout=5, initializer=workers.set_state, initargs=(3,)
        )(delayed(os.getpid)() for _ in range(3))
    assert out == [os.getpid()] * 3


def test_in_a_daemonic_process_the_loop_runs_there_with_a_warning():
    # Inside a multiprocessing.Pool task shoal raised "daemonic processes are
    # not allowed to have children"; loky and multiprocessing fall back to
    # n_jobs=1 with a warning.
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(1) as pool:
        pids, here, caught = pool.apply(workers.joblib_in_this_process, (2, {}))
        assert pids == {here}
        assert len(caught) == 1 and "daemonic process" in caught[0] and "n_jobs=1" in caught[0]
        pids, here, caught = pool.apply(workers.joblib_in_this_process, (2, {"task_timeout": 5}))
        assert pids == {here}
        assert len(caught) == 2 and "task_timeout (which need worker processes) are not applied" in caught[1]


@pytest.mark.parametrize("method", ["spawn", None])
def test_joblib_start_method_is_the_workers_start_method(method):
    # Parallel passes the context JOBLIB_START_METHOD names to configure().
    code = (
        "import joblib, shoal.joblib, workers\n"
        "workers.set_state('inherited')\n"  # a forked worker has it, a spawned one not
        "calls = (joblib.delayed(workers.get_state)() for _ in range(2))\n"
        "print(joblib.Parallel(n_jobs=2, backend='shoal')(calls))"
    )
    env = {k: v for k, v in os.environ.items() if k != "JOBLIB_START_METHOD"}
    if method:
        env["JOBLIB_START_METHOD"] = method
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=Path(__file__).parent,
    )
    assert out.stdout.strip() == ("[None, None]" if method == "spawn" else "['inherited', 'inherited']"), (
        out.stderr
    )


def test_inner_max_num_threads_is_refused_not_ignored():
    # The workers' thread pools are not limited: joblib refuses the option
    # for a backend that does not declare support (docs/guide/joblib.md).
    with pytest.raises(AssertionError, match="ShoalBackend does not accept.*inner_max_num_threads"):
        with joblib.parallel_config(backend="shoal", inner_max_num_threads=2):
            pass


def test_temp_folder_is_accepted_and_no_file_is_written(tmp_path):
    np = pytest.importorskip("numpy")
    a = np.arange(1000.0)
    out = Parallel(n_jobs=2, backend="shoal", max_nbytes=1, temp_folder=str(tmp_path))(
        delayed(workers.array_sum)(a) for _ in range(4)
    )
    assert out == [a.sum()] * 4
    assert list(tmp_path.iterdir()) == []


# -- max_nbytes and mmap_mode ---------------------------------------------------


def _arrays(np):
    return {
        "small": np.arange(100.0),  # 800 B
        "mid": np.arange(50_000.0),  # 400 KB: over shoal's shared-memory threshold, under 1 MB
        "big": np.arange(250_000.0),  # 2 MB
    }


@pytest.mark.parametrize(
    "options, expected",
    [
        # joblib's defaults: max_nbytes="1M", mmap_mode="r"
        ({}, {"small": (False, True, None), "mid": (False, True, None), "big": (True, False, "r")}),
        ({"max_nbytes": 1}, {k: (True, False, "r") for k in ("small", "mid", "big")}),
        (
            {"max_nbytes": "100K"},
            {"small": (False, True, None), "mid": (True, False, "r"), "big": (True, False, "r")},
        ),
        ({"max_nbytes": None}, {k: (False, True, None) for k in ("small", "mid", "big")}),
        ({"mmap_mode": None}, {k: (False, True, None) for k in ("small", "mid", "big")}),
        (
            {"mmap_mode": "c"},
            {"small": (False, True, None), "mid": (False, True, None), "big": (True, True, "c")},
        ),
    ],
)
def test_arrays_arrive_as_joblib_max_nbytes_and_mmap_mode_say(options, expected):
    # max_nbytes and mmap_mode were ignored: every array of 256 KiB or more
    # arrived as a read-only plain ndarray, every smaller one writable.
    np = pytest.importorskip("numpy")
    arrays = _arrays(np)
    out = Parallel(n_jobs=2, backend="shoal", **options)(
        delayed(workers.memmap_info)(a) for a in arrays.values()
    )
    assert dict(zip(arrays, out, strict=True)) == expected


@pytest.mark.parametrize("mmap_mode", ["c", None])
def test_writable_arguments_are_private_copies(mmap_mode):
    np = pytest.importorskip("numpy")
    arrays = _arrays(np)
    out = Parallel(n_jobs=2, backend="shoal", mmap_mode=mmap_mode)(
        delayed(workers.write_first)(a, -1.0) for a in arrays.values()
    )
    assert out == [-1.0] * 3
    assert [a[0] for a in arrays.values()] == [0.0] * 3  # the caller's arrays are unchanged


def test_arrays_over_max_nbytes_arrive_intact_whatever_their_layout():
    np = pytest.importorskip("numpy")
    base = np.arange(600_000, dtype=np.int64).reshape(600, 1000)
    arrays = [
        base,
        np.asfortranarray(base),
        base[::3, ::7],  # neither C nor F contiguous
        base.astype(">i8"),  # byte-swapped
        np.zeros((0, 3)),
        np.array(3.5),
    ]
    out = Parallel(n_jobs=2, backend="shoal", max_nbytes=1)(
        delayed(workers.describe_array)(a) for a in arrays
    )
    for a, (kind, writable, dtype, shape, data) in zip(arrays, out, strict=True):
        assert (dtype, shape, data) == (a.dtype.str, a.shape, a.tobytes())
        assert (kind, writable) == (("memmap", False) if a.nbytes > 1 else ("ndarray", True))


def test_mmap_mode_r_plus_and_w_plus_are_refused_saying_what_to_use():
    np = pytest.importorskip("numpy")
    for mode in ("r+", "w+"):
        with pytest.raises(
            ValueError, match=rf"mmap_mode='{re.escape(mode)}'.*temporary file.*'r'.*'c'.*SharedArray"
        ):
            Parallel(n_jobs=2, backend="shoal", mmap_mode=mode)(
                delayed(workers.array_sum)(np.ones(3)) for _ in range(2)
            )
    # Without memmapping (max_nbytes=None) the mode has no effect: accepted.
    assert Parallel(n_jobs=2, backend="shoal", max_nbytes=None, mmap_mode="r+")(
        delayed(workers.array_sum)(np.ones(3)) for _ in range(2)
    ) == [3.0, 3.0]
    with pytest.raises(ValueError, match="mmap_mode must be one of"):
        Parallel(n_jobs=2, backend="shoal", mmap_mode="rw")(delayed(workers.square)(1) for _ in range(2))


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_workers_write_into_a_numpy_memmap_of_the_callers_file(tmp_path, method):
    # joblib's documented pattern ("Writing parallel computation results in
    # shared memory"): workers fill an np.memmap(mode="w+") the caller made.
    # It travelled by value, so the caller's file stayed zeros.
    np = pytest.importorskip("numpy")
    out = np.memmap(tmp_path / "out.dat", dtype=np.float64, shape=(4, 1000), mode="w+", order="F")
    Parallel(n_jobs=2, backend="shoal", mp_context=method)(
        delayed(workers.fill)(out[i], i + 1) for i in range(4)
    )
    assert (out == np.arange(1, 5)[:, None]).all()
    strided = out[::-2, 5::3]  # a reversed, strided view: the same bytes of the file
    Parallel(n_jobs=2, backend="shoal", mp_context=method)(
        delayed(workers.fill)(strided, -1) for _ in range(1)
    )
    assert (out[::-2, 5::3] == -1).all() and out[2, 5] == 3 and out[3, 6] == 4
    read_only = np.memmap(tmp_path / "out.dat", dtype=np.float64, shape=(4, 1000), mode="r", order="F")
    info = Parallel(n_jobs=2, backend="shoal")(delayed(workers.memmap_info)(read_only[1:]) for _ in range(1))
    assert info == [(True, False, "r")]


def test_objects_pickled_through_copyreg_travel_beside_arrays():
    # The array reducers replaced copyreg's table (a compiled regex pickles
    # through it): the batch fell back to the ordinary path, with a warning.
    np = pytest.importorskip("numpy")
    pattern = re.compile("a+")
    out = Parallel(n_jobs=2, backend="shoal", max_nbytes=1)(
        delayed(workers.args_and_types)(pattern, np.ones(3)) for _ in range(2)
    )
    assert [types for _, types in out] == [["Pattern", "memmap"]] * 2


def test_shared_arrays_and_functions_by_value_in_batches_with_arrays():
    np = pytest.importorskip("numpy")
    grid = shoal.SharedArray((4, 100_000))
    Parallel(n_jobs=2, backend="shoal", max_nbytes=1)(delayed(workers.fill)(grid[i], i) for i in range(4))
    assert grid[:, 0].tolist() == [0.0, 1.0, 2.0, 3.0]
    big = np.ones(500_000)
    scale = 3.0
    out = Parallel(n_jobs=2, backend="shoal")(
        delayed(lambda a: float(a.sum()) * scale)(big) for _ in range(3)
    )
    assert out == [1_500_000.0] * 3


def test_without_joblib_the_module_says_what_to_install():
    code = (
        "import sys; sys.modules['joblib'] = None\n"
        "try:\n import shoal.joblib\nexcept ImportError as e:\n print(e)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "pip install joblib" in out.stdout, out.stderr
