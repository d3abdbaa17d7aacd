"""Stragglers: extra compute time injected per gradient, fixed, random or on one worker."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import chex
import jax
import numpy as np

from asgd_jax._validation import check_min_int, check_optional, check_real

__all__ = ["STRAGGLER_TABLE", "Straggler"]

STRAGGLER_TABLE = 4096  # per-worker extra times drawn up front, reused cyclically
_LAWS = ("fixed", "exponential", "uniform")


@dataclasses.dataclass(frozen=True)
class Straggler:
    """Extra compute time injected per gradient, per worker.

    The worker waits (interruptibly: a stop ends the wait at once) before pushing each
    gradient. Build one with :meth:`fixed`, :meth:`random` or :meth:`one_slow`.

    Attributes:
      extra_time: mean extra seconds per gradient: one number for every worker, or one per
        worker.
      law: ``"fixed"`` (exactly ``extra_time``), ``"exponential"`` (mean ``extra_time``) or
        ``"uniform"`` (on ``[0, 2·extra_time]``). Random times are drawn from the run's key.
      worker: if set, only this worker is slowed.
    """

    extra_time: float | tuple[float, ...]
    law: str = "fixed"
    worker: int | None = None

    def __post_init__(self):
        if isinstance(self.extra_time, Sequence) and not isinstance(self.extra_time, str):
            times = tuple(
                check_real(f"extra_time[{i}]", t, unit="seconds")
                for i, t in enumerate(self.extra_time)
            )
            if not times:
                raise ValueError("`extra_time` must not be an empty sequence.")
            object.__setattr__(self, "extra_time", times)
        else:
            extra_time = check_real("extra_time", self.extra_time, unit="seconds")
            object.__setattr__(self, "extra_time", extra_time)
        if self.law not in _LAWS:
            raise ValueError(f"`law` must be one of {_LAWS}, got {self.law!r}.")
        object.__setattr__(self, "worker", check_optional(check_min_int, "worker", self.worker, 0))

    @classmethod
    def fixed(cls, extra_time: float | Sequence[float]) -> Straggler:
        """Every gradient of worker ``i`` takes ``extra_time`` (or ``extra_time[i]``) longer."""
        return cls(extra_time=extra_time, law="fixed")

    @classmethod
    def random(cls, mean: float | Sequence[float], law: str = "exponential") -> Straggler:
        """Random extra time with the given mean, ``law`` ``"exponential"`` or ``"uniform"``."""
        if law == "fixed":
            raise ValueError("`law` must be 'exponential' or 'uniform'; use Straggler.fixed.")
        return cls(extra_time=mean, law=law)

    @classmethod
    def one_slow(cls, extra_time: float, worker: int = 0) -> Straggler:
        """Only ``worker`` is slow: each of its gradients takes ``extra_time`` longer."""
        return cls(extra_time=extra_time, law="fixed", worker=worker)

    def means(self, num_workers: int) -> np.ndarray:
        """Mean extra seconds per gradient for each of ``num_workers`` workers."""
        if isinstance(self.extra_time, tuple):
            if len(self.extra_time) != num_workers:
                raise ValueError(
                    f"`extra_time` has {len(self.extra_time)} entries but the run has "
                    f"num_workers={num_workers}."
                )
            means = np.asarray(self.extra_time, np.float64)
        else:
            means = np.full(num_workers, self.extra_time, np.float64)
        if self.worker is not None:
            if self.worker >= num_workers:
                raise ValueError(
                    f"Straggler `worker` must be < num_workers={num_workers}, got {self.worker}."
                )
            only = np.zeros(num_workers)
            only[self.worker] = means[self.worker]
            means = only
        return means

    def table(self, key: chex.PRNGKey, num_workers: int, length: int) -> np.ndarray:
        """Extra seconds for ``length`` consecutive gradients of each worker, from ``key``."""
        means = self.means(num_workers)[:, None]
        if self.law == "fixed":
            return np.broadcast_to(means, (num_workers, length)).copy()
        if self.law == "exponential":
            unit = jax.random.exponential(key, (num_workers, length))
        else:
            unit = 2.0 * jax.random.uniform(key, (num_workers, length))
        return np.asarray(unit, np.float64) * means
