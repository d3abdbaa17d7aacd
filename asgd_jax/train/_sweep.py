"""Sweeps: the Cartesian product of field values, vmapped fields and seeds in one program.

A swept field whose metadata says ``sweep="vmap"`` enters the program as data: the learning
rate, momentum and λ of the optimizer (:func:`make_optimizer`'s ``hyperparams``); a table
delay law's inverse-CDF thresholds (:func:`asgd_jax.delays.threshold_model`) for
``min_delay`` and ``delay_mean`` at a fixed ``max_delay``; the compute-time law's parameters,
``num_slow``, ``slow_factor`` and ``comm_time`` of a worker simulation
(:func:`asgd_jax.workers.parameter_server` with traced parameters). Each point's data are
computed on the host from the point's own configuration by the same code a single run uses
(the concrete law, the float64 table, rounded to float32 once), so a point draws exactly the
τ sequence of the run alone. Points that agree on everything else — the ``sweep="loop"``
fields and the delay model's history bound ``max_delay`` (a worker simulation derives it from
its parameters: 15·n·slow_factor with stragglers, 15·n without) — run together with the
seeds on one vmapped axis of size points × seeds, in one compiled program; the others loop,
one program each.
"""

from __future__ import annotations

import dataclasses
import itertools
import numbers
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from asgd_jax import data as data_lib
from asgd_jax import delays as delays_lib
from asgd_jax import transforms
from asgd_jax._cache import CompileCache
from asgd_jax.train import _fields
from asgd_jax.train._build import (
    OPTIMIZER_HYPERPARAMS,
    _compute_time_law,
    check_fits,
    fit_dataset,
    load_dataset,
    make_delay_model,
    make_optimizer,
    worker_model,
)
from asgd_jax.train._config import TrainConfig, vmappable_fields
from asgd_jax.train._program import (
    Program,
    _distinct_buffers,
    _run_keys_jit,
    _run_metrics,
    build_program,
)
from asgd_jax.train._results import TrainResult

__all__ = ["SweepResult", "check_sweep", "run_sweep"]

_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(TrainConfig))
_TABLE_LAWS = ("uniform", "geometric", "poisson")
_LAW_FIELDS = ("compute_mean", "compute_shift", "compute_cv", "pareto_alpha")
_SERVER_FIELDS = ("num_slow", "slow_factor", "comm_time")
# Fields a sweep cannot take: the seeds have their own argument, checkpoints are not saved.
_NOT_SWEPT = {
    "seed": "pass the seeds as seeds=[...]",
    "checkpoint_every": "a sweep saves no checkpoints",
    "max_checkpoints": "a sweep saves no checkpoints",
}


@dataclasses.dataclass
class SweepResult:
    """What :func:`asgd_jax.train.train` returns for ``sweep=``: one result per point.

    Attributes:
      config: the base configuration.
      axes: the swept fields and their values, in the order given.
      seeds: the seeds (each point's arrays have a leading seed axis), else ``None``.
      points: each point's values ``{field: value}``, in product order (the last field
        varies fastest).
      results: one :class:`TrainResult` per point, as :func:`train` of the point's
        configuration returns it (``wall_seconds``: the point's program, shared).
      vmapped: the swept fields that ran as data under ``vmap``.
      looped: the swept fields that change shapes or code: one program per value.
      groups: the point indices of each compiled program, in the order they ran.
      max_delays: each program's delay history bound.
      wall_seconds: real seconds the sweep took (compilation included).
    """

    config: TrainConfig
    axes: dict[str, tuple]
    seeds: tuple[int, ...] | None
    points: tuple[dict[str, Any], ...]
    results: tuple[TrainResult, ...]
    vmapped: tuple[str, ...]
    looped: tuple[str, ...]
    groups: tuple[tuple[int, ...], ...]
    max_delays: tuple[int, ...]
    wall_seconds: float

    @property
    def num_programs(self) -> int:
        """How many programs the sweep compiled (one per group)."""
        return len(self.groups)

    def __len__(self) -> int:
        return len(self.points)

    def __iter__(self):
        return iter(zip(self.points, self.results, strict=True))

    def result(self, **values: Any) -> TrainResult:
        """The result of the point with these values (every swept field named)."""
        if set(values) != set(self.axes):
            names = ", ".join(self.axes)
            raise ValueError(f"name every swept field ({names}), got {sorted(values)}")
        for point, result in self:
            if point == values:
                return result
        raise ValueError(f"no sweep point {values}; the axes are {self.axes}")

    def describe(self) -> str:
        """One line: points, seeds, which fields were vmapped and which looped, programs."""
        seeds = f" × {len(self.seeds)} seeds" if self.seeds is not None else ""
        parts = [f"{len(self.points)} points{seeds}"]
        if self.vmapped:
            parts.append(f"vmapped: {', '.join(self.vmapped)}")
        if self.looped:
            parts.append(f"looped: {', '.join(self.looped)}")
        sizes = ", ".join(str(len(g)) for g in self.groups)
        programs = f"{self.num_programs} compiled program{'s' * (self.num_programs > 1)}"
        line = "; ".join(parts) + f"; {programs} ({sizes} points each)"
        split = [f for f in self.vmapped if f in _SERVER_FIELDS + _LAW_FIELDS]
        if split and len(set(self.max_delays)) > 1:
            line += f" — the derived max_delay differs ({sorted(set(self.max_delays))})"
        return line


