"""The public namespace: every name exported once, under its public path, documented.

As trio's test_exports: a name users import from ``shoal`` says ``shoal``
in its ``__module__`` (so reprs, pickles by reference and the API reference
name ``shoal.Pool``, not the private module that defines it), appears once
in ``shoal.__all__``, and has an entry in the API reference
(``docs/reference.md``).  Names the standard library already gets right are
re-exported as they are and documented by the standard library.
"""

from __future__ import annotations

import multiprocessing
import re
import types
from pathlib import Path

import pytest

import shoal

REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "reference.md"

#: The standard library's own objects, re-exported (``import shoal as multiprocessing``).
STDLIB = {name for name in shoal.__all__ if getattr(multiprocessing, name, None) is getattr(shoal, name)}
#: shoal's own names.
OWN = sorted(set(shoal.__all__) - STDLIB)


def test_every_name_is_exported_once():
    assert len(shoal.__all__) == len(set(shoal.__all__))
    for name in shoal.__all__:
        assert hasattr(shoal, name), name
    # No object under two public names (an alias is a second name to learn).
    own = {}
    for name in OWN:
        obj = getattr(shoal, name)
        assert id(obj) not in own, f"{name} is {own.get(id(obj))} again"
        own[id(obj)] = name


@pytest.mark.parametrize("name", OWN)
def test_a_public_name_says_shoal_in_its_module(name):
    obj = getattr(shoal, name)
    if isinstance(obj, types.ModuleType):
        assert obj.__name__ == f"shoal.{name}"
        return
    # The exception tree is also importable as shoal.exceptions, its
    # documented home (docs/reference.md, and tracebacks users already read).
    expected = "shoal.exceptions" if isinstance(obj, type) and issubclass(obj, BaseException) else "shoal"
    assert obj.__module__ == expected, f"shoal.{name}.__module__ is {obj.__module__!r}"


def test_every_public_name_is_in_the_api_reference():
    text = REFERENCE.read_text(encoding="utf-8")
    documented = set(re.findall(r"^::: shoal\.(\w+)", text, re.M))
    missing = [name for name in OWN if name not in documented]
    assert not missing, f"not in docs/reference.md: {missing}"
    # The standard library's names are listed, in backticks, where the page says so.
    stdlib_part = text[text.index("## Re-exported from the standard library") :]
    listed = set(re.findall(r"`(\w+)`", stdlib_part))
    assert sorted(STDLIB - listed) == []
