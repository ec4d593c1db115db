"""The joblib backend: ``import shoal.joblib`` registers ``backend="shoal"``."""

from __future__ import annotations

import subprocess
import sys

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


def test_executor_options_pass_through_parallel_config():
    with joblib.parallel_config(backend="shoal", n_jobs=2, task_timeout=0.5):
        with pytest.raises(shoal.TaskTimeoutError):
            Parallel()(delayed(workers.sleep_for)(s) for s in (0, 30))


def test_without_joblib_the_module_says_what_to_install():
    code = (
        "import sys; sys.modules['joblib'] = None\n"
        "try:\n import shoal.joblib\nexcept ImportError as e:\n print(e)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "pip install 'shoal[joblib]'" in out.stdout, out.stderr
