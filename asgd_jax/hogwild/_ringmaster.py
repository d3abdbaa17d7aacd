"""``"ringmaster"``: asynchronous SGD that never applies a delay of R or more."""

from __future__ import annotations

from asgd_jax.hogwild._locked import LockedServer

__all__ = ["RingmasterServer"]


class RingmasterServer(LockedServer):
    """Ringmaster ASGD: the locked server with the delay threshold R.

    Updates are applied one at a time in arrival order, as in ``"locked"``, except that a
    gradient whose delay τ = (version now) − (version pulled) reaches R is never applied:

    * ``stops=False`` (their Alg. 4): it is ignored on arrival (``dropped``), and the
      worker pulls the current point;
    * ``stops=True`` (their Alg. 5, with calculation stops): after every update the server
      stops each computation in flight whose delay has reached R (``stopped``; the backend
      is told through ``on_stop``), and its worker restarts at the current point. A thread
      cannot interrupt an XLA program, so a stop takes effect at once during a straggler's
      extra time and otherwise when the worker's program returns (its gradient is then
      never pushed); a push already on its way is discarded on arrival and counted as the
      stop it is. Nothing is ever dropped.

    Either way every applied τ is < R by construction. ``threshold=None`` (R = ∞) is
    ``"locked"``. These are the rules of ``workers.parameter_server(protocol="ringmaster",
    threshold=R, stops=...)``, so a real run and its simulation compare on equal terms.

    References:
      Maranjyan, Tyurin & Richtárik, "Ringmaster ASGD: The First Asynchronous SGD with
      Optimal Time Complexity", ICML 2025 (arXiv 2501.16168), Alg. 4 and 5.
    """

    mode = "ringmaster"

    def __init__(self, *args, threshold: int | None = None, stops: bool = False, **kwargs):
        limit = None if threshold is None else threshold - 1
        super().__init__(*args, max_staleness=limit, **kwargs)
        self.threshold = threshold
        self.stops = stops and threshold is not None
