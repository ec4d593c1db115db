"""How functions, classes and the globals they use cross a process boundary.

The policy, in one place (every face pickles through :func:`dumps`, which
asks this module)::

    sender (any process)                          receiver (worker, actor, Dask worker)
    --------------------                          -------------------------------------
    plain pickle: by reference  ───────────────►  imports the module, looks the name up
      (module-level functions and classes,          (the standard library's way)
      builtins, data)
    when the receiver cannot import it:           _namespace(module, lineage, file):
    by value (cloudpickle), code and the            the receiver's own module when it is the
    globals it uses, each global with its  ─────►   same program (a forked child, a spawned
    sender's version number                          child that imported the same script),
                                                    else one namespace per sender and module
                                                  _set_function_state: a global the receiver
                                                    already has keeps its value unless the
                                                    sender rebound the name since the receiver
                                                    first saw it

What travels by value:

* Code of the main module that the receiver cannot import: the main module
  is not a file (``python -c``, stdin, an interactive session, a notebook or
  an IPython kernel), or the name is not bound at the script's top level
  (a function defined inside ``if __name__ == "__main__":``, which a
  spawned child never runs), or the receiver runs elsewhere (*foreign*: a
  Dask worker, which runs its own ``__main__``).
* Lambdas, closures, nested functions and classes: plain pickle refuses
  them, so cloudpickle takes them, whatever their module.

By-value code of one module shares one globals namespace per receiving
process, so an initializer that sets a global and the tasks that read it
meet, as they do with the standard library; and a module-level cache filled
by one task is there for the next.  Globals: each by-value function carries
the current values of the globals it uses, each with a version (the
sender's: it changes when the sender rebinds the name).  The receiver applies
a value it has not seen, and keeps its own value of a name (one its copy of
the module had, or one its code set) while the sender's version is unchanged:
so a worker's own state survives the next task, and a value the caller
rebinds reaches the workers with the next task that uses it.

Classes of the main module that the receiver already has (the same program)
are the receiver's own classes, so instances pass ``isinstance`` there;
elsewhere cloudpickle's class tracking makes one class per receiver.

Processes that cannot import the main module must not try: a spawned child
of a program read from stdin would run ``<stdin>`` as a file and die.
:func:`starting_process` keeps the main module's path out of the child's
preparation data while shoal starts a process.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import importlib
import io
import itertools
import os
import pickle
import sys
import threading
import tokenize
import types
import weakref
from collections import ChainMap
from collections.abc import Callable, Iterator
from typing import Any

import cloudpickle
from cloudpickle import cloudpickle as _cp

__all__ = (
    "PROTOCOL",
    "Pickler",
    "function_bytes",
    "main_needs_value",
    "starting_process",
)

PROTOCOL = 5

#: The names the main module goes by (a spawned child runs it as __mp_main__).
MAIN_NAMES = frozenset({"__main__", "__mp_main__"})

#: This program's lineage: a forked child inherits it, and with it knows that
#: its ``__main__`` is a copy of its parent's.  A spawned child makes its own.
LINEAGE = os.urandom(8).hex()


def _sender() -> str:
    """Who numbers the versions: one process (forked siblings share LINEAGE)."""
    return f"{LINEAGE}-{os.getpid()}"


# -- what the receiver can import -----------------------------------------------


class _MainInfo:
    """What this process's main module offers a receiver that runs the same
    program: its file, and the names its top level binds (outside
    ``if __name__ == "__main__":``), which a spawned child re-creates."""

    __slots__ = ("file", "module", "top_level", "value_names", "value_names_size")

    def __init__(self, module: types.ModuleType) -> None:
        self.module = module
        self.file = _importable_file(module)
        self.top_level = _top_level_names(self.file) if self.file else frozenset()
        self.value_names: frozenset[str] = frozenset()
        self.value_names_size = -1


_main_info: _MainInfo | None = None


def _info() -> _MainInfo | None:
    global _main_info
    main = sys.modules.get("__main__")
    if main is None:
        return None
    info = _main_info
    if info is None or info.module is not main:
        info = _main_info = _MainInfo(main)
    return info


def _importable_file(module: types.ModuleType) -> str | None:
    """The source file a spawned child would run as the main module, or None
    (``python -c``, stdin, interactive, notebooks)."""
    spec = getattr(module, "__spec__", None)
    path = getattr(spec, "origin", None) if spec is not None and spec.name not in MAIN_NAMES else None
    if path is None:
        path = getattr(module, "__file__", None)
    if not isinstance(path, str) or not path.endswith(".py"):
        return None
    path = os.path.abspath(path)
    return path if os.path.isfile(path) else None


def _top_level_names(path: str) -> frozenset[str]:
    try:
        with tokenize.open(path) as f:
            tree = ast.parse(f.read(), path)
    except (OSError, SyntaxError, ValueError):
        return frozenset()
    names: set[str] = set()
    _collect(tree.body, names)
    return frozenset(names)


def _is_main_guard(node: ast.stmt) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    if not isinstance(test, ast.Compare) or len(test.comparators) != 1:
        return False
    sides = [test.left, test.comparators[0]]
    return any(isinstance(s, ast.Name) and s.id == "__name__" for s in sides) and any(
        isinstance(s, ast.Constant) and s.value == "__main__" for s in sides
    )


def _collect(body: list[ast.stmt], names: set[str]) -> None:
    """Names bound by the statements a spawned child runs (not the main guard)."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.If):
            if _is_main_guard(node):
                _collect(node.orelse, names)
                continue
            _collect(node.body, names)
            _collect(node.orelse, names)
        elif isinstance(node, (ast.Try, ast.With, ast.For, ast.While)):
            for part in ("body", "orelse", "finalbody", "handlers"):
                for child in getattr(node, part, ()):
                    _collect(child.body if isinstance(child, ast.ExceptHandler) else [child], names)
        else:
            for target in ast.walk(node):
                if isinstance(target, ast.Name) and isinstance(target.ctx, ast.Store):
                    names.add(target.id)


