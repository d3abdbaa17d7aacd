"""The ``asgd-jax`` command: ``demo``, ``run`` and ``sweep``, all on :func:`asgd_jax.train.train`.

* ``asgd-jax demo`` trains one model on the bundled digits four ways on the same simulated
  cluster (n workers, some of them stragglers): synchronous SGD (every round waits for all
  n), asynchronous SGD, staleness-aware ASGD and DC-ASGD (the runs of
  :func:`asgd_jax.experiments.demo_configs`). It prints a table (final test accuracy,
  simulated wall-clock time to a target accuracy, mean / max staleness) and writes
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

import sys
from collections.abc import Sequence

from asgd_jax.experiments.demo import demo_configs

__all__ = ["demo_configs", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``asgd-jax`` command line; returns the exit status."""
    from asgd_jax.cli._commands import build_parser
    from asgd_jax.cli._flags import EXIT_FAILURE, EXIT_USAGE, UsageError
    from asgd_jax.train import CheckpointError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except UsageError as error:
        print(f"asgd-jax {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"asgd-jax {args.command}: interrupted", file=sys.stderr)
        return 130
    except (CheckpointError, OSError) as error:
        print(f"asgd-jax {args.command}: error: {error}", file=sys.stderr)
        return EXIT_FAILURE
