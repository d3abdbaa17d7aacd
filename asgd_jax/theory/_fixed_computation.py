r"""Wall-clock theory of the fixed computation model: Rennala, Ringmaster, ASGD, sync SGD.

Worker i needs exactly τ_i seconds per stochastic gradient (sorted, τ_1 ≤ … ≤ τ_n), and

    H_m = (1/m · Σ_{i≤m} 1/τ_i)^{−1},    t(B) = min_{m∈[n]} H_m (1 + B/m)
                                              = min_m (B + m) / Σ_{i≤m} 1/τ_i

(H_m the harmonic mean of the m fastest). The problem is L-smooth, f(x_0) − inf f ≤ Δ, the
stochastic gradients have variance ≤ σ², and the target is an ε-stationary point,
E‖∇f‖² ≤ ε.

* **Collecting B gradients.** From a fresh start (every worker begins at time 0) the B-th
  gradient arrives at t*(B) = min{t : Σ_i ⌊t/τ_i⌋ ≥ B} (:func:`rennala_round_time`).
  Bounds: ½ t(B) ≤ t*(B) ≤ t(B). Upper: at t = (B + m)/Σ_{i≤m} 1/τ_i the m fastest have
  Σ_{i≤m} ⌊t/τ_i⌋ ≥ Σ_{i≤m} (t/τ_i − 1) = B. Lower: with m = #{i : τ_i ≤ t*},
  B ≤ t* Σ_{i≤m} 1/τ_i and t* ≥ τ_m ≥ m / Σ_{i≤m} 1/τ_i; adding, 2t* ≥ (B + m)/Σ_{i≤m} 1/τ_i.
  If workers are busy with stale work when the count starts (Rennala SGD without stops),
  each first finishes it, within τ_i, so the round lasts at most min_m (B + 2m)/Σ_{i≤m} 1/τ_i
  ≤ 2 t(B), the factor-2 form of Tyurin & Richtárik (2023).
* **Ringmaster's Lemma 4.1** (Maranjyan, Tyurin & Richtárik 2025): with threshold R, any R
  consecutive updates take at most 2 t(R). (Why: in a window of length t, a computation
  started inside it is ignored or stopped only after R updates inside it; otherwise each of
  the m fastest completes ⌊t/τ_i⌋ − 1 ≥ t/τ_i − 2 fresh gradients, all applied, which is R
  at t = (R + 2m)/Σ_{i≤m} 1/τ_i ≤ 2 t(R).) Hence K updates take at most ⌈K/R⌉ · 2 t(R).
* **Iterations.** Minibatch SGD with B gradients per step and γ = min{1/L, εB/(2Lσ²)}
  satisfies (1/K) Σ_k E‖∇f(x_k)‖² ≤ 2Δ/(γK) + γLσ²/B ≤ ε once
  K ≥ (4LΔ/ε) · max{1, 2σ²/(εB)} (descent lemma; derived here). Asynchronous SGD whose
  delays are all < R (Ringmaster by construction; plain ASGD with R − 1 its largest delay)
  needs K ≥ 8RLΔ/ε + 16σ²LΔ/ε² with γ = min{1/(2RL), ε/(4Lσ²)} (Maranjyan et al. 2025,
  their Theorem 4.1), and R = max{1, ⌈σ²/ε⌉} balances the two terms.
* **Lower bound** (Tyurin & Richtárik 2023): no method in this model (zero-respecting,
  ε-stationarity in expectation) beats, up to a universal constant,
  T_lb = min_m H_m (LΔ/ε + σ²LΔ/(mε²)); Rennala (S = ⌈σ²/ε⌉) and Ringmaster
  (R = ⌈σ²/ε⌉) attain it up to constants, while ASGD pays for its slowest worker's delay
  and synchronous SGD waits for τ_n every step.

Everything here is exact arithmetic on the τ_i (NumPy); the simulator
(:func:`asgd_jax.workers.parameter_server` with ``protocol="rennala"`` / ``"ringmaster"``)
checks the round times and Lemma 4.1 event by event.

References:
  Tyurin & Richtárik, "Optimal Time Complexities of Parallel Stochastic Optimization
  Methods Under a Fixed Computation Model", NeurIPS 2023, arXiv 2305.12387.
  Maranjyan, Tyurin & Richtárik, "Ringmaster ASGD: The First Asynchronous SGD with Optimal
  Time Complexity", ICML 2025, arXiv 2501.16168.
  Tyurin, "Tight Time Complexities in Parallel Stochastic Optimization with Arbitrary
  Computation Dynamics", arXiv 2408.04929.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from asgd_jax._validation import check_int, check_real

__all__ = [
    "RoundBounds",
    "TimeToEpsilon",
    "harmonic_means",
    "lower_bound_time",
    "rennala_round_bounds",
    "rennala_round_time",
    "ringmaster_threshold",
    "ringmaster_time_bound",
    "sgd_iterations",
    "time_complexities",
    "time_to_epsilon",
]


def _sorted_times(compute_times: Any) -> np.ndarray:
    """The τ_i as a sorted float64 array (finite, > 0), naming the argument otherwise."""
    tau = np.atleast_1d(np.asarray(compute_times, dtype=np.float64))
    if tau.ndim != 1 or tau.size == 0 or not np.all(np.isfinite(tau)) or np.any(tau <= 0):
        raise ValueError(
            "`compute_times` must be a non-empty 1-D array of finite times > 0 (seconds per "
            f"gradient of each worker), got {compute_times!r}."
        )
    return np.sort(tau)


def harmonic_means(compute_times: Any) -> np.ndarray:
    """H_m = (1/m Σ_{i≤m} 1/τ_i)^{−1} for m = 1, …, n (the τ_i sorted ascending).

    Args:
      compute_times: the τ_i > 0, in any order.

    Returns:
      A float64 array of length n (non-decreasing in m).
    """
    tau = _sorted_times(compute_times)
    return np.arange(1, tau.size + 1) / np.cumsum(1.0 / tau)


def _collection_time(tau: np.ndarray, batch: float, busy: int) -> float:
    """min_m (batch + busy·m) / Σ_{i≤m} 1/τ_i (tau sorted)."""
    m = np.arange(1, tau.size + 1)
    return float(np.min((batch + busy * m) / np.cumsum(1.0 / tau)))


def rennala_round_time(compute_times: Any, batch_size: int) -> float:
    """t*(S) = min{t : Σ_i ⌊t/τ_i⌋ ≥ S}: the time to collect S fresh gradients.

    The duration of every round of Rennala SGD with calculation stops (all workers restart
    at x_k), and of its first round without them. Exact: t* is one of the multiples c·τ_i,
    found by a bisection on c for every worker at once (O(n² log S)); a worker finishing
    exactly at t counts (relative tolerance 4·2⁻⁵² on the ratios t/τ_j).

    Args:
      compute_times: the τ_i > 0.
      batch_size: S ≥ 1.

    Returns:
      t*(S) in the time unit of the τ_i.

    References:
      Tyurin & Richtárik, NeurIPS 2023 (arXiv 2305.12387), the time of one Rennala round.
    """
    tau = _sorted_times(compute_times)
    s = check_int("batch_size", batch_size, low=1)

    def enough(t: np.ndarray) -> np.ndarray:  # t: (n,) candidate times → count ≥ S
        ratio = t[:, None] / tau[None, :] * (1.0 + 4.0 * np.finfo(np.float64).eps)
        return np.floor(ratio).sum(axis=1) >= s

    lo = np.zeros(tau.size, np.int64)  # enough(lo·τ_i) is False
    hi = np.full(tau.size, s, np.int64)  # enough(hi·τ_i) is True (worker i alone gives S)
    while np.any(hi - lo > 1):
        mid = (lo + hi) // 2
        ok = enough(mid * tau)
        hi = np.where(ok, mid, hi)
        lo = np.where(ok, lo, mid)
    return float(np.min(hi * tau))


@dataclasses.dataclass(frozen=True)
class RoundBounds:
    """Bounds on the time to collect S gradients (module docstring).

    Attributes:
      lower: ½ t(S) ≤ t*(S).
      upper: t(S) = min_m H_m (1 + S/m) ≥ t*(S) (fresh start; Rennala with stops).
      upper_without_stops: min_m (S + 2m)/Σ_{i≤m} 1/τ_i ≤ 2 t(S): any round of Rennala SGD
        without stops (workers first finish their stale computation).
    """

    lower: float
    upper: float
    upper_without_stops: float


def rennala_round_bounds(compute_times: Any, batch_size: int) -> RoundBounds:
    """½ t(S) ≤ t*(S) ≤ t(S), and the bound on a round without calculation stops.

    Args:
      compute_times: the τ_i > 0.
      batch_size: S ≥ 1.

    Returns:
      A :class:`RoundBounds`.

    References:
      Tyurin & Richtárik, NeurIPS 2023 (arXiv 2305.12387); the constants are derived in
      the module docstring.
    """
    tau = _sorted_times(compute_times)
    s = check_int("batch_size", batch_size, low=1)
    upper = _collection_time(tau, s, 1)
    return RoundBounds(0.5 * upper, upper, _collection_time(tau, s, 2))


def ringmaster_time_bound(
    compute_times: Any, threshold: int, num_updates: int | None = None
) -> float:
    """Lemma 4.1 of Ringmaster ASGD: R consecutive updates take at most 2 min_m H_m (1 + R/m).

    With or without calculation stops. For ``num_updates=K`` the bound on K updates,
    ⌈K/R⌉ · 2 t(R).

    Args:
      compute_times: the τ_i > 0.
      threshold: R ≥ 1.
      num_updates: K ≥ 1, or ``None`` for one window of R updates.

    Returns:
      The bound in the time unit of the τ_i.

    References:
      Maranjyan, Tyurin & Richtárik, ICML 2025 (arXiv 2501.16168), Lemma 4.1.
    """
    tau = _sorted_times(compute_times)
    r = check_int("threshold", threshold, low=1)
    window = 2.0 * _collection_time(tau, r, 1)
    if num_updates is None:
        return window
    return -(-check_int("num_updates", num_updates, low=1) // r) * window


def ringmaster_threshold(noise_variance: float, epsilon: float) -> int:
    """R = max{1, ⌈σ²/ε⌉}: the threshold that balances Ringmaster's two terms.

    References:
      Maranjyan, Tyurin & Richtárik, ICML 2025 (arXiv 2501.16168), Theorem 4.2.
    """
    sigma2 = check_real("noise_variance", noise_variance)
    eps = check_real("epsilon", epsilon, strict=True)
    return max(1, math.ceil(sigma2 / eps))


def _problem(smoothness, initial_gap, noise_variance, epsilon) -> tuple[float, ...]:
    return (
        check_real("smoothness", smoothness, strict=True),
        check_real("initial_gap", initial_gap, strict=True),
        check_real("noise_variance", noise_variance),
        check_real("epsilon", epsilon, strict=True),
    )


def sgd_iterations(
    batch_size: int,
    *,
    smoothness: float,
    initial_gap: float,
    noise_variance: float,
    epsilon: float,
    max_delay: int | None = None,
) -> int:
    """Updates that provably reach (1/K) Σ E‖∇f(x_k)‖² ≤ ε (module docstring).

    ``max_delay=None``: minibatch SGD with ``batch_size`` gradients per update,
    K = ⌈(4LΔ/ε) max{1, 2σ²/(εB)}⌉. ``max_delay=D``: asynchronous SGD (one gradient per
    update, every delay ≤ D, so R = D + 1), K = ⌈8RLΔ/ε + 16σ²LΔ/ε²⌉.

    References:
      Maranjyan, Tyurin & Richtárik, ICML 2025 (arXiv 2501.16168), Theorem 4.1 (delayed
      case).
    """
    lip, gap, sigma2, eps = _problem(smoothness, initial_gap, noise_variance, epsilon)
    b = check_int("batch_size", batch_size, low=1)
    if max_delay is None:
        return math.ceil(4.0 * lip * gap / eps * max(1.0, 2.0 * sigma2 / (eps * b)))
    r = check_int("max_delay", max_delay) + 1
    return math.ceil(8.0 * r * lip * gap / eps + 16.0 * sigma2 * lip * gap / eps**2)


def lower_bound_time(
    compute_times: Any,
    *,
    smoothness: float,
    initial_gap: float,
    noise_variance: float,
    epsilon: float,
) -> float:
    """T_lb = min_m H_m (LΔ/ε + σ²LΔ/(mε²)), the lower bound without its universal constant.

    References:
      Tyurin & Richtárik, NeurIPS 2023 (arXiv 2305.12387), the lower bound of the fixed
      computation model; Tyurin, arXiv 2408.04929 (the same bound for arbitrary dynamics).
    """
    tau = _sorted_times(compute_times)
    lip, gap, sigma2, eps = _problem(smoothness, initial_gap, noise_variance, epsilon)
    m = np.arange(1, tau.size + 1)
    return float(
        np.min(harmonic_means(tau) * (lip * gap / eps + sigma2 * lip * gap / (m * eps**2)))
    )


@dataclasses.dataclass(frozen=True)
class TimeToEpsilon:
    """Provable wall-clock bounds to an ε-stationary point, side by side.

    Attributes:
      synchronous: minibatch SGD over all n workers, K(n) rounds of τ_n.
      asgd: plain ASGD, K(R = D + 1) updates at the arrival rate Σ_i 1/τ_i, D its largest
        delay for these τ_i (that of the slowest worker, Σ_{j<n} (⌊τ_n/τ_j⌋ + 1)).
      rennala: Rennala with stops, K(S) rounds of exactly :func:`rennala_round_time`.
      rennala_without_stops: K(S) rounds of at most min_m (S + 2m)/Σ_{i≤m} 1/τ_i.
      ringmaster: Lemma 4.1, ⌈K(R)/R⌉ · 2 t(R).
      lower_bound: :func:`lower_bound_time` (no constant: compare shapes, not levels).
      batch_size: S = max{1, ⌈σ²/ε⌉}.
      threshold: R = max{1, ⌈σ²/ε⌉}.
      num_fastest: the m that attains the lower bound (the workers worth using).
    """

    synchronous: float
    asgd: float
    rennala: float
    rennala_without_stops: float
    ringmaster: float
    lower_bound: float
    batch_size: int
    threshold: int
    num_fastest: int


def time_to_epsilon(
    compute_times: Any,
    *,
    smoothness: float,
    initial_gap: float,
    noise_variance: float,
    epsilon: float,
) -> TimeToEpsilon:
    """Provable upper bounds on the time to ε of synchronous SGD, ASGD, Rennala, Ringmaster.

    Every iteration count and time per iteration uses the explicit constants of the module
    docstring. The delayed-gradient analysis (ASGD, Ringmaster) is looser than the minibatch
    one (synchronous SGD, Rennala) by a constant factor of about 2–4 even at delay 0, so
    compare asynchronous methods with each other and synchronous ones with each other;
    :func:`time_complexities` gives the orders without constants. The lower bound is given
    without its (unknown) universal constant.

    Args:
      compute_times: the τ_i > 0 (seconds per gradient of each worker).
      smoothness: L > 0.
      initial_gap: Δ = f(x_0) − inf f > 0.
      noise_variance: σ² ≥ 0.
      epsilon: ε > 0, the target E‖∇f‖².

    Returns:
      A :class:`TimeToEpsilon`.

    References:
      Tyurin & Richtárik, NeurIPS 2023 (arXiv 2305.12387); Maranjyan, Tyurin & Richtárik,
      ICML 2025 (arXiv 2501.16168).
    """
    tau = _sorted_times(compute_times)
    problem = dict(
        smoothness=smoothness,
        initial_gap=initial_gap,
        noise_variance=noise_variance,
        epsilon=epsilon,
    )
    lip, gap, sigma2, eps = _problem(**problem)
    n = tau.size
    s = r = ringmaster_threshold(sigma2, eps)
    ratios = np.floor(tau[-1] / tau[:-1] * (1.0 + 4.0 * np.finfo(np.float64).eps))
    asgd_delay = int(np.sum(ratios + 1.0))
    m = np.arange(1, n + 1)
    terms = harmonic_means(tau) * (lip * gap / eps + sigma2 * lip * gap / (m * eps**2))
    rounds = sgd_iterations(s, **problem)
    return TimeToEpsilon(
        synchronous=sgd_iterations(n, **problem) * float(tau[-1]),
        asgd=sgd_iterations(1, max_delay=asgd_delay, **problem) / float(np.sum(1.0 / tau)),
        rennala=rounds * rennala_round_time(tau, s),
        rennala_without_stops=rounds * _collection_time(tau, s, 2),
        ringmaster=ringmaster_time_bound(tau, r, sgd_iterations(1, max_delay=r - 1, **problem)),
        lower_bound=float(np.min(terms)),
        batch_size=s,
        threshold=r,
        num_fastest=int(np.argmin(terms)) + 1,
    )


def time_complexities(
    compute_times: Any,
    *,
    smoothness: float,
    initial_gap: float,
    noise_variance: float,
    epsilon: float,
) -> dict[str, float]:
    """The time complexities of the papers' comparison, without their constants.

    ``synchronous``: τ_n (LΔ/ε + σ²LΔ/(nε²)) (minibatch SGD waits for the slowest worker);
    ``asgd``: H_n (LΔ/ε + σ²LΔ/(nε²)) (the best known for ASGD with delay-adaptive steps,
    Koloskova et al. 2022, Mishchenko et al. 2022: it uses every worker, however slow);
    ``rennala``, ``ringmaster`` and ``lower_bound``: min_m H_m (LΔ/ε + σ²LΔ/(mε²)) (both
    methods are optimal up to constants).

    Returns:
      A dict of the five times (equal units, no constants).

    References:
      Tyurin & Richtárik, NeurIPS 2023 (arXiv 2305.12387), Table 1; Maranjyan, Tyurin &
      Richtárik, ICML 2025 (arXiv 2501.16168).
    """
    tau = _sorted_times(compute_times)
    lip, gap, sigma2, eps = _problem(smoothness, initial_gap, noise_variance, epsilon)
    n = tau.size
    per = lambda m: lip * gap / eps + sigma2 * lip * gap / (m * eps**2)  # noqa: E731
    optimal = float(np.min(harmonic_means(tau) * per(np.arange(1, n + 1))))
    return {
        "synchronous": float(tau[-1]) * per(n),
        "asgd": float(harmonic_means(tau)[-1]) * per(n),
        "rennala": optimal,
        "ringmaster": optimal,
        "lower_bound": optimal,
    }
