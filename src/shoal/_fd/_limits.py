"""What ran out, said plainly; and a tiny fault-injection hook for tests.

When the system refuses shoal a descriptor, memory or a process, the error
the user sees names what ran out and what to do about it::

    os.memfd_create / os.ftruncate / os.pipe / fork
        │ OSError(EMFILE | ENFILE | ENOMEM | ENOSPC | EAGAIN)
        ▼
    exhausted(exc, what)  ──▶  OSError of the same errno (and class), whose
                               message says: what shoal was doing, the limit
                               (RLIMIT_NOFILE, RLIMIT_NPROC, memory) and how
                               to get out of it; the original as __cause__

Every other errno is returned unchanged.  Callers raise the result ``from``
the original.

**Fault injection.**  Running out of memory for a memfd is hard to cause on
purpose (a memory cgroup kills instead of refusing), so :data:`FAULTS` makes
the next calls fail as if it had happened.  It maps the name of a call that
:func:`~._segment.create_fd` makes (``"memfd"``: ``memfd_create``,
``"ftruncate"``), or ``"map"`` (:func:`~._segment.map_received`, the mapping
of a received memfd), to the errno it raises.  It is filled once, at import, from
the environment variable ``SHOAL_FAULT`` (``SHOAL_FAULT=memfd:ENOMEM`` or
``SHOAL_FAULT=memfd:EMFILE,ftruncate:ENOSPC``) and can be changed at run time
(``shoal._fd._limits.FAULTS.clear()``).  Empty unless a test sets it; a
lookup in an empty dict costs nothing beside a system call.
"""

from __future__ import annotations

import errno as _errno
import os
import resource

_MEMORY = (_errno.ENOMEM, _errno.ENOSPC)
_DESCRIPTORS = (_errno.EMFILE, _errno.ENFILE)


def _parse_faults(spec: str) -> dict[str, int]:
    faults = {}
    for item in spec.split(","):
        call, sep, name = item.strip().partition(":")
        code = getattr(_errno, name.strip(), None)
        if sep and isinstance(code, int):
            faults[call.strip()] = code
    return faults


#: Calls of :func:`~._segment.create_fd` (and ``"map"``) to fail, and the errno each raises
#: (see the module docstring).
FAULTS: dict[str, int] = _parse_faults(os.environ.get("SHOAL_FAULT", ""))


def inject(call: str) -> None:
    """Raise the OSError :data:`FAULTS` asks for *call*, if any."""
    code = FAULTS.get(call)
    if code is not None:
        raise OSError(code, f"{os.strerror(code)} (injected by SHOAL_FAULT)")


def _limit(which: int) -> str:
    try:
        soft, _hard = resource.getrlimit(which)
    except (OSError, ValueError):
        return "unknown"
    return "unlimited" if soft == resource.RLIM_INFINITY else str(soft)


def exhausted(exc: OSError, what: str) -> OSError:
    """*exc*, raised while shoal was trying to *what* ("start a worker
    process", "create 4096 bytes of shared memory"), as an error that says
    what ran out and what to do; *exc* itself when it is not exhaustion."""
    code = exc.errno
    if code in _DESCRIPTORS:
        if code == _errno.EMFILE:
            limit = (
                "this process has as many descriptors open as its RLIMIT_NOFILE allows "
                f"({_limit(resource.RLIMIT_NOFILE)})"
            )
        else:
            limit = "the whole system's table of open files is full (fs.file-max)"
        msg = (
            f"too many open files: cannot {what}: {limit}. Each pool holds a few descriptors per "
            "worker; each queue, pipe, actor handle, SharedDict and SharedArray at least one: close "
            "(or `with`) the ones you no longer use, or raise the limit (`ulimit -n`, "
            "resource.setrlimit(resource.RLIMIT_NOFILE, ...))"
        )
    elif code in _MEMORY:
        msg = (
            f"out of memory: cannot {what}: the kernel refused the memory ({os.strerror(code)}). "
            "Free memory (drop arrays, dicts and pools you no longer use), ask for less, or run with a "
            "higher memory limit (the machine's, or the container's / cgroup's)"
        )
    elif code == _errno.EAGAIN:
        msg = (
            f"fork failed: cannot {what}: the system refused a new process or thread (EAGAIN): this "
            f"user's processes and threads reached RLIMIT_NPROC ({_limit(resource.RLIMIT_NPROC)}, not "
            "applied to root), or a pids cgroup (a container's limit) or the system's process table is "
            "full. Use fewer workers, let other processes end, or raise the limit (`ulimit -u`, the "
            "container's pids limit)"
        )
    else:
        return exc
    new = type(exc)(code, msg)
    new.__cause__ = exc
    return new
