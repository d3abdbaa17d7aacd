"""Eager argument checks shared by the modules: errors name the argument and its range."""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any

__all__ = [
    "as_key",
    "check_hyperparameter",
    "check_index",
    "check_int",
    "check_min_int",
    "check_optional",
    "check_real",
    "check_seed",
]


def check_int(name: str, value: Any, *, low: int = 0, high: int | None = None) -> int:
    """``value`` as an int in ``[low, high]`` (integral floats accepted, bools rejected)."""
    if isinstance(value, bool):
        raise TypeError(f"`{name}` must be an integer, got {value!r}.")
    if not isinstance(value, numbers.Integral):
        if isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer():
            value = int(value)
        else:
            raise TypeError(
                _static_hint(name, value) or f"`{name}` must be an integer, got {value!r}."
            )
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


def check_seed(name: str, seed: Any) -> Any:
    """``seed`` checked against the one seed rule: an int or a single PRNG key.

    Accepted: a Python or NumPy integer, an integer scalar array (traced values allowed, e.g.
    under ``jax.vmap``), one typed key (``jax.random.key(0)``) or one raw ``uint32`` key
    (``jax.random.PRNGKey(0)``). Rejected with an error naming ``name``: bools, floats,
    strings, float arrays and batches of keys (map over those with ``jax.vmap`` instead).
    No device work: safe to call before the backend starts.

    Returns:
      ``seed`` as a Python int, or the integer array or key unchanged.
    """
    import jax
    import numpy as np

    rule = "an int or a single PRNG key (e.g. 0 or jax.random.key(0))"
    if isinstance(seed, bool) or isinstance(seed, (str, bytes)):
        raise TypeError(f"`{name}` must be {rule}, got {seed!r}.")
    if isinstance(seed, numbers.Integral):
        seed = int(seed)
        if not -(2**63) <= seed < 2**64:
            raise ValueError(f"`{name}` must fit in 64 bits, got {seed}.")
        return seed
    dtype = getattr(seed, "dtype", None)
    if dtype is None:
        raise TypeError(f"`{name}` must be {rule}, got {type(seed).__name__} {seed!r}.")
    shape = tuple(np.shape(seed))
    batch = (
        "a batch of keys of shape {shape}: map over them with "
        "jax.vmap(lambda k: ...)(keys) and pass one key per run"
    )
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        if shape:
            raise ValueError(f"`{name}` must be {rule}, got " + batch.format(shape=shape) + ".")
        return seed
    if np.dtype(dtype) == np.uint32 and len(shape) >= 1:
        raw_shape = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).shape
        if shape == raw_shape:
            return seed
        if shape[1:] == raw_shape:
            raise ValueError(f"`{name}` must be {rule}, got " + batch.format(shape=shape) + ".")
    if np.issubdtype(np.dtype(dtype), np.integer) and not shape:
        return seed
    raise TypeError(f"`{name}` must be {rule}, got an array of dtype {dtype} and shape {shape}.")


def as_key(name: str, seed: Any) -> Any:
    """The PRNG key of ``seed`` under the one seed rule (see :func:`check_seed`).

    Integers become ``jax.random.key(seed)``; keys pass through unchanged.
    """
    import jax
    import numpy as np

    seed = check_seed(name, seed)
    if isinstance(seed, int) or (
        not jax.dtypes.issubdtype(seed.dtype, jax.dtypes.prng_key)
        and np.issubdtype(np.dtype(seed.dtype), np.integer)
        and not np.shape(seed)
    ):
        return jax.random.key(seed)
    return seed


def _static_hint(name: str, value: Any) -> str | None:
    """The message for a JAX array where a static Python number is needed, else ``None``."""
    import jax

    if not isinstance(value, jax.Array):
        return None
    return (
        f"`{name}` must be a static Python integer, got a JAX array ({value.dtype}"
        f"{list(value.shape)}). It is fixed before tracing (it sizes a buffer or a table): "
        "under optax.inject_hyperparams declare the factory argument that sets it static, "
        'e.g. optax.inject_hyperparams(make, static_args=("max_delay",)).'
    )


def check_hyperparameter(name: str, value: Any, **kwargs: Any) -> Any:
    """:func:`check_real` for a hyperparameter that may be a JAX array.

    Under ``optax.inject_hyperparams`` numeric hyperparameters arrive as arrays (traced inside
    ``update``): a traced value passes unchecked (its value is unknown), a concrete scalar
    array is checked by value, and either is returned unchanged so the arithmetic stays in
    JAX. Python numbers go through :func:`check_real` (``kwargs`` as there).
    """
    import jax
    import numpy as np

    if not isinstance(value, jax.Array):
        return check_real(name, value, **kwargs)
    if isinstance(value, jax.core.Tracer):
        return value
    if np.shape(value) or not np.issubdtype(np.dtype(value.dtype), np.number):
        raise TypeError(f"`{name}` must be a real scalar, got an array {value!r}.")
    check_real(name, float(value), **kwargs)
    return value
