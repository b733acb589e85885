#!/usr/bin/env bash
# The ONE GPU script: on a machine with a CUDA GPU it builds the CUDA extension, runs the GPU
# tests and the GPU benchmarks, writes everything into OUT_DIR and prints a short table last.
#
#   bash scripts/gpu_check.sh OUT_DIR            # e.g. on the lent H100/H200: bash scripts/gpu_check.sh $OUT
#   GPU_CHECK_DRY_RUN=1 bash scripts/gpu_check.sh /tmp/dry   # anywhere (no GPU): parse every command
#   bash scripts/gpu_check.sh --source-hash      # the hash GPU_CHECK_PREBUILT's stamp must hold
#
# Env: PYTHON (default python3: the interpreter that has torch; its own pip builds, nothing is
# downloaded), TORCH_CUDA_ARCH_LIST (default: the local GPU's arch), GPU_CHECK_SKIP_BENCH=1 to
# run the tests only, GPU_CHECK_SKIP_TESTS=1 the benchmarks only (a second call when the budget
# cut them), GPU_CHECK_TESTS (pytest selection, default all GPU tests, the never-yet-run ones first), GPU_CHECK_BUDGET_S
# (default 540: seconds for EVERYTHING, the build included, so that one 600 s device call ends
# with its table written; each step is capped, see run_step), GPU_CHECK_BUILD_CAP (default 300 s).
# GPU_CHECK_PREBUILT=FILE: a ringattn/_C.abi3.so built elsewhere for this machine's torch (e.g.
# carried in .carry/); it is used when FILE.sources.sha256 holds `--source-hash` of this checkout
# and it loads with CUDA kernels, else the extension is built here (a CUDA build takes minutes).
# scripts/prebuild_for_device.sh makes .carry/_C.abi3.so (+ stamp) for the lent machine's torch
# 2.11 / sm_90a on a GPU-less machine: carry [".carry"]; that file is the default prebuilt when
# present (GPU_CHECK_PREBUILT=none: build anyway).
# GPU_CHECK_STEPS: a comma list of step names to run, the rest skipped (e.g. "sweep peers" or
# "GPU tests,bench_tokenweave"; names as printed in the summary), for a second short call.
# GPU_CHECK_DRY_RUN=1: no build, no MPS; each step's command is checked instead of run (pytest
# --collect-only; the perf scripts parse their arguments and exit), to prove every command line
# matches its script's options.
# Results: OUT_DIR/summary.txt (the table), OUT_DIR/results.tgz (build and test logs + every
# benchmark's CSV/JSON). Exit code: non-zero when the build or a test failed or the tests did
# not run.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
src_hash() { bash "$ROOT/scripts/source_hash.sh"; }
if [ "${1:-}" = "--source-hash" ]; then src_hash; exit 0; fi

t_start=$(date +%s)  # the budget counts from here: the build is part of it
BUDGET_S="${GPU_CHECK_BUDGET_S:-540}"
DRY="${GPU_CHECK_DRY_RUN:-0}"
OUT="$(mkdir -p "${1:-${OUT:-$ROOT/perf/out/gpu}}" && cd "${1:-${OUT:-$ROOT/perf/out/gpu}}" && pwd)"
RES="$OUT/results"
mkdir -p "$RES"
PY="${PYTHON:-python3}"
# Imports find ringattn in this checkout in every process (pytest, spawned ranks, perf scripts).
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# Peer libraries carried from a machine with a package index (scripts/prebuild_for_device.sh), last.
if [ -d "$ROOT/.carry/peers" ]; then export PYTHONPATH="$PYTHONPATH:$ROOT/.carry/peers"; fi
# Stream memory waits (CudaIpcTransport) park a hardware work queue; streams beyond
# CUDA_DEVICE_MAX_CONNECTIONS (default 8) share queues, so give every stream its own.
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-32}"
log() { echo "[gpu_check $(date +%H:%M:%S)] $*"; }
left_s() { echo $(( BUDGET_S - ($(date +%s) - t_start) )); }

build_s=0 build_note="not built" mps_started=0 mps_note="off" test_rc=0
tests_line="skipped (GPU_CHECK_SKIP_TESTS=1)"
step_notes=()

