"""Compute-time laws of the simulated workers."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import scipy.integrate
import scipy.special
import scipy.stats

from asgd_jax._validation import check_real
from asgd_jax.workers._params import (
    _format,
    _requires_concrete,
    is_traced,
    real_param,
)


class ComputeTime:
    """A law of the time one worker needs for one gradient (a positive random variable).

    Subclasses are frozen dataclasses with

    * ``mean`` / ``var``: moments (``math.inf`` when they do not exist);
    * ``sample(u)``: the quantile function in JAX at uniforms ``u ∈ (0, 1)`` (inverse-CDF
      sampling from hashed uniforms; jit/vmap friendly);
    * ``draw(key, shape)``: i.i.d. draws from a PRNG key;
    * ``ppf(u)`` / ``cdf(t)``: quantile and distribution function in NumPy (float64);
    * ``laplace(s)``: E[e^{−sT}] in NumPy for real or complex ``s`` — in closed form where one
      exists, else by quadrature of ``e^{−s·ppf(u)}`` over ``u ∈ (0, 1)`` (``Re s ≥ 0``).

    Parameters may be JAX tracers (a law built inside ``jax.vmap`` / ``jit``, e.g. to sweep
    a mean in one compiled program): ``sample`` and ``draw`` then trace through them and give
    the same float32 draws as the law built from the same values as Python numbers; ``mean``
    and ``var`` are JAX scalars; the NumPy-side ``ppf``, ``cdf`` and ``laplace`` need
    concrete parameters and say so.

    Laws compare and hash by value (their type and parameters), so two equal builds of a
    model give equal static metadata and a jitted function is not recompiled. A law with
    traced parameters equals only itself and cannot be hashed (it cannot be a static
    argument or a cache key: its values are only known at run time).
    """

    name: str = "compute_time"
    #: Tail index: P(T > t) ~ t^−tail_index (``inf`` for light tails).
    tail_index: float = math.inf

    @property
    def mean(self) -> float:
        raise NotImplementedError

    @property
    def var(self) -> float:
        raise NotImplementedError

    def sample(self, u: jax.Array) -> jax.Array:
        raise NotImplementedError

    def ppf(self, u: Any) -> np.ndarray:
        _requires_concrete(self, "ppf")
        raise NotImplementedError

    def cdf(self, t: Any) -> np.ndarray:
        _requires_concrete(self, "cdf")
        raise NotImplementedError

    def draw(self, key: chex.PRNGKey, shape: Sequence[int] = ()) -> jax.Array:
        """``shape`` i.i.d. compute times from ``key`` (float32)."""
        tiny = jnp.float32(2.0**-24)
        u = jax.random.uniform(key, tuple(shape), jnp.float32, minval=tiny, maxval=1 - tiny)
        return self.sample(u)

    def laplace(self, s: Any) -> np.ndarray:
        """E[e^{−sT}] by adaptive quadrature over the quantile function (``Re s ≥ 0``)."""
        _requires_concrete(self, "laplace")
        s_arr = np.asarray(s)
        if np.any(np.real(s_arr) < 0):
            raise ValueError(
                f"`s` must have Re(s) ≥ 0 for the {self.name} law (its transform diverges "
                "or has no closed form left of the imaginary axis)."
            )

        def one(z: complex) -> complex:
            def part(fn: Callable[[float], float]) -> float:
                return scipy.integrate.quad(fn, 0.0, 1.0, limit=400)[0]

            decay = lambda u: math.exp(-z.real * float(self.ppf(u)))
            re = part(lambda u: decay(u) * math.cos(z.imag * float(self.ppf(u))))
            if z.imag == 0:
                return complex(re, 0.0)
            im = part(lambda u: -decay(u) * math.sin(z.imag * float(self.ppf(u))))
            return complex(re, im)

        out = np.vectorize(one, otypes=[complex])(s_arr.astype(complex))
        return out if np.iscomplexobj(s_arr) else out.real

    def __repr__(self) -> str:
        return self.name

    @property
    def params(self) -> tuple[Any, ...]:
        """The law's parameters, in field order."""
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))  # type: ignore[arg-type]

    @property
    def traced(self) -> bool:
        """Whether any parameter is a JAX tracer (the law was built inside jit/vmap)."""
        return any(is_traced(p) for p in self.params)

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if type(self) is not type(other):
            return NotImplemented if not isinstance(other, ComputeTime) else False
        if self.traced or other.traced:  # type: ignore[union-attr]
            return False
        return self.params == other.params  # type: ignore[union-attr]

    def __hash__(self) -> int:
        if self.traced:
            raise TypeError(
                f"{self.name} has traced parameters (built inside jit/vmap), so it has no "
                "value to hash: it cannot be a static argument or a cache key. Build it from "
                "Python numbers for that, or pass it only inside the traced function."
            )
        return hash((type(self).__qualname__, self.params))


