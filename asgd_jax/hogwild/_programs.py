"""The jitted programs of a hogwild run: a worker's gradient and the server's update.

A worker samples its own batches inside its program (:func:`asgd_jax.data.worker_batch`:
a pure function of the run's key, the worker and its step) unless a host data function
supplies them.

Programs are built from a hashable spec and kept in one bounded compile cache
(:class:`asgd_jax._cache.CompileCache`), so repeated runs with the same model and optimizer
(sweeps over workers, modes, stragglers) compile once. Callbacks reach the live run through
a registry keyed by a run id passed as an operand, never through a closure, so a cached
program serves every later run.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
from jax.experimental import io_callback

from asgd_jax._cache import CompileCache
from asgd_jax.data import worker_batch
from asgd_jax.step import Step

__all__ = [
    "CACHE",
    "WorkerSpec",
    "compile_apply",
    "compile_worker",
    "register",
    "unregister",
]

CACHE = CompileCache(16)
_LIVE: dict[int, Any] = {}
_RUN_IDS = itertools.count()


def register(run: Any) -> int:
    """Makes ``run`` reachable from the callbacks; returns its id (a program operand)."""
    run_id = next(_RUN_IDS)
    _LIVE[run_id] = run
    return run_id


def unregister(run_id: int) -> None:
    _LIVE.pop(run_id, None)


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


def _pull_entry(run_id, worker):
    return _LIVE[int(run_id)].pull_callback(worker)


def _push_entry(run_id, worker, step, version_pulled, loss, pushed):
    return _LIVE[int(run_id)].push_callback(worker, step, version_pulled, loss, pushed)


def _worker_program(spec: WorkerSpec) -> Callable:
    """One gradient: pull → (loss, grad) → [lock-free: own optimizer] → push."""
    host_data = spec.batch_treedef is not None
    pull_shapes = (structs(spec.params), jax.ShapeDtypeStruct((), jnp.int32))
    optimizer = spec.step.tx

    def program(run_id, worker, step, data, key, host_batch, opt_state):
        if host_data:
            batch = jax.tree.unflatten(spec.batch_treedef, host_batch)
        else:
            batch = worker_batch(data, spec.batch_size, key, worker, step)
        leaves, version = io_callback(_pull_entry, pull_shapes, run_id, worker)
        params = jax.tree.unflatten(spec.treedef, leaves)
        # The contract's gradient half at the pulled parameters: the staleness is real here,
        # not drawn, so there is no stale state to read (hence the state ``None``).
        loss, grads = spec.step.gradient(params, None, batch)
        if spec.worker_optimizer:
            pushed, opt_state = optimizer.update(grads, opt_state, params)
        else:
            pushed = grads
        done = io_callback(
            _push_entry,
            jax.ShapeDtypeStruct((), jnp.int32),
            run_id,
            worker,
            step,
            version,
            loss.astype(jnp.float32),
            jax.tree.leaves(pushed),
        )
        return done, opt_state

    return program


def _apply_program(step: Step, average: bool) -> Callable:
    """One server update: (sync: the mean over the round's gradients), then the contract's
    apply half, :meth:`asgd_jax.Step.apply`; returns what was applied as well."""

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
        index,
        index,
        index,
        data,
        key,
        batch_structs,
        opt_state_struct,
    )


def compile_apply(step: Step, params: Any, opt_state: Any, grads: Any, *, average: bool) -> Any:
    """The compiled server update taking ``grads`` (stacked per worker when ``average``).

    Cached on the optimizer and the shapes only: the update does not depend on the loss.
    """
    return _compile(
        ("apply", step.tx, average, _abstract(params), _abstract(grads)),
        _apply_program(step, average),
        params,
        opt_state,
        grads,
    )