finish() {  # finish EXIT_CODE: results.tgz + summary.txt (also after a failed build), then exit
  tar czf "$OUT/results.tgz" -C "$OUT" results
  {
    echo "== ringattn gpu_check $(date -u +%Y-%m-%dT%H:%MZ)$([ "$DRY" = 1 ] && echo ' DRY RUN') =="
    echo "build: ${build_s}s for ${TORCH_CUDA_ARCH_LIST:-?} ($build_note); MPS: $mps_note; CUDA_DEVICE_MAX_CONNECTIONS=$CUDA_DEVICE_MAX_CONNECTIONS"
    echo "tests: $tests_line"
    [ ${#step_notes[@]} -gt 0 ] && printf 'step: %s\n' "${step_notes[@]}"
    echo "total: $(( $(date +%s) - t_start ))s of a ${BUDGET_S}s budget"
    for f in "$RES"/cost_model_validation_*.txt; do  # the model vs this run, one line each
      [ -f "$f" ] || continue
      echo "-- $(basename "$f" .txt): $(grep -E 'median \|err\||fastest algorithm predicted' "$f" | tr '\n' ' ')"
    done
    for f in "$RES"/bench_*.txt; do
      [ -f "$f" ] || continue
      echo "-- $(basename "$f" .txt) (last lines; full CSV/JSON in results.tgz)"
      tail -n "${GPU_CHECK_TABLE_LINES:-25}" "$f"
    done
  } | tee "$OUT/summary.txt"
  rm -rf "$RES"
  exit "$1"
}

if [ "$DRY" = 1 ]; then
  echo "dry run on $(uname -n): no GPU used" | tee "$RES/device.txt"
else
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$RES/device.txt"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" | tee -a "$RES/device.txt"
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    TORCH_CUDA_ARCH_LIST="$("$PY" -c "import torch; c=torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}' + ('a' if c[0] == 9 else ''))")"
    export TORCH_CUDA_ARCH_LIST
  fi
fi

# ---- build (or a prebuilt extension) -------------------------------------------------------------
HAS_CUDA_OPS="import torch, ringattn; assert torch._C._dispatch_has_kernel_for_dispatch_key('ringattn::merge_attn_states_', 'CUDA'), 'ringattn._C was built without its CUDA kernels'"
export RINGATTN_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}"
if [ "$DRY" = 1 ]; then
  build_note="dry run"
else
  t0=$(date +%s)
  pre="${GPU_CHECK_PREBUILT:-}"
  # .carry/_C.abi3.so (scripts/prebuild_for_device.sh) is picked up without the variable too;
  # GPU_CHECK_PREBUILT=none forces the build here.
  if [ -z "$pre" ] && [ -f .carry/_C.abi3.so ]; then pre=.carry/_C.abi3.so; fi
  if [ "$pre" = none ]; then pre=""; fi
  if [ -n "$pre" ] && [ -f "$pre" ] && [ "$(cat "$pre.sources.sha256" 2>/dev/null)" = "$(src_hash)" ]; then
    cp "$pre" ringattn/_C.abi3.so
    if "$PY" -c "$HAS_CUDA_OPS" >"$RES/build.log" 2>&1; then build_note="prebuilt $pre"
    else log "prebuilt $pre does not load here; building"; rm -f ringattn/_C.abi3.so; pre=""; fi
  elif [ -n "$pre" ]; then
    log "prebuilt $pre missing or its sources stamp differs from this checkout; building"; pre=""
  fi
  if [ -z "$pre" ]; then
    cap="${GPU_CHECK_BUILD_CAP:-300}"; lim=$(left_s); [ "$cap" -lt "$lim" ] && lim=$cap
    log "building ringattn._C for $TORCH_CUDA_ARCH_LIST with $PY (limit ${lim}s)"
    if timeout --kill-after=10 "$lim" "$PY" -m pip install -q --no-build-isolation --no-deps --no-index -e . >"$RES/build.log" 2>&1 \
       && "$PY" -c "$HAS_CUDA_OPS" >>"$RES/build.log" 2>&1; then
      build_note="pip install -e"
    else
      tail -40 "$RES/build.log"; build_s=$(( $(date +%s) - t0 )); build_note="FAILED (results/build.log)"
      log "BUILD FAILED"; tests_line="not run (build failed)"; finish 1
    fi
  fi
  build_s=$(( $(date +%s) - t0 ))
  log "ringattn._C ready in ${build_s}s ($build_note)"
