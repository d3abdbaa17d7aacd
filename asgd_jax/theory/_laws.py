"""Delay laws in time units, described by their Laplace transforms.

The SDDE of asynchronous SGD (Yu, Chen & Poor, arXiv 2406.11159) enters the delay only
through the Laplace transform of its law, L(s) = E[e^{−sD}]: the mean dynamics
x'(t) = −k·E[x(t − D)] have the characteristic function s + k·L(s). A :class:`DelayLaw`
carries L, its derivative L'(s) = −E[D e^{−sD}], the mean, the support and the abscissa of
convergence σ_a (L is analytic for Re s > σ_a), which the root finders need to know where they
may evaluate L. Everything here is NumPy: the analysis runs outside jit.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from asgd_jax._validation import check_real as _check_real

__all__ = [
    "DelayLaw",
    "constant_delay",
    "exponential_delay",
    "gamma_delay",
    "uniform_delay",
    "empirical_delay",
    "shifted_delay",
    "staleness_delay",
]


def _complex(s: Any) -> np.ndarray:
    return np.asarray(s, dtype=np.complex128)


@dataclasses.dataclass(frozen=True, eq=False)
class DelayLaw:
    """The law of a delay D ≥ 0 (in time units) through its Laplace transform.

    Attributes:
      kind: ``"constant"``, ``"exponential"``, ``"gamma"``, ``"uniform"``, ``"empirical"``,
        ``"shifted"`` or ``"custom"``; the closed-form root finders dispatch on it.
      params: the parameters of the law (e.g. ``{"delay": c}`` for a constant delay).
      laplace: s ↦ E[e^{−sD}], vectorised over complex ``s`` with Re s > ``abscissa``.
      laplace_derivative: s ↦ −E[D e^{−sD}].
      mean: E[D].
      abscissa: σ_a, the abscissa of convergence (−∞ for a bounded support).
      max_delay: the supremum of the support (∞ when unbounded).
      name: a short description.
    """

    kind: str
    params: dict
    laplace: Callable[[Any], np.ndarray]
    laplace_derivative: Callable[[Any], np.ndarray]
    mean: float
    abscissa: float
    max_delay: float
    name: str

    def __repr__(self) -> str:
        return f"DelayLaw({self.name})"


def constant_delay(delay: float) -> DelayLaw:
    """D = c almost surely: L(s) = e^{−sc}.

    Args:
      delay: c ≥ 0 (c = 0 is the undelayed gradient flow).
    """
    c = _check_real("delay", delay)
    return DelayLaw(
        kind="constant",
        params={"delay": c},
        laplace=lambda s: np.exp(-_complex(s) * c),
        laplace_derivative=lambda s: -c * np.exp(-_complex(s) * c),
        mean=c,
        abscissa=-math.inf,
        max_delay=c,
        name=f"constant({c:g})",
    )


def exponential_delay(mean: float) -> DelayLaw:
    """D ~ Exponential with mean m: L(s) = 1 / (1 + m s), σ_a = −1/m.

    Args:
      mean: m > 0.
    """
    m = _check_real("mean", mean, strict=True)
    return DelayLaw(
        kind="exponential",
        params={"mean": m},
        laplace=lambda s: 1.0 / (1.0 + m * _complex(s)),
        laplace_derivative=lambda s: -m / (1.0 + m * _complex(s)) ** 2,
        mean=m,
        abscissa=-1.0 / m,
        max_delay=math.inf,
        name=f"exponential(mean={m:g})",
    )


def gamma_delay(shape: float, scale: float) -> DelayLaw:
    """D ~ Gamma(α, θ): L(s) = (1 + θ s)^{−α} (principal power), σ_a = −1/θ.

    Shape 1 is the exponential law; an integer shape α is the Erlang law, for which
    s + k L(s) = 0 is the polynomial s (1 + θ s)^α + k = 0 (the "linear chain trick").

    Args:
      shape: α > 0.
      scale: θ > 0 (mean αθ).
    """
    a = _check_real("shape", shape, strict=True)
    th = _check_real("scale", scale, strict=True)
    return DelayLaw(
        kind="gamma",
        params={"shape": a, "scale": th},
        laplace=lambda s: (1.0 + th * _complex(s)) ** (-a),
        laplace_derivative=lambda s: -a * th * (1.0 + th * _complex(s)) ** (-a - 1.0),
        mean=a * th,
        abscissa=-1.0 / th,
        max_delay=math.inf,
        name=f"gamma(shape={a:g}, scale={th:g})",
    )


def _uniform_laplace(s: Any, low: float, width: float) -> np.ndarray:
    # E[e^{−sD}] = e^{−s a} (1 − e^{−s w}) / (s w); −expm1 keeps it accurate near s = 0.
    s = _complex(s)
    x = s * width
    small = np.abs(x) < 1e-6
    safe = np.where(small, 1.0, x)
    ratio = np.where(small, 1.0 - x / 2.0 + x * x / 6.0, -np.expm1(-safe) / safe)
    return np.exp(-s * low) * ratio


def _uniform_laplace_derivative(s: Any, low: float, width: float) -> np.ndarray:
    # d/ds [e^{−s a} g(s w)] with g(x) = (1 − e^{−x}) / x, g'(x) = (e^{−x}(1 + x) − 1) / x².
    s = _complex(s)
    x = s * width
    small = np.abs(x) < 1e-3
    safe = np.where(small, 1.0, x)
    g = np.where(small, 1.0 - x / 2.0 + x * x / 6.0 - x**3 / 24.0, -np.expm1(-safe) / safe)
    series = -0.5 + x / 3.0 - x * x / 8.0 + x**3 / 30.0
    gp = np.where(small, series, (np.exp(-safe) * (1.0 + safe) - 1.0) / (safe * safe))
    return np.exp(-s * low) * (-low * g + width * gp)


def uniform_delay(low: float, high: float) -> DelayLaw:
    """D ~ Uniform[a, b]: L(s) = (e^{−sa} − e^{−sb}) / (s (b − a)).

    Args:
      low: a ≥ 0.
      high: b > a (use :func:`constant_delay` for b = a).
    """
    a = _check_real("low", low)
    b = _check_real("high", high)
    if b <= a:
        raise ValueError(f"`high` must be > `low`, got low={a}, high={b}.")
    w = b - a
    return DelayLaw(
        kind="uniform",
        params={"low": a, "high": b},
        laplace=lambda s: _uniform_laplace(s, a, w),
        laplace_derivative=lambda s: _uniform_laplace_derivative(s, a, w),
        mean=(a + b) / 2.0,
        abscissa=-math.inf,
        max_delay=b,
        name=f"uniform({a:g}, {b:g})",
    )


def empirical_delay(delays: Any, weights: Any = None, *, name: str = "empirical") -> DelayLaw:
    """The law putting weight w_j on the delay d_j: L(s) = Σ_j w_j e^{−s d_j}.

    Use it for a delay law measured from a simulation (repeated values are merged, so a long
    trace costs as much as its distinct values).

    Args:
      delays: non-negative delays d_j (a 1-D array), in time units.
      weights: non-negative weights (normalised here); ``None`` weighs all delays equally.
      name: a label.
    """
    d = np.asarray(delays, dtype=np.float64).reshape(-1)
    if d.size == 0:
        raise ValueError("`delays` must not be empty.")
    if not np.all(np.isfinite(d)) or np.any(d < 0):
        raise ValueError("`delays` must be finite and ≥ 0.")
    w = np.ones_like(d) if weights is None else np.asarray(weights, np.float64).reshape(-1)
    if w.shape != d.shape:
        raise ValueError(f"`weights` must match `delays` in shape, got {w.shape} vs {d.shape}.")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError("`weights` must be finite, ≥ 0 and not all zero.")
    values, inverse = np.unique(d, return_inverse=True)
    merged = np.bincount(inverse, weights=w, minlength=values.size)
    keep = merged > 0
    values, merged = values[keep], merged[keep] / merged.sum()

    # einsum, not `@`: a complex-by-real matmul goes through a slow generic path in NumPy.
    def laplace(s):
        s = _complex(s)
        return np.einsum("...j,j->...", np.exp(-s[..., None] * values), merged)

    def laplace_derivative(s):
        s = _complex(s)
        return -np.einsum("...j,j->...", np.exp(-s[..., None] * values), merged * values)

    return DelayLaw(
        kind="empirical",
        params={"delays": values, "weights": merged},
        laplace=laplace,
        laplace_derivative=laplace_derivative,
        mean=float(values @ merged),
        abscissa=-math.inf,
        max_delay=float(values.max()),
        name=f"{name}({values.size} atoms)",
    )


def shifted_delay(law: DelayLaw, shift: float) -> DelayLaw:
    """D + c for a constant c ≥ 0 (e.g. a fixed communication time): L(s) e^{−sc}.

    Args:
      law: the law of D.
      shift: c ≥ 0.
    """
    if not isinstance(law, DelayLaw):
        raise TypeError(f"`law` must be a DelayLaw, got {law!r}.")
    c = _check_real("shift", shift)
    if c == 0:
        return law
    if law.kind == "constant":
        return constant_delay(law.mean + c)
    base_l, base_d = law.laplace, law.laplace_derivative

    def laplace(s):
        s = _complex(s)
        return np.exp(-s * c) * base_l(s)

    def laplace_derivative(s):
        s = _complex(s)
        return np.exp(-s * c) * (base_d(s) - c * base_l(s))

    return DelayLaw(
        kind="shifted",
        params={"law": law, "shift": c},
        laplace=laplace,
        laplace_derivative=laplace_derivative,
        mean=law.mean + c,
        abscissa=law.abscissa,
        max_delay=law.max_delay + c,
        name=f"{law.name}+{c:g}",
    )


def _staleness_array(staleness: Any = None, *, pmf: Any = None, trace: Any = None) -> np.ndarray:
    """The staleness pmf from exactly one of ``staleness``, ``pmf=`` or ``trace=``.

    ``pmf=``: non-negative weights on {0, …, K} (probabilities or counts, normalised here).
    ``trace=``: observed staleness values (integers ≥ 0, or an object / dict with a
    ``staleness`` entry such as a ``workers.simulate`` result). A positional ``staleness``
    is read as before only where that is unambiguous: a trace object, or floats (a pmf).
    An integer array could be either (``[0, 1]``: one update at τ = 1, or the counts of a
    histogram); it is still read as a trace, with a ``DeprecationWarning`` asking for
    ``trace=`` or ``pmf=``.
    """
    given = [
        k for k, v in (("staleness", staleness), ("pmf", pmf), ("trace", trace)) if v is not None
    ]
    if len(given) != 1:
        raise TypeError(
            f"give the staleness law once: a `pmf=` or a `trace=` (got {given or 'neither'})."
        )
    if staleness is not None:
        if hasattr(staleness, "staleness") or isinstance(staleness, dict):
            trace = staleness
        elif np.asarray(staleness).dtype.kind in "iub":
            warnings.warn(
                "an integer staleness array is read as a trace of observed staleness values; "
                "it could also be histogram counts. Pass `trace=` or `pmf=` to say which.",
                DeprecationWarning,
                stacklevel=3,
            )
            trace = staleness
        else:
            pmf = staleness
    if trace is not None:
        if hasattr(trace, "staleness"):
            trace = trace.staleness
        elif isinstance(trace, dict) and "staleness" in trace:
            trace = trace["staleness"]
        arr = np.asarray(trace)
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError(f"`trace` must be a non-empty 1-D array, got shape {arr.shape}.")
        if arr.dtype.kind not in "iuf" or not np.all(np.isfinite(arr)):
            raise ValueError("`trace` must hold finite integers ≥ 0.")
        if np.any(arr < 0) or np.any(arr != np.round(arr)):
            raise ValueError("`trace` must hold integers ≥ 0.")
        return np.bincount(arr.astype(np.int64)).astype(np.float64) / arr.size
    arr = np.asarray(pmf)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"`pmf` must be a non-empty 1-D array, got shape {arr.shape}.")
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"`pmf` must be numbers, got dtype {arr.dtype}.")
    out = arr.astype(np.float64)
    if not np.all(np.isfinite(out)) or np.any(out < 0) or out.sum() <= 0:
        raise ValueError("a staleness `pmf` must be finite, ≥ 0 and not all zero.")
    return out / out.sum()


def staleness_delay(
    staleness: Any = None,
    update_rate: float | None = None,
    *,
    half_step: bool = True,
    pmf: Any = None,
    trace: Any = None,
) -> DelayLaw:
    """The delay in time units of a staleness law: D = (τ + ½) / Λ (or τ / Λ).

    An update applied with staleness τ at update rate Λ read parameters τ updates, i.e. about
    τ / Λ time units, earlier. The half step is the discretisation correction of the Euler
    scheme that the server actually runs: writing the forward difference
    x_{t+1} − x_t = −a x_{t−τ} as a derivative at the midpoint t + ½ gives
    x'(t) = −aΛ x(t − (τ + ½)/Λ) to second order. With it, the SDDE boundary for a constant
    staleness τ, kD = π/2, i.e. a = ηh < π / (2τ + 1), agrees with the exact discrete bound
    a < 2 sin(π / (2(2τ + 1))) to leading order in 1/τ (see
    :func:`asgd_jax.theory.discrete_critical_gain`); without it the SDDE overestimates the
    stable range by a factor (2τ + 1) / (2τ).

    Args:
      staleness: a pmf (floats) or a trace object (see ``pmf``/``trace``).
      update_rate: Λ > 0, updates per unit time.
      half_step: add the half-update Euler correction (default) or use D = τ / Λ.
      pmf: the staleness pmf on {0, …, K} (probabilities or counts).
      trace: observed staleness values (integers, or a ``workers.simulate`` result).

    Returns:
      An empirical :class:`DelayLaw`.
    """
    pmf = _staleness_array(staleness, pmf=pmf, trace=trace)
    if update_rate is None:
        raise TypeError("`update_rate` (Λ > 0, updates per unit time) is required.")
    rate = _check_real("update_rate", update_rate, strict=True)
    offset = 0.5 if half_step else 0.0
    delays = (np.arange(pmf.size) + offset) / rate
    return empirical_delay(delays, pmf, name="staleness")
