"""The commands ``demo``, ``run`` and ``sweep``, and the parser that wires them to flags.

Each command checks everything it can before it writes anything (flags, the configuration
through :class:`~asgd_jax.train.TrainConfig`, the dataset through
:func:`~asgd_jax.train.check_fits`), then calls :func:`~asgd_jax.train.train` and reports.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import time
from typing import Any

from asgd_jax import data as data_lib
from asgd_jax import train as train_lib
from asgd_jax.cli import _report as report
from asgd_jax.cli._flags import (
    Parser,
    UsageError,
    add_common_flags,
    add_config_flags,
    check_target,
    config_from_args,
    seeds_of,
    sweep_axes,
)
from asgd_jax.cli._outputs import make_dir as _make_dir
from asgd_jax.cli._outputs import output_dir as _output_dir
from asgd_jax.cli._outputs import run_dir as _run_dir
from asgd_jax.experiments import demo as demo_lib

__all__ = ["build_parser"]


# --------------------------------------------------------------------------------------------
# Datasets and messages.


def _check_fits(config: train_lib.TrainConfig, dataset: data_lib.Dataset) -> None:
    try:
        train_lib.check_fits(config, dataset)
    except (TypeError, ValueError) as error:
        raise UsageError(f"invalid configuration: {error}") from None


def _load_dataset(config: train_lib.TrainConfig) -> data_lib.Dataset:
    """The config's dataset, loaded and checked against the config."""
    try:
        dataset = train_lib.load_dataset(config)
    except data_lib.DatasetNotAvailableError as error:
        raise UsageError(str(error)) from None
    except (TypeError, ValueError) as error:
        raise UsageError(f"invalid configuration: {error}") from None
    _check_fits(config, dataset)
    return dataset


def _say(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr, flush=True)


def _progress(args: argparse.Namespace) -> bool | None:
    return False if args.quiet else None


def _label(config: train_lib.TrainConfig) -> str:
    """A short name of a run for tables, e.g. ``async n=8 + dc_asgd``."""
    if config.delay == "workers":
        name = f"{config.protocol} n={config.num_workers}"
    elif config.delay == "none":
        name = "synchronous"
    else:
        name = f"{config.delay} delays"
    return name if config.mitigation == "none" else f"{name} + {config.mitigation}"


def _describe(config: train_lib.TrainConfig) -> str:
    delay = config.delay
    if delay == "workers":
        delay = f"{config.num_workers} workers, {config.protocol}"
    return (
        f"{config.model} on {config.dataset}, {config.optimizer}, {delay}, "
        f"mitigation={config.mitigation}, {config.num_steps} steps"
    )


# --------------------------------------------------------------------------------------------
# run.


def _cmd_run(args: argparse.Namespace) -> int:
    out = _run_dir(args)
    check_target(args.target)
    config = config_from_args(args)
    seeds = seeds_of(config.seed, args.seeds)
    dataset = _load_dataset(config)
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
    report.write_json(os.path.join(out, "config.json"), config.to_dict())
    payload = report.result_json(result, args.target)
    payload["resumed_from"] = result.resumed_from
    report.write_json(os.path.join(out, "metrics.json"), payload)
    report.plot_run(result, os.path.join(out, "curves.png"))
    headers = report.result_headers(args.target, result.time_unit)
    print(report.format_table(headers, [report.result_row(_label(config), result, args.target)]))
    _say(args, f"wrote {out}/config.json, metrics.json, curves.png")
    return 0


# --------------------------------------------------------------------------------------------
# sweep.