@dataclasses.dataclass(frozen=True, repr=False, eq=False)
class Deterministic(ComputeTime):
    """T = ``time`` always."""

    time: float

    @property
    def name(self) -> str:
        return f"deterministic({_format(self.time)})"

    @property
    def mean(self) -> float:
        return self.time

    @property
    def var(self) -> float:
        return 0.0

    def sample(self, u: jax.Array) -> jax.Array:
        return jnp.full(jnp.shape(u), self.time, jnp.float32)

    def ppf(self, u: Any) -> np.ndarray:
        _requires_concrete(self, "ppf")
        return np.full(np.shape(u), self.time)

    def cdf(self, t: Any) -> np.ndarray:
        _requires_concrete(self, "cdf")
        return (np.asarray(t, np.float64) >= self.time).astype(np.float64)

    def laplace(self, s: Any) -> np.ndarray:
        _requires_concrete(self, "laplace")
        return np.exp(-np.asarray(s) * self.time)


@dataclasses.dataclass(frozen=True, repr=False, eq=False)
class Exponential(ComputeTime):
    """T ~ Exponential with mean ``scale`` (memoryless; the classic queueing model)."""

    scale: float

    @property
    def name(self) -> str:
        return f"exponential({_format(self.scale)})"

    @property
    def mean(self) -> float:
        return self.scale

    @property
    def var(self) -> float:
        return self.scale**2

    def sample(self, u: jax.Array) -> jax.Array:
        return -jnp.float32(self.scale) * jnp.log1p(-u)

    def ppf(self, u: Any) -> np.ndarray:
        _requires_concrete(self, "ppf")
        return -self.scale * np.log1p(-np.asarray(u, np.float64))

    def cdf(self, t: Any) -> np.ndarray:
        _requires_concrete(self, "cdf")
        return -np.expm1(-np.maximum(np.asarray(t, np.float64), 0.0) / self.scale)

    def laplace(self, s: Any) -> np.ndarray:
        _requires_concrete(self, "laplace")
        return 1.0 / (1.0 + np.asarray(s) * self.scale)


@dataclasses.dataclass(frozen=True, repr=False, eq=False)
class ShiftedExponential(ComputeTime):
    """T = ``shift`` + Exponential(mean ``scale``): a fixed minimum plus random slowdown."""

    shift: float
    scale: float

    @property
    def name(self) -> str:
        return f"shifted_exponential({_format(self.shift)}, {_format(self.scale)})"

    @property
    def mean(self) -> float:
        return self.shift + self.scale

    @property
    def var(self) -> float:
        return self.scale**2

    def sample(self, u: jax.Array) -> jax.Array:
        return jnp.float32(self.shift) - jnp.float32(self.scale) * jnp.log1p(-u)

    def ppf(self, u: Any) -> np.ndarray:
        _requires_concrete(self, "ppf")
        return self.shift - self.scale * np.log1p(-np.asarray(u, np.float64))

    def cdf(self, t: Any) -> np.ndarray:
        _requires_concrete(self, "cdf")
        excess = np.maximum(np.asarray(t, np.float64) - self.shift, 0.0)
        return -np.expm1(-excess / self.scale)

    def laplace(self, s: Any) -> np.ndarray:
        _requires_concrete(self, "laplace")
        s = np.asarray(s)
        return np.exp(-s * self.shift) / (1.0 + s * self.scale)


@dataclasses.dataclass(frozen=True, repr=False, eq=False)
class LogNormal(ComputeTime):
    """T = exp(``mu`` + ``sigma``·Z), Z standard normal. ``laplace`` is numerical."""

    mu: float
    sigma: float

    @property
    def name(self) -> str:
        return f"lognormal({_format(self.mu)}, {_format(self.sigma)})"

    @property
    def mean(self) -> float:
        if self.traced:
            return jnp.exp(self.mu + 0.5 * self.sigma**2)
        return math.exp(self.mu + 0.5 * self.sigma**2)

    @property
    def var(self) -> float:
        if self.traced:
            return jnp.expm1(self.sigma**2) * jnp.exp(2 * self.mu + self.sigma**2)
        return math.expm1(self.sigma**2) * math.exp(2 * self.mu + self.sigma**2)

    def sample(self, u: jax.Array) -> jax.Array:
        z = jax.scipy.special.ndtri(u)
        return jnp.exp(jnp.float32(self.mu) + jnp.float32(self.sigma) * z)

    def ppf(self, u: Any) -> np.ndarray:
        _requires_concrete(self, "ppf")
        return np.exp(self.mu + self.sigma * scipy.special.ndtri(np.asarray(u, np.float64)))

    def cdf(self, t: Any) -> np.ndarray:
        _requires_concrete(self, "cdf")
        t = np.asarray(t, np.float64)
        with np.errstate(divide="ignore"):
            z = (np.log(np.maximum(t, 0.0)) - self.mu) / self.sigma
        return scipy.special.ndtr(z)


