"""The event loop in blocks of arrivals among a few candidate workers, exactly as one at a time.

Finish times are absolute (``_clock``): an arrival changes only the arriving worker's
time, so a block does:

1. take the ``CANDIDATES`` workers with the smallest finish times (high words; the last one
   is the *sentinel*: every other worker's high word is at least its own);
2. run the unchanged arrival rule on the candidates alone (a loop small enough for XLA:CPU
   to compile into one kernel) while the earliest candidate's high word is strictly below
   the sentinel's: then no other worker can be the next arrival;
3. write the candidates back (the other workers' times are untouched).

A block that cannot start (the sentinel ties the earliest time) runs one plain arrival on
all n workers. Protocols whose arrivals change other workers' timing (``ssp`` blocking,
calculation stops) and ``k_sync`` rounds keep the plain loop. The records are bitwise those
of the plain loop (``simulate(..., method="events_reference")``).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np

from asgd_jax.workers._events import Server, build_server
from asgd_jax.workers._model import WorkerModel
from asgd_jax.workers._state import WorkerState, WorkerTrace

#: Workers per block (the sentinel included): a block loop this small runs as one kernel.
CANDIDATES = 8
#: Arrivals at most per block (a candidate that arrives may arrive again in the block).
_BLOCK = 2 * CANDIDATES


#: ``simulate`` takes the blocked loop from this many workers on: below it the plain loop
#: was as fast or faster (benchmarks/workers.py: 0.5x at n = 64, 2.4x at n = 512).
MIN_WORKERS = 128


def applicable(model: WorkerModel) -> bool:
    """Whether arrivals leave the other workers' finish times alone (and n > CANDIDATES)."""
    return (
        model.num_workers > CANDIDATES
        and model.protocol in ("async", "k_async", "rennala", "ringmaster")
        and not model.stops
    )


def _server(model: WorkerModel) -> Server:
    """The model's event logic, rebuilt from its configuration (the same operations)."""
    mult = model.multipliers
    mult = mult if isinstance(mult, jax.Array) else np.asarray(mult, np.float64)
    if model.protocol == "ringmaster":
        threshold = None if model.threshold is None else model.threshold - 1
    else:
        threshold = model.max_staleness
    return build_server(
        n=model.num_workers,
        law=model.compute_time,
        comm=model.comm_time,
        mult=mult,
        protocol=model.protocol,
        threshold=threshold,
        k=model.k,
        max_delay=model.max_delay,
        group_staleness=model.group_staleness,
        stops=model.stops,
    )


def _take(state: WorkerState, ids: jax.Array) -> WorkerState:
    return state._replace(
        finish=state.finish[ids],
        finish_lo=state.finish_lo[ids],
        pulled=state.pulled[ids],
        clock=state.clock[ids],
        restarts=state.restarts[ids],
    )


def _record(server: Server, max_delay: int, state: WorkerState) -> jax.Array:
    """One update's record as int32 words: τ, time bits, worker, dropped, clipped."""
    tau = jnp.minimum(server.group_tau(state), max_delay).astype(jnp.int32)
    time = jax.lax.bitcast_convert_type(state.time, jnp.int32)
    return jnp.stack([tau, time, state.worker, state.dropped, state.clipped])


def simulate_blocked(model: WorkerModel, key: chex.PRNGKey, num: int) -> WorkerTrace:
    """The first ``num`` updates of an :func:`applicable` model, bitwise the event loop's.

    Counters in the records are cumulative (as ``_simulate._snapshot`` writes them).
    """
    server = _server(model)
    max_delay = model.max_delay
    m, size, words = CANDIDATES, _BLOCK, 5

    def cond(carry):
        b, _, _, sub, _ = carry
        early = jnp.min(sub.finish) < sub.finish[m - 1]  # strictly before the sentinel
        return (b < size) & early & (sub.version < num)

    def inner(carry):
        b, start, ids, sub, records = carry
        sub = server.arrival_at(sub, ids)
        # Row u + 1 for the block's u-th update; row 0 takes the arrivals that are not one.
        row = jnp.where(sub.applied, sub.version - start, 0).astype(jnp.int32)
        record = _record(server, max_delay, sub)[None]
        records = jax.lax.dynamic_update_slice(records, record, (row, jnp.int32(0)))
        return b + 1, start, ids, sub, records

    def block(carry):
        state, out = carry
        _, ids = jax.lax.top_k(-state.finish, m)
        ids = ids.astype(jnp.int32)
        records = jnp.zeros((size + 1, words), jnp.int32)
        first = (jnp.int32(0), state.version, ids, _take(state, ids), records)
        b, _, _, sub, records = jax.lax.while_loop(cond, inner, first)
        new = sub._replace(
            finish=state.finish.at[ids].set(sub.finish),
            finish_lo=state.finish_lo.at[ids].set(sub.finish_lo),
            pulled=state.pulled.at[ids].set(sub.pulled),
            clock=state.clock.at[ids].set(sub.clock),
            restarts=state.restarts.at[ids].set(sub.restarts),
        )
        # A block that cannot start (the sentinel ties the earliest time): one arrival on
        # all n workers instead. Only the state goes through the cond, never ``out``.
        new = jax.lax.cond(b > 0, lambda: new, lambda: server.step(state))
        single = jnp.broadcast_to(_record(server, max_delay, new), (size, words))
        rows = jnp.where(b > 0, records[1:], single)
        return new, jax.lax.dynamic_update_slice(out, rows, (state.version, jnp.int32(0)))

    out = jnp.zeros((num + size + 1, words), jnp.int32)
    init = (server.init(key), out)
    _, out = jax.lax.while_loop(lambda c: c[0].version < num, block, init)
    out = out[:num]
    ones = jnp.ones((num,), bool)
    return WorkerTrace(
        staleness=out[:, 0],
        time=jax.lax.bitcast_convert_type(out[:, 1], jnp.float32),
        worker=out[:, 2],
        accepted=ones,
        applied=ones,
        dropped=out[:, 3],
        clipped=out[:, 4],
        version=jnp.arange(1, num + 1, dtype=jnp.int32),
        stopped=jnp.zeros((num,), jnp.int32),
    )