def _cmd_sweep(args: argparse.Namespace) -> int:
    base = config_from_args(args)
    check_target(args.target)
    axes = sweep_axes(args.over, args.values, args.sweep)
    try:
        _, points, configs = train_lib.check_sweep(base, axes)
    except (TypeError, ValueError) as error:
        raise UsageError(f"invalid {error}") from None
    if any(config.checkpoint_every is not None for config in configs):
        raise UsageError(
            "sweep saves no checkpoints (checkpoint_every applies to `asgd-jax run`): drop "
            "--checkpoint-every, or checkpoint_every from the CONFIG file"
        )
    seeds = seeds_of(base.seed, args.seeds)
    out = _output_dir(args.out, args.overwrite)
    loaded: dict[Any, data_lib.Dataset] = {}
    for config in configs:
        source = (config.dataset, config.data_dir, config.train_size)
        if source not in loaded:
            loaded[source] = _load_dataset(config)
        else:
            _check_fits(config, loaded[source])
    _make_dir(out)
    names = list(axes)
    _say(args, f"sweeping {', '.join(names)}: training {_describe(base)}")
    shared = next(iter(loaded.values())) if len(loaded) == 1 else None
    swept = train_lib.train(base, sweep=axes, seeds=seeds, dataset=shared, progress=_progress(args))
    rows, runs, labels = [], [], []
    for point, result in swept:
        label = ", ".join(f"{k}={v}" for k, v in point.items())
        labels.append(label)
        rows.append(report.result_row(label, result, args.target))
        run = report.result_json(result, args.target)
        shown = {k: list(v) if isinstance(v, tuple) else v for k, v in point.items()}
        run["value"] = shown[names[0]] if len(names) == 1 else list(shown.values())
        run["point"] = shown
        runs.append(run)
    results = list(swept.results)
    table = report.format_table(report.result_headers(args.target, results[0].time_unit), rows)
    print(table)
    print(swept.describe())
    report.write_json(
        os.path.join(out, "sweep.json"),
        {
            "over": names[0] if len(names) == 1 else names,
            "values": [r["value"] for r in runs],
            "target": args.target,
            "seeds": None if seeds is None else list(seeds),
            "table": table.splitlines(),
            "programs": {
                "vmapped": list(swept.vmapped),
                "looped": list(swept.looped),
                "groups": [list(g) for g in swept.groups],
                "max_delays": list(swept.max_delays),
                "summary": swept.describe(),
            },
            "wall_seconds": swept.wall_seconds,
            "runs": runs,
        },
    )
    png = os.path.join(out, "sweep.png")
    if len(names) == 1:
        report.plot_sweep(names[0], [p[names[0]] for p in points], results, png)
    else:
        report.plot_sweep(" × ".join(names), labels, results, png)
    _say(args, f"wrote {out}/sweep.json, sweep.png")
    return 0


# --------------------------------------------------------------------------------------------
# demo.

# The demo's flags, named in errors about the demo_configs argument each one sets.
_DEMO_FLAGS = {
    "num_workers": "--workers",
    "num_slow": "--stragglers",
    "slow_factor": "--slow-factor",
    "rounds": "--rounds",
    "evals": "--evals",
    "learning_rate": "--learning-rate",
}
_DEMO_NAMES = re.compile(r"\b(" + "|".join(_DEMO_FLAGS) + r")\b")


def _cmd_demo(args: argparse.Namespace) -> int:
    from asgd_jax import __version__

    check_target(args.target)
    try:
        configs = demo_lib.demo_configs(
            args.workers,
            args.stragglers,
            args.slow_factor,
            args.rounds,
            args.evals,
            args.learning_rate,
        )
    except (TypeError, ValueError) as error:
        message = _DEMO_NAMES.sub(lambda m: _DEMO_FLAGS[m.group(1)], str(error))
        raise UsageError(f"invalid demo settings: {message}") from None
    seeds = tuple(range(args.seeds))
    run_seeds = seeds_of(0, args.seeds)
    out = _output_dir(args.out, args.overwrite)
    started = time.perf_counter()
    dataset = _load_dataset(next(iter(configs.values())))
    for config in configs.values():
        _check_fits(config, dataset)
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
    rows = [report.result_row(label, r, args.target) for label, r in results.items()]
    table = report.format_table(report.result_headers(args.target, "simulated time"), rows)
    print(table)
    report.plot_demo(results, args.target, os.path.join(out, "demo.png"))
    elapsed = time.perf_counter() - started
    report.write_json(
        os.path.join(out, "demo.json"),
        {
            "asgd_jax_version": __version__,
            "target_accuracy": args.target,
            "seeds": list(seeds),
            "table": table.splitlines(),
            "wall_seconds": elapsed,
            "runs": {
                label: dict(
                    report.result_json(r, args.target),
                    mean_staleness=report.finite(r.mean_staleness.tolist()),
                    max_staleness=report.finite(r.max_staleness.tolist()),
                )
                for label, r in results.items()
            },
        },
    )
    _say(args, f"wrote {out}/demo.png and demo.json ({elapsed:.0f} s)")
    return 0