fi

# ---- MPS: ranks that share this one GPU run kernels concurrently (design.md) ----------------------
stop_mps() { if [ "$mps_started" = 1 ]; then echo quit | nvidia-cuda-mps-control; fi; }
trap stop_mps EXIT
if [ "$DRY" != 1 ] && command -v nvidia-cuda-mps-control >/dev/null 2>&1; then
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps CUDA_MPS_LOG_DIRECTORY=/tmp/mpslog
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  if nvidia-cuda-mps-control -d 2>"$RES/mps.log"; then mps_started=1; mps_note="on"
  elif [ -p "$CUDA_MPS_PIPE_DIRECTORY/control" ]; then mps_note="on (daemon already running)"
  else mps_note="off (nvidia-cuda-mps-control -d failed, results/mps.log)"; fi
  if [ "$mps_note" != "${mps_note#on}" ]; then
    # A client that cannot reach the MPS server gets no GPU at all: check one, else run without.
    if ! timeout 90 "$PY" -c "import torch; x = torch.ones(1, device='cuda'); torch.cuda.synchronize(); assert x.item() == 1" >>"$RES/mps.log" 2>&1; then
      stop_mps; mps_started=0; mps_note="off (a CUDA client failed under MPS, results/mps.log)"
    else
      # The tests run 4 clients at once, each with many streams: under MPS the clients share one
      # pool of hardware connections and CUDA_DEVICE_MAX_CONNECTIONS can cost clients (NVIDIA's MPS
      # docs). Start 4 such clients together; if one fails, fall back to 8 connections each.
      probe="import torch; ss = [torch.cuda.Stream() for _ in range(16)]; x = torch.ones(1, device='cuda')
for s in ss:
    with torch.cuda.stream(s): y = x * 2
torch.cuda.synchronize(); assert y.item() == 2"
      pids=(); for i in 1 2 3 4; do timeout 90 "$PY" -c "$probe" >>"$RES/mps.log" 2>&1 & pids+=($!); done
      ok=1; for p in "${pids[@]}"; do wait "$p" || ok=0; done
      if [ "$ok" = 0 ]; then
        export CUDA_DEVICE_MAX_CONNECTIONS=8
        mps_note="on (4 clients with 32 connections each failed: CUDA_DEVICE_MAX_CONNECTIONS=8, results/mps.log)"
      fi
    fi
  fi
  if [ "$mps_note" = "${mps_note#on}" ]; then unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY; fi
  log "MPS: $mps_note"
fi

# ---- steps under the budget ---------------------------------------------------------------------
# Every step runs under `timeout` (it signals the whole process group, spawned ranks too) with
# min(its cap, what is left of GPU_CHECK_BUDGET_S), in priority order (what has never run on a GPU
# first), so the whole script ends inside the budget and still writes its table; a step cut short
# says so in the summary.
ARGCHECK='import argparse, runpy, sys
_parse = argparse.ArgumentParser.parse_args
def parse_args(self, args=None, namespace=None):
    ns = _parse(self, args, namespace)
    print("arguments parse:", sys.argv[0], vars(ns))
    raise SystemExit(0)
argparse.ArgumentParser.parse_args = parse_args
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")'
run_step() {  # run_step NAME CAP_S LOGFILE CMD...
  local name="$1" cap="$2" logf="$3"; shift 3
  if [ -n "${GPU_CHECK_STEPS:-}" ] && [[ ",$GPU_CHECK_STEPS," != *",$name,"* ]]; then
    step_notes+=("$name: not selected (GPU_CHECK_STEPS)"); return 0
  fi
  local left; left=$(left_s)
  if [ "$left" -lt 20 ]; then step_notes+=("$name: SKIPPED (budget spent)"); log "skip $name (budget)"; return 0; fi
  local lim=$(( cap < left ? cap : left )) t0; t0=$(date +%s)
  local cmd=("$@") rc
  if [ "$DRY" = 1 ]; then
    if [ "${cmd[1]:-}" = "-m" ] && [ "${cmd[2]:-}" = "pytest" ]; then cmd+=(--collect-only -q)
    elif [[ "${cmd[1]:-}" == *.py ]]; then cmd=("${cmd[0]}" -c "$ARGCHECK" "${cmd[@]:1}"); fi
  fi
  log "$name (limit ${lim}s): ${*}"
  timeout --signal=TERM --kill-after=15 "$lim" "${cmd[@]}" 2>&1 | tee "$logf" | tail -40
  rc=${PIPESTATUS[0]}
  local took=$(( $(date +%s) - t0 ))
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then step_notes+=("$name: CUT at ${lim}s (partial results)")
  else step_notes+=("$name: rc=$rc in ${took}s"); fi
  return "$rc"
}

