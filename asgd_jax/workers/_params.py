"""Law and server parameters (checked when concrete, kept when JAX tracers), and the laws'
uniform draw."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from asgd_jax import delays
from asgd_jax._validation import check_real

if TYPE_CHECKING:
    from asgd_jax.workers._laws import ComputeTime


def _open_uniform(seed: jax.Array, counter: jax.Array, stream: int) -> jax.Array:
    """A float32 uniform strictly inside (0, 1) whose complement 1 − u is also exact.

    ``(2m + 1)·2⁻²⁴`` with m a 23-bit hash: both u and 1 − u are representable, so no
    quantile function is ever evaluated at 0 or 1 (the largest draw is the 1 − 2⁻²⁴ quantile).
    """
    u = delays.uniform01(seed, counter, stream)
    return jnp.floor(u * jnp.float32(2.0**23)) * jnp.float32(2.0**-23) + jnp.float32(2.0**-24)


def is_traced(value: Any) -> bool:
    """Whether ``value`` is a JAX tracer (a parameter given inside ``jit`` / ``vmap``)."""
    return isinstance(value, jax.core.Tracer)


def real_param(name: str, value: Any, **bounds: Any) -> Any:
    """A law or server parameter: checked like ``check_real`` when concrete, kept if traced.

    A tracer (e.g. a learning-rate-style sweep value under ``jax.vmap``) cannot be checked
    before tracing, so only its shape and dtype are: it must be a real scalar. A concrete
    0-d JAX or NumPy array is read as the Python number it holds and checked.
    """
    if is_traced(value):
        if jnp.ndim(value) != 0 or not jnp.issubdtype(jnp.result_type(value), jnp.number):
            raise TypeError(f"`{name}` must be a real scalar, got a traced {value.aval}.")
        if jnp.issubdtype(jnp.result_type(value), jnp.complexfloating):
            raise TypeError(f"`{name}` must be real, got a traced {value.aval}.")
        return value
    if isinstance(value, (jax.Array, np.ndarray)) and np.ndim(value) == 0:
        value = value.item()
    return check_real(name, value, **bounds)


def _format(value: Any) -> str:
    return "traced" if is_traced(value) else f"{value:g}"


def _requires_concrete(law: ComputeTime, what: str) -> None:
    if law.traced:
        raise TypeError(
            f"{what} of {law.name} needs concrete parameters, but they are JAX tracers (the "
            "law was built inside jit/vmap). Build it from Python numbers for NumPy-side "
            "quantities; sampling (`sample`, `draw`) works with traced parameters."
        )
