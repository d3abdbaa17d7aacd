"""The parameter-server actor of the Ray backend.

It wraps the same :class:`~asgd_jax.hogwild._server.Server` subclass the thread backend
runs (so a mode, its staleness measurement and its trace are one implementation), and adds
what crossing processes needs:

* **Transport.** An async actor: its methods run one at a time on one event loop, so pushes
  are applied in arrival order; a ``"sync"`` push awaits the end of its round without
  blocking the others. The reply to a push carries the next version: its reference, the
  version being ``ray.put`` once when a worker first asks for it, or for parameters under
  ``INLINE_BYTES`` the NumPy leaves themselves (a put and a fetch cost more than the copy).
* **The budget, under faults.** A worker's reply also claims its next gradient; a claim is
  released when that gradient arrives or when the worker re-attaches after a restart (its
  in-flight gradient is lost), so the run applies exactly ``steps`` updates. Ray retries
  are at-least-once: a push whose (worker, sequence number) was already handled is dropped.
* **Epochs.** Each incarnation of the server has its own epoch; a gradient computed at a
  version of an earlier incarnation (the server died and reloaded an older checkpoint) is
  dropped as lost, since its staleness against the reloaded parameters is not defined.
* **Checkpoints** (orbax): parameters, optimizer state, version, trace and per-worker
  sequence numbers every ``checkpoint_every`` updates and at the end; a restarted server
  (or a resumed run) reloads the newest one and continues.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
import uuid
import warnings
from typing import Any

import numpy as np

__all__ = ["ParameterServer", "ServerSpec", "latest_step"]

# Parameters up to this size travel inside the reply, as Ray sends small return values
# (its max_direct_call_object_size); larger ones are put in the object store once per
# version and read by reference (zero-copy on the server's machine).
INLINE_BYTES = 100 * 1024


@dataclasses.dataclass
class ServerSpec:
    """What the server actor is built from (pickled once, by the driver)."""

    jax_flags: dict
    server_cls: type
    step: Any
    params: list  # NumPy leaves
    treedef: Any
    server_kwargs: dict
    checkpoint_every: int | None
    checkpoint_dir: str | None
    resume: bool


def latest_step(directory: str) -> int | None:
    """The newest complete checkpoint's version in ``directory``, or ``None``."""
    if not os.path.isdir(directory):
        return None
    steps = [
        int(name)
        for name in os.listdir(directory)
        if name.isdigit() and os.path.isfile(os.path.join(directory, name, _DONE))
    ]
    return max(steps, default=None)


_DONE = "asgd_hogwild_done"


class _Checkpoints:
    def __init__(self, directory: str):
        import orbax.checkpoint as ocp

        logging.getLogger("absl").setLevel(logging.ERROR)
        self.ocp = ocp
        self.directory = directory
        options = ocp.CheckpointManagerOptions(
            max_to_keep=2, create=True, enable_async_checkpointing=False
        )
        self.manager = ocp.CheckpointManager(directory, options=options)

    def save(self, version: int, leaves: list, meta: dict) -> None:
        args = self.ocp.args.Composite(
            state=self.ocp.args.StandardSave(leaves), meta=self.ocp.args.JsonSave(meta)
        )
        self.manager.save(version, args=args, force=True)
        self.manager.wait_until_finished()
        # Marks the step complete: a server killed inside a save leaves no marker.
        with open(os.path.join(self.directory, str(version), _DONE), "w") as file:
            file.write("done\n")

    def restore(self, version: int, like: list) -> tuple[list, dict]:
        args = self.ocp.args.Composite(
            state=self.ocp.args.StandardRestore(like), meta=self.ocp.args.JsonRestore()
        )
        restored = self.manager.restore(version, args=args)
        return [np.asarray(x) for x in restored["state"]], dict(restored["meta"])


