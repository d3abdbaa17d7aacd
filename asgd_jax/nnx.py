"""Flax NNX: stale gradients with ``nnx.Optimizer`` in two lines.

The Flax NNX training step needs one change: the gradient is taken on a model at the stale
parameters, and the update is applied to the live model as before::

    optimizer = nnx.Optimizer(model, asgd.stale(optax.adamw(3e-3), delay), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, batch):
      grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)
      (loss, logits), grads = grad_fn(asgd.nnx.stale_model(model, optimizer), batch)
      optimizer.update(model, grads)

:func:`stale_model` shares every non-parameter variable of the live model (BatchNorm
statistics, RNG streams, counters), so what the forward pass updates lands in the live model.
Evaluation takes the live ``model`` (W_t), not the stale one. The readers here return arrays
(``nnx.Optimizer`` keeps its state as ``OptState`` variables): :func:`opt_state` gives the
plain optax state that every :mod:`asgd_jax` reader takes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from asgd_jax.transforms._state import has_stale_state
from asgd_jax.transforms._state import stale_params as _stale_params
from asgd_jax.transforms._state import staleness as _staleness

__all__ = ["max_curvature", "opt_state", "stale_model", "stale_params", "staleness"]


def _check_optimizer(optimizer: Any) -> None:
    if not isinstance(optimizer, nnx.Optimizer):
        raise TypeError(
            "`optimizer` must be an nnx.Optimizer (e.g. nnx.Optimizer(model, "
            f"asgd.stale(optax.sgd(0.1), delay), wrt=nnx.Param)), got {type(optimizer).__name__}."
        )


def _no_stale_message() -> str:
    return (
        "this optimizer state has no asgd_jax.stale: build the optimizer with "
        "nnx.Optimizer(model, asgd.stale(tx, delay), wrt=nnx.Param), or pass strict=False to "
        "train with the plain optimizer (the gradient is then taken on the live model)."
    )


def opt_state(optimizer: nnx.Optimizer) -> Any:
    """The optax state of an ``nnx.Optimizer`` as plain arrays (``OptState`` variables unwrapped).

    What the :mod:`asgd_jax` readers take, e.g.
    ``asgd.staleness_summary(asgd.nnx.opt_state(optimizer).metrics.staleness_histogram)``
    when the optimizer is ``asgd.stale(...)`` itself.
    """
    _check_optimizer(optimizer)
    return nnx.as_pure(optimizer.opt_state)


def _params(model: nnx.Module, optimizer: nnx.Optimizer) -> nnx.State:
    return nnx.state(model, optimizer.wrt, graph=getattr(optimizer, "graph", None))


def stale_params(model: nnx.Module, optimizer: nnx.Optimizer) -> nnx.State:
    """W_{t−τ_t}: the parameters (those the optimizer updates) the next gradient reads.

    Args:
      model: the live model (W_t).
      optimizer: an ``nnx.Optimizer`` whose transformation contains :func:`asgd_jax.stale`.

    Returns:
      An ``nnx.State`` of arrays shaped like ``nnx.state(model, optimizer.wrt)``.
    """
    state = opt_state(optimizer)
    if not has_stale_state(state):
        raise ValueError(_no_stale_message())
    return _stale_params(state, nnx.as_pure(_params(model, optimizer)))


def staleness(optimizer: nnx.Optimizer) -> jax.Array:
    """τ_t, the staleness of the next gradient (an int32 array, not an NNX variable)."""
    state = opt_state(optimizer)
    if not has_stale_state(state):
        raise ValueError(_no_stale_message())
    return _staleness(state)


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def stale_model(model: nnx.Module, optimizer: nnx.Optimizer, *, strict: bool = True) -> Any:
    """A view of ``model`` at the stale parameters W_{t−τ_t}, for the gradient.

    The returned module has its own parameter variables (holding W_{t−τ_t}, with the live
    parameters' metadata) and shares every other variable with ``model``: BatchNorm running
    statistics, ``nnx.Rngs`` streams and any counter. Differentiate it with
    ``nnx.grad`` / ``nnx.value_and_grad`` (filter ``nnx.Param``, or the optimizer's ``wrt``);
    the gradients have the live parameters' structure, so ``optimizer.update(model, grads)``
    is unchanged. With ``delay=0`` the step equals the plain optimizer's bit for bit. Call it
    inside the jitted step (``nnx.jit``); it copies no buffers beyond the parameters read.

    Args:
      model: the live model (W_t); it is not modified.
      optimizer: an ``nnx.Optimizer`` whose transformation contains :func:`asgd_jax.stale`.
      strict: without :func:`asgd_jax.stale` in the optimizer, raise (the default: a missing
        wrapper must not pass silently) or, with ``strict=False``, return ``model`` itself, so
        one train step serves a plain baseline and its asynchronous variant.

    Returns:
      An NNX module of the same type as ``model``.
    """
    if not isinstance(strict, bool):
        raise TypeError(f"`strict` must be a bool, got {strict!r}.")
    state = opt_state(optimizer)
    if not has_stale_state(state):
        if strict:
            raise ValueError(_no_stale_message())
        return model
    graph = getattr(optimizer, "graph", None)
    graphdef, params, rest = nnx.split(model, optimizer.wrt, ..., graph=graph)
    at = _stale_params(state, nnx.as_pure(params))
    stale = jax.tree.map(lambda v, w: v.copy(w), params, at, is_leaf=_is_variable)
    # merge without copying reuses `rest`'s variable objects: the live model's own.
    return nnx.merge(graphdef, stale, rest)


def max_curvature(
    model: nnx.Module,
    loss_fn: Callable[..., Any],
    *args: Any,
    wrt: Any = nnx.Param,
    has_aux: bool = False,
    num_iterations: int = 50,
    seed: int = 0,
) -> float:
    """The largest Hessian eigenvalue of ``loss_fn(model, *args)`` in the parameters.

    Power iteration on Hessian-vector products
    (:func:`asgd_jax.theory.hessian_max_eigenvalue`) through a pure function of the
    parameters: each evaluation runs on a copy of the model's other variables, so the model
    (its BatchNorm statistics and RNG streams included) is left unchanged. The model's mode
    is kept: in training mode BatchNorm normalises with the batch's statistics, as the
    gradient does. Feed the result to :func:`asgd_jax.theory.step_size`.

    Args:
      model: an NNX module.
      loss_fn: ``loss_fn(model, *args) -> loss`` (``(loss, aux)`` with ``has_aux``).
      *args: a batch.
      wrt: the parameters to differentiate (a filter; ``nnx.Param`` by default).
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      num_iterations: power iterations.
      seed: seed of the start vector.

    Returns:
      A Python float.
    """
    from asgd_jax.theory._step_size import hessian_max_eigenvalue

    graphdef, params, rest = nnx.split(model, wrt, ...)

    def pure_loss(params, *args):
        out = loss_fn(nnx.merge(graphdef, params, rest, copy=True), *args)
        return out[0] if has_aux else out

    return hessian_max_eigenvalue(
        pure_loss, params, *args, num_iterations=num_iterations, seed=seed
    )
