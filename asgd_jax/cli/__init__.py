"""The ``asgd-jax`` command: ``demo``, ``run`` and ``sweep`` on :func:`asgd_jax.train.train`,
and ``hogwild`` on :func:`asgd_jax.hogwild.train`.

* ``asgd-jax demo`` trains one model on the bundled digits four ways on the same simulated
  cluster (n workers, some of them stragglers): synchronous SGD (every round waits for all
  n), asynchronous SGD, staleness-aware ASGD and DC-ASGD (the runs of
  :func:`asgd_jax.experiments.demo_configs`). It prints a table (final test accuracy,
  simulated wall-clock time to a target accuracy, mean / max staleness) and writes
  ``demo.png`` (accuracy against simulated time, staleness histogram) and ``demo.json``
  (every number) to the output directory.
* ``asgd-jax run [CONFIG.json] [--field value ...]`` trains any configuration: a JSON file of
  :class:`asgd_jax.train.TrainConfig` fields, overridden by flags of the same names.
* ``asgd-jax sweep --sweep FIELD=v1,v2,... [--sweep ...]`` (or ``--over FIELD --values
  v1,v2,...``) trains the grid of values: fields that do not change shapes (learning rate,
  delay and worker-law parameters, ...) run together with the seeds in one compiled program;
  the others (``num_workers``, ``max_delay``, ...) loop, one compile each.
* ``asgd-jax hogwild`` trains with real asynchronous workers (threads, or Ray actors with
  ``--backend ray``) and compares the measured staleness with the worker simulator's
  prediction for the measured worker speeds.

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
