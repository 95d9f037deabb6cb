#!/usr/bin/env bash
# Two pslab builds side by side in one soft-RoCE VM boot (is a change a
# regression, or was the boot slow?). Per round: ib_write_bw and ib_read_bw,
# then build A's bench, then build B's, for the windowed push and pull at SIZE.
#
#   scripts/rdma-vm-ab.sh A_PSLAB B_PSLAB [SIZE] [ROUNDS]
# e.g. an older commit against the tree (build the older one in a worktree
# with its own CARGO_TARGET_DIR, both with --features rdma):
#   scripts/rdma-vm-ab.sh /tmp/old/target/release/pslab target/release/pslab 65536 4
# Prints "@p write|read MB/s" (perftest BW average) and "@b a|b push_win|pull_win GB/s" lines.
set -euo pipefail
cd "$(dirname "$0")/.."
a=${1:?usage: rdma-vm-ab.sh A_PSLAB B_PSLAB [SIZE] [ROUNDS]}
b=${2:?usage: rdma-vm-ab.sh A_PSLAB B_PSLAB [SIZE] [ROUNDS]}
size=${3:-65536}
rounds=${4:-4}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cp "$a" "$dir/pslab-a"
cp "$b" "$dir/pslab-b"
cat > "$dir/ab-inner.sh" <<INNER
#!/bin/sh
export PS_RDMA_REQUIRE=1 PS_LOG=warn
ulimit -l unlimited
perf() { # perf OP: 64 MiB of SIZE messages, as the suite runs it
  n=\$((67108864 / $size))
  ib_\$1_bw -d rxe0 -x 1 -s $size -n \$n -F >/dev/null 2>&1 &
  sleep 1
  ib_\$1_bw -d rxe0 -x 1 -s $size -n \$n -F 10.77.0.1 2>&1 | awk -v op=\$1 '\$1 == $size {print "@p", op, \$4}'
  wait
}
r=0
while [ \$r -lt $rounds ]; do
  r=\$((r + 1))
  perf write; perf read
  for who in a b; do
    pslab-\$who --transport rdma bench --no-pin --no-baseline --no-sparse --seconds 2 --window 8 \\
      --window-only --dense-sizes $size --json /tmp/b.json >/dev/null 2>&1 || echo "@fail \$who"
    awk -v w=\$who 'match(\$0, /"gb_per_s": [0-9.e-]+/) {g=substr(\$0, RSTART+12, RLENGTH-12)}
      match(\$0, /"op": "[a-z_]+"/) {print "@b", w, substr(\$0, RSTART+7, RLENGTH-8), g}' /tmp/b.json
  done
done
perf write; perf read
INNER
scripts/softroce-vm.sh --timeout 1800 --bin "$dir/pslab-a" --bin "$dir/pslab-b" --bin "$dir/ab-inner.sh" \
  -- "sh /bin/ab-inner.sh" | grep -E '^@'
