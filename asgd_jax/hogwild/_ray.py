"""The Ray backend: a parameter-server actor and one worker actor per worker, any cluster.

``hogwild.train(..., backend="ray")`` runs the same server classes as the thread backend,
in an actor (``_ray_server.py``), and one worker process per worker (``_ray_worker.py``).
This module is the driver: it checks the arguments, joins the cluster (``_ray_cluster.py``:
which cluster, the processes kept on it), configures the actors, watches them (a worker
that dies is restarted by Ray and its run retried there; a server that dies is restarted
and reloads its checkpoint), stops the run and assembles the same :class:`HogwildResult`
as the thread backend.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
import uuid
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from asgd_jax.hogwild._ray_cluster import (
    ACTOR_PREFIX,
    CONNECT_TIMEOUT_S,
    MAX_RESTARTS,
    cluster,
    import_ray,
    new_server,
    pool,
    runtime_env,
)
from asgd_jax.hogwild._ray_server import ServerSpec, latest_step
from asgd_jax.hogwild._results import HogwildError, HogwildResult, summarize, trace_from_rows

__all__ = [
    "ACTOR_PREFIX",
    "CONNECT_TIMEOUT_S",
    "MAX_RESTARTS",
    "RAY_MODES",
    "check_arguments",
    "import_ray",
    "train",
]

RAY_MODES = ("locked", "sync")
POLL_S = 0.05


def check_arguments(
    *,
    mode: str,
    record_pushes: bool,
    checkpoint_every: int | None,
    checkpoint_dir: Any,
    resume: bool,
    ray_address: str | None,
) -> str | None:
    """Checks the Ray-specific arguments (before anything starts); returns the directory."""
    if mode == "lock_free":
        raise ValueError(
            "mode='lock_free' has no meaning with backend='ray': it adds updates into memory "
            "the workers share, and Ray workers are separate processes. Use mode='locked' "
            "(one update at a time, in arrival order) or backend='threads'."
        )
    if mode not in RAY_MODES:
        raise ValueError(f"backend='ray' runs the modes {RAY_MODES}, got mode={mode!r}.")
    if ray_address is not None and (not isinstance(ray_address, str) or not ray_address):
        raise TypeError(f"`ray_address` must be a non-empty string or None, got {ray_address!r}.")
    if not isinstance(resume, bool):
        raise TypeError(f"`resume` must be a bool, got {resume!r}.")
    if (checkpoint_every is None) != (checkpoint_dir is None):
        raise ValueError(
            "`checkpoint_every` and `checkpoint_dir` go together: give both (checkpoints of "
            f"the server) or neither, got {checkpoint_every!r} and {checkpoint_dir!r}."
        )
    directory = None
    if checkpoint_dir is not None:
        directory = os.path.abspath(os.fspath(checkpoint_dir))
        if record_pushes:
            raise ValueError(
                "`record_pushes=True` cannot be combined with `checkpoint_dir`: recorded "
                "pushes are not checkpointed, so a restarted server would lose them."
            )
        found = latest_step(directory)
        if resume and found is None:
            raise ValueError(f"resume=True, but `checkpoint_dir` {directory} has no checkpoint.")
        if not resume and found is not None:
            raise ValueError(
                f"`checkpoint_dir` {directory} already holds a checkpoint (version {found}): "
                "pass resume=True to continue that run, or give an empty directory."
            )
    elif resume:
        raise ValueError("resume=True needs the `checkpoint_dir` of the run to resume.")
    import_ray()
    return directory


# --------------------------------------------------------------------------------------------
# The run.


# JAX flags set with jax.config.update in the driver that change what a program computes;
# actors apply the driver's values (environment variables travel in the runtime env).
JAX_FLAGS = ("jax_enable_x64", "jax_threefry_partitionable", "jax_default_matmul_precision")


def jax_flags() -> dict:
    return {name: getattr(jax.config, name) for name in JAX_FLAGS}


@dataclasses.dataclass
class _WorkerSpec:
    jax_flags: dict
    step: Any
    treedef: Any
    params: tuple
    key: tuple  # (data, impl name or None)
    data_fn: Any
    batch_treedef: Any
    batch: tuple
    batch_size: int | None
    straggler_table: np.ndarray | None


def train(
    *,
    server_cls: type,
    server_kwargs: dict,
    step: Any,
    params: Any,
    data: Any,
    key: Any,
    batch_size: int | None,
    straggler_table: Any,
    num_workers: int,
    steps: int | None,
    time_limit: float | None,
    ray_address: str | None,
    checkpoint_every: int | None,
    checkpoint_dir: str | None,
    resume: bool,
    progress: bool,
) -> HogwildResult:
    ray = import_ray()

    leaves, treedef = jax.tree.flatten(params)
    leaves = [np.array(jnp.asarray(x), copy=True) for x in leaves]
    data_fn, batch_treedef, batch = None, None, ()
    if callable(data):
        data_fn = data
        first = jax.tree.map(np.asarray, data(0, 0))  # learns the batch shapes
        batch_treedef = jax.tree.structure(first)
        batch = tuple((x.shape, x.dtype) for x in jax.tree.leaves(first))
    worker_spec = _WorkerSpec(
        jax_flags=jax_flags(),
        step=step,
        treedef=treedef,
        params=tuple((x.shape, x.dtype) for x in leaves),
        key=_key_parts(key),
        data_fn=data_fn,
        batch_treedef=batch_treedef,
        batch=batch,
        batch_size=batch_size,
        straggler_table=None if straggler_table is None else np.asarray(straggler_table),
    )
    server_spec = ServerSpec(
        jax_flags=jax_flags(),
        server_cls=server_cls,
        step=step,
        params=leaves,
        treedef=treedef,
        server_kwargs=server_kwargs,
        checkpoint_every=checkpoint_every,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
    )
    with cluster(ray_address, num_workers) as owned:
        env = runtime_env()
        data_ref = [] if data_fn is not None else [ray.put(jax.tree.map(np.asarray, data))]
        payload = ray.cloudpickle.dumps(worker_spec)
        server_payload = ray.cloudpickle.dumps(server_spec)
        kept = pool(ray)
        pin = len([n for n in ray.nodes() if n.get("Alive")]) == 1
        workers = kept.workers(num_workers, pin, env)
        if checkpoint_dir is None:  # never restarted: a kept server, configured for this run
            server, fresh = kept.server(env), False
            setup = [server.configure.remote(server_payload)]
        else:  # restartable: its constructor's arguments must name the run
            server, fresh = (
                new_server(
                    ray,
                    f"{ACTOR_PREFIX}-run-{uuid.uuid4().hex[:8]}",
                    env,
                    server_payload,
                    restartable=True,
                ),
                True,
            )
            setup = [server.ready.remote()]

        run = uuid.uuid4().hex
        args = (run, payload, data_ref, server)

        clean = False
        try:
            try:
                ray.get(setup + [w.configure.remote(*args) for w in workers])
            except ray.exceptions.RayError as exc:
                raise HogwildError(f"hogwild actors failed to start: {_one_line(exc)}") from exc
            result = _drive(
                ray,
                server,
                workers,
                args,
                steps=steps,
                time_limit=time_limit,
                progress=progress,
                treedef=treedef,
                mode=server_cls.mode,
            )
            clean = True
            return result
        finally:
            if fresh:
                with contextlib.suppress(Exception):
                    ray.kill(server, no_restart=True)
            if not clean or owned:  # workers may still be inside a run: never reuse them
                kept.clear(ray)


def _key_parts(key: Any) -> tuple[np.ndarray, str | None]:
    """A key as NumPy data and its implementation's name (``None``: a raw uint32 key)."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(key)), str(jax.random.key_impl(key))
    return np.asarray(key), None


