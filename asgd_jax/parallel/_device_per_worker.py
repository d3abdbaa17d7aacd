"""Simulated asynchronous training with one device per worker.

Each device plays one asynchronous worker of a schedule (worker id and staleness per update,
e.g. :func:`round_robin_schedule` or :func:`asgd_jax.workers.simulate`). The schedule is cut
into rounds (:func:`plan_rounds`); in each round the devices take their gradients in
parallel, each at the snapshot its update will read (:func:`asgd_jax.stale_params_at`), and
the server applies the arrivals one after another in their simulated order with
:meth:`asgd_jax.Step.apply`. The optimizer's delay model must emit the schedule's τ sequence
(:func:`asgd_jax.upcoming_staleness` checks it before a run).

References:
  Koloskova, Stich & Jaggi, *Sharper Convergence Guarantees for Asynchronous SGD for
  Distributed and Federated Learning*, NeurIPS 2022, arXiv 2206.08307.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from asgd_jax._validation import check_int
from asgd_jax.parallel._placement import (
    _block_every,
    _Blocking,
    _check_axis,
    _place,
    fetch,
    state_specs,
)
from asgd_jax.step import make_step
from asgd_jax.transforms import has_stale_state, stale_params_at, upcoming_staleness

__all__ = [
    "WorkerRounds",
    "WorkerSchedule",
    "as_schedule",
    "one_device_per_worker",
    "plan_rounds",
    "round_robin_schedule",
]

LossFn = Callable[[optax.Params, Any], jax.Array]


class WorkerSchedule(NamedTuple):
    """Which worker's gradient the t-th update applies, and its staleness τ_t."""

    worker: np.ndarray  # int32[T]
    staleness: np.ndarray  # int32[T]


def as_schedule(schedule: Any) -> WorkerSchedule:
    """A :class:`WorkerSchedule` from a ``(worker, staleness)`` pair or any object / dict
    with ``worker`` and ``staleness`` entries (such as :func:`asgd_jax.workers.simulate`)."""
    if isinstance(schedule, dict):
        worker, tau = schedule.get("worker"), schedule.get("staleness")
    elif hasattr(schedule, "worker") and hasattr(schedule, "staleness"):
        worker, tau = schedule.worker, schedule.staleness
    elif isinstance(schedule, tuple) and len(schedule) == 2:
        worker, tau = schedule
    else:
        raise TypeError(
            "`schedule` must be a (worker, staleness) pair or have `worker` and `staleness` "
            f"entries, got {type(schedule).__name__}."
        )
    if worker is None or tau is None:
        raise TypeError("`schedule` needs both `worker` and `staleness` entries.")
    worker, tau = np.asarray(worker), np.asarray(tau)
    if worker.ndim != 1 or tau.shape != worker.shape or worker.size == 0:
        raise ValueError(
            "`schedule.worker` and `schedule.staleness` must be non-empty 1-D arrays of equal "
            f"length, got shapes {worker.shape} and {tau.shape}."
        )
    for name, arr in (("worker", worker), ("staleness", tau)):
        if arr.dtype.kind not in "iu":
            raise TypeError(f"`schedule.{name}` must hold integers, got dtype {arr.dtype}.")
        if np.any(arr < 0):
            raise ValueError(f"`schedule.{name}` must be ≥ 0, got min {int(arr.min())}.")
    return WorkerSchedule(worker.astype(np.int32), tau.astype(np.int32))


def round_robin_schedule(num_workers: int, num_updates: int) -> WorkerSchedule:
    """n equal workers in turn: worker ``t mod n`` with τ_t = min(t, n − 1).

    The schedule of :func:`asgd_jax.delays.round_robin` (which gives the same τ sequence).
    """
    n = check_int("num_workers", num_workers, low=1)
    num = check_int("num_updates", num_updates, low=1)
    t = np.arange(num)
    return WorkerSchedule((t % n).astype(np.int32), np.minimum(t, n - 1).astype(np.int32))


class WorkerRounds(NamedTuple):
    """A schedule cut into rounds of parallel gradients (host arrays; R rounds, n devices).

    Update indices are relative to the start of the schedule; −1 marks an idle device.
    """

    update: np.ndarray  # int32[R, n]: the update whose gradient device d takes in round r.
    position: np.ndarray  # int32[R, n]: that update's position within its round.
    staleness: np.ndarray  # int32[R, n]: its staleness τ.
    order: np.ndarray  # int32[R, n]: the device of the j-th arrival of round r.
    size: np.ndarray  # int32[R]: arrivals in round r.
    flat_index: np.ndarray  # int32[T]: update t is arrival flat_index[t] of the R·n slots.


