"""Staleness-aware transformations: step scaling, delay compensation, gap awareness.

Each reads the extra arguments that :func:`asgd_jax.stale` passes to its inner
transformation (``staleness=τ_t`` and ``stale_params=W_{t−τ_t}``), so they compose inside
``optax.chain`` under ``stale``::

  tx = asgd.stale(
      optax.chain(asgd.delay_compensation(0.04), optax.sgd(0.1),
                  asgd.scale_by_staleness("inverse")),
      delay=asgd.delays.uniform(0, 8))

Their numeric constants (λ, β, ε, the rules' a, b, concurrency, threshold) may be JAX arrays,
traced ones included, so each works under ``optax.inject_hyperparams``; Python numbers are
checked eagerly, arrays are used as given.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from asgd_jax._validation import check_hyperparameter

__all__ = [
    "scale_by_staleness",
    "staleness_factor",
    "delay_compensation",
    "gap_aware",
    "DelayCompensationState",
    "GapAwareState",
    "STALENESS_RULES",
]

STALENESS_RULES = ("inverse", "polynomial", "hinge", "delay_adaptive", "drop")


def _positive(name: str, value: Any, *, allow_zero: bool = False, below_one: bool = False) -> Any:
    """A real constant ≥ 0 (> 0 unless ``allow_zero``; < 1 if ``below_one``), or an array."""
    value = check_hyperparameter(name, value, low=0.0, strict=not allow_zero)
    if below_one and not isinstance(value, jax.Array) and value >= 1.0:
        raise ValueError(f"`{name}` must be in [0, 1), got {value}.")
    if below_one and isinstance(value, jax.Array) and not isinstance(value, jax.core.Tracer):
        if float(value) >= 1.0:
            raise ValueError(f"`{name}` must be in [0, 1), got {float(value)}.")
    return value


def _require(extra_args: dict, name: str, who: str) -> Any:
    if name not in extra_args:
        raise ValueError(
            f"{who} needs the extra argument `{name}`: use it inside asgd_jax.stale(...), "
            f"or pass {name}=... to update()."
        )
    return extra_args[name]


def staleness_factor(rule: str, **kwargs: Any) -> Callable[[jax.Array], jax.Array]:
    """The step-size multiplier s(τ) of a staleness rule, as a function of τ (float32).

    Rules (τ ≥ 0 is the staleness of the gradient):

    * ``"inverse"`` -- s(τ) = 1 / max(τ, 1) (Zhang, Gupta, Lian & Liu 2016, arXiv
      1511.05950: η_t = η₀/τ_t). τ = 0 is treated like τ = 1 (full step), so the rule is the
      identity on fresh gradients.
    * ``"polynomial"`` -- s(τ) = (1 + τ)^(−a), ``a`` ≥ 0 (FedBuff, Nguyen et al. 2022, arXiv
      2106.06639; FedAsync's polynomial weight, Xie et al. 2019, arXiv 1903.03934).
    * ``"hinge"`` -- s(τ) = 1 if τ ≤ b else 1 / (a (τ − b) + 1) (FedAsync's hinge), a > 0,
      b ≥ 0.
    * ``"delay_adaptive"`` -- s(τ) = 1 if τ ≤ C else C / τ with C the concurrency (number of
      workers): Koloskova, Stich & Jaggi 2022 (arXiv 2206.08307, Thm. 8) and Mishchenko et al.
      2022 (arXiv 2206.07638).
    * ``"drop"`` -- s(τ) = 1 if τ ≤ threshold else 0: bounded staleness, a gradient staler
      than ``threshold`` is discarded.

    Args:
      rule: one of :data:`STALENESS_RULES`.
      **kwargs: the rule's constants: ``a`` (polynomial, hinge), ``b`` (hinge),
        ``concurrency`` (delay_adaptive), ``threshold`` (drop).
    """
    if not isinstance(rule, str) or rule not in STALENESS_RULES:
        raise ValueError(f"`rule` must be one of {STALENESS_RULES}, got {rule!r}.")
    allowed = {
        "inverse": set(),
        "polynomial": {"a"},
        "hinge": {"a", "b"},
        "delay_adaptive": {"concurrency"},
        "drop": {"threshold"},
    }[rule]
    unknown = set(kwargs) - allowed
    if unknown:
        raise TypeError(f"rule {rule!r} takes {sorted(allowed) or 'no'} arguments, got {unknown}.")
    missing = allowed - set(kwargs) - ({"a"} if rule == "polynomial" else set())
    if missing:
        raise TypeError(f"rule {rule!r} needs {sorted(missing)}.")

    if rule == "inverse":
        return lambda tau: 1.0 / jnp.maximum(tau, 1.0)
    if rule == "polynomial":
        a = _positive("a", kwargs.get("a", 0.5), allow_zero=True)
        return lambda tau: jnp.power(1.0 + tau, -a)
    if rule == "hinge":
        a = _positive("a", kwargs["a"])
        b = _positive("b", kwargs["b"], allow_zero=True)
        return lambda tau: jnp.where(tau <= b, 1.0, 1.0 / (a * (tau - b) + 1.0))
    if rule == "delay_adaptive":
        c = _positive("concurrency", kwargs["concurrency"])
        return lambda tau: jnp.where(tau <= c, 1.0, c / jnp.maximum(tau, 1.0))
    threshold = _positive("threshold", kwargs["threshold"], allow_zero=True)
    return lambda tau: jnp.where(tau <= threshold, 1.0, 0.0)


def scale_by_staleness(
    rule: str | Callable[[jax.Array], jax.Array] = "inverse",
    *,
    a: Any = None,
    b: Any = None,
    concurrency: Any = None,
    threshold: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """Scales updates by a staleness-dependent factor s(τ_t).

    Put it after the optimizer in a chain to scale the step, η_t = η · s(τ_t), as in
    staleness-aware ASGD (Zhang et al. 2016) and delay-adaptive ASGD (Koloskova et al. 2022);
    see :func:`staleness_factor` for the rules. Every built-in rule has s(0) = 1, so fresh
    gradients pass through unchanged (bit for bit).

    Args:
      rule: a rule name from :data:`STALENESS_RULES`, or a callable τ ↦ s(τ) (float32 in,
        float32 out; it must be traceable).
      a, b, concurrency, threshold: the rule's constants (see :func:`staleness_factor`);
        ``None`` leaves one out. Explicit keywords, so ``optax.inject_hyperparams`` can
        inject them (JAX arrays, traced ones included, are accepted).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with an empty state; its ``update`` needs
      the ``staleness`` extra argument, which :func:`asgd_jax.stale` provides.

    References:
      Zhang, Gupta, Lian & Liu, *Staleness-aware Async-SGD for Distributed Deep Learning*,
      IJCAI 2016, arXiv 1511.05950.
      Koloskova, Stich & Jaggi, NeurIPS 2022, arXiv 2206.08307.
      Regatti et al., *Distributed SGD Generalizes Well Under Asynchrony*, arXiv 1909.13391.
    """
    given = {"a": a, "b": b, "concurrency": concurrency, "threshold": threshold}
    kwargs = {name: value for name, value in given.items() if value is not None}
    if callable(rule):
        if kwargs:
            raise TypeError("A callable `rule` takes no keyword constants.")
        factor_fn = rule
    else:
        factor_fn = staleness_factor(rule, **kwargs)

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None, **extra_args):
        del params
        tau = jnp.asarray(_require(extra_args, "staleness", "scale_by_staleness"))
        factor = factor_fn(tau.astype(jnp.float32))
        fresh = tau == 0
        # s(0) = 1 exactly for the built-in rules; the select keeps fresh steps bitwise equal.
        updates = jax.tree.map(
            lambda u: jnp.where(fresh, u, (u * factor.astype(u.dtype)).astype(u.dtype)), updates
        )
        return updates, state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class DelayCompensationState(NamedTuple):
    """Running mean square of the gradient (adaptive DC-ASGD); () when not adaptive."""

    mean_square: Any


def delay_compensation(
    lam: float = 0.04, *, adaptive: bool = False, decay: float = 0.95, eps: float = 1e-7
) -> optax.GradientTransformationExtraArgs:
    r"""Delay-compensated gradients (DC-ASGD): g + λ·g⊙g⊙(W_t − W_{t−τ}).

    A first-order Taylor correction of the stale gradient towards the current weights, with
    the Hessian approximated by the outer product of gradients (its diagonal, λ·g⊙g). Place
    it *first* in the chain, on raw gradients. λ = 0, or W_t = W_{t−τ} (a fresh gradient),
    leaves the gradient unchanged.

    The adaptive variant (DC-ASGD-a) keeps MS_t = m·MS_{t−1} + (1 − m)·g⊙g and uses
    λ_t = λ / √(MS_t + ε) elementwise.

    Args:
      lam: the variance-control parameter λ ≥ 0 (0.04 is MXNet's default).
      adaptive: use λ_t = λ/√(MS_t + ε).
      decay: m in [0, 1), the decay of the mean square (adaptive only).
      eps: ε > 0 (adaptive only).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params`` (W_t) and the
      ``stale_params`` extra argument, which :func:`asgd_jax.stale` provides.

    References:
      Zheng, Meng, Wang, Chen, Yu, Ma & Liu, *Asynchronous Stochastic Gradient Descent with
      Delay Compensation*, ICML 2017, arXiv 1609.08326.
    """
    lam = _positive("lam", lam, allow_zero=True)
    if not isinstance(adaptive, bool):
        raise TypeError(f"`adaptive` must be a bool, got {adaptive!r}.")
    decay = _positive("decay", decay, allow_zero=True, below_one=True)
    eps = _positive("eps", eps)

    def init_fn(params):
        if adaptive:
            return DelayCompensationState(optax.tree.zeros_like(params))
        return DelayCompensationState(())

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError("delay_compensation needs `params` (W_t).")
        at = _require(extra_args, "stale_params", "delay_compensation")
        # λ = 0 returns g and the state unchanged, bit for bit (a select: λ may be traced).
        off = jnp.asarray(lam) == 0
        if adaptive:
            mean_square = jax.tree.map(
                lambda v, g: decay * v + (1.0 - decay) * jnp.square(g), state.mean_square, updates
            )
            scale = jax.tree.map(lambda v: lam / jnp.sqrt(v + eps), mean_square)
        else:
            mean_square = ()
            scale = jax.tree.map(lambda g: jnp.asarray(lam, g.dtype), updates)
        compensated = jax.tree.map(
            lambda g, s, w, w_old: jnp.where(
                off, g, (g + s * g * g * (w - w_old.astype(w.dtype))).astype(g.dtype)
            ),
            updates,
            scale,
            params,
            at,
        )
        if adaptive:
            mean_square = optax.tree.where(off, state.mean_square, mean_square)
        return compensated, DelayCompensationState(mean_square)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class GapAwareState(NamedTuple):
    """Step count and running second moment of the gradient."""

    count: jax.Array
    second_moment: Any


def gap_aware(
    learning_rate: float, *, beta: float = 0.999, eps: float = 1e-8
) -> optax.GradientTransformationExtraArgs:
    r"""Gap-Aware staleness mitigation: g ← g / (1 + |W_t − W_{t−τ}| / C), elementwise.

    The gap between the current and the stale weights is measured in units of the typical
    step C = η_max (√v̂ + ε), with v the bias-corrected running mean of g² (decay β). A gap of
    zero (a fresh gradient) gives a divisor of exactly 1. Place it first in the chain.

    Args:
      learning_rate: η_max > 0, the largest learning rate of the schedule.
      beta: decay β in [0, 1) of the running mean of g² (0.999 in the paper).
      eps: ε > 0.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params`` and the
      ``stale_params`` extra argument.

    References:
      Barkai, Hakimi & Schuster, *Gap-Aware Mitigation of Gradient Staleness*, ICLR 2020,
      arXiv 1909.10802.
    """
    learning_rate = _positive("learning_rate", learning_rate)
    beta = _positive("beta", beta, allow_zero=True, below_one=True)
    eps = _positive("eps", eps)

    def init_fn(params):
        return GapAwareState(jnp.zeros((), jnp.int32), optax.tree.zeros_like(params))

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError("gap_aware needs `params` (W_t).")
        at = _require(extra_args, "stale_params", "gap_aware")
        count = optax.safe_int32_increment(state.count)
        second = optax.tree.update_moment_per_elem_norm(updates, state.second_moment, beta, 2)
        corrected = optax.tree.bias_correction(second, beta, count)

        def penalise(g, v, w, w_old):
            unit = learning_rate * (jnp.sqrt(v) + eps)
            gap = jnp.abs(w - w_old.astype(w.dtype))
            return (g / (1.0 + gap / unit)).astype(g.dtype)

        new_updates = jax.tree.map(penalise, updates, corrected, params, at)
        return new_updates, GapAwareState(count, second)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
