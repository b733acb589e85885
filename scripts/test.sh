#!/usr/bin/env bash
# The README's test command: sets up .venv, builds ringattn._C, runs the CPU test suite
# (multi-rank tests spawn real gloo processes; GPU tests skip without a GPU).
#   bash scripts/test.sh [pytest args...]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec .venv/bin/python -m pytest -q -ra "$@"
