"""The architecture holds by itself: lower layers never import higher ones.

shoal is built in layers (docs/architecture.md draws them).  A module may
import from its own package and from layers below its own; across packages
it uses only what the other package's ``__init__`` exports (no private
submodule, no underscore name).  This test reads every module's imports
(top-level and inside functions) with ``ast``, so it fails the moment a
change breaks the order, not when someone notices a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import shoal

SRC = Path(shoal.__file__).parent

# Lowest first.  A module's layer is that of the longest prefix listed here.
# Modules on the same line are siblings: neither may import the other.
LAYERS: list[tuple[str, ...]] = [
    ("shoal._util",),  # argument checks and public(): plain helpers every layer uses
    ("shoal.exceptions", "shoal._native"),
    ("shoal._fd",),
    ("shoal._serialization",),
    ("shoal._ipc", "shoal._shm"),
    ("shoal._engine",),
    ("shoal._asyncresult", "shoal._future", "shoal._progress"),
    ("shoal._backends",),  # chooses an engine: the local one, or Dask's (shoal._backends._dask)
    ("shoal._pool", "shoal._executor", "shoal._manager", "shoal._actor"),
    ("shoal._context", "shoal.joblib", "shoal.managers"),
    ("shoal",),  # the public namespace
    ("shoal.benchmarks",),  # consumers of the public namespace
    ("shoal._cli",),
    ("shoal.__main__",),
]


def _layer_of(module: str) -> tuple[int, str]:
    best = (-1, "")
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > len(best[1]):
                best = (i, name)
    return best


def _modules() -> dict[str, Path]:
    found = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    found["shoal._native"] = SRC / "_native.pyi"  # the C extension, typed by its stub
    return found


def _imports(module: str, path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, absolute module imported, names imported from it) for each import."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((node.lineno, target, [alias.name for alias in node.names]))
    return out


def _package_of(module: str) -> str:
    """The layer entry a module belongs to (its 'room')."""
    return _layer_of(module)[1]


def _violations() -> list[str]:
    modules = _modules()
    problems = []
    for module, path in sorted(modules.items()):
        layer, room = _layer_of(module)
        if layer < 0:
            problems.append(f"{module} is in no layer: add it to LAYERS in tests/test_layers.py")
            continue
        for line, target, names in _imports(module, path):
            if not (target == "shoal" or target.startswith("shoal.")):
                continue
            # `from shoal import _native` names a module: judge that module.
            targets = [target]
            if names and f"{target}.{names[0]}" in modules:
                targets = [f"{target}.{n}" for n in names]
                names = []
            for tgt in targets:
                tlayer, troom = _layer_of(tgt)
                where = f"{path.relative_to(SRC.parent)}:{line}"
                if troom == room:
                    continue  # inside its own package or module
                if module == "shoal":
                    continue  # the public namespace re-exports from everywhere
                if tlayer > layer:
                    problems.append(
                        f"{where}: {module} (layer {layer}) imports higher {tgt} (layer {tlayer})"
                    )
                elif tlayer == layer:
                    problems.append(
                        f"{where}: {module} imports its sibling {tgt}; move what both need down a layer"
                    )
                private_module = any(p.startswith("_") for p in tgt[len(troom) :].split(".") if p)
                if private_module:
                    problems.append(
                        f"{where}: {module} imports the private module {tgt}; import it from {troom}"
                    )
                for n in names:
                    if n.startswith("_") and n != "__version__":
                        problems.append(f"{where}: {module} imports the private name {n} from {tgt}")
    return problems


def test_every_module_imports_only_lower_layers_through_their_public_names():
    problems = _violations()
    assert not problems, "layer violations:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    "module, target, allowed",
    [
        ("shoal._ipc._queue", "shoal._engine", False),
        ("shoal._engine._engine", "shoal._ipc", True),
        ("shoal._shm._dict", "shoal._ipc", False),
        ("shoal._pool", "shoal._engine", True),
    ],
)
def test_the_layer_order_is_the_documented_one(module, target, allowed):
    # What the contract means, spelled out for a reader of this file.
    assert (_layer_of(target)[0] < _layer_of(module)[0]) is allowed


# -- one object per concept ----------------------------------------------------
#
# Three rules the layer order alone does not hold: each engine is built by
# the engine contract's __init__ (an engine that skips it inherits methods
# that read attributes it never set); only shoal._fd builds or reads the
# control messages descriptors travel in; only shoal._serialization imports
# cloudpickle (its policy refuses what must not be pickled by value).


def _engine_subclasses_skipping_init(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, class) of each class deriving from an ``Engine`` whose
    ``__init__`` never calls ``super().__init__``."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ClassDef):
            continue
        bases = [b.attr if isinstance(b, ast.Attribute) else getattr(b, "id", "") for b in node.bases]
        if not any(b == "Engine" or b.endswith("Engine") for b in bases):
            continue
        init = next(
            (n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"),
            None,
        )
        if init is None:
            continue  # inherits the contract's own
        calls_super = any(
            isinstance(n, ast.Call)
            and isinstance(n.func, ast.Attribute)
            and n.func.attr == "__init__"
            and isinstance(n.func.value, ast.Call)
            and getattr(n.func.value.func, "id", "") == "super"
            for n in ast.walk(init)
        )
        if not calls_super:
            found.append((node.lineno, node.name))
    return found


def _names_scm_rights(tree: ast.AST) -> list[int]:
    def names_it(node: ast.AST) -> bool:
        if isinstance(node, ast.Attribute):
            return node.attr == "SCM_RIGHTS"
        if isinstance(node, ast.Name):
            return node.id == "SCM_RIGHTS"
        if isinstance(node, ast.ImportFrom):
            return any(a.name == "SCM_RIGHTS" for a in node.names)
        return False

    return [node.lineno for node in ast.walk(tree) if names_it(node)]


def _imports_cloudpickle(tree: ast.AST) -> list[int]:
    def imports_it(node: ast.AST) -> bool:
        if isinstance(node, ast.Import):
            return any(a.name.split(".")[0] == "cloudpickle" for a in node.names)
        if isinstance(node, ast.ImportFrom):
            return (node.module or "").split(".")[0] == "cloudpickle"
        return False

    return [node.lineno for node in ast.walk(tree) if imports_it(node)]


def _concept_violations() -> list[str]:
    problems = []
    for module, path in sorted(_modules().items()):
        if path.suffix != ".py":
            continue
        tree = ast.parse(path.read_text(), str(path))
        where = path.relative_to(SRC.parent)
        for line, cls in _engine_subclasses_skipping_init(tree):
            problems.append(f"{where}:{line}: {cls}.__init__ does not call super().__init__()")
        if not (module == "shoal._fd" or module.startswith("shoal._fd.")):
            for line in _names_scm_rights(tree):
                problems.append(f"{where}:{line}: SCM_RIGHTS outside shoal._fd (use its fds_ancillary)")
        if not (module == "shoal._serialization" or module.startswith("shoal._serialization.")):
            for line in _imports_cloudpickle(tree):
                problems.append(f"{where}:{line}: cloudpickle imported outside shoal._serialization")
    return problems


def test_one_engine_contract_one_descriptor_path_one_pickler():
    problems = _concept_violations()
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "source, check",
    [
        (
            "class DaskEngine(Engine):\n    def __init__(self):\n        self.x = 1\n",
            _engine_subclasses_skipping_init,
        ),
        ("import socket\nanc = [(1, socket.SCM_RIGHTS, b'')]\n", _names_scm_rights),
        ("from socket import SCM_RIGHTS\n", _names_scm_rights),
        ("import cloudpickle\n", _imports_cloudpickle),
        ("from cloudpickle import cloudpickle as cp\n", _imports_cloudpickle),
    ],
)
def test_each_rule_catches_what_it_forbids(source, check):
    assert check(ast.parse(source))


def test_an_engine_that_calls_the_contracts_init_passes():
    source = "class LocalEngine(Engine):\n    def __init__(self):\n        super().__init__(1)\n"
    assert _engine_subclasses_skipping_init(ast.parse(source)) == []


#: Longest a module may grow before it is split along its sections (a
#: reader holds one in mind; see docs/architecture.md).
MAX_PY_LINES = 900
MAX_C_LINES = 1_200


def test_no_module_is_too_long_to_read():
    src = Path(__file__).resolve().parents[1] / "src"  # the checkout's, not the installed copy
    files = [(p, MAX_PY_LINES) for p in (src / "shoal").rglob("*.py")]
    files += [(p, MAX_C_LINES) for p in (src / "native").glob("*.[ch]")]
    assert len(files) > 40, f"the sources were not found in {src}"
    too_long = {
        str(p.relative_to(src)): n for p, limit in files if (n := len(p.read_text().splitlines())) > limit
    }
    limits = f"at most {MAX_PY_LINES} lines, C {MAX_C_LINES}"
    assert not too_long, f"split these along their sections ({limits}): {too_long}"


def test_every_package_of_the_source_is_in_the_distribution():
    # pyproject.toml lists the packages by name; shoal._actor (a module made a
    # package) was left out, so `pip install .` installed a shoal whose
    # `import shoal` failed while the editable install of every developer
    # worked.
    import tomllib

    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    src = root / "src"
    on_disk = {".".join(init.parent.relative_to(src).parts) for init in (src / "shoal").rglob("__init__.py")}
    assert on_disk, f"no packages found under {src}"
    missing = sorted(on_disk - listed)
    assert not missing, f"add these to [tool.setuptools] packages in pyproject.toml: {missing}"
