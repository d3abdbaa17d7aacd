"""The state of :func:`asgd_jax.stale` and every public reader of it.

Code outside ``transforms/`` reads the stale state only through these functions (never its
fields or ``_replace``): the snapshot the next gradient reads (:func:`stale_params`), the one
a later update will read (:func:`stale_params_at`), the staleness now and ahead
(:func:`staleness`, :func:`upcoming_staleness`), summaries of the histogram
(:func:`staleness_summary`), the delay model's own counters (:func:`delay_report`), and a
restart of the delay stream (:func:`reseed`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from asgd_jax import history as history_lib
from asgd_jax._validation import as_key, check_int
from asgd_jax.transforms._static import (  # noqa: F401  (re-exported for the package)
    _as_arrays,
    _register_flax_serialization,
    _Static,
    check_params,
)

__all__ = [
    "StaleState",
    "StalenessMetrics",
    "delay_report",
    "find_stale_state",
    "has_stale_state",
    "reseed",
    "stale_params",
    "stale_params_at",
    "staleness",
    "staleness_summary",
    "upcoming_staleness",
]


class StalenessMetrics(NamedTuple):
    """Staleness statistics accumulated inside the jitted step."""

    last_staleness: jax.Array  # τ of the most recent gradient (applied or dropped).
    staleness_histogram: jax.Array  # int32[max_delay + 1]: count of gradients per τ.
    updates_dropped: jax.Array  # gradients discarded because τ > max_staleness.


class StaleState(NamedTuple):
    """State of :func:`stale`: parameter history, next staleness and delay-model state."""

    step: jax.Array  # t: number of gradients processed so far (int32).
    staleness: jax.Array  # τ_t, the staleness of the next gradient (int32).
    history: Any  # K past parameter snapshots (leading axis K); () when max_delay == 0.
    stale_step: jax.Array  # t − τ_t (≥ 0): the index of the snapshot the next gradient reads.
    delay_state: Any  # the delay model's own state.
    inner_state: optax.OptState  # state of the wrapped transformation.
    metrics: StalenessMetrics
    delay: _Static  # the delay model (static metadata: no leaves).


def _is_stale_state(x: Any) -> bool:
    return isinstance(x, StaleState)


def _find_all(state: Any) -> list[StaleState]:
    if isinstance(state, StaleState):
        return [state]
    leaves = jax.tree.leaves(state, is_leaf=_is_stale_state)
    return [leaf for leaf in leaves if isinstance(leaf, StaleState)]


def find_stale_state(state: Any) -> StaleState:
    """Returns the unique :class:`StaleState` inside an optimizer state.

    NNX optimizer states (``nnx.Optimizer.opt_state``) are accepted: the returned state
    holds plain arrays.
    """
    found = _find_all(state)
    if not found:
        raise ValueError(
            "this optimizer state has no asgd_jax.stale: build it with asgd.stale(...), e.g. "
            "asgd.stale(optax.sgd(0.1), asgd.delays.uniform(0, 8)). (A step shared by plain "
            'and stale optimizers can call stale_params(state, params, missing="params").)'
        )
    if len(found) > 1:
        raise ValueError(
            f"this optimizer state holds {len(found)} asgd_jax.stale states; pass the "
            "StaleState itself (e.g. state[0]) to say which one."
        )
    return _as_arrays(found[0])


def has_stale_state(state: Any) -> bool:
    """Whether an optimizer state contains an :func:`asgd_jax.stale` state (static: no trace)."""
    return bool(_find_all(state))


def _replace_stale_state(state: Any, new: StaleState) -> Any:
    if isinstance(state, StaleState):
        return new
    return jax.tree.map(
        lambda x: new if isinstance(x, StaleState) else x, state, is_leaf=_is_stale_state
    )


def staleness(state: Any) -> jax.Array:
    """τ_t: the staleness that the next gradient will have (an int32 scalar array)."""
    return find_stale_state(state).staleness


def stale_params(state: Any, params: optax.Params, *, missing: str = "error") -> optax.Params:
    """W_{t−τ_t}: the parameters at which the next gradient is to be evaluated.

    A pure read of the state (τ_t was drawn at the end of the previous update): one fused
    pass that selects ``params`` when τ_t = 0 and otherwise reads snapshot t − τ_t from the
    history. Returns the initial parameters W_0 when τ_t exceeds the number of steps taken so
    far (all workers start from W_0). Snapshots stored in a lower ``history_dtype`` are cast
    back to each parameter's dtype.

    ``params`` must have the structure, shapes and dtypes the state was built with (checked
    at trace time). Flax NNX variable trees (``nnx.state(model, nnx.Param)``, an
    ``nnx.Optimizer``'s ``opt_state``) are accepted and plain arrays are returned.

    Args:
      state: the state of :func:`stale`, or any optimizer state containing exactly one.
      params: the current parameters W_t.
      missing: what to do when ``state`` holds no :func:`stale` state: ``"error"`` (the
        default: forgetting the wrapper must not pass silently) or ``"params"`` to return
        ``params``, for one train step shared by a plain and a stale optimizer (A/B runs).

    Returns:
      A pytree like ``params``.
    """
    if missing not in ("error", "params"):
        raise ValueError(f'`missing` must be "error" or "params", got {missing!r}.')
    params = _as_arrays(params)
    if missing == "params" and not has_stale_state(state):
        return params
    s = find_stale_state(state)
    check_params(s, params, "stale_params")
    if isinstance(s.history, tuple) and not s.history:
        return params  # max_delay == 0: always fresh.
    snapshot = _snapshot(s.history, s.stale_step, s.staleness, _has_prediction(s))
    fresh = s.staleness == 0
    return jax.tree.map(lambda p, w: jnp.where(fresh, p, w.astype(p.dtype)), params, snapshot)


def _has_prediction(s: StaleState) -> bool:
    return history_lib.size(s.history) > int(s.delay.value.max_delay)


def stale_params_at(
    state: Any, params: optax.Params, *, ahead: int | jax.Array, staleness: int | jax.Array
) -> optax.Params:
    """The parameters that update ``t + ahead`` reads when its staleness is ``staleness``.

    ``t`` is the state's step and ``params`` is W_t. Update ``t + ahead`` with staleness τ
    takes its gradient at W_{t+ahead−τ}: for τ = 0 and ``ahead`` = 0 that is ``params``
    itself, otherwise the snapshot that the history will hold then (W_t as stored in
    ``history_dtype``, or an older snapshot). It must already be known, so τ ≥ ``ahead``
    (smaller values read W_t). With ``ahead=0`` and the state's own τ this is exactly
    :func:`stale_params`. Used to take several future gradients at once (one device per
    simulated worker) before the updates they feed are applied in order.

    Args:
      state: the state of :func:`stale`, or any optimizer state containing exactly one.
      params: the current parameters W_t.
      ahead: how many updates after the current one (≥ 0; traced values allowed).
      staleness: that update's τ (traced values allowed).

    Returns:
      A pytree like ``params``.
    """
    params = _as_arrays(params)
    s = find_stale_state(state)
    check_params(s, params, "stale_params_at")
    if isinstance(s.history, tuple) and not s.history:
        return params  # max_delay == 0: always fresh.
    step = s.step
    tau = jnp.asarray(staleness, jnp.int32)
    index = jnp.clip(step + jnp.asarray(ahead, jnp.int32) - tau, 0, step)

    def read_through(i):
        # W_i for i ≤ t: W_t is not in the buffer yet, so it comes from params, rounded to
        # the storage dtype exactly as update() will store it.
        stored = history_lib.read(s.history, i)
        return jax.tree.map(lambda p, w: jnp.where(i == step, p.astype(w.dtype), w), params, stored)

    snapshot = read_through(index)
    if _has_prediction(s):
        snapshot = _extrapolate(snapshot, read_through(jnp.maximum(index - 1, 0)), tau)
    fresh = (tau == 0) & (jnp.asarray(ahead) == 0)
    return jax.tree.map(lambda p, w: jnp.where(fresh, p, w.astype(p.dtype)), params, snapshot)


def upcoming_staleness(state: Any, num: int) -> jax.Array:
    """τ_t, τ_{t+1}, …: the staleness of the next ``num`` gradients (int32[num]).

    A pure function of the delay model's state: the delay stream is not advanced. Traceable
    (``num`` is static).
    """
    num = check_int("num", num, low=1)
    s = find_stale_state(state)
    delay = s.delay.value
    max_delay = int(delay.max_delay)

    def draw(delay_state, _):
        tau, delay_state = delay.next(delay_state)
        return delay_state, jnp.minimum(tau, max_delay).astype(jnp.int32)

    first = jnp.asarray(s.staleness, jnp.int32)
    if num == 1:
        return first[None]
    _, rest = jax.lax.scan(draw, s.delay_state, None, length=num - 1)
    return jnp.concatenate([first[None], rest])


def staleness_summary(histogram: Any) -> dict[str, Any]:
    """Mean and largest staleness of a histogram of counts per τ (last axis: τ = 0, 1, …).

    NumPy in (float64 mean), NumPy out; a JAX array in (float32 mean), JAX out, traceable.
    Leading axes (seeds, sweep points) are kept. An empty histogram has mean 0 and max 0.

    Returns:
      ``{"mean": …, "max": …}``.
    """
    histogram = _as_arrays(histogram)
    if isinstance(histogram, jax.Array):
        xp, float_dtype = jnp, jnp.float32
    else:
        xp, float_dtype = np, np.float64
        histogram = np.asarray(histogram, np.float64)
    taus = xp.arange(histogram.shape[-1])
    count = xp.maximum(histogram.sum(-1), 1).astype(float_dtype)
    mean = xp.sum(taus * histogram, -1).astype(float_dtype) / count
    top = xp.max(xp.where(histogram > 0, taus, 0), -1)
    return {"mean": mean, "max": top}


def delay_report(state: Any) -> dict[str, jax.Array]:
    """The delay model's own clock and counters (``DelayModel.report``), e.g. simulated time.

    Read after ``update``, the delay model's state is one update ahead (τ_{t+1} is drawn at
    the end of update t): the report then describes the arrival that delivers the next
    update. ``{}`` for models without a clock.
    """
    s = find_stale_state(state)
    return dict(s.delay.value.report(s.delay_state))


def _snapshot(history: Any, index: jax.Array, tau: jax.Array, weight_prediction: bool) -> Any:
    """Snapshot ``index``, or with prediction W_s + τ (W_s − W_{s−1}) for s = ``index``."""
    snap = history_lib.read(history, index)
    if not weight_prediction:
        return snap
    prev = history_lib.read(history, jnp.maximum(index - 1, 0))
    return _extrapolate(snap, prev, tau)


def _extrapolate(snap: Any, prev: Any, tau: jax.Array) -> Any:
    """W_s + τ (W_s − W_{s−1}), computed in float32 and stored back in each leaf's dtype."""
    tau_f = jnp.asarray(tau).astype(jnp.float32)

    def extrapolate(w, w_prev):
        w32, prev32 = w.astype(jnp.float32), w_prev.astype(jnp.float32)
        return (w32 + tau_f * (w32 - prev32)).astype(w.dtype)

    return jax.tree.map(extrapolate, snap, prev)


