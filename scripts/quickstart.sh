#!/usr/bin/env bash
# The README's first command: builds pslab and runs the main job on a local
# cluster (a manager, 2 servers, 2 workers as separate processes on 127.0.0.1).
# Extra arguments go to `pslab local`, e.g. `scripts/quickstart.sh --workers 3`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
cargo build --release --locked --bin pslab
exec target/release/pslab local "$@"
