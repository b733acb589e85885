#!/usr/bin/env bash
# The README's main command: sets up .venv + ringattn._C, then runs the main job on 4 CPU
# ranks with torchrun (gloo). Extra args go to `python -m ringattn.demo`.
#   bash scripts/demo.sh [--seq 4096 ...]        NPROC=2 bash scripts/demo.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
exec "$ROOT/launch/torchrun.sh" "${NPROC:-4}" -m ringattn.demo "$@"
