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

Every step here is :func:`asgd_jax.make_step` (the all-reduce as ``reduce_grads``; one device
per worker applies arrivals with :meth:`asgd_jax.Step.apply`), and the stale state is read
only through its public readers (:func:`asgd_jax.stale_params_at`,
:func:`asgd_jax.upcoming_staleness`).

References:
  Dean et al., *Large Scale Distributed Deep Networks*, NeurIPS 2012 (Downpour SGD).
  Goyal et al., *Accurate, Large Minibatch SGD*, 2017, arXiv 1706.02677 (all-reduce SGD).
  Koloskova, Stich & Jaggi, NeurIPS 2022, arXiv 2206.08307 (asynchronous SGD).
"""

from asgd_jax.parallel._data_parallel import pmap_step, shard_map_step
from asgd_jax.parallel._device_per_worker import (
    WorkerRounds,
    WorkerSchedule,
    as_schedule,
    one_device_per_worker,
    plan_rounds,
    round_robin_schedule,
)
from asgd_jax.parallel._placement import (
    data_mesh,
    fetch,
    pmap_replicate,
    pmap_unreplicate,
    replicate,
    shard_batch,
    shard_init,
    state_specs,
)
from asgd_jax.parallel._processes import (
    ENV_COORDINATOR,
    ENV_NUM_PROCESSES,
    ENV_PROCESS_ID,
    initialize,
    launch_local,
)

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
