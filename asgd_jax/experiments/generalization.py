"""Generalization and algorithmic stability of asynchronous SGD against the average delay.

Regatti et al. (2019) bound the generalization error of asynchronous SGD,
w_{k+1} = w_k − η_k ∇f(w_{k−τ_k}; z_{i_k}), through its uniform stability (Hardt et al.
2016): the distance between the parameters A(S), A(S′) that the algorithm reaches on two
training sets differing in one example. Their claim is that asynchronous SGD generalizes well
given enough data, and that the learning rate should shrink as asynchrony grows: with
η scaled by 1/τ̄ the stability bound, hence the generalization error, stays small.

:func:`generalization_study` measures both quantities with the library's one training loop
(:func:`asgd_jax.train.train`; per delay, one sweep: the learning rates and the seeds run
vmapped in one program), following Deng et al. (2024): for average delays
τ̄ ∈ {0, 4, 8, 16, 32} and two learning-rate schedules,

* ``"fixed"``: η = η₀ for every delay;
* ``"inverse_delay"``: η = η₀ / max(τ̄, 1) (τ̄ = 0 keeps η₀),

it records over training

* the generalization gap |L_test(w_t) − L_train(w_t)| (mean cross-entropy on the full test
  split and on the training subset S);
* the stability proxy ‖A_t(S) − A_t(S′)‖₂, the Euclidean distance between the parameters
  after t steps on S and on its neighbour S′ (:func:`asgd_jax.data.neighbouring_pair`), the
  two runs sharing the seed: same initialization, same delays, same batch positions.

Delays. ``delay_law="uniform"`` draws τ_t uniformly from {0, …, 2τ̄} (mean τ̄);
``"constant"`` uses τ_t = τ̄; ``"workers"`` simulates τ̄ + 1 always-busy workers with
exponential compute times at a parameter server, whose mean staleness is τ̄ (n − 1 for n
workers). τ̄ = 0 is synchronous SGD in every case.

References:
  Regatti, Tendolkar, Zhou, Gupta & Liang, *Distributed SGD Generalizes Well Under
  Asynchrony*, Allerton 2019 (arXiv 1909.13391).
  Hardt, Recht & Singer, *Train faster, generalize better: Stability of stochastic gradient
  descent*, ICML 2016 (arXiv 1509.01240).
  Deng et al., *Stability and Generalization of Asynchronous SGD: Sharper Bounds Beyond
  Lipschitz and Smoothness*, NeurIPS 2024.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from asgd_jax import data as data_lib
from asgd_jax import train as train_lib
from asgd_jax._validation import check_min_int as _check_int

__all__ = [
    "DEFAULT_DELAYS",
    "DELAY_LAWS",
    "LR_SCHEDULES",
    "GeneralizationResult",
    "delay_config",
    "generalization_study",
    "parameter_distance",
    "scaled_learning_rate",
]

DEFAULT_DELAYS: tuple[int, ...] = (0, 4, 8, 16, 32)
"""The average delays of Deng et al.'s protocol, with the synchronous baseline."""
LR_SCHEDULES: tuple[str, ...] = ("fixed", "inverse_delay")
"""``fixed``: η₀ at every delay; ``inverse_delay``: η₀ / max(τ̄, 1)."""
DELAY_LAWS: tuple[str, ...] = ("uniform", "constant", "workers")


