"""From a config to the objects of a run: delay model, optimizer, model, dataset.

Nothing here compiles or trains; :func:`check_fits` is the validation that needs the dataset
(batch sizes against the number of examples) and builds nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import optax

from asgd_jax import data as data_lib
from asgd_jax import delays as delays_lib
from asgd_jax import models as models_lib
from asgd_jax import transforms
from asgd_jax import workers as workers_lib
from asgd_jax.train._config import TrainConfig

__all__ = [
    "check_fits",
    "fit_dataset",
    "load_dataset",
    "make_delay_model",
    "make_model",
    "make_optimizer",
    "worker_model",
]

# The config fields make_optimizer's ``hyperparams`` may replace by traced values.
OPTIMIZER_HYPERPARAMS = ("learning_rate", "momentum", "dc_lambda")


def _compute_time_law(config: TrainConfig) -> workers_lib.ComputeTime:
    mean = config.compute_mean
    if config.compute_time == "deterministic":
        return workers_lib.deterministic(mean)
    if config.compute_time == "exponential":
        return workers_lib.exponential(mean)
    if config.compute_time == "shifted_exponential":
        return workers_lib.shifted_exponential(config.compute_shift, mean - config.compute_shift)
    if config.compute_time == "lognormal":
        return workers_lib.lognormal(mean=mean, cv=config.compute_cv)
    alpha = config.pareto_alpha
    return workers_lib.pareto(mean * (alpha - 1) / alpha, alpha)


def make_delay_model(config: TrainConfig) -> delays_lib.DelayModel:
    """The delay model a config describes (a :class:`~asgd_jax.workers.WorkerModel` for
    ``delay="workers"``).

    For workers with random compute times and no staleness threshold the staleness is
    unbounded; unless ``max_delay`` is given the history then holds
    15·n·(slow_factor if there are stragglers) snapshots, and rarer larger delays are clipped
    (counted in the ``staleness_clipped`` metric).
    """
    kind = config.delay
    if kind == "none":
        return delays_lib.constant(0)
    if kind == "constant":
        return delays_lib.constant(config.max_delay)
    if kind == "uniform":
        return delays_lib.uniform(config.min_delay, config.max_delay)
    if kind == "geometric":
        return delays_lib.geometric(config.delay_mean, config.max_delay)
    if kind == "poisson":
        return delays_lib.poisson(config.delay_mean, config.max_delay)
    if kind == "round_robin":
        return delays_lib.round_robin(config.num_workers)
    return worker_model(config)


def worker_model(
    config: TrainConfig,
    *,
    law: workers_lib.ComputeTime | None = None,
    num_slow: Any = None,
    slow_factor: Any = None,
    comm_time: Any = None,
    max_delay: int | None = None,
) -> workers_lib.WorkerModel:
    """The parameter server of a ``delay="workers"`` config, with parts given as data.

    ``law``, ``num_slow``, ``slow_factor`` and ``comm_time`` replace the config's (they may
    be JAX tracers: a vmapped sweep builds each point's model inside its traced program);
    ``max_delay`` replaces the derived history bound (a traced model needs it explicit).
    Without them this is :func:`make_delay_model` of the config.
    """
    law = _compute_time_law(config) if law is None else law
    n = config.num_workers
    if max_delay is None:
        max_delay = config.max_delay
    bounded = (
        config.protocol in ("k_sync", "rennala")
        or config.max_staleness is not None
        or config.threshold is not None
        or (config.compute_time == "deterministic")
    )
    if max_delay is None and not bounded:
        stragglers = config.slow_factor if config.num_slow else 1.0
        k = config.k or 1
        max_delay = max(1, math.ceil(15 * n * stragglers / k))
    return workers_lib.parameter_server(
        n,
        law,
        num_slow=config.num_slow if num_slow is None else num_slow,
        slow_factor=config.slow_factor if slow_factor is None else slow_factor,
        comm_time=(config.comm_time or None) if comm_time is None else comm_time,
        protocol=config.protocol,
        max_staleness=config.max_staleness,
        k=config.k,
        threshold=config.threshold,
        stops=config.stops,
        max_delay=max_delay,
    )


def make_optimizer(
    config: TrainConfig,
    delay: delays_lib.DelayModel | None = None,
    hyperparams: Mapping[str, Any] | None = None,
) -> optax.GradientTransformationExtraArgs:
    """``asgd.stale(inner, delay)`` for a config: the base optimizer with its mitigation.

    Mitigations (placed as their papers prescribe): ``staleness_aware`` scales the update by
    1/max(τ, 1) (Zhang et al. 2016, arXiv 1511.05950); ``delay_adaptive`` by n/τ for τ > n
    (Koloskova et al. 2022, arXiv 2206.08307); ``dc_asgd`` / ``dc_asgd_adaptive`` compensate
    the raw gradient (Zheng et al. 2017, arXiv 1609.08326); ``gap_aware`` divides it by the
    parameter gap (Barkai et al. 2020, arXiv 1909.10802).

    Args:
      config: the run's configuration.
      delay: the delay model (default :func:`make_delay_model` of ``config``).
      hyperparams: values (JAX scalars or tracers allowed) replacing the config's
        ``learning_rate``, ``momentum`` and ``dc_lambda``: a vmapped sweep builds the
        optimizer of each point inside the traced program this way. Without it the config's
        Python floats are used, exactly as before.

    Returns:
      The optimizer; its state contains one :class:`asgd_jax.StaleState`.
    """
    hyper = dict(hyperparams or {})
    unknown = sorted(set(hyper) - set(OPTIMIZER_HYPERPARAMS))
    if unknown:
        raise ValueError(
            f"hyperparams may replace {', '.join(OPTIMIZER_HYPERPARAMS)}, got {unknown}"
        )
    lr = hyper.get("learning_rate", config.learning_rate)
    momentum = hyper.get("momentum", config.momentum)
    if config.optimizer == "sgd":
        base = optax.sgd(lr)
    elif config.optimizer == "momentum":
        base = optax.sgd(lr, momentum=momentum)
    elif config.optimizer == "nesterov":
        base = optax.sgd(lr, momentum=momentum, nesterov=True)
    else:
        base = optax.adam(lr)
    mitigation = config.mitigation
    if mitigation == "none":
        inner = base
    elif mitigation == "staleness_aware":
        inner = optax.chain(base, transforms.scale_by_staleness("inverse"))
    elif mitigation == "delay_adaptive":
        inner = optax.chain(
            base, transforms.scale_by_staleness("delay_adaptive", concurrency=config.num_workers)
        )
    elif mitigation in ("dc_asgd", "dc_asgd_adaptive"):
        compensation = transforms.delay_compensation(
            hyper.get("dc_lambda", config.dc_lambda), adaptive=mitigation == "dc_asgd_adaptive"
        )
        inner = optax.chain(compensation, base)
    else:
        inner = optax.chain(transforms.gap_aware(lr), base)
    delay = make_delay_model(config) if delay is None else delay
    max_staleness = None if config.delay == "workers" else config.max_staleness
    return transforms.stale(inner, delay, seed=config.seed, max_staleness=max_staleness)


def make_model(config: TrainConfig, num_classes: int) -> models_lib.Model:
    """The config's model for ``num_classes`` classes."""
    kwargs: dict[str, Any] = {"num_classes": num_classes}
    if config.model == "mlp":
        kwargs["hidden_sizes"] = config.hidden_sizes or (64,)
    return models_lib.get_model(config.model, **kwargs)


