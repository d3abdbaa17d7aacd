"""Delay models with a law on {0, …, max_delay}: constant, table-drawn i.i.d. laws, round robin."""

from __future__ import annotations

import math
from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from asgd_jax._counter_rng import key_words, uniform01
from asgd_jax._validation import check_int as _check_int
from asgd_jax._validation import check_real as _check_real
from asgd_jax.delays._model import (
    CounterState,
    DelayModel,
    DelayState,
    _check_max_delay,
    _digest,
)

__all__ = [
    "categorical",
    "constant",
    "geometric",
    "poisson",
    "round_robin",
    "table_thresholds",
    "threshold_model",
    "uniform",
]


# --------------------------------------------------------------------------------------------
# Models drawn by inverse CDF from a table on {0, …, max_delay}.


def _table_model(pmf: np.ndarray, name: str, key: tuple) -> DelayModel:
    """A model that draws τ i.i.d. from ``pmf`` by inverse CDF of a hashed uniform."""
    pmf = np.asarray(pmf, dtype=np.float64)
    pmf = pmf / pmf.sum()
    max_delay = pmf.size - 1
    init, next_ = _table_draws(table_thresholds(pmf))
    return DelayModel(init=init, next=next_, max_delay=max_delay, name=name, pmf=pmf, key=key)


def table_thresholds(pmf: np.ndarray) -> np.ndarray:
    """The float32 inverse-CDF thresholds a table model draws with: ``cumsum(pmf)[:-1]``.

    τ = #{k < max_delay : thresholds[k] <= u} for the hashed uniform u of the step. The
    thresholds of a built model are ``table_thresholds(model.pmf)``: a sweep passes them to
    :func:`threshold_model` as data, so models of one ``max_delay`` share one program.
    """
    return np.cumsum(np.asarray(pmf, np.float64))[:-1].astype(np.float32)


def _table_draws(thresholds: jax.Array | np.ndarray) -> tuple:
    """``init`` and ``next`` of a model drawing by inverse CDF with ``thresholds``."""
    max_delay = int(np.shape(thresholds)[-1])

    def init(key: chex.PRNGKey) -> DelayState:
        return DelayState(seed=key_words(key), count=jnp.zeros((), jnp.int32))

    def next_(state: DelayState) -> tuple[jax.Array, DelayState]:
        u = uniform01(state.seed, state.count)
        if max_delay == 0:
            tau = jnp.zeros((), jnp.int32)
        else:
            tau = jnp.sum(u >= jnp.asarray(thresholds)).astype(jnp.int32)
        return tau, DelayState(state.seed, state.count + 1)

    return init, next_


def threshold_model(thresholds: jax.Array, name: str = "table") -> DelayModel:
    """A table model whose law is data: τ drawn with (possibly traced) ``thresholds``.

    Draws exactly what the model whose :func:`table_thresholds` these are draws (same state,
    same τ sequence for the same key), but the law may be a traced array, e.g. one row of a
    vmapped sweep over delay means. The model compares by identity: build it inside the
    traced function that uses it.

    Args:
      thresholds: float32 array of shape ``[max_delay]`` (non-decreasing, in (0, 1]).
      name: a short description.
    """
    if np.ndim(thresholds) != 1:
        raise ValueError(f"`thresholds` must be 1-D [max_delay], got shape {np.shape(thresholds)}")
    max_delay = _check_max_delay("len(thresholds)", int(np.shape(thresholds)[0]))
    init, next_ = _table_draws(thresholds)
    return DelayModel(init=init, next=next_, max_delay=max_delay, name=name)


