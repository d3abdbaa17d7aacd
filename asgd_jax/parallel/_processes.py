"""Several processes or hosts: joining a ``jax.distributed`` run, and launching one locally.

Launching on several hosts: run the same program on every host with the coordinator's
address, the number of processes and each process's id, and call :func:`initialize` before
any other JAX call::

  # on host i of N (host 0 runs the coordinator on port 1234)
  ASGD_JAX_COORDINATOR=host0:1234 ASGD_JAX_NUM_PROCESSES=N ASGD_JAX_PROCESS_ID=i \\
      python train.py

On SLURM, Open MPI or Cloud TPU, ``initialize()`` with no variables set lets JAX detect the
cluster. :func:`launch_local` starts N such processes on one machine (CPU devices); the
package's ``_distributed_worker`` module is such a program, used to check that several
processes give the numbers of one.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import jax

from asgd_jax._validation import check_int, check_real

__all__ = [
    "ENV_COORDINATOR",
    "ENV_NUM_PROCESSES",
    "ENV_PROCESS_ID",
    "initialize",
    "launch_local",
]

ENV_COORDINATOR = "ASGD_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "ASGD_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "ASGD_JAX_PROCESS_ID"
_ENV_INIT_TIMEOUT = "ASGD_JAX_INITIALIZATION_TIMEOUT"
_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: Sequence[int] | None = None,
    initialization_timeout: int | None = None,
) -> None:
    """Joins this process to a multi-process JAX run (``jax.distributed.initialize``).

    Call it first, before any other JAX call. Arguments left ``None`` are read from the
    environment variables ``ASGD_JAX_COORDINATOR`` (``host:port`` of process 0),
    ``ASGD_JAX_NUM_PROCESSES`` and ``ASGD_JAX_PROCESS_ID`` (set by :func:`launch_local`);
    when none is given anywhere JAX detects the cluster itself (SLURM, Open MPI, Cloud
    TPU). Afterwards ``jax.devices()`` lists every process's devices and a mesh over them
    (:func:`data_mesh`) runs :func:`shard_map_step` across processes.

    Args:
      coordinator_address: ``host:port`` of the coordinator (process 0).
      num_processes: number of processes, ≥ 1.
      process_id: this process's id in ``[0, num_processes)``.
      local_device_ids: restrict this process to these local devices.
      initialization_timeout: seconds to wait for all processes to join (default 300, or
        ``ASGD_JAX_INITIALIZATION_TIMEOUT``).
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get(ENV_COORDINATOR)
    if num_processes is None and env.get(ENV_NUM_PROCESSES):
        num_processes = int(env[ENV_NUM_PROCESSES])
    if process_id is None and env.get(ENV_PROCESS_ID):
        process_id = int(env[ENV_PROCESS_ID])
    if initialization_timeout is None:
        initialization_timeout = int(env.get(_ENV_INIT_TIMEOUT, "300"))
    timeout = check_int("initialization_timeout", initialization_timeout, low=1)
    if jax.distributed.is_initialized():
        raise RuntimeError("jax.distributed is already initialized in this process.")
    given = (coordinator_address, num_processes, process_id)
    if all(v is None for v in given):
        jax.distributed.initialize(initialization_timeout=timeout)
        return
    if any(v is None for v in given):
        raise ValueError(
            "give all of coordinator_address, num_processes and process_id (or the variables "
            f"{ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}), or none of them."
        )
    num_processes = check_int("num_processes", num_processes, low=1)
    process_id = check_int("process_id", process_id, high=num_processes - 1)
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
        initialization_timeout=timeout,
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(handle: Any, limit: int = 4000) -> str:
    handle.seek(0)
    return handle.read().decode(errors="replace")[-limit:]


def launch_local(
    module: str,
    args: Sequence[str] = (),
    *,
    num_processes: int = 2,
    devices_per_process: int = 1,
    timeout: float = 120.0,
    initialization_timeout: int = 60,
    env: dict[str, str] | None = None,
) -> list[str]:
    """Runs ``python -m module *args`` as ``num_processes`` CPU processes of one JAX run.

    Each process gets ``devices_per_process`` virtual CPU devices and the variables read by
    :func:`initialize` (coordinator on a free localhost port). The call waits for all of
    them; if one fails or ``timeout`` passes, every process still running is killed and a
    ``RuntimeError`` carries the output of the failures. Nothing is left running.

    Args:
      module: the module to run (it calls :func:`initialize` first).
      args: its command-line arguments.
      num_processes: number of processes, ≥ 1.
      devices_per_process: virtual CPU devices per process, ≥ 1.
      timeout: seconds for the whole run.
      initialization_timeout: seconds each process waits for the others to join.
      env: extra environment variables.

    Returns:
      The standard output of each process, in process-id order.
    """
    num_processes = check_int("num_processes", num_processes, low=1)
    devices_per_process = check_int("devices_per_process", devices_per_process, low=1)
    timeout = check_real("timeout", timeout, strict=True, unit="seconds")
    initialization_timeout = check_int("initialization_timeout", initialization_timeout, low=1)
    base = dict(os.environ)
    base.update(env or {})
    flags = [f for f in base.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_COUNT_FLAG)]
    base["XLA_FLAGS"] = " ".join([*flags, f"{_DEVICE_COUNT_FLAG}={devices_per_process}"])
    base["JAX_PLATFORMS"] = "cpu"
    base[ENV_COORDINATOR] = f"127.0.0.1:{_free_port()}"
    base[ENV_NUM_PROCESSES] = str(num_processes)
    base[_ENV_INIT_TIMEOUT] = str(initialization_timeout)

    procs: list[tuple[subprocess.Popen, Any, Any]] = []
    try:
        for process_id in range(num_processes):
            out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
            proc_env = dict(base, **{ENV_PROCESS_ID: str(process_id)})
            proc = subprocess.Popen(
                [sys.executable, "-m", module, *args], env=proc_env, stdout=out, stderr=err
            )
            procs.append((proc, out, err))
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p, _, _ in procs):
            failed = [p for p, _, _ in procs if p.poll() not in (None, 0)]
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        codes = [p.poll() for p, _, _ in procs]
        if any(c != 0 for c in codes):
            reason = "failed" if any(c not in (None, 0) for c in codes) else "timed out"
            report = "\n".join(
                f"--- process {i} (exit {c}) ---\n{_tail(err)}"
                for i, ((_, _, err), c) in enumerate(zip(procs, codes, strict=True))
                if c != 0
            )
            raise RuntimeError(f"launch_local: {module} {reason}.\n{report}")
        return [_tail(out, 1 << 20) for _, out, _ in procs]
    finally:
        for proc, out, err in procs:
            if proc.poll() is None:
                proc.kill()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            out.close()
            err.close()
