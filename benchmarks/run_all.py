"""Runs every benchmark (small sizes with --quick) and writes a summary.json of their results.

Each benchmark writes its JSON; this collects them into ``--results`` (default
``benchmarks/results``) as ``<name>.json`` plus ``summary.json`` (return code, seconds and
result of each). A benchmark that takes ``--output`` writes straight there; for the others
the file they write under ``benchmarks/results`` is copied. A benchmark that fails, or runs
past ``--timeout`` seconds, is marked failed and the rest still run.

Usage: python benchmarks/run_all.py [--quick] [--only NAME ...] [--results DIR]
                                    [--timeout S] [--args NAME=ARGS ...]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import shlex
import shutil
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).parent
RESULTS = HERE / "results"
BENCHMARKS = ["overhead", "workers", "devices", "seeds", "sweep", "torch_loop", "hogwild"]
BENCHMARKS += ["sdde_validation"]


def _extra_args(pairs: list[str]) -> dict[str, list[str]]:
    extra: dict[str, list[str]] = {}
    for pair in pairs:
        name, sep, args = pair.partition("=")
        if not sep or name not in BENCHMARKS:
            raise SystemExit(f"--args takes NAME=ARGS with NAME in {BENCHMARKS}, got {pair!r}")
        extra.setdefault(name, []).extend(shlex.split(args))
    return extra


def _run(name: str, args: argparse.Namespace, extra: list[str]) -> tuple[dict, dict | None]:
    """Runs one benchmark; returns its summary entry and its parsed JSON (None if failed)."""
    script = HERE / f"{name}.py"
    target = args.results / f"{name}.json"
    cmd = [sys.executable, str(script)] + (["--quick"] if args.quick else []) + extra
    takes_output = '"--output"' in script.read_text()
    if takes_output:
        cmd += ["--output", str(target)]
    start = time.time()
    try:
        rc = subprocess.call(cmd, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        rc = "timeout"
    entry: dict = {"returncode": rc, "seconds": round(time.time() - start, 1)}
    written = target if takes_output else RESULTS / f"{name}.json"
    fresh = written.exists() and written.stat().st_mtime >= start - 1
    if rc != 0 or not fresh:
        return entry, None
    if written != target:
        shutil.copyfile(written, target)
    return entry, json.loads(target.read_text())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes")
    parser.add_argument("--only", nargs="*", default=None, help="names to run")
    parser.add_argument(
        "--results", type=pathlib.Path, default=RESULTS, help="folder for the JSON files"
    )
    parser.add_argument("--timeout", type=float, default=None, help="seconds per benchmark")
    parser.add_argument(
        "--args",
        action="append",
        default=[],
        metavar="NAME=ARGS",
        help="extra arguments for one benchmark, e.g. overhead='--steps 5 --repeats 1'",
    )
    args = parser.parse_args()
    extra = _extra_args(args.args)
    args.results.mkdir(parents=True, exist_ok=True)
    summary = {"machine": {"platform": platform.platform(), "python": sys.version.split()[0]}}
    failed = []
    for name in args.only or BENCHMARKS:
        if not (HERE / f"{name}.py").exists():
            print(f"== {name}: missing, skipped")
            continue
        print(f"== {name}", flush=True)
        entry, result = _run(name, args, extra.get(name, []))
        if result is None:
            failed.append(name)
        else:
            entry["result"] = result
        summary[name] = entry
    (args.results / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"summary written to {args.results / 'summary.json'}")
    if failed:
        print(f"failed: {', '.join(failed)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
