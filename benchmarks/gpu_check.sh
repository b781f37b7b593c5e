#!/usr/bin/env bash
# One GPU check for Signal: the whole test suite on CUDA (GPU-only tests included), then the kernel benchmarks.
# Prints a short table; writes the pytest log/junit, the environment and the benchmark JSON/markdown under
# $OUT (if set) or benchmarks/results/gpu_check-<UTC time>/.
#
#   bash benchmarks/gpu_check.sh               # full run on a CUDA machine (budget: ~8 min on one H100)
#   bash benchmarks/gpu_check.sh --dry-run     # CPU sanity run: collects the tests, runs the benchmark cases on tiny
#                                              # shapes in the Triton interpreter (timings meaningless)
#   bash benchmarks/gpu_check.sh --skip-tests  # benchmarks only;  --skip-bench: tests only
#   bash benchmarks/gpu_check.sh --suite       # also the benchmark suite's GPU preset (python -m benchmarks --preset gpu,
#                                              # ~5.5 min more: with the tests, more than one 10-minute call can hold)
#   bash benchmarks/gpu_check.sh --quick       # fewer benchmark shapes;  --only <substr>: matching cases only
#
# Peers: Liger-Kernel and Cut Cross-Entropy wheels found in .whl/ (`make peer-wheels` downloads them on a machine
# with network) are installed into a temporary directory first, so a GPU machine without network benchmarks them too.
# Environment: PYTHON (default .venv/bin/python if it imports torch, else python3), TEST_TIMEOUT (s, default 300),
# BENCH_TIMEOUT (s, default 240), SUITE_TIMEOUT (s, default 360), PYTEST_ARGS (extra pytest arguments), WORKERS
# (pytest-xdist processes when it is installed, default 8: the suite is CPU-bound between kernels, and a worker that
# crashes fails its test instead of ending the run; 0 runs in one process, kernel tests first).
# Adding a benchmark case: a function `bench_<name>(ctx) -> list[dict]` in the CASES of benchmarks/gpu_logprobs.py or
# of a benchmarks/gpu_<family>.py that gpu_logprobs.main lists (see the docstring of benchmarks/gpu_logprobs.py).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0 SKIP_TESTS=0 SKIP_BENCH=0 SUITE=0
BENCH_ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --skip-tests) SKIP_TESTS=1 ;;
    --skip-bench) SKIP_BENCH=1 ;;
    --suite) SUITE=1 ;;
    --quick) BENCH_ARGS+=(--quick) ;;
    --only) BENCH_ARGS+=(--only "$2"); shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" 2>/dev/null; then PYTHON=.venv/bin/python
  else PYTHON=python3; fi
fi
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
DIR="${OUT:-benchmarks/results/gpu_check-$STAMP}"
mkdir -p "$DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)

if compgen -G ".whl/*.whl" > /dev/null; then
  PEER_SITE=$(mktemp -d /tmp/signal-peers.XXXXXX)
  trap 'rm -rf "$PEER_SITE"' EXIT
  if $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$PEER_SITE" .whl/*.whl; then
    # after the repo (never shadows signalrl), before site-packages: these versions win over installed ones
    export PYTHONPATH="$PYTHONPATH:$PEER_SITE"
    echo "peers: installed $(cd .whl && ls *.whl | tr '\n' ' ')"
  else
    echo "peers: could not install the wheels in .whl/ (benchmarks run without them)" >&2
  fi
fi

{
  echo "date_utc: $(date -u '+%Y-%m-%d %H:%M:%S')"
  echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
  echo "python: $PYTHON ($($PYTHON -c 'import sys; print(sys.version.split()[0])'))"
  $PYTHON - <<'EOF'
import torch
print("torch:", torch.__version__, "cuda:", torch.version.cuda)
try:
    import triton
    print("triton:", triton.__version__)
except ImportError:
    print("triton: not installed")
from importlib.metadata import PackageNotFoundError, version
for name in ("liger_kernel", "cut_cross_entropy", "transformers", "peft"):
    try:
        print(f"{name}:", version(name.replace("_", "-")))
    except PackageNotFoundError:
        print(f"{name}: not installed")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device:", p.name, f"({p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor})")
else:
    print("device: none (CPU only)")
EOF
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  echo "c++: $(${CXX:-c++} --version 2>/dev/null | head -n 1)"
  # A C++ argument check must come back as a RuntimeError: on one H200 image (torch 2.11+cu130) it ended the process
  # with SIGSEGV instead. A child process probes it, so a crash is reported here rather than met mid-suite.
  $PYTHON - <<'EOF'
import subprocess, sys
probe = ("import torch, signalrl.native as n; n._load()\n"
         "try:\n    torch.ops.signalrl.linear_token_logprobs_kept_fwd(torch.randn(5, 8), torch.randn(30, 8), None, "
         "torch.zeros(5, dtype=torch.long), 1.0, -100, False, 31)\n"
         "except RuntimeError as e:\n    print('raises RuntimeError:', str(e).splitlines()[0][:80])\n")
aten = ("import torch\ntry:\n    torch.mm(torch.ones(2, 3), torch.ones(4, 5))\n"
        "except RuntimeError as e:\n    print('raises RuntimeError:', str(e).splitlines()[0][:80])\n")
for what, code in (("aten", aten), ("native", probe)):  # torch's own C++ checks, then the extension's
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    out = p.stdout.strip() or (p.stderr.strip().splitlines() or [""])[-1][:200]
    print(f"{what} error path:", out if p.returncode == 0 else f"exit {p.returncode} ({out})")
EOF
} > "$DIR/env.txt" 2>&1
cat "$DIR/env.txt"

