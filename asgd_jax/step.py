"""The core contract, written once: a gradient at W_{t−τ_t}, applied to W_t.

Every training path (``train``, ``parallel``, ``hogwild``, the benchmarks and the notebooks)
builds its step here, so the contract has one implementation::

    step = asgd.make_step(loss_fn, tx)
    params, opt_state, loss = step(params, opt_state, batch)

is exactly::

    at = asgd.stale_params(opt_state, params)            # W_{t−τ_t}
    loss, grads = jax.value_and_grad(loss_fn)(at, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)          # applied to W_t

An optimizer without :func:`asgd_jax.stale` gives the plain synchronous step (the gradient
at W_t), so one step function serves a baseline and its asynchronous variant.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import optax

from asgd_jax.transforms._state import has_stale_state, stale_params

__all__ = ["Step", "make_step"]


@dataclasses.dataclass(frozen=True)
class Step:
    """The core contract as a pure function of ``(params, opt_state, *args)``.

    Build it with :func:`make_step`. Calling it runs :meth:`gradient` then :meth:`apply`;
    the two halves are public for callers that take gradients and apply them in different
    places (one device per simulated worker, a parameter server).

    Attributes:
      loss_fn: ``loss_fn(params, *args) -> loss`` (``(loss, aux)`` with ``has_aux``).
      tx: the optimizer (with or without :func:`asgd_jax.stale` inside).
      reduce_grads: applied to the gradients before the update (e.g. an all-reduce).
      reduce_loss: applied to the loss (e.g. the same all-reduce); ``None`` leaves it.
      prepare_params: applied to the parameters the gradient is taken at, outside the
        differentiated function (e.g. ``lax.pcast(..., to="varying")`` under
        ``shard_map``, so the gradient is per device, not already summed).
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    """

    loss_fn: Callable[..., Any]
    tx: optax.GradientTransformation
    reduce_grads: Callable[[Any], Any] | None = None
    reduce_loss: Callable[[Any], Any] | None = None
    prepare_params: Callable[[Any], Any] | None = None
    has_aux: bool = False

    def gradient_point(self, params: optax.Params, opt_state: optax.OptState) -> optax.Params:
        """W_{t−τ_t} for an optimizer with :func:`asgd_jax.stale`, else ``params``."""
        at = stale_params(opt_state, params) if has_stale_state(opt_state) else params
        return at if self.prepare_params is None else self.prepare_params(at)

    def gradient(
        self, params: optax.Params, opt_state: optax.OptState, *args: Any
    ) -> tuple[Any, optax.Updates]:
        """``(loss, grads)`` of ``loss_fn`` at :meth:`gradient_point`, reduced."""
        at = self.gradient_point(params, opt_state)
        loss, grads = jax.value_and_grad(self.loss_fn, has_aux=self.has_aux)(at, *args)
        if self.reduce_grads is not None:
            grads = self.reduce_grads(grads)
        if self.reduce_loss is not None:
            loss = self.reduce_loss(loss)
        return loss, grads

    def apply(
        self,
        grads: optax.Updates,
        params: optax.Params,
        opt_state: optax.OptState,
        **extra_args: Any,
    ) -> tuple[optax.Params, optax.OptState]:
        """``tx.update`` on ``grads`` (with ``extra_args``), then ``optax.apply_updates``."""
        updates, opt_state = self.tx.update(grads, opt_state, params, **extra_args)
        return optax.apply_updates(params, updates), opt_state

    def __call__(
        self, params: optax.Params, opt_state: optax.OptState, *args: Any, **extra_args: Any
    ) -> tuple[optax.Params, optax.OptState, Any]:
        """One update: ``(params, opt_state, loss)`` after the gradient on ``args``."""
        loss, grads = self.gradient(params, opt_state, *args)
        params, opt_state = self.apply(grads, params, opt_state, **extra_args)
        return params, opt_state, loss


def make_step(
    loss_fn: Callable[..., Any],
    tx: optax.GradientTransformation,
    *,
    reduce_grads: Callable[[Any], Any] | None = None,
    reduce_loss: Callable[[Any], Any] | None = None,
    prepare_params: Callable[[Any], Any] | None = None,
    has_aux: bool = False,
) -> Step:
    """The core contract as one step function: gradient at W_{t−τ_t}, applied to W_t.

    Args:
      loss_fn: ``loss_fn(params, *args) -> scalar loss`` (or ``(loss, aux)``).
      tx: an optax transformation, usually containing :func:`asgd_jax.stale`; without it
        the step is plain synchronous SGD with ``tx``.
      reduce_grads: e.g. ``lambda g: lax.pmean(g, "batch")`` for data parallelism.
      reduce_loss: the same for the reported loss.
      prepare_params: a map applied to the gradient point before differentiation.
      has_aux: ``loss_fn`` returns ``(loss, aux)``; the step then returns ``(loss, aux)``.

    Returns:
      A :class:`Step`: ``step(params, opt_state, *args, **extra_args) -> (params,
      opt_state, loss)``; pure, so ``jax.jit``, ``lax.scan`` and ``jax.vmap`` apply.
    """
    if not callable(loss_fn):
        raise TypeError(f"`loss_fn` must be callable, got {type(loss_fn).__name__}.")
    if not isinstance(tx, optax.GradientTransformation):
        raise TypeError(
            "`tx` must be an optax.GradientTransformation (e.g. asgd.stale(optax.sgd(0.1), "
            f"delay)), got {type(tx).__name__}."
        )
    for name, fn in (
        ("reduce_grads", reduce_grads),
        ("reduce_loss", reduce_loss),
        ("prepare_params", prepare_params),
    ):
        if fn is not None and not callable(fn):
            raise TypeError(f"`{name}` must be callable or None, got {type(fn).__name__}.")
    if not isinstance(has_aux, bool):
        raise TypeError(f"`has_aux` must be a bool, got {has_aux!r}.")
    return Step(loss_fn, tx, reduce_grads, reduce_loss, prepare_params, has_aux)
