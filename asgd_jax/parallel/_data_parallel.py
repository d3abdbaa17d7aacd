"""Synchronous and stale data-parallel train steps: ``jax.shard_map`` (primary) and ``jax.pmap``.

Both are :func:`asgd_jax.make_step` with the all-reduce plugged in: ``reduce_grads`` and
``reduce_loss`` average over the data axis with ``lax.pmean``, and under ``shard_map``
``prepare_params`` casts the gradient point to device-varying first (without the cast,
``jax.grad`` of a replicated parameter inside ``shard_map`` returns the gradient already
summed over the devices). The optimizer state is replicated over the data axis, so every
device draws the same τ_t and reads the same snapshot.

References:
  Dean et al., *Large Scale Distributed Deep Networks*, NeurIPS 2012 (Downpour SGD).
  Goyal et al., *Accurate, Large Minibatch SGD*, 2017, arXiv 1706.02677 (all-reduce SGD).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from asgd_jax.parallel._placement import (
    _block_every,
    _Blocking,
    _check_axis,
    _check_axis_name,
    _check_batch,
    _param_specs,
    pmap_unreplicate,
    state_specs,
)
from asgd_jax.step import make_step
from asgd_jax.transforms import has_stale_state, staleness

__all__ = ["pmap_step", "shard_map_step"]

LossFn = Callable[[optax.Params, Any], jax.Array]
StepFn = Callable[[optax.Params, optax.OptState, Any], tuple[Any, Any, dict[str, jax.Array]]]


def _data_parallel_step(
    loss_fn: LossFn, tx: optax.GradientTransformation, axis_name: str, cast_to_varying: bool
) -> Callable:
    """One all-reduce step: ``make_step`` with the mean over ``axis_name``, plus metrics."""
    mean = lambda tree: lax.pmean(tree, axis_name)  # noqa: E731
    step = make_step(
        loss_fn,
        tx,
        reduce_grads=mean,
        reduce_loss=mean,
        # Replicated inputs are invariant over the axis: without this cast `jax.grad` under
        # shard_map returns the gradient already summed over devices (see DESIGN.md).
        prepare_params=(lambda p: lax.pcast(p, axis_name, to="varying"))
        if cast_to_varying
        else None,
    )

    def one_step(params, opt_state, batch):
        tau = staleness(opt_state) if has_stale_state(opt_state) else None
        params, opt_state, loss = step(params, opt_state, batch)
        metrics = {"loss": loss} if tau is None else {"loss": loss, "staleness": tau}
        return params, opt_state, metrics

    return one_step


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
    every device applies the same ``tx.update`` (:func:`asgd_jax.make_step` with that
    all-reduce). The optimizer state is replicated over the data axis, so every device draws
    the same τ_t and reads the same snapshot; its history is donated and updated in place.
    Equal to single-device full-batch training up to float reduction order when ``loss_fn``
    is a mean over examples.

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
    per_device = _scanned(_data_parallel_step(loss_fn, tx, axis_name, True), scan)

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
    return _Blocking(jitted, _block_every(mesh.devices.flat))


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
    axis_name = _check_axis_name(axis_name)
    mapped = jax.pmap(
        _scanned(_data_parallel_step(loss_fn, tx, axis_name, False), scan),
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

    return _Blocking(step, _block_every(devices))
