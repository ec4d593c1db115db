"""shoal's benchmark suite: shoal against the standard library (and loky,
mpire, joblib when installed), measured in the same run.

Installed as ``shoal.benchmarks``; run with ``shoal bench`` (``--quick`` for a
run under a minute, ``-k WORD`` to select scenarios).

Each ``bench_*.py`` module defines ``SCENARIOS``: a list of
:class:`~shoal.benchmarks._framework.Scenario`.  A scenario has one callable
per contender; each callable takes ``quick: bool`` and returns the measured
figure (in the scenario's unit).  The runner prints every figure and its ratio
to the standard library's.
"""

MODULES = (
    "bench_pool",
    "bench_arrays",
    "bench_ipc",
    "bench_shared",
    "bench_actor",
    "bench_joblib",
    "bench_dask",
)

# What the `shoal bench` command uses (imported after MODULES: the runner reads it).
from ._framework import describe as describe  # noqa: E402
from ._framework import load_scenarios as load_scenarios  # noqa: E402
from ._framework import print_header as print_header  # noqa: E402
from ._framework import print_record as print_record  # noqa: E402
from ._framework import print_summary as print_summary  # noqa: E402
from ._framework import run as run  # noqa: E402
from ._plot import draw_ratios as draw_ratios  # noqa: E402
