r"""Exact discrete-time analysis of x_{t+1} = x_t − a x_{t−τ_t} (update-index time).

What the server runs on a quadratic, per Hessian eigenvalue h, is the recursion
x_{t+1} = x_t − a x_{t−τ_t} with a = ηh (the gradient h·x_{t−τ_t} taken at the stale
parameters). With τ_t i.i.d. with law p on {0, …, K} and independent of the past, taking
expectations gives the *mean dynamics*

    m_{t+1} = m_t − a Σ_j w_j m_{t−j},   w_j = p_j 1[j ≤ S]

(S a staleness threshold: dropped gradients leave x unchanged but the step counts, as in
:func:`asgd_jax.stale`). Its characteristic polynomial is

    Q(z) = z^{K+1} − z^K + a Σ_j w_j z^{K−j},   equivalently  h(z) = z − 1 + a G(1/z) = 0,

G(y) = Σ_j w_j y^j the (sub-)probability generating function of the staleness. The mean
converges iff the spectral radius ρ = max |z| < 1, and decays like ρ^t (rate −log ρ per
update). Constant staleness τ gives z^{τ+1} − z^τ + a = 0, stable iff
0 < a < 2 sin(π / (2(2τ + 1))) (Levin & May 1976; Kuruklis 1994). Geometric staleness
(exponential compute times) gives G(y) = p/(1 − qy) and the quadratic
z² − (1 + q − ap) z + q = 0.

*Critical gain* (D-subdivision on the unit circle): a root z = e^{iθ} exists at gain
a = (1 − e^{iθ}) / G(e^{−iθ}) when that number is real and positive. Roots start inside the
unit circle at a = 0+ (one near 1 − aG(1), the others near 0), so the smallest such a over
θ ∈ (0, π] is where stability is first lost. For a constant τ this is θ = π/(2τ + 1).

*Second moment.* The mean can converge while the runs do not: with random delays the
recursion multiplies random matrices. Writing X_t = (x_t, …, x_{t−K}) and P_t = E[X_t X_tᵀ],
independence of τ_t gives the linear map P_{t+1} = Σ_j w_j A_j P_t A_jᵀ + (1 − Σw) A_∅ P_t A_∅ᵀ
(A_j the companion matrix of x_{t+1} = x_t − a x_{t−j}, A_∅ the shift that keeps x_t), i.e.

    P'[1:, 1:] = P[:−1, :−1],
    P'[0, l + 1] = P[0, l] − a (wᵀP)[l],
    P'[0, 0] = P[0, 0] − 2a (P w)[0] + a² Σ_j w_j P[j, j].

It differs from the outer product of the mean dynamics only in the last term
(a² Σ_j w_j P_jj instead of a² wᵀPw). Its spectral radius ρ₂ (a positive map, so ρ₂ is an
eigenvalue with a PSD eigenvector) decides mean-square convergence and the decay of the
expected loss E[h x²/2] ∝ ρ₂^t; ρ₂ ≥ ρ² with equality for a constant delay. For exponential
compute times the mean dynamics are stable up to a ≈ 4n, but runs diverge far earlier: ρ₂
sees it.

References:
  Yu, Chen & Poor, arXiv 2406.11159 (the continuous-time counterpart).
  Levin & May, "A note on difference-delay equations", Theor. Popul. Biol. 9 (1976).
  Kuruklis, "The asymptotic stability of x_{n+1} − a x_n + b x_{n−k} = 0", J. Math. Anal.
  Appl. 188 (1994).
  Costa, Fragoso & Marques, "Discrete-Time Markov Jump Linear Systems", Springer 2005
  (second-moment operators of random linear recursions).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import optimize, signal

from asgd_jax._validation import check_int, check_real
from asgd_jax.theory import _roots
from asgd_jax.theory._laws import _staleness_array

__all__ = [
    "constant_staleness_bound",
    "accepted_weights",
    "discrete_characteristic_polynomial",
    "discrete_characteristic_roots",
    "discrete_spectral_radius",
    "discrete_decay_rate",
    "discrete_is_stable",
    "discrete_critical_gain",
    "discrete_mean_square_radius",
    "discrete_mean_trajectory",
    "geometric_spectral_radius",
]


def _check_gain(gain: Any) -> float:
    """The gain a = ηh: finite and ≥ 0."""
    return check_real("gain", gain)


def constant_staleness_bound(staleness: int) -> float:
    """2 sin(π / (2(2τ + 1))): x_{t+1} = x_t − a x_{t−τ} is stable iff 0 < a < this.

    τ = 0 gives 2 (plain gradient descent); for large τ the bound is ≈ π / (2τ + 1).

    Args:
      staleness: τ, an integer ≥ 0.

    Returns:
      The supremum of the stable gains a = ηh.

    References:
      Levin & May, Theor. Popul. Biol. 9 (1976); Kuruklis, J. Math. Anal. Appl. 188 (1994).
    """
    staleness = check_int("staleness", staleness)
    return 2.0 * math.sin(math.pi / (2.0 * (2 * staleness + 1)))


def accepted_weights(
    staleness: Any = None,
    max_staleness: int | None = None,
    *,
    pmf: Any = None,
    trace: Any = None,
) -> np.ndarray:
    """w_j = p_j 1[j ≤ S]: the staleness law restricted to accepted gradients.

    Every function of this module takes the staleness law the same way: ``pmf=`` (weights on
    {0, …, K}, probabilities or counts) or ``trace=`` (observed values, or a
    ``workers.simulate`` result); a positional ``staleness`` is a pmf if it holds floats, a
    trace if it is a trace object (integer arrays: see :func:`staleness_delay`'s note).

    Args:
      staleness: a pmf (floats) or a trace object, positionally.
      max_staleness: S, or ``None`` to accept every gradient.
      pmf: the staleness pmf.
      trace: a staleness trace.

    Returns:
      The weights, trailing zeros removed; their sum is the acceptance probability.
    """
    pmf = _staleness_array(staleness, pmf=pmf, trace=trace)
    if max_staleness is not None:
        pmf = pmf[: check_int("max_staleness", max_staleness) + 1]
    nonzero = np.nonzero(pmf > 0)[0]
    if nonzero.size == 0:
        raise ValueError("every gradient would be dropped: no staleness ≤ max_staleness.")
    return pmf[: nonzero[-1] + 1].copy()


def discrete_characteristic_polynomial(
    gain: float,
    staleness: Any = None,
    *,
    max_staleness: int | None = None,
    pmf: Any = None,
    trace: Any = None,
) -> np.ndarray:
    """Coefficients (highest degree first) of z^{K+1} − z^K + a Σ_j w_j z^{K−j}."""
    a = _check_gain(gain)
    w = accepted_weights(staleness, max_staleness, pmf=pmf, trace=trace)
    coeffs = np.zeros(w.size + 1)
    coeffs[0] = 1.0
    coeffs[1] = -1.0
    coeffs[1:] += a * w
    return coeffs


def discrete_characteristic_roots(
    gain: float,
    staleness: Any = None,
    *,
    max_staleness: int | None = None,
    pmf: Any = None,
    trace: Any = None,
) -> np.ndarray:
    """All K + 1 roots of the characteristic polynomial (companion-matrix eigenvalues)."""
    coeffs = discrete_characteristic_polynomial(
        gain, staleness, max_staleness=max_staleness, pmf=pmf, trace=trace
    )
    return np.roots(coeffs)


def geometric_spectral_radius(gain: float, p: float, *, acceptance: float = 1.0) -> float:
    """ρ for i.i.d. Geometric(p) staleness on {0, 1, …} (no truncation), in closed form.

    G(y) = p/(1 − qy) turns h(z) = z − 1 + a·acc·G(1/z) into z² − (1 + q − a·acc·p) z + q.

    Args:
      gain: a = ηh.
      p: success probability (1/n for n exponential workers), in (0, 1].
      acceptance: a constant factor on the gain (use 1).
    """
    a = _check_gain(gain) * float(acceptance)
    if not 0 < p <= 1:
        raise ValueError(f"`p` must be in (0, 1], got {p}.")
    q = 1.0 - p
    roots = np.roots([1.0, -(1.0 + q - a * p), q])
    return float(np.max(np.abs(roots)))


def _newton_roots(weights: np.ndarray, a: float) -> tuple[np.ndarray, np.ndarray]:
    """Distinct roots of h(z) (one per conjugate pair) and their multiplicities.

    Newton from starts spread around the unit circle; double roots (e.g. the real one at
    the critical gain a* = τ^τ/(τ + 1)^{τ+1} of a constant staleness τ) are polished on h′
    (:func:`asgd_jax.theory._roots.distinct_roots`).
    """
    j = np.arange(weights.size)
    idx = np.nonzero(weights)[0].astype(np.float64)
    wts = weights[weights > 0]

    def terms(z, shift):
        return np.exp(-np.log(np.asarray(z, complex))[..., None] * (idx + shift))

    def h(z):
        return z - 1.0 + a * np.einsum("...j,j->...", terms(z, 0.0), wts)

    def dh(z):
        return 1.0 - a * np.einsum("...j,j->...", terms(z, 1.0), idx * wts)

    def d2h(z):
        return a * np.einsum("...j,j->...", terms(z, 2.0), idx * (idx + 1.0) * wts)

    def scale(z):
        return 1.0 + np.abs(z) + a * np.einsum("...j,j->...", np.abs(terms(z, 0.0)), wts)

    mean = float(j @ weights / weights.sum())
    theta_c = math.pi / (2.0 * mean + 1.0)
    angles = np.concatenate([[0.0, theta_c, 3 * theta_c, math.pi], np.linspace(0.2, 3.0, 6)])
    starts = np.concatenate([np.exp(1j * angles) * r for r in (0.7, 0.95, 1.0, 1.1)])
    starts = np.concatenate([starts, [1.0 - a * weights.sum()]])
    iterates, ok = _roots.newton(h, dh, starts, max_step=0.25)
    return _roots.distinct_roots(h, dh, d2h, iterates, ok, scale)


def discrete_spectral_radius(
    gain: float,
    staleness: Any = None,
    *,
    max_staleness: int | None = None,
    pmf: Any = None,
    trace: Any = None,
    method: str = "auto",
) -> float:
    """ρ = max |z| over the roots of the mean-dynamics characteristic polynomial.

    ``method="roots"``: numpy's companion-matrix eigenvalues (O(K³); inaccurate when the
    weights span many orders of magnitude, e.g. a long geometric tail).
    ``method="winding"`` (the default): Newton on h(z) = z − 1 + aG(1/z) from starts around
    the unit circle for a candidate ρ̂, certified by the argument principle (no root outside
    the circle of radius ρ̂(1 + 10⁻⁹), with the roots found divided out); when the
    certificate fails, bisection on the radius with root counts outside circles (to a
    relative 10⁻⁷). Double roots (e.g. the real one at a* = τ^τ/(τ + 1)^{τ+1} for a
    constant τ, where the mean decays fastest) are polished on h′ and certified with their
    Taylor series. The result is within a relative 10⁻⁷ of ρ in every case; a root count
    that fails raises instead of returning a coarse bracket. O(K log K) per count.

    Args:
      gain: a = ηh ≥ 0.
      staleness: a pmf on {0, …, K} or a staleness trace.
      max_staleness: S (drop τ > S) or ``None``.
      method: ``"auto"`` (= ``"winding"``), ``"roots"`` or ``"winding"``.

    Returns:
      ρ (1 for a = 0).

    References:
      Yu, Chen & Poor, arXiv 2406.11159 (whose SDDE this recursion discretises).
    """
    a = _check_gain(gain)
    w = accepted_weights(staleness, max_staleness, pmf=pmf, trace=trace)
    if method not in ("auto", "roots", "winding"):
        raise ValueError(f"`method` must be 'auto', 'roots' or 'winding', got {method!r}.")
    if a == 0:
        return 1.0
    if w.size == 1:
        return abs(1.0 - a * w[0])
    if method == "roots":
        return float(np.max(np.abs(discrete_characteristic_roots(a, w))))
    # Certificate: no root outside a circle just beyond the candidate. The roots Newton found
    # (and their conjugates) are divided out, so the circle may pass right next to them.
    roots, mult = _newton_roots(w, a)
    if roots.size and np.max(np.abs(roots)) > 1e-8:
        candidate = float(np.max(np.abs(roots)))
        both = np.concatenate([roots, np.conj(roots[np.abs(roots.imag) > 1e-12])])
        twice = np.concatenate([mult, mult[np.abs(roots.imag) > 1e-12]]) == 2
        # Rounding limits how close to a root h can be sampled: if the circle 10⁻⁹ out is
        # too close (two nearly equal roots), one 10⁻⁸ or 5·10⁻⁸ out still certifies ρ̂ to
        # the documented 10⁻⁷.
        for margin in (1e-9, 1e-8, 5e-8):
            outside = _roots.count_outside(
                w, a, candidate * (1.0 + margin), both[~twice], both[twice], 2**16
            )
            if outside == 0:
                return candidate
            if outside is not None:
                break
    # Bisection on the radius: ρ ≤ 1 + aΣw (|z| ≥ 1 ⇒ |z − 1| ≤ aΣw) and ρ is at least the
    # geometric mean of the root moduli, (a w_K)^{1/(K+1)}. A count that cannot be made
    # (a root right on the circle) is retried on a circle 10⁻⁹ further out; it never ends
    # the bisection early.
    hi = (1.0 + a * w.sum()) * (1.0 + 1e-12)
    lo = (a * w[-1]) ** (1.0 / w.size) * (1.0 - 1e-9)
    while hi - lo > 1e-7 * hi:
        mid = 0.5 * (lo + hi)
        count = None
        for nudge in range(4):
            count = _roots.count_outside(w, a, mid * (1.0 + 1e-9 * nudge))
            if count is not None:
                break
        if count is None:
            raise ArithmeticError(
                f"discrete_spectral_radius: no root count on the circle |z| = {mid:.9g} "
                f"(gain {a}); try method='roots'."
            )
        if count >= 1:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def discrete_mean_trajectory(
    gain: float,
    staleness: Any = None,
    num_steps: int | None = None,
    *,
    max_staleness: int | None = None,
    initial: float = 1.0,
    pmf: Any = None,
    trace: Any = None,
) -> np.ndarray:
    """m_0, …, m_T of the mean dynamics m_{t+1} = m_t − a Σ_j w_j m_{t−j}, m_{−j} = m_0.

    The constant initial history is what the simulation does: every worker starts from W_0
    and :func:`asgd_jax.stale` reads W_0 for any staleness beyond the steps taken. Run as an
    IIR filter (``scipy.signal.lfilter``), so it costs O(T·K) in C; unlike the leading-root
    estimate it includes every mode with its residue.

    Args:
      gain: a = ηh ≥ 0.
      staleness: a pmf on {0, …, K} or a staleness trace.
      num_steps: T ≥ 0.
      max_staleness: S or ``None``.
      initial: m_0.

    Returns:
      A float64 array of length T + 1 (it overflows to ±inf when the dynamics diverge).
    """
    a = _check_gain(gain)
    w = accepted_weights(staleness, max_staleness, pmf=pmf, trace=trace)
    num_steps = check_int("num_steps", num_steps)
    denominator = np.zeros(w.size + 1)
    denominator[0] = 1.0
    denominator[1] = -1.0
    denominator[1:] += a * w
    past = np.full(w.size, float(initial))  # m_0, m_{−1}, …, m_{−K}
    state = signal.lfiltic([1.0], denominator, past)
    with np.errstate(all="ignore"):
        future, _ = signal.lfilter([1.0], denominator, np.zeros(int(num_steps)), zi=state)
    return np.concatenate([[float(initial)], future])


def discrete_decay_rate(
    gain: float,
    staleness: Any = None,
    *,
    max_staleness: int | None = None,
    pmf: Any = None,
    trace: Any = None,
) -> float:
    """−log ρ: the decay rate of the mean per update (negative when it diverges)."""
    rho = discrete_spectral_radius(
        gain, staleness, max_staleness=max_staleness, pmf=pmf, trace=trace
    )
    return -math.log(rho) if rho > 0 else math.inf


def discrete_is_stable(
    gain: float,
    staleness: Any = None,
    *,
    max_staleness: int | None = None,
    pmf: Any = None,
    trace: Any = None,
) -> bool:
    """Whether the mean dynamics converge (ρ < 1)."""
    return (
        discrete_spectral_radius(gain, staleness, max_staleness=max_staleness, pmf=pmf, trace=trace)
        < 1.0
    )


def discrete_critical_gain(
    staleness: Any = None, *, max_staleness: int | None = None, pmf: Any = None, trace: Any = None
) -> float:
    """a*: the smallest ηh at which a root of the mean dynamics reaches the unit circle.

    D-subdivision (module docstring): min over θ ∈ (0, π] with (1 − e^{iθ}) conj(G(e^{−iθ}))
    real and positive of (1 − e^{iθ}) / G(e^{−iθ}). G on a fine θ grid comes from one FFT;
    sign changes of the imaginary part are refined with Brent's method. ``inf`` when no
    crossing exists.

    Args:
      staleness: a pmf on {0, …, K} or a staleness trace.
      max_staleness: S or ``None``.
    """
    w = accepted_weights(staleness, max_staleness, pmf=pmf, trace=trace)
    K = w.size - 1
    j = np.arange(K + 1)
    m = 64
    while m < 64 * (K + 1):
        m *= 2

    def cross(theta):
        g = np.einsum("...j,j->...", np.exp(-1j * np.multiply.outer(theta, j)), w)
        return (1.0 - np.exp(1j * theta)) * np.conj(g), np.abs(g) ** 2

    folded = np.bincount(j % m, weights=w, minlength=m)
    g_grid = np.fft.fft(folded)[: m // 2 + 1]  # G(e^{−iθ}) at θ = 2πl/m, l ≤ m/2
    theta = 2.0 * np.pi * np.arange(m // 2 + 1) / m
    numer = (1.0 - np.exp(1j * theta)) * np.conj(g_grid)
    im = np.imag(numer)
    best = math.inf
    for i in np.nonzero(np.sign(im[1:-1]) * np.sign(im[2:]) < 0)[0] + 1:
        t = optimize.brentq(
            lambda x: float(np.imag(cross(np.array([x]))[0][0])),
            theta[i],
            theta[i + 1],
            xtol=1e-15,
        )
        value, norm2 = cross(np.array([t]))
        if value[0].real > 0 and norm2[0] > 0:
            best = min(best, float(value[0].real / norm2[0]))
    g_minus_one = float(np.sum(w * (-1.0) ** j))  # θ = π: a = 2 / G(−1) when G(−1) > 0
    if g_minus_one > 0:
        best = min(best, 2.0 / g_minus_one)
    return best


def _second_moment_solution(w: np.ndarray, a: float, rho: float) -> np.ndarray:
    """X solving ρX − T(X) = e₀e₀ᵀ, via a (K + 1)-vector: X[i, l] = ρ^{−min(i,l)} ψ(|i − l|).

    The rows (i + 1, l + 1) of the equation read ρX[i + 1, l + 1] = X[i, l], which forces
    that form; the first row gives K + 1 linear equations for ψ:
    ρψ(0) − ψ(0) + 2a Σ_j w_j ψ(j) − a² Σ_j w_j ρ^{−j} ψ(0) = 1 and, for d = 1, …, K,
    ρψ(d) − ψ(d − 1) + a Σ_j w_j ρ^{−min(j, d−1)} ψ(|j − d + 1|) = 0.
    """
    size = w.size
    j = np.arange(size)
    power = rho ** (-j.astype(np.float64))
    system = np.zeros((size, size))
    system[0, 0] = rho - 1.0 - a * a * float(w @ power)
    system[0, :] += 2.0 * a * w
    rhs = np.zeros(size)
    rhs[0] = 1.0
    rows = np.arange(1, size)
    system[rows, rows] += rho
    system[rows, rows - 1] -= 1.0
    prev = (rows - 1)[:, None]  # d − 1, against every j
    flat = rows[:, None] * size + np.abs(j[None, :] - prev)
    values = a * w[None, :] * power[np.minimum(j[None, :], prev)]
    system += np.bincount(flat.ravel(), values.ravel(), minlength=size * size).reshape(size, size)
    psi = np.linalg.solve(system, rhs)
    lo = np.minimum.outer(j, j)
    return power[lo] * psi[np.abs(np.subtract.outer(j, j))]


def _is_positive_definite(x: np.ndarray) -> bool:
    if not np.all(np.isfinite(x)):
        return False
    try:
        np.linalg.cholesky(0.5 * (x + x.T))
    except np.linalg.LinAlgError:
        return False
    return True


def discrete_mean_square_radius(
    gain: float,
    staleness: Any = None,
    *,
    max_staleness: int | None = None,
    pmf: Any = None,
    trace: Any = None,
) -> float:
    """ρ₂: spectral radius of the second-moment map of x_{t+1} = x_t − a x_{t−τ_t}, τ_t i.i.d.

    E[x_t²] (and the expected loss) decays like ρ₂^t; ρ₂ < 1 is mean-square stability, and
    ρ₂ ≥ ρ² (equality for a constant delay). The map T (module docstring) is positive, so
    for ρ > ρ₂ the series X = Σ_t ρ^{−t−1} T^t(e₀e₀ᵀ) converges to a positive definite
    solution of ρX − T(X) = e₀e₀ᵀ, while for ρ < ρ₂ that equation has no positive
    semidefinite solution (pair it with the Perron eigenvector of the adjoint map). Every
    solution has the form X[i, l] = ρ^{−min(i,l)} ψ(|i − l|), so each test is a (K + 1)-sized
    linear solve plus a Cholesky factorisation, and ρ₂ is found by bisection between ρ² and
    (1 + aΣw)² to a relative 10⁻¹⁰.

    Args:
      gain: a = ηh ≥ 0.
      staleness: a pmf on {0, …, K} or a staleness trace (τ assumed i.i.d.).
      max_staleness: S or ``None``.
    """
    a = _check_gain(gain)
    w = accepted_weights(staleness, max_staleness, pmf=pmf, trace=trace)
    if a == 0:
        return 1.0
    if w.size == 1:  # no delay: E[x²] multiplies by (1 − a w₀)² + a² w₀ (1 − w₀)
        return (1.0 - a * w[0]) ** 2 + a * a * w[0] * (1.0 - w[0])
    lo = discrete_spectral_radius(a, w) ** 2 * (1.0 - 1e-12)
    hi = (1.0 + a * w.sum()) ** 2 * (1.0 + 1e-12)
    above = lambda rho: _is_positive_definite(_second_moment_solution(w, a, rho))
    if above(lo):
        return lo
    while hi - lo > 1e-10 * hi:
        mid = 0.5 * (lo + hi)
        with np.errstate(all="ignore"):
            ok = above(mid)
        lo, hi = (lo, mid) if ok else (mid, hi)
    return 0.5 * (lo + hi)
