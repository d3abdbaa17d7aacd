r"""From n workers to the SDDE, and the number of workers that reaches a loss level first.

Mapping (Yu, Chen & Poor, arXiv 2406.11159, derived here from first principles). n workers
are always busy; worker cycles (compute time T plus communication c) are i.i.d. with mean
E[C] = E[T] + c.

* Update rate. Each worker is a renewal process of rate 1/E[C], so the server receives
  Λ = n / E[C] gradients per unit time (exact in steady state for any law); their
  superposition is close to a Poisson process for large n, the approximation behind the SDDE.
* Staleness. A gradient's staleness τ counts the updates applied during its cycle C₀. Every
  other worker finishes on average C₀ / E[C] times in that window, so τ ≈ (n − 1) C₀ / E[C]
  and E[τ] = n − 1 for any law (this is also the exact steady-state mean). The law is exact
  in two cases: constant compute times give τ = n − 1; exponential ones give
  τ ~ Geometric(1/n) on {0, 1, …} (memorylessness: each arrival after a pull is the puller's
  own with probability 1/n). Other laws use the fluid law τ ≈ (n − 1) C₀/E[C] of the
  quantiles of C₀ (mass split between ⌊·⌋ and ⌈·⌉ so the mean stays n − 1), or a pmf
  measured by :func:`asgd_jax.workers.simulate`.
* Delay in time units. D = (τ + ½)/Λ (see :func:`~asgd_jax.theory.staleness_delay` for the
  half step), i.e. D ≈ ((n − 1)/n) C₀ + E[C]/(2n): the cycle law scaled by (n − 1)/n and
  shifted by half an update interval. Constant cycles give D = E[C](n − ½)/n.
* Staleness threshold S (dropping). Gradients with τ > S are discarded; to first order the
  staleness law is unchanged, so p_acc = P(τ ≤ S), applied updates arrive at rate Λ p_acc,
  the applied staleness has the law of τ given τ ≤ S, and D = (τ + ½)/(Λ p_acc). Dropping
  also lowers later staleness (fewer versions are created), which this first-order map
  ignores: pass a simulated pmf where it matters.
* Per Hessian eigenvalue h: k = η Λ h p_acc and, with gradient-noise standard deviation σ
  per coordinate, g = η σ √(Λ p_acc).

Predicted wall-clock time to a loss ε: each eigen-mode's expected loss h x²/2 decays at twice
its amplitude rate r (per unit time) towards the noise floor h V/2
(:func:`~asgd_jax.theory.hitting_time`). The amplitude rate is Λ p_acc (−log ρ) for the
exact discrete recursion (``method="discrete"``, ρ its spectral radius per applied update;
``moment="second"`` uses √ρ₂ of the second-moment map instead, which accounts for the
randomness of the delays) or −Re s* of the SDDE (``method="sdde"``). With
``method="discrete"`` and the first moment the hitting time is then refined on the exact
mean trajectory of every mode (:func:`~asgd_jax.theory.discrete_mean_trajectory`): near the
stability boundary the leading root alone, taken with unit weight, is pessimistic because the
constant initial history excites the slow oscillation only weakly. More workers raise Λ
(faster) but also the delay (slower, eventually unstable): the predicted time is smallest at
some n* and infinite from the first n whose dynamics diverge.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from asgd_jax._validation import check_int, check_real
from asgd_jax.theory import _continuous, _discrete
from asgd_jax.theory._laws import (
    DelayLaw,
    constant_delay,
    empirical_delay,
    exponential_delay,
    shifted_delay,
    staleness_delay,
)

__all__ = [
    "cycle_mean",
    "update_rate",
    "worker_staleness",
    "worker_delay",
    "WorkerPrediction",
    "predict",
    "OptimalWorkers",
    "optimal_num_workers",
]


def _check_workers(num_workers: Any) -> int:
    return check_int("num_workers", num_workers, low=1)


def _law_kind(compute_time: Any) -> str:
    """``"deterministic"``, ``"exponential"``, ``"shifted_exponential"`` or ``"general"``.

    Duck-typed, so that this module needs nothing from the simulator: a number is a constant
    time; a law with zero ``var`` is deterministic; a law whose Laplace transform is
    1/(1 + s·mean) at two points is exponential; ``shift`` and ``scale`` attributes with
    e^{−s·shift}/(1 + s·scale) make a shifted exponential.
    """
    mean = cycle_mean(compute_time)  # validates a number or a law's mean first
    if isinstance(compute_time, numbers.Real) and not isinstance(compute_time, bool):
        return "deterministic"
    if getattr(compute_time, "var", None) == 0:
        return "deterministic"
    laplace = getattr(compute_time, "laplace", None)
    if laplace is None:
        return "general"
    probe = np.array([1.0, 3.0]) / mean
    try:
        values = np.asarray(laplace(probe), np.float64)
    except (TypeError, ValueError):
        return "general"
    if np.allclose(values, 1.0 / (1.0 + probe * mean), rtol=1e-10, atol=0):
        return "exponential"
    shift, scale = getattr(compute_time, "shift", None), getattr(compute_time, "scale", None)
    if isinstance(shift, numbers.Real) and isinstance(scale, numbers.Real) and scale > 0:
        expected = np.exp(-probe * shift) / (1.0 + probe * scale)
        if np.allclose(values, expected, rtol=1e-10, atol=0):
            return "shifted_exponential"
    return "general"


def cycle_mean(compute_time: Any, communication: float = 0.0) -> float:
    """E[C] = E[T] + c for a compute-time law (anything with ``.mean``) or a number."""
    comm = check_real("communication", communication)
    if isinstance(compute_time, numbers.Real) and not isinstance(compute_time, bool):
        mean = float(compute_time)
    else:
        mean = getattr(compute_time, "mean", None)
        if mean is None:
            raise TypeError(
                "`compute_time` must be a number or a law with a `.mean` (e.g. "
                f"asgd_jax.workers.exponential(1.0)), got {compute_time!r}."
            )
        mean = float(mean)
    if not math.isfinite(mean) or mean <= 0:
        raise ValueError(
            "`compute_time` must be a finite positive number or a law with a finite positive "
            f"mean, got {compute_time!r} (mean {mean})."
        )
    return mean + comm


def update_rate(num_workers: int, compute_time: Any, communication: float = 0.0) -> float:
    """Λ = n / E[C]: gradients per unit time from n always-busy workers (renewal theorem)."""
    return _check_workers(num_workers) / cycle_mean(compute_time, communication)


def _quantiles(compute_time: Any, count: int) -> np.ndarray:
    ppf = getattr(compute_time, "ppf", None)
    if ppf is None:
        raise TypeError(
            "a compute-time law that is neither deterministic nor exponential needs a `ppf` "
            f"(quantile function) for the theory; got {compute_time!r}. Pass a staleness pmf "
            "measured with asgd_jax.workers.simulate instead."
        )
    u = (np.arange(count) + 0.5) / count
    return np.asarray(ppf(u), np.float64)


def worker_staleness(
    num_workers: int,
    compute_time: Any,
    communication: float = 0.0,
    *,
    tail: float = 1e-10,
    num_quantiles: int = 4096,
) -> np.ndarray:
    """The steady-state staleness pmf of n always-busy workers (module docstring).

    Exact for constant cycles (τ = n − 1) and for exponential compute times without
    communication (Geometric(1/n), truncated where its tail falls below ``tail``); the fluid
    law τ ≈ (n − 1) C/E[C] over ``num_quantiles`` quantiles of C otherwise.

    Args:
      num_workers: n ≥ 1.
      compute_time: a compute-time law (``mean``; ``var``/``laplace``/``ppf`` as available) or
        a number (constant).
      communication: a constant c ≥ 0 added to every cycle.
      tail: truncation mass of the geometric law. Truncation moves the roots of the mean
        dynamics near modulus √(1 − 1/n) by about √tail (see
        :func:`~asgd_jax.theory.geometric_spectral_radius` for the untruncated law).
      num_quantiles: resolution of the fluid law.

    Returns:
      A pmf on {0, …, K}.
    """
    n = _check_workers(num_workers)
    comm = check_real("communication", communication)
    kind = _law_kind(compute_time)
    if n == 1:
        return np.ones(1)
    if kind == "deterministic":
        pmf = np.zeros(n)
        pmf[-1] = 1.0
        return pmf
    if kind == "exponential" and comm == 0:
        q = 1.0 - 1.0 / n
        size = int(math.ceil(math.log(tail) / math.log(q))) + 1
        pmf = (1.0 - q) * q ** np.arange(size)
        return pmf / pmf.sum()
    cycles = _quantiles(compute_time, num_quantiles) + comm
    scaled = (n - 1) * cycles / cycles.mean()
    low = np.floor(scaled).astype(np.int64)
    frac = scaled - low
    pmf = np.bincount(low, 1.0 - frac, minlength=low.max() + 2)
    pmf += np.bincount(low + 1, frac, minlength=pmf.size)
    return pmf / pmf.sum()


def worker_delay(
    num_workers: int, compute_time: Any, communication: float = 0.0, *, num_quantiles: int = 4096
) -> DelayLaw:
    """The SDDE delay D ≈ ((n − 1)/n) C + E[C]/(2n) of n workers, in time units.

    Closed forms for constant, exponential and shifted-exponential compute times (a constant,
    a shifted exponential); the quantiles of C otherwise. See the module docstring.
    """
    n = _check_workers(num_workers)
    comm = check_real("communication", communication)
    mean = cycle_mean(compute_time, comm)
    factor = (n - 1) / n
    half_step = mean / (2.0 * n)
    kind = _law_kind(compute_time)
    if kind == "deterministic" or n == 1:
        return constant_delay(factor * mean + half_step)
    if kind == "exponential":
        body = exponential_delay(factor * (mean - comm))
        return shifted_delay(body, factor * comm + half_step)
    if kind == "shifted_exponential":
        body = exponential_delay(factor * float(compute_time.scale))
        return shifted_delay(body, factor * (float(compute_time.shift) + comm) + half_step)
    cycles = _quantiles(compute_time, num_quantiles) + comm
    return empirical_delay(factor * cycles + half_step, name="worker_delay")


@dataclasses.dataclass(frozen=True)
class WorkerPrediction:
    """What the theory predicts for one cluster size.

    Attributes:
      num_workers: n.
      update_rate: applied updates per unit time, Λ p_acc.
      acceptance: p_acc.
      mean_staleness: mean staleness of the applied gradients.
      rates: per-eigenvalue amplitude decay rates per unit time (negative: diverging).
      stable: whether every mode converges.
      stationary_loss: the predicted noise floor Σ h V / 2.
      time_to_epsilon: predicted wall-clock time to the loss ε (``inf`` if never).
    """

    num_workers: int
    update_rate: float
    acceptance: float
    mean_staleness: float
    rates: np.ndarray
    stable: bool
    stationary_loss: float
    time_to_epsilon: float


def _check_eigenvalues(hessian_eigenvalues: Any) -> np.ndarray:
    h = np.atleast_1d(np.asarray(hessian_eigenvalues, np.float64))
    if h.ndim != 1 or h.size == 0 or not np.all(np.isfinite(h)) or np.any(h <= 0):
        raise ValueError(
            "`hessian_eigenvalues` must be a non-empty 1-D array of finite positive numbers."
        )
    return h


def predict(
    num_workers: int,
    learning_rate: float,
    hessian_eigenvalues: Any,
    compute_time: Any,
    epsilon: float,
    *,
    initial_point: Any = None,
    noise_std: float = 0.0,
    communication: float = 0.0,
    max_staleness: int | None = None,
    staleness: Any = None,
    method: str = "discrete",
    moment: str = "first",
) -> WorkerPrediction:
    """Predicted rates, stability and wall-clock time to ε for n workers on a quadratic.

    Loss ½ Σ_i h_i x_i² in the Hessian eigenbasis, SGD with step η and gradient noise of
    standard deviation ``noise_std`` per coordinate.

    Args:
      num_workers: n ≥ 1.
      learning_rate: η > 0.
      hessian_eigenvalues: the h_i > 0 (the full spectrum, or just its extremes).
      compute_time: a compute-time law or a number (see :func:`worker_staleness`).
      epsilon: the loss level ε > 0.
      initial_point: x_i(0) in the eigenbasis (default all ones).
      noise_std: σ ≥ 0.
      communication: constant time c added to every worker cycle.
      max_staleness: drop gradients with τ > S (first-order map of the module docstring).
      staleness: a staleness pmf or trace to use instead of :func:`worker_staleness`.
      method: ``"discrete"`` (exact recursion per update) or ``"sdde"``.
      moment: ``"first"`` (mean dynamics) or ``"second"`` (mean-square, discrete only; it
        drops the staleness law's last 10⁻⁴ of mass, as its cost grows like K³).

    Returns:
      A :class:`WorkerPrediction`.

    References:
      Yu, Chen & Poor, arXiv 2406.11159.
    """
    n = _check_workers(num_workers)
    eta = check_real("learning_rate", learning_rate)
    h = _check_eigenvalues(hessian_eigenvalues)
    sigma = check_real("noise_std", noise_std)
    if check_real("epsilon", epsilon) == 0:
        raise ValueError("`epsilon` must be > 0.")
    if eta == 0:
        raise ValueError("`learning_rate` must be > 0.")
    if method not in ("discrete", "sdde"):
        raise ValueError(f"`method` must be 'discrete' or 'sdde', got {method!r}.")
    if moment not in ("first", "second") or (moment == "second" and method != "discrete"):
        raise ValueError("`moment` must be 'first', or 'second' with method='discrete'.")
    x0 = np.ones_like(h) if initial_point is None else np.asarray(initial_point, np.float64)
    if x0.shape != h.shape:
        raise ValueError(f"`initial_point` must have shape {h.shape}, got {x0.shape}.")

    rate = update_rate(n, compute_time, communication)
    given = staleness is not None
    pmf = _discrete.accepted_weights(
        staleness if given else worker_staleness(n, compute_time, communication)
    )
    weights = _discrete.accepted_weights(pmf, max_staleness)
    acceptance = float(weights.sum())
    applied = weights / acceptance
    applied_rate = rate * acceptance
    mean_staleness = float(np.arange(applied.size) @ applied)
    if method == "sdde" and not given and max_staleness is None:
        delay = worker_delay(n, compute_time, communication)
    else:
        delay = staleness_delay(applied, applied_rate)

    geometric = (
        not given
        and max_staleness is None
        and n > 1
        and _law_kind(compute_time) == "exponential"
        and communication == 0
    )
    if moment == "second":
        # The second-moment test costs O(K³): drop the last 10⁻⁴ of staleness mass.
        keep = int(np.searchsorted(np.cumsum(applied), 1.0 - 1e-4)) + 1
        second_weights = applied[:keep] / applied[:keep].sum()
    rates = np.empty_like(h)
    for i, hi in enumerate(h):
        if method == "sdde":
            rates[i] = _continuous.convergence_rate(eta * applied_rate * hi, delay)
            continue
        if moment == "second":
            rho = math.sqrt(_discrete.discrete_mean_square_radius(eta * hi, second_weights))
        elif geometric:
            rho = _discrete.geometric_spectral_radius(eta * hi, 1.0 / n)
        else:
            rho = _discrete.discrete_spectral_radius(eta * hi, applied)
        rates[i] = applied_rate * (-math.log(rho)) if rho > 0 else math.inf

    stable = bool(np.all(rates > 0))
    l0 = 0.5 * h * x0**2
    floor = np.zeros_like(h)
    if sigma > 0:
        g = eta * sigma * math.sqrt(applied_rate)
        for i, hi in enumerate(h):
            variance = _continuous.stationary_variance(eta * applied_rate * hi, delay, g)
            floor[i] = 0.5 * hi * variance
    time = _continuous.hitting_time(rates, l0, epsilon, floor) if stable else math.inf
    if method == "discrete" and moment == "first" and math.isfinite(time) and time > 0:
        time = (
            _trajectory_hitting_time(
                eta * h, applied, x0, h, rates / applied_rate, floor, epsilon, time * applied_rate
            )
            / applied_rate
        )
    return WorkerPrediction(
        num_workers=n,
        update_rate=applied_rate,
        acceptance=acceptance,
        mean_staleness=mean_staleness,
        rates=rates,
        stable=stable,
        stationary_loss=float(floor.sum()),
        time_to_epsilon=time,
    )


def _trajectory_hitting_time(
    gains: np.ndarray,
    weights: np.ndarray,
    x0: np.ndarray,
    h: np.ndarray,
    rates: np.ndarray,
    floor: np.ndarray,
    epsilon: float,
    estimate: float,
) -> float:
    """Update from which Σ_i ½h_i m_i(t)² + ℓ_i^∞ (1 − e^{−2 r_i t}) stays ≤ ε (m the mean).

    An oscillating mode can dip below ε and come back; the time counted is the one after
    which the loss stays below ε (for the monotone leading-root curve it is the first hit).

    The mean trajectories come from :func:`~asgd_jax.theory.discrete_mean_trajectory` (all
    modes, with their residues, from the constant initial history of the simulation), run
    for a few times the leading-root ``estimate``; the estimate itself is returned if even a
    run 16 times as long does not reach ε.
    """
    steps = int(min(max(2.0 * estimate + 100.0, 200.0), 4e6))
    for _ in range(3):
        t = np.arange(steps + 1, dtype=np.float64)
        loss = np.zeros(steps + 1)
        for gain, x, hi, r, ell in zip(gains, x0, h, rates, floor, strict=True):
            m = _discrete.discrete_mean_trajectory(gain, weights, steps, initial=x)
            loss += 0.5 * hi * m * m + ell * -np.expm1(-2.0 * r * t)
        if loss[-1] <= epsilon:  # the last update at which the loss was still above ε, + 1
            above = np.nonzero(loss > epsilon)[0]
            return float(above[-1] + 1) if above.size else 0.0
        steps *= 4
    return estimate


@dataclasses.dataclass(frozen=True)
class OptimalWorkers:
    """Result of :func:`optimal_num_workers`.

    Attributes:
      num_workers: n*, the cluster size with the smallest predicted time to ε (``None`` when
        no size in the grid reaches ε).
      time_to_epsilon: that time.
      divergence_num_workers: the smallest n in the grid whose dynamics diverge (``None``
        if all converge).
      grid: the cluster sizes evaluated.
      times: predicted time to ε for each (``inf``: never).
      stable: whether each converges.
      predictions: the :class:`WorkerPrediction` of each.
    """

    num_workers: int | None
    time_to_epsilon: float
    divergence_num_workers: int | None
    grid: np.ndarray
    times: np.ndarray
    stable: np.ndarray
    predictions: tuple[WorkerPrediction, ...]


def optimal_num_workers(
    learning_rate: float,
    hessian_eigenvalues: Any,
    compute_time: Any,
    epsilon: float,
    *,
    num_workers: Sequence[int] | None = None,
    max_workers: int = 64,
    staleness: Callable[[int], Any] | None = None,
    **kwargs: Any,
) -> OptimalWorkers:
    """The n that minimises the predicted wall-clock time to ε, and where training diverges.

    Evaluates :func:`predict` on a grid of cluster sizes (``num_workers``, default
    1, …, ``max_workers``). With a fixed learning rate the time first falls like 1/n (more
    updates per unit time, little staleness), then rises as the staleness n − 1 slows the
    mean dynamics, and becomes infinite once they diverge (for constant compute times at
    the first n with ηh_max ≥ 2 sin(π/(2(2n − 1)))).

    Args:
      learning_rate: η > 0.
      hessian_eigenvalues: the spectrum (or its extremes), all > 0.
      compute_time: a compute-time law or a number.
      epsilon: the loss level ε > 0.
      num_workers: the grid of n to evaluate.
      max_workers: the grid's end when ``num_workers`` is not given.
      staleness: optional callable n ↦ staleness pmf or trace (e.g. measured by simulation).
      **kwargs: passed on to :func:`predict` (``initial_point``, ``noise_std``,
        ``communication``, ``max_staleness``, ``method``, ``moment``).

    Returns:
      An :class:`OptimalWorkers`.

    References:
      Yu, Chen & Poor, "Distributed Stochastic Gradient Descent with Staleness: A Stochastic
      Delay Differential Equation Based Framework", IEEE TSP 2025, arXiv 2406.11159.
    """
    if num_workers is None:
        grid = np.arange(1, _check_workers(max_workers) + 1)
    else:
        grid = np.asarray([_check_workers(n) for n in num_workers], np.int64)
        if grid.size == 0:
            raise ValueError("`num_workers` must not be empty.")
    predictions = tuple(
        predict(
            int(n),
            learning_rate,
            hessian_eigenvalues,
            compute_time,
            epsilon,
            staleness=None if staleness is None else staleness(int(n)),
            **kwargs,
        )
        for n in grid
    )
    times = np.array([p.time_to_epsilon for p in predictions])
    stable = np.array([p.stable for p in predictions])
    unstable = grid[~stable]
    best = int(np.argmin(times))
    reached = math.isfinite(times[best])
    return OptimalWorkers(
        num_workers=int(grid[best]) if reached else None,
        time_to_epsilon=float(times[best]),
        divergence_num_workers=int(unstable.min()) if unstable.size else None,
        grid=grid,
        times=times,
        stable=stable,
        predictions=predictions,
    )
