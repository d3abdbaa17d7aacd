"""Overhead of the stale wrapper on a 784-256-10 MLP at batch 128 (jit, donated state).

Prints, measured in one run:
  (a) step time of stale(optax.sgd) with K = 8  ÷  plain optax.sgd        (target ≤ 1.05)
  (b) step time at K = 128  ÷  K = 1                                      (target ≤ 1.10)
  (c) optimizer-state bytes ÷ ((K + 1) · parameter bytes), K = 8          (target ≤ 1.01)

Every variant runs the library's step, ``asgd_jax.make_step(loss_fn, tx)`` (the gradient at
the stale snapshot when ``tx`` has one), jitted with the parameters and state donated.

Usage: python benchmarks/overhead.py [--quick] [--steps N] [--repeats R] [--output PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import asgd_jax as asgd

RESULTS = pathlib.Path(__file__).parent / "results"


def mlp_params(key):
    k1, k2 = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (784, 256)) * 0.05,
        "b1": jnp.zeros((256,)),
        "w2": jax.random.normal(k2, (256, 10)) * 0.05,
        "b2": jnp.zeros((10,)),
    }


def loss_fn(params, x, y):
    h = jax.nn.relu(x @ params["w1"] + params["b1"])
    logits = h @ params["w2"] + params["b2"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def build_step(tx):
    """The library's step (gradient at the stale point when ``tx`` has one), jitted, donated."""
    return jax.jit(asgd.make_step(loss_fn, tx), donate_argnums=(0, 1))


def nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


class Runner:
    """Holds one variant's params/state so variants can be timed in interleaved rounds."""

    def __init__(self, tx, x, y):
        self.params = mlp_params(jax.random.key(0))
        self.state = tx.init(self.params)
        self.step = build_step(tx)
        self.x, self.y = x, y
        self.times: list[float] = []
        self.run(3)  # compile and warm up

    def run(self, steps):
        params, state = self.params, self.state
        start = time.perf_counter()
        for _ in range(steps):
            params, state, _ = self.step(params, state, self.x, self.y)
        jax.block_until_ready(params)
        elapsed = (time.perf_counter() - start) / steps
        self.params, self.state = params, state
        return elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (for make bench)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument(
        "--output", type=pathlib.Path, default=RESULTS / "overhead.json", help="JSON path"
    )
    args = parser.parse_args()
    steps = args.steps or (100 if args.quick else 300)
    repeats = args.repeats or (5 if args.quick else 15)

    x = jax.random.uniform(jax.random.key(1), (128, 784))
    y = jax.random.randint(jax.random.key(2), (128,), 0, 10)
    variants = {
        "plain_sgd": Runner(optax.sgd(0.01), x, y),
        "stale_K8": Runner(asgd.stale(optax.sgd(0.01), asgd.delays.uniform(0, 8)), x, y),
        "stale_K1": Runner(asgd.stale(optax.sgd(0.01), asgd.delays.uniform(0, 1)), x, y),
        "stale_K128": Runner(asgd.stale(optax.sgd(0.01), asgd.delays.uniform(0, 128)), x, y),
    }
    # Interleave the variants round by round so machine noise hits all of them alike; the
    # median of the rounds is the figure.
    for _ in range(repeats):
        for runner in variants.values():
            runner.times.append(runner.run(steps))
    ms = {name: 1e3 * float(np.median(r.times)) for name, r in variants.items()}

    params = mlp_params(jax.random.key(0))
    k = 8
    state = asgd.stale(optax.sgd(0.01), asgd.delays.uniform(0, k)).init(params)
    ratio_a = ms["stale_K8"] / ms["plain_sgd"]
    ratio_b = ms["stale_K128"] / ms["stale_K1"]
    ratio_c = nbytes(state) / ((k + 1) * nbytes(params))

    rows = [
        ("(a) stale K=8 / plain sgd, step time", ratio_a, 1.05),
        ("(b) K=128 / K=1, step time", ratio_b, 1.10),
        ("(c) state bytes / ((K+1) param bytes)", ratio_c, 1.01),
    ]
    print(f"MLP 784-256-10, batch 128, jax {jax.__version__}, {jax.default_backend()}")
    for name, value in ms.items():
        print(f"  {name:<12} {value:8.3f} ms/step")
    for label, value, target in rows:
        flag = "ok" if value <= target else "MISSED"
        print(f"{label:<42} {value:6.3f}  (target ≤ {target:.2f})  {flag}")

    out = {
        "ms_per_step": ms,
        "ratio_a_stale_over_plain": ratio_a,
        "ratio_b_k128_over_k1": ratio_b,
        "ratio_c_state_bytes": ratio_c,
        "targets": {"a": 1.05, "b": 1.10, "c": 1.01},
        "steps": steps,
        "repeats": repeats,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "backend": jax.default_backend(),
            "jax": jax.__version__,
        },
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
