"""The ``hogwild`` command: real asynchronous SGD (:func:`asgd_jax.hogwild.train`, threads or
Ray) on the bundled digits, its measured staleness beside the worker simulator's prediction:
each worker's mean cycle time is read off the trace, :func:`asgd_jax.workers.parameter_server`
is built with those speeds and the mode's server rule, and :func:`asgd_jax.workers.simulate`
runs as many updates; the two histograms are compared by their total-variation distance.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from typing import Any

import jax
import numpy as np
import optax

from asgd_jax import data as data_lib
from asgd_jax import hogwild, models, workers
from asgd_jax.cli import _report as report
from asgd_jax.cli._flags import EXIT_FAILURE, UsageError
from asgd_jax.cli._outputs import make_dir, output_dir

__all__ = ["add_command", "cycle_times", "predicted_histogram", "total_variation"]

# The library's argument names (errors quote them in backticks) that have a flag here.
_RENAMED = {"num_workers": "--workers", "worker": "--slow-worker", "extra_time": "the seconds"}
_NAMED = ("steps", "batch_size", "max_staleness", "threshold", "stops", "k", "time_limit")
_NAMES = "|".join((*_RENAMED, *_NAMED, "ray_address", "backend"))
_QUOTED = re.compile(rf"`({_NAMES})`|\b({_NAMES})(?= must be)")  # `name`, or "name must be"
# The simulator's protocol for each hogwild mode (sync: rounds of all n, τ = 0).
_PROTOCOLS = {"locked": "async", "lock_free": "async", "sync": "k_sync"}
_LAWS = ("lognormal", "deterministic", "exponential")
_MAX_ROWS = 24  # text histogram rows before τ is grouped into bins


def _flag_message(error: Exception) -> str:
    """The error with the library's argument names replaced by this command's flags."""

    def flag(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        return _RENAMED.get(name, "--" + name.replace("_", "-"))

    return _QUOTED.sub(flag, str(error))


# --------------------------------------------------------------------------------------------
# The prediction.


def cycle_times(trace: Any, gradients_per_worker: Any, wall_time: float) -> tuple[Any, float]:
    """Each worker's mean cycle time (pull → gradient → push → applied) in seconds, and the
    cycles' coefficient of variation.

    Worker i's applied updates carry its own gradient index (``worker_step``) and the time
    they were applied, so its mean cycle is (t_last − t_first) / (step_last − step_first),
    or t / (step + 1) from the start of the run when all its updates share one index;
    gradients a server rule refused count as cycles (their index is skipped). A worker with
    no applied update falls back to ``wall_time / gradients`` it computed. The coefficient
    of variation (std / mean) pools the cycles seen whole (consecutive indices applied one
    after the other), each divided by its worker's mean; 0 when none is.
    """
    worker, step = np.asarray(trace.worker), np.asarray(trace.worker_step, np.float64)
    time, counts = np.asarray(trace.wall_time, np.float64), np.asarray(gradients_per_worker)
    cycles, ratios = np.empty(counts.size), [np.zeros(0)]
    for i in range(counts.size):
        order = np.argsort(step[worker == i], kind="stable")
        s, t = step[worker == i][order], time[worker == i][order]
        if s.size and s[-1] > s[0] and t[-1] > t[0]:
            cycles[i] = (t[-1] - t[0]) / (s[-1] - s[0])
        elif s.size and t[-1] > 0:
            cycles[i] = t[-1] / (s[-1] + 1.0)
        else:
            cycles[i] = wall_time / max(float(counts[i]), 1.0)
        ratios.append(np.diff(t)[np.diff(s) == 1] / cycles[i])
    whole = np.concatenate(ratios)
    return np.maximum(cycles, 1e-9), float(whole.std() / whole.mean()) if whole.size > 1 else 0.0


def simulator_model(
    mode: str, cycles: Any, cv: float, law: str, rules: dict[str, Any], max_measured: int
) -> Any:
    """The worker simulator's parameter server for ``mode``: worker i's compute times have
    mean ``cycles[i]`` and law ``law`` (``"lognormal"``: coefficient of variation ``cv``)."""
    n = cycles.size
    protocol = _PROTOCOLS.get(mode, mode)  # ringmaster and rennala: the same names
    kwargs: dict[str, Any] = {"protocol": protocol, "speeds": tuple(1.0 / cycles)}
    if protocol == "async":
        kwargs["max_staleness"] = rules.get("max_staleness")
    elif protocol == "ringmaster":
        kwargs.update(threshold=rules.get("threshold"), stops=rules.get("stops", False))
    elif protocol == "rennala":
        kwargs.update(k=rules.get("k"), stops=rules.get("stops", False))
    if law == "lognormal" and cv > 0:
        compute = workers.lognormal(mean=1.0, cv=cv)
    elif law == "exponential":
        compute = workers.exponential(1.0)
    else:
        compute, law = workers.deterministic(1.0), "deterministic"
    bounded = kwargs.get("max_staleness") is not None or kwargs.get("threshold") is not None
    if law != "deterministic" and protocol in ("async", "ringmaster") and not bounded:
        kwargs["max_delay"] = max(16 * n, 2 * max_measured + 1)  # unbounded τ: a history bound
    return workers.parameter_server(n, compute, **kwargs)


def predicted_histogram(model: Any, num_updates: int, seed: int) -> np.ndarray:
    """The simulator's staleness histogram over ``num_updates`` updates (counts)."""
    key = jax.random.fold_in(jax.random.key(seed), 0x51A)
    taus = np.asarray(workers.simulate(model, key, num_updates).staleness)
    return np.bincount(taus)


