"""Hogwild mode: real asynchronous SGD on one host, with measured staleness traces.

The deterministic simulator (:func:`asgd_jax.stale`) answers "what if the delays were τ_t";
this module runs the real thing and measures τ_t. A host-side *parameter server* holds the
parameters, a version counter (the number of updates applied) and the optimizer state; ``N``
worker threads each repeat

    pull W_v (io_callback)  →  g = ∇f(W_v; ξ)  →  push g (io_callback)  →  deliver, wait

where the first three run as one jitted program. The pull callback reads the server's current
snapshot and its version under the store's lock; the push callback hands the gradient to the
host. The server numbers every pull and every update, so the staleness τ = (version the update
was applied as) − (version the gradient was computed at) is exact even though the interleaving
of threads is not reproducible. Every applied update is logged in a :class:`Trace`, which
:func:`asgd_jax.delays.trace` accepts: ``asgd_jax.stale(inner, delays.trace(result.trace))``
replays the measured staleness sequence deterministically.

Callbacks never wait. XLA:CPU runs a callback on whichever thread runs the program, often one
of its intra-op pool threads (one per core); a callback that blocks (on a barrier, an
acknowledgement, a straggler's sleep) holds that thread, and with as many blocked workers as
cores nothing else runs, including the server's update: a deadlock (seen with 2 workers on 2
cores and a small CNN). So all waiting happens in the worker's Python thread between programs,
and jitted code never runs inside a callback.

Modes (all on the same machinery, so they compare on equal terms):

* ``"locked"``: a server thread applies pushed gradients one at a time, in arrival order,
  with the server-side optimizer (any optax transform). A worker pulls again only once its
  update is applied, so no update is lost, every pull reads a consistent snapshot, and one
  worker sees τ = 0.
* ``"lock_free"``: Hogwild! (Niu et al. 2011). Each worker runs the optimizer itself on its
  own optimizer state (for SGD the same algorithm as ``"locked"``; PyTorch's Hogwild example
  does the same) and adds its update into the shared host parameters in place, without a
  lock; only the version counter is atomic. What can go wrong, and is measured: a pull that
  overlaps a write reads a *torn* snapshot (some leaves or elements already updated, others
  not; ``metrics.torn_reads`` counts pulls that overlapped a write), and overlapping writes
  can lose element updates (NumPy releases the GIL inside in-place adds of more than a few
  hundred elements; ``metrics.overlapping_writes`` counts writes that began while another was
  in progress, and ``metrics.write_residual`` = ‖W_final − W_0 − Σ pushed updates‖ /
  ‖Σ pushed updates‖: float32 rounding alone gives ~1e-6, lost updates more). Staleness is
  measured against the number of completed writes.
* ``"sync"``: a barrier per round; the server averages the ``N`` gradients of a round (in
  worker order, so the run is deterministic) and applies one update. ``steps`` counts rounds
  here, so a synchronous run consumes ``num_workers × steps`` gradients.

Stragglers (:class:`Straggler`) add extra compute time per gradient (fixed, random, or one
slow worker) between the gradient and its delivery, so async throughput can be compared with
sync, which waits for the slowest.

Robustness: an exception in a worker (its data function, its program) or in the server
stops every worker before its next gradient (waits poll every 50 ms) and is re-raised in the
caller as :class:`HogwildError` naming the worker; ``KeyboardInterrupt`` stops and joins
every thread before propagating; ``time_limit`` ends the run on time; every thread is joined
before :func:`train` returns (a thread stuck in user code past ``shutdown_timeout`` is
reported as an error naming it); the server never waits on a worker without also watching
the stop signal, so a worker dying mid-push cannot deadlock it.

References:
  Niu, Recht, Ré, Wright, "Hogwild!: A lock-free approach to parallelizing stochastic
  gradient descent", NeurIPS 2011 (arXiv 1106.5730).
  Dean et al., "Large scale distributed deep networks" (Downpour SGD), NeurIPS 2012.
  Koloskova, Stich, Jaggi, "Sharper convergence guarantees for asynchronous SGD for
  distributed and federated learning", NeurIPS 2022 (arXiv 2206.08307).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import numbers
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import io_callback

from asgd_jax import delays

__all__ = [
    "MODES",
    "HogwildError",
    "HogwildMetrics",
    "HogwildResult",
    "Straggler",
    "Trace",
    "train",
    "worker_batch",
]

MODES = ("locked", "lock_free", "sync")
_POLL_S = 0.05  # how often every wait re-checks the stop signal
_STRAGGLER_TABLE = 4096  # per-worker extra times drawn up front, reused cyclically
_THREAD_PREFIX = "asgd-hogwild"


class HogwildError(RuntimeError):
    """A hogwild run failed; ``worker`` is the failing worker's id, ``None`` for the server."""

    def __init__(self, message: str, worker: int | None = None):
        super().__init__(message)
        self.worker = worker


