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

import dataclasses
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from asgd_jax._counter_rng import key_words, uniform01
from asgd_jax._validation import check_int as _check_int
from asgd_jax._validation import check_real as _check_real

__all__ = [
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
    "trace",
    "sample",
    "as_delay_model",
    "uniform01",
    "key_words",
]


# --------------------------------------------------------------------------------------------
# The protocol.


@dataclasses.dataclass(frozen=True, eq=False)
class DelayModel:
    """A pure delay model: ``init(key) -> state``, ``next(state) -> (tau, state)``.

    Attributes:
      init: maps a PRNG key (typed or raw ``uint32``) to the model's state.
      next: maps a state to ``(tau, new_state)``; ``tau`` is an ``int32`` scalar.
      max_delay: static upper bound on every ``tau`` the model emits.
      name: a short description, used in ``repr`` and reports.
      pmf: the stationary distribution of τ on ``{0, …, max_delay}`` when known, else ``None``.
    """

    init: Callable[[chex.PRNGKey], Any]
    next: Callable[[Any], tuple[jax.Array, Any]]
    max_delay: int
    name: str = "delay"
    pmf: np.ndarray | None = None

    @property
    def mean(self) -> float | None:
        """Mean of the stationary law of τ, or ``None`` when it is not known in closed form."""
        if self.pmf is None:
            return None
        return float(np.dot(np.arange(self.pmf.size), self.pmf))

    def report(self, state: Any) -> dict[str, jax.Array]:
        """The model's own clock and counters read off ``state`` (traceable; ``{}`` here).

        Models that simulate time override it: the worker simulation reports ``time``,
        ``worker``, ``worker_step``, ``dropped`` and ``clipped``, so training code reads
        them without knowing the model's state layout.
        """
        del state
        return {}

    def __repr__(self) -> str:
        return f"DelayModel({self.name}, max_delay={self.max_delay})"


class CounterState(NamedTuple):
    """State of a deterministic delay model: the number of delays drawn so far."""

    count: jax.Array


class DelayState(NamedTuple):
    """State of a random delay model: two uint32 seed words and the draw counter."""

    seed: jax.Array
    count: jax.Array


class TraceState(NamedTuple):
    """State of a trace replay: the position in the trace and how often it wrapped/held."""

    count: jax.Array
    exhausted: jax.Array


# --------------------------------------------------------------------------------------------
# Validation helpers live in asgd_jax._validation (shared with workers and theory).


# --------------------------------------------------------------------------------------------
# Models drawn by inverse CDF from a table on {0, …, max_delay}.


def _table_model(pmf: np.ndarray, name: str) -> DelayModel:
    """A model that draws τ i.i.d. from ``pmf`` by inverse CDF of a hashed uniform."""
    pmf = np.asarray(pmf, dtype=np.float64)
    pmf = pmf / pmf.sum()
    max_delay = pmf.size - 1
    # Thresholds strictly inside (0, 1): τ = #{k < max_delay : cdf[k] <= u}.
    cdf = np.cumsum(pmf)[:-1].astype(np.float32)

    def init(key: chex.PRNGKey) -> DelayState:
        return DelayState(seed=key_words(key), count=jnp.zeros((), jnp.int32))

    def next_(state: DelayState) -> tuple[jax.Array, DelayState]:
        u = uniform01(state.seed, state.count)
        if max_delay == 0:
            tau = jnp.zeros((), jnp.int32)
        else:
            tau = jnp.sum(u >= jnp.asarray(cdf)).astype(jnp.int32)
        return tau, DelayState(state.seed, state.count + 1)

    return DelayModel(init=init, next=next_, max_delay=max_delay, name=name, pmf=pmf)


def constant(tau: int) -> DelayModel:
    """Every gradient has the same staleness ``tau``.

    Args:
      tau: the staleness, an integer ≥ 0. ``constant(0)`` is plain synchronous SGD.

    Returns:
      A :class:`DelayModel` with ``max_delay == tau``.
    """
    tau = _check_int("tau", tau)
    pmf = np.zeros(tau + 1)
    pmf[tau] = 1.0

    def init(key: chex.PRNGKey) -> CounterState:
        del key
        return CounterState(count=jnp.zeros((), jnp.int32))

    def next_(state: CounterState) -> tuple[jax.Array, CounterState]:
        return jnp.asarray(tau, jnp.int32), CounterState(state.count + 1)

    return DelayModel(init=init, next=next_, max_delay=tau, name=f"constant({tau})", pmf=pmf)


