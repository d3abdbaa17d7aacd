"""``parameter_server``: n simulated workers as a delay model, with derived bounds and rates."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from asgd_jax._validation import check_int, check_optional
from asgd_jax.workers._events import build
from asgd_jax.workers._laws import (
    ComputeTime,
    Deterministic,
    Exponential,
    _as_law,
)
from asgd_jax.workers._model import WorkerModel, _digest, _name, _traced_model
from asgd_jax.workers._order_stats import expected_order_statistic
from asgd_jax.workers._params import is_traced, real_param

_PROTOCOLS = ("async", "ssp", "k_async", "k_sync", "rennala", "ringmaster")
_GROUP_RULES = ("mean", "max", "min")


def _deterministic_bound(cycles: np.ndarray, k: int) -> int:
    """Largest possible staleness when every worker's cycle time is a constant c_i.

    Worker j's arrivals are at least c_j apart, so it arrives at most ⌊c_i/c_j⌋ + 1 times in
    the closed window [pull, pull + c_i] of worker i. Both ends of the window can count only
    if j arrives exactly at both, and then tie-breaking by id counts at most one of them
    (j after i at the pull, j before i at the push): at most ⌈c_i/c_j⌉ arrivals, once for
    equal cycles. That refinement needs exact ties, so it is used only when every c_i is a
    multiple of 2⁻¹⁰ below 2¹² (float32 then adds and subtracts them exactly) or all c_i are
    equal (every worker then performs the same float operations). An update needs K accepted
    arrivals and at most K − 1 were buffered at the pull: the staleness is at most
    ⌊(arrivals + K − 1)/K⌋.
    """
    n = cycles.size
    if np.all(cycles == cycles[0]):
        arrivals = np.full(n, n - 1)
    else:
        ratio = cycles[:, None] / cycles[None, :]
        scaled = cycles * 1024.0
        exact = bool(np.all(scaled == np.round(scaled)) and np.all(cycles < 4096.0))
        count = np.ceil(ratio) if exact else np.floor(ratio) + 1
        arrivals = count.sum(axis=1) - np.diag(count)
    return int(np.max((arrivals + k - 1) // k))


def parameter_server(
    num_workers: int,
    compute_time: ComputeTime | float,
    *,
    speeds: Sequence[float] | None = None,
    num_slow: int = 0,
    slow_factor: float = 4.0,
    comm_time: ComputeTime | float | None = None,
    protocol: str = "async",
    max_staleness: int | None = None,
    k: int | None = None,
    max_delay: int | None = None,
    group_staleness: str = "mean",
    threshold: float | None = None,
    stops: bool = False,
) -> WorkerModel:
    """n simulated workers behind a parameter server, as a delay model for ``stale``.

    Worker i's c-th cycle lasts m_i·X_{i,c} + C_{i,c}: compute time X from ``compute_time``
    scaled by m_i = (1/speeds[i])·(slow_factor if i is one of the last ``num_slow`` workers),
    plus a communication time C from ``comm_time`` (push and pull together; the worker
    receives the version current right after its push is handled). All workers pull version
    0 at time 0. See the module docstring for the protocols.

    ``max_delay`` (the history size ``stale`` needs) is derived when it can be proved:
    0 for k_sync; S for a staleness threshold; (n − 1)(2S + 1) for SSP (a worker starts
    only S clocks ahead of the slowest, so every other worker pushes at most 2S + 1 times
    while it computes); for deterministic cycle times the exact bound of
    ``_deterministic_bound`` (n − 1 for equal workers). Random compute times without a
    threshold have unbounded staleness, so ``max_delay`` must then be given (a P(τ > m) of
    about e^{−m/n} for exponential times suggests m ≈ 15n). A staleness beyond ``max_delay``
    is clipped to it and counted in ``state.clipped``.

    Rennala SGD (``protocol="rennala"``, ``k=S``; Tyurin & Richtárik 2023, their Alg. 3
    with Method 4 in the workers): every worker computes at the current point x_k; an
    arrival computed at x_k is collected, one computed at an older point is discarded
    (counted in ``dropped``); the worker pulls the current point either way. After S
    collected gradients (a fast worker may give several) the server applies their mean: τ
    = 0 for every update, and an update carries S gradients like a K-sync round. With
    ``stops=True`` the server also stops every other worker at the update (counted in
    ``stopped``) and restarts it at x_{k+1}: then each round starts afresh and, for
    deterministic times τ_i, lasts exactly min{t : Σ_i ⌊t/τ_i⌋ ≥ S}
    (:func:`asgd_jax.theory.rennala_round_time`). The worker whose arrival completes the
    round pulls x_{k+1} (the paper's pseudo-code sends it x_k, whose gradient the next
    round discards).

    Ringmaster ASGD (``protocol="ringmaster"``, ``threshold=R``; Maranjyan, Tyurin &
    Richtárik 2025, Alg. 4 and 5): asynchronous SGD that ignores a gradient whose delay is
    R or more (``dropped``; the same rule as ``max_staleness=R − 1``), so every applied
    gradient has τ < R. With ``stops=True`` (their Alg. 5) a worker whose computation
    reaches delay R is stopped at once and restarted at the current point (``stopped``), so
    no gradient is ever ignored. ``threshold=None`` (or ``math.inf``) is plain ASGD, bit for
    bit.

    Traced parameters (sweeps in one compiled program): the compute-time law's parameters
    (``deterministic(t)``, ``exponential(mean)``, ``shifted_exponential(shift, mean)``,
    ``lognormal(mu, sigma)`` or ``lognormal(mean=, cv=)``, ``pareto(scale, alpha)``),
    ``comm_time``, ``slow_factor`` and ``num_slow`` (an integer; the slow workers are those
    with ``i >= n − num_slow``) may be JAX scalars traced by ``jax.vmap`` / ``jit``, at a
    static ``num_workers`` and protocol. Their checks run only on concrete values (a tracer
    is checked for being a real scalar); nothing reads a tracer's value, so bounds that need
    one are not derived: ``max_delay`` must then be given explicitly, except where it is
    structural (0 for k_sync and rennala, S or R − 1 for a drop threshold, the SSP bound).
    The rates (``arrival_rate``, ``update_rate``, ``mean_staleness`` beyond the structural 0)
    and ``pmf`` are ``None``. The model is a delay model like any other inside that trace —
    ``asgd_jax.stale(inner, delay=model)`` and :func:`simulate` work there — and gives
    exactly the τ of the same model built from the same values as Python numbers (the
    draws are the same float32 operations). Two caveats, both exact when ``speeds`` is
    ``None``: a traced ``slow_factor`` multiplies float32 ``1/speeds[i]`` in float32 (a
    concrete one is multiplied in float64, then rounded), and ``lognormal(mean=, cv=)``
    with traced arguments converts them to (mu, sigma) in float32, within a few ulp of the
    float64 conversion (pass traced ``mu, sigma`` for bit-identical draws). Such a model
    equals only itself and cannot be hashed: it cannot be a static argument of ``jax.jit``.
    ::

      def run(mean, slow):
          model = workers.parameter_server(
              8, workers.exponential(mean), num_slow=2, slow_factor=slow, max_delay=160
          )
          return workers.simulate(model, key, 1000).staleness

      taus = jax.vmap(run)(jnp.array([0.5, 1.0, 2.0]), jnp.array([2.0, 4.0, 8.0]))

    Heavy-tailed compute times with an infinite mean (Pareto with ``alpha ≤ 1``) are
    simulated as they are (every draw is finite); their steady-state rates and mean
    staleness do not exist, and ``arrival_rate``, ``update_rate`` and ``mean_staleness``
    are then ``None``.

    K-async hands one τ per update to the optimizer: ``group_staleness="mean"`` (default)
    uses the group's mean staleness rounded half up — to first order in the delay the mean of
    K gradients taken at W_{t−τ_1..K} is one gradient at W_{t−mean τ} — while ``"max"`` uses
    its oldest gradient and ``"min"`` its freshest. :func:`simulate_events` exposes every
    member's own staleness.

    Args:
      num_workers: n ≥ 1.
      compute_time: a law from this module, or a positive number (deterministic).
      speeds: optional n positive speed factors (worker i computes ``speeds[i]`` times
        faster than the law).
      num_slow: the last ``num_slow`` workers are stragglers, in [0, n] (may be traced).
      slow_factor: how much slower the stragglers are (≥ 1; may be traced).
      comm_time: ``None``, a number ≥ 0 (constant; may be traced), or a law added to every
        cycle.
      protocol: ``"async"``, ``"ssp"``, ``"k_async"``, ``"k_sync"``, ``"rennala"`` or
        ``"ringmaster"``.
      max_staleness: S ≥ 0; async/k_async drop gradients staler than S, ssp blocks workers
        more than S clocks ahead (required); not allowed for k_sync, rennala, ringmaster.
      k: K for k_async (required, ≥ 1) and k_sync (in [1, n], default n); the batch size S
        ≥ 1 for rennala (required).
      max_delay: history bound; derived when possible (see above), else required (always
        with traced parameters, unless structural).
      group_staleness: ``"mean"``, ``"max"`` or ``"min"`` (k_async only).
      threshold: Ringmaster's R ≥ 1 (an integer, or ``None`` / ``math.inf`` for R = ∞).
      stops: stop stale computations (rennala and ringmaster only).

    Returns:
      A :class:`WorkerModel`.

    References:
      Dutta et al. 2018 (arXiv 1803.01113); Ho et al. 2013 (SSP); Yu, Chen & Poor 2025
      (arXiv 2406.11159); Tyurin & Richtárik, "Optimal Time Complexities of Parallel
      Stochastic Optimization Methods Under a Fixed Computation Model", NeurIPS 2023
      (arXiv 2305.12387); Maranjyan, Tyurin & Richtárik, "Ringmaster ASGD: The First
      Asynchronous SGD with Optimal Time Complexity", ICML 2025 (arXiv 2501.16168).
    """
    n = check_int("num_workers", num_workers, low=1)
    law = _as_law("compute_time", compute_time)
    comm = None if comm_time is None else _as_law("comm_time", comm_time, allow_zero=True)
    if protocol not in _PROTOCOLS:
        raise ValueError(f"`protocol` must be one of {_PROTOCOLS}, got {protocol!r}.")
    if group_staleness not in _GROUP_RULES:
        raise ValueError(
            f"`group_staleness` must be one of {_GROUP_RULES}, got {group_staleness!r}."
        )
    num_slow = _int_param("num_slow", num_slow, n)
    slow_factor = real_param("slow_factor", slow_factor, low=1.0)
    if speeds is None:
        speed = np.ones(n)
    else:
        speed = np.asarray(speeds, np.float64)
        if speed.shape != (n,) or not np.all(np.isfinite(speed)) or np.any(speed <= 0):
            raise ValueError(f"`speeds` must be {n} finite positive numbers, got {speeds!r}.")
    mult = 1.0 / speed
    if is_traced(num_slow) or is_traced(slow_factor):
        # The same float32 multipliers the concrete build rounds to, selected by a traced
        # mask: i is slow iff i ≥ n − num_slow.
        base = np.asarray(mult, np.float32)
        if is_traced(slow_factor):
            slow = jnp.asarray(base) * jnp.asarray(slow_factor, jnp.float32)
        else:
            slow = jnp.asarray(np.asarray(mult * slow_factor, np.float32))
        is_slow = jnp.arange(n) >= n - jnp.asarray(num_slow, jnp.int32)
        mult = jnp.where(is_slow, slow, jnp.asarray(base))
    else:
        mult[n - num_slow :] *= slow_factor

    if not isinstance(stops, bool):
        raise TypeError(f"`stops` must be True or False, got {stops!r}.")
    if stops and protocol not in ("rennala", "ringmaster"):
        raise ValueError(f"`stops` applies to 'rennala' and 'ringmaster', not {protocol!r}.")
    if threshold is not None and protocol != "ringmaster":
        raise ValueError(f"`threshold` (R) is Ringmaster's, not {protocol!r}'s.")
    if protocol in ("rennala", "ringmaster") and max_staleness is not None:
        raise ValueError(
            f"`max_staleness` does not apply to {protocol!r} (rennala's τ is 0; ringmaster "
            "takes its delay threshold as `threshold=R`)."
        )
    if threshold == math.inf:  # R = ∞: plain ASGD
        threshold = None
    threshold = check_optional(check_int, "threshold", threshold, low=1)
    if protocol == "rennala":
        if k is None:
            raise ValueError("`k` (the batch size S ≥ 1) is required for protocol='rennala'.")
        k = check_int("k", k, low=1)
    elif protocol == "k_async":
        if k is None:
            raise ValueError("`k` is required for protocol='k_async' (gradients per update).")
        k = check_int("k", k, low=1)
    elif protocol == "k_sync":
        k = n if k is None else check_int("k", k, low=1, high=n)
    elif k is not None:
        raise ValueError(
            f"`k` is only used by 'k_async', 'k_sync' and 'rennala', not {protocol!r}."
        )
    else:
        k = 1
    if protocol == "k_sync" and max_staleness is not None:
        raise ValueError("`max_staleness` does not apply to 'k_sync' (its staleness is 0).")
    if protocol == "ssp" and max_staleness is None:
        raise ValueError("`max_staleness` (S ≥ 0, the allowed clock gap) is required for 'ssp'.")
    if max_staleness is not None:
        max_staleness = check_int("max_staleness", max_staleness)
    drops = max_staleness is not None and protocol in ("async", "k_async")
    if protocol == "ringmaster" and threshold is not None:
        max_staleness_rule = threshold - 1  # accept τ < R, i.e. τ ≤ R − 1
        drops = True
    else:
        max_staleness_rule = max_staleness
    stops = stops and (protocol == "rennala" or threshold is not None)

    # ---- max_delay: given, or derived where a bound is provable.
    traced = (
        law.traced
        or (comm is not None and comm.traced)
        or is_traced(num_slow)
        or is_traced(slow_factor)
    )
    constant_cycles = isinstance(law, Deterministic) and (
        comm is None or isinstance(comm, Deterministic)
    )
    bounds = []
    if protocol in ("k_sync", "rennala"):
        bounds.append(0)
    if max_staleness_rule is not None:
        bounds.append(max_staleness_rule if drops else (n - 1) * (2 * max_staleness + 1))
    value_bound = constant_cycles and protocol not in ("k_sync", "rennala")
    if traced:
        if max_delay is None and (value_bound or not bounds):
            raise ValueError(
                "`max_delay` is required: the worker model has traced parameters (built inside "
                "jit/vmap), so no bound that depends on their values can be derived. Give an "
                f"explicit static `max_delay` (e.g. {15 * n} for n={n}; larger delays are "
                "clipped and counted in state.clipped)."
            )
        return _traced_model(
            n=n,
            law=law,
            comm=comm,
            mult=mult,
            protocol=protocol,
            max_staleness=max_staleness,
            max_staleness_rule=max_staleness_rule,
            k=k,
            max_delay=check_int("max_delay", min(bounds) if max_delay is None else max_delay),
            group_staleness=group_staleness,
            threshold=threshold,
            stops=stops,
        )
    comm_mean = 0.0 if comm is None else comm.mean
    cycles = mult * law.mean + comm_mean
    if value_bound:
        bounds.append(_deterministic_bound(cycles, k))
    if max_delay is None:
        if not bounds:
            raise ValueError(
                f"`max_delay` is required: with {law.name} compute times the staleness of "
                f"protocol {protocol!r} is unbounded. Give `max_staleness` (drop stale "
                f"gradients) or a `max_delay` (e.g. {15 * n} for n={n}; larger delays are "
                "clipped and counted in state.clipped)."
            )
        max_delay = min(bounds)
    max_delay = check_int("max_delay", max_delay)

    # ---- rates and laws the theory reads.
    busy = ("async", "k_async", "ringmaster")
    finite = math.isfinite(law.mean) and (comm is None or math.isfinite(comm.mean))
    arrival_rate = float(np.sum(1.0 / cycles)) if protocol in busy and finite else None
    mean_staleness = None
    update_rate = None
    if protocol == "rennala":
        mean_staleness = 0.0
    elif protocol in busy and not drops and finite:
        update_rate = arrival_rate / k
        mean_staleness = (n - 1) / k
    elif protocol == "k_sync":
        mean_staleness = 0.0
        if comm is None or isinstance(comm, Deterministic):
            round_time = expected_order_statistic(law, k, n, multipliers=mult, shift=comm_mean)
            update_rate = 0.0 if math.isinf(round_time) else 1.0 / round_time
    pmf = None
    equal = bool(np.all(mult == mult[0]))
    if protocol in ("k_sync", "rennala"):
        pmf = np.zeros(max_delay + 1)
        pmf[0] = 1.0
    elif protocol in ("async", "ringmaster") and not drops and equal:
        if constant_cycles and max_delay >= n - 1:
            pmf = np.zeros(max_delay + 1)
            pmf[n - 1] = 1.0
        elif isinstance(law, Exponential) and comm is None:
            # Memoryless and symmetric: after a worker pulls, each arrival is its own with
            # probability 1/n, so τ ~ Geometric(1/n) on {0, 1, …}; the tail is clipped.
            p = 1.0 / n
            pmf = p * (1.0 - p) ** np.arange(max_delay + 1)
            pmf[-1] = (1.0 - p) ** max_delay

    name = _name(n, law, protocol, max_staleness, k, threshold, stops)
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
        name=name,
        pmf=pmf,
        num_workers=n,
        protocol=protocol,
        compute_time=law,
        comm_time=comm,
        multipliers=tuple(float(x) for x in mult),
        max_staleness=max_staleness,
        k=k,
        group_staleness=group_staleness,
        threshold=threshold,
        stops=stops,
        arrival_rate=arrival_rate,
        update_rate=update_rate,
        mean_staleness=mean_staleness,
        arrival=arrival,
        key=(
            "parameter_server",
            n,
            law,
            comm,
            _digest(mult),
            protocol,
            max_staleness,
            k,
            max_delay,
            group_staleness,
            threshold,
            stops,
        ),
    )


def _int_param(name: str, value, n: int):
    """``num_slow``: an int in [0, n] when concrete; a traced integer scalar is kept."""
    if is_traced(value):
        if jnp.ndim(value) != 0 or not jnp.issubdtype(jnp.result_type(value), jnp.integer):
            raise TypeError(f"`{name}` must be an integer scalar, got a traced {value.aval}.")
        return value
    if isinstance(value, (jax.Array, np.ndarray)) and np.ndim(value) == 0:
        value = value.item()
    return check_int(name, value, low=0, high=n)
