"""A parameter server with n simulated workers, as a delay model.

An event-driven simulation written with ``jax.lax``: n workers each pull the current
parameters (version ``v``), compute a gradient for a random time, and push it; the server
applies gradients in arrival order. The staleness of a gradient is the number of updates the
server applied between the worker's pull and its push. The model plugs into
:func:`asgd_jax.stale` like any :class:`~asgd_jax.delays.DelayModel` and also reports, per
update, the simulated wall-clock time, the worker id and whether the gradient was accepted.

Everything is a pure function of the key: the compute time of worker ``i``'s ``c``-th
computation is the quantile of a compute-time law at a counter-hashed uniform of
``(key, c·n + i)`` (:func:`asgd_jax.delays.uniform01`). The same key therefore gives every
protocol the same per-worker compute times (common random numbers), so protocols can be
compared run against run.

Protocols (``parameter_server(..., protocol=...)``):

* ``"async"``: every arrival is applied at once (Downpour / ASGD). With ``max_staleness=S``
  a gradient staler than S is dropped and the worker re-pulls the current version.
* ``"ssp"``: Stale Synchronous Parallel (Ho et al. 2013). Worker i's clock ``c_i`` counts
  its pushes; it may start another computation only while ``c_i ≤ min_j c_j + S``, else it
  blocks until the slowest worker pushes, then pulls the current version.
* ``"k_async"``: the server applies the mean of every K accepted arrivals (any workers; a
  fast worker may contribute twice, which is Dutta et al.'s K-batch-async). Workers never
  wait. See ``group_staleness`` for the single τ the delay-model interface hands on.
* ``"k_sync"``: synchronous rounds. All n workers pull the current version, the server waits
  for the first K arrivals, applies their mean and cancels the n − K stragglers (counted in
  ``dropped``); the round time is the K-th order statistic of the n cycle times, the
  staleness is always 0. ``k=None`` means K = n (fully synchronous SGD).
* ``"rennala"``: Rennala SGD (Tyurin & Richtárik 2023), ``k=S``. Workers compute at the
  current point; the server collects the first S gradients computed at it (a fast worker
  may give several), discards those computed at older points (``dropped``), and applies
  their mean: τ = 0, S gradients per update, like a K-sync round. ``stops=True`` also
  stops the other workers at every update (``stopped``), so each round starts afresh.
* ``"ringmaster"``: Ringmaster ASGD (Maranjyan, Tyurin & Richtárik 2025), ``threshold=R``:
  asynchronous SGD that ignores gradients with delay ≥ R; with ``stops=True`` a worker is
  stopped and restarted the moment its computation's delay reaches R. Every applied τ < R;
  ``threshold=None`` is plain ASGD, bit for bit.

Ties between arrivals at the same simulated time are broken by the lowest worker id, so n
equal deterministic workers give exactly 0, 1, …, n − 1, n − 1, n − 1, … .

Clock: absolute. Worker i's c-th gradient arrives at the double-float running sum
(float32 hi + lo, ~48 bits) of its first c + 1 cycle times; the next arrival is the least
(time, worker id). An arrival touches only the arriving worker's time, so the order does not
degrade as the simulated clock grows, and the one-arrival loop, the blocked loop and the
sorted path of :func:`simulate` give bitwise the same records.

Cost: an arrival in the event loop (what :func:`asgd_jax.stale` runs, one per step) is a few
masked minima over the n next-finish times, O(n); :func:`simulate` runs whole traces in
blocks of arrivals among the earliest workers, or, where arrivals do not feed back into
timing, by one sort of all arrival times (cost per update nearly flat in n; see
``benchmarks/workers.py``). On CPU, XLA runs a loop body as a sequence of small kernels;
letting it compile the whole event loop into one kernel, by setting before JAX is imported ::

  XLA_FLAGS=--xla_backend_extra_options=xla_cpu_small_while_loop_byte_threshold=1000000000

makes the event loop several times faster for n ≥ 64.

Layout: ``_laws`` (compute-time laws), ``_state`` (state and trace types), ``_clock``
(double-float times), ``_events`` (the jittable arrival / round), ``_server``
(:func:`parameter_server`), ``_simulate`` (whole runs), ``_blocked`` and ``_sorted`` (its
fast paths).

References:
  Dutta, Joshi, Ghosh, Dube, Nagpurkar, "Slow and Stale Gradients Can Win the Race:
  Error-Runtime Trade-offs in Distributed SGD", AISTATS 2018, arXiv 1803.01113.
  Ho et al., "More Effective Distributed ML via a Stale Synchronous Parallel Parameter
  Server", NIPS 2013.
  Koloskova, Stich, Jaggi, "Sharper Convergence Guarantees for Asynchronous SGD for
  Distributed and Federated Learning", NeurIPS 2022, arXiv 2206.08307.
  Yu, Chen, Poor, "Distributed Stochastic Gradient Descent with Staleness: A Stochastic Delay
  Differential Equation Based Framework", IEEE TSP 2025, arXiv 2406.11159.
  Tyurin, Richtárik, "Optimal Time Complexities of Parallel Stochastic Optimization Methods
  Under a Fixed Computation Model", NeurIPS 2023, arXiv 2305.12387.
  Maranjyan, Tyurin, Richtárik, "Ringmaster ASGD: The First Asynchronous SGD with Optimal
  Time Complexity", ICML 2025, arXiv 2501.16168.
"""

from asgd_jax.workers._laws import (
    ComputeTime,
    Deterministic,
    Exponential,
    LogNormal,
    Pareto,
    ShiftedExponential,
    deterministic,
    exponential,
    lognormal,
    pareto,
    shifted_exponential,
)
from asgd_jax.workers._model import WorkerModel
from asgd_jax.workers._order_stats import expected_order_statistic
from asgd_jax.workers._server import parameter_server
from asgd_jax.workers._simulate import cycle_times, simulate, simulate_events
from asgd_jax.workers._state import WorkerState, WorkerTrace

__all__ = [
    "ComputeTime",
    "Deterministic",
    "Exponential",
    "ShiftedExponential",
    "LogNormal",
    "Pareto",
    "deterministic",
    "exponential",
    "shifted_exponential",
    "lognormal",
    "pareto",
    "expected_order_statistic",
    "WorkerModel",
    "WorkerState",
    "WorkerTrace",
    "cycle_times",
    "parameter_server",
    "simulate",
    "simulate_events",
]
