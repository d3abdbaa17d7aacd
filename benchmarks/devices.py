"""Data-parallel step time on 1, 2, 4 and 8 devices at the same global batch.

Runs :func:`asgd_jax.parallel.shard_map_step` (``scan=True``: many steps per program, state
donated) on a 784-256-10 MLP, for synchronous all-reduce SGD (``optax.sgd``) and stale SGD
(``asgd.stale(optax.sgd, uniform(0, 8))``), on meshes over the first 1, 2, 4 and 8 devices.
On CPU the devices are virtual (``--xla_force_host_platform_device_count=8``) and share the
machine's cores, so more devices cannot be faster; the figure of merit is the overhead of
spreading a step: the 8-device stale step ÷ the 1-device stale step (target ≤ 1.5). Also
times the pmap flavour on all devices.

    .venv/bin/python benchmarks/devices.py            # global batch 1024, 20 steps per call
    .venv/bin/python benchmarks/devices.py --quick    # global batch 1024, 5 steps per call
    .venv/bin/python benchmarks/devices.py --batch 128   # small batch: the all-reduce dominates

Writes ``benchmarks/results/devices.json``.
"""

from __future__ import annotations

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

import argparse  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import asgd_jax as asgd  # noqa: E402
from asgd_jax import parallel  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"
DEVICE_COUNTS = (1, 2, 4, 8)


def mlp_params(key: jax.Array) -> dict:
    k1, k2 = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (784, 256)) * 0.05,
        "b1": jnp.zeros((256,)),
        "w2": jax.random.normal(k2, (256, 10)) * 0.05,
        "b2": jnp.zeros((10,)),
    }