def plan_rounds(schedule: Any, num_devices: int) -> WorkerRounds:
    """Cuts a worker schedule into rounds that the devices can run in parallel.

    A round starting at update s takes the following updates in order while (i) no worker
    appears twice, (ii) each gradient's snapshot W_{t−τ_t} already exists (t − τ_t ≤ s)
    and (iii) there are at most ``num_devices`` of them. For round-robin schedules every
    round holds exactly n updates; for an event-driven schedule a fast worker that pushes
    twice in a row starts a new round.

    Args:
      schedule: a :class:`WorkerSchedule` or anything :func:`as_schedule` accepts.
      num_devices: devices on the worker axis; worker ids must be below it.

    Returns:
      A :class:`WorkerRounds`.
    """
    schedule = as_schedule(schedule)
    n = check_int("num_devices", num_devices, low=1)
    worker, tau = schedule.worker, schedule.staleness
    if int(worker.max()) >= n:
        raise ValueError(
            f"the schedule has {int(worker.max()) + 1} workers but the mesh axis has only {n} "
            f"devices: one device per worker needs num_workers ≤ {n}. Use more devices or "
            "fewer workers."
        )
    rounds: list[list[int]] = []
    current: list[int] = []
    start = 0
    for t in range(worker.size):
        busy = {int(worker[i]) for i in current}
        if current and (int(worker[t]) in busy or t - int(tau[t]) > start or len(current) == n):
            rounds.append(current)
            current, start = [], t
        current.append(t)
    rounds.append(current)

    num_rounds = len(rounds)
    update = np.full((num_rounds, n), -1, np.int32)
    position = np.zeros((num_rounds, n), np.int32)
    stale = np.zeros((num_rounds, n), np.int32)
    order = np.zeros((num_rounds, n), np.int32)
    size = np.zeros((num_rounds,), np.int32)
    flat_index = np.zeros((worker.size,), np.int32)
    for r, members in enumerate(rounds):
        size[r] = len(members)
        for j, t in enumerate(members):
            d = int(worker[t])
            update[r, d], position[r, d], stale[r, d], order[r, j] = t, j, tau[t], d
            flat_index[t] = r * n + j
    return WorkerRounds(update, position, stale, order, size, flat_index)


# τ of the next updates, as one small program per (delay model, length).
_upcoming_staleness = jax.jit(upcoming_staleness, static_argnums=(1,))


def _check_schedule_against(opt_state: Any, schedule: WorkerSchedule) -> None:
    """Raises if the optimizer's delay model will not emit the schedule's τ sequence."""
    num = int(schedule.staleness.size)
    got = np.asarray(fetch(_upcoming_staleness(opt_state, num)))
    bad = np.flatnonzero(got != schedule.staleness)
    if bad.size:
        t = int(bad[0])
        raise ValueError(
            f"the optimizer's delay model disagrees with the schedule at update {t}: it "
            f"gives τ={int(got[t])}, the schedule τ={int(schedule.staleness[t])}. Build the "
            "optimizer with the schedule's delays, e.g. "
            "asgd.stale(inner, asgd.delays.trace(schedule)) or the same workers model and key."
        )


