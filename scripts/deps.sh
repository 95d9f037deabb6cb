#!/usr/bin/env bash
# Installs what building, running and testing pslab need on Debian/Ubuntu, and
# nothing else. Safe to run again: it installs only what is missing.
#   - a Rust toolchain (cargo): from rustup if absent
#   - fonts-dejavu-core: the font the PNG plots draw text with
#   - libhwloc-dev, libudev-dev, pkg-config: hwloc, which places shard threads
#     near the RDMA device (the hwlocality crate links it)
# The RDMA build (`--features rdma`) also needs libibverbs-dev, librdmacm-dev and
# libclang-dev: scripts/rdma-test.sh installs them (apt-need.sh) when it runs.
set -euo pipefail

"$(dirname "${BASH_SOURCE[0]}")"/apt-need.sh fonts-dejavu-core ca-certificates libhwloc-dev libudev-dev pkg-config

if ! command -v cargo >/dev/null 2>&1; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  else
    echo "deps: no cargo found; installing the Rust toolchain with rustup" >&2
    curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --component clippy,rustfmt
    export PATH="$HOME/.cargo/bin:$PATH"
  fi
fi