def reseed(state: Any, key: chex.PRNGKey | int) -> Any:
    """Restarts the delay model of a :func:`stale` state from ``key``.

    Gives each run its own delay sequence after a shared ``init``, e.g. to run many seeds at
    once: ``jax.vmap(lambda k: asgd.reseed(tx.init(params), k))(keys)``. The staleness of the
    next gradient is redrawn and its snapshot re-read from the history, so ``reseed`` may be
    called at any step; called right after ``init`` it equals ``stale(..., seed=key)``.

    Args:
      state: the state of :func:`stale`, or an optimizer state containing exactly one.
      key: an int or a single PRNG key (typed or raw), the rule of ``stale(seed=...)``.

    Returns:
      ``state`` with the stale state's delay stream restarted.
    """
    key = as_key("key", key)
    s = find_stale_state(state)
    delay = s.delay.value
    max_delay = int(delay.max_delay)
    tau, delay_state = delay.next(delay.init(key))
    tau = jnp.minimum(tau, max_delay).astype(jnp.int32)
    # The buffer holds W_0 … W_{t−1}; τ = 0 reads params, so the index only matters for τ ≥ 1.
    stale_step = jnp.maximum(s.step - tau, 0)
    new = s._replace(staleness=tau, delay_state=delay_state, stale_step=stale_step)
    return _replace_stale_state(state, new)
