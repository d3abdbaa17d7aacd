"""Meshes, partition specs and placement of parameters, optimizer states and batches.

Everything here runs eagerly on the host, before the compiled steps: it decides where each
array lives. Parameters are replicated over the data axis (optionally sharded over other
mesh axes with ``param_specs``); every optimizer-state leaf shaped like a parameter gets that
parameter's spec and a stacked ``(K, …)`` history leaf gets ``P(None, *spec)``
(:func:`state_specs`), so the parameter history keeps the parameters' sharding and is donated
and updated in place on every device. Placement copies (never aliases) the caller's arrays,
since the placed trees are donated to the steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from asgd_jax._validation import check_int

__all__ = [
    "data_mesh",
    "fetch",
    "pmap_replicate",
    "pmap_unreplicate",
    "replicate",
    "shard_batch",
    "shard_init",
    "state_specs",
]

# On the CPU backend, dispatching many programs with cross-device collectives without ever
# waiting can abort the process (XLA rendezvous timeout): wait on every this-many-th call.
_CPU_BLOCK_EVERY = 16


def _check_axis_name(axis_name: Any) -> str:
    if not isinstance(axis_name, str) or not axis_name:
        raise TypeError(f"`axis_name` must be a non-empty str, got {axis_name!r}.")
    return axis_name


def _check_axis(mesh: Mesh, axis_name: str) -> int:
    """The size of mesh axis ``axis_name``; raises if ``mesh`` is not a mesh that has it."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"`mesh` must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
    if axis_name not in mesh.axis_names:
        raise ValueError(
            f"`axis_name`={axis_name!r} is not an axis of the mesh; its axes are "
            f"{tuple(mesh.axis_names)}. Pass one of them, or build the mesh with "
            f"asgd_jax.parallel.data_mesh(axis_name={axis_name!r})."
        )
    return int(mesh.shape[axis_name])


def _check_batch(batch: Any, num_devices: int, axis_name: str, batch_axis: int) -> None:
    """Raises unless every array of ``batch`` splits evenly over the ``num_devices``."""
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
    num_devices = check_int("num_devices", num_devices, low=1, high=len(devices))
    axis_name = _check_axis_name(axis_name)
    return Mesh(np.array(devices[:num_devices]), (axis_name,))


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


def _block_every(devices: Sequence[jax.Device]) -> int:
    """How often a caller must wait on a program with collectives over ``devices`` (0: never)."""
    devices = list(devices)
    return _CPU_BLOCK_EVERY if len(devices) > 1 and devices[0].platform == "cpu" else 0


class _Blocking:
    """Calls ``fn`` and, on CPU meshes, waits for its result on every ``block_every``-th call.

    Wraps the jitted programs with cross-device collectives (see :data:`_CPU_BLOCK_EVERY`);
    ``fn`` stays reachable (e.g. ``step.fn.lower(...)``) and calls made while tracing are not
    counted as dispatches to wait on.
    """

    def __init__(self, fn: Callable, block_every: int):
        self.fn = fn
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
