"""The ``asgd-jax`` command: ``demo``, ``run`` and ``sweep``, all on :func:`asgd_jax.train.train`.

* ``asgd-jax demo`` trains one model on the bundled digits four ways on the same simulated
  cluster (n workers, some of them stragglers): synchronous SGD (every round waits for all
  n), asynchronous SGD, staleness-aware ASGD and DC-ASGD. It prints a table (final test
  accuracy, simulated wall-clock time to a target accuracy, mean / max staleness) and writes
  ``demo.png`` (accuracy against simulated time, staleness histogram) and ``demo.json``
  (every number) to the output directory.
* ``asgd-jax run [CONFIG.json] [--field value ...]`` trains any configuration: a JSON file of
  :class:`asgd_jax.train.TrainConfig` fields, overridden by flags of the same names.
* ``asgd-jax sweep --over FIELD --values v1,v2,...`` trains one configuration per value
  (e.g. ``num_workers`` or ``max_delay``), each with its seeds vmapped.

Outputs go to ``--out`` (default ``./runs/<timestamp>``); an existing, non-empty directory is
only written to with ``--overwrite`` (or ``run --resume``). Bad flags and impossible
combinations end with a one-line error and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import shutil
import sys
import time
import typing
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["main", "demo_configs"]

_EXIT_USAGE = 2
_EXIT_FAILURE = 1


class UsageError(Exception):
    """A problem with the command line or the configuration it describes (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (no usage dump), exit status 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(_EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# --------------------------------------------------------------------------------------------
# Flags generated from TrainConfig.

_GROUPS = {
    "data": ("dataset", "data_dir", "train_size", "batch_size", "data_streams"),
    "model": ("model", "hidden_sizes"),
    "optimizer": (
        "optimizer",
        "learning_rate",
        "momentum",
        "mitigation",
        "dc_lambda",
        "max_staleness",
    ),
    "delay model": ("delay", "min_delay", "max_delay", "delay_mean"),
    "simulated workers (delay=workers)": (
        "num_workers",
        "protocol",
        "k",
        "compute_time",
        "compute_mean",
        "compute_shift",
        "compute_cv",
        "pareto_alpha",
        "num_slow",
        "slow_factor",
        "comm_time",
    ),
    "steps and evaluation": (
        "num_steps",
        "eval_every",
        "eval_batch_size",
        "seed",
        "checkpoint_every",
        "max_checkpoints",
    ),
}


def _config_fields() -> dict[str, tuple[Any, dataclasses.Field]]:
    from asgd_jax.train import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    return {f.name: (hints[f.name], f) for f in dataclasses.fields(TrainConfig)}


def _value_parser(hint: Any) -> Callable[[str], Any]:
    """Parses one flag value for a config field of type ``hint``."""
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args else hint

    def parse(text: str) -> Any:
        if optional and text.strip().lower() == "none":
            return None
        if typing.get_origin(base) is tuple:
            try:
                return tuple(int(v) for v in text.split(",") if v.strip())
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"expected comma-separated integers, got {text!r}"
                ) from None
        if base is int:
            try:
                return int(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if base is float:
            try:
                return float(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        return text

    return parse


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    fields = _config_fields()
    for title, names in _GROUPS.items():
        group = parser.add_argument_group(title)
        for name in names:
            hint, f = fields[name]
            default = f.default
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            kwargs: dict[str, Any] = {
                "dest": name,
                "default": argparse.SUPPRESS,
                "type": _value_parser(hint),
                "help": f.metadata.get("help", "")
                + ("" if default is None else f" (default: {shown})"),
            }
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
                kwargs["metavar"] = "{" + ",".join(f.metadata["choices"]) + "}"
            else:
                kwargs["metavar"] = name.upper()
            group.add_argument("--" + name.replace("_", "-"), **kwargs)
    missing = set(fields) - {n for names in _GROUPS.values() for n in names}
    assert not missing, f"config fields without a flag: {missing}"


def _config_from_args(args: argparse.Namespace, **defaults: Any) -> Any:
    """The TrainConfig of ``args``: defaults, then the CONFIG file, then explicit flags."""
    from asgd_jax.train import TrainConfig

    values: dict[str, Any] = dict(defaults)
    path = getattr(args, "config", None)
    if path is not None:
        if not os.path.isfile(path):
            raise UsageError(f"config file {path} does not exist")
        try:
            with open(path, encoding="utf-8") as file:
                loaded = json.load(file)
        except (OSError, json.JSONDecodeError) as error:
            raise UsageError(f"cannot read config file {path}: {error}") from None
        if not isinstance(loaded, dict):
            raise UsageError(f"config file {path} must hold a JSON object of config fields")
        if "config" in loaded and isinstance(loaded["config"], dict):  # a run's config.json
            loaded = loaded["config"]
        values.update(loaded)
    for name in _config_fields():
        if hasattr(args, name):
            values[name] = getattr(args, name)
    try:
        return TrainConfig.from_dict(values)
    except (TypeError, ValueError) as error:
        raise UsageError(f"invalid configuration: {error}") from None


# --------------------------------------------------------------------------------------------
# Output directories and files.


def _output_dir(path: str | None, overwrite: bool, *, allow_existing: bool = False) -> str:
    """The output directory, checked but not created (see :func:`_make_dir`)."""
    if path is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = os.path.join("runs", stamp)
        suffix = 1
        while os.path.exists(path):
            path = os.path.join("runs", f"{stamp}-{suffix}")
            suffix += 1
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"--out {path} exists and is not a directory")
    if os.path.isdir(path) and os.listdir(path) and not (overwrite or allow_existing):
        raise UsageError(
            f"output directory {path} exists and is not empty; pass --overwrite to write "
            "into it, or choose another --out"
        )
    return path


def _make_dir(path: str) -> str:
    """Creates the output directory once the configuration has been checked."""
    os.makedirs(path, exist_ok=True)
    return path


def _write_json(path: str, payload: Any) -> None:
    partial = path + ".partial"
    with open(partial, "w", encoding="utf-8") as file:
        json.dump(payload, file, indent=1, allow_nan=False, default=_json_default)
        file.write("\n")
    os.replace(partial, path)


def _json_default(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.ndarray | np.generic):
        return _finite(value.tolist())
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _finite(value: Any) -> Any:
    """NaN and infinities become ``None`` (JSON has no NaN)."""
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _history_json(result: Any) -> dict[str, Any]:
    return {k: _finite(v.tolist()) for k, v in result.history.items()}


def _result_json(result: Any, target: float | None) -> dict[str, Any]:
    from asgd_jax.train import summarize

    return {
        "config": result.config.to_dict(),
        "seeds": None if result.seeds is None else list(result.seeds),
        "time_unit": result.time_unit,
        "summary": summarize(result, target),
        "history": _history_json(result),
        "staleness_histogram": _finite(result.staleness_histogram.tolist()),
    }


# --------------------------------------------------------------------------------------------
# Tables.


def _mean_std(values: Any, digits: int = 3) -> str:
    import numpy as np

    values = np.asarray(values, np.float64).reshape(-1)
    if values.size == 0 or np.all(np.isnan(values)):
        return "—"
    finite = values[~np.isnan(values)]
    text = f"{finite.mean():.{digits}f}"
    if finite.size > 1:
        text += f" ± {finite.std():.{digits}f}"
    if finite.size < values.size:
        text += f" ({finite.size}/{values.size})"
    return text


def _format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs)

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def _staleness_stats(result: Any) -> tuple[Any, Any]:
    """Mean and max staleness over all applied gradients, per seed."""
    import numpy as np

    histogram = np.asarray(result.staleness_histogram, np.float64)
    taus = np.arange(histogram.shape[-1])
    count = np.maximum(histogram.sum(-1), 1)
    mean = (histogram * taus).sum(-1) / count
    top = np.where(histogram > 0, taus, 0).max(-1)
    return mean, top


def _result_row(label: str, result: Any, target: float | None) -> list[str]:
    from asgd_jax.train import time_to_accuracy

    history = result.history
    mean, top = _staleness_stats(result)
    row = [label, _mean_std(history["test_accuracy"][..., -1])]
    if target is not None:
        row.append(_mean_std(time_to_accuracy(history, target), 1))
    row += [
        _mean_std(history["time"][..., -1], 1),
        _mean_std(mean, 2),
        str(int(max(top.reshape(-1)))),
    ]
    return row


def _result_headers(target: float | None, time_unit: str) -> list[str]:
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


def _curve(ax: Any, x: Any, y: Any, label: str, color: Any = None) -> None:
    import numpy as np

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


def _plot_run(result: Any, path: str) -> None:
    plt = _pyplot()
    history = result.history
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    xlabel = "simulated wall-clock time" if result.time_unit == "simulated time" else "step"
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


# --------------------------------------------------------------------------------------------
# Commands.


def _load_dataset_and_check(config: Any) -> Any:
    from asgd_jax import data as data_lib
    from asgd_jax import train as train_lib

    try:
        dataset = train_lib.load_dataset(config)
    except data_lib.DatasetNotAvailableError as error:
        raise UsageError(str(error)) from None
    except (TypeError, ValueError) as error:
        raise UsageError(f"invalid configuration: {error}") from None
    _check_program(config, dataset)
    return dataset


def _check_program(config: Any, dataset: Any) -> None:
    """Checks what only the dataset can tell (batch sizes) by building the run's program."""
    from asgd_jax import train as train_lib

    try:
        train_lib.build_program(config, dataset)
    except (TypeError, ValueError) as error:
        raise UsageError(f"invalid configuration: {error}") from None


def _seeds(config: Any, num_seeds: int) -> tuple[int, ...] | None:
    if num_seeds < 1:
        raise UsageError(f"--seeds must be >= 1, got {num_seeds}")
    return None if num_seeds == 1 else tuple(range(config.seed, config.seed + num_seeds))


def _check_target(target: float | None) -> None:
    if target is not None and not 0 < target <= 1:
        raise UsageError(f"--target must be an accuracy in (0, 1], got {target}")


def _progress(args: argparse.Namespace) -> bool | None:
    return False if args.quiet else None


def _cmd_run(args: argparse.Namespace) -> int:
    out = _output_dir(args.out, args.overwrite, allow_existing=args.resume)
    if args.resume_step is not None and not args.resume:
        raise UsageError("--resume-step needs --resume")
    _check_target(args.target)
    from asgd_jax import train as train_lib

    config = _config_from_args(args)
    seeds = _seeds(config, args.seeds)
    dataset = _load_dataset_and_check(config)
    _make_dir(out)
    checkpoint_dir = os.path.join(out, "checkpoints")
    if not args.resume and os.path.isdir(checkpoint_dir):
        shutil.rmtree(checkpoint_dir)  # --overwrite was given (checked above)
    use_checkpoints = args.resume or config.checkpoint_every is not None
    _say(args, f"training {_describe(config)} → {out}")
    result = train_lib.train(
        config,
        seeds=seeds,
        dataset=dataset,
        checkpoint_dir=checkpoint_dir if use_checkpoints else None,
        resume=args.resume,
        resume_step=args.resume_step,
        progress=_progress(args),
    )
    _write_json(os.path.join(out, "config.json"), config.to_dict())
    payload = _result_json(result, args.target)
    payload["resumed_from"] = result.resumed_from
    _write_json(os.path.join(out, "metrics.json"), payload)
    _plot_run(result, os.path.join(out, "curves.png"))
    headers = _result_headers(args.target, result.time_unit)
    print(_format_table(headers, [_result_row(_label(config), result, args.target)]))
    _say(args, f"wrote {out}/config.json, metrics.json, curves.png")
    return 0


def _sweep_values(field: str, text: str) -> list[Any]:
    fields = _config_fields()
    if field not in fields:
        raise UsageError(f"--over must name a config field, got {field!r}")
    parse = _value_parser(fields[field][0])
    values = []
    for item in text.split(";") if fields[field][1].name == "hidden_sizes" else text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            values.append(parse(item))
        except argparse.ArgumentTypeError as error:
            raise UsageError(f"--values for {field}: {error}") from None
    if not values:
        raise UsageError("--values must list at least one value")
    return values


def _cmd_sweep(args: argparse.Namespace) -> int:
    import numpy as np

    from asgd_jax import train as train_lib

    base = _config_from_args(args)
    _check_target(args.target)
    values = _sweep_values(args.over, args.values)
    configs = []
    for value in values:
        try:
            configs.append(base.replace(**{args.over: value}))
        except (TypeError, ValueError) as error:
            raise UsageError(f"invalid configuration for {args.over}={value}: {error}") from None
    seeds = _seeds(base, args.seeds)
    out = _output_dir(args.out, args.overwrite)
    loaded: dict[Any, Any] = {}
    datasets = []
    for config in configs:
        source = (config.dataset, config.data_dir, config.train_size)
        if source not in loaded:
            loaded[source] = _load_dataset_and_check(config)
        else:
            _check_program(config, loaded[source])
        datasets.append(loaded[source])
    _make_dir(out)
    rows, runs = [], []
    for value, config, dataset in zip(values, configs, datasets, strict=True):
        _say(args, f"{args.over}={value}: training {_describe(config)}")
        result = train_lib.train(config, seeds=seeds, dataset=dataset, progress=_progress(args))
        rows.append(_result_row(f"{args.over}={value}", result, args.target))
        run = _result_json(result, args.target)
        run["value"] = list(value) if isinstance(value, tuple) else value
        runs.append(run)
    headers = _result_headers(args.target, runs[0]["time_unit"])
    table = _format_table(headers, rows)
    print(table)
    _write_json(
        os.path.join(out, "sweep.json"),
        {
            "over": args.over,
            "values": [r["value"] for r in runs],
            "target": args.target,
            "seeds": None if seeds is None else list(seeds),
            "table": table.splitlines(),
            "runs": runs,
        },
    )

    plt = _pyplot()
    numeric = all(isinstance(v, int | float) and v is not None for v in values)
    positions = np.asarray(values, np.float64) if numeric else np.arange(len(values))
    final = [np.asarray(r["history"]["test_accuracy"], np.float64)[..., -1] for r in runs]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    left.errorbar(
        positions,
        [f.mean() for f in final],
        yerr=[f.std() for f in final],
        marker="o",
        capsize=4,
        lw=2,
    )
    left.set(xlabel=args.over, ylabel="final test accuracy", title="Final test accuracy")
    for run, value in zip(runs, values, strict=True):
        history = {k: np.asarray(v, np.float64) for k, v in run["history"].items()}
        _curve(right, history["time"], history["test_accuracy"], f"{args.over}={value}")
    xlabel = "simulated wall-clock time" if runs[0]["time_unit"] == "simulated time" else "step"
    right.set(xlabel=xlabel, ylabel="test accuracy", title="Test accuracy over time")
    if not numeric:
        left.set_xticks(positions, [str(v) for v in values])
    for ax in (left, right):
        ax.grid(alpha=0.3)
    right.legend(fontsize=8)
    fig.savefig(os.path.join(out, "sweep.png"), dpi=120)
    plt.close(fig)
    _say(args, f"wrote {out}/sweep.json, sweep.png")
    return 0


# --------------------------------------------------------------------------------------------
# The demo.


DEMO_TARGET = 0.85
DEMO_DC_LAMBDA = 2.0


def demo_configs(
    num_workers: int = 8,
    num_slow: int = 2,
    slow_factor: float = 4.0,
    rounds: int = 300,
    evals: int = 30,
    learning_rate: float = 0.2,
) -> dict[str, Any]:
    """The four runs of ``asgd-jax demo``, keyed by their label.

    One MLP on the bundled digits, one simulated cluster: ``num_workers`` workers with
    exponential compute times of mean 1, the last ``num_slow`` of them ``slow_factor`` times
    slower. Synchronous SGD runs ``rounds`` rounds, each waiting for all n workers and
    applying the mean of their n gradients; the asynchronous runs apply each gradient on
    arrival, n × ``rounds`` updates, so every run computes the same number of gradients.
    DC-ASGD is the adaptive variant (DC-ASGD-a) with λ₀ = ``DEMO_DC_LAMBDA``: on a model this
    small the constant-λ form changes the update by parts per million.

    Args:
      num_workers: n, at least 2.
      num_slow: stragglers among them, in [0, n].
      slow_factor: how much slower a straggler is (≥ 1).
      rounds: synchronous rounds (≥ 1).
      evals: evaluations per run (≥ 1); rounds must be a multiple of it.
      learning_rate: the learning rate of every run.

    Returns:
      ``{label: TrainConfig}``.
    """
    from asgd_jax.train import TrainConfig

    if rounds % evals:
        raise ValueError(f"rounds must be a multiple of evals={evals}, got {rounds}")
    common = dict(
        dataset="digits",
        model="mlp",
        hidden_sizes=(64,),
        batch_size=16,
        optimizer="sgd",
        learning_rate=learning_rate,
        delay="workers",
        num_workers=num_workers,
        num_slow=num_slow,
        slow_factor=slow_factor,
        compute_time="exponential",
        compute_mean=1.0,
    )
    sync = TrainConfig(**common, protocol="k_sync", num_steps=rounds, eval_every=rounds // evals)
    async_steps = rounds * num_workers
    asynchronous = dict(
        common, protocol="async", num_steps=async_steps, eval_every=async_steps // evals
    )
    return {
        f"synchronous SGD ({num_workers} workers)": sync,
        "ASGD": TrainConfig(**asynchronous),
        "staleness-aware ASGD": TrainConfig(**asynchronous, mitigation="staleness_aware"),
        "DC-ASGD-a": TrainConfig(
            **asynchronous, mitigation="dc_asgd_adaptive", dc_lambda=DEMO_DC_LAMBDA
        ),
    }


def _cmd_demo(args: argparse.Namespace) -> int:
    from asgd_jax import __version__
    from asgd_jax import train as train_lib

    _check_target(args.target)
    if args.workers < 2:
        raise UsageError(f"--workers must be >= 2, got {args.workers}")
    if not 0 <= args.stragglers <= args.workers:
        raise UsageError(f"--stragglers must be in [0, --workers={args.workers}]")
    if args.evals < 1 or args.rounds < args.evals or args.rounds % args.evals:
        raise UsageError(f"--rounds must be a positive multiple of --evals={args.evals}")
    try:
        configs = demo_configs(
            args.workers,
            args.stragglers,
            args.slow_factor,
            args.rounds,
            args.evals,
            args.learning_rate,
        )
    except (TypeError, ValueError) as error:
        raise UsageError(f"invalid demo settings: {error}") from None
    if args.seeds < 1:
        raise UsageError(f"--seeds must be >= 1, got {args.seeds}")
    seeds = tuple(range(args.seeds))
    run_seeds = seeds if len(seeds) > 1 else None  # one seed needs no vmap
    out = _output_dir(args.out, args.overwrite)
    started = time.perf_counter()
    dataset = _load_dataset_and_check(next(iter(configs.values())))
    for config in configs.values():
        _check_program(config, dataset)
    _make_dir(out)
    _say(
        args,
        f"demo: {args.workers} simulated workers ({args.stragglers} stragglers, "
        f"{args.slow_factor:g}x slower), {len(seeds)} seeds, digits ({dataset.num_train} "
        f"train / {dataset.num_test} test) → {out}",
    )
    results = {}
    for label, config in configs.items():
        results[label] = train_lib.train(
            config, seeds=run_seeds, dataset=dataset, progress=_progress(args)
        )
        _say(args, f"  {label}: {results[label].wall_seconds:.1f} s")
    rows = [_result_row(label, r, args.target) for label, r in results.items()]
    table = _format_table(_result_headers(args.target, "simulated time"), rows)
    print(table)
    _plot_demo(results, args.target, os.path.join(out, "demo.png"))
    elapsed = time.perf_counter() - started
    _write_json(
        os.path.join(out, "demo.json"),
        {
            "asgd_jax_version": __version__,
            "target_accuracy": args.target,
            "seeds": list(seeds),
            "table": table.splitlines(),
            "wall_seconds": elapsed,
            "runs": {
                label: dict(
                    _result_json(r, args.target),
                    mean_staleness=_finite(_staleness_stats(r)[0].tolist()),
                    max_staleness=_finite(_staleness_stats(r)[1].tolist()),
                )
                for label, r in results.items()
            },
        },
    )
    _say(args, f"wrote {out}/demo.png and demo.json ({elapsed:.0f} s)")
    return 0


def _plot_demo(results: dict[str, Any], target: float, path: str) -> None:
    import numpy as np

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
        last = int(np.nonzero(fraction)[0].max())
        mean = float((taus * fraction).sum())
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


# --------------------------------------------------------------------------------------------
# Entry point.


def _say(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr, flush=True)


def _label(config: Any) -> str:
    """A short name of a run for tables, e.g. ``async n=8 + dc_asgd``."""
    if config.delay == "workers":
        name = f"{config.protocol} n={config.num_workers}"
    elif config.delay == "none":
        name = "synchronous"
    else:
        name = f"{config.delay} delays"
    return name if config.mitigation == "none" else f"{name} + {config.mitigation}"


def _describe(config: Any) -> str:
    delay = config.delay
    if delay == "workers":
        delay = f"{config.num_workers} workers, {config.protocol}"
    return (
        f"{config.model} on {config.dataset}, {config.optimizer}, {delay}, "
        f"mitigation={config.mitigation}, {config.num_steps} steps"
    )


def _common(parser: argparse.ArgumentParser, *, target: float | None) -> None:
    parser.add_argument(
        "--out", metavar="DIR", help="output directory (default: ./runs/<timestamp>)"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="write into an existing, non-empty output directory",
    )
    parser.add_argument(
        "--quiet", action="store_true", help="print only the table (no progress bar or messages)"
    )
    parser.add_argument(
        "--target",
        type=float,
        default=target,
        metavar="ACC",
        help="report the time to reach this test accuracy"
        + (f" (default: {target})" if target is not None else ""),
    )


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="asgd-jax",
        description="Asynchronous SGD with stale gradients: simulate workers, train, compare.",
        epilog="Examples:\n"
        "  asgd-jax demo\n"
        "  asgd-jax run --num-workers 16 --num-slow 4 --mitigation dc_asgd --seeds 4\n"
        "  asgd-jax run my_config.json --learning-rate 0.05\n"
        "  asgd-jax sweep --over num_workers --values 1,2,4,8,16 --seeds 4\n"
        "Run `asgd-jax COMMAND --help` for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    demo = commands.add_parser(
        "demo",
        help="sync SGD vs ASGD vs staleness-aware ASGD vs DC-ASGD on simulated workers",
        description="Train one MLP on the bundled digits four ways on the same simulated "
        "cluster (exponential compute times, some workers stragglers): synchronous SGD, ASGD, "
        "staleness-aware ASGD and DC-ASGD (adaptive), with the same number of gradients "
        "each. Prints a table and writes demo.png and demo.json.",
    )
    _common(demo, target=DEMO_TARGET)
    demo.add_argument("--workers", type=int, default=8, help="simulated workers (default: 8)")
    demo.add_argument(
        "--stragglers", type=int, default=2, help="how many of them are slow (default: 2)"
    )
    demo.add_argument(
        "--slow-factor",
        type=float,
        default=4.0,
        help="how many times slower a straggler is (default: 4)",
    )
    demo.add_argument(
        "--rounds",
        type=int,
        default=300,
        help="synchronous rounds; the asynchronous runs take workers × rounds "
        "updates (default: 300)",
    )
    demo.add_argument("--evals", type=int, default=30, help="evaluations per run (default: 30)")
    demo.add_argument(
        "--learning-rate", type=float, default=0.2, help="learning rate of every run (default: 0.2)"
    )
    demo.add_argument("--seeds", type=int, default=4, help="seeds per run, vmapped (default: 4)")
    demo.set_defaults(handler=_cmd_demo)

    run = commands.add_parser(
        "run",
        help="train one configuration (a JSON file and/or flags)",
        description="Train one configuration. CONFIG is a JSON object of config fields (or a "
        "previous run's config.json); flags override it. Writes config.json, metrics.json "
        "and curves.png.",
    )
    run.add_argument("config", nargs="?", metavar="CONFIG.json", help="configuration file")
    _common(run, target=None)
    run.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="run this many seeds (seed, seed+1, ...) vmapped (default: 1)",
    )
    run.add_argument(
        "--resume", action="store_true", help="resume from the checkpoints in --out/checkpoints"
    )
    run.add_argument(
        "--resume-step",
        type=int,
        metavar="STEP",
        help="with --resume: resume from this checkpoint instead of the latest",
    )
    _add_config_flags(run)
    run.set_defaults(handler=_cmd_run)

    sweep = commands.add_parser(
        "sweep",
        help="train one configuration per value of a field, seeds vmapped",
        description="Train one configuration per value of a config field (e.g. num_workers, "
        "max_delay, delay_mean, learning_rate), each with its seeds vmapped. Writes sweep.json "
        "and sweep.png.",
    )
    sweep.add_argument("config", nargs="?", metavar="CONFIG.json", help="base configuration")
    sweep.add_argument(
        "--over",
        required=True,
        metavar="FIELD",
        help="the config field to vary, e.g. num_workers or max_delay",
    )
    sweep.add_argument(
        "--values",
        required=True,
        metavar="V1,V2,...",
        help="comma-separated values (for hidden_sizes: 64;64,64)",
    )
    _common(sweep, target=None)
    sweep.add_argument("--seeds", type=int, default=4, help="seeds per value, vmapped (default: 4)")
    _add_config_flags(sweep)
    sweep.set_defaults(handler=_cmd_sweep)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``asgd-jax`` command line; returns the exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except UsageError as error:
        print(f"asgd-jax {args.command}: error: {error}", file=sys.stderr)
        return _EXIT_USAGE
    except KeyboardInterrupt:
        print(f"asgd-jax {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        from asgd_jax.train import CheckpointError

        if isinstance(error, CheckpointError | OSError):
            print(f"asgd-jax {args.command}: error: {error}", file=sys.stderr)
            return _EXIT_FAILURE
        raise


if __name__ == "__main__":
    sys.exit(main())
