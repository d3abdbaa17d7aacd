"""``"locked"``: one server applies every gradient, one at a time, in arrival order."""

from __future__ import annotations

from asgd_jax.hogwild._server import Server

__all__ = ["LockedServer"]


class LockedServer(Server):
    """Applies each pushed gradient with the server-side optimizer as it arrives.

    A worker pulls again only once its update is applied, so no update is lost, every pull
    reads a consistent snapshot, and one worker sees τ = 0.

    Bounded staleness (``max_staleness=S``): a gradient that arrives with τ > S is dropped
    (the parameters and the version are unchanged, the worker pulls the current point; see
    :mod:`asgd_jax.hogwild._server` on discarded work), so every applied τ is ≤ S: the rule
    of ``workers.parameter_server(protocol="async", max_staleness=S)``.

    References:
      Dean et al., "Large scale distributed deep networks" (Downpour SGD), NeurIPS 2012.
    """

    mode = "locked"

    def __init__(self, *args, max_staleness: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_staleness = max_staleness  # the largest τ applied; None: no bound

    def push(self, worker, step, version_pulled, loss, pushed):
        limit = self.max_staleness
        if self.stops and self._cancel[worker]:
            self.discard(worker, step, version_pulled, loss, stopped=True)
            return [worker]
        if limit is not None and self.version - version_pulled > limit:
            self.discard(worker, step, version_pulled, loss, stopped=False)
            return [worker]
        self.end_job(worker)
        version = self.apply(self.unflatten(pushed))
        self.log(worker, version_pulled, version - 1, step, loss)
        if self.stops:
            self.stop_stale(limit)
        return [worker]
