"""asgd_jax against the PyTorch loop a researcher would write for stale gradients.

The same model (the digits MLP, one hidden layer of 64), batch (32), SGD learning rate and
delays τ_t ~ uniform{0..8}, ``--steps`` updates (default 2000), in one process:

  (a) steps/s of ``asgd.stale`` under ``lax.scan`` (train's scanned chunks)
        ÷  steps/s of a PyTorch loop keeping a deque of parameter copies        (reported)
  (b) 16 seeds vmapped in one asgd_jax program, wall time
        vs the PyTorch loop run 16 times: speed-up                             (reported)

The PyTorch loop: per step draw τ, take the parameters of τ updates ago from a deque of
copies (maxlen 9), compute the minibatch gradient there with autograd, apply it to the
current parameters, push a copy. Compilation is excluded on the JAX side (timed apart).
PyTorch is optional: without it the benchmark says so and exits 0.

Usage: python benchmarks/torch_loop.py [--quick] [--steps N] [--seeds S]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import platform
import time

import jax
import numpy as np

from asgd_jax import train as train_lib

RESULTS = pathlib.Path(__file__).parent / "results"
MAX_DELAY = 8


def torch_loop(torch, x, y, steps: int, batch: int, lr: float, seed: int) -> float:
    """Seconds for ``steps`` stale-gradient SGD updates of the MLP in plain PyTorch."""
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    w1 = torch.randn(x.shape[1], 64, generator=gen) * (1.0 / x.shape[1] ** 0.5)
    b1 = torch.zeros(64)
    w2 = torch.randn(64, 10, generator=gen) * (1.0 / 8.0)
    b2 = torch.zeros(10)
    params = [w1, b1, w2, b2]
    history = collections.deque([[p.clone() for p in params]], maxlen=MAX_DELAY + 1)
    loss_fn = torch.nn.functional.cross_entropy
    start = time.perf_counter()
    for _ in range(steps):
        tau = min(int(rng.integers(0, MAX_DELAY + 1)), len(history) - 1)
        stale = [p.detach().clone().requires_grad_(True) for p in history[-1 - tau]]
        idx = torch.from_numpy(rng.integers(0, x.shape[0], batch))
        hidden = torch.relu(x[idx] @ stale[0] + stale[1])
        loss = loss_fn(hidden @ stale[2] + stale[3], y[idx])
        grads = torch.autograd.grad(loss, stale)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p.sub_(lr * g)
        history.append([p.clone() for p in params])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (for run_all)")
    parser.add_argument("--steps", type=int, default=None, help="updates per run")
    parser.add_argument("--seeds", type=int, default=16, help="seeds for (b)")
    args = parser.parse_args()
    try:
        import torch
    except ImportError:
        print("torch_loop: PyTorch is not installed; skipped (pip install torch to measure)")
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "torch_loop.json").write_text(json.dumps({"skipped": "no torch"}) + "\n")
        return
    torch.set_num_threads(1)
    steps = args.steps or (500 if args.quick else 2000)
    config = train_lib.TrainConfig(
        delay="uniform",
        max_delay=MAX_DELAY,
        batch_size=32,
        learning_rate=0.1,
        num_steps=steps,
        eval_every=steps,
    )
    dataset = train_lib.load_dataset(config)
    x = torch.from_numpy(np.asarray(dataset.x_train).reshape(dataset.num_train, -1).copy())
    y = torch.from_numpy(np.asarray(dataset.y_train).astype(np.int64))
    seeds = list(range(args.seeds))

    program = train_lib.build_program(config, dataset)

    def jax_run(batched: bool) -> float:
        chunk = program.compiled("chunk", batched)
        state, _ = program.start(seeds if batched else 0, dataset, batched)
        start = time.perf_counter()
        state, _ = chunk(state, dataset, steps)
        jax.block_until_ready(state)
        return time.perf_counter() - start

    start = time.perf_counter()
    jax_run(False), jax_run(True)  # compile
    compile_s = time.perf_counter() - start
    jax_single = min(jax_run(False) for _ in range(3))
    jax_seeds = min(jax_run(True) for _ in range(2))
    torch_single = min(torch_loop(torch, x, y, steps, 32, 0.1, s) for s in range(2))
    torch_seeds = sum(torch_loop(torch, x, y, steps, 32, 0.1, s) for s in seeds)

    ratio_a = (steps / jax_single) / (steps / torch_single)
    ratio_b = torch_seeds / jax_seeds
    rows = [
        ("(a) stale under lax.scan ÷ PyTorch deque loop, steps/s", f"{ratio_a:.1f}×"),
        ("    asgd_jax steps/s", f"{steps / jax_single:,.0f}"),
        ("    PyTorch loop steps/s", f"{steps / torch_single:,.0f}"),
        (f"(b) {len(seeds)} seeds vmapped vs PyTorch loop × {len(seeds)}", f"{ratio_b:.1f}×"),
        (f"    asgd_jax {len(seeds)} seeds vmapped, s", f"{jax_seeds:.3f}"),
        (f"    PyTorch loop × {len(seeds)}, s", f"{torch_seeds:.2f}"),
        ("    asgd_jax compile (both programs), s", f"{compile_s:.2f}"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"digits MLP(64), batch 32, uniform{{0..{MAX_DELAY}}} delays, {steps} steps")
    for name, value in rows:
        print(f"{name.ljust(width)}  {value:>10}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {
        "ratio_a_steps_per_second": ratio_a,
        "ratio_b_seeds": ratio_b,
        "steps_per_second": {"asgd_jax": steps / jax_single, "torch": steps / torch_single},
        "seconds": {
            "asgd_jax_seeds_vmapped": jax_seeds,
            "torch_seeds_loop": torch_seeds,
            "asgd_jax_compile": compile_s,
        },
        "steps": steps,
        "seeds": len(seeds),
        "torch": torch.__version__,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "backend": jax.default_backend(),
            "jax": jax.__version__,
        },
    }
    (RESULTS / "torch_loop.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS / 'torch_loop.json'}")


if __name__ == "__main__":
    main()