def loss_fn(params: dict, batch: tuple) -> jax.Array:
    x, y = batch
    hidden = jax.nn.relu(x @ params["w1"] + params["b1"])
    logits = hidden @ params["w2"] + params["b2"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def optimizers(max_delay: int) -> dict:
    return {
        "sync": lambda: optax.sgd(0.05),
        "stale": lambda: asgd.stale(optax.sgd(0.05), asgd.delays.uniform(0, max_delay)),
    }


class Runner:
    """One configuration, compiled and warmed up; ``call()`` runs one scanned call."""

    def __init__(self, flavour: str, optimizer: str, devices: int, step, params, state, batch):
        self.flavour, self.optimizer, self.devices = flavour, optimizer, devices
        self._step, self._params, self._state, self._batch = step, params, state, batch
        self.times: list[float] = []
        for _ in range(2):  # compile and warm up
            self.call()

    def call(self) -> float:
        """Seconds of one blocking call (blocking also keeps CPU collectives from piling up)."""
        start = time.perf_counter()
        self._params, self._state, metrics = self._step(self._params, self._state, self._batch)
        jax.block_until_ready(metrics["loss"])
        return time.perf_counter() - start


def shard_map_runner(name, make_tx, num_devices, params0, batches) -> Runner:
    mesh = parallel.data_mesh(num_devices)
    tx = make_tx()
    params, state = parallel.shard_init(tx, params0, mesh)
    step = parallel.shard_map_step(loss_fn, tx, mesh, scan=True)
    placed = parallel.shard_batch(batches, mesh, 1)
    return Runner("shard_map", name, num_devices, step, params, state, placed)


def pmap_runner(name, make_tx, params0, batches) -> Runner:
    tx = make_tx()
    devices = jax.local_devices()
    num_devices = len(devices)
    step = parallel.pmap_step(loss_fn, tx, scan=True, global_batch=False)
    # Split and place the batches once, outside the timed loop, as for shard_map.
    sharding = jax.sharding.NamedSharding(
        jax.sharding.Mesh(np.array(devices), ("d",)), jax.sharding.PartitionSpec("d")
    )
    placed = jax.tree.map(
        lambda a: jax.device_put(
            a.reshape(a.shape[0], num_devices, -1, *a.shape[2:]).swapaxes(0, 1), sharding
        ),
        batches,
    )
    params = parallel.pmap_replicate(params0)
    state = parallel.pmap_replicate(tx.init(params0))
    return Runner("pmap", name, num_devices, step, params, state, placed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (make bench)")
    parser.add_argument("--batch", type=int, default=None, help="global batch size")
    parser.add_argument("--steps", type=int, default=None, help="steps per call (scanned)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls")
    parser.add_argument("--max-delay", type=int, default=8)
    args = parser.parse_args()
    args.batch = args.batch or 1024
    args.steps = args.steps or (5 if args.quick else 20)
    args.repeats = args.repeats or (5 if args.quick else 9)

    key_x, key_y, key_p = jax.random.split(jax.random.key(0), 3)
    x = np.asarray(jax.random.uniform(key_x, (args.steps, args.batch, 784)))
    y = np.asarray(jax.random.randint(key_y, (args.steps, args.batch), 0, 10))
    params0 = jax.tree.map(np.asarray, mlp_params(key_p))

    runners = []
    for name, make_tx in optimizers(args.max_delay).items():
        for num_devices in DEVICE_COUNTS:
            runners.append(shard_map_runner(name, make_tx, num_devices, params0, (x, y)))
        runners.append(pmap_runner(name, make_tx, params0, (x, y)))
    # Interleave the configurations so that load from other processes hits them alike.
    for _ in range(args.repeats):
        for runner in runners:
            runner.times.append(runner.call())
    rows = [
        {
            "flavour": r.flavour,
            "optimizer": r.optimizer,
            "devices": r.devices,
            "step_ms": 1e3 * float(np.median(r.times)) / args.steps,
            "step_ms_min": 1e3 * float(np.min(r.times)) / args.steps,
        }
        for r in runners
    ]

    def step_ms(optimizer, devices, stat):
        for row in rows:
            if (row["flavour"], row["optimizer"], row["devices"]) == (
                "shard_map",
                optimizer,
                devices,
            ):
                return row[stat]
        raise KeyError((optimizer, devices))

    ratios = {}
    for stat, suffix in (("step_ms", "median"), ("step_ms_min", "min")):
        ratios[f"stale_8_over_1_{suffix}"] = step_ms("stale", 8, stat) / step_ms("stale", 1, stat)
        ratios[f"sync_8_over_1_{suffix}"] = step_ms("sync", 8, stat) / step_ms("sync", 1, stat)
        ratios[f"stale_over_sync_8_{suffix}"] = step_ms("stale", 8, stat) / step_ms("sync", 8, stat)

    print(
        f"global batch {args.batch}, {args.steps} steps per call, {args.repeats} interleaved "
        "calls per configuration"
    )
    print(f"{'flavour':10s} {'optimizer':9s} {'devices':>7s} {'step ms':>9s} {'min ms':>8s}")
    for row in rows:
        print(
            f"{row['flavour']:10s} {row['optimizer']:9s} {row['devices']:7d} "
            f"{row['step_ms']:9.3f} {row['step_ms_min']:8.3f}"
        )
    for name, value in ratios.items():
        print(f"{name:28s} {value:6.2f}")
    verdict = "met" if ratios["stale_8_over_1_median"] <= 1.5 else "MISSED"
    print(f"target: stale_8_over_1 (median) ≤ 1.5 -> {verdict}")

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {
        "machine": {
            "platform": platform.platform(),
            "backend": jax.default_backend(),
            "devices": jax.device_count(),
            "cpu_count": os.cpu_count(),
        },
        "config": {
            "model": "mlp 784-256-10",
            "global_batch": args.batch,
            "steps_per_call": args.steps,
            "repeats": args.repeats,
            "max_delay": args.max_delay,
            "quick": args.quick,
        },
        "rows": rows,
        "ratios": ratios,
        "target_stale_8_over_1": 1.5,
    }
    (RESULTS / "devices.json").write_text(json.dumps(out, indent=2))
    print(f"wrote {RESULTS / 'devices.json'}")


if __name__ == "__main__":
    main()
