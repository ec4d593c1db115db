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
    ("shoal._asyncresult", "shoal._progress"),
    ("shoal._dask",),
    ("shoal._backends",),  # chooses an engine: the local one, or Dask's (shoal._dask)
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
