"""The compiled program of a configuration: init, one step, a scanned chunk, evaluation.

The step is :func:`asgd_jax.make_step` of the model's loss and the ``stale`` optimizer (the
core contract, written once for every training path). The simulated clock and the worker
counters come from :func:`asgd_jax.delay_report`, never from the delay model's fields.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from asgd_jax import data as data_lib
from asgd_jax import delays as delays_lib
from asgd_jax import models as models_lib
from asgd_jax import transforms
from asgd_jax._cache import CompileCache
from asgd_jax.step import Step, make_step
from asgd_jax.train._build import check_fits, make_delay_model, make_model, make_optimizer
from asgd_jax.train._config import TrainConfig, fields_with_role

__all__ = ["Program", "TrainState", "build_program", "run_keys"]


def run_keys(seed: int | jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The model-init, delay and data keys of the run with integer ``seed``.

    ``jax.random.key(seed)`` split in three: a vmapped run of several seeds and the single
    run of each use the same keys, hence the same initial state and batches.
    """
    init_key, delay_key, data_key = jax.random.split(jax.random.key(seed), 3)
    return init_key, delay_key, data_key


_run_keys_jit = jax.jit(run_keys)


class TrainState(NamedTuple):
    """Everything a run carries from step to step (a pytree of arrays; checkpointed whole)."""

    step: jax.Array  # updates done so far (int32).
    params: Any  # W_t.
    opt_state: Any  # the optimizer state (with the StaleState inside).
    data_key: jax.Array  # raw uint32 key data of the run's data stream.
    time: jax.Array  # simulated wall clock of the last update (float32); steps otherwise.
    gradients_dropped: jax.Array  # worker gradients dropped or cancelled up to that update.
    staleness_clipped: jax.Array  # updates whose staleness was clipped to max_delay.
    batch_loss_sum: jax.Array  # Σ of the minibatch losses since the last evaluation.