def total_variation(p: Any, q: Any) -> float:
    """½ Σ |p − q| of two histograms (counts), each normalized to sum 1."""
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    size = max(p.size, q.size)
    p, q = np.pad(p, (0, size - p.size)), np.pad(q, (0, size - q.size))
    return 0.5 * float(np.abs(p / p.sum() - q / q.sum()).sum())


# --------------------------------------------------------------------------------------------
# Output.


def _bins(measured: np.ndarray, predicted: np.ndarray) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Labels and fractions per τ, grouped into at most ``_MAX_ROWS`` bins."""
    size = max(measured.size, predicted.size)
    width = -(-size // _MAX_ROWS)
    rows = -(-size // width)
    p = np.pad(measured, (0, rows * width - measured.size)).reshape(rows, width).sum(1)
    q = np.pad(predicted, (0, rows * width - predicted.size)).reshape(rows, width).sum(1)
    labels = [f"{r * width}" + (f"–{r * width + width - 1}" * (width > 1)) for r in range(rows)]
    return labels, p / max(p.sum(), 1), q / max(q.sum(), 1)


def histogram_text(measured: np.ndarray, predicted: np.ndarray) -> str:
    """The two staleness histograms as text: τ, the measured and predicted shares, bars."""
    labels, p, q = _bins(np.asarray(measured), np.asarray(predicted))
    lines = [f"{'τ':>7s}  {'measured':>8s}  {'predicted':>9s}"]
    for label, a, b in zip(labels, p, q, strict=True):
        bars = f"{'█' * round(30 * a):30s} |{'░' * round(30 * b)}"
        lines.append(f"{label:>7s}  {a:8.1%}  {b:9.1%}  {bars}".rstrip())
    return "\n".join(lines)


def _plot(measured: np.ndarray, predicted: np.ndarray, title: str, path: str) -> None:
    plt = report._pyplot()
    labels, p, q = _bins(np.asarray(measured), np.asarray(predicted))
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(8, 4.2), constrained_layout=True)
    ax.bar(x - 0.2, p, width=0.4, label="measured")
    ax.bar(x + 0.2, q, width=0.4, label="simulated workers at the measured speeds")
    ax.set_xticks(x, labels, rotation=45 if len(labels) > 12 else 0)
    ax.set(xlabel="staleness τ", ylabel="fraction of updates", title=title)
    ax.legend()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def trace_payload(trace: Any) -> dict[str, list]:
    """The trace as JSON columns; ``delays.trace(payload)`` replays its ``staleness``."""
    return {name: np.asarray(col).tolist() for name, col in trace._asdict().items()}


# --------------------------------------------------------------------------------------------
# The command.


def _numbers(kind: type, what: str) -> Any:
    """A flag parser for one number or a comma-separated list of them."""

    def parse(text: str) -> Any:
        try:
            values = tuple(kind(v) for v in text.split(",") if v.strip())
        except ValueError:
            values = ()
        if not values:
            raise argparse.ArgumentTypeError(f"expected {what} (comma-separated), got {text!r}")
        return values[0] if len(values) == 1 and kind is float else values

    return parse


def _straggler(args: argparse.Namespace) -> Any:
    """The ``Straggler`` the flags build (checked against ``--workers``), or ``None``."""
    build = {
        "--straggler-fixed": lambda t: hogwild.Straggler.fixed(t),
        "--straggler-random": lambda t: hogwild.Straggler.random(t, law=args.straggler_law),
        "--straggler-one-slow": lambda t: hogwild.Straggler.one_slow(t, worker=args.slow_worker),
    }
    for flag, make in build.items():
        if (seconds := getattr(args, flag[2:].replace("-", "_"))) is not None:
            try:
                straggler = make(seconds)
                straggler.means(args.workers)  # one entry per worker, the slow one among them
            except (TypeError, ValueError) as error:
                message = _flag_message(error).replace("the seconds", flag)
                raise UsageError(f"invalid straggler: {message}") from None
            return straggler
    return None


def _rules(args: argparse.Namespace) -> dict[str, Any]:
    """The server-rule keywords given on the command line (each checked by train)."""
    rules = {"max_staleness": args.max_staleness, "threshold": args.threshold, "k": args.k}
    return {k: v for k, v in rules.items() if v is not None} | (
        {"stops": True} if args.stops else {}
    )


def _say(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr, flush=True)


def _cmd_hogwild(args: argparse.Namespace) -> int:
    out = output_dir(args.out, args.overwrite)
    straggler = _straggler(args)
    try:
        dataset = data_lib.load(args.dataset, data_dir=args.data_dir)
    except data_lib.DatasetNotAvailableError as error:
        raise UsageError(str(error)) from None
    if args.hidden_sizes is not None and args.model != "mlp":
        raise UsageError(f"--hidden-sizes applies to --model mlp, not {args.model}")
    hidden = {"hidden_sizes": args.hidden_sizes or (64,)} if args.model == "mlp" else {}
    try:
        model = models.get_model(args.model, num_classes=dataset.num_classes, **hidden)
    except (TypeError, ValueError) as error:
        message = str(error).replace("hidden_sizes", "--hidden-sizes")
        raise UsageError(f"invalid model: {message}") from None
    if not 1 <= args.batch_size <= dataset.num_train:
        raise UsageError(f"--batch-size must be in [1, {dataset.num_train}], got {args.batch_size}")
    if not args.learning_rate > 0:
        raise UsageError(f"--learning-rate must be > 0, got {args.learning_rate}")
    rules = _rules(args)
    params = model.init(jax.random.key(args.seed), dataset.input_shape)
    about = f"{args.workers} workers, {model.name} on {dataset.name}, {args.steps} updates"
    _say(args, f"hogwild {args.mode} on {args.backend}: {about} → {out}")
    try:
        result = hogwild.train(
            model.loss,
            params,
            optax.sgd(args.learning_rate),
            (dataset.x_train, dataset.y_train),
            num_workers=args.workers,
            steps=args.steps,
            mode=args.mode,
            batch_size=args.batch_size,
            straggler=straggler,
            time_limit=args.time_limit,
            seed=args.seed,
            progress=not args.quiet,
            backend=args.backend,
            ray_address=args.ray_address,
            **rules,
        )
    except (TypeError, ValueError, ImportError) as error:
        raise UsageError(_flag_message(error)) from None
    except hogwild.HogwildError as error:
        print(f"asgd-jax hogwild: error: the run failed: {error}", file=sys.stderr)
        return EXIT_FAILURE
    metrics, trace = result.metrics, result.trace
    if not metrics.updates:
        print("asgd-jax hogwild: error: no update was applied (see --time-limit)", file=sys.stderr)
        return EXIT_FAILURE
    loss, accuracy = map(float, model.evaluate(result.params, dataset.x_test, dataset.y_test))
    measured = np.asarray(metrics.staleness_histogram)
    cycles, cv = cycle_times(trace, metrics.gradients_per_worker, metrics.wall_time)
    sim = simulator_model(args.mode, cycles, cv, args.simulate_law, rules, metrics.max_staleness)
    predicted = predicted_histogram(sim, metrics.updates, args.seed)
    tv = total_variation(measured, predicted)
    print(
        f"{metrics.updates} updates in {metrics.wall_time:.2f} s: {metrics.updates_per_second:.1f} "
        f"updates/s ({metrics.gradients} gradients, {metrics.gradients_per_second:.1f}/s)"
    )
    times = " ".join(f"{1e3 * c:.2f}" for c in cycles)
    print(f"worker cycle times (ms): {times} (coefficient of variation {cv:.2f})")
    print(f"staleness: mean {metrics.mean_staleness:.2f}, max {metrics.max_staleness}")
    print(histogram_text(measured, predicted))
    print(
        f"total-variation distance, measured vs simulated ({args.simulate_law} compute times "
        f"at the measured speeds): {tv:.3f}"
    )
    print(f"final test accuracy {accuracy:.3f} (loss {loss:.3f})")

    make_dir(out)
    report.write_json(os.path.join(out, "trace.json"), trace_payload(trace))
    fields = {k: v for k, v in metrics._asdict().items() if k != "staleness_histogram"}
    payload = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("handler", "command")},
        "straggler": None if straggler is None else dataclasses.asdict(straggler),
        "model": model.name,
        "metrics": {k: report.finite(np.asarray(v).tolist()) for k, v in fields.items()},
        "test_accuracy": accuracy,
        "test_loss": loss,
        "cycle_times": cycles.tolist(),
        "cycle_cv": cv,
        "simulator": repr(sim),
        "staleness_histogram": measured.tolist(),
        "predicted_histogram": predicted.tolist(),
        "total_variation": tv,
    }
    report.write_json(os.path.join(out, "metrics.json"), payload)
    title = f"{args.mode}, {args.workers} workers ({args.backend}): TV distance {tv:.3f}"
    _plot(measured, predicted, title, os.path.join(out, "staleness.png"))
    _say(args, f"wrote {out}/trace.json, metrics.json, staleness.png")
    return 0


# (group, flag, keywords), in the order --help shows them.
_STRAGGLERS = "stragglers (hogwild.Straggler's constructors; at most one)"
_ONE_STRAGGLER = ("--straggler-fixed", "--straggler-random", "--straggler-one-slow")
_SECONDS = _numbers(float, "seconds")
_ARGS: list[tuple[str, str, dict[str, Any]]] = [
    ("run", "--backend", dict(choices=("threads", "ray"), default="threads",
        help="worker threads in this process, or Ray actors (default: threads)")),
    ("run", "--ray-address", dict(metavar="ADDRESS", help="--backend ray: the cluster to "
        "join (default: an initialized Ray, else $RAY_ADDRESS, else a local one)")),
    ("run", "--workers", dict(type=int, default=4, help="workers (default: 4)")),
    ("run", "--steps", dict(type=int, default=500,
        help="updates to apply (sync: rounds) (default: 500)")),
    ("run", "--time-limit", dict(type=float, metavar="SECONDS",
        help="stop after SECONDS (default: none)")),
    ("run", "--seed", dict(type=int, default=0,
        help="initialization, data and stragglers (default: 0)")),
    ("server rule", "--mode", dict(default="locked",
        help="consistency mode or server rule (default: locked)")),
    ("server rule", "--max-staleness", dict(type=int, metavar="S",
        help="locked: drop gradients staler than S")),
    ("server rule", "--threshold", dict(type=int, metavar="R",
        help="ringmaster: ignore gradients with delay >= R")),
    ("server rule", "--k", dict(type=int, metavar="S", help="rennala: gradients per update")),
    ("server rule", "--stops", dict(action="store_true",
        help="ringmaster, rennala: stop stale computations and restart them")),
    (_STRAGGLERS, "--straggler-fixed", dict(type=_SECONDS, metavar="T[,T...]",
        help="Straggler.fixed: each gradient takes T s longer (one T, or one per worker)")),
    (_STRAGGLERS, "--straggler-random", dict(type=_SECONDS, metavar="MEAN[,MEAN...]",
        help="Straggler.random: extra time of mean MEAN s, law --straggler-law")),
    (_STRAGGLERS, "--straggler-one-slow", dict(type=float, metavar="T",
        help="Straggler.one_slow: each gradient of --slow-worker takes T s longer")),
    (_STRAGGLERS, "--straggler-law", dict(choices=("exponential", "uniform"),
        default="exponential", help="(default: exponential)")),
    (_STRAGGLERS, "--slow-worker", dict(type=int, default=0, metavar="I",
        help="(default: 0)")),
    ("model and data", "--model", dict(default="mlp", help="(default: mlp)")),
    ("model and data", "--hidden-sizes", dict(type=_numbers(int, "integers"),
        metavar="W[,W...]", help="mlp hidden widths (default: 64)")),
    ("model and data", "--batch-size", dict(type=int, default=32,
        help="examples per gradient (default: 32)")),
    ("model and data", "--learning-rate", dict(type=float, default=0.1,
        help="SGD's η (default: 0.1)")),
    ("model and data", "--dataset", dict(default="digits", help="(default: digits, bundled)")),
    ("model and data", "--data-dir", dict(metavar="DIR", help="tfds data directory")),
    ("output", "--simulate-law", dict(choices=_LAWS, default="lognormal", help="the simulated "
        "workers' compute times, each at its measured mean; lognormal: at the measured "
        "coefficient of variation (default: lognormal)")),
    ("output", "--out", dict(metavar="DIR", help="output directory (default: runs/<timestamp>)")),
    ("output", "--overwrite", dict(action="store_true",
        help="write into a non-empty output directory")),
    ("output", "--quiet", dict(action="store_true",
        help="print the results only (no progress bar or messages)")),
]  # fmt: skip


def add_command(commands: Any) -> None:
    """Adds ``asgd-jax hogwild`` to the ``commands`` subparsers."""
    parser = commands.add_parser(
        "hogwild",
        help="real asynchronous SGD (threads or Ray): measured staleness vs the simulator's",
        description="Train on the bundled digits with real asynchronous workers "
        "(asgd_jax.hogwild.train); print updates/s, the staleness histogram beside the worker "
        "simulator's prediction for the measured worker speeds (and their total-variation "
        "distance) and the final test accuracy. Writes trace.json (the measured trace: "
        "asgd_jax.delays.trace(json.load(f)) replays it), metrics.json and staleness.png.",
    )
    choices = {"--mode": hogwild.MODES, "--model": models.MODELS, "--dataset": data_lib.DATASETS}
    groups: dict[str, Any] = {}
    for group, flag, kwargs in _ARGS:
        if group not in groups:
            groups[group] = parser.add_argument_group(group)
            if group == _STRAGGLERS:
                groups["one straggler"] = groups[group].add_mutually_exclusive_group()
        exclusive = flag in ("--straggler-fixed", "--straggler-random", "--straggler-one-slow")
        target = groups["one straggler" if exclusive else group]
        target.add_argument(
            flag, **({"choices": choices[flag]} if flag in choices else {}), **kwargs
        )
    parser.set_defaults(handler=_cmd_hogwild)
