"""``"sync"``: a barrier per round; the round's gradients are averaged into one update."""

from __future__ import annotations

import jax
import numpy as np

from asgd_jax.hogwild import _programs
from asgd_jax.hogwild._rennala import _stack
from asgd_jax.hogwild._server import Server

__all__ = ["SyncServer"]


class SyncServer(Server):
    """Waits for one gradient from every worker, then applies their mean as one update.

    The mean is taken in worker order, so the run is deterministic whatever the arrival
    order. ``steps`` counts rounds: a run consumes ``num_workers × steps`` gradients, and
    every update has τ = 0.
    """

    mode = "sync"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._arrived: dict[int, tuple] = {}

    def grad_structs(self):
        return jax.tree.map(
            lambda s: jax.ShapeDtypeStruct((self.num_workers, *s.shape), s.dtype),
            super().grad_structs(),
        )

    def compile(self) -> None:
        self._apply = _programs.compile_apply(
            self.step, self.params, self.opt_state, self.grad_structs(), average=True
        )

    def claim(self, worker, worker_step):
        """Every worker computes exactly one gradient per round."""
        return self.steps is None or worker_step < self.steps

    def push(self, worker, step, version_pulled, loss, pushed):
        self._arrived[worker] = (step, loss, pushed)
        if len(self._arrived) < self.num_workers:
            return []
        rows = [self._arrived[w] for w in range(self.num_workers)]
        self._arrived = {}
        mean_loss = float(np.mean([r[1] for r in rows]))
        version = self.apply(self.unflatten(_stack([r[2] for r in rows])))
        # The round is logged under the worker whose gradient completed it.
        self.log(worker, version - 1, version - 1, step, mean_loss)
        return list(range(self.num_workers))