def check_sweep(
    config: TrainConfig, sweep: Mapping[str, Sequence[Any]]
) -> tuple[dict[str, tuple], list[dict[str, Any]], list[TrainConfig]]:
    """Checks a sweep before anything is built: ``(axes, points, point configs)``.

    Raises:
      ValueError / TypeError: an unknown or unsweepable field, an empty or repeated list of
        values, a value out of the field's range, a non-number for a vmapped field, or a
        point whose configuration (or delay model) is invalid; the error names the field and
        the value.
    """
    if not isinstance(sweep, Mapping) or not sweep:
        raise ValueError(f"sweep must be a non-empty dict {{field: [values]}}, got {sweep!r}")
    specs = {spec.name: spec for spec in TrainConfig.schema()}
    metas = {f.name: f.metadata for f in dataclasses.fields(TrainConfig)}
    vmap = set(vmappable_fields())
    axes: dict[str, tuple] = {}
    for name, values in sweep.items():
        if name not in specs:
            known = ", ".join(specs)
            raise ValueError(f"sweep: unknown config field {name!r}; known fields: {known}")
        if name in _NOT_SWEPT:
            raise ValueError(f"sweep: {name} cannot be swept ({_NOT_SWEPT[name]})")
        if isinstance(values, str | bytes) or not isinstance(values, Sequence):
            raise TypeError(f"sweep[{name!r}] must be a list of values, got {values!r}")
        if not values:
            raise ValueError(f"sweep[{name!r}] must list at least one value, got {values!r}")
        checked = []
        for value in values:
            if name in vmap:
                kind = numbers.Integral if specs[name].type is int else numbers.Real
                if isinstance(value, bool) or not isinstance(value, kind):
                    what = "an integer" if kind is numbers.Integral else "a number"
                    raise TypeError(
                        f"sweep {name}={value!r}: not {what} ({name} is swept under vmap, as "
                        "data of one program, so its values must be numbers)"
                    )
            try:
                checked.append(_fields.check_field(specs[name], metas[name], value))
            except (TypeError, ValueError) as error:
                raise type(error)(f"sweep {name}={value!r}: {error}") from None
        if len(set(map(repr, checked))) < len(checked):
            raise ValueError(f"sweep[{name!r}] repeats a value: {list(values)}")
        axes[name] = tuple(checked)
    points = [dict(zip(axes, combo, strict=True)) for combo in itertools.product(*axes.values())]
    configs = []
    for point in points:
        try:
            point_config = config.replace(**point)
            make_delay_model(point_config)
        except (TypeError, ValueError) as error:
            where = ", ".join(f"{k}={v!r}" for k, v in point.items())
            raise type(error)(f"sweep point {where}: {error}") from None
        configs.append(point_config)
    return axes, points, configs


