r"""The learning rate under staleness: the largest stable step and the rate-optimal one.

On a quadratic, each Hessian eigenvalue h sees x_{t+1} = x_t − a x_{t−τ_t} with gain
a = ηh (module :mod:`~asgd_jax.theory._discrete`). A curvature estimate L (the largest
eigenvalue, e.g. :func:`hessian_max_eigenvalue` on a batch) turns the stable gains of that
recursion into learning rates: η < a*/L keeps the stiffest direction stable, and the gain that
minimises the spectral radius gives the fastest contraction.

For a constant staleness τ both are known in closed form. The boundary is
a* = 2 sin(π / (2(2τ + 1))) (Levin & May 1976). The characteristic polynomial
z^{τ+1} − z^τ + a has a double real root at z = τ/(τ + 1) exactly when
a = τ^τ / (τ + 1)^{τ+1}: there every root has modulus τ/(τ + 1), and a larger or smaller a
pushes one root outward, so that gain is rate-optimal with ρ = τ/(τ + 1) (a = 1, ρ = 0 for
τ = 0). Both grow like 1/τ: the step has to shrink with the staleness, by ≈ e τ from its
synchronous optimum. For random delays the same two numbers come from the mean dynamics
(``criterion="mean"``) or, by default, from the second moment (``"mean_square"``), which sees
the divergence of single runs that the mean misses; for a constant delay the two agree.

References:
  Levin & May, "A note on difference-delay equations", Theor. Popul. Biol. 9 (1976).
  Mitliagkas, Zhang, Hadjis & Ré, "Asynchrony begets momentum, with an application to deep
  learning", Allerton 2016, arXiv 1605.09774.
  Pearlmutter, "Fast exact multiplication by the Hessian", Neural Computation 6 (1994).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy import optimize

from asgd_jax._validation import check_int, check_optional, check_real
from asgd_jax.theory._discrete import (
    accepted_weights,
    discrete_critical_gain,
    discrete_mean_square_radius,
    discrete_spectral_radius,
)

__all__ = ["StepSize", "hessian_max_eigenvalue", "step_size"]

_CRITERIA = ("mean_square", "mean")


@dataclasses.dataclass(frozen=True)
class StepSize:
    """Learning rates for SGD under a staleness law, from :func:`step_size`.

    Attributes:
      max_stable: the largest stable learning rate, ``critical_gain / curvature``.
      optimal: the learning rate with the fastest contraction (of the slowest mode among
        ``curvature`` and ``min_curvature``), below ``max_stable``.
      critical_gain: a* = η·L at the stability boundary.
      optimal_gain: η·L at ``optimal``.
      radius: the per-update contraction factor at ``optimal``: ρ of the mean
        (``"mean"``) or ρ₂ of E[x²] (``"mean_square"``).
      criterion: ``"mean_square"`` or ``"mean"``.
    """

    max_stable: float
    optimal: float
    critical_gain: float
    optimal_gain: float
    radius: float
    criterion: str


def _staleness_pmf(delay: Any) -> np.ndarray:
    """The staleness pmf of an int, a delay model (``.pmf``), a pmf or a trace."""
    if isinstance(delay, (int, np.integer)) and not isinstance(delay, bool):
        tau = check_int("delay", delay)
        delay = np.zeros(tau + 1)
        delay[tau] = 1.0
    elif hasattr(delay, "max_delay") and hasattr(delay, "pmf"):  # an asgd_jax delay model
        if delay.pmf is None:
            raise ValueError(
                f"the delay model {delay!r} has no known stationary law (its `pmf` is None): "
                "pass a staleness pmf instead, e.g. measured with asgd_jax.workers.simulate or "
                "from asgd_jax.theory.worker_staleness(num_workers, compute_time)."
            )
        delay = np.asarray(delay.pmf, np.float64)
    return accepted_weights(delay)


def step_size(
    delay: Any,
    curvature: float,
    *,
    min_curvature: float | None = None,
    max_staleness: int | None = None,
    criterion: str = "mean_square",
) -> StepSize:
    r"""The largest stable and the rate-optimal SGD learning rates under a staleness law.

    Applies the discrete analysis of x_{t+1} = x_t − ηh x_{t−τ_t} (module docstring) at the
    curvature h = L: the stable gains are 0 < ηL < a* and the gain minimising the spectral
    radius is rate-optimal. With ``min_curvature`` μ the optimum balances the stiffest and
    the flattest direction, minimising max(ρ(ηL), ρ(ημ)); without it the optimum is that of
    the stiffest direction alone (flatter directions then converge more slowly, but stay
    stable up to ``max_stable``). For a constant staleness τ,
    ηL = τ^τ/(τ + 1)^{τ+1} is optimal (with ρ = τ/(τ + 1)) and ηL < 2 sin(π/(2(2τ + 1)))
    stable.

    The analysis is for plain SGD. Asynchrony itself acts like momentum (Mitliagkas et al.
    2016: for n workers with exponential compute times the mean dynamics are heavy-ball with
    momentum 1 − 1/n, see :func:`~asgd_jax.theory.geometric_spectral_radius`), so with a
    momentum optimizer lower the explicit momentum rather than adding it on top.

    Args:
      delay: the staleness: an int τ (constant), a delay model from :mod:`asgd_jax.delays`
        or :mod:`asgd_jax.workers` with a known ``pmf``, a pmf on {0, …, K} (floats), or a
        staleness trace (ints, or a ``workers.simulate`` result). For a worker setup pass
        :func:`~asgd_jax.theory.worker_staleness` (``num_workers``, ``compute_time``).
      curvature: L > 0, the largest Hessian eigenvalue of the loss (see
        :func:`hessian_max_eigenvalue`).
      min_curvature: μ with 0 < μ ≤ L, the smallest eigenvalue that matters, or ``None``.
      max_staleness: S, the threshold of ``stale(..., max_staleness=S)`` (τ > S dropped).
      criterion: ``"mean_square"`` (default: E[x²] decays, so single runs converge) or
        ``"mean"`` (the mean decays; less strict for random delays).

    Returns:
      A :class:`StepSize`.

    References:
      Levin & May, Theor. Popul. Biol. 9 (1976); Mitliagkas et al., arXiv 1605.09774.
    """
    pmf = _staleness_pmf(delay)
    w = accepted_weights(pmf, max_staleness)  # validates S; sums to the acceptance
    one_value = np.count_nonzero(w) == 1 and bool(np.isclose(w.sum(), 1.0, rtol=1e-12))
    drop = {"max_staleness": max_staleness}
    top = check_real("curvature", curvature, strict=True)
    low = check_optional(check_real, "min_curvature", min_curvature, strict=True, high=top)
    if criterion not in _CRITERIA:
        raise ValueError(f"`criterion` must be one of {_CRITERIA}, got {criterion!r}.")
    if criterion == "mean" or one_value:
        # One staleness value (a constant delay): ρ₂ = ρ² exactly, so both criteria share the
        # mean dynamics' gains (and the second-moment solve is singular at the double root).
        # Companion-matrix roots are exact enough for z^{τ+1} − z^τ + a and, unlike the
        # winding count, cost nothing extra when the circle passes through the double root.
        power = 1 if criterion == "mean" else 2
        method = "roots" if one_value else "auto"

        def rho(gain: float) -> float:
            if gain <= 0:
                return 1.0
            return discrete_spectral_radius(gain, pmf, method=method, **drop) ** power

    else:

        def rho(gain: float) -> float:
            return discrete_mean_square_radius(gain, pmf, **drop) if gain > 0 else 1.0

    mean_critical = discrete_critical_gain(pmf, **drop)
    if not math.isfinite(mean_critical):  # no crossing found: search up to 2/Σw
        mean_critical = 2.0 / float(w.sum())
    # The stiffest direction's optimum lies inside (0, a*); its radius is unimodal there.
    opt = optimize.minimize_scalar(
        rho, bounds=(0.0, mean_critical), method="bounded", options={"xatol": 1e-12}
    )
    critical = mean_critical
    if criterion == "mean_square" and rho(mean_critical) > 1.0:
        # ρ₂ ≥ ρ², so the mean-square boundary lies between the optimum and a*.
        critical = optimize.brentq(lambda a: rho(a) - 1.0, opt.x, mean_critical, xtol=1e-14)
    gain, best = float(opt.x), float(opt.fun)
    if low is not None and low < top:
        ratio = low / top

        def slowest(a: float) -> float:
            return max(rho(a), rho(a * ratio))

        balanced = optimize.minimize_scalar(
            slowest, bounds=(gain, critical), method="bounded", options={"xatol": 1e-12}
        )
        gain, best = float(balanced.x), float(balanced.fun)
    return StepSize(
        max_stable=critical / top,
        optimal=gain / top,
        critical_gain=float(critical),
        optimal_gain=gain,
        radius=best,
        criterion=criterion,
    )


def hessian_max_eigenvalue(
    loss_fn: Callable[..., Any],
    params: Any,
    *args: Any,
    num_iterations: int = 50,
    seed: int = 0,
) -> float:
    """The largest Hessian eigenvalue of ``loss_fn`` at ``params``, by power iteration.

    Each iteration is one Hessian-vector product (forward-over-reverse, ``jax.jvp`` of
    ``jax.grad``: about the cost of two gradients), all inside one jitted loop. Power
    iteration finds the eigenvalue of largest modulus; when that one is negative (a saddle or
    a non-convex batch) the iteration is rerun on H − λI, whose top eigenvalue is
    λ_max − λ ≥ 0, so the result is the largest eigenvalue, the curvature that bounds the step
    (:func:`step_size`). Evaluate it on a training batch at the initial parameters, and again
    later if the loss sharpens.

    Args:
      loss_fn: ``loss_fn(params, *args) -> scalar``; pure (for an NNX model use
        :func:`asgd_jax.nnx.max_curvature`).
      params: a pytree of floating arrays.
      *args: the batch (and anything else ``loss_fn`` takes).
      num_iterations: power iterations (≥ 1).
      seed: seed of the random start vector.

    Returns:
      The Rayleigh quotient of the last iterate, a Python float.

    References:
      Pearlmutter, Neural Computation 6 (1994) (Hessian-vector products).
    """
    # JAX only here: the rest of theory/ is NumPy/SciPy and imports no JAX.
    import jax
    import jax.numpy as jnp

    num_iterations = check_int("num_iterations", num_iterations, low=1)
    if not callable(loss_fn):
        raise TypeError(f"`loss_fn` must be callable, got {type(loss_fn).__name__}.")
    leaves, treedef = jax.tree.flatten(params)
    if not leaves or not all(jnp.issubdtype(jnp.result_type(x), jnp.floating) for x in leaves):
        raise TypeError("`params` must be a non-empty pytree of floating arrays.")
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    start = [
        jax.random.normal(k, jnp.shape(x), jnp.result_type(x))
        for k, x in zip(keys, leaves, strict=True)
    ]

    @jax.jit
    def power(params, args, start, shift):
        grad = jax.grad(lambda p: loss_fn(p, *args))

        def hvp(v):
            return jax.jvp(grad, (params,), (v,))[1]

        def dot(u, v):
            pairs = zip(jax.tree.leaves(u), jax.tree.leaves(v), strict=True)
            return sum(jnp.vdot(a, b).real for a, b in pairs)

        def normalise(v):
            return jax.tree.map(lambda x: x / jnp.sqrt(dot(v, v)), v)

        def body(_, carry):
            v, _ = carry
            hv = jax.tree.map(lambda h, x: h - shift * x, hvp(v), v)
            return normalise(hv), (dot(v, hv) + shift).astype(jnp.float32)

        v = normalise(treedef.unflatten(start))
        return jax.lax.fori_loop(0, num_iterations, body, (v, jnp.zeros((), jnp.float32)))[1]

    dominant = float(power(params, args, start, 0.0))
    if dominant >= 0:
        return dominant
    return float(power(params, args, start, dominant))
