"""Tests for asgd_jax.train: config checks, metrics, seeds under vmap, checkpoints."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from asgd_jax import data, delays, transforms, workers
from asgd_jax import train as train_lib
from asgd_jax.experiments import demo_configs
from asgd_jax.train import CheckpointError, TrainConfig

# Most tests train the small demo's asynchronous configuration (3 workers, one straggler), and
# tests/test_cli.py runs the same one through the command line: in one session every compiled
# program is shared (compilation, not training, is what costs time here).
DEMO = demo_configs(num_workers=3, num_slow=1, rounds=4, evals=2)
TINY = DEMO["ASGD"].replace(num_steps=24)  # eval_every = 6


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def digits(data_dir):
    return data.load("digits", data_dir=data_dir)


@pytest.fixture(scope="module")
def tiny_run(digits):
    return train_lib.train(TINY, dataset=digits, progress=False)


def _delay_key(seed):
    return train_lib.run_keys(seed)[1]


def _leaves_equal(a, b):
    return all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


# --------------------------------------------------------------------------------------------
# The configuration.


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"learning_rate": 0.0}, ValueError, "learning_rate"),
        ({"learning_rate": "fast"}, TypeError, "learning_rate"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"num_workers": 2.5}, TypeError, "num_workers"),
        ({"delay": "gamma"}, ValueError, "delay must be one of"),
        ({"mitigation": "magic"}, ValueError, "mitigation"),
        ({"model": "cnn", "hidden_sizes": (8,)}, ValueError, "hidden_sizes"),
        ({"checkpoint_every": 15}, ValueError, "multiple of eval_every"),
        ({"delay": "geometric", "delay_mean": 2.0, "max_delay": None}, ValueError, "max_delay"),
        ({"delay": "uniform", "min_delay": 5, "max_delay": 2}, ValueError, "min_delay"),
        ({"protocol": "k_async"}, ValueError, "needs k"),
        ({"protocol": "ssp"}, ValueError, "max_staleness"),
        ({"protocol": "k_sync", "k": 9}, ValueError, "num_workers"),
        ({"num_slow": 5}, ValueError, "num_slow"),
        ({"data_streams": "per_worker", "delay": "none"}, ValueError, "per_worker"),
        ({"compute_time": "pareto", "pareto_alpha": 1.0}, ValueError, "pareto_alpha"),
        ({"momentum": 1.0}, ValueError, "momentum"),
    ],
)
def test_config_rejects_bad_values(changes, error, match):
    with pytest.raises(error, match=match):
        TINY.replace(**changes)


def test_config_round_trips_through_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(__import__("json").dumps(TINY.to_dict()))
    assert TrainConfig.from_json(path) == TINY
    with pytest.raises(ValueError, match="unknown config field"):
        TrainConfig.from_dict({"learning_rte": 0.1})


def test_batch_larger_than_dataset_is_rejected(digits):
    for check in (train_lib.check_fits, train_lib.build_program):
        with pytest.raises(ValueError, match="exceeds the 1440 training examples"):
            check(TINY.replace(protocol="k_sync", batch_size=500), digits)
        with pytest.raises(ValueError, match="per-worker shard"):
            check(TINY.replace(data_streams="per_worker", batch_size=500), digits)
    assert train_lib.check_fits(TINY, digits) is None


# --------------------------------------------------------------------------------------------
# Metrics.


def test_history_has_every_metric_per_evaluation(tiny_run):
    history = tiny_run.history
    np.testing.assert_array_equal(history["step"], [0, 6, 12, 18, 24])
    for name in (
        "time",
        "batch_loss",
        "train_loss",
        "train_accuracy",
        "test_loss",
        "test_accuracy",
        "generalization_gap",
        "mean_staleness",
        "max_staleness",
        "updates_applied",
        "updates_dropped",
        "gradients_dropped",
        "staleness_clipped",
    ):
        assert history[name].shape == (5,), name
    # Computed inside the program, where XLA may fuse the reductions: equal to float rounding.
    np.testing.assert_allclose(
        history["generalization_gap"], history["test_loss"] - history["train_loss"], atol=1e-6
    )
    assert np.isnan(history["batch_loss"][0]) and np.all(np.isfinite(history["batch_loss"][1:]))
    assert history["train_loss"][-1] < history["train_loss"][0]
    np.testing.assert_array_equal(history["updates_applied"], history["step"])
    assert tiny_run.time_unit == "simulated time"


def test_time_and_staleness_come_from_the_worker_simulation(tiny_run):
    """Update t is applied at the simulated time of the arrival that delivers it."""
    model = train_lib.make_delay_model(TINY)
    trace = workers.simulate(model, _delay_key(TINY.seed), TINY.num_steps)
    times = np.asarray(trace.time)
    # float32 clocks: the simulation may sum the same event times in another order.
    np.testing.assert_allclose(tiny_run.history["time"][1:], times[[5, 11, 17, 23]], rtol=1e-6)
    taus = np.asarray(trace.staleness)
    expected = np.bincount(taus, minlength=model.max_delay + 1)
    np.testing.assert_array_equal(tiny_run.staleness_histogram, expected)
    assert tiny_run.history["max_staleness"][-1] == taus.max()
    np.testing.assert_allclose(tiny_run.history["mean_staleness"][-1], taus.mean(), rtol=1e-6)


def test_sync_rounds_use_k_gradients_and_the_round_clock(digits):
    config = TINY.replace(protocol="k_sync", k=2, num_steps=12)
    result = train_lib.train(config, dataset=digits, progress=False)
    program = train_lib.build_program(config, digits)
    state, _ = program.start(config.seed, digits, batched=False)
    assert program.batch_indices(state, state.step).shape == (2 * config.batch_size,)
    trace = workers.simulate(program.delay, _delay_key(config.seed), 12)
    np.testing.assert_allclose(result.history["time"][-1], np.asarray(trace.time)[11], rtol=1e-6)
    np.testing.assert_array_equal(result.staleness_histogram, [12])
    # Each round cancels the n - K = 1 slowest worker.
    np.testing.assert_array_equal(result.history["gradients_dropped"], [0, 6, 12])


def test_drops_and_step_clock_without_workers(digits):
    config = TINY.replace(delay="uniform", min_delay=0, max_delay=4, max_staleness=2)
    result = train_lib.train(config, dataset=digits, progress=False)
    taus = np.asarray(
        delays.sample(delays.uniform(0, 4), _delay_key(config.seed), config.num_steps)
    )
    assert result.history["updates_dropped"][-1] == np.sum(taus > 2) > 0
    np.testing.assert_array_equal(
        result.history["updates_applied"],
        result.history["step"] - result.history["updates_dropped"],
    )
    np.testing.assert_array_equal(result.history["time"], result.history["step"])
    assert result.time_unit == "steps"


def test_per_worker_streams_read_the_arriving_workers_shard(digits):
    config = TINY.replace(data_streams="per_worker")
    program = train_lib.build_program(config, digits)
    state, _ = program.start(0, digits, batched=False)
    stale = transforms.find_stale_state(state.opt_state)
    indices_of = jax.jit(
        lambda worker_state: program.batch_indices(
            state._replace(opt_state=stale._replace(delay_state=worker_state)), 0
        )
    )
    next_arrival = jax.jit(lambda worker_state: program.delay.next(worker_state)[1])
    shard = digits.num_train // config.num_workers
    worker_state, seen = stale.delay_state, {}
    for _ in range(12):
        worker = int(worker_state.worker)
        indices = np.asarray(indices_of(worker_state))
        assert np.all((indices >= worker * shard) & (indices < (worker + 1) * shard))
        assert not any(np.array_equal(indices, s) for s in seen.get(worker, []))
        seen.setdefault(worker, []).append(indices)
        worker_state = next_arrival(worker_state)
    assert len(seen) > 1


def test_time_to_accuracy_and_summary(tiny_run):
    history = {
        "time": np.array([[0.0, 1.5, 3.0], [0.0, 2.0, 4.0]]),
        "test_accuracy": np.array([[0.1, 0.6, 0.9], [0.1, 0.2, 0.3]]),
    }
    np.testing.assert_array_equal(train_lib.time_to_accuracy(history, 0.5), [1.5, np.nan])
    summary = train_lib.summarize(tiny_run, target_accuracy=0.0)
    assert summary["time_to_target"] == 0.0 and summary["steps_to_target"] == 0
    assert summary["final_test_accuracy"] == tiny_run.history["test_accuracy"][-1]
    assert train_lib.summarize(tiny_run, 1.01)["time_to_target"] is None
    assert summary["diverged"] is False and not tiny_run.diverged


# --------------------------------------------------------------------------------------------
# Seeds under vmap.


def test_vmapped_seeds_equal_separate_runs(digits):
    config = TINY.replace(num_steps=12)
    batched = train_lib.train(config, seeds=[0, 3], dataset=digits, progress=False)
    for index, seed in enumerate((0, 3)):
        single = train_lib.train(config.replace(seed=seed), dataset=digits, progress=False)
        # The delay sequence, clock and counters are integer / exact: equal bit for bit.
        for name in ("step", "max_staleness", "mean_staleness", "updates_applied"):
            np.testing.assert_array_equal(batched.history[name][index], single.history[name])
        # The simulated clock is float32 arithmetic that XLA may vectorise differently.
        np.testing.assert_allclose(batched.history["time"][index], single.history["time"], 1e-6)
        np.testing.assert_array_equal(
            batched.staleness_histogram[index], single.staleness_histogram
        )
        # Batched matmuls may round differently: parameters agree to float precision.
        for x, y in zip(
            jax.tree.leaves(batched.params), jax.tree.leaves(single.params), strict=True
        ):
            np.testing.assert_allclose(np.asarray(x)[index], y, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            batched.history["test_loss"][index], single.history["test_loss"], rtol=1e-5
        )
    assert not np.array_equal(batched.history["time"][0], batched.history["time"][1])


# --------------------------------------------------------------------------------------------
# Checkpoints.


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory, digits):
    """An uninterrupted 24-step run saving every 6 steps, and its directory."""
    directory = tmp_path_factory.mktemp("ckpt") / "full"
    config = TINY.replace(checkpoint_every=6, max_checkpoints=4)
    return (
        config,
        directory,
        train_lib.train(config, dataset=digits, checkpoint_dir=directory, progress=False),
    )


def test_resume_continues_bitwise(checkpointed, digits, tmp_path):
    config, _, full = checkpointed
    train_lib.train(
        config.replace(num_steps=12), dataset=digits, checkpoint_dir=tmp_path, progress=False
    )
    resumed = train_lib.train(config, dataset=digits, checkpoint_dir=tmp_path, progress=False)
    assert resumed.resumed_from == 12
    assert _leaves_equal(resumed.state, full.state)
    for name, values in full.history.items():
        np.testing.assert_array_equal(resumed.history[name], values, err_msg=name)
        assert resumed.history[name].dtype == values.dtype


def test_resume_from_an_earlier_step_is_bitwise(checkpointed, digits, tmp_path):
    config, directory, full = checkpointed
    copy = tmp_path / "copy"
    shutil.copytree(directory, copy)
    resumed = train_lib.train(
        config, dataset=digits, checkpoint_dir=copy, resume_step=6, progress=False
    )
    assert resumed.resumed_from == 6
    assert _leaves_equal(resumed.state, full.state)


def _damage(step_dir: pathlib.Path) -> None:
    files = sorted(p for p in (step_dir / "state").rglob("*") if p.is_file() and "d" in p.parts)
    assert files
    for path in files:
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        path.write_bytes(bytes(raw))


def test_corrupted_checkpoint_is_reported_and_earlier_ones_still_resume(
    checkpointed, digits, tmp_path
):
    config, directory, full = checkpointed
    copy = tmp_path / "copy"
    shutil.copytree(directory, copy)
    _damage(copy / "24")
    before = sorted(os.listdir(copy))
    with pytest.raises(CheckpointError, match=r"step 24 .*corrupted.*Nothing was deleted"):
        train_lib.train(config.replace(num_steps=30), dataset=digits, checkpoint_dir=copy)
    assert sorted(os.listdir(copy)) == before
    resumed = train_lib.train(
        config, dataset=digits, checkpoint_dir=copy, resume_step=18, progress=False
    )
    assert _leaves_equal(resumed.state, full.state)


def test_mismatched_checkpoint_is_refused(checkpointed, digits):
    config, directory, _ = checkpointed
    before = sorted(os.listdir(directory))
    with pytest.raises(CheckpointError, match=r"different configuration \(learning_rate"):
        train_lib.train(
            config.replace(learning_rate=0.05), dataset=digits, checkpoint_dir=directory
        )
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        train_lib.train(config, dataset=digits, checkpoint_dir=directory, resume=False)
    with pytest.raises(CheckpointError, match="no checkpoint at step 15"):
        train_lib.train(config, dataset=digits, checkpoint_dir=directory, resume_step=15)
    assert sorted(os.listdir(directory)) == before


# --------------------------------------------------------------------------------------------
# Killed runs: a stop inside a save leaves a checkpoint without its manifest.


def _manifest(step_dir: pathlib.Path) -> pathlib.Path:
    return step_dir / "asgd_manifest.json"


def test_resume_skips_a_save_the_stop_interrupted(checkpointed, digits, tmp_path, capfd):
    """Orbax committed step 24, the manifest was not written: resume from step 18."""
    config, directory, full = checkpointed
    copy = tmp_path / "copy"
    shutil.copytree(directory, copy)
    manifest = _manifest(copy / "24")
    manifest.rename(manifest.with_name(manifest.name + ".partial"))
    capfd.readouterr()
    resumed = train_lib.train(config, dataset=digits, checkpoint_dir=copy, progress=False)
    lines = capfd.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "step 24" in lines[0] and "resuming from step 18" in lines[0]
    assert resumed.resumed_from == 18
    assert _leaves_equal(resumed.state, full.state)
    for name, values in full.history.items():
        np.testing.assert_array_equal(resumed.history[name], values, err_msg=name)
    assert train_lib.latest_checkpoint(copy) == 24 and _manifest(copy / "24").is_file()


def test_resume_after_only_incomplete_saves_starts_afresh(checkpointed, digits, tmp_path):
    config, directory, full = checkpointed
    copy = tmp_path / "copy"
    (copy).mkdir()
    shutil.copytree(directory / "6", copy / "6")
    _manifest(copy / "6").unlink()
    assert train_lib.latest_checkpoint(copy) is None
    resumed = train_lib.train(config, dataset=digits, checkpoint_dir=copy, progress=False)
    assert resumed.resumed_from is None
    assert _leaves_equal(resumed.state, full.state)


_CHILD = """
import json, sys, time
from asgd_jax import data, train
from asgd_jax.train import _checkpoints

