"""The schema of :class:`~asgd_jax.train.TrainConfig` fields: metadata, type, range, checks.

A field's metadata is the single source of what it means: its ``group`` (the CLI's flag
groups), its ``help``, its ``choices`` or range (``low``, ``strict``, ``high``,
``high_open``), and its ``role`` — what changing it changes:

* ``"program"``: the compiled program and the trajectory (most fields);
* ``"data"``: which examples are loaded (the trajectory, not the program: the dataset
  enters the program through its shapes);
* ``"seed"``: the trajectory, not the program;
* ``"length"``: how far the run goes (``num_steps``; a longer run extends a shorter one);
* ``"checkpoint"``: how the run is saved (neither the program nor the trajectory).

and how a sweep over it runs (``sweep``, read by :func:`asgd_jax.train.train`'s ``sweep=``
and by ``asgd-jax sweep``):

* ``"vmap"``: the field is a number that enters the program as data (a learning rate, a
  delay law's mean at a fixed ``max_delay``), so every value of a sweep runs in one compiled
  program, vmapped together with the seeds;
* ``"loop"``: the field changes shapes or code (model size, ``max_delay``, batch size,
  protocol, optimizer kind) or the data: one compiled program per value, in a loop.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from asgd_jax._validation import check_min_int, check_real

__all__ = [
    "CONFIG_GROUPS",
    "ROLES",
    "SWEEP_MODES",
    "ConfigField",
    "check_field",
    "config_field",
    "split_optional",
]

# The field groups, in order, with the title the CLI gives each.
CONFIG_GROUPS = {
    "data": "data",
    "model": "model",
    "optimizer": "optimizer",
    "delays": "delay model",
    "workers": "simulated workers (delay=workers)",
    "run": "steps, evaluation and checkpoints",
}
ROLES = ("program", "data", "seed", "length", "checkpoint")
SWEEP_MODES = ("vmap", "loop")


class ConfigField(NamedTuple):
    """One field of :class:`~asgd_jax.train.TrainConfig` as its consumers (the CLI) read it."""

    name: str
    type: Any  # bool, int, float, str or tuple[int, ...]
    optional: bool  # whether None is allowed
    default: Any
    group: str  # a key of CONFIG_GROUPS
    role: str  # one of ROLES
    help: str
    choices: tuple[str, ...] | None
    range: str  # allowed range in interval notation, e.g. "(0, ∞)"; "" if none
    sweep: str = "loop"  # one of SWEEP_MODES: how a sweep over the field runs


def config_field(
    default: Any,
    help: str,
    *,
    group: str,
    role: str = "program",
    choices: tuple[str, ...] | None = None,
    low: float | None = None,
    strict: bool = False,
    high: float | None = None,
    high_open: bool = False,
    sweep: str = "loop",
) -> Any:
    """A ``dataclasses.field`` carrying the schema metadata (see the module docstring)."""
    assert group in CONFIG_GROUPS and role in ROLES and sweep in SWEEP_MODES, (group, role, sweep)
    metadata = {"help": help, "group": group, "role": role, "choices": choices, "low": low}
    metadata.update(strict=strict, high=high, high_open=high_open, sweep=sweep)
    return dataclasses.field(default=default, metadata=metadata)


def describe_range(meta: Mapping[str, Any]) -> str:
    """A field's allowed range in interval notation, e.g. ``"(0, ∞)"`` (``""`` if none)."""
    low, high = meta["low"], meta["high"]
    if low is None:
        return ""
    left = "(" if meta["strict"] else "["
    right = "∞)" if high is None else f"{high:g}{')' if meta['high_open'] else ']'}"
    return f"{left}{low:g}, {right}"


def split_optional(hint: Any) -> tuple[Any, bool]:
    """``(base type, optional)`` of a field's type hint, e.g. ``int | None`` → ``(int, True)``."""
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    return base, optional


def schema(fields: Sequence[dataclasses.Field], hints: Mapping[str, Any]) -> tuple:
    """The :class:`ConfigField` of every dataclass field, in order."""
    return tuple(
        ConfigField(
            f.name,
            *split_optional(hints[f.name]),
            f.default,
            f.metadata["group"],
            f.metadata["role"],
            f.metadata["help"],
            f.metadata["choices"],
            describe_range(f.metadata),
            f.metadata["sweep"],
        )
        for f in fields
    )


def check_field(spec: ConfigField, meta: Mapping[str, Any], value: Any) -> Any:
    """Checks one field's type and range from its metadata; returns the normalised value."""
    name, base = spec.name, spec.type
    if value is None:
        if spec.optional:
            return value
        raise TypeError(f"{name} must not be None")
    if typing.get_origin(base) is tuple:
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise TypeError(f"{name} must be a list of ints, got {value!r}")
        return tuple(check_min_int(f"{name}[{i}]", v, meta["low"]) for i, v in enumerate(value))
    if base is bool:
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be true or false, got {value!r}")
        return value
    if base is str:
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a string, got {value!r}")
        if spec.choices and value not in spec.choices:
            raise ValueError(f"{name} must be one of {', '.join(spec.choices)}; got {value!r}")
        return value
    if base is int:
        return check_min_int(name, value, meta["low"])
    if base is float:
        value = check_real(name, value, low=meta["low"], strict=meta["strict"], high=meta["high"])
        if meta["high_open"] and value >= meta["high"]:
            raise ValueError(f"`{name}` must be in {spec.range}, got {value}.")
        return value
    raise TypeError(f"unsupported config field type {base!r} for {name}")  # pragma: no cover