def load_dataset(config: TrainConfig) -> data_lib.Dataset:
    """The dataset of a config (``dataset``, ``data_dir``, ``train_size``), loaded offline."""
    return data_lib.load(config.dataset, data_dir=config.data_dir, train_size=config.train_size)


def fit_dataset(config: TrainConfig, dataset: data_lib.Dataset) -> data_lib.Dataset:
    """``dataset`` cut to ``config.train_size`` examples (when that differs from its size)."""
    if not isinstance(dataset, data_lib.Dataset):
        raise TypeError(f"dataset must be an asgd_jax.data.Dataset, got {type(dataset).__name__}")
    if config.train_size is not None and config.train_size != dataset.num_train:
        return data_lib.subset(dataset, config.train_size)
    return dataset


def check_fits(config: TrainConfig, dataset: data_lib.Dataset) -> None:
    """Checks what only the dataset can tell about a config: its batches fit the examples.

    Builds nothing (no model, optimizer or program); :func:`asgd_jax.train.train` calls it
    before anything else, and the CLI calls it to validate a run before starting it.

    Args:
      config: the run's configuration.
      dataset: the dataset it trains on (after :func:`fit_dataset`).

    Raises:
      ValueError: ``batch_size`` (× K for K-sync / K-async) exceeds the training examples,
        or, with ``data_streams="per_worker"``, one worker's shard.
    """
    num_train = dataset.num_train
    if config.data_streams == "per_worker":
        shard = num_train // config.num_workers
        if config.batch_size > shard:
            raise ValueError(
                f"batch_size must be <= {shard} (the per-worker shard, {num_train} training "
                f"examples // {config.num_workers} workers), got {config.batch_size}"
            )
    elif config.batch_size * config.gradients_per_update > num_train:
        what = (
            f"batch_size × K = {config.batch_size} × {config.gradients_per_update}"
            if config.gradients_per_update > 1
            else f"batch_size = {config.batch_size}"
        )
        raise ValueError(f"{what} exceeds the {num_train} training examples")
