"""``"rennala"``: rounds of S gradients, all computed at the current point."""

from __future__ import annotations

import jax
import numpy as np

from asgd_jax.hogwild import _programs
from asgd_jax.hogwild._server import Server

__all__ = ["RennalaServer"]


def _stack(pushes: list[list]) -> list[np.ndarray]:
    """The round's gradients stacked per leaf on the host (one copy; the update program
    takes a leading axis of S, so its compilation does not grow with S)."""
    return [np.stack(leaf) for leaf in zip(*pushes, strict=True)]


class RennalaServer(Server):
    """Rennala SGD: each update is the mean of the first S gradients computed at x_k.

    A gradient computed at the current version is collected and its worker goes on at
    once, at the same point (a fast worker may give several gradients to one round); one
    computed at an older version is discarded (``dropped``) and its worker pulls the
    current point. After S collected gradients the server applies their mean (in arrival
    order) as one update, so every update has τ = 0 and ``steps`` counts rounds. With
    ``stops=True`` the server also stops, at each update, every computation in flight at
    the old point (``stopped``; the backend is told through ``on_stop``), so every worker
    restarts at x_{k+1}; as in ``"ringmaster"``, a thread's stop takes effect at once
    during a straggler's extra time and otherwise when its program returns, and a push
    already on its way is discarded as the stop it is. These are the rules of
    ``workers.parameter_server(protocol="rennala", k=S, stops=...)``.

    A worker keeps pulling until the run has its ``steps`` rounds; the gradients in flight
    then are discarded with the run (as at a time limit), not counted.

    References:
      Tyurin & Richtárik, "Optimal Time Complexities of Parallel Stochastic Optimization
      Methods Under a Fixed Computation Model", NeurIPS 2023 (arXiv 2305.12387), Alg. 3
      with Method 4 in the workers.
    """

    mode = "rennala"

    def __init__(self, *args, k: int, stops: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.k = k
        self.stops = stops
        self._round: list[tuple] = []  # (worker, step, loss, leaves) collected at `version`

    def grad_structs(self):
        return jax.tree.map(
            lambda s: jax.ShapeDtypeStruct((self.k, *s.shape), s.dtype), super().grad_structs()
        )

    def compile(self) -> None:
        self._apply = _programs.compile_apply(
            self.step, self.params, self.opt_state, self.grad_structs(), average=True
        )

    def claim(self, worker, worker_step):
        """Gradients are not budgeted: a round needs S at the current point, however many
        are discarded; workers go on until ``steps`` rounds are applied."""
        return not self.finished()

    def release(self) -> None:
        """Nothing to give back: Rennala does not budget gradients."""

    def push(self, worker, step, version_pulled, loss, pushed):
        if self._cancel[worker] or version_pulled != self.version:
            self.discard(worker, step, version_pulled, loss, stopped=self._cancel[worker])
            return [worker]
        self.end_job(worker)
        self._round.append((worker, step, loss, pushed))
        if len(self._round) < self.k:
            return [worker]
        rows, self._round = self._round, []
        version = self.apply(self.unflatten(_stack([r[3] for r in rows])))
        # The round is logged under the worker whose gradient completed it, with the mean loss.
        self.log(worker, version - 1, version - 1, step, float(np.mean([r[2] for r in rows])))
        if self.stops:
            self.stop_stale(0)
        return [worker]