def _drive(ray, server, workers, args, *, steps, time_limit, progress, treedef, mode):
    """Starts the warm workers, watches their runs and the time limit, stops, collects."""
    errors = ray.exceptions
    ready = ray.get(server.ready.remote())
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=f"hogwild ray {mode} ×{len(workers)}", unit="update")
        bar.update(ready["version"])
    ray.get(server.start.remote())
    t0 = time.perf_counter()
    # Ray retries a run on the restarted process of a worker that died (the server counts
    # the restarts); a run fails here only once the worker has died too often.
    runs = {w.run.remote(*args): i for i, w in enumerate(workers)}
    epochs: set[str] = set()
    stopping, last_status = False, 0.0
    while runs:
        done, _ = ray.wait(list(runs), num_returns=1, timeout=POLL_S)
        for ref in done:
            w = runs.pop(ref)
            try:
                ray.get(ref)
            except errors.RayTaskError as exc:  # first: a task error may also be an actor error
                server.stop.remote()
                cause = exc.cause if isinstance(exc.cause, BaseException) else exc
                if isinstance(cause, errors.RayActorError):
                    raise HogwildError(
                        "the hogwild server died, and a server without checkpoints cannot be "
                        "restarted (pass checkpoint_every= and checkpoint_dir=): "
                        f"{_one_line(cause)}"
                    ) from cause
                raise HogwildError(
                    f"hogwild worker {w} raised {type(cause).__name__}: {cause}", worker=w
                ) from cause
            except errors.RayActorError as exc:
                server.stop.remote()
                raise HogwildError(
                    f"hogwild worker {w} died more than {MAX_RESTARTS} times: {_one_line(exc)}",
                    worker=w,
                ) from exc
        now = time.perf_counter()
        if now - last_status >= 0.2:
            last_status = now
            with contextlib.suppress(errors.GetTimeoutError):
                version, epoch, _ = ray.get(server.status.remote(), timeout=1.0)
                epochs.add(epoch)
                if bar is not None:
                    bar.update(version - bar.n)
        if time_limit is not None and not stopping and now - t0 >= time_limit:
            stopping = True
            server.stop.remote()
    try:
        out = ray.get(server.result.remote())
    except errors.RayError as exc:
        raise HogwildError(f"hogwild server failed: {_one_line(exc)}") from exc
    if bar is not None:
        bar.update(len(out["rows"]) - bar.n)
        bar.close()
    trace = trace_from_rows(out["rows"])
    metrics = summarize(
        trace,
        mode=mode,
        gradients_per_worker=np.asarray(out["gradients"], np.int64),
        wall_time=out["wall_time"],
        stopped_by="time_limit" if stopping else "steps",
        **out["counters"],
    )
    metrics = metrics._replace(
        backend="ray",
        worker_restarts=np.asarray(out["worker_restarts"], np.int64),
        server_restarts=max(len(epochs) - 1, out["server_restarts"]),
        lost_gradients=int(out["lost"]),
        duplicate_pushes=int(out["duplicates"]),
    )
    params = jax.tree.unflatten(treedef, [jnp.asarray(x) for x in out["params"]])
    extra = {"discarded": out["discarded"]} if "discarded" in HogwildResult._fields else {}
    return HogwildResult(
        params=params,
        opt_state=jax.tree.map(jnp.asarray, out["opt_state"]),
        metrics=metrics,
        trace=trace,
        pushes=out["pushes"],
        **extra,
    )


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
