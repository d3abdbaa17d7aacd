"""The stale-gradient wrapper: gradients evaluated at W_{t−τ_t}, applied to W_t."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from asgd_jax import delays as delays_lib
from asgd_jax import history as history_lib

__all__ = [
    "StaleState",
    "StalenessMetrics",
    "stale",
    "stale_params",
    "staleness",
    "reseed",
    "find_stale_state",
]


@jax.tree_util.register_pytree_node_class
class _Static:
    """Holds a Python object as static pytree metadata (no leaves), e.g. the delay model."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def tree_flatten(self):
        return (), self.value

    @classmethod
    def tree_unflatten(cls, value, children):
        del children
        return cls(value)

    def __repr__(self) -> str:
        return repr(self.value)


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


def find_stale_state(state: Any) -> StaleState:
    """Returns the unique :class:`StaleState` inside an optimizer state."""
    if isinstance(state, StaleState):
        return state
    found = [
        leaf
        for leaf in jax.tree.leaves(state, is_leaf=_is_stale_state)
        if isinstance(leaf, StaleState)
    ]
    if len(found) != 1:
        raise ValueError(
            "Expected exactly one asgd_jax.stale state inside the optimizer state, found "
            f"{len(found)}. Pass the StaleState itself when several are nested."
        )
    return found[0]


def _replace_stale_state(state: Any, new: StaleState) -> Any:
    if isinstance(state, StaleState):
        return new
    return jax.tree.map(
        lambda x: new if isinstance(x, StaleState) else x, state, is_leaf=_is_stale_state
    )


def staleness(state: Any) -> jax.Array:
    """τ_t: the staleness that the next gradient will have (an int32 scalar)."""
    return find_stale_state(state).staleness


def stale_params(state: Any, params: optax.Params) -> optax.Params:
    """W_{t−τ_t}: the parameters at which the next gradient is to be evaluated.

    A pure read of the state (τ_t was drawn at the end of the previous update): one fused
    pass that selects ``params`` when τ_t = 0 and otherwise reads snapshot t − τ_t from the
    history. Returns the initial parameters W_0 when τ_t exceeds the number of steps taken so
    far (all workers start from W_0). Snapshots stored in a lower ``history_dtype`` are cast
    back to each parameter's dtype.

    Args:
      state: the state of :func:`stale`, or any optimizer state containing exactly one.
      params: the current parameters W_t.

    Returns:
      A pytree like ``params``.
    """
    s = find_stale_state(state)
    if isinstance(s.history, tuple) and not s.history:
        return params  # max_delay == 0: always fresh.
    weight_prediction = history_lib.size(s.history) > int(s.delay.value.max_delay)
    snapshot = _snapshot(s.history, s.stale_step, s.staleness, weight_prediction)
    fresh = s.staleness == 0
    return jax.tree.map(lambda p, w: jnp.where(fresh, p, w.astype(p.dtype)), params, snapshot)


def _snapshot(history: Any, index: jax.Array, tau: jax.Array, weight_prediction: bool) -> Any:
    """Snapshot ``index``, or with prediction W_s + τ (W_s − W_{s−1}) for s = ``index``."""
    snap = history_lib.read(history, index)
    if not weight_prediction:
        return snap
    prev = history_lib.read(history, jnp.maximum(index - 1, 0))
    tau_f = jnp.asarray(tau).astype(jnp.float32)

    def extrapolate(w, w_prev):
        w32, prev32 = w.astype(jnp.float32), w_prev.astype(jnp.float32)
        return (w32 + tau_f * (w32 - prev32)).astype(w.dtype)

    return jax.tree.map(extrapolate, snap, prev)


def _first_element(x: jax.Array) -> jax.Array:
    return jax.lax.dynamic_slice(x.reshape(-1), (0,), (1,))[0]


def _float_leaves(tree: Any) -> list[jax.Array]:
    return [x for x in jax.tree.leaves(tree) if x.size and jnp.issubdtype(x.dtype, jnp.inexact)]


# Why the two functions below exist. The train step reads snapshot t − τ_t from the buffer
# (inside the gradient) and update() then writes W_t into the same buffer; with the state
# and params donated, XLA reuses every buffer in place only if data dependencies prove that
# (a) the read happens before the write and (b) W_t is copied into the buffer before the
# caller's apply_updates overwrites W_t. Without them it copies the whole buffer every step
# (seen: 40× slower at K = 128) or the parameters (seen: ~20 % of a small MLP's step). Both
# dependencies are exact no-ops on finite values.


def _gradient_is_finite(updates: Any) -> jax.Array:
    """A flag computed from every update leaf, hence data-dependent on the gradient."""
    ready = jnp.asarray(True)
    for u in _float_leaves(updates):
        ready = ready & ~jnp.isnan(_first_element(u))
    return ready


