#!/usr/bin/env bash
# torchrun entry: launch/torchrun.sh NPROC -m ringattn.demo [args...]
#   or:           launch/torchrun.sh NPROC path/to/script.py [args...]
# Every process calls ringattn.distributed.init_distributed(), which reads torchrun's env.
set -euo pipefail
NPROC="${1:?usage: launch/torchrun.sh NPROC [-m module | script.py] [args...]}"; shift
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" "$@"
