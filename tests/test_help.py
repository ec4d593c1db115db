"""What help() shows for shoal's public names: documentation of what exists."""

from __future__ import annotations

import pydoc
import re

import pytest

import shoal

OWN = [name for name in shoal.__all__ if getattr(getattr(shoal, name), "__module__", "").startswith("shoal")]


def _help(obj) -> str:
    return pydoc.render_doc(obj, renderer=pydoc.plaintext)


@pytest.mark.parametrize("name", [*OWN, "exceptions"])
def test_help_shows_no_internal_comment_and_nothing_that_does_not_exist(name):
    text = _help(getattr(shoal, name))
    # pydoc shows the comment above a method without a docstring.
    assert not re.search(r"^[ |]*#", text, re.M), text
    for missing in ("Actor", "SharedArray"):
        if not hasattr(shoal, missing):
            assert missing not in text


def test_help_of_the_package_promises_nothing_missing():
    text = _help(shoal)
    # Every shoal.NAME the package's help mentions exists.
    for name in set(re.findall(r"\bshoal\.([A-Za-z_]\w*)", text)):
        assert hasattr(shoal, name) or name in {"exceptions", "managers", "joblib"}, name
    for missing in ("Actor", "SharedArray"):
        if not hasattr(shoal, missing):
            assert missing not in text


def test_pool_help_documents_progress_and_leaving_a_with_block():
    text = _help(shoal.Pool)
    assert "progress=" in text and "tqdm" in text
    assert "with Pool(...) as pool:" in text and "terminate" in text
    assert "__annotations__" not in text  # no internal attribute annotations
