"""Throughput of the jitted parameter-server simulation against a plain-Python event loop.

For n = 8, 64, 512 workers (asynchronous protocol, exponential compute times) it measures,
in one run:
  (a) updates/s of ``asgd_jax.workers.simulate`` with ``method="events"`` (one jitted
      ``lax.scan``, one cluster) and with ``method="sorted"`` (no event loop: per-worker
      prefix sums of cycle times and one sort of all arrivals, what ``"auto"`` picks here);
  (b) updates/s of the same scan vmapped over a batch of independent clusters (seeds);
  (c) updates/s of a ``heapq`` event loop in plain Python with the same semantics, fed the
      same cycle times (``asgd_jax.workers.cycle_times``) and checked to produce the same
      staleness sequence;
then (a) and (b) again in a fresh process with XLA's small-while-loop pass allowed to compile
the whole event loop into one kernel (a process-wide XLA flag), and the ratios to (c)
(target ≥ 20× at n = 64). The event loop costs O(n) per update (a masked minimum over the n
next-finish times), the sorted path O(log N) per update (a comparator sort of N ≈ 1.2·updates
finish times), the heap O(log n).

Usage: python benchmarks/workers.py [--quick] [--batch B] [--repeats R] [--no-flag-run]
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

import jax
import numpy as np

from asgd_jax import workers

RESULTS = pathlib.Path(__file__).parent / "results"


def heap_event_loop(table: list[list[float]], num_updates: int, max_staleness: int | None = None):
    """The asynchronous parameter server as a ``heapq`` event loop (same semantics).

    ``table[c][i]`` is worker i's c-th cycle time. Ties in arrival time go to the lowest
    worker id (tuple order); a gradient staler than ``max_staleness`` is dropped and the
    worker re-pulls. Returns the staleness, time and worker of every applied update.
    """
    n = len(table[0])
    heap = [(table[0][i], i) for i in range(n)]
    heapq.heapify(heap)
    pulled = [0] * n
    clock = [0] * n
    staleness, times, worker_ids = [], [], []
    version = 0
    while version < num_updates:
        now, j = heapq.heappop(heap)
        tau = version - pulled[j]
        clock[j] += 1
        if max_staleness is None or tau <= max_staleness:
            version += 1
            staleness.append(tau)
            times.append(now)
            worker_ids.append(j)
        pulled[j] = version
        heapq.heappush(heap, (now + table[clock[j]][j], j))
    return staleness, times, worker_ids


def best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


SMALL_LOOP_FLAG = "--xla_backend_extra_options=xla_cpu_small_while_loop_byte_threshold=1000000000"


def jax_rates(n: int, num_updates: int, batch: int, repeats: int) -> dict:
    """Updates/s of one simulated cluster and of ``batch`` clusters vmapped together."""
    model = workers.parameter_server(n, workers.exponential(1.0), max_delay=40 * n)
    key = jax.random.key(0)
    run = lambda method: workers.simulate(model, key, num_updates, method=method).staleness
    single = lambda: jax.block_until_ready(run("events"))
    fast = lambda: jax.block_until_ready(run("sorted"))
    keys = jax.random.split(key, batch)
    batch_updates = max(num_updates // batch, 200)
    many = jax.jit(
        jax.vmap(lambda k: workers.simulate(model, k, batch_updates, method="events").staleness)
    )
    batched = lambda: jax.block_until_ready(many(keys))
    single()
    fast()
    batched()
    return {
        "updates_per_s_jax": num_updates / best_of(single, repeats),
        "updates_per_s_jax_sorted": num_updates / best_of(fast, repeats),
        "updates_per_s_jax_batched": batch * batch_updates / best_of(batched, repeats),
    }


def heap_rate(n: int, num_updates: int, repeats: int) -> dict:
    """Updates/s of the heapq loop on the simulation's own cycle times, and agreement."""
    model = workers.parameter_server(n, workers.exponential(1.0), max_delay=40 * n)
    key = jax.random.key(0)
    num_cycles = int(2.5 * num_updates / n) + 64
    table = np.asarray(workers.cycle_times(model, key, num_cycles), np.float64).tolist()
    reference, _, _ = heap_event_loop(table, num_updates)
    # Float32 relative clocks (event loop) and float64 absolute clocks (Python) may order a
    # near-tie differently, after which the sequences diverge: report how many leading
    # updates agree. The sorted path sums in double-float (~48 bits), like float64.
    out = {}
    for method in ("events", "sorted"):
        simulated = np.asarray(workers.simulate(model, key, num_updates, method=method).staleness)
        mismatch = np.flatnonzero(simulated != np.asarray(reference))
        out[f"identical_{method}"] = int(mismatch[0]) if mismatch.size else num_updates
    seconds = best_of(lambda: heap_event_loop(table, num_updates), repeats)
    return {"updates_per_s_heapq": num_updates / seconds, **out}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (make bench)")
    parser.add_argument("--batch", type=int, default=256, help="clusters in the vmapped run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-flag-run", action="store_true", help="skip the XLA-flag rerun")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    updates = 50_000 if args.quick else 200_000
    sizes = (8, 64, 512)
    if args.child:
        rates = {n: jax_rates(n, updates, args.batch, args.repeats) for n in sizes}
        print(json.dumps(rates))
        return

    rows = []
    for n in sizes:
        row = {"num_workers": n, "num_updates": updates, "batch": args.batch}
        row.update(heap_rate(n, updates, args.repeats))
        row.update(jax_rates(n, updates, args.batch, args.repeats))
        rows.append(row)
    if not args.no_flag_run:
        # The same measurement with XLA's small-while-loop pass allowed to compile the whole
        # event loop into one kernel (a process-wide flag, so in a fresh process).
        env = dict(os.environ)
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + SMALL_LOOP_FLAG).strip()
        cmd = [sys.executable, __file__, "--child", "--batch", str(args.batch)]
        cmd += ["--repeats", str(args.repeats)] + (["--quick"] if args.quick else [])
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
        flagged = json.loads(out.strip().splitlines()[-1])
        for row in rows:
            extra = flagged[str(row["num_workers"])]
            row["updates_per_s_jax_flag"] = extra["updates_per_s_jax"]
            row["updates_per_s_jax_sorted_flag"] = extra["updates_per_s_jax_sorted"]
            row["updates_per_s_jax_batched_flag"] = extra["updates_per_s_jax_batched"]
    for row in rows:
        heap = row["updates_per_s_heapq"]
        for name in list(row):
            if name.startswith("updates_per_s_jax"):
                row["ratio" + name[len("updates_per_s") :]] = row[name] / heap

    columns = [
        ("heapq", "updates_per_s_heapq"),
        ("jax", "updates_per_s_jax"),
        ("sorted", "updates_per_s_jax_sorted"),
        ("jax+flag", "updates_per_s_jax_flag"),
        ("batched", "updates_per_s_jax_batched"),
        ("batched+flag", "updates_per_s_jax_batched_flag"),
    ]
    print(
        "updates per second (ratio to heapq); one process, machine load "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    print(
        f"{'n':>4} "
        + " ".join(f"{title:>20}" for title, _ in columns)
        + f" {'same(ev)':>9} {'same(so)':>9}"
    )
    for row in rows:
        cells = []
        for _, key in columns:
            if key not in row:
                cells.append(f"{'-':>20}")
                continue
            ratio = row[key] / row["updates_per_s_heapq"]
            cells.append(f"{row[key]:>11.3g} ({ratio:>5.1f}x)")
        print(
            f"{row['num_workers']:>4} "
            + " ".join(cells)
            + f" {row['identical_events']:>9d} {row['identical_sorted']:>9d}"
        )
    by_n = {r["num_workers"]: r for r in rows}
    growth = {key: by_n[8][key] / by_n[512][key] for _, key in columns[1:] if key in by_n[8]}
    print(
        "cost per update, n = 512 vs n = 8: "
        + ", ".join(f"{k[len('updates_per_s_') :]} {v:.1f}x" for k, v in growth.items())
    )
    result = {
        "benchmark": "workers",
        "quick": args.quick,
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "load_average": os.getloadavg(),
            "jax": jax.__version__,
            "backend": jax.default_backend(),
        },
        "target": "jax / heapq >= 20 at n = 64",
        "flag": SMALL_LOOP_FLAG,
        "rows": rows,
        "cost_growth_512_vs_8": growth,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "workers.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {RESULTS / 'workers.json'}")


if __name__ == "__main__":
    main()
