#!/usr/bin/env bash
# The ONE GPU script: on a machine with a CUDA GPU it builds the CUDA extension, runs the GPU
# tests and the GPU benchmarks, writes everything into OUT_DIR and prints a short table last.
#
#   bash scripts/gpu_check.sh OUT_DIR            # e.g. on the lent H100: bash scripts/gpu_check.sh $OUT
#
# Env: PYTHON (default python3: the interpreter that has torch), TORCH_CUDA_ARCH_LIST (default:
# the local GPU's arch), GPU_CHECK_SKIP_BENCH=1 to run the tests only, GPU_CHECK_SKIP_TESTS=1 the
# benchmarks only (a second call when the budget cut them), GPU_CHECK_TESTS (pytest
# selection, default all GPU tests), GPU_CHECK_BUDGET_S (default 480: seconds for everything after
# the build; each step is capped, see run_step). Results: OUT_DIR/summary.txt (the table), OUT_DIR/results.tgz
# (test log + every benchmark's CSV/JSON). Exit code: non-zero when a test failed.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(mkdir -p "${1:-${OUT:-$ROOT/perf/out/gpu}}" && cd "${1:-${OUT:-$ROOT/perf/out/gpu}}" && pwd)"
RES="$OUT/results"
mkdir -p "$RES"
cd "$ROOT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
log() { echo "[gpu_check $(date +%H:%M:%S)] $*"; }

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$RES/device.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" | tee -a "$RES/device.txt"

if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST="$("$PY" -c "import torch; c=torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}' + ('a' if c[0] == 9 else ''))")"
  export TORCH_CUDA_ARCH_LIST
fi
export RINGATTN_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}"
log "building ringattn._C for $TORCH_CUDA_ARCH_LIST"
t0=$(date +%s)
if ! "$PY" -m pip install -q --no-build-isolation --no-deps -e . >"$RES/build.log" 2>&1; then
  tail -40 "$RES/build.log"; log "BUILD FAILED"; exit 1
fi
build_s=$(( $(date +%s) - t0 ))
log "built in ${build_s}s"

# MPS lets ranks that share this one GPU run kernels concurrently (design.md).
export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps CUDA_MPS_LOG_DIRECTORY=/tmp/mpslog
mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
mps_started=0
if command -v nvidia-cuda-mps-control >/dev/null 2>&1 && nvidia-cuda-mps-control -d 2>/dev/null; then mps_started=1; fi
stop_mps() { [ "$mps_started" = 1 ] && echo quit | nvidia-cuda-mps-control; }
trap stop_mps EXIT

# Time budget: a lent GPU session has ~15 minutes of device time in all, one command at most 10.
# Every step after the build runs under `timeout` with min(its cap, what is left of
# GPU_CHECK_BUDGET_S), in priority order (what has never run on a GPU first), so the whole script
# ends inside the budget and still writes its table; a step cut short says so in the summary.
BUDGET_S="${GPU_CHECK_BUDGET_S:-480}"
t_start=$(date +%s)
step_notes=()
run_step() {  # run_step NAME CAP_S LOGFILE CMD...
  local name="$1" cap="$2" logf="$3"; shift 3
  local left=$(( BUDGET_S - ($(date +%s) - t_start) ))
  if [ "$left" -lt 20 ]; then step_notes+=("$name: SKIPPED (budget spent)"); log "skip $name (budget)"; return 0; fi
  local lim=$(( cap < left ? cap : left )) t0=$(date +%s) rc
  log "$name (limit ${lim}s)"
  timeout --signal=TERM --kill-after=15 "$lim" "$@" 2>&1 | tee "$logf" | tail -40
  rc=${PIPESTATUS[0]}
  local took=$(( $(date +%s) - t0 ))
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then step_notes+=("$name: CUT at ${lim}s (partial results)")
  else step_notes+=("$name: rc=$rc in ${took}s"); fi
  return "$rc"
}

test_rc=0 tests_line="skipped (GPU_CHECK_SKIP_TESTS=1)"
if [ "${GPU_CHECK_SKIP_TESTS:-0}" != 1 ]; then
  run_step "GPU tests" "${GPU_CHECK_TEST_CAP:-240}" "$RES/gpu_tests.log" \
    "$PY" -m pytest -q -ra -m gpu ${GPU_CHECK_TESTS:-tests} -p no:cacheprovider --timeout=180 \
    --junitxml="$RES/gpu_tests.xml"
  test_rc=$?
  tests_line="$(grep -E "passed|failed|error" "$RES/gpu_tests.log" | tail -1)"
fi

if [ "${GPU_CHECK_SKIP_BENCH:-0}" != 1 ]; then
  # Issue 3: W=4 ranks on this one GPU (CUDA IPC + MPS) vs one cuDNN attention over the full
  # sequence, S=32k/128k, MHA/GQA, bf16 causal zigzag, fwd and fwd_bwd (~3 min on an H100).
  [ -f perf/sweep.py ] && run_step "sweep --preset issue3" "${GPU_CHECK_SWEEP_TIMEOUT:-200}" "$RES/bench_sweep_issue3.txt" \
    "$PY" perf/sweep.py --preset issue3 --out "$RES" --no-progress
  # The rest, most needed first: TokenWeave's kernels have never been measured on a GPU.
  for spec in bench_tokenweave:90 bench_ops:60 bench_ipc:45 bench_block_attention:60; do
    name="${spec%%:*}"; cap="${spec##*:}"
    [ -f "perf/$name.py" ] || continue
    run_step "$name" "$cap" "$RES/$name.txt" "$PY" "perf/$name.py" --out "$RES"
  done
  # PNGs of what was measured, into results.tgz (best effort: matplotlib may be missing there).
  for csvf in "$RES/sweep.csv" "$RES/bench_tokenweave_fused.csv"; do
    [ -f "$csvf" ] && { "$PY" perf/plot.py "$csvf" --out "$RES" >/dev/null 2>&1 || log "no plot for $csvf"; }
  done
fi

tar czf "$OUT/results.tgz" -C "$OUT" results
{
  echo "== ringattn gpu_check $(date -u +%Y-%m-%dT%H:%MZ) =="
  echo "build: ${build_s}s for $TORCH_CUDA_ARCH_LIST; MPS: $mps_started"
  echo "tests: $tests_line"
  printf 'step: %s\n' "${step_notes[@]}"
  for f in "$RES"/bench_*.txt; do
    [ -f "$f" ] || continue
    echo "-- $(basename "$f" .txt) (last lines; full CSV/JSON in results.tgz)"
    tail -n "${GPU_CHECK_TABLE_LINES:-25}" "$f"
  done
} | tee "$OUT/summary.txt"
rm -rf "$RES"
exit "$test_rc"
