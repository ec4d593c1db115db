"""The pool engine: the engine contract, the local engine, the worker loop.

The faces (``Pool``, ``ProcessPoolExecutor``, actors, the joblib backend)
and the other backends (:mod:`shoal._backends`) use these names only.

- :class:`Engine` (:mod:`._base`) is the contract every engine implements:
  the state machine (its record, :mod:`._state`), close / terminate / join,
  the imap feeders, the skeleton of the thread that drives the work;
- :class:`LocalEngine` (:mod:`._engine`, which draws its data flow) runs
  tasks on worker processes of this machine, through the scheduler loop of
  :mod:`._scheduler`, crash attribution in :mod:`._crash`, the records and
  the :class:`ResultSink` protocol result objects implement in
  :mod:`._tasks`, the callback thread in :mod:`._callbacks`;
- :mod:`._worker` is the loop a worker process runs (its task kinds ``CALL``
  ... ``STARMAP``); :mod:`._local` what a task sees of its worker
  (:func:`shared`, :func:`worker_state`; a backend whose workers run tasks
  on threads sets the shared object per task with :func:`set_thread_shared`).
"""

from ._base import Engine as Engine
from ._base import PoolStatistics as PoolStatistics
from ._engine import LocalEngine as LocalEngine
from ._engine import mp_context as mp_context
from ._engine import recycling_context as recycling_context
from ._local import NO_SHARED as NO_SHARED
from ._local import set_thread_shared as set_thread_shared
from ._local import shared as shared
from ._local import worker_state as worker_state
from ._procs import start_process as start_process
from ._state import engine_descriptors as engine_descriptors
from ._tasks import ResultSink as ResultSink
from ._tasks import WorkerProcess as WorkerProcess
from ._worker import CALL as CALL
from ._worker import CALL_KW as CALL_KW
from ._worker import MAP as MAP
from ._worker import STARMAP as STARMAP
from ._worker import set_pdeathsig as set_pdeathsig

__all__ = (
    "CALL",
    "CALL_KW",
    "MAP",
    "NO_SHARED",
    "STARMAP",
    "Engine",
    "LocalEngine",
    "PoolStatistics",
    "ResultSink",
    "WorkerProcess",
    "engine_descriptors",
    "mp_context",
    "recycling_context",
    "set_pdeathsig",
    "set_thread_shared",
    "shared",
    "worker_state",
)