def one_device_per_worker(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    *,
    axis_name: str = "workers",
    check_schedule: bool = True,
) -> Callable[[Any, Any, Any, Any], tuple[Any, Any, jax.Array]]:
    """Simulated asynchronous training with one device per worker.

    Device d plays worker d of a schedule. The schedule is cut into rounds
    (:func:`plan_rounds`); in each round the devices take their gradients in parallel, each
    on its own batch at the snapshot W_{t−τ_t} that its update t will read
    (:func:`asgd_jax.stale_params_at`), the gradients are shared with one all-reduce, and
    every device applies the round's arrivals one after another in their simulated order
    with :meth:`asgd_jax.Step.apply` (so each gradient is applied once, with its own
    staleness, and staleness-aware transforms see it). All rounds run in one program.

    The result equals the single-device simulation of the same schedule, i.e. the core
    contract with ``tx`` and batch ``batches[t]`` at update t: τ sequence, step counts and
    metrics exactly; parameters and losses up to float rounding of the separately compiled
    gradient programs (the updates are applied in the same order with the same arithmetic;
    bitwise equal on CPU in the tests, which allow rtol 2e-5, atol 1e-6).

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``, a worker's loss on its local batch.
      tx: an optimizer containing ``asgd.stale(…)`` whose delay model emits the schedule's
        τ sequence (e.g. ``asgd.delays.round_robin(n)`` with :func:`round_robin_schedule`,
        ``asgd.delays.trace(schedule)``, or the ``asgd.workers`` model and key that made
        the schedule).
      mesh: a mesh with the axis ``axis_name``; its size is the number of devices/workers.
      axis_name: the worker axis.
      check_schedule: before running, check that the optimizer's delay model emits the
        schedule's τ sequence (one small program and a host read per call).

    Returns:
      ``run(params, opt_state, batches, schedule) -> (params, opt_state, losses)``:
      ``batches`` is a pytree with a leading axis of one local batch per update (length T
      of the schedule), ``params``/``opt_state`` are replicated on ``mesh`` (see
      :func:`shard_init`), and ``losses[t]`` is the loss of the gradient applied at update
      t. Raises ValueError when the schedule has more workers than devices.
    """
    num_devices = _check_axis(mesh, axis_name)
    step = make_step(loss_fn, tx)

    def per_device(params, opt_state, round_batches, plan, full):
        d = lax.axis_index(axis_name)

        def one_round(carry, xs):
            params, opt_state = carry
            batch, r_update, r_position, r_tau, r_order, r_size = xs
            batch = jax.tree.map(lambda x: x[0], batch)
            # Device-varying from the start: the gradient must be this device's own (under
            # shard_map, jax.grad of a replicated value is summed over the devices).
            varying = lax.pcast(params, axis_name, to="varying")
            snapshot = stale_params_at(opt_state, varying, ahead=r_position[d], staleness=r_tau[d])
            loss, grads = jax.value_and_grad(loss_fn)(snapshot, batch)
            active = r_update[d] >= 0
            # Share every worker's gradient: each device fills its own slot and one psum
            # (exact: the other slots add zeros) gives all devices all n gradients.
            mine = jnp.arange(num_devices) == d

            def slot(x):
                x = jnp.where(active, x, jnp.zeros_like(x))
                return jnp.where(mine.reshape((-1,) + (1,) * x.ndim), x[None], 0)

            all_loss, all_grads = lax.psum(jax.tree.map(slot, (loss, grads)), axis_name)

            def arrive(carry, j):
                src = r_order[j]
                grads = jax.tree.map(lambda x: x[src], all_grads)
                apply = lambda c: step.apply(grads, *c)  # noqa: E731
                carry = apply(carry) if full else lax.cond(j < r_size, apply, lambda c: c, carry)
                return carry, all_loss[src]

            return lax.scan(arrive, (params, opt_state), jnp.arange(num_devices))

        (params, opt_state), losses = lax.scan(
            one_round, (params, opt_state), (round_batches, *plan)
        )
        return params, opt_state, losses

    def program(params, opt_state, round_batches, plan, flat_index, full):
        s_specs = state_specs(opt_state, params)
        b_specs = jax.tree.map(lambda _: P(None, axis_name), round_batches)
        mapped = jax.shard_map(
            lambda p, s, b, pl: per_device(p, s, b, pl, full),
            mesh=mesh,
            in_specs=(P(), s_specs, b_specs, P()),
            out_specs=(P(), s_specs, P()),
        )
        params, opt_state, losses = mapped(params, opt_state, round_batches, plan)
        return params, opt_state, losses.reshape(-1)[flat_index]

    jitted = _Blocking(
        jax.jit(program, donate_argnums=(0, 1), static_argnums=(5,)),
        _block_every(mesh.devices.flat),
    )

    def run(params, opt_state, batches, schedule):
        if not has_stale_state(opt_state):
            raise ValueError(
                "one_device_per_worker needs an optimizer containing asgd.stale(...); a "
                "synchronous optimizer has no workers to simulate."
            )
        schedule = as_schedule(schedule)
        rounds = plan_rounds(schedule, num_devices)
        num = schedule.worker.size
        for leaf in jax.tree.leaves(batches):
            if np.shape(leaf)[:1] != (num,):
                raise ValueError(
                    f"`batches` needs one local batch per update: leading axis {num}, got "
                    f"shape {np.shape(leaf)}."
                )
        if check_schedule:
            _check_schedule_against(opt_state, schedule)
        index = np.maximum(rounds.update, 0)
        round_batches = jax.tree.map(
            lambda x: _place(np.asarray(x)[index], NamedSharding(mesh, P(None, axis_name))),
            batches,
        )
        replicated = NamedSharding(mesh, P())
        plan = tuple(
            _place(a, replicated)
            for a in (rounds.update, rounds.position, rounds.staleness, rounds.order, rounds.size)
        )
        full = bool(np.all(rounds.size == num_devices))
        flat_index = _place(rounds.flat_index, replicated)
        return jitted(params, opt_state, round_batches, plan, flat_index, full)

    return run
