"""shoal's pool engine on a Dask cluster (``Pool(backend="dask")``).

Three modules: :mod:`._engine` (the client side, :class:`DaskEngine`),
:mod:`._worker` (what runs in a Dask worker: :func:`~._worker.run_batch`),
:mod:`._wire` (what travels between them and how it is pickled).

:class:`DaskEngine` has the interface of :class:`shoal._engine.Engine`, so
``Pool``, ``ProcessPoolExecutor``, ``AsyncResult``, ``map`` and the lazy
``imap`` run unchanged on it; only where tasks run differs.  Dask's
``distributed`` scheduler costs about a millisecond per task, so the engine
never gives it one tiny task at a time: it groups tasks into *batches*, each
one Dask task, and shares large data once instead of sending it with every
task.

Data flow::

    caller threads               dispatcher thread ("shoal-dask")       Dask cluster
    --------------               --------------------------------       ------------
    submit_call / make_task:     pending (deque of _Task)               scheduler
      the function pickled once    │                                      │
      per call (per map), the      ▼                                      ▼
      arguments per task (errors batches: ~BATCH_SECONDS of work by    a worker runs
      surface here); buffers      measured time per item, a fair       _run_batch():
      >= SHARE_THRESHOLD are      share of what is pending, at most     unpickle, run
      scattered once per call    BATCH_BYTES; sent while fewer than     each task, pickle
      and referenced, not copied CREDIT x worker threads are in flight   each result or
                                  ─── client.submit(_run_batch) ─────►   exception
                                 a wait on the client's event   ◄──── (ok, bytes, secs)
                                  loop queues each done batch; the       per task
                                  dispatcher gathers finished batches
                                  in one call and delivers each
                                  task's outcome to its sink ──────► result objects,
                                                                      callback thread

Ownership: the dispatcher thread alone submits batches, reads their results
and calls the sinks (``deliver``).  Callers touch only the ``pending`` and
``control`` deques and the wake-up condition, and may scatter data (the Dask
client is thread-safe).  With no ``address`` the engine starts a
``LocalCluster`` of worker processes and owns it: ``close`` / ``terminate``
shut it down.  With an ``address`` it only connects and never stops what it
did not start.

Sharing: a call's function is pickled once for all its tasks.  Buffers of at
least SHARE_THRESHOLD bytes met while pickling arguments (numpy arrays, and
anything else pickled out of band with protocol 5) are scattered to the
cluster once per call and referenced by every task of that call; workers
fetch them peer to peer and each task unpickles its own writable copy, as
with the standard library.  ``shared=obj`` is scattered once to every worker
(``broadcast=True``) and returned by :func:`shared` inside tasks.  Objects
that hold a file descriptor of this machine (SharedDict, Pipe, Queue, ...)
are refused with a :class:`~shoal.SerializationError` saying they are
node-local: a worker elsewhere could not use them, and writes would be lost.

Worker deaths: Dask runs a task again when its worker dies, up to
``distributed.scheduler.allowed-failures`` times (ALLOWED_FAILURES for the
cluster this engine owns), then reports ``KilledWorker``.  A batch of several
tasks, or a map chunk of several items, that ends so is split into at most
SPLIT_WAYS pieces, each run alone; a single item that still kills its worker
fails with :class:`~shoal.WorkerDiedError` naming the function and the item,
and everything else completes.

Shutdown: ``close()`` lets queued work finish, then the dispatcher closes the
client (and the cluster it owns) and exits; ``terminate()`` fails what is
unfinished with :class:`~shoal.PoolClosedError`, cancels the Dask futures and
does the same.  Not available on Dask: per-task time limits,
``maxtasksperchild`` and ``max_memory`` (Dask's workers are not the pool's
to replace) -- they raise ``ValueError``; a running task cannot be
interrupted, so ``cancel()`` fails it at once and drops its late result.
"""

from ._engine import DaskEngine as DaskEngine

__all__ = ("DaskEngine",)
