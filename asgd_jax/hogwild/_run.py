"""The thread backend: worker threads, a server thread, their waits and a clean shutdown.

Each worker thread repeats: reserve a gradient (:meth:`Server.claim`), pull the
parameters (:meth:`Server.pull`: the server's device arrays and their version), run its
jitted program (the gradient), wait out its straggler time, deliver the push and wait until
it is applied. The programs have no host callbacks (see :mod:`._programs`), so nothing
waits inside XLA: a wait there would hold one of XLA:CPU's intra-op pool threads (one per
core), and with as many blocked workers as cores nothing else would run, the server's
update included (seen with callbacks: 2 workers on 2 cores and a small CNN deadlocked).
Every wait happens in the worker's Python thread between programs and watches the stop
signal; the server never waits on a worker without also watching it, so a worker dying
mid-push cannot deadlock it.
"""

from __future__ import annotations

import threading
import time
import warnings
from typing import Any

import jax
import numpy as np

from asgd_jax.hogwild import _programs
from asgd_jax.hogwild._results import HogwildError
from asgd_jax.hogwild._server import Server
from asgd_jax.hogwild._stragglers import STRAGGLER_TABLE

__all__ = ["POLL_S", "THREAD_PREFIX", "Mailbox", "Run"]

POLL_S = 0.05  # how often every wait re-checks the stop signal
THREAD_PREFIX = "asgd-hogwild"


class Mailbox:
    """The acknowledgements a worker waits for when its push completes no update itself.

    In ``"sync"`` mode a worker's gradient waits for the round; the worker whose push
    completes it acknowledges every other. Every wait is bounded by ``POLL_S`` and re-checks
    ``stop``, so no worker is left waiting after a failure.
    """

    def __init__(self, num_workers: int, stop: threading.Event):
        self._acks = [threading.Event() for _ in range(num_workers)]
        self._stop = stop

    def wait(self, worker: int) -> bool:
        """Waits until ``worker``'s push is applied: True, or False on stop."""
        ack = self._acks[worker]
        while not ack.wait(POLL_S):
            if self._stop.is_set():
                return False
        ack.clear()
        return True

    def acknowledge(self, workers: list[int]) -> None:
        for worker in workers:
            self._acks[worker].set()