class ParameterServer:
    """The server of one Ray run (decorated with ``ray.remote`` by the driver)."""

    def __init__(self, payload: bytes | None = None):
        """A server for the run in ``payload``, or (``None``) one kept for later runs, which
        :meth:`configure` sets up (only a server without checkpoints: a restarted server
        must know its run from its constructor's arguments)."""
        import jax  # noqa: F401 - at the process's start, not in the first run's setup

        self.spec = None
        if payload is not None:
            self._setup(payload)

    async def configure(self, payload: bytes) -> None:
        self._setup(payload)

    def _setup(self, payload: bytes) -> None:
        import jax
        import ray

        spec: ServerSpec = ray.cloudpickle.loads(payload)
        num_workers, steps = spec.server_kwargs["num_workers"], spec.server_kwargs["steps"]
        for name, value in spec.jax_flags.items():
            jax.config.update(name, value)
        self._ray, self._jax = ray, jax
        self.spec = spec
        self.num_workers = num_workers
        self.steps = steps
        params = jax.tree.unflatten(spec.treedef, spec.params)
        self.server = spec.server_cls(spec.step, params, **spec.server_kwargs)
        self.server.compile()
        self._staleness_apply()
        self.barrier = self.server.mode == "sync"
        self.epoch = uuid.uuid4().hex  # identifies this incarnation, not a random draw
        self.last_seq = [-1] * num_workers  # the last sequence number handled per worker
        self.next_seq = [0] * num_workers
        self.gradients = [0] * num_workers  # gradients received per worker (all incarnations)
        self.lost = 0
        self.duplicates = 0
        self.starts = [0] * num_workers  # worker loops started (a restart starts one more)
        self.inflight: set[int] = set()
        self.running = False
        self.stopped = False
        self.end_time: float | None = None
        self._ref, self._ref_version = None, -1
        self._changed = asyncio.Event()
        self.checkpoints = None
        self.restored_from: int | None = None
        with warnings.catch_warnings():  # Ray's property reads a deprecated one itself
            warnings.simplefilter("ignore", DeprecationWarning)
            reconstructed = ray.get_runtime_context().was_current_actor_reconstructed
        self.server_restarts = 0
        if spec.checkpoint_dir is not None:
            self.checkpoints = _Checkpoints(spec.checkpoint_dir)
            if spec.resume or reconstructed:
                self._restore()
        self.server_restarts += int(reconstructed)
        self.running = self.running or reconstructed  # a restarted server resumes its run

    # -- the update, with the measured staleness as an extra argument ---------------------------

    def _staleness_apply(self) -> None:
        """Gives the server's optimizer ``staleness=τ`` (the measured one) on every update.

        Staleness-aware transforms (``asgd_jax.scale_by_staleness`` ...) read it; others
        ignore it. Not for an optimizer with :func:`asgd_jax.stale` inside, which tracks its
        own (simulated) staleness, nor for ``"sync"``, where every update has τ = 0.
        """
        import optax

        from asgd_jax.transforms._state import has_stale_state

        server = self.server
        self._tau = 0
        if server.mode == "sync" or has_stale_state(server.opt_state):
            return
        jax = self._jax
        tx = optax.with_extra_args_support(server.step.tx)

        def program(params, opt_state, grads, staleness):
            updates, opt_state = tx.update(grads, opt_state, params, staleness=staleness)
            return optax.apply_updates(params, updates), opt_state, grads

        compiled = (
            jax.jit(program)
            .lower(server.params, server.opt_state, server.grad_structs(), np.int32(0))
            .compile()
        )
        server._apply = lambda p, s, g: compiled(p, s, g, np.int32(self._tau))

    # -- checkpoints -------------------------------------------------------------------------

    def _state_leaves(self) -> list:
        jax, server = self._jax, self.server
        return [np.asarray(x) for x in jax.tree.leaves((server.params, server.opt_state))]

    def save(self) -> None:
        server = self.server
        meta = {
            "version": int(server.version),
            "rows": [
                [float(v) if i in (3, 5) else int(v) for i, v in enumerate(r)] for r in server._rows
            ],
            "last_seq": self.last_seq,
            "gradients": self.gradients,
            "lost": self.lost,
            "duplicates": self.duplicates,
            "starts": self.starts,
            "elapsed": server.now(),
            "server_restarts": self.server_restarts,
        }
        self.checkpoints.save(int(server.version), self._state_leaves(), meta)

    def _restore(self) -> None:
        version = latest_step(self.spec.checkpoint_dir)
        if version is None:
            return
        jax, server = self._jax, self.server
        like = self._state_leaves()
        leaves, meta = self.checkpoints.restore(version, like)
        treedef = jax.tree.structure((server.params, server.opt_state))
        params, opt_state = jax.tree.unflatten(treedef, [jax.numpy.asarray(x) for x in leaves])
        server.params, server.opt_state = params, opt_state
        server.snapshot = [np.asarray(x) for x in jax.tree.leaves(params)]
        server.version = int(meta["version"])
        server._rows = [tuple(r) for r in meta["rows"]]
        self.last_seq = list(meta["last_seq"])
        self.next_seq = [s + 1 for s in self.last_seq]
        if self.barrier:
            self.next_seq = [server.version] * self.num_workers
        self.gradients = list(meta["gradients"])
        self.lost, self.duplicates = int(meta["lost"]), int(meta["duplicates"])
        if not self.spec.resume:  # the same run's server, restarted: its workers' history
            self.starts = list(meta["starts"])
        server._t0 = time.perf_counter() - float(meta["elapsed"])
        self.server_restarts = int(meta["server_restarts"])
        self.restored_from = version

    # -- the run -------------------------------------------------------------------------------

    async def ready(self) -> dict:
        return {
            "version": self.server.version,
            "restored_from": self.restored_from,
            "node": self._ray.get_runtime_context().get_node_id(),
        }

    async def start(self) -> None:
        if self.restored_from is None:
            self.server.start_clock()
        self.running = True

    async def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.end_time = self.server.now()
        self._wake()

    def _finished(self) -> bool:
        return self.stopped or self.server.finished()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _reply(self, worker: int) -> tuple:
        """``(go, sequence number, epoch, version, [ref])``; ``go`` claims the gradient."""
        server = self.server
        go = not self._finished()
        if go and self.barrier:
            self.next_seq[worker] = server.version
            go = self.steps is None or server.version < self.steps
        elif go and self.steps is not None:
            go = server.version + len(self.inflight) < self.steps
        if go and not self.barrier:
            self.inflight.add(worker)
        if self._ref_version != server.version:
            leaves = server.snapshot
            if sum(x.nbytes for x in leaves) > INLINE_BYTES:
                leaves = self._ray.put(leaves)  # once per version, read by reference
            self._ref, self._ref_version = leaves, server.version
        return go, self.next_seq[worker], self.epoch, server.version, [self._ref]

    async def attach(self, worker: int, start: bool) -> tuple:
        """A worker (re)starts its loop (``start``) or re-pulls after a server restart: its
        in-flight gradient, if any, is lost; returns its next claim."""
        if start:
            self.starts[worker] += 1  # a second start in one run: Ray restarted the process
        self.inflight.discard(worker)
        while not self.running and not self.stopped:
            await asyncio.sleep(0.01)
        return self._reply(worker)

    async def push(
        self, worker: int, seq: int, epoch: str, version_pulled: int, loss: float, grads: list
    ) -> tuple:
        server = self.server
        self.gradients[worker] += 1
        if epoch != self.epoch:
            self.lost += 1
            self.inflight.discard(worker)
            return self._reply(worker)
        if seq <= self.last_seq[worker]:
            self.duplicates += 1
        else:
            self.last_seq[worker] = seq
            self.next_seq[worker] = seq + 1
            self.inflight.discard(worker)
            if not self._finished():
                before = server.version
                self._tau = before - version_pulled
                server.push(worker, seq, version_pulled, loss, grads)
                if server.version != before:
                    self._after_update()
        if self.barrier:
            while server.version == seq and not self._finished():
                await self._changed.wait()
        return self._reply(worker)

    def _after_update(self) -> None:
        server = self.server
        every = self.spec.checkpoint_every
        if self.checkpoints is not None and every and server.version % every == 0:
            self.save()
        if server.finished() and self.end_time is None:
            self.end_time = server.now()
            if self.checkpoints is not None and server.version % (every or 1) != 0:
                self.save()
        self._wake()

    async def status(self) -> tuple:
        return self.server.version, self.epoch, self._finished()

    async def result(self) -> dict:
        jax, server = self._jax, self.server
        if self.end_time is None:
            self.end_time = server.now()
        if self.checkpoints is not None and latest_step(self.spec.checkpoint_dir) != int(
            server.version
        ):
            self.save()
        return {
            "params": [np.asarray(x) for x in jax.tree.leaves(server.params)],
            "opt_state": jax.device_get(server.opt_state),
            "rows": list(server._rows),
            "gradients": list(self.gradients),
            "lost": self.lost,
            "duplicates": self.duplicates,
            "wall_time": float(self.end_time),
            "server_restarts": self.server_restarts,
            "worker_restarts": [max(0, n - 1) for n in self.starts],
            "pushes": server.stacked_pushes(),
            "counters": {
                name: getattr(server, name)
                for name in ("torn_reads", "overlapping_writes", "dropped", "stopped")
                if hasattr(server, name)
            },
            "discarded": server.discarded() if hasattr(server, "discarded") else None,
        }
