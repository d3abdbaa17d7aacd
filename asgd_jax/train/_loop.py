"""The one training loop: chunks of scanned steps, evaluation, seeds, checkpoints, resume."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from asgd_jax import data as data_lib
from asgd_jax import transforms
from asgd_jax._validation import check_min_int
from asgd_jax.train._build import fit_dataset, load_dataset
from asgd_jax.train._checkpoints import (
    CheckpointError,
    Checkpoints,
    fingerprint,
    history_from_json,
    history_to_json,
    leaf_signature,
)
from asgd_jax.train._config import TrainConfig
from asgd_jax.train._program import build_program
from asgd_jax.train._results import TrainResult
from asgd_jax.train._sweep import SweepResult, run_sweep

__all__ = ["train"]


def _chunk_ends(start: int, num_steps: int, every: int) -> list[int]:
    """Chunk boundaries after ``start``: the multiples of ``every`` and ``num_steps``."""
    ends = list(range((start // every + 1) * every, num_steps, every))
    return [*ends, num_steps] if num_steps > start else []


def train(
    config: TrainConfig,
    *,
    sweep: Mapping[str, Sequence[Any]] | None = None,
    seeds: Sequence[int] | None = None,
    dataset: data_lib.Dataset | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = True,
    resume_step: int | None = None,
    progress: bool | None = None,
) -> TrainResult | SweepResult:
    """Trains a model as ``config`` says; the one loop behind the CLI, notebooks and studies.

    Steps run in jitted, state-donating chunks of ``config.eval_every`` steps fused with
    ``lax.scan``; after each chunk the program evaluates on the full train and test splits
    (one host round trip per chunk). See :mod:`asgd_jax.train` for time, seeds and
    checkpoints.

    Args:
      config: the run's :class:`TrainConfig`.
      sweep: ``{field: [values, ...], ...}``: train every point of the Cartesian product of
        the values (each a copy of ``config`` with the point's values) and return a
        :class:`SweepResult`. Fields whose metadata says ``sweep="vmap"``
        (:func:`asgd_jax.train.vmappable_fields`: learning rate, momentum, λ, delay-law and
        compute-time-law parameters, ``num_slow``, ``slow_factor``, ``comm_time``) run as
        data, all their points together with the seeds in one compiled program; the other
        fields change shapes or code and loop, one program per value (the result's
        ``vmapped``, ``looped`` and ``groups`` say which). Each point gives what
        ``train(point_config, seeds=seeds)`` gives: the same τ sequence, batches and
        counters exactly, parameters and losses as exactly as a vmapped run of more seeds
        (see ``tests/test_sweep.py``). No checkpoints: ``checkpoint_dir`` is refused.
      seeds: run these seeds at once under ``jax.vmap`` (every array in the result gains a
        leading seed axis); ``None`` runs ``config.seed`` alone.
      dataset: train on this :class:`asgd_jax.data.Dataset` instead of loading
        ``config.dataset`` (e.g. one of :func:`asgd_jax.data.neighbouring_pair`); a
        ``config.train_size`` other than its size keeps its first ``train_size`` examples.
      checkpoint_dir: save orbax checkpoints here every ``config.checkpoint_every`` steps
        (default: only at the end) and resume from the latest one found there.
      resume: resume from the directory's checkpoint; ``False`` refuses a directory that
        already holds checkpoints.
      resume_step: resume from this step instead of the latest; later checkpoints in the
        directory are deleted (they are replaced as the run passes them again).
      progress: show a tqdm progress bar (default: when stderr is a terminal).

    Returns:
      A :class:`TrainResult` (a :class:`SweepResult` with ``sweep``).

    Raises:
      ValueError: combinations that do not fit the dataset (batch size).
      CheckpointError: a checkpoint in ``checkpoint_dir`` is corrupted or was written by
        another configuration; nothing in the directory is changed.
      asgd_jax.data.DatasetNotAvailableError: the dataset is not prepared offline.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    started = time.perf_counter()
    if seeds is not None:
        seeds = tuple(check_min_int(f"seeds[{i}]", s, 0) for i, s in enumerate(seeds))
        if not seeds:
            raise ValueError("seeds must name at least one seed")
    if sweep is not None:
        if checkpoint_dir is not None or resume_step is not None:
            raise ValueError(
                "train(sweep=...) saves no checkpoints: drop checkpoint_dir and resume_step "
                "(run a point alone with train(point_config, checkpoint_dir=...) to save it)"
            )
        use_bar = sys.stderr.isatty() if progress is None else bool(progress)
        return run_sweep(config, sweep, seeds, dataset, use_bar)
    dataset = load_dataset(config) if dataset is None else fit_dataset(config, dataset)
    program = build_program(config, dataset)
    batched = seeds is not None
    state, initial_metrics = program.start(seeds if batched else config.seed, dataset, batched)

    history: dict[str, list] = {}
    checkpoints = None
    resumed_from = None
    run_fingerprint = fingerprint(config, seeds)
    if checkpoint_dir is not None:
        checkpoints = Checkpoints(checkpoint_dir, config.max_checkpoints)
        existing = checkpoints.steps()
        if existing and not resume:
            raise CheckpointError(
                f"{checkpoints.directory} already holds checkpoints (steps {existing}); resume "
                "from them or choose another directory"
            )
        if resume_step is not None and resume_step not in existing:
            raise CheckpointError(
                f"no checkpoint at step {resume_step} in {checkpoints.directory} "
                f"(steps: {existing or 'none'})"
            )
        step = resume_step
        if existing and step is None:
            step, incomplete = checkpoints.newest_complete()
            if incomplete:
                _say_incomplete(checkpoints.directory, incomplete, step)
            if step is None:  # only incomplete saves: the run starts again from step 0
                checkpoints.delete_after(-1)
        if step is not None:
            meta = checkpoints.check(step, state, run_fingerprint)
            state = checkpoints.restore(step, state, meta)
            history = history_from_json(meta["history"])
            resumed_from = step
            if step > config.num_steps:
                raise CheckpointError(
                    f"the checkpoint in {checkpoints.directory} is at step {step}, beyond "
                    f"num_steps={config.num_steps}"
                )
            checkpoints.delete_after(step)

    start = int(np.asarray(state.step).reshape(-1)[0])
    if not history:
        _append(history, initial_metrics)

    chunk = program.compiled("chunk", batched)
    use_bar = sys.stderr.isatty() if progress is None else bool(progress)
    bar = _progress_bar(config.num_steps, start, use_bar)
    previous = start
    try:
        for end in _chunk_ends(start, config.num_steps, config.eval_every):
            state, metrics = chunk(state, dataset, end - previous)
            metrics.update(program.evaluate_model(state.params, dataset, batched))
            _append(history, metrics)
            previous = end
            if bar is not None:
                bar.update(end - bar.n)
                bar.set_postfix(test_acc=f"{np.mean(history['test_accuracy'][-1]):.3f}")
            save_now = end == config.num_steps or (
                config.checkpoint_every is not None and end % config.checkpoint_every == 0
            )
            if checkpoints is not None and save_now:
                meta = {
                    "fingerprint": run_fingerprint,
                    "leaves": leaf_signature(state),
                    "history": history_to_json(history),
                    "config": config.to_dict(),
                }
                checkpoints.save(end, state, meta)
    finally:
        if bar is not None:
            bar.close()
        if checkpoints is not None:
            checkpoints.close()

    stacked = {
        k: np.stack([np.asarray(v) for v in values], axis=-1) for k, values in history.items()
    }
    histogram = np.asarray(transforms.find_stale_state(state.opt_state).metrics.staleness_histogram)
    return TrainResult(
        config=config,
        seeds=seeds,
        state=state,
        history=stacked,
        staleness_histogram=histogram,
        time_unit="simulated time" if config.uses_worker_clock else "steps",
        wall_seconds=time.perf_counter() - started,
        resumed_from=resumed_from,
    )


def _say_incomplete(directory: str, incomplete: list[int], step: int | None) -> None:
    """One line on stderr: the run resumes before the saves that a stop interrupted."""
    which = (
        f"the checkpoint at step {incomplete[0]} in {directory} is incomplete (the run "
        "stopped while saving it)"
        if len(incomplete) == 1
        else f"the checkpoints at steps {', '.join(map(str, incomplete))} in {directory} are "
        "incomplete (the run stopped while saving them)"
    )
    where = f"step {step}" if step is not None else "step 0: no complete checkpoint"
    print(f"asgd_jax.train: {which}; resuming from {where}", file=sys.stderr, flush=True)


def _append(history: dict[str, list], metrics: Mapping[str, Any]) -> None:
    host = jax.device_get(dict(metrics))
    for name, value in host.items():
        history.setdefault(name, []).append(np.asarray(value))


def _progress_bar(total: int, initial: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=False)
