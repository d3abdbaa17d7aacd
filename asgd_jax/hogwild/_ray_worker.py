"""The worker actor of the Ray backend: one process, its own JAX, one jitted gradient.

A worker repeats: read the parameters of the version the server gave it (by object
reference: one ``ray.put`` per version on the server, a zero-copy read on the same node),
compute its gradient with a jitted program, wait out its straggler time, push the gradient
and get the next version back in the reply. It never ships a ``jax.Array``: what crosses
processes is NumPy.

The actor pins its CPU affinity first, before it unpickles anything that could start JAX's
CPU backend (XLA sizes its thread pool from the affinity mask when the backend starts;
``OMP_NUM_THREADS`` does not limit it). ``JAX_PLATFORMS`` and ``XLA_FLAGS`` come in through
the actor's runtime environment, so they hold from the process's start.

Its data arrive by reference (``[ObjectRef]``, resolved here) or as a small host function,
in :meth:`Worker.configure` and :meth:`Worker.run`, never as constructor arguments: Ray re-runs
the constructor with the same arguments when it restarts the actor (and large object-store
arguments there can make a restart fail), then retries the interrupted ``run``.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

__all__ = ["Worker", "pin_cpus"]


def pin_cpus(worker: int, num_workers: int) -> list[int]:
    """Pins this process to a block of the CPUs it may use; returns that block.

    Workers of one run get disjoint blocks of ``max(1, cpus // num_workers)`` CPUs when they
    share a machine (worker ``w`` takes block ``w``, wrapping around).
    """
    if not hasattr(os, "sched_setaffinity"):  # macOS: no affinity API; leave it
        return []
    cpus = sorted(os.sched_getaffinity(0))
    width = max(1, len(cpus) // num_workers)
    start = (worker * width) % len(cpus)
    block = [cpus[(start + i) % len(cpus)] for i in range(width)]
    os.sched_setaffinity(0, block)
    return block


class Worker:
    """One worker process (decorated with ``ray.remote`` by the driver).

    The process outlives a run: the driver keeps it for the next run with the same number
    of workers (a process start and JAX's import cost seconds) and :meth:`configure` gives it
    each run's model, data and server. After Ray restarts it, :meth:`run` (retried by Ray)
    configures it again.
    """

    def __init__(self, worker: int, num_workers: int, pin: bool):
        self.cpus = pin_cpus(worker, num_workers) if pin else []
        import jax  # noqa: F401 - after the affinity: the process's JAX starts pinned

        self.worker = worker
        self.spec = None

    def configure(self, run: str, payload: bytes, data_ref: list, server: Any) -> list[int]:
        """Builds run ``run``'s program (compiled and warm); returns the CPUs it is pinned to."""
        import ray

        spec = ray.cloudpickle.loads(payload)
        self.server = server
        self.spec = spec
        self.gradients = 0  # gradients computed in this run by this incarnation
        self._build(spec, ray.get(data_ref[0]) if data_ref else None)
        self.run_id = run
        return self.cpus

    def _build(self, spec: Any, data: Any) -> None:
        import jax
        import jax.numpy as jnp

        from asgd_jax.data import worker_batch

        for name, value in spec.jax_flags.items():
            jax.config.update(name, value)

        self._jax = jax
        key_data, impl = spec.key
        self.key = (
            jnp.asarray(key_data) if impl is None else jax.random.wrap_key_data(key_data, impl=impl)
        )
        host_data = spec.data_fn is not None
        self.data_fn = spec.data_fn
        self.data = None if host_data else jax.tree.map(jnp.asarray, data)
        treedef, step = spec.treedef, spec.step

        def gradient(leaves, data, key, worker, index, host_batch):
            if host_data:
                batch = jax.tree.unflatten(spec.batch_treedef, host_batch)
            else:
                batch = worker_batch(data, spec.batch_size, key, worker, index)
            loss, grads = step.gradient(jax.tree.unflatten(treedef, leaves), None, batch)
            return loss.astype(jnp.float32), jax.tree.leaves(grads)

        index = jax.ShapeDtypeStruct((), jnp.int32)
        params = [jax.ShapeDtypeStruct(s, d) for s, d in spec.params]
        self.batch_structs = [jax.ShapeDtypeStruct(s, d) for s, d in spec.batch]
        self.compiled = (
            jax.jit(gradient)
            .lower(params, self.data, self.key, index, index, self.batch_structs)
            .compile()
        )
        # Warm up: the first execution pays one-time costs that are not staleness.
        warm = [np.zeros(s, d) for s, d in spec.params]
        jax.block_until_ready(self._gradient(warm, 0, warm_up=True))

    def _batch(self, index: int) -> list:
        if self.data_fn is None:
            return []
        leaves = [np.asarray(x) for x in self._jax.tree.leaves(self.data_fn(self.worker, index))]
        for got, want in zip(leaves, self.batch_structs, strict=True):
            if got.shape != want.shape or got.dtype != want.dtype:
                raise ValueError(
                    f"data({self.worker}, {index}) returned a leaf of shape {got.shape} and "
                    f"dtype {got.dtype}; every batch must match the first: {want.shape}, "
                    f"{want.dtype}."
                )
        return leaves

    def _gradient(self, leaves: list, index: int, warm_up: bool = False):
        batch = (
            [np.zeros(s.shape, s.dtype) for s in self.batch_structs]
            if warm_up
            else self._batch(index)
        )
        return self.compiled(
            leaves, self.data, self.key, np.int32(self.worker), np.int32(index), batch
        )

    def run(self, run: str, payload: bytes, data_ref: list, server: Any) -> int:
        """Computes and pushes gradients until the server says stop; returns how many.

        Ray retries this call on the restarted process when the process dies, so it takes
        everything :meth:`configure` does: a new process configures itself, and the server
        counts the restart when it attaches again.
        """
        import ray

        if getattr(self, "run_id", None) != run:
            self.configure(run, payload, data_ref, server)
        reply = ray.get(self.server.attach.remote(self.worker, True))
        while reply[0]:
            _, index, epoch, version, ref = reply
            try:
                leaves = ray.get(ref[0]) if isinstance(ref[0], ray.ObjectRef) else ref[0]
            except ray.exceptions.RayError:
                # The version's owner (a server that died) is gone: ask the restarted one.
                reply = ray.get(self.server.attach.remote(self.worker, False))
                continue
            loss, grads = self._gradient(leaves, index)
            grads = [np.asarray(g) for g in grads]
            self.gradients += 1
            table = self.spec.straggler_table
            if table is not None:
                extra = float(table[self.worker, index % table.shape[1]])
                if extra > 0:
                    time.sleep(extra)
            reply = ray.get(
                self.server.push.remote(self.worker, index, epoch, version, float(loss), grads)
            )
        return self.gradients
