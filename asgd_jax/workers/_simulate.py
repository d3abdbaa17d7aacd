"""Whole runs of a simulated parameter server: one ``lax.scan`` per call."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from asgd_jax import delays
from asgd_jax._validation import check_int
from asgd_jax.workers import _blocked, _sorted
from asgd_jax.workers._events import cycle_time_fn
from asgd_jax.workers._model import WorkerModel
from asgd_jax.workers._state import WorkerState, WorkerTrace


def _snapshot(state: WorkerState, staleness: jax.Array) -> WorkerTrace:
    """A record with cumulative counters (``dropped``, ``clipped``, ``stopped``; see _per_record).

    Reading only the new state (not the previous one) lets XLA update the per-worker
    arrays in place inside the scan.
    """
    return WorkerTrace(
        staleness=staleness,
        time=state.time,
        worker=state.worker,
        accepted=state.accepted,
        applied=state.applied,
        dropped=state.dropped,
        clipped=state.clipped,
        version=state.version,
        stopped=state.stopped,
    )


def _per_record(trace: WorkerTrace) -> WorkerTrace:
    """Turns the cumulative counters of :func:`_snapshot` records into per-record ones."""
    dropped = jnp.diff(trace.dropped, prepend=jnp.zeros_like(trace.dropped[:1]))
    clipped = jnp.diff(trace.clipped, prepend=jnp.zeros_like(trace.clipped[:1])) > 0
    stopped = jnp.diff(trace.stopped, prepend=jnp.zeros_like(trace.stopped[:1]))
    return trace._replace(dropped=dropped, clipped=clipped, stopped=stopped)


def _check_model(model: Any) -> WorkerModel:
    if not isinstance(model, WorkerModel):
        raise TypeError(
            f"`model` must be a WorkerModel from asgd_jax.workers.parameter_server, got {model!r}."
        )
    return model


_BLOCK = 64
_FLAT = 32_768  # shorter runs use one flat scan: it compiles in half the time


def _scan_records(
    step: Callable[[WorkerState], tuple[WorkerState, WorkerTrace]], state: WorkerState, num: int
) -> WorkerTrace:
    """``num`` records of ``step`` from ``state``; long runs as a scan of scans of 64 steps.

    Writing each record straight into a ``num``-long output makes XLA's CPU runtime run the
    loop body through its concurrent executor (buffers over 512 bytes), several times slower
    per step; 64-long blocks keep the inner loop small. The few extra steps of the last block
    are computed and discarded (the first ``num`` records do not depend on them).
    """
    if num <= _FLAT:
        return jax.lax.scan(lambda s, _: step(s), state, None, length=num)[1]

    def block(state, _):
        return jax.lax.scan(lambda s, _: step(s), state, None, length=_BLOCK)

    blocks = -(-num // _BLOCK)
    records = jax.lax.scan(block, state, None, length=blocks)[1]
    return jax.tree.map(lambda x: x.reshape((blocks * _BLOCK,) + x.shape[2:])[:num], records)


def _simulate_fn(model: WorkerModel, key: chex.PRNGKey, num: int) -> WorkerTrace:
    def step(state):
        tau, state = model.next(state)
        return state, _snapshot(state, tau)

    return _per_record(_scan_records(step, model.init(key), num))


def _simulate_events_fn(model: WorkerModel, key: chex.PRNGKey, num: int) -> WorkerTrace:
    def step(state):
        state = model.arrival(state)
        return state, _snapshot(state, state.staleness)

    return _per_record(_scan_records(step, model.init(key), num))


def cycle_times(model: WorkerModel, key: chex.PRNGKey, num_cycles: int) -> jax.Array:
    """The cycle times the simulation draws: ``out[c, i]`` is worker i's c-th cycle.

    Cycle c of worker i (compute m_i·X plus communication C) is a pure function of
    ``(key, i, c)``, the same under every protocol; a k_sync round r uses row r. Useful to
    replay a run in a reference implementation, or to compare protocols on equal draws.

    Returns:
      A float32 array of shape ``(num_cycles, num_workers)``.
    """
    model = _check_model(model)
    return _cycle_times(model, key, check_int("num_cycles", num_cycles, low=1))


def _cycle_fn(model: WorkerModel) -> Callable[[chex.PRNGKey, jax.Array, jax.Array], jax.Array]:
    """``(key, worker, index) -> cycle time`` of the model (broadcasting worker and index)."""
    mult = model.multipliers
    mult = mult if isinstance(mult, jax.Array) else np.asarray(mult)
    fn = cycle_time_fn(model.num_workers, model.compute_time, model.comm_time, mult)
    return lambda key, worker, index: fn(delays.key_words(key), worker, index)


def _cycle_times_fn(model: WorkerModel, key: chex.PRNGKey, num_cycles: int) -> jax.Array:
    index = jnp.arange(num_cycles, dtype=jnp.int32)[:, None]
    worker = jnp.arange(model.num_workers, dtype=jnp.int32)[None, :]
    return _cycle_fn(model)(key, worker, index)


def _jitted(fn: Callable) -> Callable:
    """``fn(model, key, num)`` jitted with the model static; called as is for a traced model.

    A model with traced parameters lives inside the trace that built it (it has no value to
    hash), so its runs are traced into that computation instead of compiled apart.
    """
    compiled = jax.jit(fn, static_argnums=(0, 2))

    def call(model: WorkerModel, key: chex.PRNGKey, num: int):
        return (fn if model.traced else compiled)(model, key, num)

    return call


def _simulate_blocked_fn(model: WorkerModel, key: chex.PRNGKey, num: int) -> WorkerTrace:
    return _per_record(_blocked.simulate_blocked(model, key, num))


_simulate = _jitted(_simulate_fn)
_simulate_blocked = _jitted(_simulate_blocked_fn)
_simulate_events = _jitted(_simulate_events_fn)
_cycle_times = _jitted(_cycle_times_fn)


@functools.partial(jax.jit, static_argnums=(0, 2, 3, 4))
def _simulate_sorted_program(
    model: WorkerModel, key: chex.PRNGKey, num: int, shape: tuple, complete: bool
):
    return _sorted.simulate_sorted(model, key, num, _cycle_fn(model), shape, complete)


def _simulate_sorted(model: WorkerModel, key: chex.PRNGKey, num: int, shape: tuple):
    """The sorted path: the common-case program, and the complete one where it falls short.

    With a concrete key the common case (about half the compile time) runs first and the
    complete program (event-loop and full-sort fallbacks) is compiled only if its horizon
    or tie buffer fell short; under an outer trace (a traced or batched key) the complete
    program is traced directly.
    """
    if isinstance(key, jax.core.Tracer):
        return _simulate_sorted_program(model, key, num, shape, True)
    trace, exact = _simulate_sorted_program(model, key, num, shape, False)
    if bool(exact):
        return trace
    return _simulate_sorted_program(model, key, num, shape, True)


_METHODS = ("auto", "events", "events_reference", "sorted")
#: ``"auto"`` takes the sorted path on CPU from this many worker-arrivals (updates · K · n).
_SORTED_FROM = 2**27


def simulate(
    model: WorkerModel, key: chex.PRNGKey, num_updates: int, *, method: str = "auto"
) -> WorkerTrace:
    """The first ``num_updates`` updates of a simulated parameter server.

    A pure function of ``key`` (jit/vmap friendly): ``jax.vmap(lambda k: simulate(model,
    k, 1000))(keys)`` runs independent clusters.

    Every method gives bitwise the same records, and ``trace.staleness`` is exactly the τ
    sequence :func:`asgd_jax.stale` sees with this model and key (so the trace can also be
    replayed with ``asgd_jax.delays.trace(trace)``): the clock is absolute, each worker's
    finish times the double-float running sums of its own cycle times (see
    ``asgd_jax.workers._clock``), compared as (time, worker id). The methods differ in cost:

    * ``"events_reference"``: one arrival per ``lax.scan`` step, O(n) per arrival.
    * ``"events"``: the event loop; for 128 workers or more and a protocol whose arrivals
      leave the other workers' timing alone (``"async"``, ``"k_async"``, ``"rennala"``,
      ``"ringmaster"``, without calculation stops) it runs blocks of arrivals among the 8
      earliest workers.
    * ``"sorted"``: for protocols whose arrivals do not feed back into timing (``"async"``
      or ``"k_async"`` without ``max_staleness``, or ``"k_sync"``): all finish times at once
      (a scan over cycles, vectorised over workers), one sort of them for the arrival order,
      no per-event loop; its cost per update barely grows with n.
    * ``"auto"`` (the default): ``"sorted"`` where it applies and the run is long enough
      to pay for its longer compilation, else ``"events"``. On CPU that is from
      ``num_updates · num_workers ≥ 2²⁷`` on (the sorted program compiles in ~0.7 s, the
      event loop in ~0.3 s, and the event loop costs ~5 ns per worker and arrival); on
      accelerators, where every event-loop iteration is a kernel launch, always.

    Args:
      model: a :class:`WorkerModel` from :func:`parameter_server`.
      key: a PRNG key (typed or raw).
      num_updates: number of applied updates to simulate (≥ 1).
      method: ``"auto"``, ``"events"``, ``"events_reference"`` or ``"sorted"``.

    Returns:
      A :class:`WorkerTrace` of arrays with leading axis ``num_updates``.
    """
    model = _check_model(model)
    num = check_int("num_updates", num_updates, low=1)
    if method not in _METHODS:
        raise ValueError(f"`method` must be one of {_METHODS}, got {method!r}.")
    if method == "sorted" and model.traced:
        raise ValueError(
            f"`method='sorted'` needs concrete parameters (it sizes its cycle table from the "
            f"compute-time law's mean); {model.name} has traced ones (use 'events' or 'auto')."
        )
    if method == "sorted" and not _sorted.applicable(model):
        raise ValueError(
            f"`method='sorted'` needs 'async' or 'k_async' without `max_staleness`, or "
            f"'k_sync'; {model.name} feeds arrivals back into timing (use 'events' or 'auto')."
        )
    if method == "events_reference":
        return _simulate(model, key, num)
    if method == "auto":
        long_run = num * model.num_workers * model.k >= _SORTED_FROM
        if not long_run and jax.default_backend() == "cpu":
            method = "events"
    if method == "events" or model.traced or not _sorted.applicable(model):
        blocked = _blocked.applicable(model) and model.num_workers >= _blocked.MIN_WORKERS
        return (_simulate_blocked if blocked else _simulate)(model, key, num)
    return _simulate_sorted(model, key, num, _sorted.plan(model, num * model.k))


def simulate_events(model: WorkerModel, key: chex.PRNGKey, num_events: int) -> WorkerTrace:
    """The first ``num_events`` gradient arrivals, accepted or dropped (one ``lax.scan``).

    Each record is one arrival with its own raw staleness, so K-async groups show every
    member (``applied`` marks the arrival that completed a group) and drops show with
    ``accepted == False``. For ``k_sync`` an event is a whole round.

    Args:
      model: a :class:`WorkerModel` from :func:`parameter_server`.
      key: a PRNG key (typed or raw).
      num_events: number of arrivals to simulate (≥ 1).

    Returns:
      A :class:`WorkerTrace` of arrays with leading axis ``num_events``.
    """
    model = _check_model(model)
    return _simulate_events(model, key, check_int("num_events", num_events, low=1))