def _after_write(updates: Any, history: Any, slot: jax.Array) -> Any:
    """``where(isnan(h), nan, u)`` per leaf, ``h`` an element of W_t just written: bitwise ``u``
    unless W_t is already NaN (then W_{t+1} is NaN anyway)."""
    u_leaves, treedef = jax.tree.flatten(updates)
    h_leaves = jax.tree.leaves(history)
    if len(u_leaves) != len(h_leaves):
        return updates
    ordered = []
    for u, h in zip(u_leaves, h_leaves, strict=True):
        if u.size and jnp.issubdtype(u.dtype, jnp.inexact) and h.shape[1:] == u.shape:
            # One element of snapshot `slot` (a size-1 slice: under vmap a 1-element gather).
            start = (slot,) + (0,) * (h.ndim - 1)
            written = jax.lax.dynamic_slice(h, start, (1,) * h.ndim).reshape(())
            u = jnp.where(jnp.isnan(written), jnp.asarray(jnp.nan, u.dtype), u)
        ordered.append(u)
    return jax.tree.unflatten(treedef, ordered)


def stale(
    inner: optax.GradientTransformation,
    delay: delays_lib.DelayModel | int,
    *,
    seed: int | jax.Array = 0,
    max_staleness: int | None = None,
    history_dtype: Any = None,
    weight_prediction: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Simulates asynchronous SGD: gradients taken at W_{t−τ_t} update W_t.

    The wrapper keeps a circular buffer of the last ``K = delay.max_delay`` parameter
    snapshots. Each ``update(grads, state, params)``

    1. runs ``inner`` on ``grads`` (which the caller computed at
       ``stale_params(state, params)`` = W_{t−τ_t}) with the extra arguments
       ``staleness=τ_t`` and ``stale_params=W_{t−τ_t}``, so staleness-aware transforms
       (:func:`scale_by_staleness`, :func:`delay_compensation`, :func:`gap_aware`) compose
       inside ``optax.chain``;
    2. records W_t in slot ``t mod K`` of the buffer (in place under donation: the step's
       cost does not grow with K, and the state holds K snapshots and nothing more);
    3. draws τ_{t+1} from the delay model, so the next :func:`stale_params` is a pure read.

    This is the update w_{t+1} = w_t − η ∇f(w_{t−τ_t}) of asynchronous / Downpour SGD
    (Koloskova, Stich & Jaggi 2022) with a deterministic, key-driven delay sequence. With
    ``max_delay = 0`` the wrapper stores no history and equals ``inner`` bit for bit.

    ``max_delay`` sizes the buffer, so it is static. Under ``optax.inject_hyperparams``
    declare the arguments that determine it static, e.g.::

      def make(learning_rate, max_delay):
        return asgd.stale(optax.sgd(learning_rate), asgd.delays.uniform(0, max_delay))
      tx = optax.inject_hyperparams(make, static_args=("max_delay",))(0.1, max_delay=8)

    Opaque form: ``tx.update(None, state, params, grad_fn=f)`` evaluates ``f`` at the stale
    parameters itself (like ``optax.contrib.sam``'s opaque mode), for a drop-in train step.

    Args:
      inner: the optax transformation to run on the stale gradients.
      delay: a delay model from :mod:`asgd_jax.delays` (or :mod:`asgd_jax.workers`), or an
        int for :func:`asgd_jax.delays.constant`.
      seed: seed of the delay model's key; use :func:`reseed` to give vmapped runs their own.
      max_staleness: bounded staleness S: a gradient with τ > S is dropped (zero update,
        ``inner`` state unchanged, counted in ``metrics.updates_dropped``); the step still
        counts, so W_{t+1} = W_t. ``None`` keeps every gradient.
      history_dtype: storage dtype for snapshots (e.g. ``jnp.bfloat16``) to save memory.
        This CHANGES RESULTS: gradients are then taken at rounded parameters. ``None`` keeps
        each parameter's dtype.
      weight_prediction: evaluate gradients at W_{t−τ} + τ (W_{t−τ} − W_{t−τ−1}), the stale
        weights extrapolated by τ times their latest update, as in pipeline-parallel weight
        prediction (SpecTrain, Chen et al. 2018, arXiv 1809.02839; PipeMare, Yang et al.
        2019, arXiv 1910.05124). Keeps one extra snapshot.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`StaleState`.

    References:
      Dean et al., *Large Scale Distributed Deep Networks*, NeurIPS 2012.
      Koloskova, Stich & Jaggi, *Sharper Convergence Guarantees for Asynchronous SGD for
      Distributed and Federated Learning*, NeurIPS 2022, arXiv 2206.08307.
    """
    if not isinstance(inner, optax.GradientTransformation):
        raise TypeError(
            "`inner` must be an optax.GradientTransformation (e.g. optax.sgd(0.1)), "
            f"got {type(inner).__name__}."
        )
    delay = delays_lib.as_delay_model(delay)
    max_delay = int(delay.max_delay)
    if max_staleness is not None:
        max_staleness = delays_lib._check_int("max_staleness", max_staleness)
    if not isinstance(weight_prediction, bool):
        raise TypeError(f"`weight_prediction` must be a bool, got {weight_prediction!r}.")
    if history_dtype is not None:
        history_dtype = jnp.dtype(history_dtype)
        if not jnp.issubdtype(history_dtype, jnp.inexact):
            raise ValueError(f"`history_dtype` must be a floating dtype, got {history_dtype}.")
    inner = optax.with_extra_args_support(inner)
    num_slots = max_delay + int(weight_prediction) if max_delay > 0 else 0
    static_delay = _Static(delay)

    def init_fn(params: optax.Params) -> StaleState:
        key = jax.random.key(seed) if jnp.ndim(seed) == 0 and not _is_key(seed) else seed
        tau, delay_state = delay.next(delay.init(key))
        tau = jnp.minimum(tau, max_delay).astype(jnp.int32)
        history = history_lib.init(params, num_slots, history_dtype) if num_slots else ()
        metrics = StalenessMetrics(
            last_staleness=jnp.zeros((), jnp.int32),
            staleness_histogram=jnp.zeros((max_delay + 1,), jnp.int32),
            updates_dropped=jnp.zeros((), jnp.int32),
        )
        return StaleState(
            step=jnp.zeros((), jnp.int32),
            staleness=tau,
            history=history,
            stale_step=jnp.zeros((), jnp.int32),
            delay_state=delay_state,
            inner_state=inner.init(params),
            metrics=metrics,
            delay=static_delay,
        )

    def update_fn(
        updates: optax.Updates | None,
        state: StaleState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, StaleState]:
        if params is None:
            raise ValueError("asgd_jax.stale needs `params` (W_t) in update(grads, state, params).")
        grad_fn: Callable[[optax.Params], optax.Updates] | None = extra_args.pop("grad_fn", None)
        extra_args.pop("staleness", None)
        extra_args.pop("stale_params", None)
        tau = state.staleness
        at = stale_params(state, params)
        if grad_fn is not None:
            updates = grad_fn(at)
        elif updates is None:
            raise ValueError("Pass gradients to update(), or `grad_fn=` for the opaque form.")

        new_updates, inner_state = inner.update(
            updates, state.inner_state, params, staleness=tau, stale_params=at, **extra_args
        )
        dropped = state.metrics.updates_dropped
        if max_staleness is not None:
            keep = tau <= max_staleness
            new_updates = optax.tree.where(keep, new_updates, optax.tree.zeros_like(new_updates))
            inner_state = optax.tree.where(keep, inner_state, state.inner_state)
            dropped = dropped + (~keep).astype(jnp.int32)

        step = state.step
        next_tau, delay_state = delay.next(state.delay_state)
        next_tau = jnp.minimum(next_tau, max_delay).astype(jnp.int32)
        if num_slots:
            # Write W_t into slot t mod K. The slot is gated on the gradient (an exact no-op
            # for finite gradients) so the write provably follows this step's read.
            slot = jnp.where(_gradient_is_finite(new_updates), step, 0) % num_slots
            history = history_lib.write(state.history, params, slot)
            new_updates = _after_write(new_updates, history, slot)
        else:
            history = ()
        stale_step = jnp.maximum(step + 1 - next_tau, 0)

        metrics = StalenessMetrics(
            last_staleness=tau,
            staleness_histogram=state.metrics.staleness_histogram.at[tau].add(1),
            updates_dropped=dropped,
        )
        new_state = StaleState(
            step=optax.safe_int32_increment(step),
            staleness=next_tau,
            history=history,
            stale_step=stale_step,
            delay_state=delay_state,
            inner_state=inner_state,
            metrics=metrics,
            delay=state.delay,
        )
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _is_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)


def reseed(state: Any, key: chex.PRNGKey) -> Any:
    """Restarts the delay model of a :func:`stale` state from ``key``.

    Gives each run its own delay sequence after a shared ``init``, e.g. to run many seeds at
    once: ``jax.vmap(lambda k: asgd.reseed(tx.init(params), k))(keys)``. The staleness of the
    next gradient is redrawn and its snapshot re-read from the history, so ``reseed`` may be
    called at any step; called right after ``init`` it equals ``stale(..., seed=key)``.

    Args:
      state: the state of :func:`stale`, or an optimizer state containing exactly one.
      key: a PRNG key (typed or raw).

    Returns:
      ``state`` with the stale state's delay stream restarted.
    """
    s = find_stale_state(state)
    delay = s.delay.value
    max_delay = int(delay.max_delay)
    tau, delay_state = delay.next(delay.init(key))
    tau = jnp.minimum(tau, max_delay).astype(jnp.int32)
    # The buffer holds W_0 … W_{t−1}; τ = 0 reads params, so the index only matters for τ ≥ 1.
    stale_step = jnp.maximum(s.step - tau, 0)
    new = s._replace(staleness=tau, delay_state=delay_state, stale_step=stale_step)
    return _replace_stale_state(state, new)
