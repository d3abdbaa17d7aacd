"""``"locked"``: one server applies every gradient, one at a time, in arrival order."""

from __future__ import annotations

from asgd_jax.hogwild._server import Server

__all__ = ["LockedServer"]


class LockedServer(Server):
    """Applies each pushed gradient with the server-side optimizer as it arrives.

    A worker pulls again only once its update is applied, so no update is lost, every pull
    reads a consistent snapshot, and one worker sees τ = 0.

    References:
      Dean et al., "Large scale distributed deep networks" (Downpour SGD), NeurIPS 2012.
    """

    mode = "locked"

    def push(self, worker, step, version_pulled, loss, pushed):
        version = self.apply(pushed)
        self.log(worker, version_pulled, version - 1, step, loss)
        return [worker]
