#!/usr/bin/env bash
# The RDMA crate's checks: builds crates/ps-rdma (it needs libibverbs, librdmacm
# and libclang, so it is not in the main workspace), checks its format and lints,
# and runs its tests on a real verbs device: the one PS_RDMA_DEVICE names on this
# machine if set, else rxe0 in a soft-RoCE VM (scripts/softroce-vm.sh).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/.."

"$here"/apt-need.sh libibverbs-dev librdmacm-dev libclang-dev clang

cd crates/ps-rdma
rustfmt --edition 2021 --check src/*.rs tests/*.rs
cargo clippy --locked --release --all-targets -- -D warnings
tests=$(cargo test --locked --release --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import sys, json
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["executable"])')
[ -n "$tests" ] || { echo "rdma-test: no test binary was built" >&2; exit 1; }
cd ../..
for t in $tests; do
  if [ -n "${PS_RDMA_DEVICE:-}" ]; then
    PS_RDMA_REQUIRE=1 "$t" --test-threads=1
  else
    # in the VM the binary runs as /bin/<name>; its output (with the test runner's
    # summary) comes back on the serial console
    scripts/softroce-vm.sh --timeout 600 --bin "$t" -- "PS_RDMA_REQUIRE=1 $(basename "$t") --test-threads=1 --nocapture"
  fi
done
