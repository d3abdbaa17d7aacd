"""benchmarks/device_check.sh runs unchanged on CPU: its --tiny size, end to end."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ElementTree

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "device_check.sh"

pytestmark = pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("timeout") is None,
    reason="device_check.sh needs bash and coreutils' timeout",
)


def _run(*args, timeout):
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        cwd=ROOT,
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.timeout(200)
def test_tiny_check_on_cpu_writes_every_result(tmp_path):
    results = tmp_path / "check"
    done = _run("--tiny", str(results), timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"results in {results}" in done.stdout

    device = (results / "device.txt").read_text()
    assert "backend: cpu" in device and "devices: 8 x cpu" in device

    suite = ElementTree.parse(results / "tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    assert int(suite.get("tests")) > 0
    assert int(suite.get("failures")) == int(suite.get("errors")) == 0

    overhead = json.loads((results / "overhead.json").read_text())
    assert overhead["steps"] == 5 and overhead["repeats"] == 1
    assert set(overhead["ms_per_step"]) == {"plain_sgd", "stale_K8", "stale_K1", "stale_K128"}
    summary = json.loads((results / "summary.json").read_text())
    assert summary["overhead"]["returncode"] == 0
    assert summary["overhead"]["result"] == overhead
    assert set(summary) == {"machine", "overhead"}  # --tiny runs the quickest benchmark only


def test_unknown_option_is_refused():
    done = _run("--huge", timeout=30)
    assert done.returncode == 2 and "unknown option --huge" in done.stderr


def test_run_all_refuses_arguments_for_an_unknown_benchmark(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "run_all.py"),
            "--results",
            str(tmp_path),
            "--args",
            "nosuch=--steps 1",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode != 0 and "NAME=ARGS" in done.stderr
