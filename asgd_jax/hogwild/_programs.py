"""The jitted programs of a hogwild run: a worker's gradient and the server's update.

A worker samples its own batches inside its program (:func:`asgd_jax.data.worker_batch`:
a pure function of the run's key, the worker and its step) unless a host data function
supplies them.

The programs have no host callbacks: the worker's thread pulls the parameters (the
server's device arrays: immutable, so a pull is a consistent snapshot with no copy) and
passes them in, and the program returns the gradient, which the thread pushes as it is.
A program without callbacks is dispatched on JAX's C++ fast path and never copies the
parameters or the gradient through the host; one with callbacks goes through Python
dispatch and a ``device_put`` per callback (measured: ~0.4 ms per callback on XLA:CPU,
more than the digits MLP's whole gradient).

Programs are built from a hashable spec and kept in one bounded compile cache
(:class:`asgd_jax._cache.CompileCache`), so repeated runs with the same model and optimizer
(sweeps over workers, modes, stragglers) compile once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp

from asgd_jax._cache import CompileCache
from asgd_jax.data import worker_batch
from asgd_jax.step import Step

__all__ = ["CACHE", "WorkerSpec", "compile_apply", "compile_worker"]

CACHE = CompileCache(16)


# --------------------------------------------------------------------------------------------
# Programs.


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker program depends on, besides its operands."""

    step: Step  # the core contract: its gradient half runs here
    worker_optimizer: bool  # the worker runs the optimizer itself and pushes the update
    treedef: Any
    params: tuple  # ((shape, dtype), ...) per leaf
    batch_treedef: Any  # None for array data
    batch: tuple  # ((shape, dtype), ...) per leaf of a host batch; () for array data
    batch_size: int | None


def structs(shapes: tuple) -> list[jax.ShapeDtypeStruct]:
    return [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in shapes]


def _worker_program(spec: WorkerSpec) -> Callable:
    """One gradient at the pulled parameters: (loss, grad) → [lock-free: own optimizer]."""
    host_data = spec.batch_treedef is not None
    optimizer = spec.step.tx

    def program(leaves, worker, step, data, key, host_batch, opt_state):
        if host_data:
            batch = jax.tree.unflatten(spec.batch_treedef, host_batch)
        else:
            batch = worker_batch(data, spec.batch_size, key, worker, step)
        params = jax.tree.unflatten(spec.treedef, leaves)
        # The contract's gradient half at the pulled parameters: the staleness is real here,
        # not drawn, so there is no stale state to read (hence the state ``None``).
        loss, grads = spec.step.gradient(params, None, batch)
        if spec.worker_optimizer:
            pushed, opt_state = optimizer.update(grads, opt_state, params)
        else:
            pushed = grads
        return loss.astype(jnp.float32), jax.tree.leaves(pushed), opt_state

    return program


def _apply_program(step: Step, average: bool) -> Callable:
    """One server update: (averaged modes: the mean over the gradients stacked on the leading
    axis), then the contract's apply half, :meth:`asgd_jax.Step.apply`; returns what was
    applied as well."""

    def program(params, opt_state, grads):
        if average:
            grads = jax.tree.map(lambda g: jnp.mean(g, axis=0), grads)
        params, opt_state = step.apply(grads, params, opt_state)
        return params, opt_state, grads

    return program


def _abstract(tree: Any) -> tuple:
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((jnp.shape(x), str(jax.typeof(x))) for x in leaves)


def _compile(key: tuple, fn: Callable, *args) -> Any:
    """``jax.jit(fn).lower(*args).compile()``, cached on ``key`` when it is hashable."""
    return CACHE.get(key, lambda: jax.jit(fn).lower(*args).compile())


def compile_worker(
    spec: WorkerSpec, data: Any, key: chex.PRNGKey, batch_structs: list, opt_state_struct: Any
) -> Any:
    """The compiled worker program (called in the calling thread: threads never compile)."""
    index = jax.ShapeDtypeStruct((), jnp.int32)
    return _compile(
        ("worker", spec, _abstract(data), _abstract(key)),
        _worker_program(spec),
        structs(spec.params),
        index,
        index,
        data,
        key,
        batch_structs,
        opt_state_struct,
    )


def compile_apply(step: Step, params: Any, opt_state: Any, grads: Any, *, average: bool) -> Any:
    """The compiled server update taking ``grads`` (stacked on a leading axis when
    ``average``).

    Cached on the optimizer and the shapes only: the update does not depend on the loss.
    """
    return _compile(
        ("apply", step.tx, average, _abstract(params), _abstract(grads)),
        _apply_program(step, average),
        params,
        opt_state,
        grads,
    )
