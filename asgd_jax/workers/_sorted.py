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

import functools
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


#: From this many workers on, the cycle table is sized for the typical worker and the
#: earliest finishers get more cycles (see :func:`plan`).
_TOP_UP_FROM = 1024


@functools.lru_cache(maxsize=64)
def plan(model: WorkerModel, num_arrivals: int) -> tuple[int, int, int]:
    """``(cycles, top_up_workers, top_up_cycles)``: the shape of the arrival table.

    Every worker draws ``cycles`` cycles; the ``top_up_workers`` whose last one finishes
    earliest draw ``top_up_cycles`` more. One table sized for the fastest worker
    (:func:`num_cycles`) holds ~16 cycles per worker for ~1 arrival each at n = 10,000,
    because the luckiest of many workers sets the horizon; the top-up sizes the table for
    the typical worker instead: ``cycles`` is the least c at which at most a quarter of
    the top-up budget is expected to run out (a Poisson count of arrivals by the horizon,
    per worker), and the topped-up workers reach :func:`num_cycles`.
    """
    full = num_cycles(model, num_arrivals)
    n = model.num_workers
    if n < _TOP_UP_FROM:
        return full, 0, 0
    from scipy import stats

    workers = max(64, n // 8)
    typical = np.asarray(model.multipliers) * _typical(model.compute_time)
    rates = 1.0 / np.maximum(typical + _typical(model.comm_time), 1e-30)
    expected = 1.1 * num_arrivals * rates / rates.sum() + 1.0

    def enough(c: int) -> bool:  # at most a quarter of the budget expected to run out
        return float(np.sum(stats.poisson.sf(c - 1, expected))) <= workers / 4

    if not enough(full - 1):
        return full, 0, 0
    low, high = 0, full - 1  # enough(high); the tail sum decreases in c
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if enough(mid) else (mid, high)
    return high, workers, full - high


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


def _ranks(hi, lo, valid, worker, complete: bool = True) -> tuple[jax.Array, jax.Array]:
    """The rank of every valid element in (hi, lo, worker) order; ``size`` for the others.

    Also returns whether the small tie sort held every shared time word. With
    ``complete=False`` the full-sort fallback is left out of the program (its ranks are
    then wrong where that flag is False: the caller reruns the complete program).

    A worker's own elements come in cycle order (its times increase; the stable sorts keep
    element order where a pair ever repeats).
    """
    size = hi.shape[0]
    key = jnp.where(valid, jax.lax.bitcast_convert_type(hi, jnp.int32), _BIG)
    ordered = jax.lax.sort(key)
    # The unrolled search is ~2x faster on large arrays; the loop compiles faster.
    method = "scan_unrolled" if size > 65_536 else "scan"
    left = jnp.searchsorted(ordered, key, side="left", method=method)
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

    fits = count <= min(_TIES, size)
    if not complete:
        return few_ties(), fits
    return jax.lax.cond(fits, few_ties, full_sort), fits


def simulate_sorted(
    model: WorkerModel,
    key: chex.PRNGKey,
    num: int,
    cycle_fn,
    shape: tuple[int, int, int],
    complete: bool = True,
):
    """The first ``num`` updates of an :func:`applicable` model by sorting all arrivals.

    ``cycle_fn(key, worker, index)`` draws cycle times (broadcasting) and ``shape`` is
    :func:`plan`'s. Arrivals strictly before the horizon T* (the earliest last drawn
    finish time of any worker) are complete and in order: any undrawn arrival of a worker
    comes after its last drawn one. If fewer than ``num`` updates fall before T* (a rare
    tail event), the rest are simulated from the state at the horizon by ``model.next`` in
    a ``while_loop`` that runs zero times otherwise.

    ``complete=False`` builds the common case only (no event-loop fallback, no full-sort
    fallback for many shared time words: about half the compile time) and returns
    ``(trace, exact)``; where ``exact`` is False the complete program must be run instead.
    """
    if model.protocol == "k_sync":
        rounds = jnp.arange(num, dtype=jnp.int32)[:, None]
        ids = jnp.arange(model.num_workers, dtype=jnp.int32)[None, :]
        trace = _k_sync(model, cycle_fn(key, ids, rounds))
        return trace if complete else (trace, jnp.asarray(True))
    n, k, max_delay = model.num_workers, model.k, model.max_delay
    arrivals = num * k
    cycles, top_workers, top_cycles = shape
    cycles = max(cycles, -(-arrivals // n))  # at least ``arrivals`` candidates
    iota = jnp.arange(n, dtype=jnp.int32)
    hi, lo = _clock.running_sums(cycle_fn(key, iota[None, :], jnp.arange(cycles)[:, None]))
    main = cycles * n
    # Flat element arrays: main element c·n + i is worker i's c-th arrival; top-up element
    # main + e·W + w is worker sel[w]'s (cycles + e)-th.
    worker = jnp.tile(iota, cycles)
    previous = jnp.arange(main, dtype=jnp.int32) - n  # < 0 for cycle 0: no previous arrival
    slot_of = jnp.full((n,), -1, jnp.int32)
    last_hi, last_lo = hi[-1], lo[-1]
    flat_hi, flat_lo = hi.reshape(main), lo.reshape(main)
    if top_workers:
        _, sel = jax.lax.top_k(-last_hi, top_workers)
        sel = sel.astype(jnp.int32)
        w = jnp.arange(top_workers, dtype=jnp.int32)
        extra = jnp.arange(cycles, cycles + top_cycles, dtype=jnp.int32)[:, None]
        t_hi, t_lo = _clock.running_sums(
            cycle_fn(key, sel[None, :], extra), (last_hi[sel], last_lo[sel])
        )
        slot_of = slot_of.at[sel].set(w)
        e = jnp.repeat(jnp.arange(top_cycles, dtype=jnp.int32), top_workers)
        w_flat = jnp.tile(w, top_cycles)
        worker = jnp.concatenate([worker, sel[w_flat]])
        top_previous = jnp.where(
            e > 0, main + (e - 1) * top_workers + w_flat, (cycles - 1) * n + sel[w_flat]
        )
        previous = jnp.concatenate([previous, top_previous])
        flat_hi = jnp.concatenate([flat_hi, t_hi.reshape(-1)])
        flat_lo = jnp.concatenate([flat_lo, t_lo.reshape(-1)])
        last_hi = last_hi.at[sel].set(t_hi[-1])
        last_lo = last_lo.at[sel].set(t_lo[-1])
    horizon_hi = jnp.min(last_hi)
    horizon = (horizon_hi, jnp.min(jnp.where(last_hi == horizon_hi, last_lo, jnp.inf)))
    size = flat_hi.shape[0]
    valid = _clock.less((flat_hi, flat_lo), (jnp.broadcast_to(horizon[0], (size,)), horizon[1]))
    rank, fits = _ranks(flat_hi, flat_lo, valid, worker, complete)  # ``size``: not covered
    covered = jnp.sum(valid, dtype=jnp.int32)  # arrivals known to be in order
    before = jnp.where(previous >= 0, rank[jnp.maximum(previous, 0)], -1)
    tau = rank // k - (before + 1) // k
    # One scatter of element ids into arrival order, then gathers (cheaper than scattering
    # every column); slots past the covered arrivals hold element 0, rewritten below.
    slot = jnp.where(rank < arrivals, rank, arrivals)
    order = jnp.zeros((arrivals,), jnp.int32)
    order = order.at[slot].set(jnp.arange(size, dtype=jnp.int32), mode="drop")
    s_hi, s_lo, s_worker, s_tau = flat_hi[order], flat_lo[order], worker[order], tau[order]
    if k > 1:
        groups = s_tau.reshape(num, k)
        if model.group_staleness == "max":
            raw = groups.max(1)
        elif model.group_staleness == "min":
            raw = groups.min(1)
        else:
            raw = (groups.sum(1) + k // 2) // k
    else:
        raw = s_tau
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
    # Updates whose records are final; the loop below runs zero times when all are.
    done = jnp.minimum(covered // k, num)
    if not complete:
        return trace, fits & (done == num)
    arrived = done * k
    # The state after ``arrived`` arrivals, for the event loop.
    # Per-worker counts as reductions over the table layout (a scatter-add of every
    # element into n counters is several times slower on CPU).
    seen = (rank < arrived).astype(jnp.int32)
    clock = jnp.sum(seen[:main].reshape(cycles, n), axis=0, dtype=jnp.int32)
    if top_workers:
        topped = jnp.sum(seen[main:].reshape(top_cycles, top_workers), axis=0, dtype=jnp.int32)
        clock = clock.at[sel].add(topped)

    def index(c):  # flat index of worker i's c-th arrival (drawn for every c ≤ its clock)
        top = main + (c - cycles) * max(top_workers, 1) + jnp.maximum(slot_of, 0)
        return jnp.where(c < cycles, c * n + iota, top)

    latest = rank[index(jnp.maximum(clock - 1, 0))]
    nxt = index(clock)
    at = jnp.maximum(arrived - 1, 0)
    state = model.init(key)._replace(
        finish=flat_hi[nxt],
        finish_lo=flat_lo[nxt],
        pulled=jnp.where(clock > 0, (latest + 1) // k, 0),
        clock=clock,
        version=jnp.asarray(done, jnp.int32),
        time=jnp.where(arrived > 0, s_hi[at], 0.0),
        time_lo=jnp.where(arrived > 0, s_lo[at], 0.0),
        worker=jnp.where(arrived > 0, s_worker[at], -1).astype(jnp.int32),
        group_count=jnp.asarray(k if k > 1 else 0, jnp.int32),
    )
    return _extend(model, state, trace, done)


def _extend(model, state, trace, done):
    """Records ``done..num−1`` by the event loop, from the state after ``done`` updates."""
    num = trace.staleness.shape[0]

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
