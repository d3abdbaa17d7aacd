"""Tests for the asgd-jax command line: outputs end to end, resume, and its error paths."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from _cli_helpers import run_main as _main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# The small demo's asynchronous run (tests/test_train.py's TINY): in one session the compiled
# programs are shared with that file's tests.
TINY_FLAGS = [
    "--hidden-sizes", "64",
    "--batch-size", "16",
    "--learning-rate", "0.2",
    "--num-workers", "3",
    "--num-slow", "1",
    "--eval-every", "6",
]  # fmt: skip


def _one_line_error(err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "error:" in lines[0] and "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


# --------------------------------------------------------------------------------------------
# Error paths: one line on stderr, exit status 2, nothing written.


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["run", "--bogus"], ["unrecognized arguments: --bogus"]),
        (["run", "--learning-rate", "fast"], ["--learning-rate", "expected a number"]),
        (["run", "--mitigation", "magic"], ["--mitigation", "invalid choice"]),
        (["frobnicate"], ["invalid choice"]),
        ([], ["required"]),
        (["sweep", "--values", "1,2"], ["--over"]),
    ],
)
def test_bad_flags_exit_2_with_one_line(capsys, tmp_path, argv, needles):
    status, out, err = _main(capsys, *argv, *(["--out", str(tmp_path / "o")] if argv else []))
    assert status == 2
    _one_line_error(err, *needles)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["run", "--model", "cnn", "--hidden-sizes", "8"], ["hidden_sizes", "mlp"]),
        (["run", "--protocol", "k_async"], ["needs k"]),
        (["run", "--checkpoint-every", "15"], ["multiple of eval_every"]),
        (["run", "--delay", "none", "--batch-size", "5000"], ["exceeds the 1440"]),
        (["run", "--dataset", "cifar10"], ["not available offline", "tfds build", "digits"]),
        (["run", "missing.json"], ["missing.json does not exist"]),
        (["run", "--resume-step", "10"], ["needs --resume"]),
        (["run", "--seeds", "0"], ["--seeds"]),
        (["sweep", "--over", "nope", "--values", "1"], ["must name a config field"]),
        (["sweep", "--over", "num_workers", "--values", "2,x"], ["expected an integer"]),
        (["sweep", "--over", "num_workers", "--values", "2,0"], ["num_workers=0"]),
        (
            ["sweep", "--over", "num_steps", "--values", "6", "--eval-every", "6"]
            + ["--checkpoint-every", "6"],
            ["sweep saves no checkpoints", "--checkpoint-every"],
        ),
        (["demo", "--stragglers", "9"], ["--stragglers"]),
        (["demo", "--rounds", "7"], ["--rounds"]),
        (["demo", "--target", "1.5"], ["--target"]),
    ],
)
def test_impossible_combinations_exit_2_with_one_line(capsys, tmp_path, data_dir, argv, needles):
    extra = ["--data-dir", data_dir] if argv[0] != "demo" else []
    status, _, err = _main(capsys, *argv, *extra, "--out", str(tmp_path / "o"), "--quiet")
    assert status == 2
    _one_line_error(err, *needles)


def test_never_overwrites_without_flag(capsys, tmp_path, data_dir):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    status, _, err = _main(capsys, "run", "--out", str(out), "--data-dir", data_dir)
    assert status == 2
    _one_line_error(err, "--overwrite")
    assert os.listdir(out) == ["notes.txt"]


def test_help_lists_commands_and_config_flags(capsys):
    status, out, _ = _main(capsys, "--help")
    assert status == 0 and all(c in out for c in ("demo", "run", "sweep"))
    status, out, _ = _main(capsys, "run", "--help")
    assert status == 0
    for flag in ("--num-workers", "--mitigation", "--checkpoint-every", "--resume", "--overwrite"):
        assert flag in out


# --------------------------------------------------------------------------------------------
# End to end.


def test_run_writes_outputs_and_resumes(capsys, tmp_path, data_dir):
    out = tmp_path / "run"
    config = {"num_steps": 12, "checkpoint_every": 6, "data_dir": data_dir}
    (tmp_path / "config.json").write_text(json.dumps(config))
    argv = ["run", str(tmp_path / "config.json"), *TINY_FLAGS, "--out", str(out), "--quiet"]
    status, table, err = _main(capsys, *argv, "--target", "0.2")
    assert status == 0, err
    assert "final test acc" in table and "time to 20%" in table
    assert sorted(os.listdir(out)) == ["checkpoints", "config.json", "curves.png", "metrics.json"]
    assert (out / "curves.png").read_bytes()[:8] == PNG_MAGIC
    saved = json.loads((out / "config.json").read_text())
    assert saved["num_steps"] == 12 and saved["hidden_sizes"] == [64]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["history"]["step"] == [0, 6, 12]
    assert metrics["summary"]["final_test_accuracy"] == metrics["history"]["test_accuracy"][-1]

    # Continue the same run to 18 steps from its checkpoint (the previous config.json as input).
    argv = ["run", str(out / "config.json"), "--num-steps", "18", "--out", str(out), "--quiet"]
    status, _, err = _main(capsys, *argv, "--resume")
    assert status == 0, err
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed["resumed_from"] == 12
    assert resumed["history"]["step"] == [0, 6, 12, 18]
    assert resumed["history"]["test_loss"][:3] == metrics["history"]["test_loss"]


def test_resume_into_a_finished_run_without_checkpoints_changes_nothing(capsys, tmp_path, data_dir):
    out = tmp_path / "done"
    argv = ["run", *TINY_FLAGS, "--num-steps", "6", "--data-dir", data_dir, "--out", str(out)]
    status, _, err = _main(capsys, *argv, "--quiet")
    assert status == 0, err
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "checkpoints" not in before
    status, _, err = _main(capsys, *argv, "--quiet", "--resume", "--learning-rate", "0.05")
    assert status == 2
    _one_line_error(err, "--resume", "no checkpoints", "nothing was changed")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_rerun_of_a_killed_run_offers_resume_before_overwrite(capsys, tmp_path, data_dir):
    out = tmp_path / "killed"
    argv = ["run", *TINY_FLAGS, "--num-steps", "12", "--checkpoint-every", "6"]
    argv += ["--data-dir", data_dir, "--out", str(out), "--quiet"]
    status, _, err = _main(capsys, *argv)
    assert status == 0, err
    for name in ("config.json", "metrics.json", "curves.png"):  # written only at the end
        (out / name).unlink()
    checkpoints = sorted(os.listdir(out / "checkpoints"))
    status, _, err = _main(capsys, *argv)
    assert status == 2
    _one_line_error(err, "--resume to continue from step 12", "--overwrite", "discards")
    assert err.index("--resume") < err.index("--overwrite")
    assert sorted(os.listdir(out / "checkpoints")) == checkpoints


def test_diverged_runs_are_reported_in_table_and_json(capsys, tmp_path, data_dir):
    out = tmp_path / "diverging"
    argv = ["sweep", "--over", "learning_rate", "--values", "0.2,1e6", "--seeds", "2"]
    argv += [*TINY_FLAGS, "--num-steps", "6", "--data-dir", data_dir, "--out", str(out)]
    status, table, err = _main(capsys, *argv, "--quiet")
    assert status == 0, err
    rows = table.strip().splitlines()[2:]
    assert "diverged" not in rows[0]
    assert rows[1].startswith("learning_rate=1000000.0 (diverged: 2/2 seeds)")
    runs = json.loads((out / "sweep.json").read_text())["runs"]
    assert [run["summary"]["diverged"] for run in runs] == [[False, False], [True, True]]


def test_sweep_over_steps_with_seeds(capsys, tmp_path, data_dir):
    out = tmp_path / "sweep"
    argv = ["sweep", "--over", "num_steps", "--values", "6,12", "--seeds", "2", *TINY_FLAGS]
    status, table, err = _main(capsys, *argv, "--data-dir", data_dir, "--out", str(out), "--quiet")
    assert status == 0, err
    assert "num_steps=6" in table and "num_steps=12" in table
    payload = json.loads((out / "sweep.json").read_text())
    assert payload["values"] == [6, 12] and payload["seeds"] == [0, 1]
    steps = [run["history"]["step"] for run in payload["runs"]]
    assert steps == [[[0, 6], [0, 6]], [[0, 6, 12], [0, 6, 12]]]
    assert (out / "sweep.png").read_bytes()[:8] == PNG_MAGIC


def test_demo_end_to_end_small(capsys, tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", data_dir)
    out = tmp_path / "demo"
    argv = ["demo", "--workers", "3", "--stragglers", "1", "--rounds", "4", "--evals", "2"]
    status, table, err = _main(capsys, *argv, "--seeds", "1", "--out", str(out), "--quiet")
    assert status == 0, err
    lines = table.strip().splitlines()
    assert "time to 85%" in lines[0] and len(lines) == 6
    for label in ("synchronous SGD (3 workers)", "ASGD", "staleness-aware ASGD", "DC-ASGD-a"):
        assert any(line.startswith(label) for line in lines[2:])
    assert (out / "demo.png").read_bytes()[:8] == PNG_MAGIC
    payload = json.loads((out / "demo.json").read_text())
    runs = payload["runs"]
    assert len(runs) == 4 and payload["table"] == lines
    sync = runs["synchronous SGD (3 workers)"]
    assert sync["max_staleness"] == 0 and sync["history"]["step"] == [0, 2, 4]
    asgd = runs["ASGD"]
    assert asgd["history"]["step"] == [0, 6, 12]
    assert np.sum(asgd["staleness_histogram"]) == 12 and asgd["max_staleness"] >= 1
    # Every run computes 12 gradients; the synchronous rounds wait for the straggler.
    assert sync["summary"]["time"] > asgd["summary"]["time"]


def test_subprocess_run_and_error_have_no_traceback(tmp_path, data_dir):
    env = dict(os.environ, TFDS_DATA_DIR=data_dir)
    command = [sys.executable, "-m", "asgd_jax.cli"]
    out = tmp_path / "sub"
    argv = ["run", *TINY_FLAGS, "--num-steps", "6", "--out", str(out), "--quiet"]
    done = subprocess.run(command + argv, capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr
    assert "final test acc" in done.stdout
    assert (out / "metrics.json").is_file()
    # The same output directory again: refused, one line, exit status 2.
    again = subprocess.run(command + argv, capture_output=True, text=True, env=env, timeout=240)
    assert again.returncode == 2
    _one_line_error(again.stderr, "--overwrite")
