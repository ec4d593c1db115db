"""Progress bars for map/imap (``progress=True``), drawn by tqdm on stderr."""

from __future__ import annotations

from typing import Any


def progress_bar(progress: Any, iterable: Any) -> Any:
    """A tqdm bar for *iterable*'s items, or None when *progress* is false.

    *progress* may be True, or a dict of keyword arguments for tqdm
    (``{"desc": "resizing", "unit": "img"}``).
    """
    if not progress:
        return None
    from tqdm import tqdm

    total = None
    try:
        total = len(iterable)
    except TypeError:
        pass
    options = {"total": total, "unit": "task", "dynamic_ncols": True}
    if isinstance(progress, dict):
        options.update(progress)
    return tqdm(**options)
