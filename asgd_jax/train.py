"""The training loop every experiment uses: scanned steps, evaluation, seeds, checkpoints.

One configuration object, :class:`TrainConfig`, describes a run (dataset, model, optimizer,
staleness mitigation, delay model or simulated workers, steps, evaluation); :func:`train`
runs it. The CLI, the notebooks, the benchmarks and the studies all call :func:`train` (or
the pieces it is made of: :func:`make_delay_model`, :func:`make_optimizer`,
:func:`build_program`), so there is exactly one loop.

The loop. Steps are the core contract of :func:`asgd_jax.stale`: the gradient of the model's
loss at ``stale_params(state, params)`` = W_{t−τ_t}, applied to W_t. ``eval_every`` steps are
fused into one ``lax.scan`` inside one jitted, state-donating program; the model is then
evaluated on the full train and test splits by a program shared by every configuration that
trains the same model, dispatched right behind it, and the host reads both results at once:
one host round trip per chunk. Batches are a pure function of the run's data key and the
step (or, with ``data_streams="per_worker"``, of the simulated worker that sends the gradient
and its own step count).

Time. When the delay model is a worker simulation (``delay="workers"``) the history carries
its simulated wall clock: the time at which the last update was applied (arrivals for the
asynchronous protocols, rounds of the K fastest of n workers for ``protocol="k_sync"``, so
synchronous and asynchronous SGD compare on the same clock). Otherwise time counts updates.
A K-sync / K-async update averages K gradients: its batch is K times ``batch_size``.

Seeds. ``train(config, seeds=[...])`` runs the seeds under ``jax.vmap``: seed ``s`` uses
``jax.random.key(s)`` split into model-init, delay and data keys (the delay stream enters
through :func:`asgd_jax.reseed`), exactly as the single run with ``config.seed = s``: the
same initial state bit for bit and the same batches; batched matrix products (and float32
simulated clocks) may round differently, so parameters and times agree to float precision.

Checkpoints. With ``checkpoint_dir`` the run saves its whole state (parameters, optimizer
state with the parameter history and the delay model's state, data key, clock) with orbax
every ``checkpoint_every`` steps and at the end, together with the metric history and a
SHA-256 digest of the state. A run started again on the same directory resumes from the
latest checkpoint and continues bitwise identically to an uninterrupted run (a checkpoint
taken at a ``num_steps`` that is not a multiple of ``eval_every`` adds an evaluation at that
step to the history; the state is still bitwise the same). A checkpoint written by a
different configuration, or one whose files or arrays no longer match the checksums saved
with them, stops the run with :class:`CheckpointError` before anything is written, and
every checkpoint in the directory is left as it is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import time
import typing
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from asgd_jax import data as data_lib
from asgd_jax import delays as delays_lib
from asgd_jax import models as models_lib
from asgd_jax import transforms
from asgd_jax import workers as workers_lib
from asgd_jax._logging import quiet
from asgd_jax._validation import check_min_int as _check_int

__all__ = [
    "COMPUTE_TIMES",
    "DATA_STREAMS",
    "DELAYS",
    "MITIGATIONS",
    "OPTIMIZERS",
    "PROTOCOLS",
    "CheckpointError",
    "Program",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "build_program",
    "load_dataset",
    "make_delay_model",
    "make_model",
    "make_optimizer",
    "summarize",
    "time_to_accuracy",
    "train",
]

DELAYS = ("none", "constant", "uniform", "geometric", "poisson", "round_robin", "workers")
MITIGATIONS = (
    "none",
    "staleness_aware",
    "delay_adaptive",
    "dc_asgd",
    "dc_asgd_adaptive",
    "gap_aware",
)
OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam")
COMPUTE_TIMES = ("deterministic", "exponential", "shifted_exponential", "lognormal", "pareto")
PROTOCOLS = ("async", "ssp", "k_async", "k_sync")
DATA_STREAMS = ("shared", "per_worker")

_CHECKPOINT_FORMAT = 1
# Fields that do not change a run's trajectory: a checkpoint written under other values of
# them resumes the same run (e.g. a longer `num_steps` extends it).
_TRAJECTORY_FREE = ("num_steps", "checkpoint_every", "max_checkpoints")


def _field(default: Any, help: str, **kwargs: Any) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run; shared by the CLI, notebooks and benchmarks.

    Frozen and hashable; :meth:`to_dict` / :meth:`from_dict` round-trip through JSON. Every
    field is checked when the object is built (``ValueError`` / ``TypeError`` naming the
    field and its allowed values); combinations that need the dataset (batch size against the
    number of examples) are checked by :func:`train`.
    """

    # Data.
    dataset: str = _field("digits", "dataset name", choices=data_lib.DATASETS)
    data_dir: str | None = _field(None, "TFDS data directory (default $TFDS_DATA_DIR)")
    train_size: int | None = _field(None, "keep only the first N training examples")
    batch_size: int = _field(32, "examples per gradient (per worker)")
    data_streams: str = _field(
        "shared",
        "'shared': one stream indexed by the update; 'per_worker': each simulated worker "
        "reads its own disjoint shard (needs delay=workers, protocol async or ssp)",
        choices=DATA_STREAMS,
    )
    # Model.
    model: str = _field("mlp", "model name", choices=models_lib.MODELS)
    hidden_sizes: tuple[int, ...] | None = _field(
        None, "MLP hidden layer widths, e.g. 64,64 (mlp only; default 64)"
    )
    # Optimizer.
    optimizer: str = _field("sgd", "base optimizer", choices=OPTIMIZERS)
    learning_rate: float = _field(0.1, "learning rate η")
    momentum: float = _field(0.9, "momentum (optimizer momentum / nesterov)")
    mitigation: str = _field(
        "none",
        "staleness mitigation: staleness_aware (η/τ), delay_adaptive (η·n/τ for τ > n), "
        "dc_asgd, dc_asgd_adaptive (delay compensation), gap_aware",
        choices=MITIGATIONS,
    )
    dc_lambda: float = _field(0.04, "DC-ASGD variance-control parameter λ")
    max_staleness: int | None = _field(
        None, "drop gradients staler than S (for ssp: the allowed clock gap)"
    )
    # Delays.
    delay: str = _field(
        "workers",
        "delay model: none (synchronous SGD), constant, uniform, geometric, poisson, "
        "round_robin, or workers (simulated parameter server)",
        choices=DELAYS,
    )
    min_delay: int = _field(0, "smallest delay (uniform)")
    max_delay: int | None = _field(
        None,
        "largest delay: the τ of constant, the top of uniform, the truncation of "
        "geometric/poisson, the history bound of workers (default: derived)",
    )
    delay_mean: float | None = _field(None, "mean delay (geometric, poisson)")
    # Simulated workers.
    num_workers: int = _field(8, "number of workers n (workers, round_robin, delay_adaptive)")
    protocol: str = _field(
        "async",
        "worker protocol: async, ssp (stale synchronous), k_async, k_sync (k=n: fully sync)",
        choices=PROTOCOLS,
    )
    k: int | None = _field(None, "K for k_async (required) and k_sync (default n)")
    compute_time: str = _field(
        "exponential", "law of one gradient's compute time", choices=COMPUTE_TIMES
    )
    compute_mean: float = _field(1.0, "mean compute time of a normal-speed worker")
    compute_shift: float = _field(0.0, "minimum compute time (shifted_exponential)")
    compute_cv: float = _field(1.0, "coefficient of variation std/mean (lognormal)")
    pareto_alpha: float = _field(3.0, "tail index α (pareto; > 1)")
    num_slow: int = _field(0, "number of stragglers among the workers")
    slow_factor: float = _field(4.0, "how many times slower a straggler computes")
    comm_time: float = _field(0.0, "constant communication time added to every cycle")
    # Steps, evaluation, checkpoints.
    num_steps: int = _field(1000, "number of server updates")
    eval_every: int = _field(100, "steps per scanned chunk; evaluate after each")
    eval_batch_size: int | None = _field(
        4096, "evaluate at most this many examples at a time (bounds memory)"
    )
    seed: int = _field(0, "seed of the run (model init, delays, data order)")
    checkpoint_every: int | None = _field(
        None, "save a checkpoint every N steps (a multiple of eval_every)"
    )
    max_checkpoints: int = _field(3, "checkpoints kept on disk (oldest removed first)")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            fixed = _check_field(f, value)
            if fixed is not value:
                object.__setattr__(self, f.name, fixed)
        self._check_combinations()

    def _check_combinations(self) -> None:
        if self.hidden_sizes is not None and self.model != "mlp":
            raise ValueError(f"hidden_sizes applies to model='mlp' only, got model={self.model!r}")
        if self.hidden_sizes is not None and not self.hidden_sizes:
            raise ValueError("hidden_sizes must name at least one layer (use model='logreg')")
        if self.checkpoint_every is not None and self.checkpoint_every % self.eval_every:
            raise ValueError(
                f"checkpoint_every must be a multiple of eval_every={self.eval_every} "
                f"(checkpoints are taken between chunks), got {self.checkpoint_every}"
            )
        if self.data_streams == "per_worker" and (
            self.delay != "workers" or self.protocol not in ("async", "ssp")
        ):
            raise ValueError(
                "data_streams='per_worker' needs delay='workers' with protocol 'async' or "
                f"'ssp' (one worker's gradient per update), got delay={self.delay!r}, "
                f"protocol={self.protocol!r}"
            )
        if self.delay in ("geometric", "poisson") and (
            self.delay_mean is None or self.max_delay is None
        ):
            raise ValueError(f"delay={self.delay!r} needs both delay_mean and max_delay")
        if self.delay in ("constant", "uniform") and self.max_delay is None:
            raise ValueError(f"delay={self.delay!r} needs max_delay")
        if self.delay == "uniform" and self.min_delay > self.max_delay:
            raise ValueError(
                f"min_delay must be <= max_delay, got {self.min_delay} > {self.max_delay}"
            )
        if self.compute_time == "shifted_exponential" and self.compute_shift >= self.compute_mean:
            raise ValueError(
                f"compute_shift must be < compute_mean={self.compute_mean} (the exponential "
                f"part has mean compute_mean - compute_shift), got {self.compute_shift}"
            )
        if self.compute_time == "pareto" and self.pareto_alpha <= 1:
            raise ValueError(f"pareto_alpha must be > 1 (finite mean), got {self.pareto_alpha}")
        if self.num_slow > self.num_workers:
            raise ValueError(
                f"num_slow must be in [0, num_workers={self.num_workers}], got {self.num_slow}"
            )
        if self.delay == "workers":
            if self.protocol == "k_async" and self.k is None:
                raise ValueError("protocol='k_async' needs k (gradients per update)")
            if self.protocol in ("async", "ssp") and self.k is not None:
                raise ValueError(f"k applies to k_async and k_sync, not {self.protocol!r}")
            if self.protocol == "k_sync" and self.k is not None and self.k > self.num_workers:
                raise ValueError(
                    f"k must be in [1, num_workers={self.num_workers}] for k_sync, got {self.k}"
                )
            if self.protocol == "ssp" and self.max_staleness is None:
                raise ValueError("protocol='ssp' needs max_staleness (the allowed clock gap S)")
            if self.protocol == "k_sync" and self.max_staleness is not None:
                raise ValueError("max_staleness does not apply to protocol='k_sync' (τ = 0)")

    @property
    def gradients_per_update(self) -> int:
        """K for K-sync / K-async worker protocols (the batch is K × batch_size), else 1."""
        if self.delay != "workers":
            return 1
        if self.protocol == "k_sync":
            return self.num_workers if self.k is None else self.k
        if self.protocol == "k_async":
            return int(self.k)
        return 1

    @property
    def uses_worker_clock(self) -> bool:
        """Whether time is the simulated wall clock of workers (else it counts updates)."""
        return self.delay == "workers"

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` applied (and checked)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        out = dataclasses.asdict(self)
        if out["hidden_sizes"] is not None:
            out["hidden_sizes"] = list(out["hidden_sizes"])
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """Builds a config from a dict (e.g. parsed JSON); unknown keys are an error."""
        if not isinstance(values, Mapping):
            raise TypeError(f"a config must be a JSON object, got {type(values).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(
                f"unknown config field(s) {unknown}; known fields: {', '.join(sorted(names))}"
            )
        return cls(**dict(values))

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> TrainConfig:
        """Reads a config from a JSON file."""
        with open(path, encoding="utf-8") as file:
            try:
                values = json.load(file)
            except json.JSONDecodeError as error:
                raise ValueError(f"{os.fspath(path)} is not valid JSON: {error}") from None
        return cls.from_dict(values)


_FIELD_TYPES = typing.get_type_hints(TrainConfig)


def _check_field(f: dataclasses.Field, value: Any) -> Any:
    """Checks one field's type and range; returns the (possibly normalised) value."""
    name, hint = f.name, _FIELD_TYPES[f.name]
    args = typing.get_args(hint)
    optional = type(None) in args
    if value is None:
        if optional:
            return value
        raise TypeError(f"{name} must not be None")
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if typing.get_origin(base) is tuple:
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise TypeError(f"{name} must be a list of ints, got {value!r}")
        items = tuple(_check_int(f"{name}[{i}]", v, 1) for i, v in enumerate(value))
        return items
    if base is str:
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a string, got {value!r}")
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
        return value
    if base is int:
        low = 0 if name in ("seed", "min_delay", "num_slow", "max_delay", "max_staleness") else 1
        return _check_int(name, value, low)
    if base is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{name} must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
        if name == "slow_factor" and value < 1:
            raise ValueError(f"slow_factor must be >= 1, got {value}")
        if name == "momentum" and not 0 <= value < 1:
            raise ValueError(f"momentum must be in [0, 1), got {value}")
        strict = name in ("learning_rate", "compute_mean", "compute_cv", "pareto_alpha")
        if value < 0 or (strict and value == 0):
            raise ValueError(f"{name} must be {'> 0' if strict else '>= 0'}, got {value}")
        return value
    raise TypeError(f"unsupported config field type {hint!r} for {name}")  # pragma: no cover


# --------------------------------------------------------------------------------------------
# Building blocks from a config.


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
    law = _compute_time_law(config)
    n = config.num_workers
    max_delay = config.max_delay
    bounded = (
        config.protocol == "k_sync"
        or config.max_staleness is not None
        or (config.compute_time == "deterministic")
    )
    if max_delay is None and not bounded:
        stragglers = config.slow_factor if config.num_slow else 1.0
        k = config.k or 1
        max_delay = max(1, math.ceil(15 * n * stragglers / k))
    return workers_lib.parameter_server(
        n,
        law,
        num_slow=config.num_slow,
        slow_factor=config.slow_factor,
        comm_time=config.comm_time or None,
        protocol=config.protocol,
        max_staleness=config.max_staleness,
        k=config.k,
        max_delay=max_delay,
    )


def make_optimizer(
    config: TrainConfig, delay: delays_lib.DelayModel | None = None
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

    Returns:
      The optimizer; its state contains one :class:`asgd_jax.StaleState`.
    """
    lr = config.learning_rate
    if config.optimizer == "sgd":
        base = optax.sgd(lr)
    elif config.optimizer == "momentum":
        base = optax.sgd(lr, momentum=config.momentum)
    elif config.optimizer == "nesterov":
        base = optax.sgd(lr, momentum=config.momentum, nesterov=True)
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
            config.dc_lambda, adaptive=mitigation == "dc_asgd_adaptive"
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


# --------------------------------------------------------------------------------------------
# The program: init, one step, a scanned chunk, evaluation.


def _split_seed(seed: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The model-init, delay and data keys of the run with integer ``seed``."""
    init_key, delay_key, data_key = jax.random.split(jax.random.key(seed), 3)
    return init_key, delay_key, data_key


_split_seed_jit = jax.jit(_split_seed)


class TrainState(NamedTuple):
    """Everything a run carries from step to step (a pytree of arrays; checkpointed whole)."""

    step: jax.Array  # updates done so far (int32).
    params: Any  # W_t.
    opt_state: Any  # the optimizer state (with the StaleState inside).
    data_key: jax.Array  # raw uint32 key data of the run's data stream.
    time: jax.Array  # simulated wall clock of the last update (float32); steps otherwise.
    gradients_dropped: jax.Array  # worker gradients dropped or cancelled up to that update.
    staleness_clipped: jax.Array  # updates whose staleness was clipped to max_delay.
    batch_loss_sum: jax.Array  # Σ of the minibatch losses since the last evaluation.


@dataclasses.dataclass(frozen=True, eq=False)
class Program:
    """The compiled pieces of one configuration (cached: runs of one config share them).

    Attributes:
      config: the configuration (with ``num_steps``, ``seed`` and checkpointing normalised).
      model: the model.
      optimizer: the ``asgd.stale`` optimizer.
      delay: the delay model.
      dataset_shape: ``(num_train, input_shape, num_classes)`` the program was built for.
    """

    config: TrainConfig
    model: models_lib.Model
    optimizer: optax.GradientTransformationExtraArgs
    delay: delays_lib.DelayModel
    dataset_shape: tuple[int, tuple[int, ...], int]

    # ---- pure functions (jit/vmap them as needed).

    def init(self, seed: int | jax.Array) -> TrainState:
        """The state of the run with integer ``seed``.

        The model's jitted ``init`` is shared by every program with the same model; the
        optimizer state is built by this program's own small jitted ``init_from``.
        """
        init_key, delay_key, data_key = _split_seed_jit(jnp.asarray(seed, jnp.int32))
        params = self.model.init(init_key, self.dataset_shape[1])
        return self.compiled("init", False)(params, delay_key, data_key)

    def init_from(self, params: Any, delay_key: jax.Array, data_key: jax.Array) -> TrainState:
        """The state of a run from its initial parameters and its delay and data keys."""
        opt_state = transforms.reseed(self.optimizer.init(params), delay_key)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=opt_state,
            data_key=jax.random.key_data(data_key),
            time=jnp.zeros((), jnp.float32),
            gradients_dropped=jnp.zeros((), jnp.int32),
            staleness_clipped=jnp.zeros((), jnp.int32),
            batch_loss_sum=jnp.zeros((), jnp.float32),
        )

    def start(
        self, seeds: Sequence[int] | int, dataset: data_lib.Dataset, batched: bool
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        """The initial state (seeds stacked on a leading axis when ``batched``) and its metrics.

        Seed by seed, so a vmapped run starts from exactly the states of the single runs.
        """
        if not batched:
            state = _distinct_buffers(self.init(int(np.asarray(seeds))))
        else:
            states = [self.init(int(seed)) for seed in np.asarray(seeds).reshape(-1)]
            state = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
        metrics = _run_metrics(state, 0)
        metrics.update(self.evaluate_model(state.params, dataset, batched))
        return state, metrics

    def batch_indices(self, state: TrainState, step: jax.Array) -> jax.Array:
        """Training-set indices of the gradient(s) of update ``step``."""
        config = self.config
        num_train = self.dataset_shape[0]
        if config.data_streams == "per_worker":
            worker_state = transforms.find_stale_state(state.opt_state).delay_state
            worker = worker_state.worker
            local_step = worker_state.clock[worker] - 1
            return data_lib.worker_batch_indices(
                state.data_key,
                num_train,
                config.batch_size,
                local_step,
                worker,
                config.num_workers,
                disjoint=True,
            )
        size = config.batch_size * config.gradients_per_update
        return data_lib.batch_indices(state.data_key, num_train, size, step)

    def step(
        self, state: TrainState, dataset: data_lib.Dataset, indices: jax.Array | None = None
    ) -> TrainState:
        """One update: the gradient at W_{t−τ_t} on the step's batch, applied to W_t."""
        if indices is None:
            indices = self.batch_indices(state, state.step)
        batch = data_lib.get_batch(dataset, indices)
        stale = transforms.find_stale_state(state.opt_state)
        if self.config.uses_worker_clock:
            # The delay model's state is one update ahead (τ_t is drawn before the gradient):
            # it now describes the arrival (or round) that delivers this update.
            worker_state = stale.delay_state
            now = worker_state.time
            dropped, clipped = worker_state.dropped, worker_state.clipped
        else:
            now = (state.step + 1).astype(jnp.float32)
            dropped, clipped = state.gradients_dropped, state.staleness_clipped
        at = transforms.stale_params(state.opt_state, state.params)
        loss, grads = jax.value_and_grad(self.model.loss)(at, batch)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            data_key=state.data_key,
            time=now.astype(jnp.float32),
            gradients_dropped=dropped,
            staleness_clipped=clipped,
            batch_loss_sum=state.batch_loss_sum + loss,
        )

    def run_chunk(self, state: TrainState, dataset: data_lib.Dataset, length: int) -> TrainState:
        """``length`` steps fused in one ``lax.scan``."""
        if self.config.data_streams == "shared":
            # All the chunk's batches at once: the data key's hash words are derived once,
            # not once per step.
            steps = state.step + jnp.arange(length, dtype=jnp.int32)
            all_indices = jax.vmap(lambda t: self.batch_indices(state, t))(steps)
            body = lambda s, idx: (self.step(s, dataset, idx), None)
            return jax.lax.scan(body, state, all_indices)[0]
        body = lambda s, _: (self.step(s, dataset), None)
        return jax.lax.scan(body, state, None, length=length)[0]

    def evaluate_model(
        self, params: Any, dataset: data_lib.Dataset, batched: bool
    ) -> dict[str, jax.Array]:
        """Loss and accuracy on the full train and test splits (seeds on axis 0 if batched).

        One jitted program per model, evaluation batch size and dataset shape, shared by
        every configuration that trains that model.
        """
        key = (self.model.module, self.config.eval_batch_size, batched)
        if key not in _MODEL_EVALUATIONS:
            _MODEL_EVALUATIONS[key] = _compile_evaluation(self.model, key[1], batched)
        return _MODEL_EVALUATIONS[key](params, dataset)

    def chunk(
        self, state: TrainState, dataset: data_lib.Dataset, length: int
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        """``length`` steps, then the run's counters (the model is evaluated separately)."""
        state = self.run_chunk(state, dataset, length)
        metrics = _run_metrics(state, length)
        return state._replace(batch_loss_sum=jnp.zeros_like(state.batch_loss_sum)), metrics

    # ---- compiled entry points (cached per program).

    def compiled(self, name: str, batched: bool) -> Any:
        """The jitted (for ``batched``: vmapped over seeds) ``"chunk"`` or ``"step"``."""
        cache = self.__dict__.setdefault("_compiled", {})
        if (name, batched) not in cache:
            cache[(name, batched)] = _compile(self, name, batched)
        return cache[(name, batched)]


def _compile(program: Program, name: str, batched: bool) -> Any:
    if name == "init":
        return jax.jit(program.init_from)
    if name == "chunk":

        def chunk(state: TrainState, dataset: data_lib.Dataset, length: int) -> Any:
            fn = lambda s, d: program.chunk(s, d, length)
            return (jax.vmap(fn, in_axes=(0, None)) if batched else fn)(state, dataset)

        return jax.jit(chunk, static_argnums=2, donate_argnums=0)
    if name == "step":
        step = jax.vmap(program.step, in_axes=(0, None)) if batched else program.step
        return jax.jit(step, donate_argnums=0)
    raise ValueError(f"unknown program entry {name!r}")


def _distinct_buffers(tree: Any) -> Any:
    """``tree`` with every leaf in a buffer of its own (a copy where two leaves share one).

    Eager initialisation may hand the same array to several leaves (e.g. zero counters);
    the state is donated to the train step, and donating one buffer twice is an error.
    """
    seen: set[Any] = set()

    def own(leaf: jax.Array) -> jax.Array:
        try:
            buffer = leaf.unsafe_buffer_pointer()
        except Exception:  # backends without raw pointers: object identity
            buffer = id(leaf)
        if buffer in seen:
            return jnp.copy(leaf)
        seen.add(buffer)
        return leaf

    return jax.tree.map(own, tree)


def _run_metrics(state: TrainState, num_steps: int) -> dict[str, jax.Array]:
    """The run's counters after ``num_steps`` steps since the last evaluation (traceable)."""
    stale = transforms.find_stale_state(state.opt_state)
    histogram = stale.metrics.staleness_histogram
    taus = jnp.arange(histogram.shape[-1])
    count = jnp.maximum(histogram.sum(-1), 1).astype(jnp.float32)
    nan = jnp.full(jnp.shape(state.step), jnp.nan, jnp.float32)
    return {
        "step": state.step,
        "time": state.time,
        "batch_loss": state.batch_loss_sum / num_steps if num_steps else nan,
        "mean_staleness": jnp.sum(taus * histogram, -1).astype(jnp.float32) / count,
        "max_staleness": jnp.max(jnp.where(histogram > 0, taus, 0), -1),
        "updates_dropped": stale.metrics.updates_dropped,
        "updates_applied": state.step - stale.metrics.updates_dropped,
        "gradients_dropped": state.gradients_dropped,
        "staleness_clipped": state.staleness_clipped,
    }


_MODEL_EVALUATIONS: dict[Any, Any] = {}


def _compile_evaluation(model: models_lib.Model, batch_size: int | None, batched: bool) -> Any:
    def evaluate(params: Any, dataset: data_lib.Dataset) -> dict[str, jax.Array]:
        train_loss, train_acc = model.evaluate(
            params, dataset.x_train, dataset.y_train, batch_size=batch_size
        )
        test_loss, test_acc = model.evaluate(
            params, dataset.x_test, dataset.y_test, batch_size=batch_size
        )
        return {
            "train_loss": train_loss,
            "train_accuracy": train_acc,
            "test_loss": test_loss,
            "test_accuracy": test_acc,
            "generalization_gap": test_loss - train_loss,
        }

    return jax.jit(jax.vmap(evaluate, in_axes=(0, None)) if batched else evaluate)


_PROGRAMS: dict[Any, Program] = {}
_MAX_PROGRAMS = 32


def build_program(config: TrainConfig, dataset: data_lib.Dataset) -> Program:
    """The :class:`Program` of a config for a dataset's shapes (cached across runs).

    Runs that differ only in ``num_steps``, ``seed`` or checkpointing share one program, so
    their jitted functions compile once.
    """
    # Only what changes the compiled code: the dataset enters through its shapes.
    base = config.replace(
        num_steps=1,
        seed=0,
        checkpoint_every=None,
        max_checkpoints=1,
        data_dir=None,
        train_size=None,
    )
    shape = (dataset.num_train, tuple(dataset.input_shape), int(dataset.num_classes))
    key = (base, shape)
    if key in _PROGRAMS:
        return _PROGRAMS[key]
    num_train = shape[0]
    per_update = config.batch_size * config.gradients_per_update
    if config.data_streams == "per_worker":
        shard = num_train // config.num_workers
        if config.batch_size > shard:
            raise ValueError(
                f"batch_size must be <= {shard} (the per-worker shard, {num_train} training "
                f"examples // {config.num_workers} workers), got {config.batch_size}"
            )
    elif per_update > num_train:
        what = (
            f"batch_size × K = {config.batch_size} × {config.gradients_per_update}"
            if config.gradients_per_update > 1
            else f"batch_size = {config.batch_size}"
        )
        raise ValueError(f"{what} exceeds the {num_train} training examples")
    delay = make_delay_model(config)
    program = Program(
        config=base,
        model=make_model(config, shape[2]),
        optimizer=make_optimizer(base, delay),
        delay=delay,
        dataset_shape=shape,
    )
    if len(_PROGRAMS) >= _MAX_PROGRAMS:
        _PROGRAMS.pop(next(iter(_PROGRAMS)))
    _PROGRAMS[key] = program
    return program


# --------------------------------------------------------------------------------------------
# Results.


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` returns.

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