def main_needs_value(foreign: bool) -> bool:
    """Whether something of the main module may have to travel by value to
    such a receiver (else plain pickle's references are right as they are)."""
    if foreign:
        return True
    info = _info()
    if info is None:
        return False
    if info.file is None:
        return True
    namespace = info.module.__dict__
    if info.value_names_size != len(namespace):
        # Functions and classes bound only inside the main guard (or since).
        info.value_names = frozenset(
            name
            for name, value in list(namespace.items())
            if isinstance(value, (types.FunctionType, type))
            and getattr(value, "__module__", None) in MAIN_NAMES
            and name not in info.top_level
        )
        info.value_names_size = len(namespace)
    return bool(info.value_names)


def _by_reference(obj: Any, foreign: bool) -> bool:
    """Whether a function or class of the main module may travel by name."""
    if foreign:
        return False
    info = _info()
    if info is None or info.file is None:
        return False
    qualname = getattr(obj, "__qualname__", "")
    top = qualname.partition(".")[0]
    if top not in info.top_level or "<locals>" in qualname:
        return False
    found: Any = info.module
    for part in qualname.split("."):
        found = getattr(found, part, None)
    return found is obj


# -- the sender: versions of globals -----------------------------------------------

_versions = itertools.count(1)
#: (id of a globals dict, name) -> (the value last sent, its version).  The
#: value is held, so its id cannot be reused while it is the one compared.
_sent: dict[tuple[int, str], tuple[Any, int]] = {}
_sent_lock = threading.Lock()


def _versioned(func: types.FunctionType, f_globals: dict[str, Any]) -> tuple[str, dict[str, tuple[int, Any]]]:
    gid = id(func.__globals__)
    out = {}
    with _sent_lock:
        for name, value in f_globals.items():
            entry = _sent.get((gid, name))
            if entry is None or entry[0] is not value:
                entry = _sent[(gid, name)] = (value, next(_versions))
            out[name] = (entry[1], value)
    return _sender(), out


# -- the receiver: namespaces ---------------------------------------------------------

#: Namespaces for modules this process does not have, by (module, sender lineage).
_private: dict[tuple[str, str], dict[str, Any]] = {}
#: id(namespace) -> {name: (sender, version)}: the version of each global last
#: applied from (or first seen from) a sender.
_applied: dict[int, dict[str, tuple[str, int]]] = {}
_namespace_lock = threading.Lock()


