#!/usr/bin/env bash
# The RDMA checks: builds crates/ps-rdma (it needs libibverbs, librdmacm and
# libclang, so it is not in the main workspace) and pslab with `--features rdma`,
# checks their format and lints, and runs on a real verbs device: the one
# PS_RDMA_DEVICE names on this machine if set, else rxe0 in a soft-RoCE VM
# (scripts/softroce-vm.sh). What runs there is scripts/rdma-vm-suite.sh: the
# verbs loopback test, `pslab doctor`, invariant 1 and the torn-read check as
# multi-process jobs over RDMA, a slow shard, and the bench beside perftest.
# The bench ratios are printed at the end (and saved with --bench-out FILE).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/.."
bench_out=""
[ "${1:-}" = "--bench-out" ] && bench_out=$2

"$here"/apt-need.sh libibverbs-dev librdmacm-dev libclang-dev clang

echo "== ps-rdma: format, lints, tests build"
(cd crates/ps-rdma && rustfmt --edition 2021 --check $(find src tests -name '*.rs') \
  && cargo clippy --locked --release --all-targets -- -D warnings)
tests=$(cd crates/ps-rdma && cargo test --locked --profile ci --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import sys, json
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["executable"])')
[ -n "$tests" ] || { echo "rdma-test: no test binary was built" >&2; exit 1; }
echo "== ps-rdma unit tests (no device needed; profile ci: overflow checks on)"
(cd crates/ps-rdma && cargo test --locked --profile ci --lib)
echo "== pslab --features rdma: lints and build"
cargo clippy --locked --release --features rdma --bins -- -D warnings
cargo build --locked --release --features rdma --bin pslab
bins=(--bin target/release/pslab --bin scripts/rdma-vm-suite.sh)
for t in $tests; do bins+=(--bin "$t"); done
# the lr step's data, when fetched (scripts/fetch-clothing.sh; the test command does)
for f in data/clothing/train.libsvm data/clothing/test.libsvm; do
  [ -s "$f" ] && bins+=(--bin "$f")
done

log=$(mktemp)
set +e
if [ -n "${PS_RDMA_DEVICE:-}" ]; then
  # a real HCA here: the same suite, without the perftest comparison
  for t in $tests; do PS_RDMA_REQUIRE=1 "$t" --test-threads=1; done
  PATH="$PWD/target/release:$PATH" PS_VM_BENCH=0 sh scripts/rdma-vm-suite.sh 2>&1 | tee "$log"
else
  scripts/softroce-vm.sh --timeout 2400 "${bins[@]}" -- "sh /bin/rdma-vm-suite.sh" 2>&1 | tee "$log"
fi
rc=${PIPESTATUS[0]}
set -e
python3 "$here"/rdma-bench-table.py "$log" ${bench_out:+"$bench_out"} || true
exit "$rc"
