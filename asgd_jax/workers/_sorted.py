"""Whole runs without an event loop, for protocols whose arrivals do not feed back into timing.

Without a staleness threshold, workers of the ``"async"`` and ``"k_async"`` protocols never
wait: worker i's c-th gradient arrives at F_{i,c} = Σ_{c' ≤ c} (its cycle times), which
depends only on ``(key, i, c)``. The global arrival order is then a sort of all
(F_{i,c}, i) pairs (ties to the lowest worker id), and the staleness of an arrival follows
from its global index g and the global index of the same worker's previous arrival. A
``"k_sync"`` round r is row r of the cycle-time table. Both are one vectorised pass (a scan
of log depth, one sort, one scatter) instead of one loop iteration per event.

Finish times are double-float sums (an unevaluated float32 pair hi + lo, about 48 bits):
the order they give is the exact order of the float32 cycle times summed in float64, up to
pairs closer than ~2⁻⁴⁸ relative. Every worker's column is summed by the same sequence of
operations, so equal workers tie exactly. The event loop orders float32 *relative* clocks
instead, so the two paths agree except at near-ties (arrivals within ~1e-7 relative).
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np

from asgd_jax.workers._laws import ComputeTime
from asgd_jax.workers._model import WorkerModel
from asgd_jax.workers._state import WorkerTrace


def applicable(model: WorkerModel) -> bool:
    """Whether arrivals never feed back into timing (no drops, no blocking)."""
    if model.protocol == "k_sync":
        return True
    return model.protocol in ("async", "k_async") and model.max_staleness is None


def _two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """s + e = a + b exactly, s = fl(a + b) (Knuth's TwoSum)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _add(x: tuple[jax.Array, jax.Array], y: tuple[jax.Array, jax.Array]):
    """Double-float addition of (hi, lo) pairs; the result is normalised (|lo| ≤ ulp(hi)/2)."""
    s, e = _two_sum(x[0], y[0])
    e = e + (x[1] + y[1])
    hi = s + e
    return hi, e - (hi - s)


def _cumsum(values: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Double-float inclusive prefix sums along axis 0 (the same operations for every column)."""
    return jax.lax.associative_scan(_add, (values, jnp.zeros_like(values)), axis=0)


def _less(a: tuple[jax.Array, jax.Array], b: tuple[jax.Array, jax.Array]) -> jax.Array:
    return (a[0] < b[0]) | ((a[0] == b[0]) & (a[1] < b[1]))


def _typical(law: ComputeTime | None) -> float:
    if law is None:
        return 0.0
    mean = law.mean
    return mean if math.isfinite(mean) else float(law.ppf(0.5))


def num_cycles(model: WorkerModel, num_arrivals: int) -> int:
    """Cycles per worker to draw so that the first ``num_arrivals`` are covered w.h.p.

    The fastest worker makes a share (1/t_fast)/Σ_i(1/t_i) of the arrivals (t_i: its mean
    cycle, or median when the mean is infinite); a 10 % margin plus 6 standard deviations of
    a Poisson count covers the fluctuations of the horizon. A shortfall is not an error: the
    remaining updates are simulated by the event loop (see :func:`simulate_sorted`).
    """
    typical = np.asarray(model.multipliers) * _typical(model.compute_time)
    typical = typical + _typical(model.comm_time)
    rates = 1.0 / np.maximum(typical, 1e-30)
    base = num_arrivals * float(rates.max() / rates.sum())
    return int(math.ceil(1.1 * base + 6.0 * math.sqrt(base) + 8.0))


def _k_sync(model: WorkerModel, table: jax.Array) -> WorkerTrace:
    n, k = model.num_workers, model.k
    num = table.shape[0]
    iota = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), table.shape)
    ordered, order = jax.lax.sort((table, iota), dimension=1, num_keys=1, is_stable=True)
    hi, _ = _cumsum(ordered[:, k - 1])
    zeros = jnp.zeros((num,), jnp.int32)
    true = jnp.ones((num,), bool)
    return WorkerTrace(
        staleness=zeros,
        time=hi,
        worker=order[:, k - 1],
        accepted=true,
        applied=true,
        dropped=jnp.full((num,), n - k, jnp.int32),
        clipped=~true,
        version=jnp.arange(1, num + 1, dtype=jnp.int32),
        stopped=zeros,
    )


def simulate_sorted(
    model: WorkerModel, key: chex.PRNGKey, num: int, table_fn, cycles: int
) -> WorkerTrace:
    """The first ``num`` updates of an :func:`applicable` model by sorting all arrivals.

    ``table_fn(key, c)`` returns the ``(c, n)`` cycle-time table. Arrivals strictly before
    T* = min_i F_{i, cycles−1} are complete and in order (any undrawn arrival of worker i
    is at or after F_{i, cycles−1} ≥ T*). If fewer than ``num`` updates fall before T* (a
    rare tail event with the default ``cycles``), the rest are simulated from the state at
    the horizon by ``model.next`` in a ``while_loop`` that runs zero times otherwise.
    """
    if model.protocol == "k_sync":
        return _k_sync(model, table_fn(key, num))
    n, k, max_delay = model.num_workers, model.k, model.max_delay
    arrivals = num * k
    cycles = max(cycles, -(-arrivals // n))  # at least ``arrivals`` candidates
    table = table_fn(key, cycles)  # (cycles, n)
    hi, lo = _cumsum(table)
    horizon_hi = jnp.min(hi[-1])
    horizon = (horizon_hi, jnp.min(jnp.where(hi[-1] == horizon_hi, lo[-1], jnp.inf)))
    valid = _less((hi, lo), (jnp.broadcast_to(horizon[0], hi.shape), horizon[1]))
    size = cycles * n
    # One tie-break key that is also the identity: worker-major index i·cycles + c orders
    # equal times by worker id (a worker never ties with itself: its times increase).
    ident = (
        jnp.arange(n, dtype=jnp.int32)[None, :] * cycles
        + jnp.arange(cycles, dtype=jnp.int32)[:, None]
    ).reshape(size)
    key_hi = jnp.where(valid, hi, jnp.inf).reshape(size)
    key_lo = jnp.where(valid, lo, 0.0).reshape(size)
    s_hi, s_lo, s_ident = jax.lax.sort((key_hi, key_lo, ident), num_keys=3)
    s_worker, s_cycle = s_ident // cycles, s_ident % cycles
    covered = jnp.sum(valid.astype(jnp.int32))  # arrivals known to be in order
    g = jnp.arange(size, dtype=jnp.int32)
    # position[c, i]: global index of worker i's c-th arrival (≥ covered if not covered).
    flat = s_cycle * n + s_worker
    position = jnp.zeros((size,), jnp.int32).at[flat].set(g, unique_indices=True)
    position = position.reshape(cycles, n)
    s_hi, s_worker, cycle = s_hi[:arrivals], s_worker[:arrivals], s_cycle[:arrivals]
    g = g[:arrivals]
    previous = position[jnp.maximum(cycle - 1, 0), s_worker]
    pulled = jnp.where(cycle > 0, (previous + 1) // k, 0)
    tau = g // k - pulled
    if k > 1:
        groups = tau.reshape(num, k)
        if model.group_staleness == "max":
            raw = groups.max(1)
        elif model.group_staleness == "min":
            raw = groups.min(1)
        else:
            raw = (groups.sum(1) + k // 2) // k
    else:
        raw = tau
    last = slice(k - 1, None, k)
    ones = jnp.ones((num,), bool)
    trace = WorkerTrace(
        staleness=jnp.minimum(raw, max_delay).astype(jnp.int32),
        time=s_hi[last],
        worker=s_worker[last],
        accepted=ones,
        applied=ones,
        dropped=jnp.zeros((num,), jnp.int32),
        clipped=raw > max_delay,
        version=jnp.arange(1, num + 1, dtype=jnp.int32),
        stopped=jnp.zeros((num,), jnp.int32),
    )
    # Updates whose records are final; the loop in _extend runs zero times when all are.
    done = jnp.minimum(covered // k, num)
    return _extend(model, key, hi, lo, position, trace, done)


def _extend(model, key, hi, lo, position, trace, done):
    """Records ``done..num−1`` by the event loop, from the state after ``done`` updates."""
    n, k = model.num_workers, model.k
    num = trace.staleness.shape[0]
    arrived = done * k
    clock = jnp.sum((position < arrived).astype(jnp.int32), axis=0)
    iota = jnp.arange(n, dtype=jnp.int32)
    last_index = position[jnp.maximum(clock - 1, 0), iota]
    pulled = jnp.where(clock > 0, (last_index + 1) // k, 0)
    # The last covered arrival: the worker whose last arrival has global index arrived − 1.
    is_last = (clock > 0) & (last_index == arrived - 1)
    j = jnp.min(jnp.where(is_last, iota, n))
    row = jnp.maximum(clock[jnp.minimum(j, n - 1)] - 1, 0)
    now_hi = jnp.where(arrived > 0, hi[row, jnp.minimum(j, n - 1)], 0.0)
    now_lo = jnp.where(arrived > 0, lo[row, jnp.minimum(j, n - 1)], 0.0)
    next_hi, next_lo = hi[clock, iota], lo[clock, iota]
    finish = _add((next_hi, next_lo), (-now_hi, -now_lo))[0]
    state = model.init(key)
    state = state._replace(
        finish=finish,
        pulled=pulled,
        clock=clock,
        version=jnp.asarray(done, jnp.int32),
        time=now_hi,
        worker=jnp.where(arrived > 0, j, -1).astype(jnp.int32),
        group_count=jnp.asarray(k if k > 1 else 0, jnp.int32),
    )

    def body(carry):
        u, state, trace = carry
        before = state.clipped
        tau, state = model.next(state)
        record = WorkerTrace(
            staleness=tau,
            time=state.time,
            worker=state.worker,
            accepted=state.accepted,
            applied=state.applied,
            dropped=jnp.zeros((), jnp.int32),
            clipped=state.clipped > before,
            version=state.version,
            stopped=jnp.zeros((), jnp.int32),
        )
        trace = jax.tree.map(lambda x, r: x.at[u].set(r), trace, record)
        return u + 1, state, trace

    return jax.lax.while_loop(lambda c: c[0] < num, body, (done, state, trace))[2]