@dataclasses.dataclass(frozen=True, eq=False)
class Program:
    """The compiled pieces of one configuration (cached: runs of one config share them).

    Attributes:
      config: the configuration (fields that do not shape the program — seed, length,
        checkpointing, data source — reset to their defaults).
      model: the model.
      optimizer: the ``asgd.stale`` optimizer.
      delay: the delay model.
      dataset_shape: ``(num_train, input_shape, num_classes)`` the program was built for.
    """

    config: TrainConfig
    model: models_lib.Model
    optimizer: optax.GradientTransformationExtraArgs
    delay: delays_lib.DelayModel
    dataset_shape: tuple[int, tuple[int, ...], int]

    @functools.cached_property
    def update(self) -> Step:
        """The core contract for this model and optimizer (:func:`asgd_jax.make_step`)."""
        return make_step(self.model.loss, self.optimizer)

    # ---- pure functions (jit/vmap them as needed).

    def init(self, seed: int | jax.Array) -> TrainState:
        """The state of the run with integer ``seed``.

        The model's jitted ``init`` is shared by every program with the same model; the
        optimizer state is built by this program's own small jitted ``init_from``.
        """
        init_key, delay_key, data_key = _run_keys_jit(jnp.asarray(seed, jnp.int32))
        params = self.model.init(init_key, self.dataset_shape[1])
        return self.compiled("init", False)(params, delay_key, data_key)

    def init_from(self, params: Any, delay_key: jax.Array, data_key: jax.Array) -> TrainState:
        """The state of a run from its initial parameters and its delay and data keys."""
        opt_state = transforms.reseed(self.optimizer.init(params), delay_key)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=opt_state,
            data_key=jax.random.key_data(data_key),
            time=jnp.zeros((), jnp.float32),
            gradients_dropped=jnp.zeros((), jnp.int32),
            staleness_clipped=jnp.zeros((), jnp.int32),
            batch_loss_sum=jnp.zeros((), jnp.float32),
        )

    def start(
        self, seeds: Sequence[int] | int, dataset: data_lib.Dataset, batched: bool
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        """The initial state (seeds stacked on a leading axis when ``batched``) and its metrics.

        Seed by seed, so a vmapped run starts from exactly the states of the single runs.
        """
        if not batched:
            state = _distinct_buffers(self.init(int(np.asarray(seeds))))
        else:
            states = [self.init(int(seed)) for seed in np.asarray(seeds).reshape(-1)]
            state = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
        metrics = _run_metrics(state, 0)
        metrics.update(self.evaluate_model(state.params, dataset, batched))
        return state, metrics

    def batch_indices(self, state: TrainState, step: jax.Array) -> jax.Array:
        """Training-set indices of the gradient(s) of update ``step``."""
        config = self.config
        num_train = self.dataset_shape[0]
        if config.data_streams == "per_worker":
            report = transforms.delay_report(state.opt_state)
            return data_lib.worker_batch_indices(
                state.data_key,
                num_train,
                config.batch_size,
                report["worker_step"],
                report["worker"],
                config.num_workers,
                disjoint=True,
            )
        size = config.batch_size * config.gradients_per_update
        return data_lib.batch_indices(state.data_key, num_train, size, step)

    def step(
        self, state: TrainState, dataset: data_lib.Dataset, indices: jax.Array | None = None
    ) -> TrainState:
        """One update: the gradient at W_{t−τ_t} on the step's batch, applied to W_t."""
        if indices is None:
            indices = self.batch_indices(state, state.step)
        batch = data_lib.get_batch(dataset, indices)
        if self.config.uses_worker_clock:
            # The delay model's state is one update ahead (τ_t is drawn before the gradient):
            # it now describes the arrival (or round) that delivers this update.
            report = transforms.delay_report(state.opt_state)
            now, dropped, clipped = report["time"], report["dropped"], report["clipped"]
        else:
            now = (state.step + 1).astype(jnp.float32)
            dropped, clipped = state.gradients_dropped, state.staleness_clipped
        params, opt_state, loss = self.update(state.params, state.opt_state, batch)
        return TrainState(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            data_key=state.data_key,
            time=now.astype(jnp.float32),
            gradients_dropped=dropped,
            staleness_clipped=clipped,
            batch_loss_sum=state.batch_loss_sum + loss,
        )

    def run_chunk(self, state: TrainState, dataset: data_lib.Dataset, length: int) -> TrainState:
        """``length`` steps fused in one ``lax.scan``."""
        if self.config.data_streams == "shared":
            # All the chunk's batches at once: the data key's hash words are derived once,
            # not once per step.
            steps = state.step + jnp.arange(length, dtype=jnp.int32)
            all_indices = jax.vmap(lambda t: self.batch_indices(state, t))(steps)
            body = lambda s, idx: (self.step(s, dataset, idx), None)
            return jax.lax.scan(body, state, all_indices)[0]
        body = lambda s, _: (self.step(s, dataset), None)
        return jax.lax.scan(body, state, None, length=length)[0]

    def evaluate_model(
        self, params: Any, dataset: data_lib.Dataset, batched: bool
    ) -> dict[str, jax.Array]:
        """Loss and accuracy on the full train and test splits (seeds on axis 0 if batched).

        One jitted program per model, evaluation batch size and dataset shape, shared by
        every configuration that trains that model.
        """
        key = (self.model.module, self.config.eval_batch_size, batched)
        evaluate = _EVALUATIONS.get(key, lambda: _compile_evaluation(self.model, *key[1:]))
        return evaluate(params, dataset)

    def chunk(
        self, state: TrainState, dataset: data_lib.Dataset, length: int
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        """``length`` steps, then the run's counters (the model is evaluated separately)."""
        state = self.run_chunk(state, dataset, length)
        metrics = _run_metrics(state, length)
        return state._replace(batch_loss_sum=jnp.zeros_like(state.batch_loss_sum)), metrics

    # ---- compiled entry points (cached per program).

    @functools.cached_property
    def _compiled(self) -> CompileCache:
        return CompileCache(max_size=6)

    def compiled(self, name: str, batched: bool) -> Any:
        """The jitted (for ``batched``: vmapped over seeds) ``"init"``, ``"chunk"`` or
        ``"step"``."""
        if name not in ("init", "chunk", "step"):
            raise ValueError(f"unknown program entry {name!r} (init, chunk or step)")
        return self._compiled.get((name, batched), lambda: _compile(self, name, batched))


def _compile(program: Program, name: str, batched: bool) -> Any:
    if name == "init":
        return jax.jit(program.init_from)
    if name == "chunk":

        def chunk(state: TrainState, dataset: data_lib.Dataset, length: int) -> Any:
            fn = lambda s, d: program.chunk(s, d, length)
            return (jax.vmap(fn, in_axes=(0, None)) if batched else fn)(state, dataset)

        return jax.jit(chunk, static_argnums=2, donate_argnums=0)
    step = jax.vmap(program.step, in_axes=(0, None)) if batched else program.step
    return jax.jit(step, donate_argnums=0)


def _distinct_buffers(tree: Any) -> Any:
    """``tree`` with every leaf in a buffer of its own (a copy where two leaves share one).

    Eager initialisation may hand the same array to several leaves (e.g. zero counters);
    the state is donated to the train step, and donating one buffer twice is an error.
    """
    seen: set[Any] = set()

    def own(leaf: jax.Array) -> jax.Array:
        try:
            buffer = leaf.unsafe_buffer_pointer()
        except Exception:  # backends without raw pointers: object identity
            buffer = id(leaf)
        if buffer in seen:
            return jnp.copy(leaf)
        seen.add(buffer)
        return leaf

    return jax.tree.map(own, tree)


def _run_metrics(state: TrainState, num_steps: int) -> dict[str, jax.Array]:
    """The run's counters after ``num_steps`` steps since the last evaluation (traceable)."""
    stale = transforms.find_stale_state(state.opt_state)
    summary = transforms.staleness_summary(stale.metrics.staleness_histogram)
    nan = jnp.full(jnp.shape(state.step), jnp.nan, jnp.float32)
    return {
        "step": state.step,
        "time": state.time,
        "batch_loss": state.batch_loss_sum / num_steps if num_steps else nan,
        "mean_staleness": summary["mean"],
        "max_staleness": summary["max"],
        "updates_dropped": stale.metrics.updates_dropped,
        "updates_applied": state.step - stale.metrics.updates_dropped,
        "gradients_dropped": state.gradients_dropped,
        "staleness_clipped": state.staleness_clipped,
    }


_EVALUATIONS = CompileCache(max_size=16)


def _compile_evaluation(model: models_lib.Model, batch_size: int | None, batched: bool) -> Any:
    def evaluate(params: Any, dataset: data_lib.Dataset) -> dict[str, jax.Array]:
        train_loss, train_acc = model.evaluate(
            params, dataset.x_train, dataset.y_train, batch_size=batch_size
        )
        test_loss, test_acc = model.evaluate(
            params, dataset.x_test, dataset.y_test, batch_size=batch_size
        )
        return {
            "train_loss": train_loss,
            "train_accuracy": train_acc,
            "test_loss": test_loss,
            "test_accuracy": test_acc,
            "generalization_gap": test_loss - train_loss,
        }

    return jax.jit(jax.vmap(evaluate, in_axes=(0, None)) if batched else evaluate)


_PROGRAMS = CompileCache(max_size=32)
# Fields that do not change the compiled code: reset to their defaults in a program's key.
_NOT_IN_PROGRAM = fields_with_role("data", "seed", "length", "checkpoint")


def build_program(config: TrainConfig, dataset: data_lib.Dataset) -> Program:
    """The :class:`Program` of a config for a dataset's shapes (cached across runs).

    Runs that differ only in ``num_steps``, ``seed``, checkpointing or where the data come
    from share one program, so their jitted functions compile once.

    Raises:
      ValueError: the config's batches do not fit the dataset (:func:`check_fits`).
    """
    check_fits(config, dataset)
    defaults = TrainConfig()
    base = config.replace(**{name: getattr(defaults, name) for name in _NOT_IN_PROGRAM})
    shape = (dataset.num_train, tuple(dataset.input_shape), int(dataset.num_classes))

    def build() -> Program:
        delay = make_delay_model(base)
        return Program(
            config=base,
            model=make_model(base, shape[2]),
            optimizer=make_optimizer(base, delay),
            delay=delay,
            dataset_shape=shape,
        )

    return _PROGRAMS.get((base, shape), build)
