"""Whole runs without an event loop, for protocols whose arrivals do not feed back into timing.

Without a staleness threshold, workers of the ``"async"`` and ``"k_async"`` protocols never
wait: worker i's c-th gradient arrives at F_{i,c}, the running double-float sum of its
cycle times (``_clock.running_sums``: the same additions the event loop makes), which
depends only on ``(key, i, c)``. The global arrival order is the order of all (F_{i,c}, i)
(ties to the lowest worker id), and the staleness of an arrival follows from its global
index g and the global index of the same worker's previous arrival. A ``"k_sync"`` round r
is row r of the cycle-time table. Both are bitwise the event loop's records.

Ranking all arrivals: one single-operand sort of the high words as int32 (non-negative
float32 order as integers; XLA:CPU sorts one int32 array several times faster than a
multi-operand or float sort), a binary search of every element in it, and, for the rare
elements whose high word is shared (hi-ties), a small sort by (hi, lo, worker) of just
those. If more than ``_TIES`` elements share high words (equal deterministic workers), one
full three-key sort ranks everything instead.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np

from asgd_jax.workers import _clock
from asgd_jax.workers._laws import ComputeTime
from asgd_jax.workers._model import WorkerModel
from asgd_jax.workers._state import WorkerTrace


def applicable(model: WorkerModel) -> bool:
    """Whether arrivals never feed back into timing (no drops, no blocking)."""
    if model.protocol == "k_sync":
        return True
    return model.protocol in ("async", "k_async") and model.max_staleness is None


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
    hi, _ = _clock.running_sums(ordered[:, k - 1])
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


#: Elements sharing a high word that the small tie sort handles (more: one full sort).
_TIES = 4096
_BIG = jnp.iinfo(jnp.int32).max


def _sortable(x: jax.Array) -> jax.Array:
    """int32 keys in the order of the float32 values (0.0 for ±0: the pairs never hold −0)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    bits = jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)
    return jnp.where(x == 0, 0, bits)


def _ranks(hi, lo, valid, n: int) -> jax.Array:
    """The rank of every valid element in (hi, lo, worker) order; ``size`` for the others.

    Elements are laid out cycle-major (index c·n + i); the worker id i breaks exact ties.
    """
    size = hi.shape[0]
    worker = jnp.arange(size, dtype=jnp.int32) % n
    key = jnp.where(valid, jax.lax.bitcast_convert_type(hi, jnp.int32), _BIG)
    ordered = jax.lax.sort(key)
    left = jnp.searchsorted(ordered, key, side="left", method="scan")
    left = left.astype(jnp.int32)
    shared = valid & (left + 1 < size)
    shared = shared & (ordered[jnp.minimum(left + 1, size - 1)] == key)
    left = jnp.where(valid, left, size)
    count = jnp.sum(shared.astype(jnp.int32))
    lo_key = _sortable(lo)

    def few_ties():
        # Compact the hi-tied elements, sort them by (hi, lo, worker), and place each at its
        # group's first rank plus its place within the group.
        ties = min(_TIES, size)
        at = jnp.where(shared, jnp.cumsum(shared.astype(jnp.int32)) - 1, ties)
        elem = jnp.full((ties,), size, jnp.int32)
        elem = elem.at[at].set(jnp.arange(size, dtype=jnp.int32), mode="drop")
        pad = elem == size
        pick = jnp.minimum(elem, size - 1)
        columns = (
            jnp.where(pad, _BIG, key[pick]),
            jnp.where(pad, _BIG, lo_key[pick]),
            jnp.where(pad, _BIG, worker[pick]),
            elem,
        )
        t_key, _, _, t_elem = jax.lax.sort(columns, num_keys=3, is_stable=True)
        t_left = left[jnp.minimum(t_elem, size - 1)]
        p = jnp.arange(ties, dtype=jnp.int32)
        first = jnp.concatenate([jnp.ones((1,), bool), t_key[1:] != t_key[:-1]])
        group = jax.lax.cummax(jnp.where(first, p, 0))
        return left.at[t_elem].set(t_left + p - group, mode="drop")

    def full_sort():
        elem = jnp.arange(size, dtype=jnp.int32)
        _, _, _, order = jax.lax.sort((key, lo_key, worker, elem), num_keys=3, is_stable=True)
        ranks = jnp.zeros((size,), jnp.int32).at[order].set(elem, unique_indices=True)
        return jnp.where(valid, ranks, size)

    return jax.lax.cond(count <= min(_TIES, size), few_ties, full_sort)


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
    hi, lo = _clock.running_sums(table)
    horizon_hi = jnp.min(hi[-1])
    horizon = (horizon_hi, jnp.min(jnp.where(hi[-1] == horizon_hi, lo[-1], jnp.inf)))
    valid = _clock.less((hi, lo), (jnp.broadcast_to(horizon[0], hi.shape), horizon[1]))
    size = cycles * n
    # position[c, i]: global index of worker i's c-th arrival (``size`` if not covered).
    position = _ranks(hi.reshape(size), lo.reshape(size), valid.reshape(size), n)
    position = position.reshape(cycles, n)
    covered = jnp.sum(valid.astype(jnp.int32))  # arrivals known to be in order
    # Every covered arrival's record goes to its global index (the rest are dropped).
    cycle_of = jnp.broadcast_to(jnp.arange(cycles, dtype=jnp.int32)[:, None], (cycles, n))
    worker_of = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[None, :], (cycles, n))
    slot = jnp.where(position < arrivals, position, arrivals).reshape(size)

    def place(values, fill):
        out = jnp.full((arrivals,), fill, values.dtype)
        return out.at[slot].set(values.reshape(size), mode="drop")

    s_hi, s_worker, cycle = place(hi, 0.0), place(worker_of, 0), place(cycle_of, 0)
    g = jnp.arange(arrivals, dtype=jnp.int32)
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
    state = model.init(key)
    state = state._replace(
        finish=hi[clock, iota],
        finish_lo=lo[clock, iota],
        pulled=pulled,
        clock=clock,
        version=jnp.asarray(done, jnp.int32),
        time=now_hi,
        time_lo=now_lo,
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
