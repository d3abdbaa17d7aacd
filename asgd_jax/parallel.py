"""Data-parallel and simulated-asynchronous training across devices and hosts.

Three ways to spread the core contract over devices, all built on :func:`asgd_jax.stale`:

* **Synchronous data parallelism** (:func:`shard_map_step`, :func:`pmap_step`): the global
  batch is split along a mesh axis, each device takes the gradient of its shard, the
  gradients are averaged with an all-reduce (``lax.pmean`` over ``axis_name``) and every
  device applies the same update. With a plain optax optimizer this is synchronous SGD;
  with ``asgd.stale(...)`` the gradient is taken at ``stale_params(state, params)``, the
  replicated state picks the same τ_t on every device (τ is a pure function of the key), so
  1, 2, 4 or 8 devices run the same science up to float reduction order.
* **One device per worker** (:func:`one_device_per_worker`): each device plays one
  asynchronous worker of a schedule (worker id and staleness per update, e.g.
  :func:`round_robin_schedule` or :func:`asgd_jax.workers.simulate`). In each round the
  devices take their gradients in parallel, each at its own stale snapshot, and the server
  applies the arrivals one after another in their simulated order.
* **Several processes / hosts** (:func:`initialize`, :func:`launch_local`): the same steps
  under JAX's multi-controller runtime (``jax.distributed``).

Launching on several hosts: run the same program on every host with the coordinator's
address, the number of processes and each process's id, and call :func:`initialize` before
any other JAX call::

  # on host i of N (host 0 runs the coordinator on port 1234)
  ASGD_JAX_COORDINATOR=host0:1234 ASGD_JAX_NUM_PROCESSES=N ASGD_JAX_PROCESS_ID=i \\
      python train.py

  # train.py
  asgd.parallel.initialize()                 # reads the variables above
  mesh = asgd.parallel.data_mesh()           # every device of every process
  params, state = asgd.parallel.shard_init(tx, params, mesh)
  step = asgd.parallel.shard_map_step(loss, tx, mesh, scan=True)
  params, state, metrics = step(params, state, asgd.parallel.shard_batch(batches, mesh, 1))

On SLURM, Open MPI or Cloud TPU, ``initialize()`` with no variables set lets JAX detect the
cluster. :func:`launch_local` starts N such processes on one machine (CPU devices).

Placement: parameters are replicated over the data axis (optionally sharded over other mesh
axes with ``param_specs``); every optimizer-state leaf shaped like a parameter gets that
parameter's spec and a stacked ``(K, …)`` history leaf gets ``P(None, *spec)``
(:func:`state_specs`), so the parameter history keeps the parameters' sharding and is
donated and updated in place on every device. ``scan=True`` runs many steps in one program:
no host round trip per step.

References:
  Dean et al., *Large Scale Distributed Deep Networks*, NeurIPS 2012 (Downpour SGD).
  Goyal et al., *Accurate, Large Minibatch SGD*, 2017, arXiv 1706.02677 (all-reduce SGD).
  Koloskova, Stich & Jaggi, NeurIPS 2022, arXiv 2206.08307 (asynchronous SGD).
"""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from asgd_jax import delays as delays_lib
from asgd_jax import history as history_lib
from asgd_jax.transforms import StaleState, find_stale_state, stale_params, staleness

__all__ = [
    "data_mesh",
    "state_specs",
    "replicate",
    "shard_batch",
    "shard_init",
    "fetch",
    "shard_map_step",
    "pmap_step",
    "pmap_replicate",
    "pmap_unreplicate",
    "WorkerSchedule",
    "WorkerRounds",
    "as_schedule",
    "round_robin_schedule",
    "plan_rounds",
    "one_device_per_worker",
    "initialize",
    "launch_local",
    "ENV_COORDINATOR",
    "ENV_NUM_PROCESSES",
    "ENV_PROCESS_ID",
]

LossFn = Callable[[optax.Params, Any], jax.Array]
StepFn = Callable[[optax.Params, optax.OptState, Any], tuple[Any, Any, dict[str, jax.Array]]]

# On the CPU backend, dispatching many programs with cross-device collectives without ever
# waiting can abort the process (XLA rendezvous timeout): wait on every this-many-th call.
_CPU_BLOCK_EVERY = 16


# --------------------------------------------------------------------------------------------
# Meshes, specs and placement.


