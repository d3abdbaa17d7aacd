"""``"lock_free"``: Hogwild!, every worker adds its own update into shared memory, unlocked."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from asgd_jax.hogwild._server import Server

__all__ = ["LockFreeServer"]


class LockFreeServer(Server):
    """Shared host parameters that each worker updates in place without a lock.

    Each worker runs the optimizer itself on its own optimizer state (for SGD the same
    algorithm as ``"locked"``; PyTorch's Hogwild example does the same) and adds the update
    into the shared parameters; only the version counter (completed writes) is atomic. What
    can go wrong is measured: a pull that overlaps a write reads a *torn* snapshot
    (``torn_reads``), and overlapping writes can lose element updates (NumPy releases the
    GIL inside in-place adds of more than a few hundred elements; ``overlapping_writes``
    counts writes begun while another was in progress, and :meth:`write_residual` measures
    what was lost). Staleness is measured against the number of completed writes.

    References:
      Niu, Recht, Ré, Wright, "Hogwild!: A lock-free approach to parallelizing stochastic
      gradient descent", NeurIPS 2011 (arXiv 1106.5730).
    """

    mode = "lock_free"
    serial = False
    worker_optimizer = True

    def _init_state(self):
        self.shared = [x.copy() for x in self.initial]  # mutated in place by the workers
        self._pushed_sum = [
            [np.zeros(x.shape, np.float64) for x in self.initial] for _ in range(self.num_workers)
        ]
        self._writes_begun = 0
        self._leaves, self._host = self.shared, None
        return None, None

    def compile(self) -> None:
        """Nothing to compile: the workers run the optimizer, the server only adds."""

    def worker_opt_state(self):
        """A worker's own optimizer state, initialised at W_0."""
        return self.step.tx.init(jax.tree.unflatten(self.treedef, list(self.initial)))

    def final_params(self):
        return jax.tree.unflatten(self.treedef, [jnp.asarray(x) for x in self.shared])

    def final_opt_state(self, worker_states):
        return tuple(worker_states)

    def pull(self, worker):
        with self.lock:
            begun, done = self._writes_begun, self.version
        snapshot = [x.copy() for x in self.shared]
        with self.lock:
            if begun != done or self._writes_begun != begun:
                self.torn_reads += 1
        return snapshot, done

    def push(self, worker, step, version_pulled, loss, pushed):
        """The Hogwild! write: only the counter is atomic, the add is not."""
        pushed = [np.asarray(x) for x in pushed]  # views of the worker's output on CPU
        with self.lock:
            index = self._writes_begun
            if self._writes_begun != self.version:
                self.overlapping_writes += 1
            self._writes_begun += 1
        for shared, delta in zip(self.shared, pushed, strict=True):
            np.add(shared, delta, out=shared, casting="unsafe")
        with self.lock:
            self.version += 1
        for total, delta in zip(self._pushed_sum[worker], pushed, strict=True):
            total += delta
        self.log(worker, version_pulled, index, step, loss)
        if self.record_pushes:
            self._pushes.append((index, pushed))
        return [worker]

    def write_residual(self) -> float:
        """‖W_final − W_0 − Σ pushed updates‖ / ‖Σ pushed updates‖ (float32 rounding: ~1e-6)."""
        residual = total = 0.0
        for i, (final, start) in enumerate(zip(self.shared, self.initial, strict=True)):
            pushed = sum(acc[i] for acc in self._pushed_sum)
            diff = final.astype(np.float64) - start.astype(np.float64) - pushed
            residual += float(np.sum(diff**2))
            total += float(np.sum(pushed**2))
        return math.sqrt(residual) / max(math.sqrt(total), np.finfo(np.float64).tiny)
