"""Hogwild mode: real asynchronous SGD on one host, with measured staleness traces.

The deterministic simulator (:func:`asgd_jax.stale`) answers "what if the delays were τ_t";
this package runs the real thing and measures τ_t. A host-side *parameter server* holds the
parameters, a version counter (the number of updates applied) and the optimizer state; ``N``
worker threads each repeat

    pull W_v  →  g = ∇f(W_v; ξ)  →  push g  →  deliver, wait

where the gradient is one jitted program without host callbacks (the pulled W_v are the
server's device arrays, passed in as they are). The server numbers every pull and every
update, so the staleness τ = (version the update was applied as) − (version the gradient was
computed at) is exact even though the interleaving of threads is not reproducible. Every
applied update is logged in a :class:`Trace`, which :func:`asgd_jax.delays.trace` accepts:
``asgd_jax.stale(inner, delays.trace(result.trace))`` replays the measured staleness
sequence deterministically.

Modes (all on the same machinery, so they compare on equal terms):

* ``"locked"``: a server thread applies pushed gradients one at a time, in arrival order,
  with the server-side optimizer (any optax transform). A worker pulls again only once its
  update is applied, so no update is lost, every pull reads a consistent snapshot, and one
  worker sees τ = 0.
* ``"lock_free"``: Hogwild! (Niu et al. 2011). Each worker runs the optimizer itself on its
  own optimizer state (for SGD the same algorithm as ``"locked"``; PyTorch's Hogwild example
  does the same) and adds its update into the shared host parameters in place, without a
  lock; only the version counter is atomic. What can go wrong, and is measured: a pull that
  overlaps a write reads a *torn* snapshot (``metrics.torn_reads`` counts pulls that
  overlapped a write), and overlapping writes can lose element updates
  (``metrics.overlapping_writes`` counts writes that began while another was in progress,
  and ``metrics.write_residual`` = ‖W_final − W_0 − Σ pushed updates‖ / ‖Σ pushed updates‖:
  float32 rounding alone gives ~1e-6, lost updates more). Staleness is measured against
  the number of completed writes.
* ``"sync"``: a barrier per round; the server averages the ``N`` gradients of a round (in
  worker order, so the run is deterministic) and applies one update. ``steps`` counts rounds
  here, so a synchronous run consumes ``num_workers × steps`` gradients.

Stragglers (:class:`Straggler`) add extra compute time per gradient (fixed, random, or one
slow worker) between the gradient and its delivery, so async throughput can be compared with
sync, which waits for the slowest.

Robustness: nothing waits inside XLA (every wait is in Python, between programs, and polls
the stop signal); an exception in a worker (its data function, its program) or in the server
stops every worker before its next gradient and is re-raised in the caller as
:class:`HogwildError` naming the worker; ``KeyboardInterrupt`` stops and joins every thread
before propagating; ``time_limit`` ends the run on time; every thread is joined before
:func:`train` returns (a thread stuck in user code past ``shutdown_timeout`` is reported,
named, as an error, or after an interrupt as a note and a warning).

Beyond one process: ``train(..., backend="ray")`` runs the same server classes in a
parameter-server actor and one worker process per worker, on the initialized Ray cluster,
on ``ray_address`` / ``RAY_ADDRESS`` or on a local one (``pip install 'asgd-jax[ray]'``;
``"locked"``, with ``max_staleness``, and ``"sync"``). Same arguments, same
:class:`HogwildResult`, and the trace replays the same way. A worker process that dies loses
only its gradient in flight and is restarted by Ray; with ``checkpoint_every`` and
``checkpoint_dir`` the server checkpoints itself (orbax) and a restarted server reloads its
newest checkpoint, and ``resume=True`` continues a run whose driver died; the run applies
exactly ``steps`` updates either way, and ``metrics.worker_restarts``,
``metrics.server_restarts``, ``metrics.lost_gradients`` and ``metrics.duplicate_pushes``
say what happened.

References:
  Niu, Recht, Ré, Wright, "Hogwild!: A lock-free approach to parallelizing stochastic
  gradient descent", NeurIPS 2011 (arXiv 1106.5730).
  Dean et al., "Large scale distributed deep networks" (Downpour SGD), NeurIPS 2012.
  Koloskova, Stich, Jaggi, "Sharper convergence guarantees for asynchronous SGD for
  distributed and federated learning", NeurIPS 2022 (arXiv 2206.08307).
"""

from asgd_jax.data import worker_batch
from asgd_jax.hogwild._results import HogwildError, HogwildMetrics, HogwildResult, Trace
from asgd_jax.hogwild._stragglers import Straggler
from asgd_jax.hogwild._train import BACKENDS, MODES, train

__all__ = [
    "BACKENDS",
    "MODES",
    "HogwildError",
    "HogwildMetrics",
    "HogwildResult",
    "Straggler",
    "Trace",
    "train",
    "worker_batch",
]
