"""The Ray backend's cluster: which one a run joins, and the processes kept on it.

If Ray is initialized, that cluster; else ``ray_address`` or ``RAY_ADDRESS`` (an unreachable
address fails within ``CONNECT_TIMEOUT_S``, in one line); else a local Ray sized to the
workers, shut down at the end of the run.
"""

from __future__ import annotations

import contextlib
import os
import socket

from asgd_jax.hogwild._ray_server import ParameterServer
from asgd_jax.hogwild._ray_worker import Worker

__all__ = [
    "ACTOR_PREFIX",
    "CONNECT_TIMEOUT_S",
    "MAX_RESTARTS",
    "cluster",
    "import_ray",
    "pool",
    "runtime_env",
]

MAX_RESTARTS = 8  # per worker: a worker that keeps dying is an error, not a retry loop
CONNECT_TIMEOUT_S = 10.0
ACTOR_PREFIX = "asgd-hogwild"  # actor names: f"{ACTOR_PREFIX}-{job}-..." / "-run-{id}-server"


def import_ray():
    try:
        import ray
    except ImportError as exc:
        raise ImportError(
            "backend='ray' needs Ray, which is an optional dependency: pip install 'asgd-jax[ray]'"
        ) from exc
    return ray


def _check_reachable(address: str) -> None:
    """Fails fast, in one line, when nothing listens at ``address`` (``auto`` is Ray's)."""
    if address in ("auto", "local"):
        return
    target = address.split("://", 1)[-1].rsplit("/", 1)[0]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(
            f"`ray_address` must look like 'host:port' or 'ray://host:port', got {address!r}."
        )
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise ConnectionError(
            f"Cannot reach the Ray cluster at {address!r} ({exc}); start one there with "
            "`ray start --head`, or pass another `ray_address`."
        ) from None


@contextlib.contextmanager
def cluster(ray_address: str | None, num_workers: int):
    """The cluster of the run: the initialized one, the given address, or a local one."""
    ray = import_ray()
    if ray.is_initialized():
        yield False
        return
    address = ray_address or os.environ.get("RAY_ADDRESS") or None
    if address is not None:
        _check_reachable(address)
        ray.init(address=address, log_to_driver=True)
    else:
        # "local": a new Ray of its own, never one another process started on this machine.
        ray.init(address="local", num_cpus=num_workers, include_dashboard=False)
    try:
        yield True
    finally:
        ray.shutdown()


def runtime_env() -> dict:
    env = {"JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS") or "cpu"}
    if os.environ.get("XLA_FLAGS"):
        env["XLA_FLAGS"] = os.environ["XLA_FLAGS"]
    return {"env_vars": env}


class _Pool:
    """Worker processes (and a server) kept between runs on one cluster connection.

    Starting a process and importing JAX takes seconds; a run with the same number of
    workers reuses them. They hold their CPU reservations, so a run with another number of
    workers first ends the kept ones. They end with the driver's connection, as every
    non-detached actor does (``ray.shutdown()``).
    """

    def __init__(self, job: str):
        self.job = job
        self.key: tuple | None = None
        self.handles: list = []
        self.server_handle = None

    def workers(self, num_workers: int, pin: bool, env: dict) -> list:
        import ray

        key = (num_workers, pin, repr(env))
        if key != self.key:
            self._kill_workers(ray)
            self.key = key
            actor = ray.remote(Worker)
            self.handles = [
                actor.options(
                    name=f"{ACTOR_PREFIX}-{self.job}-worker-{w}-of-{num_workers}",
                    num_cpus=1,
                    max_restarts=MAX_RESTARTS,
                    max_task_retries=-1,
                    scheduling_strategy="SPREAD",
                    runtime_env=env,
                ).remote(w, num_workers, pin)
                for w in range(num_workers)
            ]
        return self.handles

    def server(self, env: dict):
        import ray

        if self.server_handle is None:
            self.server_handle = new_server(
                ray, f"{ACTOR_PREFIX}-{self.job}", env, None, restartable=False
            )
        return self.server_handle

    def _kill_workers(self, ray) -> None:
        for handle in self.handles:
            with contextlib.suppress(Exception):
                ray.kill(handle, no_restart=True)
        self.handles, self.key = [], None

    def clear(self, ray) -> None:
        self._kill_workers(ray)
        if self.server_handle is not None:
            with contextlib.suppress(Exception):
                ray.kill(self.server_handle, no_restart=True)
        self.server_handle = None


_POOLS: dict[str, _Pool] = {}


def pool(ray) -> _Pool:
    """The kept actors of this driver's connection (a new connection starts afresh)."""
    job = ray.get_runtime_context().get_job_id()
    if job not in _POOLS:
        _POOLS.clear()  # handles of an earlier connection are dead
        _POOLS[job] = _Pool(job)
    return _POOLS[job]


def new_server(ray, name: str, env: dict, payload: bytes | None, *, restartable: bool):
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # On the driver's machine: checkpoints are written there and resumed from there.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return (
        ray.remote(ParameterServer)
        .options(
            name=f"{name}-server",
            num_cpus=0,
            max_restarts=-1 if restartable else 0,
            max_task_retries=-1 if restartable else 0,
            scheduling_strategy=here,
            runtime_env=env,
        )
        .remote(payload)
    )
