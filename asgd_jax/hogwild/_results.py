"""What a hogwild run returns: the trace of every applied update, metrics, the result."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import optax

from asgd_jax.transforms import staleness_summary

__all__ = ["Discarded", "HogwildError", "HogwildMetrics", "HogwildResult", "Trace"]


class HogwildError(RuntimeError):
    """A hogwild run failed; ``worker`` is the failing worker's id, ``None`` for the server."""

    def __init__(self, message: str, worker: int | None = None):
        super().__init__(message)
        self.worker = worker


class Trace(NamedTuple):
    """Every applied update, in application order (one entry per update).

    ``staleness[t] = version_applied[t] − version_pulled[t]`` is τ_t of update t; pass the
    trace to :func:`asgd_jax.delays.trace` to replay it. ``worker_step`` is the worker's own
    gradient index (with :func:`worker_batch` it regenerates the batch). In ``"sync"`` mode
    ``worker`` is the last worker to arrive in the round (the one the round waited for) and
    ``loss`` the round's mean loss.
    """

    worker: np.ndarray
    version_pulled: np.ndarray
    version_applied: np.ndarray
    staleness: np.ndarray
    wall_time: np.ndarray
    worker_step: np.ndarray
    loss: np.ndarray


class Discarded(NamedTuple):
    """Every gradient a server rule refused, in the order it was refused (not updates).

    ``stopped[i]`` tells a stop (the server stopped the computation: Ringmaster or Rennala
    with ``stops=True``) from a drop (refused on arrival: ``max_staleness``, Ringmaster's
    threshold, Rennala's work at an old point). ``version`` is the server's version when it
    was refused (a stop: when the server stopped it) and ``staleness = version −
    version_pulled``; ``loss`` is the worker's loss
    at the pulled parameters. Neither changes the parameters nor the version, so the
    :class:`Trace` (the applied updates) alone replays the run.
    """

    worker: np.ndarray
    version_pulled: np.ndarray
    version: np.ndarray
    staleness: np.ndarray
    wall_time: np.ndarray
    worker_step: np.ndarray
    loss: np.ndarray
    stopped: np.ndarray


class HogwildMetrics(NamedTuple):
    """Summary of a hogwild run (host scalars and small NumPy arrays).

    ``gradients`` counts every gradient the workers computed, ``updates`` the applied ones;
    ``dropped`` (refused on arrival) and ``stopped`` (computations stopped by the server)
    count the discarded work of a server rule, as the worker simulator's counters do.
    """

    mode: str
    num_workers: int
    updates: int
    gradients: int
    wall_time: float
    updates_per_second: float
    gradients_per_second: float
    gradients_per_worker: np.ndarray
    mean_staleness: float
    max_staleness: int
    staleness_histogram: np.ndarray
    stopped_by: str
    torn_reads: int
    overlapping_writes: int
    write_residual: float
    dropped: int = 0
    stopped: int = 0
    # The Ray backend's faults (defaults: the thread backend has none of them).
    backend: str = "threads"
    worker_restarts: np.ndarray | None = None  # per worker: times Ray restarted its process
    server_restarts: int = 0  # times the server actor was restarted (and reloaded)
    lost_gradients: int = 0  # gradients computed at versions a restarted server no longer had
    duplicate_pushes: int = 0  # pushes Ray delivered again, dropped by (worker, sequence)


class HogwildResult(NamedTuple):
    """What :func:`train` returns.

    Attributes:
      params: the final parameters (``jax.Array`` leaves, the input's structure).
      opt_state: the server's optimizer state; in ``"lock_free"`` mode a tuple of the
        workers' own optimizer states.
      metrics: a :class:`HogwildMetrics`.
      trace: a :class:`Trace` of every applied update.
      pushes: with ``record_pushes=True``, what was applied, stacked in application order
        (leading axis = update): the gradients (``"locked"``, ``"ringmaster"``), the
        averaged gradients (``"sync"``, ``"rennala"``) or the parameter deltas
        (``"lock_free"``); else ``None``.
      discarded: a :class:`Discarded` of the gradients a server rule refused (empty
        without one), or ``None`` where the backend does not log them.
    """

    params: optax.Params
    opt_state: Any
    metrics: HogwildMetrics
    trace: Trace
    pushes: Any
    discarded: Discarded | None = None


def trace_from_rows(rows: list[tuple]) -> Trace:
    """A :class:`Trace` from ``(worker, pulled, applied, wall_time, worker_step, loss)`` rows.

    Rows are put in application order (``applied``); a server that logs in that order
    already (one thread applying every update) is left as it is.
    """
    rows = sorted(rows, key=lambda row: row[2])
    cols = list(zip(*rows, strict=True)) if rows else [()] * 6
    worker, pulled, applied, wall, step, loss = (np.asarray(c) for c in cols)
    pulled = pulled.astype(np.int64)
    applied = applied.astype(np.int64)
    return Trace(
        worker=worker.astype(np.int32),
        version_pulled=pulled,
        version_applied=applied,
        staleness=(applied - pulled).astype(np.int32),
        wall_time=wall.astype(np.float64),
        worker_step=step.astype(np.int64),
        loss=loss.astype(np.float32),
    )


def discarded_from_rows(rows: list[tuple]) -> Discarded:
    """A :class:`Discarded` from ``(worker, pulled, version, wall, step, loss, stopped)`` rows."""
    cols = list(zip(*rows, strict=True)) if rows else [()] * 7
    worker, pulled, version, wall, step, loss, stopped = (np.asarray(c) for c in cols)
    pulled = pulled.astype(np.int64)
    version = version.astype(np.int64)
    return Discarded(
        worker=worker.astype(np.int32),
        version_pulled=pulled,
        version=version,
        staleness=(version - pulled).astype(np.int32),
        wall_time=wall.astype(np.float64),
        worker_step=step.astype(np.int64),
        loss=loss.astype(np.float32),
        stopped=stopped.astype(bool),
    )


def summarize(
    trace: Trace,
    *,
    mode: str,
    gradients_per_worker: np.ndarray,
    wall_time: float,
    stopped_by: str,
    torn_reads: int = 0,
    overlapping_writes: int = 0,
    write_residual: float = 0.0,
    dropped: int = 0,
    stopped: int = 0,
) -> HogwildMetrics:
    """The :class:`HogwildMetrics` of a run that logged ``trace`` in ``wall_time`` seconds."""
    updates = int(trace.staleness.size)
    gradients = int(gradients_per_worker.sum())
    histogram = np.bincount(trace.staleness) if updates else np.zeros(1, np.int64)
    summary = staleness_summary(histogram)
    return HogwildMetrics(
        mode=mode,
        num_workers=int(gradients_per_worker.size),
        updates=updates,
        gradients=gradients,
        wall_time=wall_time,
        updates_per_second=updates / wall_time if wall_time > 0 else 0.0,
        gradients_per_second=gradients / wall_time if wall_time > 0 else 0.0,
        gradients_per_worker=gradients_per_worker,
        mean_staleness=float(summary["mean"]),
        max_staleness=int(summary["max"]),
        staleness_histogram=histogram,
        stopped_by=stopped_by,
        torn_reads=torn_reads,
        overlapping_writes=overlapping_writes,
        write_residual=write_residual,
        dropped=dropped,
        stopped=stopped,
    )
