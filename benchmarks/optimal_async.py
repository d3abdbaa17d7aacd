"""Simulated time to a target loss: synchronous SGD, ASGD, delay-adaptive ASGD, Rennala, Ringmaster.

The headline comparison of Tyurin & Richtárik (NeurIPS 2023, arXiv 2305.12387) and Maranjyan,
Tyurin & Richtárik (ICML 2025, arXiv 2501.16168) in the fixed computation model: worker i
needs τ_i seconds per gradient, on two heterogeneous profiles,

* ``sqrt``: τ_i = 1 + √i (the papers' profile), and
* ``stragglers``: most workers at τ = 1, a few at τ = 50,

and two problems: a noisy quadratic (f = ½ Σ h_j x_j², gradients with Gaussian noise) and
logistic regression on the bundled digits. Every method is a worker protocol of
``asgd_jax.workers.parameter_server`` driving ``asgd_jax.stale`` through the core contract
``asgd_jax.make_step``: ``k_sync`` (synchronous SGD, all n gradients per step), ``async``
(ASGD), ``async`` with ``scale_by_staleness("delay_adaptive")`` (Koloskova et al. 2022),
``rennala`` (S gradients at the current point per step) and ``ringmaster`` (threshold R,
with calculation stops). S = R range over ``asgd_jax.theory.ringmaster_threshold`` for the
problem's noise and target (capped at n) and a few smaller values; the best is kept. Each
method runs a grid of learning rates (vmapped) for the same simulated time budget; the
time to target is the first simulated time at which the loss is below the target, for the
best learning rate. The theory's predicted orders
(``asgd_jax.theory.time_complexities``) are printed next to the measured times.

``--quick`` (under a minute on two cores) runs 16 workers on the quadratic (``--problems``
picks the problems), with shorter budgets, one value of S = R and every other learning
rate.
Writes ``results/optimal_async.json`` and ``results/optimal_async.png``.

Usage: python benchmarks/optimal_async.py [--quick] [--problems quadratic digits] [--output DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import asgd_jax as asgd
from asgd_jax import theory, workers

RESULTS = pathlib.Path(__file__).parent / "results"
METHODS = ("synchronous", "asgd", "delay_adaptive", "rennala", "ringmaster")
SIZED = ("rennala", "ringmaster")  # methods with a batch size S / threshold R


def profiles(quick: bool) -> dict[str, np.ndarray]:
    n = 16 if quick else 32
    slow = np.ones(n, np.float32)
    slow[-3:] = 50.0
    return {"sqrt": (1.0 + np.sqrt(np.arange(1, n + 1))).astype(np.float32), "stragglers": slow}


def quadratic(dim: int = 32, noise: float = 0.2) -> dict:
    h = np.geomspace(0.05, 1.0, dim).astype(np.float32)
    x0 = np.ones(dim, np.float32)
    key = jax.random.key(11)

    def loss(params, batch):  # the gradient of one example is h·x + noise·ξ
        return 0.5 * jnp.sum(h * params**2) + noise * jnp.mean(batch @ params)

    def batch(t, k):
        return jax.random.normal(jax.random.fold_in(key, t), (k, dim))

    f0 = float(0.5 * np.sum(h * x0**2))
    return dict(
        name="quadratic",
        params=jnp.asarray(x0),
        loss=loss,
        batch=batch,
        evaluate=lambda p: 0.5 * jnp.sum(h * p**2),
        target=0.05 * f0,
        lrs=np.geomspace(1.0, 1 / 256, 9),
        eval_every=1,
        # Constants for the theory: L = h_max, Δ = f0, σ² = noise²·dim, and ‖∇f‖² ≥ 2μ f
        # (PL) turns the loss target into ε = 2·h_min·target.
        smoothness=float(h.max()),
        gap=f0,
        noise_variance=noise**2 * dim,
        epsilon=2.0 * float(h.min()) * 0.05 * f0,
    )


def digits(per_gradient: int = 16) -> dict:
    dataset = asgd.data.load("digits")
    model = asgd.models.logistic_regression(dataset.num_classes)
    x = jnp.asarray(dataset.x_train)
    y = jnp.asarray(dataset.y_train)
    key = jax.random.key(12)
    num = x.shape[0]

    def batch(t, k):
        idx = jax.random.randint(jax.random.fold_in(key, t), (k * per_gradient,), 0, num)
        return x[idx], y[idx]

    return dict(
        name="digits",
        params=model.init(jax.random.key(0), dataset.input_shape),
        loss=model.loss,
        batch=batch,
        evaluate=lambda p: model.loss(p, (x, y)),
        target=0.35,
        lrs=np.geomspace(4.0, 1 / 32, 8),
        eval_every=8,
        smoothness=1.0,
        gap=math.log(10),
        noise_variance=1.0,
        epsilon=0.1,
    )


def worker_model(method: str, taus: np.ndarray, batch_size: int):
    speeds = 1.0 / taus.astype(np.float64)
    n = taus.size
    if method == "synchronous":
        return workers.parameter_server(n, 1.0, speeds=speeds, protocol="k_sync")
    if method in ("asgd", "delay_adaptive"):
        return workers.parameter_server(n, 1.0, speeds=speeds)
    if method == "rennala":
        return workers.parameter_server(n, 1.0, speeds=speeds, protocol="rennala", k=batch_size)
    return workers.parameter_server(
        n, 1.0, speeds=speeds, protocol="ringmaster", threshold=batch_size, stops=True
    )


def best_run(problem: dict, method: str, taus: np.ndarray, sizes: list[int], budget: float):
    """``run`` for every S = R in ``sizes`` (Rennala, Ringmaster; once otherwise): the best."""
    grid = sizes if method in SIZED else sizes[:1]
    runs = [run(problem, method, taus, size, budget) for size in grid]
    best = min(runs, key=lambda r: r["time_to_target"])
    best["time_to_target_by_size"] = {
        str(s): r["time_to_target"] for s, r in zip(grid, runs, strict=True)
    }
    best["wall_seconds"] = sum(r["wall_seconds"] for r in runs)
    return best


def run(problem: dict, method: str, taus: np.ndarray, batch_size: int, budget: float) -> dict:
    model = worker_model(method, taus, batch_size)
    per_update = float(workers.simulate(model, jax.random.key(0), 64).time[-1]) / 64
    every = problem["eval_every"]
    blocks = max(1, math.ceil(budget / per_update / every))
    k = model.k if method in ("synchronous", "rennala") else 1  # gradients per update

    def one(lr):
        inner = optax.sgd(lr)
        if method == "delay_adaptive":
            rule = asgd.transforms.scale_by_staleness("delay_adaptive", concurrency=taus.size)
            inner = optax.chain(inner, rule)
        tx = asgd.stale(inner, delay=model, seed=0)
        step = asgd.make_step(problem["loss"], tx)

        def update(carry, t):
            params, state = carry
            clock = asgd.delay_report(state)["time"]  # the arrival that delivers update t
            params, state, _ = step(params, state, problem["batch"](t, k))
            return (params, state), clock

        def block(carry, b):
            carry, clocks = jax.lax.scan(update, carry, b * every + jnp.arange(every))
            return carry, (clocks[-1], problem["evaluate"](carry[0]))

        carry = (problem["params"], tx.init(problem["params"]))
        return jax.lax.scan(block, carry, jnp.arange(blocks))[1]

    start = time.perf_counter()
    clocks, losses = jax.jit(jax.vmap(one))(jnp.asarray(problem["lrs"], jnp.float32))
    clocks, losses = np.asarray(clocks, np.float64), np.asarray(losses, np.float64)
    seconds = time.perf_counter() - start
    below = np.where(np.isfinite(losses), losses, np.inf) <= problem["target"]
    hit = np.where(below.any(axis=1), clocks[np.arange(len(clocks)), below.argmax(axis=1)], np.inf)
    best = int(np.argmin(hit))
    return {
        "model": model.name,
        "batch_size_or_threshold": batch_size,
        "gradients_per_update": k,
        "updates": blocks * every,
        "time_to_target": float(hit[best]),
        "learning_rate": float(problem["lrs"][best]),
        "curve_time": clocks[best].tolist(),
        "curve_loss": losses[best].tolist(),
        "wall_seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (under a minute)")
    parser.add_argument("--output", type=pathlib.Path, default=RESULTS)
    parser.add_argument(
        "--problems",
        nargs="+",
        choices=("quadratic", "digits"),
        help="default: both (only the quadratic with --quick)",
    )
    args = parser.parse_args()
    names = args.problems or (["quadratic"] if args.quick else ["quadratic", "digits"])
    problems = [{"quadratic": quadratic, "digits": digits}[name]() for name in names]
    if args.quick:  # every other learning rate of the grid
        for problem in problems:
            problem["lrs"] = problem["lrs"][::2]
    budget = {
        "quadratic": 400.0 if args.quick else 1_500.0,
        "digits": 150.0 if args.quick else 600.0,
    }
    results = []
    for problem in problems:
        for profile, taus in profiles(args.quick).items():
            constants = dict(
                smoothness=problem["smoothness"],
                initial_gap=problem["gap"],
                noise_variance=problem["noise_variance"],
                epsilon=problem["epsilon"],
            )
            # S = R: the theory's max{1, ⌈σ²/ε⌉} (capped at n), and a few smaller ones.
            balanced = theory.ringmaster_threshold(problem["noise_variance"], problem["epsilon"])
            top = min(taus.size, balanced)
            sizes = sorted({top, max(1, top // 2), max(1, top // 4)}, reverse=True)
            if args.quick:
                sizes = sizes[1:2] or sizes
            orders = theory.time_complexities(taus, **constants)
            row = {
                "problem": problem["name"],
                "profile": profile,
                "num_workers": int(taus.size),
                "batch_sizes_and_thresholds": sizes,
                "balanced_threshold": balanced,
                "target": problem["target"],
                "theory_orders": orders,
                "num_fastest": theory.time_to_epsilon(taus, **constants).num_fastest,
                "methods": {},
            }
            for method in METHODS:
                r = best_run(problem, method, taus, sizes, budget[problem["name"]])
                row["methods"][method] = r
                size = f", S=R={r['batch_size_or_threshold']}" if method in SIZED else ""
                print(
                    f"{problem['name']:>9} {profile:>10} {method:>14}: time to target "
                    f"{r['time_to_target']:9.1f}  (lr {r['learning_rate']:.4g}{size}, "
                    f"{r['updates']} updates, {r['wall_seconds']:.1f} s)",
                    flush=True,
                )
            print(
                f"{'':>9} {'':>10} theory orders (no constants): "
                + ", ".join(f"{k} {v:.3g}" for k, v in orders.items()),
                flush=True,
            )
            results.append(row)
    args.output.mkdir(parents=True, exist_ok=True)
    out = args.output / "optimal_async.json"
    out.write_text(json.dumps({"quick": args.quick, "results": results}, indent=2))
    print(f"wrote {out}")
    plot(results, args.output / "optimal_async.png")


def plot(results: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.4), squeeze=False)
    for ax, row in zip(axes[0], results, strict=True):
        for method, r in row["methods"].items():
            ax.plot(r["curve_time"], r["curve_loss"], label=method)
        ax.axhline(row["target"], color="k", lw=0.8, ls=":")
        ax.set_yscale("log")
        ax.set_title(f"{row['problem']}, {row['profile']} (n={row['num_workers']})", fontsize=9)
        ax.set_xlabel("simulated time")
    axes[0][0].set_ylabel("loss")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
