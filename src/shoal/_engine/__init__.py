"""The pool engine: scheduler thread, worker loop, batching, crash detection.

The faces (``Pool``, ``ProcessPoolExecutor``, actors, the Dask backend) use
these names only.  :class:`Engine` is the engine (:mod:`._engine` draws its
data flow and lists its modules: the scheduler loop in :mod:`._scheduler`,
crash attribution in :mod:`._crash`, the records and the
:class:`ResultSink` protocol result objects implement in :mod:`._tasks`, the
callback thread in :mod:`._callbacks`); :mod:`._worker` the loop a worker
process runs (its task kinds ``CALL`` ... ``STARMAP``); :mod:`._local` what
a task sees of its worker (:func:`shared`, :func:`worker_state`).
"""

from ._callbacks import CallbackThread as CallbackThread
from ._engine import Engine as Engine
from ._engine import PoolStatistics as PoolStatistics
from ._engine import at_exit_all as at_exit_all
from ._engine import mp_context as mp_context
from ._engine import recycling_context as recycling_context
from ._local import NO_SHARED as NO_SHARED
from ._local import set_thread_shared as set_thread_shared
from ._local import shared as shared
from ._local import worker_state as worker_state
from ._scheduler import engine_descriptors as engine_descriptors
from ._scheduler import with_traceback_type as with_traceback_type
from ._tasks import FailableSink as FailableSink
from ._tasks import ResultSink as ResultSink
from ._tasks import WorkerProcess as WorkerProcess
from ._worker import CALL as CALL
from ._worker import CALL_KW as CALL_KW
from ._worker import MAP as MAP
from ._worker import STARMAP as STARMAP
from ._worker import _set_pdeathsig as set_pdeathsig

__all__ = (
    "CALL",
    "CALL_KW",
    "MAP",
    "NO_SHARED",
    "STARMAP",
    "CallbackThread",
    "Engine",
    "FailableSink",
    "PoolStatistics",
    "ResultSink",
    "WorkerProcess",
    "at_exit_all",
    "engine_descriptors",
    "mp_context",
    "recycling_context",
    "set_pdeathsig",
    "set_thread_shared",
    "shared",
    "with_traceback_type",
    "worker_state",
)
