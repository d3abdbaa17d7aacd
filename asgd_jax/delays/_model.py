"""The delay-model protocol: :class:`DelayModel`, the states of the built-in models, the bound."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import numpy as np

from asgd_jax._validation import check_int as _check_int

__all__ = ["MAX_DELAY", "CounterState", "DelayModel", "DelayState", "TraceState"]


# --------------------------------------------------------------------------------------------
# The protocol.

MAX_DELAY = 1 << 20
"""The largest ``max_delay`` a built-in model accepts (1,048,576).

``max_delay`` sizes the table a model draws from (one entry per τ), the staleness histogram
and the parameter history of :func:`asgd_jax.stale` (``max_delay`` snapshots), so the
constructors refuse larger bounds instead of allocating them."""


@dataclasses.dataclass(frozen=True, eq=False)
class DelayModel:
    """A pure delay model: ``init(key) -> state``, ``next(state) -> (tau, state)``.

    Models compare and hash by value: two models with equal ``key`` (the constructor's name
    and arguments, e.g. ``("uniform", 0, 8)``) are equal, so two identical builds of
    :func:`asgd_jax.stale` give equal pytree structures (``jax.tree.map`` across their states
    works and a jitted step is not recompiled). A model without a ``key`` (``None``, the
    default for hand-built models) is equal only to itself, since its closures cannot be
    compared. A subclass sets ``key`` to a hashable tuple of everything that determines its
    draws.

    Attributes:
      init: maps a PRNG key (typed or raw ``uint32``) to the model's state.
      next: maps a state to ``(tau, new_state)``; ``tau`` is an ``int32`` scalar.
      max_delay: static upper bound on every ``tau`` the model emits.
      name: a short description, used in ``repr`` and reports.
      pmf: the stationary distribution of τ on ``{0, …, max_delay}`` when known, else ``None``.
      key: the model's value, a hashable tuple (constructor name and arguments), or ``None``
        to compare by identity.
    """

    init: Callable[[chex.PRNGKey], Any]
    next: Callable[[Any], tuple[jax.Array, Any]]
    max_delay: int
    name: str = "delay"
    pmf: np.ndarray | None = None
    key: tuple | None = None

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if type(self) is not type(other) or self.key is None or other.key is None:
            return False
        return self.key == other.key

    def __hash__(self) -> int:
        if self.key is None:
            return object.__hash__(self)
        return hash((type(self).__qualname__, self.key))

    @property
    def mean(self) -> float | None:
        """Mean of the stationary law of τ, or ``None`` when it is not known in closed form."""
        if self.pmf is None:
            return None
        return float(np.dot(np.arange(self.pmf.size), self.pmf))

    def report(self, state: Any) -> dict[str, jax.Array]:
        """The model's own clock and counters read off ``state`` (traceable; ``{}`` here).

        Models that simulate time override it: the worker simulation reports ``time``,
        ``worker``, ``worker_step``, ``dropped`` and ``clipped``, so training code reads
        them without knowing the model's state layout.
        """
        del state
        return {}

    def __repr__(self) -> str:
        return f"DelayModel({self.name}, max_delay={self.max_delay})"


class CounterState(NamedTuple):
    """State of a deterministic delay model: the number of delays drawn so far."""

    count: jax.Array


class DelayState(NamedTuple):
    """State of a random delay model: two uint32 seed words and the draw counter."""

    seed: jax.Array
    count: jax.Array


class TraceState(NamedTuple):
    """State of a trace replay: the position in the trace and how often it wrapped/held."""

    count: jax.Array
    exhausted: jax.Array


def _check_max_delay(name: str, value: Any) -> int:
    """``value`` as an int in ``[0, MAX_DELAY]``, the error naming ``name`` and the limit."""
    value = _check_int(name, value)
    if value > MAX_DELAY:
        raise ValueError(
            f"`{name}` must be ≤ asgd_jax.delays.MAX_DELAY = {MAX_DELAY}: it sets max_delay, "
            f"which sizes the delay table and the history of max_delay snapshots, got {value}."
        )
    return value


def _digest(array: np.ndarray) -> str:
    """A short value key for an array (a long tuple would be hashed at every jitted call)."""
    array = np.ascontiguousarray(array)
    return hashlib.sha256(str(array.dtype).encode() + array.tobytes()).hexdigest()[:32]