class Trace(NamedTuple):
    """Every applied update, in application order (one entry per update).

    ``staleness[t] = version_applied[t] − version_pulled[t]`` is τ_t of update t; pass the
    trace to :func:`asgd_jax.delays.trace` to replay it. ``worker_step`` is the worker's own
    gradient index (with :func:`worker_batch` it regenerates the batch). In ``"sync"`` mode
    ``worker`` is the last worker to arrive in the round (the one the round waited for) and
    ``loss`` the round's mean loss.
    """

    worker: np.ndarray
    version_pulled: np.ndarray
    version_applied: np.ndarray
    staleness: np.ndarray
    wall_time: np.ndarray
    worker_step: np.ndarray
    loss: np.ndarray


class HogwildMetrics(NamedTuple):
    """Summary of a hogwild run (host scalars and small NumPy arrays)."""

    mode: str
    num_workers: int
    updates: int
    gradients: int
    wall_time: float
    updates_per_second: float
    gradients_per_second: float
    gradients_per_worker: np.ndarray
    mean_staleness: float
    max_staleness: int
    staleness_histogram: np.ndarray
    stopped_by: str
    torn_reads: int
    overlapping_writes: int
    write_residual: float


class HogwildResult(NamedTuple):
    """What :func:`train` returns.

    Attributes:
      params: the final parameters (``jax.Array`` leaves, the input's structure).
      opt_state: the server's optimizer state; in ``"lock_free"`` mode a tuple of the
        workers' own optimizer states.
      metrics: a :class:`HogwildMetrics`.
      trace: a :class:`Trace` of every applied update.
      pushes: with ``record_pushes=True``, what was applied, stacked in application order
        (leading axis = update): the gradients (``"locked"``), the round-averaged gradients
        (``"sync"``) or the parameter deltas (``"lock_free"``); else ``None``.
    """

    params: optax.Params
    opt_state: Any
    metrics: HogwildMetrics
    trace: Trace
    pushes: Any


# --------------------------------------------------------------------------------------------
# Stragglers.

_STRAGGLER_LAWS = ("fixed", "exponential", "uniform")