# Order: what never ran on a GPU first (IPC transport, sequence parallel over IPC, TokenWeave),
# then the op and block-attention tests that passed on the H100 on 2026-11-22, then the rest; a
# budget cut then loses the least new information.
first="tests/test_cuda_ipc.py tests/test_sequence_parallel.py tests/test_ulysses.py tests/test_sliding_window.py tests/test_documents.py tests/test_sinks.py tests/test_fused_allreduce_rmsnorm.py tests/test_tokenweave_layer.py tests/test_tokenweave_kv_cache.py tests/test_ops.py tests/test_block_attention.py"
DEFAULT_TESTS="$first $(for f in tests/test_*.py; do case " $first " in *" $f "*) ;; *) printf '%s ' "$f";; esac; done)"
if [ "${GPU_CHECK_SKIP_TESTS:-0}" != 1 ]; then
  # --timeout: pytest-timeout (in the image); each test's own deadlines sit below it.
  run_step "GPU tests" "${GPU_CHECK_TEST_CAP:-240}" "$RES/gpu_tests.log" \
    "$PY" -m pytest -q -ra -m gpu ${GPU_CHECK_TESTS:-$DEFAULT_TESTS} -p no:cacheprovider --timeout=180 \
    --junitxml="$RES/gpu_tests.xml"
  test_rc=$?
  if [ -f "$RES/gpu_tests.log" ] && [ "$DRY" = 1 ]; then
    tests_line="dry run: $(awk -F': ' '/^tests\/.*: [0-9]+$/ {n += $2} END {print n + 0}' "$RES/gpu_tests.log") GPU tests collected"
  elif [ -f "$RES/gpu_tests.log" ]; then
    tests_line="$(grep -E "passed|failed|error|selected|collected" "$RES/gpu_tests.log" | tail -1)"
  elif [ -n "${GPU_CHECK_STEPS:-}" ] && [[ ",$GPU_CHECK_STEPS," != *",GPU tests,"* ]]; then
    tests_line="not selected (GPU_CHECK_STEPS)"; test_rc=0
  else
    tests_line="NOT RUN (budget spent before the tests)"; test_rc=3
  fi
fi

