"""``hogwild.train``: checks the arguments, builds the server and the programs, runs them."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from asgd_jax._validation import as_key, check_int, check_min_int, check_optional, check_real
from asgd_jax.hogwild import _programs, _ray
from asgd_jax.hogwild._lock_free import LockFreeServer
from asgd_jax.hogwild._locked import LockedServer
from asgd_jax.hogwild._rennala import RennalaServer
from asgd_jax.hogwild._results import HogwildResult, summarize
from asgd_jax.hogwild._ringmaster import RingmasterServer
from asgd_jax.hogwild._run import Run
from asgd_jax.hogwild._server import Server
from asgd_jax.hogwild._stragglers import STRAGGLER_TABLE, Straggler
from asgd_jax.hogwild._sync import SyncServer
from asgd_jax.step import make_step

__all__ = ["BACKENDS", "MODES", "SERVERS", "train"]

SERVERS: dict[str, type[Server]] = {
    cls.mode: cls
    for cls in (LockedServer, LockFreeServer, SyncServer, RingmasterServer, RennalaServer)
}
"""The modes, each a :class:`Server` subclass: three consistency modes and two server rules."""
MODES = tuple(SERVERS)  # ("locked", "lock_free", "sync", "ringmaster", "rennala")
BACKENDS = ("threads", "ray")


def train(
    loss_fn: Callable[[optax.Params, Any], jax.Array],
    params: optax.Params,
    optimizer: optax.GradientTransformation,
    data: Any,
    *,
    num_workers: int = 4,
    steps: int | None = None,
    mode: str = "locked",
    max_staleness: int | None = None,
    threshold: int | float | None = None,
    stops: bool = False,
    k: int | None = None,
    batch_size: int | None = None,
    straggler: Straggler | None = None,
    time_limit: float | None = None,
    seed: int | chex.PRNGKey = 0,
    record_pushes: bool = False,
    progress: bool = False,
    shutdown_timeout: float = 30.0,
    backend: str = "threads",
    ray_address: str | None = None,
    checkpoint_every: int | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
) -> HogwildResult:
    """Trains with ``num_workers`` real asynchronous worker threads and a parameter server.

    Each worker thread repeatedly reserves a gradient, pulls the server's parameters, runs
    one jitted program (the gradient, no host callbacks) and delivers the push; the
    server applies the updates (see :mod:`asgd_jax.hogwild` for the three consistency
    modes). Programs are compiled once here, in the calling thread, and cached for later
    runs with the same ``loss_fn``, ``optimizer`` and shapes. The run ends after ``steps``
    updates, at ``time_limit`` seconds, on the first error (re-raised here as
    :class:`HogwildError` naming the worker, with the original exception as ``__cause__``)
    or on ``KeyboardInterrupt`` (propagated after every thread is stopped; threads still
    stuck in user code after ``shutdown_timeout`` are named in a note on the interrupt and
    in a ``RuntimeWarning``). Every thread this call starts is joined before it returns.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``, jittable.
      params: the initial parameters (a pytree of floating-point arrays); not modified.
      optimizer: any optax transformation. ``"locked"``/``"sync"``: one server-side state;
        ``"lock_free"``: each worker keeps its own state (as in PyTorch's Hogwild example).
      data: either a pytree of arrays with a shared leading example axis (each worker samples
        its own batches inside its program, see :func:`worker_batch`; needs ``batch_size``),
        or a host function ``data(worker, step) -> batch`` returning NumPy arrays of fixed
        shapes. It is called from the worker threads, so it must be thread-safe; it is called
        once as ``data(0, 0)`` before the run to learn the batch shapes (that batch is then
        worker 0's first).
      num_workers: worker threads, ≥ 1.
      steps: updates to apply (``"sync"``: rounds of ``num_workers`` gradients); exactly
        this many in ``"locked"``/``"lock_free"`` (pulls reserve them). ``None`` runs until
        ``time_limit``.
      mode: ``"locked"``, ``"lock_free"``, ``"sync"``, or a server rule of the worker
        simulator's (``workers.parameter_server(protocol=...)``, same names, same checks):
        ``"ringmaster"`` (locked, never applies τ ≥ ``threshold``) or ``"rennala"`` (each
        update the mean of ``k`` gradients computed at the current point; ``steps``
        counts updates). Discarded work is counted in ``metrics.dropped`` /
        ``metrics.stopped`` and logged in ``result.discarded``; the trace holds the
        applied updates only, so it replays through ``delays.trace`` as it is.
      max_staleness: ``"locked"`` only: drop a gradient that arrives with τ > S (W and the
        version unchanged, the worker pulls again), so every applied τ ≤ S; ``None``
        keeps every gradient.
      threshold: ``"ringmaster"``'s R ≥ 1 (``None`` or ``math.inf``: R = ∞, ``"locked"``).
      stops: ``"ringmaster"`` / ``"rennala"``: stop a computation once it is too stale
        (delay R; an old point) and restart its worker at the current point, instead of
        dropping its gradient on arrival.
      k: ``"rennala"``'s S ≥ 1, gradients per update (required there).
      batch_size: examples per gradient when ``data`` is arrays.
      straggler: extra compute time per gradient, a :class:`Straggler`, or ``None``.
      time_limit: wall-clock seconds after which the run stops (a worker finishes the
        gradient it is computing, discards it and stops), or ``None``.
      seed: an int or a single PRNG key: the data streams and random straggler times.
      record_pushes: keep a copy of every applied push (for tests and replays; memory grows
        with ``steps``).
      progress: show a tqdm progress bar.
      shutdown_timeout: seconds to wait for the threads after the run stops before
        reporting a thread stuck in user code as an error.
      backend: ``"threads"`` (one process) or ``"ray"`` (a parameter-server actor and one
        worker process per worker, on any Ray cluster; ``"locked"`` and ``"sync"`` only;
        needs ``pip install 'asgd-jax[ray]'``). See :mod:`asgd_jax.hogwild`.
      ray_address: ``backend="ray"``: the cluster to join (``"host:port"``, ``"auto"``);
        ``None`` uses an initialized Ray, else ``RAY_ADDRESS``, else starts a local one.
      checkpoint_every: ``backend="ray"``: the server checkpoints itself (orbax) every this
        many updates and at the end; a server that dies is restarted and reloads the newest
        checkpoint. Needs ``checkpoint_dir``.
      checkpoint_dir: where the server's checkpoints go (on the server's machine: the
        driver's); it must hold no checkpoint unless ``resume``.
      resume: continue the run checkpointed in ``checkpoint_dir`` (e.g. after its driver
        died) up to ``steps`` updates; pass the same model, optimizer, data and seed.

    Returns:
      A :class:`HogwildResult` (final params, optimizer state, metrics, trace, pushes).

    References:
      Niu, Recht, Ré, Wright, "Hogwild!", NeurIPS 2011 (arXiv 1106.5730).
    """
    if not callable(loss_fn):
        raise TypeError(f"`loss_fn` must be callable, got {loss_fn!r}.")
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(f"`optimizer` must be an optax transformation, got {optimizer!r}.")
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}.")
    rules = _rule_kwargs(mode, max_staleness, threshold, stops, k)
    if backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {BACKENDS}, got {backend!r}.")
    checkpoint_every = check_optional(check_min_int, "checkpoint_every", checkpoint_every, 1)
    if backend == "ray":
        checkpoint_dir = _ray.check_arguments(
            mode=mode,
            record_pushes=record_pushes,
            checkpoint_every=checkpoint_every,
            checkpoint_dir=checkpoint_dir,
            resume=resume,
            ray_address=ray_address,
        )
    else:
        for name, value, unset in (
            ("ray_address", ray_address, None),
            ("checkpoint_every", checkpoint_every, None),
            ("checkpoint_dir", checkpoint_dir, None),
            ("resume", resume, False),
        ):
            if value is not unset:
                raise ValueError(f"`{name}` applies to backend='ray', got {name}={value!r}.")
    num_workers = check_min_int("num_workers", num_workers, 1)
    steps = check_optional(check_min_int, "steps", steps, 1)
    time_limit = check_optional(check_real, "time_limit", time_limit, strict=True, unit="seconds")
    if steps is None and time_limit is None:
        raise ValueError("Give `steps`, `time_limit` or both: the run needs an end.")
    shutdown_timeout = check_real("shutdown_timeout", shutdown_timeout, unit="seconds")
    if straggler is not None and not isinstance(straggler, Straggler):
        raise TypeError(f"`straggler` must be a Straggler or None, got {straggler!r}.")
    if straggler is not None:
        straggler.means(num_workers)  # validates against num_workers
    _check_params(params)
    if callable(data):
        if batch_size is not None:
            raise ValueError("`batch_size` applies to array data; a data function sets it.")
    else:
        leaves = jax.tree.leaves(data)
        if not leaves:
            raise ValueError("`data` must be a non-empty pytree of arrays or a function.")
        sizes = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
        if len(sizes) != 1 or None in sizes or 0 in sizes:
            raise ValueError(
                f"`data` leaves must share a non-empty leading example axis, got sizes {sizes}."
            )
        if batch_size is None:
            raise ValueError("`batch_size` is required when `data` is a pytree of arrays.")
        batch_size = check_min_int("batch_size", batch_size, 1)
    key = as_key("seed", seed)

    step = make_step(loss_fn, optimizer)
    server_kwargs = {"num_workers": num_workers, "steps": steps, "record_pushes": record_pushes}
    server_kwargs.update(rules)
    server = SERVERS[mode](step, params, **server_kwargs)
    straggler_table = None
    if straggler is not None:
        straggler_table = straggler.table(
            jax.random.fold_in(key, 0x5747), num_workers, STRAGGLER_TABLE
        )
    if backend == "ray":
        return _ray.train(
            server_cls=SERVERS[mode],
            server_kwargs=server_kwargs,
            step=step,
            params=params,
            data=data,
            key=key,
            batch_size=batch_size,
            straggler_table=straggler_table,
            num_workers=num_workers,
            steps=steps,
            time_limit=time_limit,
            ray_address=ray_address,
            checkpoint_every=checkpoint_every,
            checkpoint_dir=checkpoint_dir,
            resume=resume,
            progress=progress,
        )
    run = Run(server, data, key=key, straggler_table=straggler_table)
    data_arrays = None if callable(data) else jax.tree.map(jnp.asarray, data)
    # Compile in the calling thread (tracing errors surface here, threads never compile
    # concurrently), once per model/optimizer/shape combination.
    spec = _programs.WorkerSpec(
        step=step,
        worker_optimizer=server.worker_optimizer,
        treedef=server.treedef,
        params=tuple((x.shape, x.dtype) for x in server.initial),
        batch_treedef=run.batch_treedef,
        batch=run.batch_shapes,
        batch_size=None if callable(data) else batch_size,
    )
    opt_state_struct = jax.eval_shape(server.worker_opt_state)
    compiled = _programs.compile_worker(spec, data_arrays, key, run.batch_structs, opt_state_struct)
    server.compile()

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=f"hogwild {mode} ×{num_workers}", unit="update")
    wall_time, worker_states = run.execute(
        compiled,
        data_arrays,
        time_limit=time_limit,
        shutdown_timeout=shutdown_timeout,
        progress=bar,
    )
    metrics = summarize(
        server.trace(),
        mode=mode,
        gradients_per_worker=np.asarray(run.local_steps, np.int64),
        wall_time=wall_time,
        stopped_by=run.stop_reason or "steps",
        torn_reads=server.torn_reads,
        overlapping_writes=server.overlapping_writes,
        write_residual=server.write_residual(),
        dropped=server.dropped,
        stopped=server.stopped,
    )
    return HogwildResult(
        params=server.final_params(),
        opt_state=server.final_opt_state(worker_states),
        metrics=metrics,
        trace=server.trace(),
        pushes=server.stacked_pushes(),
        discarded=server.discarded(),
    )


def _check_params(params: Any) -> None:
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    if not leaves:
        raise ValueError("`params` must contain at least one array.")
    for path, leaf in leaves:
        dtype = jnp.asarray(leaf).dtype
        if not jnp.issubdtype(dtype, jnp.inexact):
            raise TypeError(
                f"`params` leaf {jax.tree_util.keystr(path) or '(root)'} has dtype {dtype}: "
                "hogwild differentiates the loss with respect to every parameter, so every "
                "leaf must be a floating-point array (e.g. cast it with .astype(jnp.float32))."
            )


def _rule_kwargs(mode: str, max_staleness: Any, threshold: Any, stops: Any, k: Any) -> dict:
    """The server rule's arguments for ``mode``, checked as ``workers.parameter_server``
    checks them (each belongs to one mode; R and S are integers ≥ 1, S ≥ 0)."""
    if not isinstance(stops, bool):
        raise TypeError(f"`stops` must be True or False, got {stops!r}.")
    if max_staleness is not None and mode != "locked":
        raise ValueError(
            f"`max_staleness` applies to mode='locked', not {mode!r} (ringmaster takes its "
            "delay threshold as `threshold=R`; rennala's and sync's τ is 0)."
        )
    if threshold is not None and mode != "ringmaster":
        raise ValueError(f"`threshold` (R) applies to mode='ringmaster', not {mode!r}.")
    if stops and mode not in ("ringmaster", "rennala"):
        raise ValueError(f"`stops` applies to 'ringmaster' and 'rennala', not {mode!r}.")
    if k is not None and mode != "rennala":
        raise ValueError(f"`k` (S, gradients per update) applies to mode='rennala', not {mode!r}.")
    if mode == "locked":
        return {"max_staleness": check_optional(check_int, "max_staleness", max_staleness)}
    if mode == "ringmaster":
        if threshold == math.inf:  # R = ∞: plain locked ASGD
            threshold = None
        threshold = check_optional(check_int, "threshold", threshold, low=1)
        return {"threshold": threshold, "stops": stops}
    if mode == "rennala":
        if k is None:
            raise ValueError("`k` (the batch size S ≥ 1) is required for mode='rennala'.")
        return {"k": check_int("k", k, low=1), "stops": stops}
    return {}
