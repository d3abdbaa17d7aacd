"""Seeds under vmap, and the scanned loop against a per-step Python loop.

Both through asgd_jax.train on the demo's asynchronous run (an MLP on the bundled digits,
8 simulated workers, 2 of them stragglers), measured in one process after compilation:

  (a) wall time of 16 seeds in one vmapped run  ÷  16 sequential runs        (target ≤ 0.2)
  (b) steps/s of the scanned loop (jitted chunks of `eval_every` steps)
        ÷  steps/s of a Python loop calling the same jitted, donated step     (reported)

(a) times whole `train()` calls, evaluations included; compile times are reported apart.
(b) times the training steps alone: the scanned chunks (`Program.compiled("chunk")`) against
`Program.compiled("step")` called once per step, with a device sync at the end of each.

Usage: python benchmarks/seeds.py [--quick] [--steps N] [--seeds S] [--repeats R]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import time

import jax

from asgd_jax import train as train_lib
from asgd_jax.experiments import demo_configs

RESULTS = pathlib.Path(__file__).parent / "results"


def best_of(repeats: int, fn) -> float:
    """The fastest of ``repeats`` wall-clock timings of ``fn()`` (seconds)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (for make bench)")
    parser.add_argument("--steps", type=int, default=None, help="updates per run")
    parser.add_argument("--seeds", type=int, default=16, help="seeds (default 16)")
    parser.add_argument("--repeats", type=int, default=None, help="timings per measurement")
    args = parser.parse_args()
    steps = args.steps or (400 if args.quick else 2000)
    repeats = args.repeats or (2 if args.quick else 3)
    eval_every = 100
    steps = max(eval_every, steps // eval_every * eval_every)

    config = demo_configs()["ASGD"].replace(num_steps=steps, eval_every=eval_every)
    dataset = train_lib.load_dataset(config)
    seeds = list(range(args.seeds))

    # ---- (a) vmapped seeds against sequential runs (first calls compile).
    start = time.perf_counter()
    train_lib.train(config, dataset=dataset, progress=False)
    compile_single = time.perf_counter() - start
    start = time.perf_counter()
    train_lib.train(config, seeds=seeds, dataset=dataset, progress=False)
    compile_vmapped = time.perf_counter() - start

    def sequential():
        for seed in seeds:
            train_lib.train(config.replace(seed=seed), dataset=dataset, progress=False)

    def vmapped():
        train_lib.train(config, seeds=seeds, dataset=dataset, progress=False)

    sequential_s = best_of(repeats, sequential)
    vmapped_s = best_of(repeats, vmapped)
    ratio_a = vmapped_s / sequential_s

    # ---- (b) the scanned loop against a per-step Python loop over the same jitted step.
    program = train_lib.build_program(config, dataset)
    chunk = program.compiled("chunk", False)
    step = program.compiled("step", False)

    def scanned():
        state, _ = program.start(config.seed, dataset, batched=False)
        for _ in range(steps // eval_every):
            state, _ = chunk(state, dataset, eval_every)
        jax.block_until_ready(state)

    def per_step():
        state, _ = program.start(config.seed, dataset, batched=False)
        for _ in range(steps):
            state = step(state, dataset)
        jax.block_until_ready(state)

    scanned(), per_step()  # compile
    scanned_s = best_of(repeats, scanned)
    per_step_s = best_of(repeats, per_step)
    ratio_b = (steps / scanned_s) / (steps / per_step_s)

    rows = [
        ("(a) 16 seeds vmapped ÷ 16 sequential runs", f"{ratio_a:.3f}", "≤ 0.2"),
        ("    sequential runs, total s", f"{sequential_s:.2f}", ""),
        ("    one vmapped run, s", f"{vmapped_s:.2f}", ""),
        ("    first single run (compiles), s", f"{compile_single:.2f}", ""),
        ("    first vmapped run (compiles), s", f"{compile_vmapped:.2f}", ""),
        ("(b) scanned steps/s ÷ per-step loop steps/s", f"{ratio_b:.2f}", "reported"),
        ("    scanned steps/s", f"{steps / scanned_s:,.0f}", ""),
        ("    per-step Python loop steps/s", f"{steps / per_step_s:,.0f}", ""),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"seeds: {len(seeds)}, steps/run: {steps}, eval every {eval_every}, best of {repeats}")
    print(f"{'measure'.ljust(width)}  {'value':>10}  target")
    for name, value, target in rows:
        print(f"{name.ljust(width)}  {value:>10}  {target}")

    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {
        "ratio_a_vmapped_over_sequential": ratio_a,
        "ratio_b_scanned_over_per_step": ratio_b,
        "seconds": {
            "sequential_runs": sequential_s,
            "vmapped_run": vmapped_s,
            "first_single_run": compile_single,
            "first_vmapped_run": compile_vmapped,
            "scanned_steps": scanned_s,
            "per_step_loop": per_step_s,
        },
        "steps_per_second": {"scanned": steps / scanned_s, "per_step": steps / per_step_s},
        "targets": {"a": 0.2},
        "seeds": len(seeds),
        "steps": steps,
        "eval_every": eval_every,
        "repeats": repeats,
        "config": config.to_dict(),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "backend": jax.default_backend(),
            "jax": jax.__version__,
        },
    }
    (RESULTS / "seeds.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS / 'seeds.json'}")


if __name__ == "__main__":
    main()