def _point_data(config: TrainConfig, fields: Sequence[str]) -> dict[str, Any]:
    """The values of one point that enter its program as data (host-side, float32/int32)."""
    data: dict[str, Any] = {}
    for name in fields:
        if name in OPTIMIZER_HYPERPARAMS:
            data[name] = np.float32(getattr(config, name))
    if config.delay in _TABLE_LAWS and {"min_delay", "delay_mean"} & set(fields):
        model = make_delay_model(config)
        data["thresholds"] = delays_lib.table_thresholds(model.pmf)
    if config.delay == "workers":
        if set(_LAW_FIELDS) & set(fields):
            law = _compute_time_law(config)
            data["law"] = tuple(np.float32(p) for p in law.params)
        if "num_slow" in fields:
            data["num_slow"] = np.int32(config.num_slow)
        for name in ("slow_factor", "comm_time"):
            if name in fields:
                data[name] = np.float32(getattr(config, name))
    return data


def _point_program(program: Program, data: Mapping[str, Any]) -> Program:
    """The program of one point inside the traced sweep: its optimizer built from ``data``."""
    config = program.config
    delay = program.delay
    if "thresholds" in data:
        delay = delays_lib.threshold_model(data["thresholds"], name=delay.name)
    elif any(k in data for k in ("law", *_SERVER_FIELDS)):
        concrete = program.delay.compute_time
        law = type(concrete)(*data["law"]) if "law" in data else None
        delay = worker_model(
            config,
            law=law,
            num_slow=data.get("num_slow"),
            slow_factor=data.get("slow_factor"),
            comm_time=data.get("comm_time"),
            max_delay=program.delay.max_delay,
        )
    hyper = {k: data[k] for k in OPTIMIZER_HYPERPARAMS if k in data}
    optimizer = make_optimizer(config, delay, hyper)
    return dataclasses.replace(program, optimizer=optimizer, delay=delay)


def _with_delay(opt_state: Any, delay: delays_lib.DelayModel) -> Any:
    """``opt_state`` whose stale state's static part names ``delay`` (a concrete model)."""

    def swap(leaf: Any) -> Any:
        if isinstance(leaf, transforms.StaleState):
            return leaf._replace(delay=type(leaf.delay)(delay, leaf.delay.history_dtype))
        return leaf

    is_stale = lambda x: isinstance(x, transforms.StaleState)  # noqa: E731
    return jax.tree.map(swap, opt_state, is_leaf=is_stale)


_SWEEP_ENTRIES = CompileCache(max_size=16)


def _entries(program: Program, fields: tuple[str, ...]) -> tuple[Any, Any]:
    """The jitted, vmapped ``init`` and ``chunk`` of a group (cached per program and fields)."""

    def build() -> tuple[Any, Any]:
        def init(data, params, delay_key, data_key):
            state = _point_program(program, data).init_from(params, delay_key, data_key)
            return state._replace(opt_state=_with_delay(state.opt_state, program.delay))

        def chunk(data, state, dataset, length):
            fn = lambda d, s: _point_program(program, d).chunk(s, dataset, length)  # noqa: E731
            return jax.vmap(fn)(data, state)

        return (
            jax.jit(jax.vmap(init)),
            jax.jit(chunk, static_argnums=3, donate_argnums=1),
        )

    return _SWEEP_ENTRIES.get((program, fields), build)


