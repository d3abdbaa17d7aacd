"""Expected order statistics of the workers' compute times (for the closed-form rates)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import scipy.integrate
import scipy.special
import scipy.stats

from asgd_jax._validation import check_int
from asgd_jax.workers._laws import ComputeTime, Deterministic, _requires_concrete


def expected_order_statistic(
    law: ComputeTime,
    k: int,
    n: int,
    *,
    multipliers: Sequence[float] | None = None,
    shift: float = 0.0,
) -> float:
    """E[T_(k:n)], the k-th smallest of n independent times T_i = m_i·X_i + ``shift``.

    X_i ~ ``law`` i.i.d.; ``multipliers`` m_i (default all 1) model heterogeneous speeds.
    This is the expected round time of K-sync SGD (k = K) and of fully synchronous SGD
    (k = n). Equal multipliers use E[X_(k:n)] = ∫₀¹ ppf(u)·Beta(u; k, n−k+1) du; otherwise
    ∫₀^∞ P(T_(k) > t) dt with P(T_(k) > t) = P(fewer than k of the T_i are ≤ t), a
    convolution of binomials over the groups of equal m_i.

    Returns:
      The expectation (``math.inf`` when it diverges, e.g. Pareto with (n−k+1)·alpha ≤ 1).
    """
    _requires_concrete(law, "expected_order_statistic")
    n = check_int("n", n, low=1)
    k = check_int("k", k, low=1, high=n)
    m = np.ones(n) if multipliers is None else np.asarray(multipliers, np.float64)
    if m.shape != (n,) or not np.all(np.isfinite(m)) or np.any(m <= 0):
        raise ValueError(f"`multipliers` must be {n} finite positive numbers.")
    if (n - k + 1) * law.tail_index <= 1:
        return math.inf
    if isinstance(law, Deterministic):
        return float(np.sort(m * law.time)[k - 1]) + shift
    groups, counts = np.unique(m, return_counts=True)
    if groups.size == 1:
        beta = scipy.stats.beta(k, n - k + 1)
        f = lambda u: float(law.ppf(u)) * beta.pdf(u)
        inner = scipy.integrate.quad(f, 0.0, 1.0, limit=400, points=[beta.mean()])[0]
        return float(groups[0]) * inner + shift

    def survival(t: float) -> float:
        dist = np.zeros(k)
        dist[0] = 1.0
        for g, c in zip(groups, counts, strict=True):
            p = float(law.cdf(t / g))
            pmf = scipy.stats.binom.pmf(np.arange(min(int(c), k - 1) + 1), int(c), p)
            dist = np.convolve(dist, pmf)[:k]
        return float(dist.sum())

    knots = sorted({float(g * law.ppf(q)) for g in groups for q in (0.01, 0.5, 0.99)})
    head = scipy.integrate.quad(survival, 0.0, knots[-1], limit=400, points=knots[:-1])[0]
    tail = scipy.integrate.quad(survival, knots[-1], math.inf, limit=400)[0]
    return head + tail + shift
