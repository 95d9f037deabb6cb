#!/usr/bin/env bash
# The README's second command, and what CI runs (.ci/run): formatting, lints,
# every test (units, property tests, the seeded simulation, real multi-process
# jobs, the hostile-network test), a short smoke run of the benchmark so the
# bench command itself stays working, and the RDMA crate's tests on a real
# soft-RoCE device in a qemu VM (scripts/rdma-test.sh). The tests build in the `ci` profile
# (Cargo.toml): release optimisation, so the process tests and the simulation run several
# times faster, with overflow checks on, so arithmetic that release builds wrap fails a test.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
t0=$(date +%s)
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy -D warnings"
cargo clippy --locked --release --workspace --all-targets -- -D warnings
echo "== Open MPI, MPICH and Slurm for the launcher tests"
scripts/apt-need.sh openmpi-bin mpich slurm-wlm
echo "== MovieLens 100k for the mf test (scripts/fetch-movielens.sh)"
scripts/fetch-movielens.sh
echo "== clothing reviews for the lr test (scripts/fetch-clothing.sh)"
scripts/fetch-clothing.sh
echo "== cargo test (profile ci: release with overflow checks)"
log=$(mktemp)
cargo test --locked --profile ci --workspace 2>&1 | tee "$log"
read -r passed failed < <(awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i == "passed;") p += $(i-1); if ($i == "failed;") f += $(i-1) } } END { print p + 0, f + 0 }' "$log")
echo "== bench smoke run (0.2 s phases)"
smoke=$(mktemp -d)
target/ci/pslab bench --seconds 0.2 --dense-sizes 4096,1048576 --sparse-sizes 4096 \
  --json "$smoke/bench.json" --plot "$smoke/bench.png" --no-pin
test -s "$smoke/bench.json"
echo "== ps-rdma on a real verbs device (soft-RoCE in a qemu VM unless PS_RDMA_DEVICE is set)"
rdma_log=$(mktemp)
scripts/rdma-test.sh 2>&1 | tee "$rdma_log"
read -r rp rf < <(awk '/test result:/ { for (i = 1; i <= NF; i++) { if ($i == "passed;") p += $(i-1); if ($i == "failed;") f += $(i-1) } } END { print p + 0, f + 0 }' "$rdma_log")
[ "$rp" -gt 0 ] || { echo "the RDMA tests reported no passing test" >&2; exit 1; }
passed=$((passed + rp)); failed=$((failed + rf))
echo "== all checks passed in $(( $(date +%s) - t0 )) s"
# the totals over every test binary, as the closing line
echo "tests: $passed passed, $failed failed"
