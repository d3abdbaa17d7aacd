"""Numerical building blocks for characteristic roots: argument principle and Newton on ℂ.

Both the SDDE characteristic function s + k L(s) and the discrete one z − 1 + a G(1/z) are
analytic where we evaluate them, so the number of zeros inside a closed contour equals the
winding number of the function's image around 0 (the argument principle). The root finders
use Newton's method for speed and the winding number as a certificate: a candidate is the
rightmost root only if a box (or the annulus) to its right holds no zero at all.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

ComplexFn = Callable[[np.ndarray], np.ndarray]

_MAX_POINTS = 2**20


def winding_number(values: np.ndarray) -> tuple[int, float]:
    """Winding number of a closed sampled path around 0 and the largest phase step (rad).

    ``values`` are samples along a closed path (the last one connects back to the first).
    """
    ratio = np.roll(values, -1) / values
    steps = np.angle(ratio)
    total = steps.sum() / (2.0 * np.pi)
    return int(np.rint(total)), float(np.max(np.abs(steps)))


def count_zeros_in_box(
    func: ComplexFn, re_lo: float, re_hi: float, im_lo: float, im_hi: float
) -> int | None:
    """Number of zeros of an analytic ``func`` inside an axis-aligned rectangle.

    The boundary is sampled with as many points as it takes for consecutive phases to differ
    by less than π/4 (doubling from 256 per side). Returns ``None`` when the function vanishes
    on (or is not finite near) the boundary, so the caller can move the contour.
    """
    m = 256
    while m <= _MAX_POINTS:
        t = np.linspace(0.0, 1.0, m, endpoint=False)
        width, height = re_hi - re_lo, im_hi - im_lo
        path = np.concatenate(
            [
                re_lo + width * t + 1j * im_lo,
                re_hi + 1j * (im_lo + height * t),
                re_hi - width * t + 1j * im_hi,
                re_lo + 1j * (im_hi - height * t),
            ]
        )
        with np.errstate(all="ignore"):
            values = func(path)
        if not np.all(np.isfinite(values)) or np.any(values == 0):
            return None
        count, largest_step = winding_number(values)
        if largest_step < np.pi / 4:
            return count
        m *= 2
    return None


def newton(
    func: ComplexFn,
    derivative: ComplexFn,
    starts: np.ndarray,
    *,
    max_step: float,
    iterations: int = 80,
) -> tuple[np.ndarray, np.ndarray]:
    """Damped Newton iteration on ℂ from many starts at once.

    Steps longer than ``max_step`` are shortened to it (keeps iterates from jumping across
    the plane where the function is flat). Returns the final iterates and a mask of those
    that converged (|f| tiny relative to the terms of f, or the last step negligible).
    """
    s = np.asarray(starts, np.complex128).copy()
    last_step = np.full(s.shape, np.inf)
    with np.errstate(all="ignore"):
        for _ in range(iterations):
            step = func(s) / derivative(s)
            size = np.abs(step)
            step = np.where(size > max_step, step * (max_step / size), step)
            step = np.where(np.isfinite(step), step, 0.0)
            s = s - step
            last_step = np.abs(step)
            if np.all(last_step <= 1e-15 * (1.0 + np.abs(s))):
                break
        residual = np.abs(func(s))
    ok = np.isfinite(s) & (last_step <= 1e-10 * (1.0 + np.abs(s)))
    ok &= residual <= 1e-8 * (1.0 + np.abs(s))
    return s, ok


def zeros_in_box(
    func: ComplexFn,
    derivative: ComplexFn,
    box: tuple[float, float, float, float],
    count: int,
    *,
    depth: int = 0,
) -> list[complex]:
    """All ``count`` zeros inside ``box = (re_lo, re_hi, im_lo, im_hi)``.

    Newton from a small grid of starts inside the box; if that does not produce ``count``
    distinct zeros inside, the box is split into four (off-centre, so symmetric zeros do not
    fall on the cuts), each quarter is counted with the argument principle and searched
    recursively.
    """
    if count <= 0:
        return []
    re_lo, re_hi, im_lo, im_hi = box
    width, height = re_hi - re_lo, im_hi - im_lo
    grid = np.array([0.5, 0.2, 0.8])
    starts = (re_lo + width * grid[:, None] + 1j * (im_lo + height * grid[None, :])).ravel()
    roots, ok = newton(func, derivative, starts, max_step=max(width, height))
    found: list[complex] = []
    for r in roots[ok]:
        inside = re_lo <= r.real <= re_hi and im_lo <= r.imag <= im_hi
        if inside and all(abs(r - q) > 1e-9 * (1.0 + abs(r)) for q in found):
            found.append(complex(r))
    if len(found) >= count or depth >= 40 or max(width, height) < 1e-13 * (1 + abs(re_hi)):
        return found
    re_mid = re_lo + 0.5123 * width
    im_mid = im_lo + 0.4877 * height
    result: list[complex] = []
    for sub in (
        (re_lo, re_mid, im_lo, im_mid),
        (re_mid, re_hi, im_lo, im_mid),
        (re_lo, re_mid, im_mid, im_hi),
        (re_mid, re_hi, im_mid, im_hi),
    ):
        sub_count = count_zeros_in_box(func, *sub)
        if sub_count is None:  # a zero on a cut: nudge the cut and try again
            return zeros_in_box(
                func,
                derivative,
                (re_lo, re_hi + 1e-9 * (1 + abs(re_hi)), im_lo, im_hi),
                count,
                depth=depth + 1,
            )
        result += zeros_in_box(func, derivative, sub, sub_count, depth=depth + 1)
    return result


def distinct_roots(
    func: ComplexFn,
    derivative: ComplexFn,
    second: ComplexFn,
    iterates: np.ndarray,
    converged: np.ndarray,
    scale: ComplexFn,
) -> tuple[np.ndarray, np.ndarray]:
    """Distinct roots (one per conjugate pair) and their multiplicities (1 or 2).

    Newton converges only linearly to a double root and, in float64, stalls about √eps away
    from it, with iterates that differ by more than any sensible de-duplication tolerance
    (and tiny imaginary parts around a real root). Every iterate where the function is
    small and its derivative nearly vanishes is therefore polished by Newton on the
    derivative (a double root of f is a simple root of f′, found to full precision) and
    kept as a double root if f there is below the rounding level ``1e-14·scale``: its two
    roots then lie within √(2|f|/|f″|) of it; otherwise Newton on f restarts from those two
    points, which finds both of a pair of nearly equal roots. Other converged iterates are
    simple roots,
    de-duplicated to 1e-9.
    """
    roots: list[complex] = []
    mult: list[int] = []

    def add(z: complex, m: int, tol: float) -> None:
        z = complex(z.real, abs(z.imag))  # one of each conjugate pair
        for i, q in enumerate(roots):
            # A stalled iterate near a double root belongs to it (√eps away, not 1e-9).
            near = max(tol, 1e-6) if mult[i] == 2 else tol
            if abs(z - q) <= near * (1.0 + abs(q)):
                mult[i] = max(mult[i], m)
                return
        roots.append(z)
        mult.append(m)

    with np.errstate(all="ignore"):
        size = scale(iterates)
        near = np.isfinite(iterates) & (np.abs(func(iterates)) <= 1e-6 * size)
        flat = near & (np.abs(derivative(iterates)) <= 1e-4 * size)
        for z in iterates[flat]:
            for _ in range(60):
                step = derivative(z) / second(z)
                if not np.isfinite(step):
                    break
                z = z - step
                if abs(step) <= 1e-16 * (1.0 + abs(z)):
                    break
            if abs(z.imag) <= 1e-12 * abs(z):
                z = complex(z.real, 0.0)
            if not np.isfinite(z):
                continue
            if abs(func(z)) <= 1e-14 * scale(z):
                add(complex(z), 2, 1e-7)
                continue
            # Two nearly equal roots c ± √(−2f(c)/f″(c)) around the critical point c:
            # Newton from there converges at once, where from afar it stalls between them.
            split = np.sqrt(complex(-2.0 * func(z) / second(z)))
            for start in (z + split, z - split):
                for _ in range(30):
                    step = func(start) / derivative(start)
                    if not np.isfinite(step):
                        break
                    start = start - step
                    if abs(step) <= 1e-16 * (1.0 + abs(start)):
                        break
                if np.isfinite(start) and abs(func(start)) <= 1e-12 * scale(start):
                    add(complex(start), 1, 1e-12)
    for z in iterates[converged]:
        add(complex(z), 1, 1e-9)
    return np.array(roots, complex), np.array(mult, np.int64)


def taylor_coefficient(weights: np.ndarray, a: float, c: complex, order: int) -> complex:
    """h^{(order)}(c)/order! for h(z) = z − 1 + a Σ_j w_j z^{−j} (order ≥ 2)."""
    j = np.arange(weights.size, dtype=np.float64)
    binom = np.ones_like(j)
    for i in range(order):  # C(j + order − 1, order)
        binom = binom * (j + i) / (i + 1)
    powers = np.exp(-(j + order) * np.log(complex(c)))
    return complex((-1) ** order * a * np.sum(weights * binom * powers))


def count_outside(
    weights: np.ndarray,
    a: float,
    radius: float,
    known: np.ndarray | None = None,
    doubles: np.ndarray | None = None,
    max_samples: int = 2**23,
) -> int | None:
    """Number of roots of Q with |z| > radius: 1 − winding of h(z) = z − 1 + aG(1/z).

    Q(z) = z^K h(z), so (zeros of Q inside) = K + wind(h) and (outside) = 1 − wind(h). h is
    sampled on M equally spaced points of the circle with one FFT (exact for any M by
    folding the coefficients modulo M), M doubling until phase steps are below π/4. The
    terms are scaled by their largest modulus so that r^{−j} cannot overflow. Roots already
    ``known`` are divided out, h / Π(z − z_k), so that a circle passing right next to one of
    them needs no more samples than elsewhere; the winding then drops by the number of
    known roots inside. A double root c in ``doubles`` is divided out twice; within 10⁻⁵ of
    it, where h/(z − c)² would be rounding noise over a tiny square, the quotient is its
    Taylor series h″/2 + h‴(z − c)/6 + h⁗(z − c)²/24 instead.
    """
    K = weights.size - 1
    j = np.arange(K + 1)
    positive = weights > 0
    logc = np.full(K + 1, -np.inf)
    logc[positive] = np.log(a * weights[positive]) - j[positive] * math.log(radius)
    top = max(float(np.max(logc)), 0.0)
    coef = np.exp(logc - top)
    known = np.zeros(0, complex) if known is None else np.asarray(known, complex)
    doubles = np.zeros(0, complex) if doubles is None else np.asarray(doubles, complex)
    known_inside = int(np.sum(np.abs(known) < radius)) + 2 * int(np.sum(np.abs(doubles) < radius))
    series = [[taylor_coefficient(weights, a, c, k) for k in (2, 3, 4)] for c in doubles]
    m = 256
    while m < 8 * (K + 1):
        m *= 2
    while m <= max_samples:
        folded = np.bincount(j % m, weights=coef, minlength=m)
        z = radius * np.exp(2j * np.pi * np.arange(m) / m)
        values = (z - 1.0) * math.exp(-top) + np.fft.fft(folded)
        for root in known:
            values = values / (z - root)
        for c, (h2, h3, h4) in zip(doubles, series, strict=True):
            d = z - c
            close = np.abs(d) < 1e-5 * (1.0 + abs(c))
            values = np.where(
                close, (h2 + d * (h3 + d * h4)) * math.exp(-top), values / np.where(close, 1, d * d)
            )
        if np.any(values == 0) or not np.all(np.isfinite(values)):
            return None
        wind, step = winding_number(values)
        if step < np.pi / 4:
            return 1 - (wind + known_inside)
        m *= 2
    return None
