#!/usr/bin/env bash
# sha256 of what the ringattn._C build reads (setup.py and csrc/): the one definition behind
# setup_env.sh's rebuild stamp and gpu_check.sh's prebuilt-extension check (--source-hash).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
(cat setup.py; find csrc -type f | LC_ALL=C sort | xargs cat) | sha256sum | cut -d' ' -f1
