"""The training loop every experiment uses: scanned steps, evaluation, seeds, checkpoints.

One configuration object, :class:`TrainConfig`, describes a run (dataset, model, optimizer,
staleness mitigation, delay model or simulated workers, steps, evaluation); :func:`train`
runs it. The CLI, the notebooks, the benchmarks and the studies all call :func:`train` (or
the pieces it is made of: :func:`make_delay_model`, :func:`make_optimizer`,
:func:`build_program`), so there is exactly one loop.

The loop. Steps are the core contract, :func:`asgd_jax.make_step`: the gradient of the
model's loss at ``stale_params(state, params)`` = W_{t−τ_t}, applied to W_t. ``eval_every``
steps are fused into one ``lax.scan`` inside one jitted, state-donating program; the model is
then evaluated on the full train and test splits by a program shared by every configuration
that trains the same model, dispatched right behind it, and the host reads both results at
once: one host round trip per chunk. Batches are a pure function of the run's data key and
the step (or, with ``data_streams="per_worker"``, of the simulated worker that sends the
gradient and its own step count).

Time. When the delay model is a worker simulation (``delay="workers"``) the history carries
its simulated wall clock (:func:`asgd_jax.delay_report`): the time at which the last update
was applied (arrivals for the asynchronous protocols, rounds of the K fastest of n workers
for ``protocol="k_sync"``, so synchronous and asynchronous SGD compare on the same clock).
Otherwise time counts updates. A K-sync / K-async update averages K gradients: its batch is
K times ``batch_size``.

Seeds. ``train(config, seeds=[...])`` runs the seeds under ``jax.vmap``: seed ``s`` uses
:func:`run_keys` (``jax.random.key(s)`` split into model-init, delay and data keys; the delay
stream enters through :func:`asgd_jax.reseed`), exactly as the single run with
``config.seed = s``: the same initial state bit for bit and the same batches; batched matrix
products (and float32 simulated clocks) may round differently, so parameters and times agree
to float precision.

Checkpoints. With ``checkpoint_dir`` the run saves its whole state (parameters, optimizer
state with the parameter history and the delay model's state, data key, clock) with orbax
every ``checkpoint_every`` steps and at the end, together with the metric history and a
SHA-256 digest of the state. A run started again on the same directory resumes from the
latest checkpoint and continues bitwise identically to an uninterrupted run (a checkpoint
taken at a ``num_steps`` that is not a multiple of ``eval_every`` adds an evaluation at that
step to the history; the state is still bitwise the same). A checkpoint written by a
different configuration, or one whose files or arrays no longer match the checksums saved
with them, stops the run with :class:`CheckpointError` before anything is written, and
every checkpoint in the directory is left as it is.
"""

from asgd_jax.train._build import (
    check_fits,
    load_dataset,
    make_delay_model,
    make_model,
    make_optimizer,
)
from asgd_jax.train._checkpoints import CheckpointError, latest_checkpoint
from asgd_jax.train._config import (
    COMPUTE_TIMES,
    CONFIG_GROUPS,
    DATA_STREAMS,
    DELAYS,
    MITIGATIONS,
    OPTIMIZERS,
    PROTOCOLS,
    ROLES,
    ConfigField,
    TrainConfig,
    vmappable_fields,
)
from asgd_jax.train._loop import train
from asgd_jax.train._program import Program, TrainState, build_program, run_keys
from asgd_jax.train._results import (
    DIVERGENCE_FACTOR,
    TrainResult,
    summarize,
    time_to_accuracy,
)
from asgd_jax.train._sweep import SweepResult, check_sweep

__all__ = [
    "COMPUTE_TIMES",
    "CONFIG_GROUPS",
    "DATA_STREAMS",
    "DELAYS",
    "DIVERGENCE_FACTOR",
    "MITIGATIONS",
    "OPTIMIZERS",
    "PROTOCOLS",
    "ROLES",
    "CheckpointError",
    "ConfigField",
    "Program",
    "SweepResult",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "build_program",
    "check_fits",
    "check_sweep",
    "latest_checkpoint",
    "load_dataset",
    "make_delay_model",
    "make_model",
    "make_optimizer",
    "run_keys",
    "summarize",
    "time_to_accuracy",
    "train",
    "vmappable_fields",
]
