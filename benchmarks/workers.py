"""Throughput of the jitted parameter-server simulation against a plain-Python event loop.

For n = 8, 64, 512, 10,000 workers (asynchronous protocol, exponential compute times) it
measures, in one run:
  (a) updates/s of ``asgd_jax.workers.simulate`` with ``method="events"`` (the blocked
      event loop, one cluster), ``method="events_reference"`` (one arrival per scan step,
      O(n) each) and ``method="sorted"`` (no event loop: per-worker running sums of cycle
      times and one sort of all arrivals, what the default ``"auto"`` picks for long runs); all
      three give bitwise the same records;
  (b) updates/s of the event loop vmapped over a batch of independent clusters (seeds);
  (c) updates/s of a ``heapq`` event loop in plain Python with the same semantics, fed the
      same cycle times (``asgd_jax.workers.cycle_times``) and checked to produce the same
      staleness sequence;
then (a) and (b) again in a fresh process with XLA's small-while-loop pass allowed to compile
whole event loops into one kernel (a process-wide XLA flag), and the ratios to (c) (target
≥ 20× at n = 64, ≥ 10× at n = 10,000). At n = 10,000 every loop runs a fifth of the updates
(per-update rates compare); compile time is reported apart. The reference loop costs O(n)
per update, the blocked loop O(1) per arrival on 8 candidates plus a top-k over n per block,
the sorted path O(log N) per update (one int32 sort and a binary search), the heap O(log n).

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


#: The heapq loop (and its agreement check) at n = 10,000 runs fewer updates; rates compare
#: per-update costs.
HEAP_UPDATES_LARGE = 50_000

SMALL_LOOP_FLAG = "--xla_backend_extra_options=xla_cpu_small_while_loop_byte_threshold=1000000000"


def jax_rates(n: int, num_updates: int, batch: int, repeats: int) -> dict:
    """Updates/s of one simulated cluster per method, and of ``batch`` clusters vmapped.

    Compilation is timed apart: ``compile_s_*`` is the first call minus the best run.
    """
    model = workers.parameter_server(n, workers.exponential(1.0), max_delay=40 * n)
    key = jax.random.key(0)
    out = {}
    for label, method in (
        ("jax", "events"),
        ("jax_reference", "events_reference"),
        ("jax_sorted", "sorted"),
    ):
        run = lambda method=method: jax.block_until_ready(
            workers.simulate(model, key, num_updates, method=method).staleness
        )
        start = time.perf_counter()
        run()
        first = time.perf_counter() - start
        seconds = best_of(run, repeats)
        out[f"updates_per_s_{label}"] = num_updates / seconds
        out[f"compile_s_{label}"] = max(first - seconds, 0.0)
    keys = jax.random.split(key, batch)
    batch_updates = max(num_updates // batch, 200)
    many = jax.jit(
        jax.vmap(lambda k: workers.simulate(model, k, batch_updates, method="events").staleness)
    )
    batched = lambda: jax.block_until_ready(many(keys))
    batched()
    out["updates_per_s_jax_batched"] = batch * batch_updates / best_of(batched, repeats)
    return out


def heap_rate(n: int, num_updates: int, repeats: int) -> dict:
    """Updates/s of the heapq loop on the simulation's own cycle times, and agreement."""
    model = workers.parameter_server(n, workers.exponential(1.0), max_delay=40 * n)
    key = jax.random.key(0)
    num_updates = min(num_updates, HEAP_UPDATES_LARGE) if n > 1000 else num_updates
    num_cycles = int(2.5 * num_updates / n) + 64
    table = np.asarray(workers.cycle_times(model, key, num_cycles), np.float64).tolist()
    reference, _, _ = heap_event_loop(table, num_updates)
    # The simulation's double-float clocks (~48 bits) and Python's float64 sums order the
    # arrivals alike unless two are within ~2⁻⁴⁸ relative: report how many leading
    # updates agree (all of them, in every run so far).
    out = {}
    for method in ("events", "sorted"):
        simulated = np.asarray(workers.simulate(model, key, num_updates, method=method).staleness)
        mismatch = np.flatnonzero(simulated != np.asarray(reference))
        out[f"identical_{method}"] = int(mismatch[0]) if mismatch.size else num_updates
    seconds = best_of(lambda: heap_event_loop(table, num_updates), repeats)
    return {"updates_per_s_heapq": num_updates / seconds, "heapq_updates": num_updates, **out}


def _updates(n: int, updates: int) -> int:
    """Updates per run: the event loops at n = 10,000 run a fifth (per-update rates compare)."""
    return updates // 5 if n > 1000 else updates


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (make bench)")
    parser.add_argument("--batch", type=int, default=256, help="clusters in the vmapped run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-flag-run", action="store_true", help="skip the XLA-flag rerun")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    updates = 50_000 if args.quick else 200_000
    sizes = (8, 64, 512, 10_000)
    if args.child:
        rates = {n: jax_rates(n, _updates(n, updates), args.batch, args.repeats) for n in sizes}
        print(json.dumps(rates))
        return

    rows = []
    for n in sizes:
        row = {"num_workers": n, "num_updates": _updates(n, updates), "batch": args.batch}
        row.update(heap_rate(n, _updates(n, updates), args.repeats))
        row.update(jax_rates(n, _updates(n, updates), args.batch, args.repeats))
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
            row["updates_per_s_jax_reference_flag"] = extra["updates_per_s_jax_reference"]
            row["updates_per_s_jax_sorted_flag"] = extra["updates_per_s_jax_sorted"]
            row["updates_per_s_jax_batched_flag"] = extra["updates_per_s_jax_batched"]
    for row in rows:
        heap = row["updates_per_s_heapq"]
        for name in list(row):
            if name.startswith("updates_per_s_jax"):
                row["ratio" + name[len("updates_per_s") :]] = row[name] / heap

    columns = [
        ("heapq", "updates_per_s_heapq"),
        ("events", "updates_per_s_jax"),
        ("events_reference", "updates_per_s_jax_reference"),
        ("sorted", "updates_per_s_jax_sorted"),
        ("events+flag", "updates_per_s_jax_flag"),
        ("reference+flag", "updates_per_s_jax_reference_flag"),
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
    growth = {key: by_n[8][key] / by_n[10_000][key] for _, key in columns if key in by_n[8]}
    print(
        "compile seconds (events / reference / sorted): "
        + "; ".join(
            f"n={r['num_workers']}: {r['compile_s_jax']:.1f} / {r['compile_s_jax_reference']:.1f}"
            f" / {r['compile_s_jax_sorted']:.1f}"
            for r in rows
        )
    )
    print(
        "cost per update, n = 10,000 vs n = 8: "
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
        "target": "jax / heapq >= 20 at n = 64 and >= 10 at n = 10,000",
        "flag": SMALL_LOOP_FLAG,
        "rows": rows,
        "cost_growth_10000_vs_8": growth,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "workers.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {RESULTS / 'workers.json'}")


if __name__ == "__main__":
    main()