if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1
  BENCH_ARGS+=(--dry-run)
elif ! $PYTHON -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check.sh: no CUDA device visible to $PYTHON (use --dry-run for a CPU sanity run)" >&2
  exit 2
fi

# The kernel tests first, so a run cut short by TEST_TIMEOUT has covered what only a GPU can check; then the rest.
FIRST="tests/gpu tests/kernels tests/ops tests/losses"
TEST_PATHS=""
for p in $FIRST; do [ -e "$p" ] && TEST_PATHS="$TEST_PATHS $p"; done
for p in tests/*; do
  case " $FIRST " in *" $p "*) continue ;; esac
  case "$(basename "$p")" in _*|.*) continue ;; esac
  if [ -d "$p" ] || [[ "$(basename "$p")" == test_*.py ]]; then TEST_PATHS="$TEST_PATHS $p"; fi
done

TEST_STATUS="skipped"
if [ "$SKIP_TESTS" = 0 ]; then
  echo; echo "== pytest (all tests, GPU-only included) =="
  if [ "$DRY" = 1 ]; then
    # no GPU: only check that every test module (the GPU-only ones too) imports and collects
    $PYTHON -m pytest $TEST_PATHS -m "gpu or not gpu" --collect-only -q -p no:cacheprovider > "$DIR/pytest.log" 2>&1
  else
    # SIGINT on timeout: pytest still prints its summary and writes the junit file
    export SIGNAL_GPU_REPORT="$DIR/gpu_test_figures.txt"
    : > "$SIGNAL_GPU_REPORT"
    XDIST=()
    if [ "${WORKERS:-8}" != 0 ] && $PYTHON -c "import xdist" 2>/dev/null; then XDIST=(-n "${WORKERS:-8}"); fi
    timeout -s INT -k 30 "${TEST_TIMEOUT:-300}" $PYTHON -m pytest $TEST_PATHS -m "gpu or not gpu" -q -rfEs \
      -p no:cacheprovider --junitxml="$DIR/pytest.xml" ${XDIST[@]+"${XDIST[@]}"} ${PYTEST_ARGS:-} \
      > "$DIR/pytest.log" 2>&1
  fi
  rc=$?
  tail -n 25 "$DIR/pytest.log"
  TEST_STATUS="$(grep -E '(passed|failed|error|no tests ran|tests collected)' "$DIR/pytest.log" | tail -n 1) (exit $rc)"
fi

BENCH_STATUS="skipped"
if [ "$SKIP_BENCH" = 0 ]; then
  echo; echo "== kernel benchmarks =="
  timeout -s INT -k 30 "${BENCH_TIMEOUT:-240}" $PYTHON -m benchmarks.gpu_logprobs --out "$DIR" ${BENCH_ARGS[@]+"${BENCH_ARGS[@]}"} \
    2> "$DIR/bench.stderr"
  rc=$?
  tail -n 5 "$DIR/bench.stderr"
  BENCH_STATUS="exit $rc"
fi

if [ -s "$DIR/gpu_test_figures.txt" ]; then
  echo; echo "== figures measured by the GPU-only tests =="
  cat "$DIR/gpu_test_figures.txt"
fi

SUITE_STATUS="skipped (--suite runs it)"
if [ "$SUITE" = 1 ]; then
  echo; echo "== benchmark suite, GPU preset =="
  SUITE_ARGS=(--preset gpu)
  [ "$DRY" = 1 ] && SUITE_ARGS=(--quick)
  timeout -s INT -k 30 "${SUITE_TIMEOUT:-360}" $PYTHON -m benchmarks "${SUITE_ARGS[@]}" --no-progress --out "$DIR/bench" \
    2> "$DIR/suite.stderr" | tail -n 40
  SUITE_STATUS="exit ${PIPESTATUS[0]} ($DIR/bench)"
fi

echo
echo "== summary =="
echo "tests:      $TEST_STATUS"
echo "benchmarks: $BENCH_STATUS"
echo "suite:      $SUITE_STATUS"
echo "results:    $DIR   (wall $(( $(date +%s) - START )) s)"
