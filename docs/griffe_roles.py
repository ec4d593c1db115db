"""A griffe extension for the API reference: shoal's docstrings use Sphinx
roles (``:class:`~shoal.WorkerDiedError```), which Markdown would show
verbatim.  A role naming an object the reference documents (a ``::: name``
line of docs/reference.md) becomes a cross-reference link; any other becomes
inline code.  A paragraph ending in rST's literal-block marker ``::`` loses
one colon (the indented block after it is already code in Markdown)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import griffe

REFERENCE = Path(__file__).resolve().parent / "reference.md"
ROLE = re.compile(r":(?:class|func|meth|attr|exc|mod|data|obj):`(~?)([\w.]+)`")
LITERAL_BLOCK = re.compile(r"(\S)::\n\n")


def _documented() -> set[str]:
    return set(re.findall(r"^::: ([\w.]+)", REFERENCE.read_text(encoding="utf-8"), re.M))


class SphinxRoles(griffe.Extension):
    def __init__(self) -> None:
        self.documented = _documented()

    def _replace(self, match: re.Match) -> str:
        short, path = match.group(1), match.group(2)
        shown = path.rsplit(".", 1)[-1] if short else path
        if path in self.documented:
            return f"[`{shown}`][{path}]"
        return f"`{shown}`"

    def on_instance(self, *, node: Any, obj: griffe.Object, agent: Any, **kwargs: Any) -> None:
        if obj.docstring is not None:
            text = ROLE.sub(self._replace, obj.docstring.value)
            obj.docstring.value = LITERAL_BLOCK.sub(r"\1:\n\n", text)
