"""TrainConfig: the one description of a run (its fields' schema is in ``_fields.py``).

Each field carries its group, help, choices or range and role as metadata; the
CLI generates its flags from :meth:`TrainConfig.schema`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from collections.abc import Mapping
from typing import Any

from asgd_jax import data as data_lib
from asgd_jax import models as models_lib
from asgd_jax.train._fields import (
    CONFIG_GROUPS,
    ROLES,
    SWEEP_MODES,
    ConfigField,
    check_field,
    schema,
)
from asgd_jax.train._fields import config_field as _field

__all__ = [
    "COMPUTE_TIMES",
    "CONFIG_GROUPS",
    "DATA_STREAMS",
    "DELAYS",
    "MITIGATIONS",
    "OPTIMIZERS",
    "PROTOCOLS",
    "ROLES",
    "SWEEP_MODES",
    "ConfigField",
    "TrainConfig",
    "fields_with_role",
    "vmappable_fields",
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
PROTOCOLS = ("async", "ssp", "k_async", "k_sync", "rennala", "ringmaster")
DATA_STREAMS = ("shared", "per_worker")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run; shared by the CLI, notebooks and benchmarks.

    Frozen and hashable; :meth:`to_dict` / :meth:`from_dict` round-trip through JSON. Every
    field is checked when the object is built (``ValueError`` / ``TypeError`` naming the
    field and its allowed values); combinations that need the dataset (batch size against the
    number of examples) are checked by :func:`asgd_jax.train.check_fits`.
    """

    # Data.
    dataset: str = _field(
        "digits", "dataset name", group="data", role="data", choices=data_lib.DATASETS
    )
    data_dir: str | None = _field(
        None, "TFDS data directory (default $TFDS_DATA_DIR)", group="data", role="data"
    )
    train_size: int | None = _field(
        None, "keep only the first N training examples", group="data", role="data", low=1
    )
    batch_size: int = _field(32, "examples per gradient (per worker)", group="data", low=1)
    data_streams: str = _field(
        "shared",
        "'shared': one stream indexed by the update; 'per_worker': each simulated worker "
        "reads its own disjoint shard (needs delay=workers, protocol async or ssp)",
        group="data",
        choices=DATA_STREAMS,
    )
    # Model.
    model: str = _field("mlp", "model name", group="model", choices=models_lib.MODELS)
    hidden_sizes: tuple[int, ...] | None = _field(
        None, "MLP hidden layer widths, e.g. 64,64 (mlp only; default 64)", group="model", low=1
    )
    # Optimizer.
    optimizer: str = _field("sgd", "base optimizer", group="optimizer", choices=OPTIMIZERS)
    learning_rate: float = _field(
        0.1, "learning rate η", group="optimizer", low=0.0, strict=True, sweep="vmap"
    )
    momentum: float = _field(
        0.9,
        "momentum (optimizer momentum / nesterov)",
        group="optimizer",
        low=0.0,
        high=1.0,
        high_open=True,
        sweep="vmap",
    )
    mitigation: str = _field(
        "none",
        "staleness mitigation: staleness_aware (η/τ), delay_adaptive (η·n/τ for τ > n), "
        "dc_asgd, dc_asgd_adaptive (delay compensation), gap_aware",
        group="optimizer",
        choices=MITIGATIONS,
    )
    dc_lambda: float = _field(
        0.04, "DC-ASGD variance-control parameter λ", group="optimizer", low=0.0, sweep="vmap"
    )
    max_staleness: int | None = _field(
        None,
        "drop gradients staler than S (for ssp: the allowed clock gap)",
        group="optimizer",
        low=0,
    )
    # Delays.
    delay: str = _field(
        "workers",
        "delay model: none (synchronous SGD), constant, uniform, geometric, poisson, "
        "round_robin, or workers (simulated parameter server)",
        group="delays",
        choices=DELAYS,
    )
    min_delay: int = _field(0, "smallest delay (uniform)", group="delays", low=0, sweep="vmap")
    max_delay: int | None = _field(
        None,
        "largest delay: the τ of constant, the top of uniform, the truncation of "
        "geometric/poisson, the history bound of workers (default: derived)",
        group="delays",
        low=0,
    )
    delay_mean: float | None = _field(
        None, "mean delay (geometric, poisson)", group="delays", low=0.0, sweep="vmap"
    )
    # Simulated workers.
    num_workers: int = _field(
        8, "number of workers n (workers, round_robin, delay_adaptive)", group="workers", low=1
    )
    protocol: str = _field(
        "async",
        "worker protocol: async, ssp (stale synchronous), k_async, k_sync (k=n: fully sync), "
        "rennala (Rennala SGD, k=S), ringmaster (Ringmaster ASGD, threshold=R)",
        group="workers",
        choices=PROTOCOLS,
    )
    k: int | None = _field(
        None,
        "K for k_async (required) and k_sync (default n); S, the gradients per update, for "
        "rennala (required)",
        group="workers",
        low=1,
    )
    threshold: int | None = _field(
        None,
        "Ringmaster's delay threshold R: gradients with delay >= R are ignored (default: "
        "none, plain ASGD)",
        group="workers",
        low=1,
    )
    stops: bool = _field(
        False,
        "rennala / ringmaster: stop stale computations at once and restart them at the "
        "current point",
        group="workers",
    )
    compute_time: str = _field(
        "exponential",
        "law of one gradient's compute time",
        group="workers",
        choices=COMPUTE_TIMES,
    )
    compute_mean: float = _field(
        1.0,
        "mean compute time of a normal-speed worker",
        group="workers",
        low=0.0,
        strict=True,
        sweep="vmap",
    )
    compute_shift: float = _field(
        0.0, "minimum compute time (shifted_exponential)", group="workers", low=0.0, sweep="vmap"
    )
    compute_cv: float = _field(
        1.0,
        "coefficient of variation std/mean (lognormal)",
        group="workers",
        low=0.0,
        strict=True,
        sweep="vmap",
    )
    pareto_alpha: float = _field(
        3.0, "tail index α (pareto; > 1)", group="workers", low=0.0, strict=True, sweep="vmap"
    )
    num_slow: int = _field(
        0, "number of stragglers among the workers", group="workers", low=0, sweep="vmap"
    )
    slow_factor: float = _field(
        4.0, "how many times slower a straggler computes", group="workers", low=1.0, sweep="vmap"
    )
    comm_time: float = _field(
        0.0,
        "constant communication time added to every cycle",
        group="workers",
        low=0.0,
        sweep="vmap",
    )
    # Steps, evaluation, checkpoints.
    num_steps: int = _field(1000, "number of server updates", group="run", role="length", low=1)
    eval_every: int = _field(
        100, "steps per scanned chunk; evaluate after each", group="run", low=1
    )
    eval_batch_size: int | None = _field(
        4096, "evaluate at most this many examples at a time (bounds memory)", group="run", low=1
    )
    seed: int = _field(
        0, "seed of the run (model init, delays, data order)", group="run", role="seed", low=0
    )
    checkpoint_every: int | None = _field(
        None,
        "save a checkpoint every N steps (a multiple of eval_every)",
        group="run",
        role="checkpoint",
        low=1,
    )
    max_checkpoints: int = _field(
        3, "checkpoints kept on disk (oldest removed first)", group="run", role="checkpoint", low=1
    )

    def __post_init__(self) -> None:
        for spec, f in zip(_SCHEMA, dataclasses.fields(self), strict=True):
            value = getattr(self, f.name)
            fixed = check_field(spec, f.metadata, value)
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
            if self.protocol == "rennala" and self.k is None:
                raise ValueError("protocol='rennala' needs k (S, the gradients per update)")
            if self.protocol in ("async", "ssp", "ringmaster") and self.k is not None:
                raise ValueError(f"k applies to k_async, k_sync and rennala, not {self.protocol!r}")
            if self.protocol in ("rennala", "ringmaster") and self.max_staleness is not None:
                raise ValueError(
                    f"max_staleness does not apply to protocol={self.protocol!r} (rennala: "
                    "τ = 0; ringmaster: use threshold R, which ignores delays >= R)"
                )
            if self.protocol == "k_sync" and self.k is not None and self.k > self.num_workers:
                raise ValueError(
                    f"k must be in [1, num_workers={self.num_workers}] for k_sync, got {self.k}"
                )
            if self.protocol == "ssp" and self.max_staleness is None:
                raise ValueError("protocol='ssp' needs max_staleness (the allowed clock gap S)")
            if self.protocol == "k_sync" and self.max_staleness is not None:
                raise ValueError("max_staleness does not apply to protocol='k_sync' (τ = 0)")
        if self.threshold is not None and (
            self.delay != "workers" or self.protocol != "ringmaster"
        ):
            raise ValueError(
                "threshold applies to delay='workers' with protocol='ringmaster', got "
                f"delay={self.delay!r}, protocol={self.protocol!r}"
            )
        if self.stops and (
            self.delay != "workers" or self.protocol not in ("rennala", "ringmaster")
        ):
            raise ValueError(
                "stops applies to delay='workers' with protocol 'rennala' or 'ringmaster', got "
                f"delay={self.delay!r}, protocol={self.protocol!r}"
            )

    @property
    def gradients_per_update(self) -> int:
        """K for K-sync / K-async, S for Rennala (the batch is K × batch_size), else 1."""
        if self.delay != "workers":
            return 1
        if self.protocol == "k_sync":
            return self.num_workers if self.k is None else self.k
        if self.protocol in ("k_async", "rennala"):
            return int(self.k)
        return 1

    @property
    def uses_worker_clock(self) -> bool:
        """Whether time is the simulated wall clock of workers (else it counts updates)."""
        return self.delay == "workers"

    @classmethod
    def schema(cls) -> tuple[ConfigField, ...]:
        """Every field's type, default and metadata, in declaration order (the CLI's flags)."""
        return _SCHEMA

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
    def from_json(cls, path: str | os.PathLike, **changes: Any) -> TrainConfig:
        """Reads a config from a JSON file, with ``changes`` applied before it is checked.

        The file holds a JSON object of fields (what :meth:`to_dict` writes), or a results
        file that holds one under ``"config"`` (a run's ``metrics.json``).
        """
        with open(path, encoding="utf-8") as file:
            try:
                values = json.load(file)
            except json.JSONDecodeError as error:
                raise ValueError(f"{os.fspath(path)} is not valid JSON: {error}") from None
        if isinstance(values, Mapping) and isinstance(values.get("config"), Mapping):
            values = values["config"]
        if not isinstance(values, Mapping):
            raise TypeError(
                f"{os.fspath(path)} must hold a JSON object of config fields, "
                f"got {type(values).__name__}"
            )
        return cls.from_dict({**values, **changes})


_SCHEMA = schema(dataclasses.fields(TrainConfig), typing.get_type_hints(TrainConfig))


def fields_with_role(*roles: str) -> tuple[str, ...]:
    """The names of the config fields whose ``role`` is one of ``roles``."""
    return tuple(f.name for f in _SCHEMA if f.role in roles)


def vmappable_fields() -> tuple[str, ...]:
    """The names of the config fields a sweep runs under ``vmap`` (metadata ``sweep="vmap"``)."""
    return tuple(f.name for f in _SCHEMA if f.sweep == "vmap")