def summarize(result: TrainResult, target_accuracy: float | None = None) -> dict[str, Any]:
    """Final numbers of a run as plain floats (lists over seeds for vmapped runs).

    Args:
      result: a :class:`TrainResult`.
      target_accuracy: also report the time and steps to this test accuracy (``None`` when a
        run never reaches it).

    Returns:
      A JSON-ready dict.
    """
    history = result.history
    out: dict[str, Any] = {}
    for name in (
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
    ):
        out["final_" + name if name not in ("step", "time") else name] = _plain(
            history[name][..., -1]
        )
    if target_accuracy is not None:
        out["target_accuracy"] = float(target_accuracy)
        out["time_to_target"] = _plain(time_to_accuracy(history, target_accuracy))
        steps = dict(history, time=history["step"])
        out["steps_to_target"] = _plain(time_to_accuracy(steps, target_accuracy))
    out["time_unit"] = result.time_unit
    out["wall_seconds"] = result.wall_seconds
    return out


def _plain(x: Any) -> Any:
    x = np.asarray(x)
    if x.ndim:
        return [_plain(v) for v in x]
    value = x.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


# --------------------------------------------------------------------------------------------
# Checkpoints.


class CheckpointError(RuntimeError):
    """A checkpoint cannot be resumed: corrupted, or written by another configuration."""