def uniform(low: int, high: int) -> DelayModel:
    """τ_t drawn i.i.d. uniformly from the integers ``{low, …, high}`` (both included).

    Args:
      low: smallest staleness, an integer ≥ 0.
      high: largest staleness, an integer ≥ ``low``; it is the model's ``max_delay``.
    """
    low = _check_int("low", low)
    high = _check_int("high", high)
    if low > high:
        raise ValueError(f"`low` must be ≤ `high`, got low={low}, high={high}.")
    pmf = np.zeros(high + 1)
    pmf[low:] = 1.0
    return _table_model(pmf, f"uniform({low}, {high})")


def geometric(mean: float, max_delay: int) -> DelayModel:
    """τ_t i.i.d. geometric on ``{0, 1, …}`` with the given mean, truncated at ``max_delay``.

    P(τ = k) ∝ (1 − p)^k p with p = 1 / (1 + mean), renormalised on ``{0, …, max_delay}``.
    This is the steady-state staleness of n always-busy workers with exponential compute
    times, mean = n − 1 (see :mod:`asgd_jax.workers`). Truncation lowers the mean slightly;
    ``model.mean`` gives the exact mean of the truncated law.

    Args:
      mean: mean of the untruncated law, ≥ 0.
      max_delay: truncation point, an integer ≥ ``mean``.
    """
    mean = _check_real("mean", mean)
    max_delay = _check_int("max_delay", max_delay)
    if max_delay < mean:
        raise ValueError(
            f"`max_delay` must be ≥ `mean` (the law would be truncated below its mean), "
            f"got max_delay={max_delay}, mean={mean}."
        )
    p = 1.0 / (1.0 + mean)
    pmf = p * (1.0 - p) ** np.arange(max_delay + 1)
    return _table_model(pmf, f"geometric(mean={mean:g}, max_delay={max_delay})")


def poisson(mean: float, max_delay: int) -> DelayModel:
    """τ_t i.i.d. Poisson(mean), truncated and renormalised on ``{0, …, max_delay}``.

    Args:
      mean: the Poisson rate, ≥ 0.
      max_delay: truncation point, an integer ≥ ``mean``.
    """
    mean = _check_real("mean", mean)
    max_delay = _check_int("max_delay", max_delay)
    if max_delay < mean:
        raise ValueError(f"`max_delay` must be ≥ `mean`, got max_delay={max_delay}, mean={mean}.")
    k = np.arange(max_delay + 1)
    if mean == 0:
        pmf = (k == 0).astype(np.float64)
    else:
        log_fact = np.array([math.lgamma(i + 1) for i in k])
        pmf = np.exp(k * math.log(mean) - mean - log_fact)
    return _table_model(pmf, f"poisson(mean={mean:g}, max_delay={max_delay})")


def categorical(pmf: Sequence[float] | np.ndarray, name: str = "categorical") -> DelayModel:
    """τ_t i.i.d. from an explicit distribution ``pmf`` on ``{0, …, len(pmf) − 1}``.

    Args:
      pmf: non-negative weights (normalised here); ``max_delay = len(pmf) − 1``.
    """
    pmf = np.asarray(pmf, dtype=np.float64)
    if pmf.ndim != 1 or pmf.size == 0:
        raise ValueError(f"`pmf` must be a non-empty 1-D sequence, got shape {pmf.shape}.")
    if not np.all(np.isfinite(pmf)) or np.any(pmf < 0) or pmf.sum() <= 0:
        raise ValueError("`pmf` must be finite, non-negative and not all zero.")
    return _table_model(pmf, name)


