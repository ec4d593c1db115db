"""Exceptions across processes: a worker's exception reaches the caller as
its own type, with the remote traceback as ``__cause__``, or as a
:class:`~shoal.exceptions.RemoteError` when its class cannot be rebuilt."""

from __future__ import annotations

import pickle
import traceback
from typing import Any

from ..exceptions import RemoteError, RemoteTraceback, SerializationError, TaskExitError, corrupt_data
from ._code import PROTOCOL as _PROTOCOL
from ._pickling import loads, pickle_code


class _ExceptionWithTraceback:
    """Carries a worker's exception and its formatted traceback to the parent,
    where it is rebuilt as the original type with ``__cause__`` set."""

    def __init__(self, exc: BaseException) -> None:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        self.exc = exc
        self.tb = f'\n"""\n{tb}"""'

    def __reduce__(self) -> Any:
        return _rebuild_exception, (_PortableException(self.exc, self.tb), self.tb)


def _rebuild_exception(exc: BaseException, tb: str) -> BaseException:
    exc.__cause__ = RemoteTraceback(tb)
    return exc


class _PortableException:
    """Pickles an exception so that the parent gets it back even when its
    class cannot be rebuilt the normal way.

    Unpickling an exception calls ``cls(*exc.args)``, which fails for the
    common ``__init__(self, record_id, reason)`` that passes one message to
    ``super().__init__``.  So the exception travels twice: as its ordinary
    pickle (classes by reference first, so ``except MyError`` matches the
    parent's class) and as its parts (class by reference, ``args``,
    ``__dict__``, qualified name, message).  The parent tries the first,
    then rebuilds from the parts without calling ``__init__``, and when the
    class is not importable there raises :class:`shoal.exceptions.RemoteError`
    instead (see _load_exception).
    """

    __slots__ = ("exc", "tb")

    def __init__(self, exc: BaseException, tb: str) -> None:
        self.exc = exc
        self.tb = tb

    def __reduce__(self) -> Any:
        exc = self.exc
        try:
            data = pickle.dumps(exc, _PROTOCOL)
        except Exception:  # noqa: BLE001 - a lambda or a local class inside: by value
            data = pickle_code(exc)  # if this raises, pack_exception substitutes
        cls = type(exc)
        parts: list[bytes | None] = []
        for part in (cls, exc.args, getattr(exc, "__dict__", None) or None):
            try:
                parts.append(pickle.dumps(part, _PROTOCOL))
            except Exception:  # noqa: BLE001 - that part stays behind
                parts.append(None)
        name = f"{cls.__module__}.{cls.__qualname__}"
        return _load_exception, (data, name, _safe_str(exc), self.tb, *parts)


def _load_exception(
    data: Any, name: Any, message: Any, tb: Any, cls_data: Any, args_data: Any, state_data: Any
) -> BaseException:
    try:
        return pickle.loads(data)
    except Exception:  # noqa: BLE001 - rebuilt from its parts below
        pass
    try:
        cls = pickle.loads(cls_data)
        args = pickle.loads(args_data)
        state = pickle.loads(state_data) if state_data is not None else None
        if not (isinstance(cls, type) and issubclass(cls, BaseException)):
            raise TypeError(f"{cls!r} is not an exception class")
        try:
            exc = cls.__new__(cls, *args)
        except Exception:  # noqa: BLE001 - a __new__ with its own signature
            exc = cls.__new__(cls)
        exc.args = args
        if state:
            exc.__dict__.update(state)
        return exc
    except Exception:  # noqa: BLE001 - the class is not importable here
        return RemoteError(name, message, tb)


def pack_exception(exc: BaseException, who: str = "the task") -> bytes:
    """Pickle a worker's exception for the parent; never fails.

    *who* raised it, for messages: ``"the task"``, ``"Counter.incr()"``.
    A ``SystemExit`` is sent as a :class:`TaskExitError` (re-raised in the
    caller, it would end the caller's program, silently).  If the exception
    itself cannot be pickled, a :class:`SerializationError` carrying its
    type, message and traceback text is sent instead.
    """
    if isinstance(exc, SystemExit):
        exc = _task_exit(exc, who)
    try:
        wrapped = _ExceptionWithTraceback(exc)
        tb = wrapped.tb
    except BaseException:  # noqa: BLE001 - an exception that cannot even be formatted
        wrapped = None
        tb = f"<the traceback of a {type(exc).__qualname__} could not be formatted>"
    try:
        if wrapped is not None:
            return pickle_code(wrapped)
        raise TypeError("not formattable")
    except BaseException as pickling_error:  # noqa: BLE001 - this function never fails
        substitute = SerializationError(
            f"{who} raised {type(exc).__qualname__}: {_safe_str(exc)}, and that exception could not be "
            f"pickled to send it back ({type(pickling_error).__name__}: {_safe_str(pickling_error)})"
        )
        return pickle.dumps(_PlainRemoteError(substitute, tb), _PROTOCOL)


def _task_exit(exc: SystemExit, who: str) -> TaskExitError:
    code = exc.code
    if not isinstance(code, (int, str, type(None))):
        code = _safe_str(code)  # sys.exit() takes any object: its text travels (what Python would print)
    error = TaskExitError(code, who)
    # The remote traceback then shows the SystemExit and where it was raised.
    error.__cause__ = exc
    return error


def _safe_str(obj: Any) -> str:
    try:
        return str(obj)
    except BaseException:  # noqa: BLE001
        return f"<unprintable {type(obj).__qualname__}>"


class _PlainRemoteError:
    """Like _ExceptionWithTraceback, for a substitute that is known to pickle."""

    def __init__(self, exc: BaseException, tb: str) -> None:
        self.exc = exc
        self.tb = tb

    def __reduce__(self) -> Any:
        return _rebuild_exception, (self.exc, self.tb)


def unpack_exception(data: Any, who: str = "the task") -> BaseException:
    """The exception :func:`pack_exception` packed (*who* raised it); a
    :class:`~shoal.exceptions.CorruptDataError` when *data* unpickles to
    something else (it was not packed by shoal)."""
    try:
        exc = loads(data)
    except Exception as error:  # noqa: BLE001 - any unpickling error is reported as such
        return SerializationError(
            f"{who} raised an exception that could not be unpickled in the parent: "
            f"{type(error).__name__}: {error}"
        )
    if not isinstance(exc, BaseException):
        return corrupt_data(f"the error of {who} arrived as a {type(exc).__qualname__}, not an exception")
    return exc