def run_sweep(
    config: TrainConfig,
    sweep: Mapping[str, Sequence[Any]],
    seeds: tuple[int, ...] | None,
    dataset: data_lib.Dataset | None,
    progress: bool,
) -> SweepResult:
    """Runs a checked sweep (see :func:`asgd_jax.train.train`); the loop of its groups."""
    from asgd_jax.train._loop import _append, _chunk_ends, _progress_bar  # noqa: PLC0415

    started = time.perf_counter()
    axes, points, configs = check_sweep(config, sweep)
    vmap = set(vmappable_fields())
    vmapped = tuple(f for f in axes if f in vmap)
    looped = tuple(f for f in axes if f not in vmap)
    datasets: dict[Any, data_lib.Dataset] = {}
    groups: dict[Any, list[int]] = {}
    for i, point_config in enumerate(configs):
        source = (point_config.dataset, point_config.data_dir, point_config.train_size)
        if source not in datasets:
            datasets[source] = (
                load_dataset(point_config)
                if dataset is None
                else fit_dataset(point_config, dataset)
            )
        try:
            check_fits(point_config, datasets[source])
        except ValueError as error:
            where = ", ".join(f"{k}={v!r}" for k, v in points[i].items())
            raise ValueError(f"sweep point {where}: {error}") from None
        common = tuple(getattr(point_config, f) for f in _FIELD_NAMES if f not in vmapped)
        key = (common, make_delay_model(point_config).max_delay, source)
        groups.setdefault(key, []).append(i)

    run_seeds = seeds if seeds is not None else (config.seed,)
    per_point = len(run_seeds)
    results: list[TrainResult | None] = [None] * len(points)
    max_delays = []
    bar = _progress_bar(sum(configs[g[0]].num_steps for g in groups.values()), 0, progress)
    try:
        for (_, max_delay, source), members in groups.items():
            group_started = time.perf_counter()
            group_dataset = datasets[source]
            first = configs[members[0]]
            program = build_program(first, group_dataset)
            init, chunk = _entries(program, vmapped)
            rows = [_point_data(configs[i], vmapped) for i in members]
            data = jax.tree.map(lambda *xs: np.repeat(np.stack(xs), per_point, axis=0), *rows)
            starts = [_start(program, seed) for seed in run_seeds]
            params, delay_keys, data_keys = (
                jax.tree.map(lambda *xs: jnp.concatenate([jnp.stack(xs)] * len(members)), *part)
                for part in zip(*starts, strict=True)
            )
            state = _distinct_buffers(init(data, params, delay_keys, data_keys))
            metrics = _run_metrics(state, 0)
            metrics.update(program.evaluate_model(state.params, group_dataset, True))
            history: dict[str, list] = {}
            _append(history, metrics)
            previous = 0
            for end in _chunk_ends(0, first.num_steps, first.eval_every):
                state, metrics = chunk(data, state, group_dataset, end - previous)
                metrics.update(program.evaluate_model(state.params, group_dataset, True))
                _append(history, metrics)
                if bar is not None:
                    bar.update(end - previous)
                previous = end
            stacked = {k: np.stack([np.asarray(v) for v in vs], -1) for k, vs in history.items()}
            seconds = time.perf_counter() - group_started
            for j, i in enumerate(members):
                rows_of = slice(j * per_point, (j + 1) * per_point)
                results[i] = _point_result(configs[i], seeds, state, stacked, rows_of, seconds)
            max_delays.append(max_delay)
    finally:
        if bar is not None:
            bar.close()
    return SweepResult(
        config=config,
        axes=axes,
        seeds=seeds,
        points=tuple(points),
        results=tuple(results),
        vmapped=vmapped,
        looped=looped,
        groups=tuple(tuple(g) for g in groups.values()),
        max_delays=tuple(max_delays),
        wall_seconds=time.perf_counter() - started,
    )


def _start(program: Program, seed: int) -> tuple[Any, jax.Array, jax.Array]:
    """The initial parameters and the delay and data keys of seed ``seed`` (as a run's)."""
    init_key, delay_key, data_key = _run_keys_jit(jnp.asarray(seed, jnp.int32))
    return program.model.init(init_key, program.dataset_shape[1]), delay_key, data_key


def _point_result(
    config: TrainConfig,
    seeds: tuple[int, ...] | None,
    state: Any,
    history: Mapping[str, np.ndarray],
    rows: slice,
    seconds: float,
) -> TrainResult:
    """One point's :class:`TrainResult` cut from its group's batched state and history."""
    index = rows if seeds is not None else rows.start
    point_state = jax.tree.map(lambda x: x[index], state)
    point_state = point_state._replace(
        opt_state=_with_delay(point_state.opt_state, make_delay_model(config))
    )
    stale = transforms.find_stale_state(point_state.opt_state)
    return TrainResult(
        config=config,
        seeds=seeds,
        state=point_state,
        history={k: v[index] for k, v in history.items()},
        staleness_histogram=np.asarray(stale.metrics.staleness_histogram),
        time_unit="simulated time" if config.uses_worker_clock else "steps",
        wall_seconds=seconds,
    )