def round_robin(num_workers: int) -> DelayModel:
    """n equal-speed workers served in turn: τ_t = min(t, num_workers − 1).

    All workers start from W_0; worker ``t mod n`` pushes at step t a gradient taken n − 1
    updates ago once the pipeline is full. ``round_robin(1)`` is synchronous SGD.

    Args:
      num_workers: number of workers, an integer ≥ 1.
    """
    num_workers = _check_int("num_workers", num_workers, low=1)
    max_delay = num_workers - 1
    pmf = np.zeros(num_workers)
    pmf[-1] = 1.0

    def init(key: chex.PRNGKey) -> CounterState:
        del key
        return CounterState(count=jnp.zeros((), jnp.int32))

    def next_(state: CounterState) -> tuple[jax.Array, CounterState]:
        tau = jnp.minimum(state.count, max_delay).astype(jnp.int32)
        return tau, CounterState(jnp.minimum(state.count + 1, max_delay))

    return DelayModel(
        init=init, next=next_, max_delay=max_delay, name=f"round_robin({num_workers})", pmf=pmf
    )


_TRACE_MODES = ("wrap", "hold")


def _trace_array(taus: Any) -> np.ndarray:
    """Accept a sequence/array of ints, or any object with a ``staleness`` field/key."""
    if hasattr(taus, "staleness"):
        taus = taus.staleness
    elif isinstance(taus, dict) and "staleness" in taus:
        taus = taus["staleness"]
    arr = np.asarray(taus)
    if arr.ndim != 1:
        raise ValueError(f"`taus` must be one-dimensional, got shape {arr.shape}.")
    if arr.size == 0:
        raise ValueError("`taus` must not be empty: a trace needs at least one delay.")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise TypeError("`taus` must hold integers (got non-integer floats).")
        arr = arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"`taus` must hold integers, got dtype {arr.dtype}.")
    if np.any(arr < 0):
        raise ValueError(f"`taus` must be ≥ 0, got min {int(arr.min())}.")
    return arr.astype(np.int32)


def trace(taus: Any, *, max_delay: int | None = None, on_exhausted: str = "wrap") -> DelayModel:
    """Replays a recorded staleness sequence exactly, e.g. one measured by hogwild.

    ``next`` returns ``taus[0], taus[1], …`` in order. The key is ignored: a replay is
    deterministic by construction. A trace shorter than the run either starts over
    (``on_exhausted="wrap"``, the default) or repeats its last value (``"hold"``); either way
    ``state.exhausted`` counts the draws made past its end, so a caller can check
    ``state.exhausted == 0`` after a run that had to replay the trace exactly once.

    Args:
      taus: a 1-D sequence of integers ≥ 0, or an object/dict with a ``staleness`` entry
        (such as the trace returned by :func:`asgd_jax.hogwild.train`).
      max_delay: buffer bound; defaults to ``max(taus)`` and must be ≥ it.
      on_exhausted: ``"wrap"`` or ``"hold"``.
    """
    arr = _trace_array(taus)
    largest = int(arr.max())
    if max_delay is None:
        max_delay = largest
    max_delay = _check_int("max_delay", max_delay)
    if max_delay < largest:
        raise ValueError(
            f"`max_delay` must be ≥ the largest delay in the trace ({largest}), got {max_delay}."
        )
    if on_exhausted not in _TRACE_MODES:
        raise ValueError(f"`on_exhausted` must be one of {_TRACE_MODES}, got {on_exhausted!r}.")
    length = arr.size
    table = arr
    pmf = np.bincount(arr, minlength=max_delay + 1).astype(np.float64) / length

    def init(key: chex.PRNGKey) -> TraceState:
        del key
        return TraceState(count=jnp.zeros((), jnp.int32), exhausted=jnp.zeros((), jnp.int32))

    def next_(state: TraceState) -> tuple[jax.Array, TraceState]:
        if on_exhausted == "wrap":
            idx = state.count % length
        else:
            idx = jnp.minimum(state.count, length - 1)
        tau = jnp.asarray(table)[idx]
        past_end = (state.count >= length).astype(jnp.int32)
        count = state.count + 1 if on_exhausted == "wrap" else jnp.minimum(state.count + 1, length)
        return tau, TraceState(count=count, exhausted=state.exhausted + past_end)

    return DelayModel(
        init=init,
        next=next_,
        max_delay=max_delay,
        name=f"trace(len={length}, {on_exhausted})",
        pmf=pmf,
    )


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
