"""What every consistency mode shares: one parameter server base.

A server holds the parameters, the server-side optimizer state, a version counter (the
number of updates applied) and the log of every applied update, and it measures staleness
itself: τ = (version the update is applied as) − (version the gradient was pulled at). It
knows nothing about threads: a backend calls :meth:`Server.pull` when a worker reads the
parameters, :meth:`Server.claim` before a worker starts a gradient and :meth:`Server.push`
when a gradient (or update) arrives, from whichever thread or process carries it. One
subclass per mode decides what a push does (``_locked.py``, ``_sync.py``, ``_lock_free.py``,
and the server rules of ``_ringmaster.py`` and ``_rennala.py``).

Discarded work. A server rule may refuse a gradient: a *drop* (it arrived too stale:
``max_staleness``, Ringmaster's threshold, Rennala's work at an old point) or a *stop* (the
server told the worker to abandon a computation that became too stale, and restart at the
current point). Neither is an update: the parameters and the version do not change, the
gradient's budget claim is released (so a run still applies exactly ``steps`` updates), and
the gradient is logged in :meth:`Server.discarded`, not in the trace. This is the worker
simulator's convention (``workers.parameter_server(max_staleness=S)``: a drop is counted in
``dropped`` and the next arrival is the next update), so every τ in the trace is one an
update was applied with and ``delays.trace(result.trace)`` replays the run exactly.
A stop is announced through :attr:`Server.on_stop` (the backend's hook: the thread backend
wakes the worker's straggler wait) and read by the worker with :meth:`Server.cancelled`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from asgd_jax.hogwild import _programs
from asgd_jax.hogwild._results import Discarded, Trace, discarded_from_rows, trace_from_rows
from asgd_jax.step import Step

__all__ = ["Server"]


class Server:
    """The parameter server of one run; subclasses are the consistency modes.

    Attributes:
      mode: the mode's name (``MODES``).
      serial: whether pushes are handed to one server thread that applies them in arrival
        order (``"locked"``, ``"sync"``); otherwise the pushing worker applies its own
        update (``"lock_free"``).
      worker_optimizer: whether each worker runs the optimizer itself and pushes the
        resulting update rather than its gradient (``"lock_free"``).
      version: updates applied so far.
    """

    mode: ClassVar[str]
    serial: ClassVar[bool] = True
    worker_optimizer: ClassVar[bool] = False
    stops: bool = False  # whether the server stops stale computations (``cancelled``)

    def __init__(
        self,
        step: Step,
        params: Any,
        *,
        num_workers: int,
        steps: int | None,
        record_pushes: bool = False,
    ):
        self.step = step
        self.num_workers = num_workers
        self.steps = steps
        self.record_pushes = record_pushes
        leaves, self.treedef = jax.tree.flatten(params)
        # Copies, never the caller's buffers.
        self.initial = [np.array(jnp.asarray(x), copy=True) for x in leaves]
        self.lock = threading.Lock()  # guards the version counter and the published snapshot
        self.version = 0
        self.torn_reads = 0
        self.overlapping_writes = 0
        self._claimed = 0  # gradients reserved by pulls (bounds the run to exactly `steps`)
        self._rows: list[tuple] = []
        self._discarded: list[tuple] = []  # (worker, pulled, version, wall, step, loss, stopped)
        self.dropped = 0  # gradients refused on arrival
        self.stopped = 0  # computations stopped by the server
        # The version each worker's job in flight was pulled at (-1: none), and whether the
        # server has stopped it.
        self._pulled = [-1] * num_workers
        self._cancel = [False] * num_workers
        self._stopped_at = [0] * num_workers  # the version a stopped job was stopped at
        self.on_stop: Callable[[int], None] = _ignore
        self._pushes: list[tuple[int, list[np.ndarray]]] = []
        self._t0 = time.perf_counter()
        self._apply = None
        self.params, self.opt_state = self._init_state()

    # -- state ---------------------------------------------------------------------------------

    def _init_state(self) -> tuple[Any, Any]:
        """The server's parameters (device copies) and optimizer state at W_0."""
        params = jax.tree.unflatten(self.treedef, [jnp.array(x) for x in self.initial])
        self._leaves = jax.tree.leaves(params)  # what a pull hands out: immutable arrays
        self._host: tuple[int, list[np.ndarray]] | None = None
        return params, self.step.tx.init(params)

    @property
    def snapshot(self) -> list[np.ndarray]:
        """The current parameters as NumPy leaves (for a backend that ships them to other
        processes), converted once per version."""
        with self.lock:
            version, leaves, host = self.version, self._leaves, self._host
        if host is None or host[0] != version:
            host = (version, [np.asarray(x) for x in leaves])
            self._host = host
        return host[1]

    @snapshot.setter
    def snapshot(self, leaves: list) -> None:
        with self.lock:
            self._leaves = [jnp.asarray(x) for x in leaves]
            self._host = None

    def grad_structs(self) -> Any:
        """The shape of what one server update takes."""
        return jax.tree.unflatten(
            self.treedef, [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in self.initial]
        )

    def unflatten(self, leaves: list) -> Any:
        """A pushed gradient's leaves (device or NumPy arrays) as the parameters' pytree."""
        return jax.tree.unflatten(self.treedef, leaves)

    def compile(self) -> None:
        """Compiles the update program (in the calling thread, before any worker starts)."""
        self._apply = _programs.compile_apply(
            self.step, self.params, self.opt_state, self.grad_structs(), average=False
        )

    def worker_opt_state(self) -> Any:
        """A worker's own optimizer state (``worker_optimizer`` modes), else ``None``."""
        return None

    def final_params(self) -> Any:
        return self.params

    def final_opt_state(self, worker_states: list) -> Any:
        return self.opt_state

    def write_residual(self) -> float:
        return 0.0

    # -- the clock and the budget ------------------------------------------------------------

    def start_clock(self) -> None:
        self._t0 = time.perf_counter()

    def now(self) -> float:
        """Seconds since :meth:`start_clock`."""
        return time.perf_counter() - self._t0

    def claim(self, worker: int, worker_step: int) -> bool:
        """Reserves ``worker``'s next gradient; False once the run has all it needs.

        Asynchronous modes reserve from one budget of ``steps`` gradients, so a run applies
        exactly ``steps`` updates however the workers interleave.
        """
        with self.lock:
            if self.steps is None:
                return True
            if self._claimed >= self.steps:
                return False
            self._claimed += 1
            return True

    def release(self) -> None:
        """Gives back the claim of a gradient that will not be applied (dropped or stopped)."""
        with self.lock:
            self._claimed -= 1

    def finished(self) -> bool:
        """Whether ``steps`` updates have been applied."""
        return self.steps is not None and self.version >= self.steps

    # -- pulls and pushes (host side: NumPy only, never a wait) --------------------------------

    def pull(self, worker: int) -> tuple[list, int]:
        """The current parameters (device leaves, never written to) and their version.

        Starts ``worker``'s next job: it is in flight at that version until its push is
        handled or it is abandoned.
        """
        with self.lock:
            self._pulled[worker] = self.version
            self._cancel[worker] = False
            return self._leaves, self.version

    def cancelled(self, worker: int) -> bool:
        """Whether the server has stopped ``worker``'s job in flight (it should restart)."""
        return self._cancel[worker]

    def abandon(self, worker: int, step: int, version_pulled: int, loss: float) -> None:
        """``worker`` gives up a stopped job without pushing it (its claim is released)."""
        self.discard(worker, step, version_pulled, loss, stopped=True)

    def end_job(self, worker: int) -> None:
        """``worker``'s job in flight is handled (applied or collected): no longer stoppable."""
        with self.lock:
            self._pulled[worker] = -1
            self._cancel[worker] = False

    def discard(
        self, worker: int, step: int, version_pulled: int, loss: float, *, stopped: bool
    ) -> None:
        """Ends ``worker``'s job without an update: logged, counted, its claim released."""
        with self.lock:
            version = self._stopped_at[worker] if self._cancel[worker] else self.version
            self._pulled[worker] = -1
            self._cancel[worker] = False
            if stopped:
                self.stopped += 1
            else:
                self.dropped += 1
        self._discarded.append((worker, version_pulled, version, self.now(), step, loss, stopped))
        self.release()

    def stop_stale(self, limit: int) -> None:
        """Stops every job in flight pulled more than ``limit`` versions ago (after an
        update); the backend hears of each through :attr:`on_stop`."""
        with self.lock:
            version = self.version
            stop = [
                w
                for w, pulled in enumerate(self._pulled)
                if pulled >= 0 and not self._cancel[w] and version - pulled > limit
            ]
            for w in stop:
                self._cancel[w] = True
                self._stopped_at[w] = version
        for w in stop:
            self.on_stop(w)

    def push(
        self, worker: int, step: int, version_pulled: int, loss: float, pushed: list
    ) -> list[int]:
        """Delivers one gradient; returns the workers whose gradients are now applied."""
        raise NotImplementedError

    def apply(self, grads: Any) -> int:
        """Applies one update (``grads`` as :meth:`grad_structs`) with the server's
        optimizer; returns the new version, published once the update is computed."""
        params, opt_state, applied = self._apply(self.params, self.opt_state, grads)
        leaves = jax.block_until_ready(jax.tree.leaves(params))  # errors surface here
        self.params, self.opt_state = params, opt_state
        with self.lock:
            self._leaves = leaves
            self.version += 1
            version = self.version
        if self.record_pushes:
            self._pushes.append((version - 1, [np.asarray(x) for x in jax.tree.leaves(applied)]))
        return version

    def log(
        self, worker: int, version_pulled: int, version_applied: int, step: int, loss: float
    ) -> None:
        """Logs an applied update; its staleness is ``version_applied − version_pulled``."""
        self._rows.append((worker, version_pulled, version_applied, self.now(), step, loss))

    # -- results -------------------------------------------------------------------------------

    def trace(self) -> Trace:
        return trace_from_rows(self._rows)

    def discarded(self) -> Discarded:
        return discarded_from_rows(self._discarded)

    def stacked_pushes(self) -> Any:
        """Every recorded push, stacked in application order (``None`` if none)."""
        if not self.record_pushes or not self._pushes:
            return None
        rows = [leaves for _, leaves in sorted(self._pushes, key=lambda p: p[0])]
        return jax.tree.unflatten(self.treedef, [np.stack(col) for col in zip(*rows, strict=True)])


def _ignore(worker: int) -> None:
    """The default :attr:`Server.on_stop`: a backend that cannot interrupt a job ignores it."""
