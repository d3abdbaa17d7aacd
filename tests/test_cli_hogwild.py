"""Tests for `asgd-jax hogwild`: outputs end to end, the simulator's prediction, error paths."""

import json

import jax
import numpy as np
import pytest
from _cli_helpers import run_main as _main

from asgd_jax import delays, hogwild, workers
from asgd_jax.cli import _hogwild

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FILES = ("metrics.json", "staleness.png", "trace.json")


def _hogwild_run(capsys, data_dir, out, *flags):
    argv = ["hogwild", "--data-dir", data_dir, "--out", str(out), "--quiet", *flags]
    status, stdout, err = _main(capsys, *argv)
    assert status == 0, err
    return stdout, json.loads((out / "metrics.json").read_text())


# --------------------------------------------------------------------------------------------
# The prediction's pieces, on traces made by hand.


def _trace(worker, step, time):
    n = len(worker)
    return hogwild.Trace(
        worker=np.asarray(worker),
        version_pulled=np.zeros(n, np.int64),
        version_applied=np.arange(1, n + 1),
        staleness=np.zeros(n, np.int32),
        wall_time=np.asarray(time, np.float64),
        worker_step=np.asarray(step),
        loss=np.zeros(n, np.float32),
    )


def test_cycle_times_from_the_trace():
    # Worker 0: gradients 0, 1, 3 applied at 1, 2, 4 (gradient 2 refused: still a cycle).
    # Worker 1: one update, its gradient 1, at 1.5. Worker 2: none; 4 gradients in 8 s.
    trace = _trace([0, 1, 0, 0], [0, 1, 1, 3], [1.0, 1.5, 2.0, 4.0])
    cycles, cv = _hogwild.cycle_times(trace, [4, 2, 4], wall_time=8.0)
    np.testing.assert_array_equal(cycles, [1.0, 0.75, 2.0])
    assert cv == 0.0  # one whole cycle (0 → 1) seen: no spread to measure
    # Whole cycles of 1 and 3 s around a mean of 2: ratios 0.5, 1.5, cv = 0.5.
    cycles, cv = _hogwild.cycle_times(_trace([0, 0, 0], [0, 1, 2], [1, 2, 5]), [3], 5.0)
    np.testing.assert_array_equal(cycles, [2.0])
    assert cv == pytest.approx(0.5, rel=1e-12)


def test_total_variation():
    assert _hogwild.total_variation([2, 2], [1, 1, 0]) == 0.0
    assert _hogwild.total_variation([4], [0, 0, 3]) == 1.0
    assert _hogwild.total_variation([1, 3], [3, 1]) == pytest.approx(0.5)


def test_histogram_text_groups_long_tails():
    text = _hogwild.histogram_text(np.ones(100, np.int64), np.r_[np.zeros(99), 1.0])
    rows = text.splitlines()[1:]
    assert len(rows) == 20 and rows[0].split()[:3] == ["0–4", "5.0%", "0.0%"]
    assert rows[-1].split()[:3] == ["95–99", "5.0%", "100.0%"]


# --------------------------------------------------------------------------------------------
# End to end (threads).


