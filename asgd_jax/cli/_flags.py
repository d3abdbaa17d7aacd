"""Flags: the config flags generated from :meth:`TrainConfig.schema`, and the shared ones.

Every ``TrainConfig`` field becomes ``--field-name``, in the field's group, with its help,
choices, range and default; nothing here restates the schema.
"""

from __future__ import annotations

import argparse
import os
import typing
from collections.abc import Callable
from typing import Any

from asgd_jax import train as train_lib

__all__ = [
    "EXIT_FAILURE",
    "EXIT_USAGE",
    "Parser",
    "UsageError",
    "add_common_flags",
    "add_config_flags",
    "check_target",
    "config_from_args",
    "seeds_of",
    "sweep_axes",
    "sweep_values",
]

EXIT_USAGE = 2
EXIT_FAILURE = 1


class UsageError(Exception):
    """A problem with the command line or the configuration it describes (exit status 2)."""


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (no usage dump), exit status 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _fields() -> dict[str, train_lib.ConfigField]:
    return {spec.name: spec for spec in train_lib.TrainConfig.schema()}


def _value_parser(spec: train_lib.ConfigField) -> Callable[[str], Any]:
    """Parses one flag value for a config field (``none`` for an optional field)."""
    base = spec.type

    def parse(text: str) -> Any:
        if spec.optional and text.strip().lower() == "none":
            return None
        if typing.get_origin(base) is tuple:
            try:
                return tuple(int(v) for v in text.split(",") if v.strip())
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"expected comma-separated integers, got {text!r}"
                ) from None
        if base is bool:
            word = text.strip().lower()
            if word in ("true", "yes", "1", "on"):
                return True
            if word in ("false", "no", "0", "off"):
                return False
            raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
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


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per ``TrainConfig`` field, grouped as the schema groups them."""
    groups = {
        key: parser.add_argument_group(title) for key, title in train_lib.CONFIG_GROUPS.items()
    }
    for spec in train_lib.TrainConfig.schema():
        default = spec.default
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        notes = [spec.range] if spec.range else []
        if default is not None:
            notes.append(f"default: {shown}")
        kwargs: dict[str, Any] = {
            "dest": spec.name,
            "default": argparse.SUPPRESS,
            "type": _value_parser(spec),
            "help": spec.help + (f" ({'; '.join(notes)})" if notes else ""),
        }
        if spec.choices:
            kwargs["choices"] = spec.choices
            kwargs["metavar"] = "{" + ",".join(spec.choices) + "}"
        else:
            kwargs["metavar"] = spec.name.upper()
        groups[spec.group].add_argument("--" + spec.name.replace("_", "-"), **kwargs)


def config_from_args(args: argparse.Namespace) -> train_lib.TrainConfig:
    """The TrainConfig of ``args``: the CONFIG file (if any), overridden by explicit flags."""
    flags = {name: getattr(args, name) for name in _fields() if hasattr(args, name)}
    path = getattr(args, "config", None)
    try:
        if path is None:
            return train_lib.TrainConfig.from_dict(flags)
        if not os.path.isfile(path):
            raise UsageError(f"config file {path} does not exist")
        return train_lib.TrainConfig.from_json(path, **flags)
    except OSError as error:
        raise UsageError(f"cannot read config file {path}: {error}") from None
    except (TypeError, ValueError) as error:
        raise UsageError(f"invalid configuration: {error}") from None


def sweep_values(field: str, text: str) -> list[Any]:
    """The values of ``--values`` for the config field ``--over`` names."""
    fields = _fields()
    if field not in fields:
        raise UsageError(f"--over / --sweep must name a config field, got {field!r}")
    parse = _value_parser(fields[field])
    values = []
    for item in text.split(";") if field == "hidden_sizes" else text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            values.append(parse(item))
        except argparse.ArgumentTypeError as error:
            raise UsageError(f"values of {field}: {error}") from None
    if not values:
        raise UsageError(f"the values of {field} must list at least one value")
    return values


def sweep_axes(
    over: str | None, values: str | None, items: list[str] | None
) -> dict[str, list[Any]]:
    """The axes of a sweep: ``--over FIELD --values V1,V2`` and each ``--sweep FIELD=V1,V2``."""
    axes: dict[str, list[Any]] = {}
    if (over is None) != (values is None):
        raise UsageError("--over FIELD and --values V1,V2,... go together (or use --sweep)")
    if over is not None:
        axes[over] = sweep_values(over, values)
    for item in items or []:
        field, sep, text = item.partition("=")
        field = field.strip().replace("-", "_")
        if not sep or not field:
            raise UsageError(f"--sweep takes FIELD=V1,V2,..., got {item!r}")
        if field in axes:
            raise UsageError(f"{field} is swept twice (--over / --sweep)")
        axes[field] = sweep_values(field, text)
    if not axes:
        raise UsageError("sweep needs --over FIELD --values V1,V2,... or --sweep FIELD=V1,V2,...")
    return axes


def seeds_of(first: int, num_seeds: int) -> tuple[int, ...] | None:
    """``--seeds N`` as the seeds first … first+N−1 (``None``: one seed needs no vmap)."""
    if num_seeds < 1:
        raise UsageError(f"--seeds must be >= 1, got {num_seeds}")
    return None if num_seeds == 1 else tuple(range(first, first + num_seeds))


def check_target(target: float | None) -> None:
    if target is not None and not 0 < target <= 1:
        raise UsageError(f"--target must be an accuracy in (0, 1], got {target}")


def add_common_flags(parser: argparse.ArgumentParser, *, target: float | None) -> None:
    """``--out``, ``--overwrite``, ``--quiet`` and ``--target``."""
    parser.add_argument(
        "--out", metavar="DIR", help="output directory (default: ./runs/<timestamp>)"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="write into an existing, non-empty output directory (discarding its checkpoints)",
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