def _namespace(module: str, lineage: str, file: str | None) -> dict[str, Any]:
    """The globals that by-value code of *module* gets in this process."""
    if module in MAIN_NAMES:
        main = sys.modules.get("__main__")
        if main is not None and (lineage == LINEAGE or (file is not None and file == _importable_file(main))):
            return main.__dict__
    elif not module.startswith("<"):
        found = sys.modules.get(module)
        if found is None:
            try:  # as pickle's by-name references do
                found = importlib.import_module(module)
            except Exception:  # noqa: BLE001 - not here (a Dask worker without it): a namespace of its own
                found = None
        if found is not None and getattr(found, "__dict__", None) is not None:
            return found.__dict__
    with _namespace_lock:
        namespace = _private.get((module, lineage))
        if namespace is None:
            namespace = _private[(module, lineage)] = {"__name__": module, "__builtins__": builtins}
        return namespace


def _is_program_module(namespace: dict[str, Any]) -> bool:
    """Whether *namespace* is a module of this process (not one kept for a sender)."""
    module = sys.modules.get(namespace.get("__name__", ""))
    if module is not None and getattr(module, "__dict__", None) is namespace:
        return True
    main = sys.modules.get("__main__")
    return main is not None and main.__dict__ is namespace


class _NamespaceRef:
    """Pickles as the receiver's namespace for a module (see _namespace)."""

    __slots__ = ("file", "module")

    def __init__(self, module: str, file: str | None) -> None:
        self.module = module
        self.file = file

    def __reduce__(self) -> Any:
        return _namespace, (self.module, LINEAGE, self.file)


def _make_function(code: Any, namespace: Any, name: Any, argdefs: Any, closure: Any) -> Any:
    namespace.setdefault("__builtins__", builtins)
    return types.FunctionType(code, namespace, name, argdefs, closure)


def _set_function_state(func: types.FunctionType, state: Any) -> None:
    """cloudpickle's _function_setstate, except for globals (see the module docstring)."""
    state, slotstate = state
    func.__dict__.update(state)
    sender, incoming = slotstate.pop("__globals__")
    closure = slotstate.pop("__closure__")
    slotstate.pop("_cloudpickle_submodules", None)
    namespace = func.__globals__
    with _namespace_lock:
        applied = _applied.setdefault(id(namespace), {})
        for name, (version, value) in incoming.items():
            seen = applied.get(name)
            if seen is not None and seen[0] == sender and seen[1] == version:
                continue  # unchanged by the sender: whatever is here now stays
            applied[name] = (sender, version)
            if seen is None and name in namespace:
                continue  # the receiver's own (its copy of the module, or set by its code)
            namespace[name] = value
    if closure is not None:
        for i, cell in enumerate(closure):
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            func.__closure__[i].cell_contents = value  # type: ignore[index]  # same length as closure
    for key, value in slotstate.items():
        setattr(func, key, value)


#: Classes a receiver already had, returned instead of a rebuilt copy: their
#: pickled state is not applied to them.
_adopted: weakref.WeakSet[type] = weakref.WeakSet()


def _make_class(namespace: dict[str, Any], qualname: str, make: Callable[..., type], args: tuple) -> type:
    """A class of the main module: the receiver's own when it runs the same
    program and has it, else cloudpickle's rebuilt (and tracked) one."""
    if _is_program_module(namespace):
        head, _, rest = qualname.partition(".")
        found = namespace.get(head)
        for part in rest.split(".") if rest else ():
            found = getattr(found, part, None)
        if isinstance(found, type) and found.__qualname__ == qualname:
            _adopted.add(found)
            return found
    return make(*args)


def _set_class_state(cls: type, state: Any) -> None:
    if cls in _adopted:
        return
    _cp._class_setstate(cls, state)


# -- the pickler ----------------------------------------------------------------------


def _refuse_open_file(obj: Any) -> None:
    name = getattr(obj, "name", None)
    raise TypeError(
        f"cannot pickle {type(obj).__name__!r} object (the open file {name!r}): an open file cannot be sent "
        "to another process; send its name (and open it there) or its contents"
    )


