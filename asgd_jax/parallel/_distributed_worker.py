"""A small multi-process run of :mod:`asgd_jax.parallel`, used to check multi-host setups.

``python -m asgd_jax.parallel._distributed_worker OUT.npz`` (started N times, e.g. by
:func:`asgd_jax.parallel.launch_local`) joins the processes with
:func:`asgd_jax.parallel.initialize`, trains a tiny least-squares model across every
process's devices (synchronous all-reduce SGD and stale SGD), and process 0 writes the
results. :func:`experiment` runs the same computation on any mesh, so
a one-process run over as many devices must give the same numbers.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from asgd_jax import delays, parallel
from asgd_jax.transforms import stale

NUM_STEPS = 4
NUM_FEATURES = 3


def _loss(params: dict, batch: tuple) -> jax.Array:
    x, y = batch
    return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


def _data(num_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic regression problem (a fixed formula, the same in every process)."""
    rows = np.arange(num_rows, dtype=np.float64)[:, None]
    cols = np.arange(NUM_FEATURES, dtype=np.float64)[None, :]
    x = np.sin(1.0 + 0.7 * rows + 1.3 * cols)
    y = x @ np.array([1.0, -2.0, 0.5]) + 0.1 * np.cos(rows[:, 0])
    return x.astype(np.float32), y.astype(np.float32)


def experiment(mesh: jax.sharding.Mesh) -> dict[str, np.ndarray]:
    """Trains on ``mesh`` (one axis) and returns host arrays of the results."""
    axis = mesh.axis_names[0]
    num_devices = int(mesh.shape[axis])
    params = {"w": np.zeros(NUM_FEATURES, np.float32), "b": np.zeros((), np.float32)}
    x, y = _data(NUM_STEPS * 2 * num_devices)
    batches = (x.reshape(NUM_STEPS, -1, NUM_FEATURES), y.reshape(NUM_STEPS, -1))
    results: dict[str, np.ndarray] = {}

    runs = {
        "sync": optax.sgd(0.1),
        "stale": stale(optax.sgd(0.1), delays.uniform(0, 3), seed=7),
    }
    for name, tx in runs.items():
        p, s = parallel.shard_init(tx, params, mesh, axis_name=axis)
        step = parallel.shard_map_step(_loss, tx, mesh, axis_name=axis, scan=True)
        p, s, metrics = step(p, s, parallel.shard_batch(batches, mesh, 1, axis_name=axis))
        for key, value in parallel.fetch({**p, **metrics}).items():
            results[f"{name}_{key}"] = value

    return results


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        print("usage: python -m asgd_jax.parallel._distributed_worker OUT.npz", file=sys.stderr)
        return 2
    parallel.initialize()
    try:
        results = experiment(parallel.data_mesh())
        if jax.process_index() == 0:
            np.savez(argv[0], num_processes=jax.process_count(), **results)
        print(f"process {jax.process_index()}: {jax.device_count()} devices, done")
    finally:
        jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