def _check_seconds(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a real number of seconds, got {value!r}.")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"`{name}` must be finite and ≥ 0 seconds, got {value}.")
    return value


@dataclasses.dataclass(frozen=True)
class Straggler:
    """Extra compute time injected per gradient, per worker.

    The worker waits (interruptibly: a stop ends the wait at once) before pushing each
    gradient. Build one with :meth:`fixed`, :meth:`random` or :meth:`one_slow`.

    Attributes:
      extra_time: mean extra seconds per gradient: one number for every worker, or one per
        worker.
      law: ``"fixed"`` (exactly ``extra_time``), ``"exponential"`` (mean ``extra_time``) or
        ``"uniform"`` (on ``[0, 2·extra_time]``). Random times are drawn from the run's key.
      worker: if set, only this worker is slowed.
    """

    extra_time: float | tuple[float, ...]
    law: str = "fixed"
    worker: int | None = None

    def __post_init__(self):
        if isinstance(self.extra_time, Sequence) and not isinstance(self.extra_time, str):
            times = tuple(
                _check_seconds(f"extra_time[{i}]", t) for i, t in enumerate(self.extra_time)
            )
            if not times:
                raise ValueError("`extra_time` must not be an empty sequence.")
            object.__setattr__(self, "extra_time", times)
        else:
            object.__setattr__(self, "extra_time", _check_seconds("extra_time", self.extra_time))
        if self.law not in _STRAGGLER_LAWS:
            raise ValueError(f"`law` must be one of {_STRAGGLER_LAWS}, got {self.law!r}.")
        if self.worker is not None:
            if isinstance(self.worker, bool) or not isinstance(self.worker, numbers.Integral):
                raise TypeError(f"`worker` must be an int or None, got {self.worker!r}.")
            if self.worker < 0:
                raise ValueError(f"`worker` must be ≥ 0, got {self.worker}.")

    @classmethod
    def fixed(cls, extra_time: float | Sequence[float]) -> Straggler:
        """Every gradient of worker ``i`` takes ``extra_time`` (or ``extra_time[i]``) longer."""
        return cls(extra_time=extra_time, law="fixed")

    @classmethod
    def random(cls, mean: float | Sequence[float], law: str = "exponential") -> Straggler:
        """Random extra time with the given mean, ``law`` ``"exponential"`` or ``"uniform"``."""
        if law == "fixed":
            raise ValueError("`law` must be 'exponential' or 'uniform'; use Straggler.fixed.")
        return cls(extra_time=mean, law=law)

    @classmethod
    def one_slow(cls, extra_time: float, worker: int = 0) -> Straggler:
        """Only ``worker`` is slow: each of its gradients takes ``extra_time`` longer."""
        return cls(extra_time=extra_time, law="fixed", worker=worker)

    def means(self, num_workers: int) -> np.ndarray:
        """Mean extra seconds per gradient for each of ``num_workers`` workers."""
        if isinstance(self.extra_time, tuple):
            if len(self.extra_time) != num_workers:
                raise ValueError(
                    f"`extra_time` has {len(self.extra_time)} entries but the run has "
                    f"num_workers={num_workers}."
                )
            means = np.asarray(self.extra_time, np.float64)
        else:
            means = np.full(num_workers, self.extra_time, np.float64)
        if self.worker is not None:
            if self.worker >= num_workers:
                raise ValueError(
                    f"Straggler `worker` must be < num_workers={num_workers}, got {self.worker}."
                )
            only = np.zeros(num_workers)
            only[self.worker] = means[self.worker]
            means = only
        return means

    def table(self, key: chex.PRNGKey, num_workers: int, length: int) -> np.ndarray:
        """Extra seconds for ``length`` consecutive gradients of each worker, from ``key``."""
        means = self.means(num_workers)[:, None]
        if self.law == "fixed":
            return np.broadcast_to(means, (num_workers, length)).copy()
        if self.law == "exponential":
            unit = jax.random.exponential(key, (num_workers, length))
        else:
            unit = 2.0 * jax.random.uniform(key, (num_workers, length))
        return np.asarray(unit, np.float64) * means


# --------------------------------------------------------------------------------------------
# Data.


def _stream_words(key: chex.PRNGKey, worker: jax.Array | int) -> jax.Array:
    """The seed words of ``worker``'s data stream."""
    return delays.key_words(jax.random.fold_in(key, worker))


def _sample(data: Any, batch_size: int, words: jax.Array, step: jax.Array | int) -> Any:
    num_examples = jax.tree.leaves(data)[0].shape[0]
    counter = jnp.asarray(step, jnp.uint32) * jnp.uint32(batch_size) + jnp.arange(
        batch_size, dtype=jnp.uint32
    )
    u = delays.uniform01(words, counter)
    idx = jnp.minimum((u * num_examples).astype(jnp.int32), num_examples - 1)
    return jax.tree.map(lambda x: jnp.take(x, idx, axis=0), data)


def worker_batch(
    data: Any,
    batch_size: int,
    key: int | chex.PRNGKey,
    worker: jax.Array | int,
    step: jax.Array | int,
) -> Any:
    """The batch worker ``worker`` uses for its ``step``-th gradient (sampled with replacement).

    Each worker has its own stream (``key`` folded with the worker id); the indices come from
    a counter-based hash of (stream, step), so any batch of a run can be regenerated, e.g. to
    replay a recorded trace through :func:`asgd_jax.stale` on the same data.

    Args:
      data: a pytree of arrays sharing a leading (example) axis.
      batch_size: examples per batch.
      key: the run's key or int seed (``train``'s ``seed``).
      worker: the worker id.
      step: the worker's gradient index (``Trace.worker_step``).

    Returns:
      The pytree of ``data`` indexed by ``batch_size`` example indices.
    """
    if isinstance(key, numbers.Integral):
        key = jax.random.key(key)
    return _sample(data, batch_size, _stream_words(key, worker), step)


# --------------------------------------------------------------------------------------------
# The run.


def _host_copy(x: Any) -> np.ndarray:
    return np.array(x, copy=True)


# --------------------------------------------------------------------------------------------
# Programs. They are built from a hashable spec and cached, so repeated runs with the same
# model and optimizer (sweeps over workers, modes, stragglers) compile once. Callbacks reach
# the live run through a registry keyed by a run id passed as an operand.

_RUNS: dict[int, Any] = {}
_RUN_IDS = itertools.count()
_CACHE: collections.OrderedDict = collections.OrderedDict()
_CACHE_SIZE = 16
_CACHE_LOCK = threading.Lock()


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Everything a worker program depends on, besides its operands."""

    loss_fn: Callable
    optimizer: Any
    mode: str
    treedef: Any
    params: tuple  # ((shape, dtype), ...) per leaf
    batch_treedef: Any  # None for array data
    batch: tuple  # ((shape, dtype), ...) per leaf of a host batch; () for array data
    batch_size: int | None


def _structs(shapes: tuple) -> list[jax.ShapeDtypeStruct]:
    return [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in shapes]


def _pull_entry(run_id, worker):
    return _RUNS[int(run_id)].pull_callback(worker)


def _push_entry(run_id, worker, step, version_pulled, loss, pushed):
    return _RUNS[int(run_id)].push_callback(worker, step, version_pulled, loss, pushed)


def _worker_program(spec: _Spec) -> Callable:
    """One gradient: pull → (loss, grad) → [lock-free: own optimizer] → push."""
    host_data = spec.batch_treedef is not None
    pull_shapes = (_structs(spec.params), jax.ShapeDtypeStruct((), jnp.int32))

    def program(run_id, worker, step, data, key, host_batch, opt_state):
        if host_data:
            batch = jax.tree.unflatten(spec.batch_treedef, host_batch)
        else:
            batch = _sample(data, spec.batch_size, _stream_words(key, worker), step)
        leaves, version = io_callback(_pull_entry, pull_shapes, run_id, worker)
        params = jax.tree.unflatten(spec.treedef, leaves)
        loss, grads = jax.value_and_grad(spec.loss_fn)(params, batch)
        if spec.mode == "lock_free":
            pushed, opt_state = spec.optimizer.update(grads, opt_state, params)
        else:
            pushed = grads
        done = io_callback(
            _push_entry,
            jax.ShapeDtypeStruct((), jnp.int32),
            run_id,
            worker,
            step,
            version,
            loss.astype(jnp.float32),
            jax.tree.leaves(pushed),
        )
        return done, opt_state

    return program


def _server_program(optimizer: Any, mode: str) -> Callable:
    """One server update: (sync: mean over the round's gradients), optimizer, apply."""

    def apply(params, opt_state, grads):
        if mode == "sync":
            grads = jax.tree.map(lambda g: jnp.mean(g, axis=0), grads)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, grads

    return apply


def _abstract(tree: Any) -> tuple:
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((jnp.shape(x), str(jax.typeof(x))) for x in leaves)


def _compile(key: tuple, fn: Callable, *args) -> Any:
    """``jax.jit(fn).lower(*args).compile()``, cached on ``key`` when it is hashable."""
    try:
        hash(key)
    except TypeError:
        key = None
    if key is not None:
        with _CACHE_LOCK:
            if key in _CACHE:
                _CACHE.move_to_end(key)
                return _CACHE[key]
    compiled = jax.jit(fn).lower(*args).compile()
    if key is not None:
        with _CACHE_LOCK:
            _CACHE[key] = compiled
            while len(_CACHE) > _CACHE_SIZE:
                _CACHE.popitem(last=False)
    return compiled


class _Run:
    """One experiment: shared host state, callbacks, the server loop and the worker loop."""

    def __init__(
        self,
        loss_fn,
        params,
        optimizer,
        data,
        *,
        num_workers,
        steps,
        mode,
        batch_size,
        straggler,
        key,
        record_pushes,
    ):
        self.optimizer = optimizer
        self.num_workers = num_workers
        self.steps = steps
        self.mode = mode
        self.key = key
        self.record_pushes = record_pushes
        self.run_id = next(_RUN_IDS)

        leaves, self.treedef = jax.tree.flatten(params)
        host_params = [np.array(jnp.asarray(x), copy=True) for x in leaves]
        self.param_structs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in host_params]
        self.host_data = callable(data)
        self.data = data
        batch_treedef, batch_shapes = None, ()
        if self.host_data:
            self._first_batch = jax.tree.map(np.asarray, data(0, 0))
            batch_treedef, batch_leaves = (
                jax.tree.structure(self._first_batch),
                jax.tree.leaves(self._first_batch),
            )
            batch_shapes = tuple((x.shape, x.dtype) for x in batch_leaves)
        self.batch_structs = _structs(batch_shapes)
        self.spec = _Spec(
            loss_fn=loss_fn,
            optimizer=optimizer,
            mode=mode,
            treedef=self.treedef,
            params=tuple((x.shape, x.dtype) for x in host_params),
            batch_treedef=batch_treedef,
            batch=batch_shapes,
            batch_size=None if self.host_data else batch_size,
        )
        self.straggler_table = (
            straggler.table(jax.random.fold_in(key, 0x5747), num_workers, _STRAGGLER_TABLE)
            if straggler is not None
            else None
        )

        self.stop = threading.Event()
        self.stop_reason: str | None = None
        self.errors: list[tuple[int | None, BaseException]] = []
        self.lock = threading.Lock()  # guards the version counters and the published snapshot
        self.t0 = time.perf_counter()
        self.claimed = 0  # gradients reserved by pulls (bounds the run to exactly `steps`)
        self.local_steps = [0] * num_workers
        self.log: list[tuple] = []
        self.per_worker_log: list[list[tuple]] = [[] for _ in range(num_workers)]
        self.pushes: list[list[np.ndarray]] = []
        self.torn_reads = 0
        self.overlapping_writes = 0
        self.outbox: list[tuple | None] = [None] * num_workers  # filled by the push callback

        if mode == "lock_free":
            self.shared = host_params  # mutated in place by the workers
            self.initial = [x.copy() for x in host_params]
            self.pushed_sum = [
                [np.zeros(x.shape, np.float64) for x in host_params] for _ in range(num_workers)
            ]
            self.writes_begun = 0
            self.writes_done = 0
        else:
            # Copies, never the caller's buffers.
            self.server_params = jax.tree.unflatten(
                self.treedef, [jnp.array(x) for x in host_params]
            )
            self.opt_state = optimizer.init(self.server_params)
            self.snapshot = host_params
            self.version = 0
            self.inbox: queue.Queue = queue.Queue()
            self.acks = [threading.Event() for _ in range(num_workers)]

    # -- bookkeeping ----------------------------------------------------------------------

    def worker_opt_state(self) -> Any:
        """A lock-free worker's own optimizer state, initialised at W_0."""
        return self.optimizer.init(jax.tree.unflatten(self.treedef, list(self.initial)))

    def opt_state_struct(self) -> Any:
        if self.mode != "lock_free":
            return None
        return jax.eval_shape(self.worker_opt_state)

    def fail(self, worker: int | None, exc: BaseException) -> None:
        with self.lock:
            self.errors.append((worker, exc))
            if self.stop_reason is None:
                self.stop_reason = "error"
        self.stop.set()

    def request_stop(self, reason: str) -> None:
        with self.lock:
            if self.stop_reason is None:
                self.stop_reason = reason
        self.stop.set()

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def applied(self) -> int:
        return self.writes_done if self.mode == "lock_free" else self.version

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
        """Reserves the worker's next gradient; False once the run has all it needs."""
        with self.lock:
            if self.stop.is_set():
                return False
            if self.steps is None:
                return True
            if self.mode == "sync":
                return self.local_steps[worker] < self.steps
            if self.claimed >= self.steps:
                return False
            self.claimed += 1
            return True

    # -- callbacks (host side: NumPy only, never jax, never a wait) ---------------------------

    def pull_callback(self, worker):
        if self.mode != "lock_free":
            with self.lock:
                return self.snapshot, np.int32(self.version)
        with self.lock:
            begun, done = self.writes_begun, self.writes_done
        snapshot = [x.copy() for x in self.shared]
        with self.lock:
            if begun != done or self.writes_begun != begun:
                self.torn_reads += 1
        return snapshot, np.int32(done)

    def push_callback(self, worker, step, version_pulled, loss, pushed):
        self.outbox[int(worker)] = (
            int(worker),
            int(step),
            int(version_pulled),
            float(np.asarray(loss)),
            [_host_copy(g) for g in pushed],
        )
        return np.int32(1)

    # -- the worker thread ----------------------------------------------------------------------

    def run_worker(self, compiled, worker: int, data, results: list) -> None:
        try:
            worker_id = np.int32(worker)
            run_id = np.int32(self.run_id)
            opt_state = self.worker_opt_state() if self.mode == "lock_free" else None
            step = 0
            while self._claim(worker):
                batch = self._batch(worker, step)
                done, opt_state = compiled(
                    run_id, worker_id, np.int32(step), data, self.key, batch, opt_state
                )
                done.block_until_ready()
                item, self.outbox[worker] = self.outbox[worker], None
                if self.straggler_table is not None:
                    extra = self.straggler_table[worker, step % _STRAGGLER_TABLE]
                    if extra > 0 and self.stop.wait(extra):
                        break
                if self.stop.is_set():
                    break
                if self.mode == "lock_free":
                    self._write(*item)
                elif not self._push_and_wait(*item):
                    break
                step += 1
                self.local_steps[worker] = step
            results[worker] = opt_state
        except BaseException as exc:
            self.fail(worker, exc)

    def _push_and_wait(self, worker, step, version_pulled, loss, grads) -> bool:
        """Hands the gradient to the server; returns once it is applied (False on stop)."""
        ack = self.acks[worker]
        self.inbox.put((worker, step, version_pulled, loss, grads))
        while not ack.wait(_POLL_S):
            if self.stop.is_set():
                return False
        ack.clear()
        return True

    def _write(self, worker, step, version_pulled, loss, delta) -> None:
        """Lock-free Hogwild! write: only the counter is atomic, the add is not."""
        with self.lock:
            index = self.writes_begun
            if self.writes_begun != self.writes_done:
                self.overlapping_writes += 1
            self.writes_begun += 1
        for shared, d in zip(self.shared, delta, strict=True):
            np.add(shared, d, out=shared, casting="unsafe")
        with self.lock:
            self.writes_done += 1
            done = self.writes_done
        for acc, d in zip(self.pushed_sum[worker], delta, strict=True):
            acc += d
        self.per_worker_log[worker].append((worker, version_pulled, index, self.now(), step, loss))
        if self.record_pushes:
            self.pushes.append((index, delta))
        if self.steps is not None and done >= self.steps:
            self.request_stop("steps")

    # -- threads ---------------------------------------------------------------------------

    def run_server(self, apply) -> None:
        try:
            if self.mode == "sync":
                self._serve_sync(apply)
            else:
                self._serve_locked(apply)
        except BaseException as exc:
            self.fail(None, exc)

    def _next_item(self):
        while not self.stop.is_set():
            try:
                return self.inbox.get(timeout=_POLL_S)
            except queue.Empty:
                continue
        return None

    def _publish(self, apply, grads) -> int:
        """Applies one update with the server's optimizer; returns the new version."""
        grads = jax.tree.unflatten(self.treedef, grads)
        params, opt_state, applied = apply(self.server_params, self.opt_state, grads)
        snapshot = [np.asarray(x) for x in jax.tree.leaves(params)]  # waits for the update
        self.server_params, self.opt_state = params, opt_state
        with self.lock:
            self.snapshot = snapshot
            self.version += 1
            version = self.version
        if self.record_pushes:
            self.pushes.append([np.asarray(x) for x in jax.tree.leaves(applied)])
        return version

    def _serve_locked(self, apply) -> None:
        while (item := self._next_item()) is not None:
            worker, step, version_pulled, loss, grads = item
            version = self._publish(apply, grads)
            self.log.append((worker, version_pulled, version - 1, self.now(), step, loss))
            self.acks[worker].set()
            if self.steps is not None and version >= self.steps:
                self.request_stop("steps")

    def _serve_sync(self, apply) -> None:
        while True:
            arrived: dict[int, tuple] = {}
            last = None
            while len(arrived) < self.num_workers:
                last = self._next_item()
                if last is None:
                    return
                arrived[last[0]] = last
            rows = [arrived[w] for w in range(self.num_workers)]
            stacked = [np.stack(leaf) for leaf in zip(*(r[4] for r in rows), strict=True)]
            loss = float(np.mean([r[3] for r in rows]))
            version = self._publish(apply, stacked)
            self.log.append((last[0], version - 1, version - 1, self.now(), last[1], loss))
            for ack in self.acks:
                ack.set()
            if self.steps is not None and version >= self.steps:
                self.request_stop("steps")

    # -- results ---------------------------------------------------------------------------

    def trace(self) -> Trace:
        if self.mode == "lock_free":
            entries = sorted((e for log in self.per_worker_log for e in log), key=lambda e: e[2])
        else:
            entries = self.log
        cols = list(zip(*entries, strict=True)) if entries else [()] * 6
        worker, pulled, applied, wall, step, loss = (np.asarray(c) for c in cols)
        pulled = pulled.astype(np.int64)
        applied = applied.astype(np.int64)
        return Trace(
            worker=worker.astype(np.int32),
            version_pulled=pulled,
            version_applied=applied,
            staleness=(applied - pulled).astype(np.int32),
            wall_time=wall.astype(np.float64),
            worker_step=step.astype(np.int64),
            loss=loss.astype(np.float32),
        )

    def stacked_pushes(self):
        if not self.record_pushes or not self.pushes:
            return None
        if self.mode == "lock_free":
            rows = [delta for _, delta in sorted(self.pushes, key=lambda p: p[0])]
        else:
            rows = self.pushes
        leaves = [np.stack(col) for col in zip(*rows, strict=True)]
        return jax.tree.unflatten(self.treedef, leaves)

    def write_residual(self) -> float:
        if self.mode != "lock_free":
            return 0.0
        residual = total = 0.0
        for i, (final, start) in enumerate(zip(self.shared, self.initial, strict=True)):
            pushed = sum(acc[i] for acc in self.pushed_sum)
            diff = final.astype(np.float64) - start.astype(np.float64) - pushed
            residual += float(np.sum(diff**2))
            total += float(np.sum(pushed**2))
        return math.sqrt(residual) / max(math.sqrt(total), np.finfo(np.float64).tiny)


def _check_count(name: str, value: Any, *, low: int, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an integer ≥ {low}, got {value!r}.")
    if value < low:
        raise ValueError(f"`{name}` must be ≥ {low}, got {value}.")
    return int(value)


def train(
    loss_fn: Callable[[optax.Params, Any], jax.Array],
    params: optax.Params,
    optimizer: optax.GradientTransformation,
    data: Any,
    *,
    num_workers: int = 4,
    steps: int | None = None,
    mode: str = "locked",
    batch_size: int | None = None,
    straggler: Straggler | None = None,
    time_limit: float | None = None,
    seed: int | chex.PRNGKey = 0,
    record_pushes: bool = False,
    progress: bool = False,
    shutdown_timeout: float = 30.0,
) -> HogwildResult:
    """Trains with ``num_workers`` real asynchronous worker threads and a parameter server.

    Each worker thread repeatedly reserves a gradient, runs one jitted program (pull through
    ``io_callback`` → gradient → push through ``io_callback``) and delivers the push; the
    server applies the updates (see the module docstring for the three consistency modes).
    Programs are compiled once here, in the calling thread, and cached for later runs with
    the same ``loss_fn``, ``optimizer`` and shapes. The run ends after ``steps`` updates, at
    ``time_limit`` seconds, on the first error (re-raised here as :class:`HogwildError`
    naming the worker, with the original exception as ``__cause__``) or on
    ``KeyboardInterrupt`` (propagated after every thread is stopped). Every thread this call
    starts is joined before it returns.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``, jittable.
      params: the initial parameters (a pytree of float arrays); not modified.
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
      mode: ``"locked"``, ``"lock_free"`` or ``"sync"``.
      batch_size: examples per gradient when ``data`` is arrays.
      straggler: extra compute time per gradient, a :class:`Straggler`, or ``None``.
      time_limit: wall-clock seconds after which the run stops (a worker finishes the
        gradient it is computing, discards it and stops), or ``None``.
      seed: an int or a PRNG key: the data streams and random straggler times.
      record_pushes: keep a copy of every applied push (for tests and replays; memory grows
        with ``steps``).
      progress: show a tqdm progress bar.
      shutdown_timeout: seconds to wait for the threads after the run stops before
        reporting a thread stuck in user code as an error.

    Returns:
      A :class:`HogwildResult` (final params, optimizer state, metrics, trace, pushes).

    References:
      Niu, Recht, Ré, Wright, "Hogwild!", NeurIPS 2011 (arXiv 1106.5730).
    """
    if not callable(loss_fn):
        raise TypeError(f"`loss_fn` must be callable, got {loss_fn!r}.")
    if not hasattr(optimizer, "init") or not hasattr(optimizer, "update"):
        raise TypeError(f"`optimizer` must be an optax transformation, got {optimizer!r}.")
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}.")
    num_workers = _check_count("num_workers", num_workers, low=1)
    steps = _check_count("steps", steps, low=1, allow_none=True)
    if time_limit is not None:
        time_limit = _check_seconds("time_limit", time_limit)
        if time_limit == 0:
            raise ValueError("`time_limit` must be > 0 seconds (or None).")
    if steps is None and time_limit is None:
        raise ValueError("Give `steps`, `time_limit` or both: the run needs an end.")
    shutdown_timeout = _check_seconds("shutdown_timeout", shutdown_timeout)
    if straggler is not None and not isinstance(straggler, Straggler):
        raise TypeError(f"`straggler` must be a Straggler or None, got {straggler!r}.")
    if straggler is not None:
        straggler.means(num_workers)  # validates against num_workers
    if not jax.tree.leaves(params):
        raise ValueError("`params` must contain at least one array.")
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
        batch_size = _check_count("batch_size", batch_size, low=1)
    key = jax.random.key(seed) if isinstance(seed, numbers.Integral) else seed

    run = _Run(
        loss_fn,
        params,
        optimizer,
        data,
        num_workers=num_workers,
        steps=steps,
        mode=mode,
        batch_size=batch_size,
        straggler=straggler,
        key=key,
        record_pushes=record_pushes,
    )
    data_arrays = None if callable(data) else jax.tree.map(jnp.asarray, data)
    # Compile in the calling thread (tracing errors surface here, threads never compile
    # concurrently), once per model/optimizer/shape combination.
    index = jax.ShapeDtypeStruct((), jnp.int32)
    opt_state_struct = run.opt_state_struct()
    compiled = _compile(
        ("worker", run.spec, _abstract(data_arrays), _abstract(key)),
        _worker_program(run.spec),
        index,
        index,
        index,
        data_arrays,
        key,
        run.batch_structs,
        opt_state_struct,
    )
    apply = None
    if mode != "lock_free":
        grads = [jax.ShapeDtypeStruct(s.shape, s.dtype) for s in run.param_structs]
        if mode == "sync":
            grads = [jax.ShapeDtypeStruct((num_workers, *s.shape), s.dtype) for s in grads]
        grads = jax.tree.unflatten(run.treedef, grads)
        apply = _compile(
            ("server", optimizer, mode, run.spec.treedef, run.spec.params, num_workers),
            _server_program(optimizer, mode),
            run.server_params,
            run.opt_state,
            grads,
        )

    results: list = [None] * num_workers
    threads = [
        threading.Thread(
            target=run.run_worker,
            args=(compiled, w, data_arrays, results),
            name=f"{_THREAD_PREFIX}-worker-{w}",
            daemon=True,
        )
        for w in range(num_workers)
    ]
    if apply is not None:
        threads.append(
            threading.Thread(
                target=run.run_server, args=(apply,), name=f"{_THREAD_PREFIX}-server", daemon=True
            )
        )
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=f"hogwild {mode} ×{num_workers}", unit="update")
    _RUNS[run.run_id] = run
    stuck: list[str] = []
    run.t0 = time.perf_counter()
    try:
        for thread in threads:
            thread.start()
        workers = threads[:num_workers]
        while not run.stop.wait(_POLL_S):
            if bar is not None:
                bar.update(run.applied() - bar.n)
            if time_limit is not None and run.now() >= time_limit:
                run.request_stop("time_limit")
            if not any(t.is_alive() for t in workers):
                break
    except KeyboardInterrupt:
        run.request_stop("interrupted")
        raise
    finally:
        run.request_stop("steps")  # a no-op when a reason is already set
        wall_time = run.now()
        stuck = _join(threads, shutdown_timeout)
        if not stuck:  # a stuck thread still needs the run to see the stop signal
            _RUNS.pop(run.run_id, None)
        if bar is not None:
            bar.update(run.applied() - bar.n)
            bar.close()
    if run.errors:
        worker, exc = run.errors[0]
        who = "server" if worker is None else f"worker {worker}"
        raise HogwildError(
            f"hogwild {who} raised {type(exc).__name__}: {exc}", worker=worker
        ) from exc
    if stuck:
        raise HogwildError(
            f"hogwild thread(s) {', '.join(stuck)} did not stop within shutdown_timeout="
            f"{shutdown_timeout} s after the run ended; they are blocked in user code (e.g. the "
            "data function) and were left running as daemon threads.",
            worker=None,
        )
    return _result(run, results, wall_time, num_workers, mode)


