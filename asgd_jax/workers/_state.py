"""The state of the parameter-server simulation and its per-update / per-arrival record."""

from __future__ import annotations

from typing import NamedTuple

import jax


class WorkerState(NamedTuple):
    """State of the parameter-server simulation (all arrays; readable after every step).

    Attributes:
      seed: two uint32 words of the counter-based hash (from the key).
      finish: float32[n], the simulated time at which each worker's gradient arrives (the
        high word of a double-float pair, see ``_clock``; ``inf`` for a worker blocked by
        SSP; the last round's cycle times for ``k_sync``).
      finish_lo: float32[n], the low words of those times.
      pulled: int32[n], the parameter version each worker is computing on.
      clock: int32[n], gradients each worker has pushed (its SSP clock).
      version: updates applied by the server so far.
      time: the simulated wall clock at the last event, float32 (the high word: the exact
        sum of the float32 cycle times rounded once to float32).
      time_lo: its low word.
      worker: id of the last arriving worker (−1 before the first event).
      staleness: staleness of the last arrival (version − pulled, before any clipping).
      accepted: whether the last arrival was accepted (False: dropped, τ > max_staleness).
      applied: whether the last arrival completed an update.
      dropped: gradients computed but not applied (stale drops; cancelled k_sync stragglers).
      clipped: updates whose staleness exceeded ``max_delay`` and was clipped to it.
      group_count, group_sum, group_max, group_min: accepted arrivals in the current (or
        just applied) K-async group and their staleness sum / max / min (for K = 1: whether
        the last arrival was accepted, and its staleness).
      stopped: computations stopped before they finished and restarted at the current
        version (``stops=True`` of ``"rennala"`` and ``"ringmaster"``; 0 otherwise).
      restarts: int32[n], each worker's stopped computations: its c-th cycle draw is at
        counter index ``clock + restarts`` (always ``clock`` for protocols without stops).
    """

    seed: jax.Array
    finish: jax.Array
    finish_lo: jax.Array
    pulled: jax.Array
    clock: jax.Array
    version: jax.Array
    time: jax.Array
    time_lo: jax.Array
    worker: jax.Array
    staleness: jax.Array
    accepted: jax.Array
    applied: jax.Array
    dropped: jax.Array
    clipped: jax.Array
    group_count: jax.Array
    group_sum: jax.Array
    group_max: jax.Array
    group_min: jax.Array
    stopped: jax.Array
    restarts: jax.Array


class WorkerTrace(NamedTuple):
    """Per-update (:func:`simulate`) or per-arrival (:func:`simulate_events`) record.

    Attributes:
      staleness: per update, the τ handed to the optimizer (``model.next``'s output, after
        the K-async group mapping and clipping to ``max_delay``); per arrival, the raw
        staleness of that gradient.
      time: simulated wall clock of the update / arrival.
      worker: the arriving worker (for an update: the arrival that completed it).
      accepted: whether the arrival was accepted (always True per update).
      applied: whether the arrival completed an update (always True per update).
      dropped: gradients dropped since the previous record.
      clipped: whether the update's τ was clipped to ``max_delay``.
      version: server version after the record.
      stopped: computations stopped (and restarted) since the previous record.
    """

    staleness: jax.Array
    time: jax.Array
    worker: jax.Array
    accepted: jax.Array
    applied: jax.Array
    dropped: jax.Array
    clipped: jax.Array
    version: jax.Array
    stopped: jax.Array
