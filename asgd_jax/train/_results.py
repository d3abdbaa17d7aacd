"""What a run returns (:class:`TrainResult`) and the numbers read off it."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from asgd_jax import transforms
from asgd_jax.train._config import TrainConfig
from asgd_jax.train._program import TrainState

__all__ = ["DIVERGENCE_FACTOR", "TrainResult", "plain", "summarize", "time_to_accuracy"]

# A run has diverged when its training loss exceeds this many times its value at step 0.
DIVERGENCE_FACTOR = 10.0


@dataclasses.dataclass
class TrainResult:
    """What :func:`asgd_jax.train.train` returns.

    Attributes:
      config: the configuration.
      seeds: the seeds of a vmapped run (arrays then have a leading seed axis), else ``None``.
      state: the final :class:`TrainState`.
      history: per evaluation (step 0, after every chunk): ``step``, ``time``,
        ``batch_loss`` (mean minibatch loss at the stale parameters over the chunk),
        ``train_loss``, ``train_accuracy``, ``test_loss``, ``test_accuracy``,
        ``generalization_gap`` (test − train loss), ``mean_staleness`` and ``max_staleness``
        (so far), ``updates_applied``, ``updates_dropped`` (optimizer drops), and for worker
        simulations ``gradients_dropped`` (stale drops, cancelled stragglers) and
        ``staleness_clipped``; NumPy arrays of shape ``[num_evals]`` (or
        ``[num_seeds, num_evals]``).
      staleness_histogram: count of gradients per staleness τ = 0 … max_delay.
      time_unit: ``"simulated time"`` (worker clock) or ``"steps"``.
      wall_seconds: real seconds the run took in this process (compilation included).
      resumed_from: the step of the checkpoint the run resumed from, else ``None``.
    """

    config: TrainConfig
    seeds: tuple[int, ...] | None
    state: TrainState
    history: dict[str, np.ndarray]
    staleness_histogram: np.ndarray
    time_unit: str
    wall_seconds: float
    resumed_from: int | None = None

    @property
    def params(self) -> Any:
        """The final parameters."""
        return self.state.params

    @property
    def diverged(self) -> np.ndarray:
        """Whether the run diverged (one per seed).

        At some evaluation its training loss was non-finite or above ``DIVERGENCE_FACTOR``
        times its value at step 0, or a minibatch loss was non-finite.
        """
        train_loss = np.asarray(self.history["train_loss"], np.float64)
        batch_loss = np.asarray(self.history["batch_loss"], np.float64)[..., 1:]
        exploded = ~np.isfinite(train_loss) | (train_loss > DIVERGENCE_FACTOR * train_loss[..., :1])
        return exploded.any(-1) | ~np.isfinite(batch_loss).all(-1)

    @property
    def mean_staleness(self) -> np.ndarray:
        """Mean staleness of every gradient of the run (float64; one per seed)."""
        return transforms.staleness_summary(np.asarray(self.staleness_histogram))["mean"]

    @property
    def max_staleness(self) -> np.ndarray:
        """Largest staleness of any gradient of the run (one per seed)."""
        return transforms.staleness_summary(np.asarray(self.staleness_histogram))["max"]


def time_to_accuracy(
    history: Mapping[str, np.ndarray], target: float, *, key: str = "test_accuracy"
) -> np.ndarray:
    """First ``time`` at which ``history[key]`` reaches ``target`` (``nan`` if never).

    Works on one run (``[num_evals]`` → scalar) or on seeds (``[S, num_evals]`` → ``[S]``).
    The resolution is one evaluation interval.
    """
    values = np.asarray(history[key])
    times = np.asarray(history["time"], np.float64)
    reached = values >= target
    first = np.argmax(reached, axis=-1)
    out = np.take_along_axis(times, first[..., None], axis=-1)[..., 0]
    return np.where(reached.any(axis=-1), out, np.nan)


_FINAL = (
    "step",
    "time",
    "train_loss",
    "train_accuracy",
    "test_loss",
    "test_accuracy",
    "generalization_gap",
    "mean_staleness",
    "max_staleness",
    "updates_applied",
    "updates_dropped",
    "gradients_dropped",
    "staleness_clipped",
)


def summarize(result: TrainResult, target_accuracy: float | None = None) -> dict[str, Any]:
    """Final numbers of a run as plain floats (lists over seeds for vmapped runs).

    Args:
      result: a :class:`TrainResult`.
      target_accuracy: also report the time and steps to this test accuracy (``None`` when a
        run never reaches it).

    Returns:
      A JSON-ready dict: the final metrics, ``diverged`` (:attr:`TrainResult.diverged`),
      ``time_unit`` and ``wall_seconds``.
    """
    history = result.history
    out: dict[str, Any] = {}
    for name in _FINAL:
        key = name if name in ("step", "time") else "final_" + name
        out[key] = plain(history[name][..., -1])
    if target_accuracy is not None:
        out["target_accuracy"] = float(target_accuracy)
        out["time_to_target"] = plain(time_to_accuracy(history, target_accuracy))
        steps = dict(history, time=history["step"])
        out["steps_to_target"] = plain(time_to_accuracy(steps, target_accuracy))
    out["diverged"] = plain(result.diverged)
    out["time_unit"] = result.time_unit
    out["wall_seconds"] = result.wall_seconds
    return out


def plain(x: Any) -> Any:
    """An array as nested Python lists of numbers (NaN becomes ``None``), for JSON."""
    x = np.asarray(x)
    if x.ndim:
        return [plain(v) for v in x]
    value = x.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