class Pickler(cloudpickle.Pickler):
    """cloudpickle with shoal's policy (see the module docstring); open text
    files are refused (cloudpickle would send a copy of their contents).
    *foreign*: the receiver runs another program (a Dask worker)."""

    dispatch_table = ChainMap({io.TextIOWrapper: _refuse_open_file}, *cloudpickle.Pickler.dispatch_table.maps)

    def __init__(
        self, file: Any, protocol: int = PROTOCOL, buffer_callback: Any = None, *, foreign: bool = False
    ) -> None:
        super().__init__(file, protocol=protocol, buffer_callback=buffer_callback)
        self.foreign = foreign

    def reducer_override(self, obj: Any) -> Any:
        if getattr(obj, "__module__", None) in MAIN_NAMES:
            if isinstance(obj, type):
                if _by_reference(obj, self.foreign):
                    return NotImplemented  # pickle's own save_global: by name
                make, args, state, *_ = _cp._dynamic_class_reduce(obj)
                ref = _NamespaceRef(obj.__module__, _main_file())
                return (_make_class, (ref, obj.__qualname__, make, args), state, None, None, _set_class_state)
            if type(obj) is types.FunctionType and _by_reference(obj, self.foreign):
                return NotImplemented
        return super().reducer_override(obj)

    def _dynamic_function_reduce(self, func: types.FunctionType) -> tuple:
        code, _globals, _, _, closure = self._function_getnewargs(func)
        state, slotstate = _cp._function_getstate(func)
        slotstate["__globals__"] = _versioned(func, slotstate["__globals__"])
        args = (code, _namespace_ref(func.__globals__), None, None, closure)
        return (_make_function, args, (state, slotstate), None, None, _set_function_state)


def _namespace_ref(namespace: dict[str, Any]) -> _NamespaceRef:
    """What names *namespace* (a function's globals) for a receiver: its
    module, or, for globals that are no module's, this very dict."""
    name = namespace.get("__name__")
    module = sys.modules.get(name) if isinstance(name, str) else None
    if module is not None and getattr(module, "__dict__", None) is namespace:
        assert isinstance(name, str)
        return _NamespaceRef(name, _main_file() if name in MAIN_NAMES else None)
    return _NamespaceRef(f"<globals {id(namespace):x}>", None)


def _main_file() -> str | None:
    info = _info()
    return info.file if info is not None else None


def function_bytes(fn: Any, *, foreign: bool = False) -> tuple[bytes, Callable[[], bool] | None]:
    """Pickle a function that receivers keep (a pool caches it by id).

    Returns the pickle and, when it travels by value, a check that says
    whether the pickle is still current (the globals it captured are still
    bound to the same objects); ``None`` when it travels by reference.
    As :func:`._pickling.pickle_code`: code of the main module that cannot
    travel by value (a global it uses cannot be pickled) goes by name to a
    receiver of this program.  Raises what the picklers raise.
    """
    by_name = None
    if type(fn) is types.FunctionType:
        try:
            by_name = pickle.dumps(fn, PROTOCOL)
        except Exception:  # noqa: BLE001 - not reachable by name (a lambda, a closure): by value
            pass
        if by_name is not None and (fn.__module__ not in MAIN_NAMES or _by_reference(fn, foreign)):
            return by_name, None
    try:
        with io.BytesIO() as out:
            Pickler(out, foreign=foreign).dump(fn)
            data = out.getvalue()
    except Exception:
        if by_name is None or foreign:
            raise
        return by_name, None  # as the standard library sends it
    if type(fn) is not types.FunctionType:
        return data, None
    namespace = fn.__globals__
    names = tuple(_cp._extract_code_globals(fn.__code__))
    captured = tuple(namespace.get(name, _MISSING) for name in names)

    def current() -> bool:
        return all(namespace.get(n, _MISSING) is v for n, v in zip(names, captured, strict=True))

    return data, current


_MISSING = object()


# -- starting processes -----------------------------------------------------------------

#: How many starting_process() blocks are open in this process.  Not per
#: thread: a Dask cluster shoal starts launches its processes from its own
#: event-loop thread while the caller waits.
_starting = 0
_starting_lock = threading.Lock()


@contextlib.contextmanager
def starting_process() -> Iterator[None]:
    """Around starting a process: a main module that is not a file (a
    program read from stdin) is not run again in a spawned or forkserver
    child (the standard library's child would try to run ``<stdin>`` as a
    path and exit with an error)."""
    global _starting
    _install_preparation_hook()
    with _starting_lock:
        _starting += 1
    try:
        yield
    finally:
        with _starting_lock:
            _starting -= 1


_hook_installed = False


def _install_preparation_hook() -> None:
    global _hook_installed
    if _hook_installed:
        return
    from multiprocessing import spawn

    original = spawn.get_preparation_data

    def get_preparation_data(name: str) -> dict[str, Any]:
        data = original(name)
        if _starting:
            path = data.get("init_main_from_path")
            if path is not None and not os.path.isfile(path):
                del data["init_main_from_path"]
        return data

    get_preparation_data.__wrapped__ = original  # type: ignore[attr-defined]
    spawn.get_preparation_data = get_preparation_data
    _hook_installed = True
