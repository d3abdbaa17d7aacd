"""SDDE theory vs simulation: wall-clock time to a loss level as the number of workers grows.

For each cluster size n it runs ``asgd_jax.stale(optax.sgd(η), delay=workers.parameter_server
(n, law))`` on several seeds, reads the simulated wall clock of every update from
``workers.simulate`` (the same key drives the run's staleness), and records the time at which
the loss gap falls below ε for good. Next to it: the predictions of ``asgd_jax.theory``
(``predict`` with the exact discrete recursion and with the SDDE, the optimum n* and the first
diverging n from ``optimal_num_workers``), computed from the Hessian spectrum and the
compute-time law alone (Yu, Chen & Poor, arXiv 2406.11159).

Experiments (fixed learning rate, compute time 1 + Exponential(mean 0.25) per gradient):

* ``quadratic``: ½ Σ h_i x_i² with a known spectrum;
* ``classifier``: L2-regularised softmax regression on Gaussian blobs generated in code,
  full-batch gradients; its Hessian spectrum at the optimum feeds the theory;
* ``exponential`` (not with ``--quick``): the quadratic with memoryless compute times, where
  the mean dynamics never diverge but runs do: the mean-square (second-moment) radius of the
  discrete recursion predicts it.

Checked claims (in the JSON): more workers are not always faster (the simulated time has an
interior minimum); a little staleness barely slows training (updates needed to reach ε with
n = 2..4 workers vs 1); a lot diverges (every seed diverges beyond the predicted boundary;
the classifier's loss, whose curvature falls away from the optimum, may oscillate without
blowing up instead: it then never reaches ε, reported separately).

Usage: python benchmarks/sdde_validation.py [--quick] [--seeds S]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import asgd_jax as asgd  # noqa: E402
from asgd_jax import theory, workers  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"
LAW = workers.shifted_exponential(1.0, 0.25)


# --------------------------------------------------------------------------------------------
# Problems.


def quadratic_problem():
    eigenvalues = np.array([0.05, 0.2, 0.5, 1.0])
    x0 = np.ones_like(eigenvalues)
    h = jnp.asarray(eigenvalues, jnp.float32)
    loss = lambda w: 0.5 * jnp.sum(h * w * w)
    return {
        "name": "quadratic",
        "loss": loss,
        "w0": jnp.asarray(x0, jnp.float32),
        "optimum_loss": 0.0,
        "eigenvalues": eigenvalues,
        "initial_point": x0,
    }


def classifier_problem(num_points=600, dim=8, num_classes=3, l2=0.02):
    """Softmax regression on Gaussian blobs; its Hessian at the optimum, in float64 NumPy."""
    key_means, key_points, key_labels = jax.random.split(jax.random.key(7), 3)
    means = 1.5 * jax.random.normal(key_means, (num_classes, dim))
    labels = jax.random.randint(key_labels, (num_points,), 0, num_classes)
    features = means[labels] + jax.random.normal(key_points, (num_points, dim))
    size = dim * num_classes + num_classes

    def loss(w):
        weights, bias = w[: dim * num_classes].reshape(dim, num_classes), w[dim * num_classes :]
        logits = features @ weights + bias
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return nll + 0.5 * l2 * jnp.sum(w * w)

    # The optimum by Newton's method (strongly convex), then the Hessian spectrum there.
    grad_fn, hess_fn = jax.jit(jax.grad(loss)), jax.jit(jax.hessian(loss))
    w = np.zeros(size)
    for _ in range(12):
        grad = np.asarray(grad_fn(jnp.asarray(w, jnp.float32)), np.float64)
        hess = np.asarray(hess_fn(jnp.asarray(w, jnp.float32)), np.float64)
        w = w - np.linalg.solve(0.5 * (hess + hess.T), grad)
    w_star = jnp.asarray(w, jnp.float32)
    hess = np.asarray(hess_fn(w_star), np.float64)
    hess = 0.5 * (hess + hess.T)
    optimum_loss = float(loss(w_star))
    eigenvalues, vectors = np.linalg.eigh(hess)
    return {
        "name": "classifier",
        "loss": loss,
        "w0": jnp.zeros(size, jnp.float32),
        "optimum_loss": optimum_loss,
        "eigenvalues": eigenvalues,
        "initial_point": vectors.T @ (0.0 - w),
    }


# --------------------------------------------------------------------------------------------
# Simulation.


def simulate_runs(problem, model, learning_rate, steps, seeds):
    """Loss after every update and its simulated wall-clock time, for each seed."""
    tx = asgd.stale(optax.sgd(learning_rate), delay=model)
    loss = problem["loss"]

    def one(key):
        w = problem["w0"]
        state = asgd.reseed(tx.init(w), key)

        def body(carry, _):
            w, state = carry
            grads = jax.grad(loss)(asgd.stale_params(state, w))
            updates, state = tx.update(grads, state, w)
            w = optax.apply_updates(w, updates)
            return (w, state), loss(w)

        losses = jax.lax.scan(body, (w, state), None, length=steps)[1]
        return losses, workers.simulate(model, key, steps).time

    keys = jax.random.split(jax.random.key(0), seeds)
    losses, times = jax.jit(jax.vmap(one))(keys)
    return np.asarray(losses, np.float64), np.asarray(times, np.float64)


def settle_time(gaps, times, epsilon):
    """Per seed: (time, updates) from which the loss gap stays ≤ ε to the end, or (inf, inf).

    A run that dips below ε and then oscillates back above (an unstable mode growing from a
    small amplitude) does not count as having reached ε.
    """
    out_t, out_u = [], []
    for gap, clock in zip(gaps, times, strict=True):
        if not gap[-1] <= epsilon:
            out_t.append(math.inf)
            out_u.append(math.inf)
            continue
        above = np.nonzero(~(gap <= epsilon))[0]
        index = above[-1] + 1 if above.size else 0
        out_t.append(float(clock[index]))
        out_u.append(float(index + 1))
    return np.array(out_t), np.array(out_u)


def run_experiment(problem, law, learning_rate, epsilon, grid, seeds, *, moments=("first",)):
    h = problem["eigenvalues"]
    kwargs = dict(initial_point=problem["initial_point"])
    start = time.perf_counter()
    predicted = {}
    for method, moment in [("discrete", m) for m in moments] + [("sdde", "first")]:
        result = theory.optimal_num_workers(
            learning_rate, h, law, epsilon, num_workers=grid, method=method, moment=moment, **kwargs
        )
        label = method if moment == "first" else f"{method}_{moment}_moment"
        predicted[label] = result
    theory_seconds = time.perf_counter() - start
    print(f"{problem['name']} ({law.name}): theory in {theory_seconds:.1f} s", flush=True)

    rows = []
    start = time.perf_counter()
    reference = predicted["discrete" if "first" in moments else f"discrete_{moments[0]}_moment"]
    initial_gap = float(problem["loss"](problem["w0"])) - problem["optimum_loss"]
    for i, (n, pred) in enumerate(zip(grid, reference.predictions, strict=True)):
        # Budget: 4x the slowest prediction; 6000 updates where any predicts no convergence.
        updates_needed = max(res.times[i] for res in predicted.values()) * pred.update_rate
        steps = 6000 if not math.isfinite(updates_needed) else int(min(4 * updates_needed, 30000))
        steps = max(steps, 1500)
        model = workers.parameter_server(int(n), law, max_delay=max(12 * int(n), 8))
        losses, times = simulate_runs(problem, model, learning_rate, steps, seeds)
        print(
            f"  {problem['name']}: n={int(n)} simulated ({steps} updates x {seeds} seeds)",
            flush=True,
        )
        gaps = losses - problem["optimum_loss"]
        hit_time, hit_updates = settle_time(gaps, times, epsilon)
        final = gaps[:, -1]
        diverged = ~np.isfinite(final) | (final > 10 * initial_gap)
        rows.append(
            {
                "num_workers": int(n),
                "steps": steps,
                "simulated_time_median": float(np.median(hit_time)),
                "simulated_time_min": float(np.min(hit_time)),
                "simulated_time_max": float(np.max(hit_time)),
                "simulated_updates_median": float(np.median(hit_updates)),
                "fraction_diverged": float(np.mean(diverged)),
                "fraction_reached": float(np.mean(np.isfinite(hit_time))),
                "simulated_update_rate": float(np.median((steps - 1) / times[:, -1])),
                **{
                    f"predicted_time_{label}": float(res.times[i])
                    for label, res in predicted.items()
                },
                "predicted_update_rate": pred.update_rate,
            }
        )
    sim_seconds = time.perf_counter() - start

    sim_times = np.array([r["simulated_time_median"] for r in rows])
    sim_best = int(grid[int(np.argmin(sim_times))])
    fully_diverged = [r["num_workers"] for r in rows if r["fraction_diverged"] == 1.0]
    never = [r["num_workers"] for r in rows if r["fraction_reached"] == 0.0]
    one = rows[0]["simulated_updates_median"]
    small = {
        r["num_workers"]: r["simulated_updates_median"] / one
        for r in rows
        if 2 <= r["num_workers"] <= 4
    }  # updates (not time) needed with a little staleness, relative to n = 1
    best_time = float(np.min(sim_times))
    later = [r for r in rows if r["num_workers"] > sim_best]
    claims = {
        "more_workers_not_always_faster": bool(
            later and max(r["simulated_time_median"] for r in later) > 1.5 * best_time
        ),
        "small_staleness_updates_ratio": small,
        "small_staleness_barely_slows": bool(small and max(small.values()) < 1.15),
        "large_staleness_diverges": bool(fully_diverged),
        "large_staleness_never_reaches_epsilon": bool(never),
    }
    summary = {
        label: {
            "optimal_num_workers": res.num_workers,
            "time_to_epsilon": res.time_to_epsilon,
            "divergence_num_workers": res.divergence_num_workers,
        }
        for label, res in predicted.items()
    }
    return {
        "problem": problem["name"],
        "compute_time": law.name,
        "learning_rate": learning_rate,
        "epsilon": epsilon,
        "eigenvalue_range": [float(h.min()), float(h.max())],
        "num_eigenvalues": int(h.size),
        "seeds": seeds,
        "predicted": summary,
        "simulated": {
            "optimal_num_workers": sim_best,
            "time_to_epsilon": best_time,
            "first_fully_diverged_num_workers": min(fully_diverged) if fully_diverged else None,
            "first_never_converged_num_workers": min(never) if never else None,
        },
        "claims": claims,
        "rows": rows,
        "theory_seconds": theory_seconds,
        "simulation_seconds": sim_seconds,
    }


# --------------------------------------------------------------------------------------------
# Report.


def plot(results, path):
    fig, axes = plt.subplots(1, len(results), figsize=(6.2 * len(results), 4.6), squeeze=False)
    styles = {
        "discrete": ("C0", "-", "theory: discrete recursion"),
        "discrete_second_moment": ("C2", "-", "theory: discrete, mean-square"),
        "sdde": ("C1", "--", "theory: SDDE"),
    }
    for ax, res in zip(axes[0], results, strict=True):
        rows = res["rows"]
        n = np.array([r["num_workers"] for r in rows])
        for label in res["predicted"]:
            color, ls, text = styles[label]
            pred = np.array([r[f"predicted_time_{label}"] for r in rows])
            ok = np.isfinite(pred)
            ax.plot(n[ok], pred[ok], color=color, ls=ls, lw=1.8, label=text)
        med = np.array([r["simulated_time_median"] for r in rows])
        lo = np.array([r["simulated_time_min"] for r in rows])
        hi = np.array([r["simulated_time_max"] for r in rows])
        ok = np.isfinite(med)
        err = np.vstack(
            [med[ok] - lo[ok], np.where(np.isfinite(hi[ok]), hi[ok], med[ok]) - med[ok]]
        )
        ax.errorbar(n[ok], med[ok], yerr=err, fmt="ko", ms=4, capsize=2, label="simulated (median)")
        top = np.nanmax(med[ok]) * 1.6 if ok.any() else 1.0
        div = np.array([r["fraction_diverged"] for r in rows]) > 0.5
        stuck = ~ok & ~div
        if div.any():
            ax.plot(n[div], np.full(div.sum(), top), "rx", ms=8, label="simulated: diverged")
        if stuck.any():
            label = "simulated: ε not reached"
            ax.plot(n[stuck], np.full(stuck.sum(), top), "r^", ms=6, mfc="none", label=label)
        for label, info in res["predicted"].items():
            color = styles[label][0]
            best, n_div = info["optimal_num_workers"], info["divergence_num_workers"]
            if best is not None:
                ax.axvline(best, color=color, ls=":", lw=1.2, label=f"{label}: n* = {best}")
            if n_div is not None:
                text = f"{label}: diverges from n = {n_div}"
                ax.axvline(n_div, color=color, ls="-.", lw=1.2, label=text)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("number of workers n")
        ax.set_ylabel(f"wall-clock time to loss gap ≤ {res['epsilon']:g}")
        ax.set_title(f"{res['problem']}: {res['compute_time']}, η = {res['learning_rate']:.3g}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(res):
    labels = list(res["predicted"])
    head = f"{'n':>4} {'sim time':>10} {'sim upd':>8} {'div':>5} " + " ".join(
        f"{'pred ' + lab[:14]:>20}" for lab in labels
    )
    print(
        f"\n== {res['problem']} ({res['compute_time']}, η={res['learning_rate']:g}, "
        f"ε={res['epsilon']:g})"
    )
    print(head)
    for r in res["rows"]:
        preds = " ".join(f"{r[f'predicted_time_{lab}']:>20.4g}" for lab in labels)
        print(
            f"{r['num_workers']:>4} {r['simulated_time_median']:>10.4g} "
            f"{r['simulated_updates_median']:>8.0f} {r['fraction_diverged']:>5.2f} {preds}"
        )
    print("predicted:", json.dumps(res["predicted"]))
    print("simulated:", json.dumps(res["simulated"]))
    print("claims:", json.dumps(res["claims"]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small grids, few seeds")
    parser.add_argument("--seeds", type=int, default=None)
    args = parser.parse_args()
    seeds = args.seeds or (4 if args.quick else 8)
    start = time.perf_counter()

    if args.quick:
        grid_q = [1, 2, 4, 8, 16, 24, 32]
        grid_c = [1, 2, 4, 8, 16, 32]
    else:
        grid_q = [1, 2, 4, 6, 8, 12, 16, 20, 24, 28, 32]
        grid_c = [1, 2, 4, 6, 8, 12, 16, 20, 24, 32]
    results = []
    quad = quadratic_problem()
    results.append(run_experiment(quad, LAW, 0.065, 1e-4, grid_q, seeds))
    clf = classifier_problem()
    lr_c = 0.1 / float(clf["eigenvalues"].max())
    results.append(run_experiment(clf, LAW, lr_c, 1e-4, grid_c, seeds))
    if not args.quick:
        law = workers.exponential(1.25)
        grid_e = [1, 2, 4, 8, 12, 16, 24, 32, 48, 64]
        results.append(
            run_experiment(quad, law, 0.2, 1e-4, grid_e, seeds, moments=("first", "second"))
        )
    for res in results:
        print_table(res)

    RESULTS.mkdir(parents=True, exist_ok=True)
    png = RESULTS / "sdde_validation.png"
    plot(results, png)
    out = {
        "benchmark": "sdde_validation",
        "quick": args.quick,
        "platform": platform.platform(),
        "jax": jax.__version__,
        "device": str(jax.devices()[0]),
        "total_seconds": time.perf_counter() - start,
        "figure": str(png.name),
        "experiments": results,
    }
    (RESULTS / "sdde_validation.json").write_text(json.dumps(out, indent=2))
    print(f"\nwrote {RESULTS / 'sdde_validation.json'} and {png} in {out['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
