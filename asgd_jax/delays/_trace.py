"""Replay of a recorded staleness sequence (e.g. one measured by hogwild)."""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from asgd_jax.delays._model import DelayModel, TraceState, _check_max_delay, _digest

__all__ = ["trace"]


_TRACE_MODES = ("wrap", "hold")


def _trace_array(taus: Any) -> np.ndarray:
    """Accept a sequence/array of ints, or any object with a ``staleness`` field/key."""
    if hasattr(taus, "staleness"):
        taus = taus.staleness
    elif isinstance(taus, dict) and "staleness" in taus:
        taus = taus["staleness"]
    arr = np.asarray(taus)
    if arr.ndim != 1:
        raise ValueError(f"`taus` must be one-dimensional, got shape {arr.shape}.")
    if arr.size == 0:
        raise ValueError("`taus` must not be empty: a trace needs at least one delay.")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise TypeError("`taus` must hold integers (got non-integer floats).")
        arr = arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"`taus` must hold integers, got dtype {arr.dtype}.")
    if np.any(arr < 0):
        raise ValueError(f"`taus` must be ≥ 0, got min {int(arr.min())}.")
    return arr.astype(np.int32)


def trace(taus: Any, *, max_delay: int | None = None, on_exhausted: str = "wrap") -> DelayModel:
    """Replays a recorded staleness sequence exactly, e.g. one measured by hogwild.

    ``next`` returns ``taus[0], taus[1], …`` in order. The key is ignored: a replay is
    deterministic by construction. A trace shorter than the run either starts over
    (``on_exhausted="wrap"``, the default) or repeats its last value (``"hold"``); either way
    ``state.exhausted`` counts the draws made past its end.

    Through :func:`asgd_jax.stale`, T updates make T + 1 draws: ``init`` draws τ_0 and
    update t draws τ_{t+1} at its end, so that :func:`asgd_jax.stale_params` is a pure read.
    The last draw belongs to an update that has not happened yet, so a run that used a trace
    of length T exactly once (T updates) ends with ``exhausted == 1``, and one that used
    fewer entries with 0: the check after such a run is ``exhausted <= 1``. (A direct loop
    of T calls to ``next`` ends with 0.)

    Args:
      taus: a 1-D sequence of integers ≥ 0, or an object/dict with a ``staleness`` entry
        (such as the trace returned by :func:`asgd_jax.hogwild.train`).
      max_delay: buffer bound; defaults to ``max(taus)`` and must be ≥ it.
      on_exhausted: ``"wrap"`` or ``"hold"``.
    """
    arr = _trace_array(taus)
    largest = int(arr.max())
    if max_delay is None:
        _check_max_delay("max(taus)", largest)
        max_delay = largest
    max_delay = _check_max_delay("max_delay", max_delay)
    if max_delay < largest:
        raise ValueError(
            f"`max_delay` must be ≥ the largest delay in the trace ({largest}), got {max_delay}."
        )
    if on_exhausted not in _TRACE_MODES:
        raise ValueError(f"`on_exhausted` must be one of {_TRACE_MODES}, got {on_exhausted!r}.")
    length = arr.size
    table = arr
    pmf = np.bincount(arr, minlength=max_delay + 1).astype(np.float64) / length

    def init(key: chex.PRNGKey) -> TraceState:
        del key
        return TraceState(count=jnp.zeros((), jnp.int32), exhausted=jnp.zeros((), jnp.int32))

    def next_(state: TraceState) -> tuple[jax.Array, TraceState]:
        if on_exhausted == "wrap":
            idx = state.count % length
        else:
            idx = jnp.minimum(state.count, length - 1)
        tau = jnp.asarray(table)[idx]
        past_end = (state.count >= length).astype(jnp.int32)
        count = state.count + 1 if on_exhausted == "wrap" else jnp.minimum(state.count + 1, length)
        return tau, TraceState(count=count, exhausted=state.exhausted + past_end)

    return DelayModel(
        init=init,
        next=next_,
        max_delay=max_delay,
        name=f"trace(len={length}, {on_exhausted})",
        pmf=pmf,
        key=("trace", length, _digest(arr), max_delay, on_exhausted),
    )