# --------------------------------------------------------------------------------------------
# The parser.


def build_parser() -> argparse.ArgumentParser:
    """The ``asgd-jax`` parser: one subcommand per command, each with its handler."""
    parser = Parser(
        prog="asgd-jax",
        description="Asynchronous SGD with stale gradients: simulate workers, train, compare.",
        epilog="Examples:\n"
        "  asgd-jax demo\n"
        "  asgd-jax run --num-workers 16 --num-slow 4 --mitigation dc_asgd --seeds 4\n"
        "  asgd-jax run my_config.json --learning-rate 0.05\n"
        "  asgd-jax sweep --over num_workers --values 1,2,4,8,16 --seeds 4\n"
        "  asgd-jax sweep --sweep learning_rate=0.05,0.1,0.2 --sweep num_slow=0,2,4 --seeds 8\n"
        "Run `asgd-jax COMMAND --help` for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    commands.required = True

    demo = commands.add_parser(
        "demo",
        help="sync SGD vs ASGD vs staleness-aware ASGD vs DC-ASGD on simulated workers",
        description="Train one MLP on the bundled digits four ways on the same simulated "
        "cluster (exponential compute times, some workers stragglers): synchronous SGD, ASGD, "
        "staleness-aware ASGD and DC-ASGD (adaptive), with the same number of gradients "
        "each. Prints a table and writes demo.png and demo.json.",
    )
    add_common_flags(demo, target=demo_lib.DEMO_TARGET)
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
    add_common_flags(run, target=None)
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
    add_config_flags(run)
    run.set_defaults(handler=_cmd_run)

    sweep = commands.add_parser(
        "sweep",
        help="train every point of a grid of field values, seeds vmapped",
        description="Train every point of the Cartesian product of config field values "
        "(--sweep FIELD=V1,V2,... once per field, or --over FIELD --values V1,V2,...). "
        "Fields that enter the program as data (learning_rate, momentum, dc_lambda, "
        "min_delay, delay_mean, the compute-time law, num_slow, slow_factor, comm_time) run "
        "together with the seeds in one compiled program; fields that change shapes or code "
        "(num_workers, max_delay, hidden_sizes, batch_size, ...) loop, one program each. "
        "Writes sweep.json and sweep.png.",
    )
    sweep.add_argument("config", nargs="?", metavar="CONFIG.json", help="base configuration")
    sweep.add_argument(
        "--sweep",
        action="append",
        metavar="FIELD=V1,V2,...",
        help="a config field and its values (repeat for a grid; for hidden_sizes: 64;64,64)",
    )
    sweep.add_argument(
        "--over",
        metavar="FIELD",
        help="the config field to vary, e.g. num_workers or max_delay (with --values)",
    )
    sweep.add_argument(
        "--values",
        metavar="V1,V2,...",
        help="comma-separated values of --over (for hidden_sizes: 64;64,64)",
    )
    add_common_flags(sweep, target=None)
    sweep.add_argument("--seeds", type=int, default=4, help="seeds per value, vmapped (default: 4)")
    add_config_flags(sweep)
    sweep.set_defaults(handler=_cmd_sweep)
    from asgd_jax.cli._hogwild import add_command as add_hogwild_command

    add_hogwild_command(commands)
    return parser