def constant(tau: int) -> DelayModel:
    """Every gradient has the same staleness ``tau``.

    Args:
      tau: the staleness, an integer ≥ 0. ``constant(0)`` is plain synchronous SGD.

    Returns:
      A :class:`DelayModel` with ``max_delay == tau``.
    """
    tau = _check_max_delay("tau", tau)
    pmf = np.zeros(tau + 1)
    pmf[tau] = 1.0

    def init(key: chex.PRNGKey) -> CounterState:
        del key
        return CounterState(count=jnp.zeros((), jnp.int32))

    def next_(state: CounterState) -> tuple[jax.Array, CounterState]:
        return jnp.asarray(tau, jnp.int32), CounterState(state.count + 1)

    return DelayModel(
        init=init,
        next=next_,
        max_delay=tau,
        name=f"constant({tau})",
        pmf=pmf,
        key=("constant", tau),
    )


def uniform(low: int, high: int) -> DelayModel:
    """τ_t drawn i.i.d. uniformly from the integers ``{low, …, high}`` (both included).

    Args:
      low: smallest staleness, an integer ≥ 0.
      high: largest staleness, an integer ≥ ``low``; it is the model's ``max_delay``.
    """
    low = _check_int("low", low)
    high = _check_max_delay("high", high)
    if low > high:
        raise ValueError(f"`low` must be ≤ `high`, got low={low}, high={high}.")
    pmf = np.zeros(high + 1)
    pmf[low:] = 1.0
    return _table_model(pmf, f"uniform({low}, {high})", ("uniform", low, high))


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
    max_delay = _check_max_delay("max_delay", max_delay)
    if max_delay < mean:
        raise ValueError(
            f"`max_delay` must be ≥ `mean` (the law would be truncated below its mean), "
            f"got max_delay={max_delay}, mean={mean}."
        )
    p = 1.0 / (1.0 + mean)
    pmf = p * (1.0 - p) ** np.arange(max_delay + 1)
    name = f"geometric(mean={mean:g}, max_delay={max_delay})"
    return _table_model(pmf, name, ("geometric", mean, max_delay))


def poisson(mean: float, max_delay: int) -> DelayModel:
    """τ_t i.i.d. Poisson(mean), truncated and renormalised on ``{0, …, max_delay}``.

    Args:
      mean: the Poisson rate, ≥ 0.
      max_delay: truncation point, an integer ≥ ``mean``.
    """
    mean = _check_real("mean", mean)
    max_delay = _check_max_delay("max_delay", max_delay)
    if max_delay < mean:
        raise ValueError(f"`max_delay` must be ≥ `mean`, got max_delay={max_delay}, mean={mean}.")
    k = np.arange(max_delay + 1)
    if mean == 0:
        pmf = (k == 0).astype(np.float64)
    else:
        log_fact = np.array([math.lgamma(i + 1) for i in k])
        pmf = np.exp(k * math.log(mean) - mean - log_fact)
    name = f"poisson(mean={mean:g}, max_delay={max_delay})"
    return _table_model(pmf, name, ("poisson", mean, max_delay))


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
    _check_max_delay("len(pmf) - 1", pmf.size - 1)
    return _table_model(pmf, name, ("categorical", name, pmf.size, _digest(pmf)))


def round_robin(num_workers: int) -> DelayModel:
    """n equal-speed workers served in turn: τ_t = min(t, num_workers − 1).

    All workers start from W_0; worker ``t mod n`` pushes at step t a gradient taken n − 1
    updates ago once the pipeline is full. ``round_robin(1)`` is synchronous SGD.

    Args:
      num_workers: number of workers, an integer ≥ 1.
    """
    num_workers = _check_int("num_workers", num_workers, low=1)
    max_delay = _check_max_delay("num_workers - 1", num_workers - 1)
    pmf = np.zeros(num_workers)
    pmf[-1] = 1.0

    def init(key: chex.PRNGKey) -> CounterState:
        del key
        return CounterState(count=jnp.zeros((), jnp.int32))

    def next_(state: CounterState) -> tuple[jax.Array, CounterState]:
        tau = jnp.minimum(state.count, max_delay).astype(jnp.int32)
        return tau, CounterState(jnp.minimum(state.count + 1, max_delay))

    return DelayModel(
        init=init,
        next=next_,
        max_delay=max_delay,
        name=f"round_robin({num_workers})",
        pmf=pmf,
        key=("round_robin", num_workers),
    )
