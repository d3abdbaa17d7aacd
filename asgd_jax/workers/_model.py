"""``WorkerModel``: the delay model a simulated parameter server drives, and its traced build."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from asgd_jax import delays
from asgd_jax.workers._events import build
from asgd_jax.workers._laws import ComputeTime
from asgd_jax.workers._state import WorkerState


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class WorkerModel(delays.DelayModel):
    """A :class:`~asgd_jax.delays.DelayModel` driven by a simulated parameter server.

    Beyond ``init`` / ``next`` / ``max_delay`` / ``pmf`` it carries the configuration and the
    closed-form rates the theory needs. ``arrival(state) -> state`` advances the simulation by
    one gradient arrival (one round for ``k_sync``); ``next`` repeats it until an update is
    applied.

    Attributes:
      num_workers: n.
      protocol: ``"async"``, ``"ssp"``, ``"k_async"``, ``"k_sync"``, ``"rennala"`` or
        ``"ringmaster"``.
      compute_time: the compute-time law X (worker i computes for m_i·X).
      comm_time: the communication law C added to every cycle (``None``: no communication).
      multipliers: the m_i (``1/speed_i``, times ``slow_factor`` for the slow workers).
      max_staleness: the threshold S (drop for async/k_async, block for ssp) or ``None``.
      k: K for k_async / k_sync, the batch size S for rennala (gradients per update; 1
        otherwise).
      threshold: Ringmaster's delay threshold R (``None``: R = ∞).
      stops: whether stale computations are stopped (rennala / ringmaster).
      group_staleness: how a K-async group's staleness becomes one τ (``"mean"``,
        ``"max"``, ``"min"``).
      arrival_rate: gradients pushed per unit time, Σ_i 1/E[m_i·X + C] (always-busy
        workers: async and k_async), else ``None``.
      update_rate: updates per unit time: the arrival rate (÷ K for k_async) without drops,
        1/E[T_(K:n)] for k_sync (deterministic communication only), else ``None``.
      mean_staleness: steady-state mean staleness per applied gradient, (n − 1)/K without
        drops or blocking (any law; every update is seen by the n − 1 workers in flight),
        0 for k_sync, else ``None``.
      traced: whether some parameter is a JAX tracer (the model was built inside
        ``jit`` / ``vmap``); ``multipliers`` is then an array, the rates are
        ``None`` and the model equals only itself and cannot be hashed.

    Models compare and hash by value (``key``: the law, the multipliers and every
    argument that shapes the simulation), so a rebuilt optimizer with an equal worker
    model has an equal tree structure and a jitted step is not recompiled.
    """

    num_workers: int = 1
    protocol: str = "async"
    compute_time: ComputeTime | None = None
    comm_time: ComputeTime | None = None
    multipliers: tuple[float, ...] = ()
    max_staleness: int | None = None
    k: int = 1
    group_staleness: str = "mean"
    threshold: int | None = None
    stops: bool = False
    arrival_rate: float | None = None
    update_rate: float | None = None
    mean_staleness: float | None = None
    arrival: Callable[[WorkerState], WorkerState] | None = None
    traced: bool = False

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if self.traced or getattr(other, "traced", False):
            return False
        return super().__eq__(other)

    def __hash__(self) -> int:
        if self.traced:
            raise TypeError(
                f"{self.name} has traced parameters (built inside jit/vmap from JAX values), "
                "so it has no value to hash: it cannot be a static argument of jax.jit or a "
                "cache key. Use it inside the traced function that built it (e.g. as the delay "
                "of asgd_jax.stale there), or build it from Python numbers."
            )
        return super().__hash__()

    def report(self, state: WorkerState) -> dict[str, jax.Array]:
        """The simulation's clock and counters after the arrival that delivers an update.

        Returns ``time`` (simulated wall clock, float32), ``worker`` (the arriving worker),
        ``worker_step`` (gradients that worker had pushed before this one: its local step),
        ``dropped`` and ``clipped`` (the counters of :class:`WorkerState`). Traceable.
        """
        worker = state.worker
        return {
            "time": state.time,
            "worker": worker,
            "worker_step": state.clock[jnp.maximum(worker, 0)] - 1,
            "dropped": state.dropped,
            "clipped": state.clipped,
        }

    def __repr__(self) -> str:
        return f"WorkerModel({self.name}, max_delay={self.max_delay})"


def _digest(mult: np.ndarray) -> str:
    """A short value key for the multipliers (n floats would be hashed at every jitted call)."""
    data = np.ascontiguousarray(mult, np.float64).tobytes()
    return hashlib.sha256(data).hexdigest()[:32]


def _name(n, law, protocol, max_staleness, k, threshold, stops) -> str:
    name = f"parameter_server(n={n}, {law.name}, {protocol}"
    if max_staleness is not None:
        name += f", S={max_staleness}"
    if protocol in ("k_async", "k_sync"):
        name += f", K={k}"
    if protocol == "rennala":
        name += f", S={k}"
    if protocol == "ringmaster":
        name += f", R={'∞' if threshold is None else threshold}"
    if stops:
        name += ", stops"
    return name + ")"


def _traced_model(
    *,
    n,
    law,
    comm,
    mult,
    protocol,
    max_staleness,
    max_staleness_rule,
    k,
    max_delay,
    group_staleness,
    threshold,
    stops,
) -> WorkerModel:
    """The model of traced parameters: the same event logic, no value-dependent extras."""
    structural = protocol in ("k_sync", "rennala")
    pmf = None
    if structural:
        pmf = np.zeros(max_delay + 1)
        pmf[0] = 1.0
    init, arrival, next_ = build(
        n=n,
        law=law,
        comm=comm,
        mult=mult,
        protocol=protocol,
        threshold=max_staleness_rule,
        k=k,
        max_delay=max_delay,
        group_staleness=group_staleness,
        stops=stops,
    )
    return WorkerModel(
        init=init,
        next=next_,
        max_delay=max_delay,
        name=_name(n, law, protocol, max_staleness, k, threshold, stops),
        pmf=pmf,
        num_workers=n,
        protocol=protocol,
        compute_time=law,
        comm_time=comm,
        multipliers=mult,
        max_staleness=max_staleness,
        k=k,
        group_staleness=group_staleness,
        threshold=threshold,
        stops=stops,
        mean_staleness=0.0 if structural else None,
        arrival=arrival,
        traced=True,
    )
