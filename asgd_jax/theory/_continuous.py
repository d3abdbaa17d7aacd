r"""The SDDE of asynchronous SGD on a quadratic: roots, stability, rates, variance, hitting time.

Model (Yu, Chen & Poor, arXiv 2406.11159). The server applies gradient updates at the
instants of a point process of rate Λ. By the Poisson approximation of aggregated arrivals
(the superposition of n independent renewal processes is close to Poisson for large n), the
number of updates in [t, t + dt) is Poisson(Λ dt). On a quadratic, in the eigenbasis of the
Hessian, each coordinate x with eigenvalue h moves by −η (h x(t − D) + ξ) per update, where D
is the age (in time units) of the parameters the gradient was computed at and ξ the gradient
noise (variance σ²). A fraction p_acc of the updates is accepted (staleness threshold).
Taking the drift and the variance per unit time gives the stochastic delay differential
equation

    dx(t) = −k E_D[x(t − D)] dt + g dB(t),   k = η Λ h p_acc,   g = η σ √(Λ p_acc).

Its mean m(t) = E[x(t)] solves the linear DDE m'(t) = −k E[m(t − D)], whose solutions are
sums of e^{st} over the roots of the characteristic function

    χ(s) = s + k L(s),   L(s) = E[e^{−sD}]   (the Laplace transform of the delay law).

* Convergence: all roots in the open left half-plane.
* Speed: the mean decays like e^{Re s* t}, s* the rightmost root; the rate is −Re s*.
* Stationary variance: V = g² ∫_0^∞ φ(t)² dt, φ the fundamental solution (Laplace transform
  1/χ(s)); by Parseval V = (g²/π) ∫_0^∞ |χ(iω)|^{−2} dω.

Closed forms used and tested here:

* D = 0 (no delay): root −k, V = g² / (2k) (Ornstein–Uhlenbeck). With k and g above,
  V = η σ² / (2h), the small-step limit of SGD's η²σ² / (1 − (1 − ηh)²).
* D = c constant: s + k e^{−sc} = 0 ⟺ (sc) e^{sc} = −kc, so s = W_b(−kc)/c over the branches
  b of the Lambert W function; the principal branch W₀ gives the rightmost root (Shinozaki &
  Mori 2006, Automatica 42(10)). For kc ≤ 1/e it is real (a double root −1/c at the branch
  point kc = 1/e, where W₀(−1/e) = −1); for kc > 1/e the rightmost roots are the complex pair
  W₀(−kc)/c and its conjugate, and the rate is −Re W₀(−kc)/c. Stable iff kc < π/2 (at
  kc = π/2 the roots ±iπ/(2c) sit on the imaginary axis). Fastest rate 1/c at kc = 1/e.
  Stationary variance (Küchler & Mensch 1992, Stoch. Stoch. Rep. 40):
  V = g² (1 + sin kc) / (2k cos kc), checked against the Parseval integral in the tests.
* D ~ Exponential(mean m): s + k/(1 + ms) = 0 ⟺ m s² + s + k = 0, rightmost root
  (−1 + √(1 − 4mk))/(2m); stable for every k > 0 (rate k for small k, 1/(2m) once 4mk ≥ 1).
  The delay is equivalent to the linear chain x' = −k y, y' = (x − y)/m, whose Lyapunov
  equation gives V = g² (1 + km) / (2k).
* D ~ Gamma(α, θ): L(s) = (1 + θs)^{−α}; on the imaginary axis the phase of L is
  −α·atan(ωθ), which reaches −π/2 only if α > 1, at ωθ = tan(π/(2α)); the critical gain is
  k* = tan(π/(2α)) / (θ cos^α(π/(2α))) (k* = 2/θ for α = 2, the Routh–Hurwitz bound of the
  cubic θ²s³ + 2θs² + s + k). Integer α is solved as a polynomial.
* D ~ Uniform[0, b]: L(iω) = e^{−iωb/2} sinc-like, the first crossing is at ωb = π with
  |L| = 2/π, hence k* = π² / (2b): a spread-out delay tolerates a larger k·E[D] (π²/4) than
  a constant one (π/2).

The critical gain of any law follows from the D-subdivision method: a root s = iω (ω > 0)
exists at gain k iff −iω / L(iω) = k is real and positive, i.e. Re L(iω) = 0 and
Im L(iω) < 0, giving k = ω / |L(iω)| ≥ ω. Roots start in the left half-plane at k = 0+ and
move continuously with k, so the smallest such gain is where stability is first lost.

References:
  Yu, Chen & Poor, "Distributed Stochastic Gradient Descent with Staleness: A Stochastic
  Delay Differential Equation Based Framework", IEEE TSP 2025, arXiv 2406.11159.
  Küchler & Mensch, "Langevin's stochastic differential equation extended by a time-delayed
  term", Stochastics and Stochastic Reports 40 (1992).
  Corless et al., "On the Lambert W function", Adv. Comput. Math. 5 (1996).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
from scipy import integrate, optimize, special

from asgd_jax._validation import check_real
from asgd_jax.theory import _roots
from asgd_jax.theory._laws import DelayLaw, constant_delay

__all__ = [
    "as_delay_law",
    "characteristic_function",
    "rightmost_root",
    "convergence_rate",
    "is_stable",
    "critical_gain",
    "stationary_variance",
    "expected_loss",
    "hitting_time",
]

_INV_E = math.exp(-1.0)


def as_delay_law(delay: Any) -> DelayLaw:
    """A :class:`DelayLaw`, or a number meaning a constant delay."""
    if isinstance(delay, DelayLaw):
        return delay
    if isinstance(delay, numbers.Real) and not isinstance(delay, bool):
        return constant_delay(float(delay))
    raise TypeError(
        "`delay` must be a DelayLaw (e.g. asgd_jax.theory.exponential_delay(2.0)) or a "
        f"non-negative number for a constant delay, got {delay!r}."
    )


def _check_gain(gain: Any) -> float:
    """The SDDE gain k = ηΛh·p_acc: finite and ≥ 0 (a non-negative Hessian eigenvalue)."""
    return check_real("gain", gain)


def characteristic_function(s: Any, gain: float, delay: Any) -> np.ndarray:
    """χ(s) = s + k E[e^{−sD}], the characteristic function of x'(t) = −k E[x(t − D)].

    Args:
      s: complex points (any shape).
      gain: k = η Λ h p_acc ≥ 0.
      delay: a :class:`DelayLaw` or a constant delay.

    Returns:
      χ(s), complex, shaped like ``s``.
    """
    law = as_delay_law(delay)
    s = np.asarray(s, np.complex128)
    return s + _check_gain(gain) * law.laplace(s)


# --------------------------------------------------------------------------------------------
# Closed forms.


def _lambert_root(k: float, c: float) -> complex:
    """W₀(−kc)/c, with the branch point −1/e handled exactly (W₀(−1/e) = −1)."""
    if c == 0:
        return complex(-k)
    z = -k * c
    if abs(z + _INV_E) <= 8 * np.finfo(float).eps:
        w = -1.0 + 0.0j
    else:
        w = complex(special.lambertw(z, 0))
        if z > -_INV_E:  # real branch: drop rounding noise in the imaginary part
            w = complex(w.real, 0.0)
    return w / c


def _exponential_root(k: float, m: float) -> complex:
    disc = complex(1.0 - 4.0 * m * k)
    return (-1.0 + np.sqrt(disc)) / (2.0 * m)


def _polynomial_gamma_root(k: float, shape: int, scale: float) -> complex:
    # s (1 + θ s)^α + k = 0.
    poly = np.polymul([1.0, 0.0], np.poly1d([scale, 1.0]) ** shape)
    coeffs = np.asarray(poly, np.float64).copy()
    coeffs[-1] += k
    roots = np.roots(coeffs)
    best = roots[np.argmax(roots.real)]
    return complex(best.real, abs(best.imag))


# --------------------------------------------------------------------------------------------
# General laws: real roots by convexity, complex roots by Newton, certified by the argument
# principle.


def _largest_real_root(k: float, law: DelayLaw) -> float | None:
    """The largest real root of f(σ) = σ + k L(σ), or ``None``.

    On the real axis f is convex (L'' = E[D² e^{−σD}] ≥ 0) and f(σ) > 0 for σ ≥ 0, so it has
    at most two real roots. If f'(0) = 1 − k E[D] ≤ 0, f decreases on σ ≤ 0 and stays above
    f(0) = k: no real root. Otherwise f has its minimum at σ_m < 0 (f'(σ_m) = 0, found by
    bracketing), and the larger root, if f(σ_m) ≤ 0, lies in [σ_m, 0].
    """
    f = lambda x: x + k * float(np.real(law.laplace(x)))
    fp = lambda x: 1.0 + k * float(np.real(law.laplace_derivative(x)))
    if fp(0.0) <= 0.0:
        return None
    floor = law.abscissa
    prev, lo = 0.0, -max(k, 1.0 / law.mean)
    with np.errstate(all="ignore"):
        for _ in range(4000):
            at_floor = math.isfinite(floor) and lo <= floor
            if at_floor:
                lo = floor + 1e-12 * (1.0 + abs(floor))
            value = fp(lo)
            if not math.isfinite(value):  # L overflowed: back off towards the last good point
                lo = 0.5 * (lo + prev)
                continue
            if value < 0:
                break
            if at_floor:  # f increasing on (σ_a, 0]: its infimum is the limit at σ_a
                return optimize.brentq(f, lo, 0.0, xtol=1e-15) if f(lo) < 0 else None
            prev, lo = lo, 2.0 * lo
        else:
            return None
        sigma_min = optimize.brentq(fp, lo, 0.0, xtol=1e-15, rtol=1e-15)
        lowest = f(sigma_min)
    if lowest > 1e-12 * (abs(sigma_min) + k):
        return None
    if lowest >= 0:  # a double root (e.g. kc = 1/e for a constant delay), up to rounding
        return sigma_min
    return optimize.brentq(f, sigma_min, 0.0, xtol=1e-15, rtol=4 * np.finfo(float).eps)


def _general_root(k: float, law: DelayLaw) -> complex:
    f = lambda s: s + k * law.laplace(s)
    df = lambda s: 1.0 + k * law.laplace_derivative(s)
    mean = law.mean
    scale = k + (1.0 / mean if mean > 0 else 0.0)
    valid = lambda s: np.real(s) > law.abscissa

    candidates: list[complex] = []
    real = _largest_real_root(k, law)
    if real is not None:
        candidates.append(complex(real))
    starts = [complex(-k)]
    if mean > 0:  # the roots of the constant-delay surrogate with the same mean
        starts += [complex(special.lambertw(-k * mean, b)) / mean for b in range(4)]
        starts.append(_exponential_root(k, mean))
    omega = max(k, math.pi / (2.0 * mean) if mean > 0 else k)
    grid_re = np.array([-1.0, -0.3, 0.0, 0.3]) * scale
    grid_im = np.array([0.25, 0.5, 1.0, 2.0, 4.0]) * omega
    starts += list((grid_re[:, None] + 1j * grid_im[None, :]).ravel())
    roots, ok = _roots.newton(f, df, np.array(starts), max_step=scale)
    candidates += [complex(r) for r in roots[ok & valid(roots)]]

    if candidates:
        best = max(candidates, key=lambda r: r.real)
    else:
        best = complex(max(-4.0 * scale, law.abscissa + 1e-3 * scale))
    # Certificate. Every root with Re s ≥ σ has |s| = k|L(s)| ≤ k L(σ) =: R, so the box
    # [σ, R] × [−R, R] holds all of them. Its left edge sits a little left of the candidate
    # (sampling right next to a root would need very many points); the box must then hold
    # exactly the known roots (the candidate and its conjugate). Otherwise all of its zeros
    # are found by subdivision, which certifies the rightmost of them directly.
    for attempt in range(6):
        sigma = best.real - 1e-3 * 2.0**-attempt * (abs(best) + scale)
        if sigma <= law.abscissa:
            sigma = 0.5 * (best.real + law.abscissa)
        radius = k * float(np.real(law.laplace(sigma)))
        pad = 1e-3 * scale
        box = (sigma, max(radius, best.real) + pad, -radius - pad, radius + pad)
        count = _roots.count_zeros_in_box(f, *box)
        if count is not None:
            break
    else:
        raise RuntimeError(f"root search failed for k={k}, delay={law!r}.")
    known = 1 if abs(best.imag) <= 1e-12 * (1.0 + abs(best)) else 2
    if count == known and candidates:
        return complex(best.real, abs(best.imag))
    found = _roots.zeros_in_box(f, df, box, count)
    if len(found) < count:
        raise RuntimeError(f"root search failed for k={k}, delay={law!r}.")
    best = max(found, key=lambda r: r.real)
    return complex(best.real, abs(best.imag))


def rightmost_root(gain: float, delay: Any, *, method: str = "auto") -> complex:
    """The rightmost root s* of s + k E[e^{−sD}] = 0 (the one with Im ≥ 0 of a pair).

    ``method="auto"`` uses the closed forms: Lambert W for a constant delay (W₀(−kc)/c, exact
    at the branch point kc = 1/e), the quadratic for an exponential delay and a polynomial
    for a Gamma delay with integer shape. Other laws (``method="general"`` forces it for all)
    are solved by (1) the largest real root, exactly, from the convexity of σ + kL(σ);
    (2) Newton on ℂ from the roots of the constant-delay surrogate with the same mean and a
    grid of starts; (3) a certificate: the argument principle on the box
    [Re s* + δ, R] × [−R, R], R = k L(Re s* + δ), must count no zero. Every root with
    Re s ≥ σ satisfies |s| = k|L(s)| ≤ k L(σ), so that box holds every root to the right
    of the candidate; if it is not empty, its zeros are found by recursive subdivision and
    the check repeats.

    Args:
      gain: k = η Λ h p_acc ≥ 0 (k = 0 gives s* = 0).
      delay: a :class:`DelayLaw` or a constant delay (number).
      method: ``"auto"`` or ``"general"``.

    Returns:
      s* as a Python complex.

    References:
      Yu, Chen & Poor, arXiv 2406.11159 (the characteristic equation of the SDDE);
      Shinozaki & Mori, Automatica 42(10), 2006 (W₀ gives the rightmost root).
    """
    k = _check_gain(gain)
    law = as_delay_law(delay)
    if method not in ("auto", "general"):
        raise ValueError(f"`method` must be 'auto' or 'general', got {method!r}.")
    if k == 0:
        return 0j
    if law.mean == 0:
        return complex(-k)
    if method == "auto":
        if law.kind == "constant":
            return _lambert_root(k, law.params["delay"])
        if law.kind == "exponential":
            return _exponential_root(k, law.params["mean"])
        shape = law.params.get("shape")
        if law.kind == "gamma" and float(shape).is_integer() and shape <= 64:
            return _polynomial_gamma_root(k, int(shape), law.params["scale"])
    return _general_root(k, law)


def convergence_rate(gain: float, delay: Any) -> float:
    """−Re s*: the exponential decay rate of E[x(t)] (negative when it diverges)."""
    return -rightmost_root(gain, delay).real


def is_stable(gain: float, delay: Any) -> bool:
    """Whether every characteristic root lies in the open left half-plane."""
    return rightmost_root(gain, delay).real < 0


def _crossing_gain_scan(law: DelayLaw) -> float:
    """D-subdivision: min over ω > 0 with Re L(iω) = 0 < −Im L(iω) of ω / |L(iω)|."""
    steps = [1.0 / (20.0 * law.mean)]
    if math.isfinite(law.max_delay) and law.max_delay > 0:
        steps.append(math.pi / (16.0 * law.max_delay))
    step = min(steps)
    omega_cap = 1e3 / law.mean
    re_l = lambda w: float(np.real(law.laplace(1j * w)))
    best = math.inf
    start = 0.0
    chunk = 4096
    while start < min(best, omega_cap):
        omegas = start + step * np.arange(1, chunk + 1)
        values = law.laplace(1j * omegas)
        re = np.real(values)
        flips = np.nonzero(np.sign(re[:-1]) * np.sign(re[1:]) < 0)[0]
        for i in flips:
            w = optimize.brentq(re_l, omegas[i], omegas[i + 1], xtol=1e-14, rtol=1e-14)
            im = float(np.imag(law.laplace(1j * w)))
            if im < 0:
                best = min(best, w / -im)
        exact = np.nonzero(re == 0)[0]
        for i in exact:
            if np.imag(values[i]) < 0:
                best = min(best, omegas[i] / -np.imag(values[i]))
        start = omegas[-1]
    return best


def critical_gain(delay: Any, *, method: str = "auto") -> float:
    """k*: the smallest gain at which a characteristic root reaches the imaginary axis.

    The system is stable for 0 < k < k*; ``inf`` means stable for every k (e.g. an
    exponential delay). Closed forms: π/(2c) (constant), ∞ (exponential, Gamma with α ≤ 1),
    tan(π/2α)/(θ cos^α(π/2α)) (Gamma, α > 1), π²/(2b) (Uniform[0, b]); otherwise the
    D-subdivision scan of the module docstring (frequencies up to 10³/E[D]).

    Args:
      delay: a :class:`DelayLaw` or a constant delay.
      method: ``"auto"`` or ``"general"`` (forces the scan).

    Returns:
      k* (``math.inf`` when no root ever reaches the imaginary axis).

    References:
      Yu, Chen & Poor, arXiv 2406.11159; Hale & Verduyn Lunel, "Introduction to Functional
      Differential Equations", Springer 1993 (D-subdivision).
    """
    law = as_delay_law(delay)
    if method not in ("auto", "general"):
        raise ValueError(f"`method` must be 'auto' or 'general', got {method!r}.")
    if law.mean == 0:
        return math.inf
    if method == "auto":
        if law.kind == "constant":
            return math.pi / (2.0 * law.params["delay"])
        if law.kind == "exponential":
            return math.inf
        if law.kind == "gamma":
            a, th = law.params["shape"], law.params["scale"]
            if a <= 1:
                return math.inf
            half = math.pi / (2.0 * a)
            return math.tan(half) / (th * math.cos(half) ** a)
        if law.kind == "uniform" and law.params["low"] == 0:
            return math.pi**2 / (2.0 * law.params["high"])
    return _crossing_gain_scan(law)


def stationary_variance(
    gain: float, delay: Any, noise_scale: float = 1.0, *, method: str = "auto"
) -> float:
    """Stationary variance of dx = −k E[x(t − D)] dt + g dB (``inf`` if not stable).

    Closed forms for D = 0 (g²/2k), a constant delay (Küchler & Mensch 1992,
    g²(1 + sin kc)/(2k cos kc)) and an exponential delay (g²(1 + km)/(2k)); otherwise the
    Parseval integral (g²/π) ∫_0^∞ |iω + kL(iω)|^{−2} dω by adaptive quadrature, with the
    tail beyond Ω taken as ∫_Ω^∞ ω^{−2} dω = 1/Ω.

    Args:
      gain: k > 0.
      delay: a :class:`DelayLaw` or a constant delay.
      noise_scale: g = η σ √(Λ p_acc) ≥ 0.
      method: ``"auto"`` or ``"parseval"`` (forces the integral).

    Returns:
      The stationary variance of x (``math.inf`` when the mean dynamics are not stable).

    References:
      Küchler & Mensch, Stochastics and Stochastic Reports 40 (1992); Yu, Chen & Poor,
      arXiv 2406.11159.
    """
    k = _check_gain(gain)
    law = as_delay_law(delay)
    g2 = check_real("noise_scale", noise_scale) ** 2
    if method not in ("auto", "parseval"):
        raise ValueError(f"`method` must be 'auto' or 'parseval', got {method!r}.")
    if k == 0:
        return math.inf if g2 > 0 else 0.0
    if method == "auto":
        if law.mean == 0:
            return g2 / (2.0 * k)
        if law.kind == "constant":
            kc = k * law.params["delay"]
            if kc >= math.pi / 2:
                return math.inf
            return g2 * (1.0 + math.sin(kc)) / (2.0 * k * math.cos(kc))
        if law.kind == "exponential":
            return g2 * (1.0 + k * law.params["mean"]) / (2.0 * k)
    root = rightmost_root(k, law)
    if root.real >= 0:
        return math.inf
    integrand = lambda w: 1.0 / abs(1j * w + k * complex(law.laplace(1j * w))) ** 2
    omega_max = 200.0 * (k + 1.0 / max(law.mean, 1e-300)) + 10.0 * abs(root)
    peak = min(abs(root.imag), omega_max)
    width = max(abs(root.real), 1e-12)
    points = sorted({max(peak - 10 * width, 0.0), peak, min(peak + 10 * width, omega_max)})
    value, _ = integrate.quad(integrand, 0.0, omega_max, points=points, limit=2000)
    return g2 * (value + 1.0 / omega_max) / math.pi


def expected_loss(
    time: Any, rates: Any, initial_losses: Any, stationary_losses: Any = 0.0
) -> np.ndarray:
    """Σ_i ℓ_i^∞ + (ℓ_i(0) − ℓ_i^∞) e^{−2 r_i t}: the leading-root loss curve.

    Mode i contributes (h_i/2) E[x_i²] = (h_i/2)(E[x_i]² + Var x_i); E[x_i] decays like
    e^{−r_i t} (rightmost root only, unit residue) and Var x_i relaxes to its stationary value
    at the same rate, as it does exactly for the OU process.

    Args:
      time: times (any shape).
      rates: r_i per mode (≥ 0; a negative rate makes the loss grow).
      initial_losses: ℓ_i(0) = h_i x_i(0)² / 2.
      stationary_losses: ℓ_i^∞ = h_i V_i / 2.
    """
    t = np.asarray(time, np.float64)[..., None]
    r = np.asarray(rates, np.float64)
    l0 = np.broadcast_to(np.asarray(initial_losses, np.float64), r.shape)
    linf = np.broadcast_to(np.asarray(stationary_losses, np.float64), r.shape)
    with np.errstate(over="ignore", invalid="ignore"):
        return np.sum(linf + (l0 - linf) * np.exp(-2.0 * r * t), axis=-1)


def hitting_time(
    rates: Any, initial_losses: Any, epsilon: float, stationary_losses: Any = 0.0
) -> float:
    """First time the predicted expected loss (:func:`expected_loss`) reaches ``epsilon``.

    For one mode this is t = log((ℓ(0) − ℓ^∞) / (ε − ℓ^∞)) / (2r), the OU formula; several
    modes are solved numerically. ``inf`` when a mode with positive initial loss does not
    decay (r ≤ 0) or ε is at or below the noise floor Σ ℓ_i^∞; 0 when ℓ(0) ≤ ε.

    Args:
      rates: per-mode rates r_i.
      initial_losses: ℓ_i(0).
      epsilon: the target loss level, > 0.
      stationary_losses: ℓ_i^∞ (0 without gradient noise).
    """
    eps = float(epsilon)
    if not eps > 0:
        raise ValueError(f"`epsilon` must be > 0, got {epsilon}.")
    r = np.atleast_1d(np.asarray(rates, np.float64))
    l0 = np.broadcast_to(np.asarray(initial_losses, np.float64), r.shape)
    linf = np.broadcast_to(np.asarray(stationary_losses, np.float64), r.shape)
    if float(np.sum(l0)) <= eps:
        return 0.0
    if np.any(~np.isfinite(linf)) or float(np.sum(linf)) >= eps:
        return math.inf
    if np.any((r <= 0) & (l0 != linf)):
        return math.inf
    loss = lambda t: float(expected_loss(t, r, l0, linf)) - eps
    hi = 1.0 / float(np.max(r))
    while loss(hi) > 0:
        hi *= 2.0
    return optimize.brentq(loss, 0.0, hi, xtol=1e-12 * hi, rtol=1e-12)
