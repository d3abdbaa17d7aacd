"""The jittable event logic: one gradient arrival (or one synchronous round) at a time."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from asgd_jax import delays
from asgd_jax.workers import _clock
from asgd_jax.workers._laws import ComputeTime
from asgd_jax.workers._params import _open_uniform
from asgd_jax.workers._state import WorkerState


def cycle_time_fn(
    n: int, law: ComputeTime, comm: ComputeTime | None, mult: np.ndarray
) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
    """``(seed, worker, index) -> m_worker·X + C`` for the worker's ``index``-th cycle.

    ``mult`` is a NumPy array, or a float32 JAX array when traced (the same values read by
    index, so the products are the same float32 operations).
    """
    if isinstance(mult, jax.Array):
        equal, mult32 = False, mult.astype(jnp.float32)
    else:
        equal = bool(np.all(mult == mult[0]))
        mult32 = np.asarray(mult, np.float32)

    def cycle_time(seed: jax.Array, worker: jax.Array, index: jax.Array) -> jax.Array:
        # Worker i's c-th computation reads counter c·n + i: independent of the protocol.
        counter = index.astype(jnp.uint32) * jnp.uint32(n) + worker.astype(jnp.uint32)
        scale = jnp.float32(mult32[0]) if equal else jnp.asarray(mult32)[worker]
        t = scale * law.sample(_open_uniform(seed, counter, 0))
        if comm is not None:
            t = t + comm.sample(_open_uniform(seed, counter, 1))
        return t

    return cycle_time


def _fold(x: jax.Array, combine: Callable, reduce: Callable) -> jax.Array:
    """``reduce(x)`` over the worker axis, halving with ``combine`` down to 16 elements first.

    XLA's CPU backend splits a reduction over more than 32 elements into several kernels;
    elementwise halving fuses into one, which made an arrival about twice as fast at n = 64
    and n = 512 on the 2-core development machine. Exact for min and integer sums.
    """
    while x.shape[0] > 16:
        half = x.shape[0] // 2
        folded = combine(x[:half], x[half : 2 * half])
        x = jnp.concatenate([folded, x[2 * half :]]) if x.shape[0] % 2 else folded
    return reduce(x)


def _min(x: jax.Array) -> jax.Array:
    return _fold(x, jnp.minimum, jnp.min)


def _sum(x: jax.Array) -> jax.Array:
    # In x's own dtype: with x64 enabled jnp.sum would widen int32 counters to int64.
    return _fold(x, jnp.add, lambda v: jnp.sum(v, dtype=v.dtype))


class Server(NamedTuple):
    """The jittable pieces of a parameter server (see :func:`build_server`)."""

    init: Callable[[chex.PRNGKey], WorkerState]
    step: Callable[[WorkerState], WorkerState]
    next: Callable[[WorkerState], tuple[jax.Array, WorkerState]]
    arrival_at: Callable[[WorkerState, jax.Array], WorkerState]
    group_tau: Callable[[WorkerState], jax.Array]


def build(**config) -> tuple[Callable, Callable, Callable]:
    """The jittable ``init``, ``arrival`` and ``next`` of a parameter server."""
    server = build_server(**config)
    return server.init, server.step, server.next


def build_server(
    *,
    n: int,
    law: ComputeTime,
    comm: ComputeTime | None,
    mult: np.ndarray,
    protocol: str,
    threshold: int | None,
    k: int,
    max_delay: int,
    group_staleness: str,
    stops: bool = False,
) -> Server:
    """The jittable ``init``, arrival step and ``next`` of a parameter server, and parts.

    ``arrival_at(state, ids)`` is one arrival among the workers ``ids`` only: the per-worker
    arrays of ``state`` hold those workers' entries (``arrival`` is ``ids = 0..n−1``), which
    is how the blocked event loop (``_blocked``) runs a block on a few candidates.

    ``threshold`` is the largest accepted staleness (``max_staleness``; R − 1 for
    Ringmaster's threshold R) or the SSP clock gap. ``stops``: Rennala stops every other
    worker when it applies an update, Ringmaster every worker whose computation has just
    reached the delay ``threshold + 1``; both restart them at the new version.
    """
    drops = threshold is not None and protocol in ("async", "k_async", "ringmaster")
    rennala = protocol == "rennala"
    # Arrivals that may be rejected: the next update is a while loop over arrivals.
    filtered = drops or rennala
    ssp = protocol == "ssp"
    big = jnp.iinfo(jnp.int32).max
    cycle_time = cycle_time_fn(n, law, comm, mult)
    iota = jnp.arange(n, dtype=jnp.int32)

    def init(key: chex.PRNGKey) -> WorkerState:
        seed = delays.key_words(key)
        zeros = jnp.zeros((n,), jnp.int32)
        start = jnp.zeros((n,), jnp.float32)
        if protocol == "k_sync":
            finish, finish_lo = start, start
        else:
            finish, finish_lo = _clock.advance((start, start), cycle_time(seed, iota, zeros))
        i32 = lambda v: jnp.asarray(v, jnp.int32)
        return WorkerState(
            seed=seed,
            finish=finish,
            finish_lo=finish_lo,
            pulled=zeros,
            clock=zeros,
            version=i32(0),
            time=jnp.zeros((), jnp.float32),
            time_lo=jnp.zeros((), jnp.float32),
            worker=i32(-1),
            staleness=i32(0),
            accepted=jnp.asarray(False),
            applied=jnp.asarray(False),
            dropped=i32(0),
            clipped=i32(0),
            group_count=i32(0),
            group_sum=i32(0),
            group_max=i32(0),
            group_min=i32(0),
            stopped=i32(0),
            restarts=zeros,
        )

    def group_tau(state: WorkerState) -> jax.Array:
        """The raw (unclipped) τ of the last applied update."""
        if k == 1:
            return state.group_max
        if group_staleness == "max":
            return state.group_max
        if group_staleness == "min":
            return state.group_min
        return (state.group_sum + k // 2) // k

    def arrival(state: WorkerState) -> WorkerState:
        """One gradient arrival: the earliest finisher (lowest id on ties) pushes."""
        return arrival_at(state, iota)

    def arrival_at(state: WorkerState, ids: jax.Array) -> WorkerState:
        """One arrival among the workers ``ids`` (whose entries the state's arrays hold)."""
        # Masks and reductions instead of argmin/gather/scatter: they fuse into a few loops
        # and vectorise under vmap (XLA's CPU argmin and scatter are several times slower).
        # The earliest (hi, lo) finish time; ties to the lowest worker id.
        hi, lo = state.finish, state.finish_lo
        now_hi = _min(hi)
        earliest = hi == now_hi
        now_lo = _min(jnp.where(earliest, lo, jnp.inf))
        j = _min(jnp.where(earliest & (lo == now_lo), ids, n))
        is_j = ids == j
        now = (now_hi, now_lo)
        staleness = state.version - _sum(jnp.where(is_j, state.pulled, 0))
        if rennala:  # only gradients computed at the current point count
            accepted = staleness == 0
        else:
            accepted = staleness <= threshold if drops else jnp.asarray(True)
        clock = state.clock + is_j.astype(jnp.int32)
        if k == 1:
            # Every accepted arrival is an update: the "group" is the arrival itself.
            group_count = accepted.astype(jnp.int32)
            group_sum = group_max = group_min = staleness
        else:
            # A group applied by the previous arrival is closed: start a new one.
            fresh = state.group_count >= k
            count = jnp.where(fresh, 0, state.group_count)
            total = jnp.where(fresh, 0, state.group_sum)
            oldest = jnp.where(fresh, 0, state.group_max)
            newest = jnp.where(fresh, big, state.group_min)
            group_count = count + accepted.astype(jnp.int32)
            group_sum = total + jnp.where(accepted, staleness, 0)
            group_max = jnp.where(accepted, jnp.maximum(oldest, staleness), oldest)
            group_min = jnp.where(accepted, jnp.minimum(newest, staleness), newest)
        applied = accepted & (group_count == k)
        version = state.version + applied.astype(jnp.int32)
        if ssp:
            # Worker i may compute while its clock is at most S ahead of the slowest one.
            idle = is_j | jnp.isinf(hi)
            start = idle & (clock <= _min(clock) + threshold)
            fresh_hi, fresh_lo = _clock.advance(now, cycle_time(state.seed, ids, clock))
            finish = jnp.where(start, fresh_hi, jnp.where(is_j, jnp.inf, hi))
            finish_lo = jnp.where(start, fresh_lo, jnp.where(is_j, 0.0, lo))
            pulled = jnp.where(start, version, state.pulled)
        else:
            # A worker's c-th draw: its pushes plus its stopped computations (no stops: c
            # is its clock, the same under every protocol).
            draws = clock + state.restarts if stops else clock
            index = _sum(jnp.where(is_j, draws, 0))
            next_hi, next_lo = _clock.advance(now, cycle_time(state.seed, j, index))
            finish = jnp.where(is_j, next_hi, hi)
            finish_lo = jnp.where(is_j, next_lo, lo)
            pulled = jnp.where(is_j, version, state.pulled)
        restarts, stopped = state.restarts, state.stopped
        if stops:
            if rennala:  # a new round: every other computation is at an old point
                stop = applied & ~is_j
            else:  # Ringmaster: a computation whose delay reaches R is stopped at once
                stop = applied & ~is_j & (version - pulled > threshold)
            fresh_hi, fresh_lo = _clock.advance(
                now, cycle_time(state.seed, ids, clock + restarts + 1)
            )
            finish = jnp.where(stop, fresh_hi, finish)
            finish_lo = jnp.where(stop, fresh_lo, finish_lo)
            pulled = jnp.where(stop, version, pulled)
            restarts = restarts + stop.astype(jnp.int32)
            stopped = stopped + _sum(stop.astype(jnp.int32))
        new = state._replace(
            finish=finish,
            finish_lo=finish_lo,
            pulled=pulled,
            clock=clock,
            version=version,
            time=now_hi,
            time_lo=now_lo,
            worker=j,
            staleness=staleness,
            accepted=accepted,
            applied=applied,
            dropped=state.dropped + (~accepted).astype(jnp.int32),
            group_count=group_count,
            group_sum=group_sum,
            group_max=group_max,
            group_min=group_min,
            stopped=stopped,
            restarts=restarts,
        )
        over = applied & (group_tau(new) > max_delay)
        return new._replace(clipped=state.clipped + over.astype(jnp.int32))

    def round_(state: WorkerState) -> WorkerState:
        """One synchronous round: wait for the K fastest of n, cancel the rest."""
        cycles = cycle_time(state.seed, iota, jnp.full((n,), state.version))
        order = jnp.argsort(cycles, stable=True)
        last = order[k - 1]
        pushed = jnp.zeros((n,), jnp.int32).at[order[:k]].set(1)
        version = state.version + 1
        zero = jnp.zeros((), jnp.int32)
        time, time_lo = _clock.advance((state.time, state.time_lo), cycles[last])
        return state._replace(
            finish=cycles,
            pulled=jnp.full((n,), version, jnp.int32),
            clock=state.clock + pushed,
            version=version,
            time=time,
            time_lo=time_lo,
            worker=last.astype(jnp.int32),
            staleness=zero,
            accepted=jnp.asarray(True),
            applied=jnp.asarray(True),
            dropped=state.dropped + (n - k),
            group_count=jnp.asarray(k, jnp.int32),
            group_sum=zero,
            group_max=zero,
            group_min=zero,
        )

    step = round_ if protocol == "k_sync" else arrival

    def next_(state: WorkerState) -> tuple[jax.Array, WorkerState]:
        if protocol == "k_sync" or (k == 1 and not filtered):
            state = step(state)
        elif not filtered:
            state = jax.lax.fori_loop(0, k, lambda _, s: arrival(s), state)
        else:
            state = arrival(state)
            state = jax.lax.while_loop(lambda s: ~s.applied, arrival, state)
        tau = jnp.minimum(group_tau(state), max_delay).astype(jnp.int32)
        return tau, state

    return Server(init, step, next_, arrival_at, group_tau)