# Widen the window between orbax's commit and the manifest, so a loaded machine's poll
# still sees it; the kill stays a real SIGKILL at that point.
_digests = _checkpoints._file_digests
_checkpoints._file_digests = lambda step_dir: (time.sleep(0.2), _digests(step_dir))[1]
config = train.TrainConfig.from_dict(json.loads(sys.argv[1]))
dataset = data.load("digits", data_dir=sys.argv[3])
train.train(config, dataset=dataset, checkpoint_dir=sys.argv[2], progress=False)
"""


def _inside_orbax_save(directory: pathlib.Path) -> bool:
    return any(p.name.startswith("12.") for p in directory.iterdir())


def _before_manifest(directory: pathlib.Path) -> bool:
    return (directory / "12").is_dir() and not _manifest(directory / "12").exists()


def _between_saves(directory: pathlib.Path) -> bool:
    return _manifest(directory / "6").exists()


@pytest.mark.parametrize("kill_when", [_inside_orbax_save, _before_manifest, _between_saves])
def test_resume_after_a_kill_is_bitwise(checkpointed, digits, data_dir, tmp_path, kill_when):
    """SIGKILL a run as soon as it reaches a point (inside a save, or between saves)."""
    config, _, full = checkpointed
    directory = tmp_path / "killed"
    directory.mkdir()
    argv = [sys.executable, "-c", _CHILD, json.dumps(config.to_dict()), str(directory), data_dir]
    for _ in range(3):  # a busy machine's poll can miss a narrow window: then try again
        shutil.rmtree(directory)
        directory.mkdir()
        child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while child.poll() is None and not kill_when(directory):
                time.sleep(1e-4)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        if child.returncode == -signal.SIGKILL:
            break
    assert child.returncode == -signal.SIGKILL  # killed, not finished
    resumed = train_lib.train(config, dataset=digits, checkpoint_dir=directory, progress=False)
    assert resumed.resumed_from in (6, 12)
    assert _leaves_equal(resumed.state, full.state)
    for name, values in full.history.items():
        np.testing.assert_array_equal(resumed.history[name], values, err_msg=name)
