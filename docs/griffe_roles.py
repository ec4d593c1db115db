"""A griffe extension for the API reference: shoal's docstrings use Sphinx
roles (``:class:`~shoal.WorkerDiedError```), which Markdown would show
verbatim.  A role naming an object the reference documents (a ``::: name``
line of docs/reference.md) becomes a cross-reference link; any other becomes
inline code.  A paragraph ending in rST's literal-block marker ``::`` loses
one colon (the indented block after it is already code in Markdown); a
paragraph that is only ``::`` goes.

Two names need help from the extension because griffe reads the source
without running it.  ``shoal.SharedArray`` and ``shoal.share`` are loaded on
first use by the package's ``__getattr__`` (numpy is optional), so they are
added to ``shoal`` as aliases; and their module defines them twice (with
numpy, and a stub without it), so the first, real definitions are kept.
A role naming ``shoal.exceptions.X`` links to ``shoal.X``, where the
reference documents it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import griffe

REFERENCE = Path(__file__).resolve().parent / "reference.md"
ROLE = re.compile(r":(?:class|func|meth|attr|exc|mod|data|obj):`(~?)([\w.]+)`")
LITERAL_BLOCK = re.compile(r"(\S)::\n\n")
BARE_LITERAL_BLOCK = re.compile(r"(^|\n\n)::\n\n")


# Defined in an `if numpy:` block, then as stubs in its `else:`.
LAZY = {"SharedArray": "shoal._shm._array.SharedArray", "share": "shoal._shm._array.share"}


def _documented() -> set[str]:
    return set(re.findall(r"^::: ([\w.]+)", REFERENCE.read_text(encoding="utf-8"), re.M))


class SphinxRoles(griffe.Extension):
    def __init__(self) -> None:
        self.documented = _documented()
        self.first: dict[str, griffe.Object] = {}

    def _replace(self, match: re.Match) -> str:
        short, path = match.group(1), match.group(2)
        shown = path.rsplit(".", 1)[-1] if short else path
        if path.startswith("shoal.exceptions.") and "shoal." + path.rsplit(".", 1)[-1] in self.documented:
            path = "shoal." + path.rsplit(".", 1)[-1]
        if path in self.documented:
            return f"[`{shown}`][{path}]"
        return f"`{shown}`"

    def on_instance(self, *, node: Any, obj: griffe.Object, agent: Any, **kwargs: Any) -> None:
        if obj.path in LAZY.values():
            self.first.setdefault(obj.path, obj)
        if obj.docstring is not None:
            text = ROLE.sub(self._replace, obj.docstring.value)
            text = BARE_LITERAL_BLOCK.sub(r"\1", text)
            obj.docstring.value = LITERAL_BLOCK.sub(r"\1:\n\n", text)

    def on_module_members(self, *, node: Any, mod: griffe.Module, agent: Any, **kwargs: Any) -> None:
        for name, path in LAZY.items():
            if mod.path == path.rsplit(".", 1)[0] and path in self.first:
                mod.set_member(name, self.first[path])
            elif mod.path == "shoal":
                mod.set_member(name, griffe.Alias(name, path, parent=mod))