def _join(threads: list[threading.Thread], timeout: float) -> list[str]:
    """Joins every thread within ``timeout`` seconds in total; returns the names still alive."""
    deadline = time.perf_counter() + timeout
    for thread in threads:
        if thread.ident is not None:
            thread.join(max(0.0, deadline - time.perf_counter()))
    return [t.name for t in threads if t.is_alive()]


def _result(
    run: _Run, results: list, wall_time: float, num_workers: int, mode: str
) -> HogwildResult:
    trace = run.trace()
    updates = int(trace.staleness.size)
    gradients_per_worker = np.asarray(run.local_steps, np.int64)
    gradients = int(gradients_per_worker.sum())
    if trace.staleness.size:
        histogram = np.bincount(trace.staleness)
        mean_staleness = float(trace.staleness.mean())
        max_staleness = int(trace.staleness.max())
    else:
        histogram, mean_staleness, max_staleness = np.zeros(1, np.int64), 0.0, 0
    metrics = HogwildMetrics(
        mode=mode,
        num_workers=num_workers,
        updates=updates,
        gradients=gradients,
        wall_time=wall_time,
        updates_per_second=updates / wall_time if wall_time > 0 else 0.0,
        gradients_per_second=gradients / wall_time if wall_time > 0 else 0.0,
        gradients_per_worker=gradients_per_worker,
        mean_staleness=mean_staleness,
        max_staleness=max_staleness,
        staleness_histogram=histogram,
        stopped_by=run.stop_reason or "steps",
        torn_reads=run.torn_reads,
        overlapping_writes=run.overlapping_writes,
        write_residual=run.write_residual(),
    )
    if mode == "lock_free":
        params = jax.tree.unflatten(run.treedef, [jnp.asarray(x) for x in run.shared])
        opt_state = tuple(results)
    else:
        params, opt_state = run.server_params, run.opt_state
    return HogwildResult(
        params=params,
        opt_state=opt_state,
        metrics=metrics,
        trace=trace,
        pushes=run.stacked_pushes(),
    )