if [ "${GPU_CHECK_SKIP_BENCH:-0}" != 1 ]; then
  # Issue 3: W=4 ranks on this one GPU (CUDA IPC + MPS) vs one cuDNN attention over the full
  # sequence, S=32k/128k, MHA/GQA, bf16 causal zigzag, fwd and fwd_bwd (~3 min on an H100).
  [ -f perf/sweep.py ] && run_step "sweep --preset issue3" "${GPU_CHECK_SWEEP_TIMEOUT:-200}" "$RES/bench_sweep_issue3.txt" \
    "$PY" perf/sweep.py --preset issue3 --out "$RES" --no-progress
  # The rest, most needed first: TokenWeave's kernels have never been measured on a GPU.
  # (bench_overhead: the per-call signature exchange on this host's CPUs, never measured off the 2-core VM)
  for spec in bench_tokenweave:90 bench_ops:60 bench_ipc:45 bench_block_attention:60 bench_documents:60 bench_decode:40 bench_overhead:40; do
    name="${spec%%:*}"; cap="${spec##*:}"
    [ -f "perf/$name.py" ] || continue
    run_step "$name" "$cap" "$RES/$name.txt" "$PY" "perf/$name.py" --out "$RES"
  done
  # Sliding windows (never measured on a GPU): W=4 on this GPU, 32k, GQA, window 4096 vs none,
  # contiguous; the windowed single baseline is ringattn's own one-process windowed attention.
  [ -f perf/sweep.py ] && run_step "sweep --windows" "${GPU_CHECK_WINDOW_TIMEOUT:-90}" "$RES/bench_sweep_windows.txt" \
    "$PY" perf/sweep.py --transport ipc --worlds 4 --seqs 32768 --heads 32/8 --head-dim 128 --dtype bfloat16 \
    --causal 1 --windows 0,4096 --layout contiguous --algorithms ring,token_ring,auto --pass fwd,fwd_bwd \
    --warmup 1 --iters 3 --overlap-iters 0 --out "$RES/windows" --no-progress
  # Peers on the same cuDNN kernel (perf/peers.py; never run on a GPU yet): ring-flash-attn's and
  # yunchang's zigzag rings, their messages over the same CUDA IPC transport, W=4, 32k, next to
  # the issue-3 rows in the same CSV (its table then shows ringattn and the peers side by side).
  if "$PY" -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('ring_flash_attn') and u.find_spec('yunchang') else 1)" 2>/dev/null; then
    [ -f perf/sweep.py ] && run_step "sweep peers" "${GPU_CHECK_PEERS_TIMEOUT:-90}" "$RES/bench_sweep_peers.txt" \
      "$PY" perf/sweep.py --transport ipc --worlds 4 --seqs 32768 --heads 32/32,32/8 --head-dim 128 --dtype bfloat16 \
      --causal 1 --layout zigzag --algorithms rfa,usp,ulysses --pass fwd,fwd_bwd --warmup 1 --iters 3 --overlap-iters 0 \
      --out "$RES" --no-progress
  else
    step_notes+=("sweep peers: SKIPPED (ring-flash-attn / yunchang not importable: carry .carry/peers)")
  fi
  # Cost model (issue 5; pure Python, seconds): refit the compute profile to THIS run's block and
  # merge benchmarks, and validate the model against this run's multi-rank sweep (W ranks on this
  # one GPU: the shared_gpu topology), with the shipped H100 fit (what auto uses) and with the refit.
  # A refit that worked is what RINGATTN_AUTO_PROFILE takes (docs/sequence_parallel.md).
  if [ "$DRY" = 1 ] || { [ -f "$RES/bench_block_attention.csv" ] && [ -f "$RES/ops.csv" ]; }; then
    run_step "cost model refit" 60 "$RES/cost_model_refit.txt" "$PY" perf/model.py calibrate \
      --block-csv "$RES/bench_block_attention.csv" --ops-csv "$RES/ops.csv" --out "$RES/cost_model_profile.json"
  else
    step_notes+=("cost model refit: SKIPPED (no bench_block_attention.csv / ops.csv from this run)")
  fi
  if [ "$DRY" = 1 ] || [ -f "$RES/sweep.csv" ]; then
    for prof in shipped refit; do
      pf="perf/results/2026-12-01_cost_model_h100_profile.json"
      [ "$prof" = refit ] && pf="$RES/cost_model_profile.json"
      [ "$DRY" = 1 ] || [ -f "$pf" ] || { step_notes+=("cost model validate ($prof): SKIPPED (no $pf)"); continue; }
      run_step "cost model validate ($prof)" 60 "$RES/cost_model_validation_$prof.txt" "$PY" perf/model.py validate \
        --sweep "$RES/sweep.csv" --profile "$pf" --topology shared_gpu --stat median \
        --out "$RES/cost_model_validation_$prof.csv" --out-md "$RES/cost_model_validation_$prof.md"
    done
  else
    step_notes+=("cost model validate: SKIPPED (no sweep.csv from this run)")
  fi
  # PNGs of what was measured, into results.tgz (best effort: matplotlib may be missing there).
  if [ "$DRY" != 1 ]; then
    for csvf in "$RES/sweep.csv" "$RES/windows/sweep.csv" "$RES/bench_tokenweave_fused.csv"; do
      [ -f "$csvf" ] && { "$PY" perf/plot.py "$csvf" --out "$RES" >/dev/null 2>&1 || log "no plot for $csvf"; }
    done
  fi
fi

finish "$test_rc"
