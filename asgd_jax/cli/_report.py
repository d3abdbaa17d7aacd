"""Reports: the tables, JSON files and plots of what :func:`asgd_jax.train.train` returned.

Nothing here computes a result: every number comes from a
:class:`~asgd_jax.train.TrainResult` (its history, summary and staleness), formatted.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from asgd_jax import train as train_lib
from asgd_jax import transforms

__all__ = [
    "finite",
    "format_table",
    "plot_demo",
    "plot_run",
    "plot_sweep",
    "result_headers",
    "result_json",
    "result_row",
    "write_json",
]


# --------------------------------------------------------------------------------------------
# JSON.


def write_json(path: str, payload: Any) -> None:
    """Writes ``payload`` to ``path`` atomically (a partial file, then a rename)."""
    partial = path + ".partial"
    with open(partial, "w", encoding="utf-8") as file:
        json.dump(payload, file, indent=1, allow_nan=False, default=_json_default)
        file.write("\n")
    os.replace(partial, path)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray | np.generic):
        return finite(value.tolist())
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def finite(value: Any) -> Any:
    """NaN and infinities become ``None`` (JSON has no NaN)."""
    if isinstance(value, list):
        return [finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def result_json(result: train_lib.TrainResult, target: float | None) -> dict[str, Any]:
    """Everything about one run: config, seeds, summary, history and staleness histogram."""
    return {
        "config": result.config.to_dict(),
        "seeds": None if result.seeds is None else list(result.seeds),
        "time_unit": result.time_unit,
        "summary": train_lib.summarize(result, target),
        "history": {k: finite(v.tolist()) for k, v in result.history.items()},
        "staleness_histogram": finite(result.staleness_histogram.tolist()),
    }


# --------------------------------------------------------------------------------------------
# Tables.


def _mean_std(values: Any, digits: int = 3) -> str:
    values = np.asarray(values, np.float64).reshape(-1)
    if values.size == 0 or np.all(np.isnan(values)):
        return "—"
    present = values[~np.isnan(values)]
    text = f"{present.mean():.{digits}f}"
    if present.size > 1:
        text += f" ± {present.std():.{digits}f}"
    if present.size < values.size:
        text += f" ({present.size}/{values.size})"
    return text


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs)

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def result_row(label: str, result: train_lib.TrainResult, target: float | None) -> list[str]:
    """One table row: final test accuracy, time to ``target``, total time, mean / max τ.

    A run that diverged (:attr:`~asgd_jax.train.TrainResult.diverged`) says so after its
    label (with how many of its seeds did).
    """
    history = result.history
    diverged = np.asarray(result.diverged).reshape(-1)
    if diverged.any():
        seeds = f": {diverged.sum()}/{diverged.size} seeds" if diverged.size > 1 else ""
        label = f"{label} (diverged{seeds})"
    row = [label, _mean_std(history["test_accuracy"][..., -1])]
    if target is not None:
        row.append(_mean_std(train_lib.time_to_accuracy(history, target), 1))
    row += [
        _mean_std(history["time"][..., -1], 1),
        _mean_std(result.mean_staleness, 2),
        str(int(np.max(result.max_staleness))),
    ]
    return row


def result_headers(target: float | None, time_unit: str) -> list[str]:
    unit = "time" if time_unit == "simulated time" else "steps"
    headers = ["run", "final test acc"]
    if target is not None:
        headers.append(f"{unit} to {target:.0%}")
    return [*headers, f"total {unit}", "mean τ", "max τ"]


# --------------------------------------------------------------------------------------------
# Plots.


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _time_label(time_unit: str) -> str:
    return "simulated wall-clock time" if time_unit == "simulated time" else "step"


def _curve(ax: Any, x: Any, y: Any, label: str, color: Any = None) -> None:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if y.ndim == 1:
        ax.plot(x, y, label=label, color=color, lw=2)
        return
    # Seeds have their own time grids: average on a common grid, shade the min–max band.
    grid = np.linspace(x[:, 0].max(), x[:, -1].min(), 200)
    curves = np.stack([np.interp(grid, xs, ys) for xs, ys in zip(x, y, strict=True)])
    (line,) = ax.plot(
        grid, curves.mean(0), label=f"{label} (mean of {len(y)} seeds)", color=color, lw=2
    )
    ax.fill_between(grid, curves.min(0), curves.max(0), color=line.get_color(), alpha=0.18, lw=0)


def plot_run(result: train_lib.TrainResult, path: str) -> None:
    """Accuracy and loss (train and test) against time."""
    plt = _pyplot()
    history = result.history
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    xlabel = _time_label(result.time_unit)
    _curve(left, history["time"], history["test_accuracy"], "test")
    _curve(left, history["time"], history["train_accuracy"], "train")
    left.set(xlabel=xlabel, ylabel="accuracy", title="Accuracy")
    _curve(right, history["time"], history["test_loss"], "test")
    _curve(right, history["time"], history["train_loss"], "train")
    right.set(xlabel=xlabel, ylabel="cross-entropy loss", title="Loss", yscale="log")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sweep(
    over: str, values: Sequence[Any], results: Sequence[train_lib.TrainResult], path: str
) -> None:
    """Final test accuracy against the swept value, and every run's accuracy over time."""
    plt = _pyplot()
    numeric = all(isinstance(v, int | float) and v is not None for v in values)
    positions = np.asarray(values, np.float64) if numeric else np.arange(len(values))
    final = [np.asarray(r.history["test_accuracy"], np.float64)[..., -1] for r in results]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    left.errorbar(
        positions,
        [f.mean() for f in final],
        yerr=[f.std() for f in final],
        marker="o",
        capsize=4,
        lw=2,
    )
    left.set(xlabel=over, ylabel="final test accuracy", title="Final test accuracy")
    for result, value in zip(results, values, strict=True):
        history = result.history
        _curve(right, history["time"], history["test_accuracy"], f"{over}={value}")
    right.set(
        xlabel=_time_label(results[0].time_unit),
        ylabel="test accuracy",
        title="Test accuracy over time",
    )
    if not numeric:
        left.set_xticks(positions, [str(v) for v in values])
    for ax in (left, right):
        ax.grid(alpha=0.3)
    right.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_demo(results: Mapping[str, train_lib.TrainResult], target: float, path: str) -> None:
    """Accuracy against simulated time (whole runs and a zoom), and the staleness histograms."""
    plt = _pyplot()
    fig, (left, middle, right) = plt.subplots(
        1, 3, figsize=(17, 4.8), constrained_layout=True, gridspec_kw={"width_ratios": [5, 3, 4]}
    )
    colors = plt.get_cmap("tab10").colors
    # The zoom covers the fastest run's whole duration.
    zoom = min(float(np.min(np.asarray(r.history["time"])[..., -1])) for r in results.values())
    for ax, title in (
        (left, "Test accuracy against simulated wall-clock time"),
        (middle, f"The same, first {zoom:.0f} time units"),
    ):
        for color, (label, result) in zip(colors, results.items(), strict=False):
            _curve(ax, result.history["time"], result.history["test_accuracy"], label, color)
        ax.axhline(target, color="0.4", ls="--", lw=1, label=f"target {target:.0%}")
        ax.set(
            xlabel="simulated wall-clock time (mean compute time = 1)",
            ylabel="test accuracy",
            title=title,
        )
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    middle.set_xlim(0, zoom)
    left.legend(fontsize=9, loc="lower right")

    # Staleness: the asynchronous runs share one simulated cluster (same seeds), hence one
    # histogram; plot each distinct histogram once, named after the runs that share it.
    groups: list[tuple[np.ndarray, list[str], Any]] = []
    for color, (label, result) in zip(colors, results.items(), strict=False):
        histogram = np.asarray(result.staleness_histogram, np.float64)
        histogram = histogram.reshape(-1, histogram.shape[-1]).sum(0)
        for other, labels, _ in groups:
            if other.shape == histogram.shape and np.array_equal(other, histogram):
                labels.append(label)
                break
        else:
            groups.append((histogram, [label], color))
    for histogram, labels, color in groups:
        fraction = histogram / histogram.sum()
        taus = np.arange(fraction.size)
        summary = transforms.staleness_summary(histogram)
        mean, last = float(summary["mean"]), int(summary["max"])
        name = labels[0] if len(labels) == 1 else "asynchronous runs"
        right.bar(
            taus[: last + 1],
            fraction[: last + 1],
            width=1.0,
            color=color,
            alpha=0.75,
            label=f"{name}: mean τ = {mean:.2f}, max τ = {last}",
        )
    right.set(
        xlabel="staleness τ (updates between a worker's read and its write)",
        ylabel="fraction of gradients",
        title="Staleness histogram",
        yscale="log",
    )
    right.grid(alpha=0.3)
    right.legend(fontsize=9)
    fig.savefig(path, dpi=120)
    plt.close(fig)
