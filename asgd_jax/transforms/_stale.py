"""The stale-gradient wrapper: gradients evaluated at W_{t−τ_t}, applied to W_t."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from asgd_jax import delays as delays_lib
from asgd_jax import history as history_lib
from asgd_jax._validation import as_key, check_seed
from asgd_jax.transforms._state import StalenessMetrics, StaleState, stale_params
from asgd_jax.transforms._static import _register_flax_serialization, _Static, check_params

__all__ = ["stale"]


def _first_element(x: jax.Array) -> jax.Array:
    return x.reshape(-1)[0]


def _depends_on(tree: Any) -> jax.Array:
    """A bool computed from one element of every inexact leaf: data-dependent on each."""
    flag = jnp.asarray(False)
    for x in jax.tree.leaves(tree):
        if x.size and jnp.issubdtype(x.dtype, jnp.inexact):
            flag = flag | jnp.isnan(_first_element(x))
    return flag


# Why `_ordered_write` exists. The train step reads snapshot t − τ_t from the buffer (inside
# the gradient) and update() then writes W_t into the same buffer; with the state and params
# donated, XLA reuses every buffer in place only if data dependencies prove that (a) the read
# happens before the write and (b) W_t is copied into the buffer before the caller's
# apply_updates overwrites W_t. Without them it copies the whole buffer every step (seen: 40×
# slower at K = 128) or the parameters (seen: ~20 % of a small MLP's step); an
# optimization barrier orders them too, but XLA:CPU then copies every buffer through it.
#
# Both dependencies are selects whose predicate is `data-dependent flag & (t < 0)`. The step
# counter t starts at 0 and only grows (safe_int32_increment), so the predicate is False for
# every value the updates, the parameters or the buffer may hold (NaN and inf included) and
# the selects return their second operand bit for bit; XLA cannot prove t ≥ 0, so the
# dependencies survive optimization.


def _ordered_write(history: Any, params: Any, step: jax.Array, updates: Any) -> tuple[Any, Any]:
    """``(history with W_t in slot t mod K, updates)``, ordered as explained above."""
    num_slots = history_lib.size(history)
    never = step < 0
    # (a) The slot waits for the updates, hence for the gradient and this step's read.
    slot = jnp.where(_depends_on(updates) & never, 0, step % num_slots)
    history = history_lib.write(history, params, slot)
    # (b) Each update leaf waits for one element of the snapshot just written.
    u_leaves, treedef = jax.tree.flatten(updates)
    h_leaves = jax.tree.leaves(history)
    if len(u_leaves) != len(h_leaves):
        return history, updates
    ordered = []
    for u, h in zip(u_leaves, h_leaves, strict=True):
        if u.size and jnp.issubdtype(u.dtype, jnp.inexact) and h.shape[1:] == u.shape:
            # One element of snapshot `slot` (a size-1 slice: under vmap a 1-element gather).
            start = (slot, *(jnp.zeros((), jnp.int32),) * (h.ndim - 1))
            written = jax.lax.dynamic_slice(h, start, (1,) * h.ndim).reshape(())
            u = jnp.where(jnp.isnan(written) & never, jnp.zeros_like(u), u)
        ordered.append(u)
    return history, jax.tree.unflatten(treedef, ordered)


def _check_inner_state(inner_state: Any) -> Any:
    if isinstance(inner_state, optax.MultiStepsState):
        raise TypeError(
            "asgd_jax.stale(optax.MultiSteps(...).gradient_transformation()) would delay each "
            "micro-batch gradient: write optax.MultiSteps(asgd.stale(inner, delay), k) instead."
        )
    return inner_state


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

    ``inject_hyperparams`` *inside* ``stale`` keeps its hyperparameters at
    ``state.inner_state.hyperparams``; ``optax.tree.get(state, "learning_rate")`` and
    ``optax.tree.set`` reach them there. Gradient accumulation wraps the stale optimizer,
    ``optax.MultiSteps(asgd.stale(inner, delay), k)`` (the reverse order is refused).

    Non-finite gradients. Whatever the updates hold, update t stores W_t in slot t mod K.
    Prefer ``asgd.stale(optax.apply_if_finite(inner, n), delay)``: a skipped gradient is a
    zero update (W_{t+1} = W_t), the inner state is untouched, the step and the delay stream
    advance, and the buffer stays in place. ``optax.apply_if_finite(asgd.stale(...), n)``
    is also exact but rolls the whole stale state back (the skipped step is retried with the
    same τ) and selects over the whole history every step (a copy of K snapshots).

    Opaque form: ``tx.update(None, state, params, grad_fn=f)`` (``grad_fn`` is keyword-only)
    evaluates ``f`` at the stale parameters itself (like ``optax.contrib.sam``'s opaque
    mode), for a drop-in train step.

    The state's static part (the delay model) compares by value and is invisible to
    ``flax.serialization``, so msgpack checkpoints (``to_bytes`` / ``from_bytes``, e.g. of a
    flax ``TrainState``) round-trip, as orbax ones do.

    Args:
      inner: the optax transformation to run on the stale gradients.
      delay: a delay model from :mod:`asgd_jax.delays` (or :mod:`asgd_jax.workers`), or an
        int for :func:`asgd_jax.delays.constant`.
      seed: an int or a single PRNG key (typed or raw) for the delay model; use
        :func:`reseed` to give vmapped runs their own.
      max_staleness: bounded staleness S: a gradient with τ > S is dropped (zero update,
        ``inner`` state unchanged, counted in ``metrics.updates_dropped``); the step still
        counts, so W_{t+1} = W_t. ``None`` keeps every gradient.
      history_dtype: a real floating storage dtype for the snapshots of real floating
        parameters (e.g. ``jnp.bfloat16``) to save memory. This CHANGES RESULTS: gradients
        are then taken at rounded parameters. ``None`` keeps each parameter's dtype; integer
        and complex parameters are always stored in their own dtype (integer leaves are
        carried exactly; ``jax.grad`` does not differentiate them).
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
    if isinstance(inner, optax.MultiSteps):
        raise TypeError(
            "asgd_jax.stale(optax.MultiSteps(...)) would delay each micro-batch gradient: "
            "accumulate the stale gradients instead, optax.MultiSteps(asgd.stale(inner, "
            "delay), every_k_schedule=k) (the wrapper's steps are then the micro-steps)."
        )
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
    seed = check_seed("seed", seed)
    if history_dtype is not None:
        try:
            history_dtype = jnp.dtype(history_dtype)
        except TypeError:
            raise TypeError(
                f"`history_dtype` must be a floating dtype (e.g. jnp.bfloat16) or None, got "
                f"{history_dtype!r}."
            ) from None
        if not jnp.issubdtype(history_dtype, jnp.floating):
            raise ValueError(
                "`history_dtype` must be a real floating dtype (e.g. jnp.bfloat16) or None, got "
                f"{history_dtype}; complex and integer parameters are always stored in their "
                "own dtype."
            )
    inner = optax.with_extra_args_support(inner)
    num_slots = max_delay + int(weight_prediction) if max_delay > 0 else 0
    static_delay = _Static(delay, history_dtype)
    _register_flax_serialization()

    def init_fn(params: optax.Params) -> StaleState:
        key = as_key("seed", seed)
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
            inner_state=_check_inner_state(inner.init(params)),
            metrics=metrics,
            delay=static_delay,
        )

    def update_fn(
        updates: optax.Updates | None,
        state: StaleState,
        params: optax.Params | None = None,
        *,
        grad_fn: Callable[[optax.Params], optax.Updates] | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, StaleState]:
        if params is None:
            raise ValueError("asgd_jax.stale needs `params` (W_t) in update(grads, state, params).")
        check_params(state, params, "asgd_jax.stale update")
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
            # W_t goes into slot t mod K whatever the updates hold (NaN, inf, zeros).
            history, new_updates = _ordered_write(state.history, params, step, new_updates)
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
