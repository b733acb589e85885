#!/usr/bin/env bash
# The ONE GPU script: on a machine with a CUDA GPU it builds the CUDA extension, runs the GPU
# tests and the GPU benchmarks, writes everything into OUT_DIR and prints a short table last.
#
#   bash scripts/gpu_check.sh OUT_DIR            # e.g. on the lent H100: bash scripts/gpu_check.sh $OUT
#
# Env: PYTHON (default python3: the interpreter that has torch), TORCH_CUDA_ARCH_LIST (default:
# the local GPU's arch), GPU_CHECK_SKIP_BENCH=1 to run the tests only, GPU_CHECK_TESTS (pytest
# selection, default all GPU tests). Results: OUT_DIR/summary.txt (the table), OUT_DIR/results.tgz
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

log "GPU tests"
"$PY" -m pytest -q -ra -m gpu ${GPU_CHECK_TESTS:-tests} -p no:cacheprovider --timeout=600 \
  --junitxml="$RES/gpu_tests.xml" 2>&1 | tee "$RES/gpu_tests.log"
test_rc=${PIPESTATUS[0]}
tests_line="$(tail -1 "$RES/gpu_tests.log")"

if [ "${GPU_CHECK_SKIP_BENCH:-0}" != 1 ]; then
  for b in perf/bench_ops.py perf/bench_block_attention.py perf/bench_ipc.py perf/bench_tokenweave.py; do
    [ -f "$b" ] || continue
    name="$(basename "$b" .py)"
    log "benchmark $b"
    "$PY" "$b" --out "$RES" 2>&1 | tee "$RES/$name.txt" | tail -60
  done
  # Issue 3: W=4 ranks on this one GPU (CUDA IPC + MPS) vs one cuDNN attention over the full
  # sequence, S=32k/128k, MHA/GQA, bf16 causal zigzag, fwd and fwd_bwd (~3 min on an H100).
  if [ -f perf/sweep.py ]; then
    log "sweep perf/sweep.py --preset issue3"
    timeout "${GPU_CHECK_SWEEP_TIMEOUT:-420}" "$PY" perf/sweep.py --preset issue3 --out "$RES" --no-progress 2>&1 \
      | tee "$RES/bench_sweep_issue3.txt" | tail -30
  fi
fi

tar czf "$OUT/results.tgz" -C "$OUT" results
{
  echo "== ringattn gpu_check $(date -u +%Y-%m-%dT%H:%MZ) =="
  echo "build: ${build_s}s for $TORCH_CUDA_ARCH_LIST; MPS: $mps_started"
  echo "tests: $tests_line"
  for f in "$RES"/bench_*.txt; do
    [ -f "$f" ] || continue
    echo "-- $(basename "$f" .txt) (last lines; full CSV/JSON in results.tgz)"
    tail -n "${GPU_CHECK_TABLE_LINES:-25}" "$f"
  done
} | tee "$OUT/summary.txt"
rm -rf "$RES"
exit "$test_rc"
