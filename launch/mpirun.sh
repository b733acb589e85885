#!/usr/bin/env bash
# mpirun entry: launch/mpirun.sh NP -m ringattn.demo [args...]
# Ranks come from MPI; ringattn.distributed.init_distributed() broadcasts rank 0's address
# over mpi4py and joins a tcp:// rendezvous (no torchrun needed). Needs mpi4py + an MPI.
set -euo pipefail
NP="${1:?usage: launch/mpirun.sh NP [-m module | script.py] [args...]}"; shift
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
extra=()
[ "$(id -u)" = 0 ] && extra+=(--allow-run-as-root)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec mpirun -n "$NP" --oversubscribe "${extra[@]}" -x OMP_NUM_THREADS -x PATH -x PYTHONPATH "$PY" "$@"
