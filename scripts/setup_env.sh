#!/usr/bin/env bash
# Creates ./.venv (if missing) with torch and ringattn's dependencies, then (re)builds ringattn._C.
# Sourced by scripts/test.sh, scripts/demo.sh and .ci/run; safe to run repeatedly (ninja rebuilds
# only what changed).
#   RINGATTN_TORCH   torch requirement to install (default torch==2.14.1: a CUDA 13 build, so the
#                    CUDA kernels compile even on a machine without a GPU; any torch>=2.11 works)
#   RINGATTN_CUDA    auto|0|1 (see setup.py)
#   RINGATTN_SETUP_INSTALL_ONLY=1  install the packages, skip the build (.ci/run starts a second
#                    environment's downloads this way while the first one builds and tests)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
VPY="$ROOT/.venv/bin/python"
pip_q() { "$VPY" -m pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing ${RINGATTN_TORCH:-torch==2.14.1} (from local disk where available)"
  pip_q "${RINGATTN_TORCH:-torch==2.14.1}"
fi
"$VPY" -c "import torch" || { echo "[setup] torch failed to install"; exit 1; }
need=()
for mod in numpy pytest pytest_timeout ninja setuptools wheel tqdm matplotlib; do
  "$VPY" -c "import $mod" >/dev/null 2>&1 || need+=("${mod//_/-}")
done
if command -v mpirun >/dev/null 2>&1 && ! "$VPY" -c "import mpi4py" >/dev/null 2>&1; then need+=(mpi4py); fi
for mod in transformers deepspeed; do
  "$VPY" -c "import $mod" >/dev/null 2>&1 || need+=("$mod")
done
if [ ${#need[@]} -gt 0 ]; then
  TV=$("$VPY" -c "import torch; print(torch.__version__.split('+')[0])")
  need=("${need[@]/transformers/transformers==5.23.0}"); need=("${need[@]/deepspeed/deepspeed==0.19.8}")
  need+=("torch==$TV")  # pin: never let a dependency replace the installed torch
  echo "[setup] installing ${need[*]}"
  pip_q "${need[@]}"
fi
# The peer libraries perf/peers.py measures next to ringattn (pure Python, ~1 MB): --no-deps, since
# their flash-attn kernel cannot be built here (perf/flash_attn_shim stands in for it).
if ! "$VPY" -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('ring_flash_attn') and u.find_spec('yunchang') else 1)"; then
  echo "[setup] installing ring-flash-attn==0.1.8 yunchang==0.6.4 (--no-deps)"
  pip_q --no-deps ring-flash-attn==0.1.8 yunchang==0.6.4
fi
if [ "${RINGATTN_SETUP_INSTALL_ONLY:-0}" = 1 ]; then
  echo "[setup] packages installed (RINGATTN_SETUP_INSTALL_ONLY=1: ringattn._C not built)"
  exit 0
fi
# Skip the (minutes-long with CUDA) build when sources and switches are unchanged since the last one.
stamp="$( (echo "${RINGATTN_CUDA:-auto} ${TORCH_CUDA_ARCH_LIST:-}"; bash scripts/source_hash.sh) | sha256sum | cut -d' ' -f1)"
if [ -f .venv/ringattn_build.stamp ] && [ "$(cat .venv/ringattn_build.stamp)" = "$stamp" ] && ls ringattn/_C*.so >/dev/null 2>&1 \
   && "$VPY" -c "import ringattn" >/dev/null 2>&1; then
  echo "[setup] ringattn._C up to date"
  exit 0
fi
echo "[setup] building ringattn._C (RINGATTN_CUDA=${RINGATTN_CUDA:-auto})"
start=$(date +%s)
if ! "$VPY" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e . >.venv/build.log 2>&1; then
  grep -v "^WARNING: Location" .venv/build.log | tail -40
  echo "[setup] build FAILED (full log: .venv/build.log)"
  exit 1
fi
grep -E "ringattn: " .venv/build.log || true
echo "$stamp" > .venv/ringattn_build.stamp
echo "[setup] build done in $(( $(date +%s) - start )) s"