def test_locked_run_writes_a_replayable_trace_and_the_prediction(capsys, tmp_path, data_dir):
    out = tmp_path / "locked"
    stdout, metrics = _hogwild_run(
        capsys, data_dir, out, "--workers", "3", "--steps", "90", "--batch-size", "16"
    )
    assert sorted(p.name for p in out.iterdir()) == list(FILES)
    assert (out / "staleness.png").read_bytes()[:8] == PNG_MAGIC
    for needle in ("90 updates", "updates/s", "measured  predicted", "total-variation"):
        assert needle in stdout
    assert f"final test accuracy {metrics['test_accuracy']:.3f}" in stdout

    trace = json.loads((out / "trace.json").read_text())
    taus = np.asarray(trace["staleness"])
    assert taus.size == metrics["metrics"]["updates"] == 90
    np.testing.assert_array_equal(
        taus, np.subtract(trace["version_applied"], trace["version_pulled"])
    )
    np.testing.assert_array_equal(np.bincount(taus), metrics["staleness_histogram"])
    # The file replays exactly through delays.trace.
    replay = delays.trace(trace)
    state, replayed = replay.init(jax.random.key(0)), []
    for _ in range(taus.size):
        tau, state = replay.next(state)
        replayed.append(int(tau))
    np.testing.assert_array_equal(replayed, taus)
    assert int(state.exhausted) == 0

    # The prediction: the simulator at the cycle times and spread read off this trace.
    loaded = hogwild.Trace(**{k: np.asarray(v) for k, v in trace.items()})
    cycles, cv = _hogwild.cycle_times(
        loaded, metrics["metrics"]["gradients_per_worker"], metrics["metrics"]["wall_time"]
    )
    np.testing.assert_array_equal(cycles, metrics["cycle_times"])
    assert cv == metrics["cycle_cv"] > 0
    model = workers.parameter_server(
        3, workers.lognormal(mean=1.0, cv=cv), speeds=1.0 / cycles, max_delay=48
    )
    key = jax.random.fold_in(jax.random.key(0), 0x51A)
    predicted = np.bincount(np.asarray(workers.simulate(model, key, 90).staleness))
    np.testing.assert_array_equal(predicted, metrics["predicted_histogram"])
    size = max(predicted.size, taus.max() + 1)
    tv = (
        0.5
        * np.abs(
            np.bincount(taus, minlength=size) - np.pad(predicted, (0, size - predicted.size))
        ).sum()
        / 90
    )
    assert metrics["total_variation"] == pytest.approx(tv, abs=1e-12)
    assert f"{tv:.3f}" in stdout

    # Never overwritten unasked: a second run into the directory changes nothing.
    before = {name: (out / name).read_bytes() for name in FILES}
    status, _, err = _main(capsys, "hogwild", "--data-dir", data_dir, "--out", str(out))
    assert status == 2 and "--overwrite" in err
    assert {name: (out / name).read_bytes() for name in FILES} == before


def test_ringmaster_with_a_straggler(capsys, tmp_path, data_dir):
    out = tmp_path / "ringmaster"
    flags = ["--workers", "3", "--steps", "40", "--mode", "ringmaster", "--threshold", "2"]
    flags += ["--straggler-one-slow", "0.02", "--slow-worker", "1", "--model", "logreg"]
    _, metrics = _hogwild_run(capsys, data_dir, out, *flags)
    assert metrics["straggler"] == {"extra_time": 0.02, "law": "fixed", "worker": 1}
    # Every cycle of worker 1 includes its 20 ms wait.
    assert metrics["cycle_times"][1] >= 0.02
    # Ringmaster applies τ < R only, measured and simulated.
    assert len(metrics["staleness_histogram"]) <= 2
    assert len(metrics["predicted_histogram"]) <= 2
    assert metrics["metrics"]["updates"] == 40
    assert "ringmaster" in metrics["simulator"]


# --------------------------------------------------------------------------------------------
# Error paths: one line on stderr, exit status 2, nothing written.


@pytest.mark.parametrize(
    ("flags", "needles"),
    [
        (["--mode", "sync", "--max-staleness", "2"], ["--max-staleness", "locked"]),
        (["--backend", "ray", "--mode", "lock_free"], ["lock_free", "backend='ray'"]),
        (["--workers", "0"], ["--workers"]),
        (["--straggler-fixed", "0.1,0.2"], ["--straggler-fixed", "2 entries"]),
        (["--straggler-one-slow", "0.1", "--slow-worker", "4"], ["--slow-worker", "4"]),
        (["--model", "cnn", "--hidden-sizes", "8"], ["--hidden-sizes", "mlp"]),
        (["--batch-size", "0"], ["--batch-size", "1440"]),
        (["--mode", "magic"], ["--mode", "invalid choice"]),
        (["--straggler-fixed", "1", "--straggler-random", "1"], ["not allowed"]),
    ],
)
def test_bad_settings_exit_2_with_one_line(capsys, tmp_path, data_dir, flags, needles):
    out = tmp_path / "o"
    argv = ["hogwild", "--data-dir", data_dir, "--out", str(out), "--quiet", *flags]
    status, _, err = _main(capsys, *argv)
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists()
