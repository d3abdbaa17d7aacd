"""Delay models: pure, key-driven sources of the staleness τ_t.

A delay model is a small frozen object with

* ``init(key) -> state``: a pytree of arrays (NamedTuple), derived only from ``key``;
* ``next(state) -> (tau, state)``: the next staleness (an ``int32`` scalar in
  ``[0, max_delay]``) and the advanced state;
* ``max_delay``: a static Python ``int`` bounding every τ the model can emit. It sizes the
  parameter-history buffer of :func:`asgd_jax.stale`, so it must be known before tracing.

Models also carry ``pmf`` (the stationary law of τ on ``{0, …, max_delay}`` as a NumPy array,
when it is known in closed form) and ``mean``, which the theory module consumes.

Randomness. Every draw is a pure function of the key: ``init`` turns the key into two
``uint32`` words with one ``jax.random.bits`` call, and τ_t is read off a counter-based
integer hash of (those words, t). This keeps the per-step cost to a handful of integer ops
(a threefry draw per step would cost ~25 % of a small model's step on CPU), works the same
under ``jit``, ``vmap``, ``pmap`` and ``shard_map`` on every backend, and makes runs exactly
reproducible: same key ⇒ same τ sequence, bit for bit.
"""

from __future__ import annotations

import numbers
from typing import Any

import chex
import jax

from asgd_jax._counter_rng import key_words, uniform01

# The checks are re-exported: workers and parallel import them from here.
from asgd_jax._validation import check_int as _check_int
from asgd_jax._validation import check_real as _check_real  # noqa: F401
from asgd_jax.delays._laws import (
    categorical,
    constant,
    geometric,
    poisson,
    round_robin,
    table_thresholds,
    threshold_model,
    uniform,
)
from asgd_jax.delays._model import (
    MAX_DELAY,
    CounterState,
    DelayModel,
    DelayState,
    TraceState,
    _check_max_delay,  # noqa: F401
)
from asgd_jax.delays._trace import trace

__all__ = [
    "MAX_DELAY",
    "DelayModel",
    "DelayState",
    "CounterState",
    "TraceState",
    "constant",
    "uniform",
    "geometric",
    "poisson",
    "categorical",
    "round_robin",
    "threshold_model",
    "table_thresholds",
    "trace",
    "sample",
    "as_delay_model",
    "uniform01",
    "key_words",
]


def as_delay_model(delay: Any) -> DelayModel:
    """Coerces ``delay`` to a :class:`DelayModel` (an int means :func:`constant`)."""
    if isinstance(delay, DelayModel):
        return delay
    if isinstance(delay, numbers.Integral) and not isinstance(delay, bool):
        return constant(int(delay))
    required = ("init", "next", "max_delay")
    if all(hasattr(delay, a) for a in required):
        _check_int("delay.max_delay", delay.max_delay)
        return delay
    raise TypeError(
        "`delay` must be a delay model (with init, next and a static int max_delay, e.g. "
        f"asgd_jax.delays.uniform(0, 8)) or a non-negative int, got {delay!r}."
    )


def sample(model: DelayModel, key: chex.PRNGKey, num: int) -> jax.Array:
    """The first ``num`` delays of ``model`` started from ``key`` (one ``lax.scan``)."""
    num = _check_int("num", num, low=1)

    def body(state, _):
        tau, state = model.next(state)
        return state, tau

    _, taus = jax.lax.scan(body, model.init(key), None, length=num)
    return taus
