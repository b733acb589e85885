#!/usr/bin/env bash
# Build ringattn/_C.abi3.so WITH its CUDA kernels here (nvcc, no GPU needed) for the lent GPU
# machine's torch, so that scripts/gpu_check.sh spends none of the device budget on the build:
#
#   bash scripts/prebuild_for_device.sh         # writes .carry/_C.abi3.so + .carry/_C.abi3.so.sources.sha256
#                                               # and .carry/peers (ring-flash-attn, yunchang: pure Python)
#   then, with the device tool: carry [".carry"], command
#     bash scripts/gpu_check.sh $OUT     (it takes .carry/_C.abi3.so when present)
#
# gpu_check uses the prebuilt only when its stamp equals this checkout's `--source-hash` and it
# loads there with its CUDA kernels; otherwise it builds on the device as before (nothing lost).
# The extension is abi3 (Python >= 3.9), so a build under this machine's Python serves the
# device's; it must match the device's torch exactly (C++ ABI).
# Env: DEVICE_TORCH (default torch==2.11.0: the GPU machine's torch, a CUDA 13 wheel from PyPI,
# ~3.5 GB, a few minutes the first time), TORCH_CUDA_ARCH_LIST (default 9.0a: Hopper, H100/H200),
# PREBUILD_DIR (default /tmp/ringattn-prebuild: a copy of the tracked tree with its own .venv,
# kept between runs so a rebuild takes only the compile), MAX_JOBS (default: the cores).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DIR="${PREBUILD_DIR:-/tmp/ringattn-prebuild}"
ARCH="${TORCH_CUDA_ARCH_LIST:-9.0a}"
mkdir -p "$DIR"
# A fresh copy of the tracked sources (the .venv inside DIR survives).
(cd "$DIR" && find . -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {} +)
git ls-files -z | xargs -0 cp --parents -t "$DIR"
start=$(date +%s)
(cd "$DIR" && RINGATTN_TORCH="${DEVICE_TORCH:-torch==2.11.0}" RINGATTN_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" \
   MAX_JOBS="${MAX_JOBS:-$(nproc)}" bash scripts/setup_env.sh)
so="$DIR/ringattn/_C.abi3.so"
"$DIR/.venv/bin/python" - "$so" <<'EOF'
import sys, torch
sys.path.insert(0, sys.argv[1].rsplit("/ringattn/", 1)[0])
import ringattn  # noqa: F401  (loads the extension)
assert torch._C._dispatch_has_kernel_for_dispatch_key("ringattn::merge_attn_states_", "CUDA"), \
    "the build has no CUDA kernels (is nvcc on PATH? see the setup log above)"
print("[prebuild] torch", torch.__version__, "- CUDA kernels registered")
EOF
mkdir -p .carry
cp "$so" .carry/_C.abi3.so
# The peer libraries the GPU sweep compares with (perf/peers.py): pure Python, and the device
# reaches no package index, so they travel in .carry/peers (gpu_check puts it on PYTHONPATH).
rm -rf .carry/peers
"$DIR/.venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps --target .carry/peers \
  ring-flash-attn==0.1.8 yunchang==0.6.4 2>&1 | grep -v "^WARNING: Location" || true
bash scripts/gpu_check.sh --source-hash > .carry/_C.abi3.so.sources.sha256
echo "[prebuild] .carry/_C.abi3.so for TORCH_CUDA_ARCH_LIST=$ARCH, $(du -h .carry/_C.abi3.so | cut -f1)," \
     "sources $(cut -c1-12 .carry/_C.abi3.so.sources.sha256), in $(( $(date +%s) - start )) s"