class Run:
    """One run of the thread backend: the stop signal, the threads, the host data."""

    def __init__(self, server: Server, data: Any, *, key: Any, straggler_table: Any):
        self.server = server
        self.num_workers = server.num_workers
        self.key = key
        self.straggler_table = straggler_table
        self.stop = threading.Event()
        self.stop_reason: str | None = None
        self.errors: list[tuple[int | None, BaseException]] = []
        self._lock = threading.Lock()
        self.mailbox = Mailbox(self.num_workers, self.stop)
        # Serial modes: one push at a time, in the order the workers take this lock.
        self._push_lock = threading.Lock()
        # Set to end a worker's straggler wait early: on a stop of the run or of its job.
        self.wake = [threading.Event() for _ in range(self.num_workers)]
        server.on_stop = self._stop_job
        self.local_steps = [0] * self.num_workers
        self.host_data = callable(data)
        self.data = data
        self.batch_treedef, self.batch_shapes, self._first_batch = None, (), None
        if self.host_data:
            self._first_batch = jax.tree.map(np.asarray, data(0, 0))
            self.batch_treedef = jax.tree.structure(self._first_batch)
            self.batch_shapes = tuple(
                (x.shape, x.dtype) for x in jax.tree.leaves(self._first_batch)
            )
        self.batch_structs = _programs.structs(self.batch_shapes)

    # -- stopping ------------------------------------------------------------------------------

    def fail(self, worker: int | None, exc: BaseException) -> None:
        with self._lock:
            self.errors.append((worker, exc))
            if self.stop_reason is None:
                self.stop_reason = "error"
        self._set_stop()

    def request_stop(self, reason: str) -> None:
        with self._lock:
            if self.stop_reason is None:
                self.stop_reason = reason
        self._set_stop()

    def _set_stop(self) -> None:
        self.stop.set()
        for wake in self.wake:
            wake.set()

    def _stop_job(self, worker: int) -> None:
        """The server stopped ``worker``'s job: end its straggler wait now."""
        self.wake[worker].set()

    # -- the threads ---------------------------------------------------------------------------

    def _batch(self, worker: int, step: int) -> list[np.ndarray]:
        if not self.host_data:
            return []
        if worker == 0 and step == 0 and self._first_batch is not None:
            batch, self._first_batch = self._first_batch, None
        else:
            batch = jax.tree.map(np.asarray, self.data(worker, step))
        leaves = jax.tree.leaves(batch)
        for got, want in zip(leaves, self.batch_structs, strict=True):
            if got.shape != want.shape or got.dtype != want.dtype:
                raise ValueError(
                    f"data({worker}, {step}) returned a leaf of shape {got.shape} and dtype "
                    f"{got.dtype}; every batch must match the first: {want.shape}, {want.dtype}."
                )
        return leaves

    def _claim(self, worker: int) -> bool:
        return not self.stop.is_set() and self.server.claim(worker, self.local_steps[worker])

    def run_worker(self, compiled, worker: int, data, results: list) -> None:
        try:
            worker_id = np.int32(worker)
            opt_state = self.server.worker_opt_state()
            step = 0
            server, wake = self.server, self.wake[worker]
            while True:
                wake.clear()  # before the claim: a stop of the run after it sets it again
                if not self._claim(worker):
                    break
                batch = self._batch(worker, step)
                leaves, version = server.pull(worker)
                loss, pushed, opt_state = compiled(
                    leaves, worker_id, np.int32(step), data, self.key, batch, opt_state
                )
                item = (worker, step, version, float(loss), jax.block_until_ready(pushed))
                if self.straggler_table is not None:
                    extra = self.straggler_table[worker, step % STRAGGLER_TABLE]
                    if extra > 0:
                        wake.wait(extra)  # ends early on a stop of the run or of this job
                if self.stop.is_set():
                    break
                if server.stops and server.cancelled(worker):
                    server.abandon(*item[:4])  # restart at the current point
                elif not self._push(worker, item):
                    break
                step += 1
                self.local_steps[worker] = step
            results[worker] = opt_state
        except BaseException as exc:
            self.fail(worker, exc)

    def _push(self, worker: int, item: tuple) -> bool:
        """Hands ``item`` to the server in the pushing thread; True once it is applied.

        The pushing worker runs the server's update itself (serial modes under one lock, so
        updates are applied one at a time in arrival order): no server thread, no handoff
        between threads per update. An exception in the update is the server's.
        """
        server = self.server
        try:
            if server.serial:
                with self._push_lock:
                    if self.stop.is_set() or server.finished():
                        return False  # the run ended while this push waited its turn
                    applied = server.push(*item)
            else:
                applied = server.push(*item)
        except BaseException as exc:
            self.fail(None, exc)
            return False
        if server.finished():
            self.request_stop("steps")
        others = [w for w in applied if w != worker]
        if others:
            self.mailbox.acknowledge(others)
        return worker in applied or self.mailbox.wait(worker)

    # -- the calling thread --------------------------------------------------------------------

    def execute(
        self,
        compiled: Any,
        data_arrays: Any,
        *,
        time_limit: float | None,
        shutdown_timeout: float,
        progress: Any = None,
    ) -> tuple[float, list]:
        """Runs every thread to the end; returns ``(wall_time, worker optimizer states)``.

        Raises :class:`HogwildError` for the first error of a worker or the server, or for
        threads still stuck in user code ``shutdown_timeout`` seconds after the stop; a
        ``KeyboardInterrupt`` propagates once every thread is stopped (with a note and a
        warning naming any thread left stuck).
        """
        server = self.server
        results: list = [None] * self.num_workers
        threads = [
            threading.Thread(
                target=self.run_worker,
                args=(compiled, w, data_arrays, results),
                name=f"{THREAD_PREFIX}-worker-{w}",
                daemon=True,
            )
            for w in range(self.num_workers)
        ]
        ended = None
        server.start_clock()
        try:
            for thread in threads:
                thread.start()
            workers = threads[: self.num_workers]
            while not self.stop.wait(POLL_S):
                if progress is not None:
                    progress.update(server.version - progress.n)
                if time_limit is not None and server.now() >= time_limit:
                    self.request_stop("time_limit")
                if not any(t.is_alive() for t in workers):
                    break
        except KeyboardInterrupt as interrupt:
            self.request_stop("interrupted")
            ended = self._shut_down(threads, shutdown_timeout, progress)
            if ended[1]:
                message = _stuck_message(ended[1], shutdown_timeout, "the interrupt")
                interrupt.add_note(message)
                warnings.warn(message, RuntimeWarning, stacklevel=3)
            raise
        finally:
            if ended is None:
                ended = self._shut_down(threads, shutdown_timeout, progress)
        wall_time, stuck = ended
        if self.errors:
            worker, exc = self.errors[0]
            who = "server" if worker is None else f"worker {worker}"
            raise HogwildError(
                f"hogwild {who} raised {type(exc).__name__}: {exc}", worker=worker
            ) from exc
        if stuck:
            raise HogwildError(_stuck_message(stuck, shutdown_timeout, "the run ended"))
        return wall_time, results

    def _shut_down(self, threads, timeout, progress) -> tuple[float, list[str]]:
        """Stops and joins every thread; returns the wall time and the threads left stuck."""
        self.request_stop("steps")  # a no-op when a reason is already set
        wall_time = self.server.now()
        stuck = _join(threads, timeout)
        if progress is not None:
            progress.update(self.server.version - progress.n)
            progress.close()
        return wall_time, stuck


def _stuck_message(stuck: list[str], timeout: float, after: str) -> str:
    return (
        f"hogwild thread(s) {', '.join(stuck)} did not stop within shutdown_timeout="
        f"{timeout} s after {after}; they are blocked in user code (e.g. the data function) "
        "and were left running as daemon threads."
    )


def _join(threads: list[threading.Thread], timeout: float) -> list[str]:
    """Joins every thread within ``timeout`` seconds in total; returns the names still alive."""
    deadline = time.perf_counter() + timeout
    for thread in threads:
        if thread.ident is not None:
            thread.join(max(0.0, deadline - time.perf_counter()))
    return [t.name for t in threads if t.is_alive()]
