"""Flax linen: stale gradients with ``flax.training.train_state.TrainState``.

A ``TrainState`` built with ``tx=asgd.stale(...)`` needs one change in the training step: the
gradient is taken at :func:`stale_params` instead of ``state.params``; ``apply_gradients`` is
unchanged::

    state = TrainState.create(apply_fn=model.apply, params=params,
                              tx=asgd.stale(optax.sgd(0.05, 0.5), delay))
    grads = jax.grad(loss_fn)(asgd.linen.stale_params(state), batch)   # at W_{t−τ_t}
    state = state.apply_gradients(grads=grads)                           # applied to W_t

Evaluation takes ``state.params`` (W_t): a metric computed through the training step's
gradient function would be measured at the stale parameters. :func:`apply_gradients` is the
opaque form (``tx.update(None, ..., grad_fn=...)``), which ``TrainState.apply_gradients``
cannot pass through.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optax
from flax.training import train_state as train_state_lib

from asgd_jax.transforms._state import stale_params as _stale_params

__all__ = ["apply_gradients", "stale_params"]


def _check_train_state(state: Any) -> None:
    if not isinstance(state, train_state_lib.TrainState):
        raise TypeError(
            "`state` must be a flax.training.train_state.TrainState (or a subclass), got "
            f"{type(state).__name__}."
        )


def stale_params(state: train_state_lib.TrainState) -> optax.Params:
    """W_{t−τ_t} of a ``TrainState``: ``asgd.stale_params(state.opt_state, state.params)``.

    Args:
      state: a ``TrainState`` whose ``tx`` contains :func:`asgd_jax.stale`.

    Returns:
      A pytree like ``state.params``: where the next gradient is to be taken.
    """
    _check_train_state(state)
    return _stale_params(state.opt_state, state.params)


def apply_gradients(
    state: train_state_lib.TrainState,
    *,
    grad_fn: Callable[[optax.Params], optax.Updates],
    **kwargs: Any,
) -> train_state_lib.TrainState:
    """``TrainState.apply_gradients`` in the opaque form: ``grads = grad_fn(W_{t−τ_t})``.

    Runs ``state.tx.update(None, state.opt_state, state.params, grad_fn=grad_fn)`` (the
    wrapper evaluates ``grad_fn`` at the stale parameters itself), applies the updates, and
    increments ``step``, exactly as ``TrainState.apply_gradients`` does with explicit
    gradients. The loss, if wanted, comes from a separate forward pass (or use the explicit
    form with :func:`stale_params`).

    Args:
      state: a ``TrainState`` whose ``tx`` is :func:`asgd_jax.stale` itself (outermost:
        ``optax.MultiSteps`` or a chain around it get no gradients to combine in the opaque
        form; use the explicit form with :func:`stale_params` there).
      grad_fn: ``params -> grads``, e.g. ``lambda p: jax.grad(loss_fn)(p, batch)``.
      **kwargs: further ``TrainState`` fields to replace (e.g. ``batch_stats``).

    Returns:
      The updated ``TrainState``.
    """
    _check_train_state(state)
    if not callable(grad_fn):
        raise TypeError(f"`grad_fn` must be callable, got {type(grad_fn).__name__}.")
    updates, opt_state = state.tx.update(None, state.opt_state, state.params, grad_fn=grad_fn)
    params = optax.apply_updates(state.params, updates)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, **kwargs)