def _fingerprint(config: TrainConfig, seeds: tuple[int, ...] | None) -> dict[str, Any]:
    values = {k: v for k, v in config.to_dict().items() if k not in _TRAJECTORY_FREE}
    values["seeds"] = None if seeds is None else list(seeds)
    return values


def _leaf_signature(state: TrainState) -> list[list[Any]]:
    return [[list(np.shape(x)), str(np.asarray(x).dtype)] for x in jax.tree.leaves(state)]


def _digest(leaves: Sequence[np.ndarray]) -> str:
    sha = hashlib.sha256()
    for leaf in leaves:
        leaf = np.ascontiguousarray(leaf)
        sha.update(f"{leaf.dtype.str}{leaf.shape}".encode())
        sha.update(leaf.tobytes())
    return sha.hexdigest()


_MANIFEST = "asgd_manifest.json"


def _file_digests(root: str) -> dict[str, list[Any]]:
    """``{relative path: [size, sha256]}`` of every file under ``root`` but the manifest."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            relative = os.path.relpath(path, root)
            if relative == _MANIFEST:
                continue
            sha = hashlib.sha256()
            with open(path, "rb") as file:
                for block in iter(lambda: file.read(1 << 20), b""):
                    sha.update(block)
            out[relative] = [os.path.getsize(path), sha.hexdigest()]
    return out


class _Checkpoints:
    """Orbax checkpoints of one run: the state's leaves plus JSON metadata per step.

    Each step's folder also holds a manifest of the size and SHA-256 of every file orbax
    wrote, checked before orbax reads anything: a damaged checkpoint is reported as such
    (naming the file) instead of surfacing as a storage-layer error. The manifest is written
    after orbax has committed the step, so a crash in between leaves a checkpoint that is
    reported as incomplete, and the earlier ones intact.
    """

    def __init__(self, directory: str | os.PathLike, max_to_keep: int):
        import orbax.checkpoint as ocp

        logging.getLogger("absl").setLevel(logging.ERROR)
        self._ocp = ocp
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def _step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(self, step: int, state: TrainState, metadata: dict[str, Any]) -> None:
        leaves = [np.asarray(x) for x in jax.tree.leaves(state)]
        metadata = dict(metadata, digest=_digest(leaves), step=step, format=_CHECKPOINT_FORMAT)
        args = self._ocp.args.Composite(
            state=self._ocp.args.StandardSave(leaves),
            meta=self._ocp.args.JsonSave(metadata),
        )
        self.manager.save(step, args=args, force=True)
        self.manager.wait_until_finished()
        step_dir = self._step_dir(step)
        manifest = {"format": _CHECKPOINT_FORMAT, "files": _file_digests(step_dir)}
        partial = os.path.join(step_dir, _MANIFEST + ".partial")
        with open(partial, "w", encoding="utf-8") as file:
            json.dump(manifest, file)
        os.replace(partial, os.path.join(step_dir, _MANIFEST))

    def _error(self, step: int, reason: str, *, damaged: bool = True) -> CheckpointError:
        others = [s for s in self.steps() if s != step]
        if not damaged:
            hint = "resume with the configuration that wrote it"
        elif others:
            hint = (
                f"the other checkpoints (steps {', '.join(map(str, others))}) are untouched: "
                "resume from one with resume_step (--resume-step)"
            )
        else:
            hint = "no other checkpoint exists"
        return CheckpointError(
            f"checkpoint at step {step} in {self.directory} cannot be resumed: {reason}. "
            f"Nothing was deleted; {hint}, or start afresh in another directory."
        )

    def verify_files(self, step: int) -> None:
        step_dir = self._step_dir(step)
        try:
            with open(os.path.join(step_dir, _MANIFEST), encoding="utf-8") as file:
                manifest = json.load(file)
            expected = manifest["files"]
        except FileNotFoundError:
            raise self._error(step, "it is incomplete (no manifest)") from None
        except (ValueError, KeyError, TypeError):
            raise self._error(step, "its manifest is unreadable") from None
        found = _file_digests(step_dir)
        for relative, (size, sha) in sorted(expected.items()):
            if relative not in found:
                raise self._error(step, f"the file {relative} is missing")
            if found[relative][0] != size:
                raise self._error(
                    step, f"the file {relative} has {found[relative][0]} bytes, not {size}"
                )
            if found[relative][1] != sha:
                raise self._error(step, f"the file {relative} is corrupted (checksum mismatch)")

    def read_metadata(self, step: int) -> dict[str, Any]:
        self.verify_files(step)
        try:
            with _quiet_storage():
                restored = self.manager.restore(
                    step, args=self._ocp.args.Composite(meta=self._ocp.args.JsonRestore())
                )
            meta = restored["meta"]
        except Exception as error:  # orbax raises many types for damaged files
            raise self._error(step, f"its metadata is unreadable ({_one_line(error)})") from None
        if not isinstance(meta, dict) or meta.get("format") != _CHECKPOINT_FORMAT:
            raise self._error(step, "its metadata is not an asgd_jax checkpoint")
        return meta

    def check(self, step: int, template: TrainState, fingerprint: dict[str, Any]) -> dict:
        meta = self.read_metadata(step)
        saved = meta.get("fingerprint", {})
        changed = [
            f"{k}: {saved.get(k)!r} -> {v!r}"
            for k, v in fingerprint.items()
            if saved.get(k, "<missing>") != v
        ]
        if changed:
            raise self._error(
                step,
                "it was written by a different configuration ("
                + "; ".join(changed[:6])
                + ("; …" if len(changed) > 6 else "")
                + ")",
                damaged=False,
            )
        if meta.get("leaves") != _leaf_signature(template):
            raise self._error(
                step, "its state has other shapes or dtypes than this run's", damaged=False
            )
        return meta

    def restore(self, step: int, template: TrainState, meta: dict[str, Any]) -> TrainState:
        leaves, treedef = jax.tree.flatten(template)
        abstract = [jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype) for x in leaves]
        try:
            with _quiet_storage():
                restored = self.manager.restore(
                    step,
                    args=self._ocp.args.Composite(state=self._ocp.args.StandardRestore(abstract)),
                )["state"]
            host = [np.asarray(x) for x in restored]
        except Exception as error:
            raise self._error(step, f"its arrays are unreadable ({_one_line(error)})") from None
        if len(host) != len(leaves) or _digest(host) != meta.get("digest"):
            raise self._error(step, "its arrays do not match the digest saved with them")
        return jax.tree.unflatten(treedef, [jnp.asarray(x) for x in host])

    def delete_after(self, step: int) -> None:
        for later in self.steps():
            if later > step:
                self.manager.delete(later)

    def close(self) -> None:
        self.manager.close()


def _quiet_storage():
    """Silences the asyncio task errors the storage layer logs when a read fails."""
    return quiet("asyncio", logging.CRITICAL)


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(error).__name__}: {first[:200]}"


# --------------------------------------------------------------------------------------------
# The loop.


def load_dataset(config: TrainConfig) -> data_lib.Dataset:
    """The dataset of a config (``dataset``, ``data_dir``, ``train_size``), loaded offline."""
    return data_lib.load(config.dataset, data_dir=config.data_dir, train_size=config.train_size)


def _fit_dataset(config: TrainConfig, dataset: data_lib.Dataset) -> data_lib.Dataset:
    if not isinstance(dataset, data_lib.Dataset):
        raise TypeError(f"dataset must be an asgd_jax.data.Dataset, got {type(dataset).__name__}")
    if config.train_size is not None and config.train_size != dataset.num_train:
        return data_lib.subset(dataset, config.train_size)
    return dataset


def _chunk_ends(start: int, num_steps: int, every: int) -> list[int]:
    """Chunk boundaries after ``start``: the multiples of ``every`` and ``num_steps``."""
    ends = list(range((start // every + 1) * every, num_steps, every))
    return [*ends, num_steps] if num_steps > start else []


def train(
    config: TrainConfig,
    *,
    seeds: Sequence[int] | None = None,
    dataset: data_lib.Dataset | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = True,
    resume_step: int | None = None,
    progress: bool | None = None,
) -> TrainResult:
    """Trains a model as ``config`` says; the one loop behind the CLI, notebooks and studies.

    Steps run in jitted, state-donating chunks of ``config.eval_every`` steps fused with
    ``lax.scan``; after each chunk the program evaluates on the full train and test splits
    (one host round trip per chunk). See the module docstring for time, seeds and
    checkpoints.

    Args:
      config: the run's :class:`TrainConfig`.
      seeds: run these seeds at once under ``jax.vmap`` (every array in the result gains a
        leading seed axis); ``None`` runs ``config.seed`` alone.
      dataset: train on this :class:`asgd_jax.data.Dataset` instead of loading
        ``config.dataset`` (e.g. one of :func:`asgd_jax.data.neighbouring_pair`); a
        ``config.train_size`` other than its size keeps its first ``train_size`` examples.
      checkpoint_dir: save orbax checkpoints here every ``config.checkpoint_every`` steps
        (default: only at the end) and resume from the latest one found there.
      resume: resume from the directory's checkpoint; ``False`` refuses a directory that
        already holds checkpoints.
      resume_step: resume from this step instead of the latest; later checkpoints in the
        directory are deleted (they are replaced as the run passes them again).
      progress: show a tqdm progress bar (default: when stderr is a terminal).

    Returns:
      A :class:`TrainResult`.

    Raises:
      ValueError: combinations that do not fit the dataset (batch size).
      CheckpointError: a checkpoint in ``checkpoint_dir`` is corrupted or was written by
        another configuration; nothing in the directory is changed.
      asgd_jax.data.DatasetNotAvailableError: the dataset is not prepared offline.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    started = time.perf_counter()
    if seeds is not None:
        seeds = tuple(_check_int(f"seeds[{i}]", s, 0) for i, s in enumerate(seeds))
        if not seeds:
            raise ValueError("seeds must name at least one seed")
    dataset = load_dataset(config) if dataset is None else _fit_dataset(config, dataset)
    program = build_program(config, dataset)
    batched = seeds is not None
    state, initial_metrics = program.start(seeds if batched else config.seed, dataset, batched)

    history: dict[str, list] = {}
    checkpoints = None
    resumed_from = None
    fingerprint = _fingerprint(config, seeds)
    if checkpoint_dir is not None:
        checkpoints = _Checkpoints(checkpoint_dir, config.max_checkpoints)
        existing = checkpoints.steps()
        if existing and not resume:
            raise CheckpointError(
                f"{checkpoints.directory} already holds checkpoints (steps {existing}); resume "
                "from them or choose another directory"
            )
        if resume_step is not None and resume_step not in existing:
            raise CheckpointError(
                f"no checkpoint at step {resume_step} in {checkpoints.directory} "
                f"(steps: {existing or 'none'})"
            )
        if existing:
            step = existing[-1] if resume_step is None else resume_step
            meta = checkpoints.check(step, state, fingerprint)
            state = checkpoints.restore(step, state, meta)
            history = _history_from_json(meta["history"])
            resumed_from = step
            if step > config.num_steps:
                raise CheckpointError(
                    f"the checkpoint in {checkpoints.directory} is at step {step}, beyond "
                    f"num_steps={config.num_steps}"
                )
            checkpoints.delete_after(step)

    start = int(np.asarray(state.step).reshape(-1)[0])
    if not history:
        _append(history, initial_metrics)

    chunk = program.compiled("chunk", batched)
    use_bar = sys.stderr.isatty() if progress is None else bool(progress)
    bar = _progress_bar(config.num_steps, start, use_bar)
    previous = start
    try:
        for end in _chunk_ends(start, config.num_steps, config.eval_every):
            state, metrics = chunk(state, dataset, end - previous)
            metrics.update(program.evaluate_model(state.params, dataset, batched))
            _append(history, metrics)
            previous = end
            if bar is not None:
                bar.update(end - bar.n)
                bar.set_postfix(test_acc=f"{np.mean(history['test_accuracy'][-1]):.3f}")
            save_now = end == config.num_steps or (
                config.checkpoint_every is not None and end % config.checkpoint_every == 0
            )
            if checkpoints is not None and save_now:
                meta = {
                    "fingerprint": fingerprint,
                    "leaves": _leaf_signature(state),
                    "history": _history_to_json(history),
                    "config": config.to_dict(),
                }
                checkpoints.save(end, state, meta)
    finally:
        if bar is not None:
            bar.close()
        if checkpoints is not None:
            checkpoints.close()

    stacked = {
        k: np.stack([np.asarray(v) for v in values], axis=-1) for k, values in history.items()
    }
    histogram = np.asarray(transforms.find_stale_state(state.opt_state).metrics.staleness_histogram)
    return TrainResult(
        config=config,
        seeds=seeds,
        state=state,
        history=stacked,
        staleness_histogram=histogram,
        time_unit="simulated time" if config.uses_worker_clock else "steps",
        wall_seconds=time.perf_counter() - started,
        resumed_from=resumed_from,
    )


def _history_to_json(history: Mapping[str, list]) -> dict[str, Any]:
    out = {}
    for name, values in history.items():
        stacked = np.stack(values, axis=-1)
        out[name] = {"dtype": stacked.dtype.str, "values": _plain(stacked)}
    return out


def _history_from_json(saved: Mapping[str, Any]) -> dict[str, list]:
    history = {}
    for name, entry in saved.items():
        stacked = np.asarray(entry["values"], dtype=np.dtype(entry["dtype"]))
        history[name] = [stacked[..., i] for i in range(stacked.shape[-1])]
    return history


def _append(history: dict[str, list], metrics: Mapping[str, Any]) -> None:
    host = jax.device_get(dict(metrics))
    for name, value in host.items():
        history.setdefault(name, []).append(np.asarray(value))


def _progress_bar(total: int, initial: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=False)