def data_mesh(
    num_devices: int | None = None,
    axis_name: str = "data",
    *,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A one-axis mesh over the first ``num_devices`` devices (all processes' devices).

    Built with ``jax.sharding.Mesh`` directly (``jax.make_mesh`` makes Explicit axes, which
    reject unplaced inputs to ``shard_map``).

    Args:
      num_devices: how many devices to use; ``None`` uses all of ``devices``.
      axis_name: the name of the mesh axis (the ``axis_name`` of the all-reduce).
      devices: the devices to choose from; defaults to ``jax.devices()``.

    Returns:
      A ``Mesh`` with the single axis ``axis_name``.
    """
    devices = list(jax.devices() if devices is None else devices)
    if num_devices is None:
        num_devices = len(devices)
    num_devices = delays_lib._check_int("num_devices", num_devices, low=1, high=len(devices))
    if not isinstance(axis_name, str) or not axis_name:
        raise TypeError(f"`axis_name` must be a non-empty str, got {axis_name!r}.")
    return Mesh(np.array(devices[:num_devices]), (axis_name,))


def _check_axis(mesh: Mesh, axis_name: str) -> int:
    if not isinstance(mesh, Mesh):
        raise TypeError(f"`mesh` must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
    if axis_name not in mesh.axis_names:
        raise ValueError(
            f"`axis_name`={axis_name!r} is not an axis of the mesh; its axes are "
            f"{tuple(mesh.axis_names)}. Pass one of them, or build the mesh with "
            f"asgd_jax.parallel.data_mesh(axis_name={axis_name!r})."
        )
    return int(mesh.shape[axis_name])


def _is_spec(x: Any) -> bool:
    return isinstance(x, P)


def _param_specs(params: Any, param_specs: Any, mesh: Mesh, axis_name: str) -> Any:
    """``param_specs`` checked against ``params`` and the mesh (default: replicated)."""
    if param_specs is None:
        return jax.tree.map(lambda _: P(), params)
    if _is_spec(param_specs):
        param_specs = jax.tree.map(lambda _: param_specs, params)
    try:
        jax.tree.map(lambda _, s: s, params, param_specs, is_leaf=_is_spec)
    except (ValueError, TypeError) as error:
        raise ValueError(
            "`param_specs` must be a pytree of PartitionSpecs shaped like params."
        ) from error
    for spec in jax.tree.leaves(param_specs, is_leaf=_is_spec):
        for entry in spec:
            names = entry if isinstance(entry, tuple) else (entry,)
            for name in names:
                if name is None:
                    continue
                if name == axis_name:
                    raise ValueError(
                        f"`param_specs` must not shard parameters over the data axis "
                        f"{axis_name!r} (parameters are replicated across it); got {spec}."
                    )
                if name not in mesh.axis_names:
                    raise ValueError(
                        f"`param_specs` names mesh axis {name!r}, which the mesh does not "
                        f"have; its axes are {tuple(mesh.axis_names)}."
                    )
    return param_specs


def state_specs(opt_state: Any, params: Any, param_specs: Any = None) -> Any:
    """Partition specs for an optimizer state, following the parameters' specs.

    A floating state leaf whose tree path ends with a parameter's path and whose shape is
    that parameter's shape (momentum, the stale snapshot, …) gets the parameter's spec; one
    of shape ``(K, *param.shape)`` (the parameter history of :func:`asgd_jax.stale`) gets
    ``P(None, *spec)``: the history keeps the parameter's sharding with an unsharded leading
    axis. Everything else (counters, τ, the delay state, metrics) is replicated, ``P()``.

    Args:
      opt_state: an optimizer state (arrays or ``jax.ShapeDtypeStruct``).
      params: the parameters it was initialised from.
      param_specs: a pytree of ``PartitionSpec`` like ``params`` (or one spec for all);
        ``None`` means replicated.

    Returns:
      A pytree of ``PartitionSpec`` with the structure of ``opt_state``.
    """
    if param_specs is None:
        param_specs = jax.tree.map(lambda _: P(), params)
    elif _is_spec(param_specs):
        param_specs = jax.tree.map(lambda _: param_specs, params)
    paths = jax.tree_util.tree_flatten_with_path(params)[0]
    specs = jax.tree.leaves(param_specs, is_leaf=_is_spec)
    table = [
        (tuple(path), tuple(np.shape(leaf)), spec)
        for (path, leaf), spec in zip(paths, specs, strict=True)
    ]

    def spec_for(path: tuple, leaf: Any) -> P:
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.inexact):
            return P()
        shape = tuple(np.shape(leaf))
        best, best_len = P(), -1
        for param_path, param_shape, spec in table:
            n = len(param_path)
            if n > len(path) or (n and tuple(path[-n:]) != param_path) or n <= best_len:
                continue
            if shape == param_shape:
                best, best_len = spec, n
            elif len(shape) == len(param_shape) + 1 and shape[1:] == param_shape:
                best, best_len = P(None, *spec), n
        return best

    return jax.tree_util.tree_map_with_path(spec_for, opt_state)


def _place(value: Any, sharding: NamedSharding) -> jax.Array:
    """``value`` as a global array with ``sharding``.

    Host data (the same in every process) is cut into the pieces each process's devices
    hold; device arrays are copied with ``jax.device_put`` (never aliased, since the placed
    trees are donated to the train steps).
    """
    if isinstance(value, jax.Array):
        if not value.is_fully_addressable or sharding.is_fully_addressable:
            # Never alias the caller's buffers: the placed tree is donated by the steps.
            return jax.device_put(value, sharding, may_alias=False)
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def replicate(tree: Any, mesh: Mesh, specs: Any = None) -> Any:
    """Places ``tree`` on ``mesh`` (replicated, or sharded by ``specs``).

    Works under several processes: each process passes the same host values and supplies
    the pieces its own devices hold.

    Args:
      tree: a pytree of arrays.
      mesh: the device mesh.
      specs: a pytree of ``PartitionSpec`` like ``tree`` (or one spec); ``None`` replicates.

    Returns:
      ``tree`` with every leaf a global ``jax.Array`` on ``mesh``.
    """
    if specs is None or _is_spec(specs):
        spec = P() if specs is None else specs
        return jax.tree.map(lambda x: _place(x, NamedSharding(mesh, spec)), tree)
    return jax.tree.map(
        lambda x, s: _place(x, NamedSharding(mesh, s)), tree, specs, is_leaf=_is_spec
    )


def _check_batch(batch: Any, num_devices: int, axis_name: str, batch_axis: int) -> None:
    leaves = jax.tree.leaves(batch)
    if not leaves:
        raise ValueError("`batch` has no arrays.")
    for leaf in leaves:
        shape = np.shape(leaf)
        if len(shape) <= batch_axis:
            raise ValueError(
                f"every batch array needs a batch axis at position {batch_axis}, got shape {shape}."
            )
        if shape[batch_axis] % num_devices:
            raise ValueError(
                f"the global batch size {shape[batch_axis]} is not divisible by the "
                f"{num_devices} devices of mesh axis {axis_name!r}; use a global batch that "
                f"is a multiple of {num_devices} (e.g. "
                f"{(shape[batch_axis] // num_devices + 1) * num_devices})."
            )


def shard_batch(batch: Any, mesh: Mesh, batch_axis: int = 0, *, axis_name: str = "data") -> Any:
    """Splits a global batch along ``axis_name`` of ``mesh``.

    Every process passes the same global batch (for a batch loaded per process, use
    ``jax.make_array_from_process_local_data`` with the same sharding).

    Args:
      batch: a pytree of arrays whose axis ``batch_axis`` is the global batch.
      mesh: the device mesh.
      batch_axis: 0 for one step's batch, 1 for stacked steps ``(num_steps, batch, …)``.
      axis_name: the mesh axis to split over.

    Returns:
      ``batch`` as global arrays sharded ``P(None, …, axis_name)``.
    """
    num_devices = _check_axis(mesh, axis_name)
    _check_batch(batch, num_devices, axis_name, batch_axis)
    spec = P(*([None] * batch_axis), axis_name)
    return jax.tree.map(lambda x: _place(x, NamedSharding(mesh, spec)), batch)


def shard_init(
    tx: optax.GradientTransformation,
    params: optax.Params,
    mesh: Mesh,
    *,
    param_specs: Any = None,
    axis_name: str = "data",
) -> tuple[optax.Params, optax.OptState]:
    """Places ``params`` on ``mesh`` and builds ``tx``'s state there, already sharded.

    The state (the stale wrapper's K-snapshot history included) is created on the devices
    by one jitted ``tx.init`` with output shardings from :func:`state_specs`, so it never
    exists on the host.

    Args:
      tx: the optimizer, e.g. ``asgd.stale(optax.sgd(0.1), asgd.delays.uniform(0, 8))``.
      params: host parameters (the same on every process).
      mesh: the device mesh.
      param_specs: specs of the parameters over non-data mesh axes; ``None`` replicates.
      axis_name: the data axis (parameters are replicated over it).

    Returns:
      ``(params, opt_state)`` as global arrays on ``mesh``.
    """
    _check_axis(mesh, axis_name)
    p_specs = _param_specs(params, param_specs, mesh, axis_name)
    params = replicate(params, mesh, p_specs)
    abstract = jax.eval_shape(tx.init, params)
    shardings = jax.tree.map(
        lambda s: NamedSharding(mesh, s), state_specs(abstract, params, p_specs), is_leaf=_is_spec
    )
    return params, jax.jit(tx.init, out_shardings=shardings)(params)


def fetch(tree: Any) -> Any:
    """Host NumPy copies of global arrays, also when other processes hold some shards."""

    def get(x: Any) -> np.ndarray:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.sharding.is_fully_replicated:
                return np.asarray(x.addressable_data(0))
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(get, tree)


# --------------------------------------------------------------------------------------------
# Synchronous and stale data-parallel steps.


def _has_stale_state(opt_state: Any) -> bool:
    found = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, StaleState))
    return any(isinstance(x, StaleState) for x in found)


def _data_parallel_update(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    params: Any,
    opt_state: Any,
    batch: Any,
    axis_name: str,
    cast_to_varying: bool,
) -> tuple[Any, Any, dict[str, jax.Array]]:
    """One all-reduce step: mean gradient over ``axis_name`` at W_{t−τ_t} (or W_t), applied."""
    is_stale = _has_stale_state(opt_state)
    at = stale_params(opt_state, params) if is_stale else params
    if cast_to_varying:
        # Replicated inputs are invariant over the axis: without this cast `jax.grad` under
        # shard_map returns the gradient already summed over devices (see DESIGN.md).
        at = lax.pcast(at, axis_name, to="varying")
    loss, grads = jax.value_and_grad(loss_fn)(at, batch)
    grads = lax.pmean(grads, axis_name)
    metrics = {"loss": lax.pmean(loss, axis_name)}
    if is_stale:
        metrics["staleness"] = staleness(opt_state)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics


def _scanned(one_step: Callable, scan: bool) -> Callable:
    if not scan:
        return one_step

    def run(params, opt_state, batches):
        def body(carry, batch):
            params, opt_state, metrics = one_step(*carry, batch)
            return (params, opt_state), metrics

        (params, opt_state), metrics = lax.scan(body, (params, opt_state), batches)
        return params, opt_state, metrics

    return run


class _Step:
    """A jitted step that, on CPU meshes, waits on every ``_CPU_BLOCK_EVERY``-th call."""

    def __init__(self, fn: Callable, block_every: int):
        self.fn = fn  # the underlying function (jitted for shard_map: has .lower()).
        self._block_every = block_every
        self._calls = 0

    def __call__(self, *args: Any) -> Any:
        out = self.fn(*args)
        if self._block_every:
            self._calls += 1
            leaves = jax.tree.leaves(out)
            if self._calls % self._block_every == 0 and not any(
                isinstance(x, jax.core.Tracer) for x in leaves
            ):
                jax.block_until_ready(out)
        return out


def _block_every(devices: Sequence[jax.Device]) -> int:
    devices = list(devices)
    return _CPU_BLOCK_EVERY if len(devices) > 1 and devices[0].platform == "cpu" else 0


def shard_map_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    *,
    axis_name: str = "data",
    param_specs: Any = None,
    scan: bool = False,
    donate: bool = True,
) -> StepFn:
    """A jitted data-parallel train step under ``jax.shard_map`` (the primary path).

    Each device takes ``jax.value_and_grad(loss_fn)`` on its shard of the global batch, at
    ``asgd.stale_params(state, params)`` when ``tx`` contains :func:`asgd_jax.stale` and at
    ``params`` otherwise; the gradients are averaged with ``lax.pmean(…, axis_name)`` and
    every device applies the same ``tx.update``. The optimizer state is replicated over the
    data axis, so every device draws the same τ_t and reads the same snapshot; its history
    is donated and updated in place. Equal to single-device full-batch training up to float
    reduction order when ``loss_fn`` is a mean over examples.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``, the mean loss over a (local) batch. With
        ``param_specs`` sharding parameters over other mesh axes, it sees local shards and
        does its own collectives over those axes.
      tx: any optax transformation (``optax.sgd(…)`` for the synchronous baseline, or one
        containing ``asgd.stale(…)``).
      mesh: a mesh with the axis ``axis_name`` (see :func:`data_mesh`).
      axis_name: the mesh axis the batch is split over and the gradients all-reduced over.
      param_specs: ``PartitionSpec``s of the parameters over other mesh axes (``None``:
        replicated). State leaves follow them (:func:`state_specs`).
      scan: when True the step takes ``batches`` with a leading steps axis ``(num_steps,
        global_batch, …)`` and runs them all in one program (``lax.scan``): no host round
        trip per step.
      donate: donate ``params`` and the state (in-place updates).

    Returns:
      ``step(params, opt_state, batch) -> (params, opt_state, metrics)`` with ``metrics``
      a dict holding ``"loss"`` (the global mean loss) and, for stale optimizers,
      ``"staleness"`` (τ of the step's gradient); each with a leading steps axis if
      ``scan``. Raises ValueError if the global batch is not divisible by the mesh axis.
    """
    num_devices = _check_axis(mesh, axis_name)
    batch_axis = 1 if scan else 0

    def one_step(params, opt_state, batch):
        return _data_parallel_update(loss_fn, tx, params, opt_state, batch, axis_name, True)

    per_device = _scanned(one_step, scan)

    def step(params, opt_state, batch):
        _check_batch(batch, num_devices, axis_name, batch_axis)
        p_specs = _param_specs(params, param_specs, mesh, axis_name)
        s_specs = state_specs(opt_state, params, p_specs)
        b_spec = P(*([None] * batch_axis), axis_name)
        b_specs = jax.tree.map(lambda _: b_spec, batch)
        mapped = jax.shard_map(
            per_device,
            mesh=mesh,
            in_specs=(p_specs, s_specs, b_specs),
            out_specs=(p_specs, s_specs, P()),
        )
        return mapped(params, opt_state, batch)

    jitted = jax.jit(step, donate_argnums=(0, 1) if donate else ())
    return _Step(jitted, _block_every(mesh.devices.flat))


def pmap_replicate(tree: Any, devices: Sequence[jax.Device] | None = None) -> Any:
    """Stacks one copy of ``tree`` per device along a new leading axis, placed for pmap.

    (``jax.device_put_replicated`` is gone in JAX 0.10.)
    """
    devices = list(jax.local_devices() if devices is None else devices)
    sharding = NamedSharding(Mesh(np.array(devices), ("_replica",)), P("_replica"))

    def stack(x: Any) -> jax.Array:
        host = np.asarray(x)
        return jax.device_put(np.broadcast_to(host[None], (len(devices), *host.shape)), sharding)

    return jax.tree.map(stack, tree)


def pmap_unreplicate(tree: Any) -> Any:
    """The first device's copy of a replicated (leading device axis) tree."""
    return jax.tree.map(lambda x: x[0], tree)


def pmap_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    *,
    axis_name: str = "data",
    devices: Sequence[jax.Device] | None = None,
    scan: bool = False,
    donate: bool = True,
    global_batch: bool = True,
) -> StepFn:
    """The data-parallel train step of :func:`shard_map_step`, written with ``jax.pmap``.

    For code that still uses pmap (which JAX now implements as ``jit(shard_map)``). Params
    and state carry a leading device axis (:func:`pmap_replicate`); the step takes the
    *global* batch and splits it across the devices itself, so the same data gives the same
    run as :func:`shard_map_step`.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``, the mean loss over a local batch.
      tx: any optax transformation, e.g. one containing ``asgd.stale(…)``.
      axis_name: the pmap axis name of the all-reduce.
      devices: the devices to map over; defaults to ``jax.local_devices()``.
      scan: take ``(num_steps, global_batch, …)`` batches and scan over the steps.
      donate: donate the replicated params and state.
      global_batch: the step takes the global batch and splits it; with False it takes
        batches already split the pmap way, with a leading device axis ``(n, local_batch,
        …)`` (``(n, num_steps, local_batch, …)`` with ``scan``), e.g. kept on the devices.

    Returns:
      ``step(params, opt_state, batch) -> (params, opt_state, metrics)`` like
      :func:`shard_map_step`, with ``metrics`` taken from the first device.
    """
    devices = list(jax.local_devices() if devices is None else devices)
    num_devices = len(devices)
    if not isinstance(axis_name, str) or not axis_name:
        raise TypeError(f"`axis_name` must be a non-empty str, got {axis_name!r}.")

    def one_step(params, opt_state, batch):
        return _data_parallel_update(loss_fn, tx, params, opt_state, batch, axis_name, False)

    mapped = jax.pmap(
        _scanned(one_step, scan),
        axis_name=axis_name,
        devices=devices,
        donate_argnums=(0, 1) if donate else (),
    )

    def split(x: Any) -> Any:
        xp = x if isinstance(x, jax.Array) else np.asarray(x)
        if not scan:
            return xp.reshape(num_devices, -1, *xp.shape[1:])
        local = xp.reshape(xp.shape[0], num_devices, -1, *xp.shape[2:])
        return local.swapaxes(0, 1)

    def step(params, opt_state, batch):
        if global_batch:
            _check_batch(batch, num_devices, axis_name, 1 if scan else 0)
            batch = jax.tree.map(split, batch)
        else:
            for leaf in jax.tree.leaves(batch):
                if np.shape(leaf)[:1] != (num_devices,):
                    raise ValueError(
                        f"with global_batch=False every batch array needs a leading device "
                        f"axis of size {num_devices}, got shape {np.shape(leaf)}."
                    )
        params, opt_state, metrics = mapped(params, opt_state, batch)
        return params, opt_state, pmap_unreplicate(metrics)

    return _Step(step, _block_every(devices))


# --------------------------------------------------------------------------------------------
# One device per worker.


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
    n = delays_lib._check_int("num_workers", num_workers, low=1)
    num = delays_lib._check_int("num_updates", num_updates, low=1)
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
    n = delays_lib._check_int("num_devices", num_devices, low=1)
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


def _worker_snapshot(
    opt_state: Any, params: Any, position: jax.Array, tau: jax.Array, axis_name: str
) -> Any:
    """W_{s+j−τ}: the snapshot of the j-th arrival of a round that starts at step s.

    Exactly what ``stale_params`` returns when the wrapper reaches update s + j. Position 0
    is ``stale_params(state, params)`` itself. A later arrival reads a snapshot no newer
    than W_s (the round plan guarantees it), so it is ``stale_params`` of the state with W_s
    already recorded and that arrival's τ.
    """
    s = find_stale_state(opt_state)
    if isinstance(s.history, tuple) and not s.history:
        return lax.pcast(params, axis_name, to="varying")  # max_delay == 0: always fresh.
    first = stale_params(opt_state, params)
    ahead = s._replace(
        history=history_lib.write(s.history, params, s.step),
        staleness=tau,
        stale_step=jnp.maximum(s.step + position - tau, 0),
    )
    later = stale_params(ahead, params)
    # `position` depends on the device index, so the result varies over the axis.
    return jax.tree.map(lambda f, w: jnp.where(position == 0, f, w), first, later)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _tau_sequence(delay: Any, num: int, first: jax.Array, delay_state: Any) -> jax.Array:
    """τ_0 (already drawn) followed by the next ``num − 1`` draws of ``delay``."""
    max_delay = int(delay.max_delay)

    def draw(state, _):
        tau, state = delay.next(state)
        return state, jnp.minimum(tau, max_delay).astype(jnp.int32)

    _, rest = lax.scan(draw, delay_state, None, length=num - 1)
    return jnp.concatenate([first[None], rest])


def _check_schedule_against(opt_state: Any, schedule: WorkerSchedule) -> None:
    """Raises if the optimizer's delay model will not emit the schedule's τ sequence."""
    s = find_stale_state(opt_state)
    num = int(schedule.staleness.size)
    got = np.asarray(fetch(_tau_sequence(s.delay.value, num, s.staleness, s.delay_state)))
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
    at its own stale snapshot W_{t−τ_t} on its own batch, the gradients are shared with one
    all-reduce, and every device applies the round's arrivals one after another in their
    simulated order with ``tx.update`` (so each gradient is applied once, with its own
    staleness, and staleness-aware transforms see it). All rounds run in one program.

    The result equals the single-device simulation of the same schedule, i.e. the core
    contract with ``tx`` and batch ``batches[t]`` at update t: τ sequence, step counts and
    metrics exactly; parameters and losses up to float rounding of the separately compiled
    gradient programs (the updates are applied in the same order with the same arithmetic;
    bitwise equal on CPU in the tests, which allow rtol 2e-5, atol 1e-6). Each round copies
    the history once per device (to read snapshots ahead of the sequential updates).

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
    block_every = _block_every(mesh.devices.flat)
    calls = [0]

    def per_device(params, opt_state, round_batches, plan, full):
        update, position, tau, order, size = plan
        d = lax.axis_index(axis_name)

        def one_round(carry, xs):
            params, opt_state = carry
            batch, r_update, r_position, r_tau, r_order, r_size = xs
            batch = jax.tree.map(lambda x: x[0], batch)
            snap = _worker_snapshot(opt_state, params, r_position[d], r_tau[d], axis_name)
            loss, grads = jax.value_and_grad(loss_fn)(snap, batch)
            active = r_update[d] >= 0
            # Share every worker's gradient: each device fills its own slot and one psum
            # (exact: the other slots add zeros) gives all devices all n gradients.
            mine = jnp.arange(num_devices) == d

            def slot(x):
                x = jnp.where(active, x, jnp.zeros_like(x))
                return jnp.where(mine.reshape((-1,) + (1,) * x.ndim), x[None], 0)

            all_loss, all_grads = lax.psum(jax.tree.map(slot, (loss, grads)), axis_name)

            def apply(carry, j):
                params, opt_state = carry
                src = r_order[j]
                g = jax.tree.map(lambda x: x[src], all_grads)

                def do(operand):
                    params, opt_state = operand
                    updates, opt_state = tx.update(g, opt_state, params)
                    return optax.apply_updates(params, updates), opt_state

                if full:
                    carry = do(carry)
                else:
                    carry = lax.cond(j < r_size, do, lambda c: c, carry)
                return carry, all_loss[src]

            carry, losses = lax.scan(apply, (params, opt_state), jnp.arange(num_devices))
            return carry, losses

        xs = (round_batches, update, position, tau, order, size)
        (params, opt_state), losses = lax.scan(one_round, (params, opt_state), xs)
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

    jitted = jax.jit(program, donate_argnums=(0, 1), static_argnums=(5,))

    def run(params, opt_state, batches, schedule):
        if not _has_stale_state(opt_state):
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
        out = jitted(params, opt_state, round_batches, plan, flat_index, full)
        calls[0] += 1
        if block_every and calls[0] % block_every == 0:
            jax.block_until_ready(out)
        return out

    return run


# --------------------------------------------------------------------------------------------
# Several processes.

ENV_COORDINATOR = "ASGD_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "ASGD_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "ASGD_JAX_PROCESS_ID"
_ENV_INIT_TIMEOUT = "ASGD_JAX_INITIALIZATION_TIMEOUT"
_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: Sequence[int] | None = None,
    initialization_timeout: int | None = None,
) -> None:
    """Joins this process to a multi-process JAX run (``jax.distributed.initialize``).

    Call it first, before any other JAX call. Arguments left ``None`` are read from the
    environment variables ``ASGD_JAX_COORDINATOR`` (``host:port`` of process 0),
    ``ASGD_JAX_NUM_PROCESSES`` and ``ASGD_JAX_PROCESS_ID`` (set by :func:`launch_local`);
    when none is given anywhere JAX detects the cluster itself (SLURM, Open MPI, Cloud
    TPU). Afterwards ``jax.devices()`` lists every process's devices and a mesh over them
    (:func:`data_mesh`) runs :func:`shard_map_step` across processes.

    Args:
      coordinator_address: ``host:port`` of the coordinator (process 0).
      num_processes: number of processes, ≥ 1.
      process_id: this process's id in ``[0, num_processes)``.
      local_device_ids: restrict this process to these local devices.
      initialization_timeout: seconds to wait for all processes to join (default 300, or
        ``ASGD_JAX_INITIALIZATION_TIMEOUT``).
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get(ENV_COORDINATOR)
    if num_processes is None and env.get(ENV_NUM_PROCESSES):
        num_processes = int(env[ENV_NUM_PROCESSES])
    if process_id is None and env.get(ENV_PROCESS_ID):
        process_id = int(env[ENV_PROCESS_ID])
    if initialization_timeout is None:
        initialization_timeout = int(env.get(_ENV_INIT_TIMEOUT, "300"))
    timeout = delays_lib._check_int("initialization_timeout", initialization_timeout, low=1)
    if jax.distributed.is_initialized():
        raise RuntimeError("jax.distributed is already initialized in this process.")
    given = (coordinator_address, num_processes, process_id)
    if all(v is None for v in given):
        jax.distributed.initialize(initialization_timeout=timeout)
        return
    if any(v is None for v in given):
        raise ValueError(
            "give all of coordinator_address, num_processes and process_id (or the variables "
            f"{ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}), or none of them."
        )
    num_processes = delays_lib._check_int("num_processes", num_processes, low=1)
    process_id = delays_lib._check_int("process_id", process_id, high=num_processes - 1)
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
        initialization_timeout=timeout,
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(handle: Any, limit: int = 4000) -> str:
    handle.seek(0)
    return handle.read().decode(errors="replace")[-limit:]


def launch_local(
    module: str,
    args: Sequence[str] = (),
    *,
    num_processes: int = 2,
    devices_per_process: int = 1,
    timeout: float = 120.0,
    initialization_timeout: int = 60,
    env: dict[str, str] | None = None,
) -> list[str]:
    """Runs ``python -m module *args`` as ``num_processes`` CPU processes of one JAX run.

    Each process gets ``devices_per_process`` virtual CPU devices and the variables read by
    :func:`initialize` (coordinator on a free localhost port). The call waits for all of
    them; if one fails or ``timeout`` passes, every process still running is killed and a
    ``RuntimeError`` carries the output of the failures. Nothing is left running.

    Args:
      module: the module to run (it calls :func:`initialize` first).
      args: its command-line arguments.
      num_processes: number of processes, ≥ 1.
      devices_per_process: virtual CPU devices per process, ≥ 1.
      timeout: seconds for the whole run.
      initialization_timeout: seconds each process waits for the others to join.
      env: extra environment variables.

    Returns:
      The standard output of each process, in process-id order.
    """
    num_processes = delays_lib._check_int("num_processes", num_processes, low=1)
    devices_per_process = delays_lib._check_int("devices_per_process", devices_per_process, low=1)
    if not timeout > 0:
        raise ValueError(f"`timeout` must be > 0, got {timeout}.")
    base = dict(os.environ)
    base.update(env or {})
    flags = [f for f in base.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_COUNT_FLAG)]
    base["XLA_FLAGS"] = " ".join([*flags, f"{_DEVICE_COUNT_FLAG}={devices_per_process}"])
    base["JAX_PLATFORMS"] = "cpu"
    base[ENV_COORDINATOR] = f"127.0.0.1:{_free_port()}"
    base[ENV_NUM_PROCESSES] = str(num_processes)
    base[_ENV_INIT_TIMEOUT] = str(int(initialization_timeout))

    procs: list[tuple[subprocess.Popen, Any, Any]] = []
    try:
        for process_id in range(num_processes):
            out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
            proc_env = dict(base, **{ENV_PROCESS_ID: str(process_id)})
            proc = subprocess.Popen(
                [sys.executable, "-m", module, *args], env=proc_env, stdout=out, stderr=err
            )
            procs.append((proc, out, err))
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p, _, _ in procs):
            failed = [p for p, _, _ in procs if p.poll() not in (None, 0)]
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        codes = [p.poll() for p, _, _ in procs]
        if any(c != 0 for c in codes):
            reason = "failed" if any(c not in (None, 0) for c in codes) else "timed out"
            report = "\n".join(
                f"--- process {i} (exit {c}) ---\n{_tail(err)}"
                for i, ((_, _, err), c) in enumerate(zip(procs, codes, strict=True))
                if c != 0
            )
            raise RuntimeError(f"launch_local: {module} {reason}.\n{report}")
        return [_tail(out, 1 << 20) for _, out, _ in procs]
    finally:
        for proc, out, err in procs:
            if proc.poll() is None:
                proc.kill()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            out.close()
            err.close()
