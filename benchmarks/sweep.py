"""A whole sweep in one compiled program against a loop of train() calls.

5 learning rates × 4 delay means × 8 seeds on the digits MLP (geometric delays at a fixed
max_delay), both through asgd_jax.train, in one process, compilation included:

  (a) wall time of train(config, sweep={learning_rate, delay_mean}, seeds=8)
        ÷  wall time of the 20 train(point_config, seeds=8) calls           (target ≤ 0.25)

Each side starts cold: the loop's 20 configurations are 20 programs (the learning rate and
the delay law are constants of each), the sweep's is one. The first measurement of each side
is the one reported (compiles included; a run of another model size starts the process up
first); a second, warm timing is reported apart.

Usage: python benchmarks/sweep.py [--quick] [--steps N]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import time

import jax
import numpy as np

from asgd_jax import train as train_lib

RESULTS = pathlib.Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (for run_all)")
    parser.add_argument("--steps", type=int, default=None, help="updates per run")
    args = parser.parse_args()
    steps = args.steps or (200 if args.quick else 1000)
    eval_every = 100
    steps = max(eval_every, steps // eval_every * eval_every)
    rates = [0.02, 0.05, 0.1, 0.2, 0.4]
    means = [1.0, 2.0, 4.0, 8.0]
    seeds = list(range(8))
    config = train_lib.TrainConfig(
        delay="geometric",
        delay_mean=1.0,
        max_delay=32,
        num_steps=steps,
        eval_every=eval_every,
    )
    dataset = train_lib.load_dataset(config)
    sweep = {"learning_rate": rates, "delay_mean": means}

    # Process start-up (backend, first jit) is paid by neither side: a run of another model.
    warm_up = config.replace(hidden_sizes=(32,), num_steps=eval_every)
    train_lib.train(warm_up, sweep={"learning_rate": [0.1]}, seeds=[0], dataset=dataset)
    start = time.perf_counter()
    swept = train_lib.train(config, sweep=sweep, seeds=seeds, dataset=dataset, progress=False)
    sweep_s = time.perf_counter() - start

    def loop() -> list:
        return [
            train_lib.train(config.replace(**point), seeds=seeds, dataset=dataset, progress=False)
            for point in swept.points
        ]

    start = time.perf_counter()
    looped = loop()
    loop_s = time.perf_counter() - start
    start = time.perf_counter()
    train_lib.train(config, sweep=sweep, seeds=seeds, dataset=dataset, progress=False)
    sweep_warm = time.perf_counter() - start
    start = time.perf_counter()
    loop()
    loop_warm = time.perf_counter() - start

    gap = max(
        float(np.max(np.abs(a.history["test_accuracy"] - b.history["test_accuracy"])))
        for a, b in zip(swept.results, looped, strict=True)
    )
    same_tau = all(
        np.array_equal(a.staleness_histogram, b.staleness_histogram)
        for a, b in zip(swept.results, looped, strict=True)
    )
    ratio = sweep_s / loop_s
    rows = [
        ("(a) one sweep program ÷ 20 train calls (cold)", f"{ratio:.3f}", "≤ 0.25"),
        ("    sweep, s (compiles included)", f"{sweep_s:.2f}", ""),
        ("    20 train calls, s (compiles included)", f"{loop_s:.2f}", ""),
        ("    warm: sweep ÷ loop", f"{sweep_warm / loop_warm:.3f}", "reported"),
        ("    warm sweep, s", f"{sweep_warm:.2f}", ""),
        ("    warm loop, s", f"{loop_warm:.2f}", ""),
        ("    max |Δ test accuracy| sweep vs loop", f"{gap:.2g}", ""),
        ("    staleness histograms identical", str(same_tau), ""),
    ]
    width = max(len(r[0]) for r in rows)
    print(
        f"{len(rates)} learning rates × {len(means)} delay means × {len(seeds)} seeds, "
        f"{steps} steps, eval every {eval_every}; {swept.describe()}"
    )
    print(f"{'measure'.ljust(width)}  {'value':>10}  target")
    for name, value, target in rows:
        print(f"{name.ljust(width)}  {value:>10}  {target}")

    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {
        "ratio_sweep_over_loop": ratio,
        "ratio_warm": sweep_warm / loop_warm,
        "seconds": {
            "sweep": sweep_s,
            "loop": loop_s,
            "sweep_warm": sweep_warm,
            "loop_warm": loop_warm,
        },
        "max_test_accuracy_difference": gap,
        "staleness_histograms_identical": same_tau,
        "programs": swept.num_programs,
        "targets": {"ratio": 0.25},
        "learning_rates": rates,
        "delay_means": means,
        "seeds": len(seeds),
        "steps": steps,
        "eval_every": eval_every,
        "config": config.to_dict(),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "backend": jax.default_backend(),
            "jax": jax.__version__,
        },
    }
    (RESULTS / "sweep.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS / 'sweep.json'}")


if __name__ == "__main__":
    main()
