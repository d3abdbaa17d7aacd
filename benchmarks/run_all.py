"""Runs every benchmark (small sizes with --quick) and writes benchmarks/results/summary.json.

Usage: python benchmarks/run_all.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).parent
RESULTS = HERE / "results"
BENCHMARKS = ["overhead", "workers", "devices", "seeds", "hogwild", "sdde_validation"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes")
    parser.add_argument("--only", nargs="*", default=None, help="names to run")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    summary = {"machine": {"platform": platform.platform(), "python": sys.version.split()[0]}}
    failed = []
    for name in args.only or BENCHMARKS:
        script = HERE / f"{name}.py"
        if not script.exists():
            print(f"== {name}: missing, skipped")
            continue
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        cmd = [sys.executable, str(script)] + (["--quick"] if args.quick else [])
        rc = subprocess.call(cmd)
        entry = {"returncode": rc, "seconds": round(time.perf_counter() - start, 1)}
        result = RESULTS / f"{name}.json"
        if rc == 0 and result.exists():
            entry["result"] = json.loads(result.read_text())
        else:
            failed.append(name)
        summary[name] = entry
    (RESULTS / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"summary written to {RESULTS / 'summary.json'}")
    if failed:
        print(f"failed: {', '.join(failed)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