@dataclasses.dataclass(frozen=True, repr=False, eq=False)
class Pareto(ComputeTime):
    """T = ``scale``·U^(−1/``alpha``): support [scale, ∞), P(T > t) = (scale/t)^alpha.

    Heavy-tailed stragglers: the mean is infinite for alpha ≤ 1, the variance for alpha ≤ 2.
    ``laplace`` is numerical (it is α·E_{α+1}(s·scale), a generalised exponential integral).
    """

    scale: float
    alpha: float

    @property
    def name(self) -> str:
        return f"pareto({_format(self.scale)}, {_format(self.alpha)})"

    @property
    def tail_index(self) -> float:  # type: ignore[override]
        return self.alpha

    @property
    def mean(self) -> float:
        a = self.alpha
        if self.traced:
            return jnp.where(a <= 1, jnp.inf, a * self.scale / (a - 1))
        return math.inf if a <= 1 else a * self.scale / (a - 1)

    @property
    def var(self) -> float:
        a = self.alpha
        if self.traced:
            return jnp.where(a <= 2, jnp.inf, self.scale**2 * a / ((a - 1) ** 2 * (a - 2)))
        return math.inf if a <= 2 else self.scale**2 * a / ((a - 1) ** 2 * (a - 2))

    def sample(self, u: jax.Array) -> jax.Array:
        return jnp.float32(self.scale) * jnp.exp(-jnp.log1p(-u) / jnp.float32(self.alpha))

    def ppf(self, u: Any) -> np.ndarray:
        _requires_concrete(self, "ppf")
        return self.scale * np.exp(-np.log1p(-np.asarray(u, np.float64)) / self.alpha)

    def cdf(self, t: Any) -> np.ndarray:
        _requires_concrete(self, "cdf")
        t = np.maximum(np.asarray(t, np.float64), self.scale)
        return 1.0 - (self.scale / t) ** self.alpha


def deterministic(time: float) -> Deterministic:
    """Every computation takes exactly ``time`` (> 0)."""
    return Deterministic(real_param("time", time, strict=True))


def exponential(mean: float) -> Exponential:
    """Exponential compute times with the given ``mean`` (> 0)."""
    return Exponential(real_param("mean", mean, strict=True))


def shifted_exponential(shift: float, mean: float) -> ShiftedExponential:
    """``shift`` + Exponential: T = shift + E with E[E] = ``mean``, so E[T] = shift + mean.

    The model of Dutta et al. (2018, arXiv 1803.01113) for a fixed minimum compute time
    plus a random slowdown.

    Args:
      shift: the minimum compute time, ≥ 0.
      mean: the mean of the exponential part (the time beyond ``shift``), > 0.
    """
    return ShiftedExponential(real_param("shift", shift), real_param("mean", mean, strict=True))


def lognormal(
    mu: float | None = None,
    sigma: float | None = None,
    *,
    mean: float | None = None,
    cv: float | None = None,
) -> LogNormal:
    """Log-normal compute times: T = exp(mu + sigma·Z).

    Give either ``(mu, sigma)`` (parameters of log T) or ``mean=`` and ``cv=`` (the mean of T
    and its coefficient of variation std/mean), converted by sigma² = log(1 + cv²),
    mu = log(mean) − sigma²/2.
    """
    if mean is not None or cv is not None:
        if mu is not None or sigma is not None or mean is None or cv is None:
            raise ValueError("Give either `mu` and `sigma`, or both `mean=` and `cv=`.")
        mean = real_param("mean", mean, strict=True)
        cv = real_param("cv", cv, strict=True)
        if is_traced(mean) or is_traced(cv):
            # float32 on the device: within a few ulp of the float64 conversion below.
            mean, cv = jnp.asarray(mean, jnp.float32), jnp.asarray(cv, jnp.float32)
            sigma2 = jnp.log1p(cv**2)
            return LogNormal(jnp.log(mean) - 0.5 * sigma2, jnp.sqrt(sigma2))
        sigma2 = math.log1p(cv**2)
        return LogNormal(math.log(mean) - 0.5 * sigma2, math.sqrt(sigma2))
    if mu is None or sigma is None:
        raise ValueError("Give either `mu` and `sigma`, or both `mean=` and `cv=`.")
    return LogNormal(real_param("mu", mu, low=-math.inf), real_param("sigma", sigma, strict=True))


def pareto(scale: float, alpha: float) -> Pareto:
    """Pareto compute times: minimum ``scale`` (> 0), tail index ``alpha`` (> 0)."""
    return Pareto(real_param("scale", scale, strict=True), real_param("alpha", alpha, strict=True))


def _as_law(name: str, value: Any, *, allow_zero: bool = False) -> ComputeTime | None:
    if isinstance(value, ComputeTime):
        return value
    if is_traced(value):  # a traced constant (0 adds nothing: t + 0 = t exactly)
        return Deterministic(real_param(name, value))
    if isinstance(value, (jax.Array, np.ndarray)) and np.ndim(value) == 0:
        value = value.item()
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        value = check_real(name, value, strict=not allow_zero)
        return None if value == 0 else Deterministic(value)
    raise TypeError(
        f"`{name}` must be a compute-time law (e.g. asgd_jax.workers.exponential(1.0)) or a "
        f"positive number, got {value!r}."
    )
