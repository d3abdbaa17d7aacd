"""Eager argument checks shared by the modules: errors name the argument and its range."""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any

__all__ = ["check_index", "check_int", "check_min_int", "check_optional", "check_real"]


def check_int(name: str, value: Any, *, low: int = 0, high: int | None = None) -> int:
    """``value`` as an int in ``[low, high]`` (integral floats accepted, bools rejected)."""
    if isinstance(value, bool):
        raise TypeError(f"`{name}` must be an integer, got {value!r}.")
    if not isinstance(value, numbers.Integral):
        if isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer():
            value = int(value)
        else:
            raise TypeError(f"`{name}` must be an integer, got {value!r}.")
    value = int(value)
    if value < low or (high is not None and value > high):
        hi = "∞" if high is None else str(high)
        raise ValueError(f"`{name}` must be in [{low}, {hi}], got {value}.")
    return value


def check_real(
    name: str,
    value: Any,
    *,
    low: float = 0.0,
    strict: bool = False,
    high: float | None = None,
    unit: str = "",
) -> float:
    """``value`` as a finite float ≥ ``low`` (``> low`` when ``strict``), ≤ ``high`` if given.

    ``unit`` (e.g. ``"seconds"``) is named in the messages.
    """
    what = f"a real number of {unit}" if unit else "a real number"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be {what}, got {value!r}.")
    value = float(value)
    bad = (value <= low) if strict else (value < low)
    if high is not None and value > high:
        bad = True
    if not math.isfinite(value) or bad:
        op = ">" if strict else "≥"
        top = "" if high is None else f" and ≤ {high}"
        suffix = f" {unit}" if unit else ""
        raise ValueError(f"`{name}` must be finite and {op} {low}{top}{suffix}, got {value}.")
    return value


def check_index(name: str, value: Any, low: int, high: int) -> int:
    """``value`` as a Python int in ``[low, high)`` (Python/NumPy integers only)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if not low <= value < high:
        raise ValueError(f"{name} must be in [{low}, {high}), got {value}")
    return value


def check_optional(check: Any, name: str, value: Any, *args: Any, **kwargs: Any) -> Any:
    """``None`` passes through; anything else goes through ``check(name, value, ...)``."""
    return None if value is None else check(name, value, *args, **kwargs)


def check_min_int(name: str, value: Any, low: int) -> int:
    """``value`` as an int ≥ ``low``: Python or NumPy integers only (no bools, no floats)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value
