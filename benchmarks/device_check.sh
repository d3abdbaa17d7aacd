#!/usr/bin/env bash
# The accelerator check: on whatever machine it runs (a GPU, or a CPU unchanged), it
#   1. prints the devices JAX sees (jax.devices()) into device.txt;
#   2. runs the transforms / parallel / train tests on them (on an accelerator with
#      ASGD_JAX_TEST_DEVICES=native, so tests/conftest.py does not force 8 CPU devices),
#      writing tests.txt and tests.xml (JUnit);
#   3. runs the overhead, seeds, sweep, devices and hogwild (threads) benchmarks with --quick
#      through benchmarks/run_all.py, writing their JSON and summary.json;
# all into one results folder, whose path it prints. It keeps going when a step fails and
# exits non-zero if any did. Sized to finish in under 8 minutes on a GPU machine: each step
# has a time limit (TEST_TIMEOUT, BENCH_TIMEOUT seconds).
#
# Usage: benchmarks/device_check.sh [--tiny] [RESULTS_DIR]
#   --tiny         one fast test selection and the quickest benchmark at its smallest size
#                  (what tests/test_device_check.py runs on CPU, well under a minute)
#   RESULTS_DIR    default benchmarks/results/device_check-<UTC time>
# Environment: PYTHON (default .venv/bin/python if present, else python3).

set -uo pipefail

tiny=0
results=""
for arg in "$@"; do
  case "$arg" in
    --tiny) tiny=1 ;;
    -h | --help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "device_check.sh: unknown option $arg (try --help)" >&2; exit 2 ;;
    *) results="$arg" ;;
  esac
done

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root" || exit 2
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
results="${results:-benchmarks/results/device_check-$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$results" || exit 2
export PYTHONUNBUFFERED=1
# This checkout's package, installed or not.
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"

if ((tiny)); then
  tests=(tests/test_transforms.py -k delay_zero_model_with_history)
  benchmarks=(--only overhead --args "overhead=--steps 5 --repeats 1")
  test_timeout=${TEST_TIMEOUT:-120}
  bench_timeout=${BENCH_TIMEOUT:-90}
else
  tests=(tests/test_transforms.py tests/test_parallel.py tests/test_train.py)
  benchmarks=(--only overhead seeds sweep devices hogwild --args "hogwild=--no-ray")
  test_timeout=${TEST_TIMEOUT:-240}
  bench_timeout=${BENCH_TIMEOUT:-120}
fi

failed=()
start=$SECONDS

echo "== devices"
if ! "$PYTHON" -c 'import jax; print("jax", jax.__version__, "| backend:", jax.default_backend()); print("devices:", jax.device_count(), "x", jax.devices()[0].device_kind); print(jax.devices())' \
  2>&1 | tee "$results/device.txt"; then
  failed+=(devices)
fi
backend="$(sed -n 's/.*| backend: //p' "$results/device.txt")"
if [[ -n "$backend" && "$backend" != cpu ]]; then
  export ASGD_JAX_TEST_DEVICES=native
fi

echo "== tests (${ASGD_JAX_TEST_DEVICES:-8 virtual CPU devices}): ${tests[*]}"
timeout -k 10 "$test_timeout" "$PYTHON" -m pytest -q -p no:cacheprovider "${tests[@]}" \
  --junitxml="$results/tests.xml" 2>&1 | tee "$results/tests.txt"
(("${PIPESTATUS[0]}" == 0)) || failed+=(tests)

echo "== benchmarks"
"$PYTHON" benchmarks/run_all.py --quick "${benchmarks[@]}" --results "$results" \
  --timeout "$bench_timeout" || failed+=(benchmarks)

echo "== done in $((SECONDS - start)) s; results in $results"
if ((${#failed[@]})); then
  echo "failed: ${failed[*]}"
  exit 1
fi
