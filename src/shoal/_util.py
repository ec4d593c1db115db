"""Small helpers every layer may use: argument checks and the public path.

The bottom layer (it imports nothing of shoal), so that a face, the engine
and a shared structure check ``timeout=`` or an int argument with the same
words, and every public object says where users import it from.
"""

from __future__ import annotations

from typing import Any, TypeVar

T = TypeVar("T")


def public(obj: T, module: str = "shoal") -> T:
    """Set *obj*'s ``__module__`` to its public path (``shoal``), as trio
    does: ``repr``, pickles by reference and the API reference then name
    ``shoal.Pool``, not the private module that defines it.  Returns *obj*,
    so it also works as a class decorator."""
    obj.__module__ = module
    return obj


def check_timeout(value: Any) -> None:
    """TypeError unless *value* is a number of seconds or None; ValueError
    unless it is positive."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"a timeout must be a number of seconds or None, got {type(value).__name__} {value!r:.40}"
        )
    if value <= 0:
        raise ValueError(f"a task timeout must be a positive number of seconds or None, got {value!r}")


def check_int(name: str, value: Any, what: str = "an int") -> None:
    """TypeError naming *name* unless *value* is an int (bool is not)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__} {value!r:.40}")


__all__ = ("check_int", "check_timeout", "public")
