#!/usr/bin/env bash
# DeepSpeed launcher entry: launch/deepspeed.sh NPROC [ringattn.demo args...]
#   launch/deepspeed.sh 4 --deepspeed 1          # 4 ranks, ZeRO-1 engine (CPU: gloo; GPUs: NCCL)
#   MODULE=my.module launch/deepspeed.sh 2 ...   # another module
# The `deepspeed` launcher sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT, so
# ringattn.distributed.init_distributed() takes its torchrun path. --no_local_rank: the demo reads
# LOCAL_RANK from the environment instead of a --local_rank argument. Needs
# `pip install 'ringattn[deepspeed]'` (deepspeed). On a CPU-only machine DeepSpeed picks its CPU
# accelerator and falls back to gloo when oneCCL is absent (its first start JIT-compiles a small
# shared-memory op with the host C++ compiler, cached under ~/.cache/torch_extensions).
set -euo pipefail
NPROC="${1:?usage: launch/deepspeed.sh NPROC [args for python -m \$MODULE...]}"; shift
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
"$PY" -c "import deepspeed" 2>/dev/null || { echo "launch/deepspeed.sh: deepspeed is not installed: pip install 'ringattn[deepspeed]'" >&2; exit 2; }
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export RINGATTN_DEMO_LAUNCHER=deepspeed  # the demo prints it (it sees torchrun-style env)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT"
exec "$PY" -m deepspeed.launcher.runner --num_gpus "$NPROC" --master_port "${MASTER_PORT:-$("$PY" -c 'import socket; s=socket.socket(); s.bind(("",0)); print(s.getsockname()[1])')}" \
  --no_local_rank --module "${MODULE:-ringattn.demo}" "$@"