def scaled_learning_rate(learning_rate: float, mean_delay: int, schedule: str) -> float:
    """The learning rate of ``schedule`` at average delay ``mean_delay``.

    Args:
      learning_rate: the base rate η₀ (> 0).
      mean_delay: the average delay τ̄ (≥ 0).
      schedule: one of :data:`LR_SCHEDULES`.

    Returns:
      η₀ for ``"fixed"``; η₀ / max(τ̄, 1) for ``"inverse_delay"`` (Regatti et al. 2019's
      learning-rate constant scaled by 1/τ̄; synchronous SGD keeps η₀).
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
    mean_delay = _check_int("mean_delay", mean_delay, 0)
    if schedule == "fixed":
        return float(learning_rate)
    return float(learning_rate) / max(mean_delay, 1)


def delay_config(
    base: train_lib.TrainConfig, mean_delay: int, delay_law: str = "uniform"
) -> train_lib.TrainConfig:
    """``base`` with a delay model of average delay ``mean_delay`` (see the module docstring).

    Args:
      base: the configuration to modify (its delay fields are replaced).
      mean_delay: the average delay τ̄ (≥ 0); 0 gives synchronous SGD.
      delay_law: one of :data:`DELAY_LAWS`.

    Returns:
      The new :class:`asgd_jax.train.TrainConfig`.
    """
    if delay_law not in DELAY_LAWS:
        raise ValueError(f"delay_law must be one of {DELAY_LAWS}, got {delay_law!r}")
    mean_delay = _check_int("mean_delay", mean_delay, 0)
    if mean_delay == 0:
        return base.replace(delay="none", max_delay=None, min_delay=0)
    if delay_law == "uniform":
        return base.replace(delay="uniform", min_delay=0, max_delay=2 * mean_delay)
    if delay_law == "constant":
        return base.replace(delay="constant", min_delay=0, max_delay=mean_delay)
    return base.replace(
        delay="workers",
        num_workers=mean_delay + 1,
        protocol="async",
        compute_time="exponential",
        min_delay=0,
        max_delay=None,
    )


def parameter_distance(params_a: Any, params_b: Any, *, batched: bool = True) -> jax.Array:
    """‖a − b‖₂ over all leaves of two parameter pytrees.

    Args:
      params_a: a parameter pytree; with ``batched`` every leaf has a leading seed axis.
      params_b: a pytree of the same structure and shapes.
      batched: keep the leading (seed) axis: one distance per seed.

    Returns:
      The distance: shape ``[S]`` when ``batched``, else a scalar.
    """
    leaves_a = jax.tree_util.tree_leaves(params_a)
    leaves_b = jax.tree_util.tree_leaves(params_b)
    if jax.tree_util.tree_structure(params_a) != jax.tree_util.tree_structure(params_b):
        raise ValueError("params_a and params_b must have the same structure")
    total = jnp.zeros(())
    for a, b in zip(leaves_a, leaves_b, strict=True):
        diff = jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32)
        if batched:
            total = total + jnp.sum(jnp.square(diff).reshape(diff.shape[0], -1), axis=-1)
        else:
            total = total + jnp.sum(jnp.square(diff))
    return jnp.sqrt(total)


@dataclasses.dataclass
class GeneralizationResult:
    """What :func:`generalization_study` measured.

    Arrays are indexed ``[schedule, delay, seed, evaluation]``.

    Attributes:
      delays: the average delays τ̄.
      schedules: the learning-rate schedules (:data:`LR_SCHEDULES`).
      seeds: the seeds (vmapped).
      steps: the steps at which the runs were evaluated, ``[E]`` (0 first).
      learning_rates: η used, ``[C, D]``.
      train_loss: mean cross-entropy on the training subset S.
      test_loss: mean cross-entropy on the full test split.
      test_accuracy: accuracy on the test split.
      generalization_gap: |test_loss − train_loss|.
      stability_steps: the steps at which the stability proxy was measured, ``[P]``.
      stability: ‖A_t(S) − A_t(S′)‖₂ at ``stability_steps``, ``[C, D, seed, P]``.
      mean_staleness: measured average staleness of each run, ``[C, D, seed]``.
      config: the base configuration (its delay and learning-rate fields vary per run).
      train_size: |S|.
      wall_seconds: real time the study took.
    """

    delays: tuple[int, ...]
    schedules: tuple[str, ...]
    seeds: tuple[int, ...]
    steps: np.ndarray
    learning_rates: np.ndarray
    train_loss: np.ndarray
    test_loss: np.ndarray
    test_accuracy: np.ndarray
    generalization_gap: np.ndarray
    stability_steps: np.ndarray
    stability: np.ndarray
    mean_staleness: np.ndarray
    config: train_lib.TrainConfig
    train_size: int
    wall_seconds: float

    def summary(self) -> list[dict[str, Any]]:
        """One row per (schedule, delay): final gap, losses, accuracy, stability (seed means
        and standard deviations), as plain floats."""
        rows = []
        for c, schedule in enumerate(self.schedules):
            for d, delay in enumerate(self.delays):
                gap = self.generalization_gap[c, d, :, -1]
                dist = self.stability[c, d, :, -1]
                rows.append(
                    {
                        "schedule": schedule,
                        "mean_delay": int(delay),
                        "measured_staleness": float(np.mean(self.mean_staleness[c, d])),
                        "learning_rate": float(self.learning_rates[c, d]),
                        "train_loss": float(np.mean(self.train_loss[c, d, :, -1])),
                        "test_loss": float(np.mean(self.test_loss[c, d, :, -1])),
                        "test_accuracy": float(np.mean(self.test_accuracy[c, d, :, -1])),
                        "gap": float(np.mean(gap)),
                        "gap_std": float(np.std(gap)),
                        "max_gap": float(np.mean(np.max(self.generalization_gap[c, d], -1))),
                        "stability": float(np.mean(dist)),
                        "stability_std": float(np.std(dist)),
                    }
                )
        return rows

    def table(self) -> str:
        """:meth:`summary` as a fixed-width text table."""
        head = (
            f"{'schedule':<14}{'τ̄':>4}{'τ meas':>8}{'η':>9}{'train':>8}{'test':>8}"
            f"{'acc':>7}{'|gap|':>8}{'±':>7}{'‖ΔA‖':>8}{'±':>7}"
        )
        lines = [head, "-" * len(head)]
        for r in self.summary():
            lines.append(
                f"{r['schedule']:<14}{r['mean_delay']:>4}{r['measured_staleness']:>8.2f}"
                f"{r['learning_rate']:>9.4f}{r['train_loss']:>8.3f}{r['test_loss']:>8.3f}"
                f"{r['test_accuracy']:>7.3f}{r['gap']:>8.3f}{r['gap_std']:>7.3f}"
                f"{r['stability']:>8.3f}{r['stability_std']:>7.3f}"
            )
        return "\n".join(lines)


def generalization_study(
    *,
    delays: Sequence[int] = DEFAULT_DELAYS,
    schedules: Sequence[str] = LR_SCHEDULES,
    learning_rate: float = 0.5,
    seeds: Sequence[int] = (0, 1, 2, 3),
    train_size: int = 256,
    num_steps: int = 2000,
    eval_every: int = 200,
    stability_points: int | None = 4,
    batch_size: int = 16,
    model: str = "logreg",
    delay_law: str = "uniform",
    differing_index: int = 0,
    dataset: data_lib.Dataset | None = None,
    base_config: train_lib.TrainConfig | None = None,
) -> GeneralizationResult:
    """Measures the generalization gap and the stability proxy against the average delay.

    Every run goes through :func:`asgd_jax.train.train` as a sweep: for each delay the
    schedules' learning rates and the seeds run vmapped in one compiled program. For each
    schedule and delay the study trains on S (the first ``train_size`` training examples) and,
    for the stability proxy, on S′ (S with example ``differing_index`` replaced by an unseen
    one) with the same seeds; runs that differ only in their number of steps share one
    compiled program, so the proxy at ``stability_points`` intermediate steps costs run time,
    not compilation.

    Args:
      delays: average delays τ̄ (ints ≥ 0).
      schedules: learning-rate schedules, a subset of :data:`LR_SCHEDULES`.
      learning_rate: the base rate η₀.
      seeds: seeds, run together under ``jax.vmap``.
      train_size: |S|; the rest of the training split is unused (one example of it is the
        replacement in S′).
      num_steps: server updates per run.
      eval_every: steps between evaluations (losses on the full S and test split).
      stability_points: measure ‖A_t(S) − A_t(S′)‖ at this many evenly spaced evaluation
        steps (the last is ``num_steps``); ``None`` measures it at every evaluation.
      batch_size: examples per gradient.
      model: model name (:data:`asgd_jax.models.MODELS`); the default, multinomial logistic
        regression, is the convex setting of the stability bounds.
      delay_law: how delays with mean τ̄ are drawn (:data:`DELAY_LAWS`).
      differing_index: the position in S of the example that differs in S′.
      dataset: the full dataset (default: ``asgd_jax.data.load(base_config.dataset)``, the
        bundled digits).
      base_config: other training settings (default ``TrainConfig(optimizer="sgd")``); its
        dataset, model, batch, step, learning-rate and delay fields are overridden.

    Returns:
      A :class:`GeneralizationResult`.

    References:
      Regatti et al., Allerton 2019 (arXiv 1909.13391); Hardt, Recht & Singer, ICML 2016
      (arXiv 1509.01240).
    """
    delays = tuple(_check_int(f"delays[{i}]", d, 0) for i, d in enumerate(delays))
    if not delays:
        raise ValueError("delays must name at least one average delay")
    schedules = tuple(schedules)
    if not schedules or any(s not in LR_SCHEDULES for s in schedules):
        raise ValueError(f"schedules must be a non-empty subset of {LR_SCHEDULES}, got {schedules}")
    if delay_law not in DELAY_LAWS:
        raise ValueError(f"delay_law must be one of {DELAY_LAWS}, got {delay_law!r}")
    seeds = tuple(_check_int(f"seeds[{i}]", s, 0) for i, s in enumerate(seeds))
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    num_steps = _check_int("num_steps", num_steps, 1)
    eval_every = _check_int("eval_every", eval_every, 1)
    if num_steps % eval_every:
        raise ValueError(f"num_steps must be a multiple of eval_every={eval_every}: {num_steps}")
    num_evals = num_steps // eval_every
    stability_points = num_evals if stability_points is None else stability_points
    stability_points = _check_int("stability_points", stability_points, 1)
    if stability_points > num_evals:
        raise ValueError(
            f"stability_points must be in [1, {num_evals}] (num_steps // eval_every), got "
            f"{stability_points}"
        )
    scaled_learning_rate(learning_rate, 0, "fixed")  # validates learning_rate
    base = base_config if base_config is not None else train_lib.TrainConfig(optimizer="sgd")
    if not isinstance(base, train_lib.TrainConfig):
        raise TypeError(f"base_config must be a TrainConfig, got {type(base).__name__}")
    base = base.replace(
        model=model,
        hidden_sizes=base.hidden_sizes if model == "mlp" else None,
        batch_size=batch_size,
        num_steps=num_steps,
        eval_every=eval_every,
        train_size=None,
        checkpoint_every=None,
    )
    if dataset is None:
        dataset = data_lib.load(base.dataset, data_dir=base.data_dir)
    first, second = data_lib.neighbouring_pair(dataset, differing_index, train_size=train_size)

    # Evaluation indices at which the stability proxy is taken: evenly spaced, ending last.
    picks = np.unique(np.round(np.linspace(1, num_evals, stability_points)).astype(int))
    stability_steps = picks * eval_every

    started = time.perf_counter()
    shape = (len(schedules), len(delays), len(seeds))
    lrs = np.zeros(shape[:2])
    train_loss = test_loss = test_acc = None
    stability = np.zeros((*shape, len(picks)))
    staleness = np.zeros(shape)
    for d, delay in enumerate(delays):
        # One sweep per delay: the schedules' learning rates run vmapped in one program.
        rates = [scaled_learning_rate(learning_rate, delay, s) for s in schedules]
        distinct = sorted(set(rates))
        config = delay_config(base, delay, delay_law)
        measured = _measure(config, distinct, seeds, first, second, stability_steps)
        for c, lr in enumerate(rates):
            history, distances, mean_staleness = measured[distinct.index(lr)]
            lrs[c, d] = lr
            if train_loss is None:
                train_loss = np.zeros((*shape, history["train_loss"].shape[-1]))
                test_loss, test_acc = np.zeros_like(train_loss), np.zeros_like(train_loss)
            train_loss[c, d] = history["train_loss"]
            test_loss[c, d] = history["test_loss"]
            test_acc[c, d] = history["test_accuracy"]
            stability[c, d] = distances
            staleness[c, d] = mean_staleness
    return GeneralizationResult(
        delays=delays,
        schedules=schedules,
        seeds=seeds,
        steps=np.arange(num_evals + 1) * eval_every,
        learning_rates=lrs,
        train_loss=train_loss,
        test_loss=test_loss,
        test_accuracy=test_acc,
        generalization_gap=np.abs(test_loss - train_loss),
        stability_steps=stability_steps,
        stability=stability,
        mean_staleness=staleness,
        config=base,
        train_size=first.num_train,
        wall_seconds=time.perf_counter() - started,
    )


def _measure(
    config: train_lib.TrainConfig,
    rates: Sequence[float],
    seeds: tuple[int, ...],
    first: data_lib.Dataset,
    second: data_lib.Dataset,
    stability_steps: np.ndarray,
) -> list[tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]]:
    """Per rate (one sweep axis, one program): history on S, ‖A_t(S) − A_t(S′)‖, mean τ."""
    sweep = {"learning_rate": list(rates)}
    distances = []
    for steps in stability_steps:
        run = config.replace(num_steps=int(steps))
        on_first = train_lib.train(run, sweep=sweep, seeds=seeds, dataset=first, progress=False)
        on_second = train_lib.train(run, sweep=sweep, seeds=seeds, dataset=second, progress=False)
        pairs = zip(on_first.results, on_second.results, strict=True)
        distances.append([np.asarray(parameter_distance(a.params, b.params)) for a, b in pairs])
    if stability_steps[-1] != config.num_steps:  # a single stability point is not the end
        on_first = train_lib.train(config, sweep=sweep, seeds=seeds, dataset=first, progress=False)
    histories = [{k: np.asarray(v) for k, v in r.history.items()} for r in on_first.results]
    return [
        (h, np.stack([row[i] for row in distances], -1), h["mean_staleness"][..., -1])
        for i, h in enumerate(histories)
    ]
