#!/usr/bin/env bash
# Where the CPU goes in the soft-RoCE VM: `perf record -a -g` (cpu-clock, the
# guest kernel's symbols) over a window of ib_write_bw, of ib_read_bw, and
# then over the push and pull phases of pslab's windowed bench, at one size, in
# one boot; prints each profile flat (by thread and symbol) and inclusive
# (system calls, softirqs, pslab's own functions), and the pulling thread
# alone. For working on the RDMA datapath's speed, not part of CI; what it
# found is in docs/benchmarks.md (rxe does a loopback WRITE's or READ's whole
# work inside the poster's ibv_post_send; glibc's rep movsb under TCG).
#
#   scripts/rdma-vm-profile.sh [PSLAB] [SIZE]     (PSLAB built with --features rdma)
set -euo pipefail
cd "$(dirname "$0")/.."
pslab=${1:-target/release/pslab}
size=${2:-65536}
"$(dirname "$0")"/apt-need.sh linux-perf
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cp "$pslab" "$dir/pslab"
cat > "$dir/profile-inner.sh" <<INNER
#!/bin/sh
export PS_RDMA_REQUIRE=1 PS_LOG=warn
ulimit -l unlimited
echo 0 > /proc/sys/kernel/kptr_restrict
echo -1 > /proc/sys/kernel/perf_event_paranoid
report() { # report DATA TITLE
  echo "@@ \$2: flat"
  perf report -i \$1 --no-children --sort comm,sym --stdio 2>/dev/null | grep -v "^#" | grep "%" | head -30
  echo "@@ \$2: inclusive"
  perf report -i \$1 --children --sort comm,sym --stdio -g none 2>/dev/null | grep -v "^#" | grep "%" \\
    | grep -E "sys_|syscall|softirq|rxe_post|schedule|wake|hpet|pslab::|ps_core|ps_rdma|epoll|futex" | head -40
}
n=\$((268435456 / $size))
perftest() { # perftest write|read: a 3 s profile of ib_OP_bw in its 3rd to 5th second
  ib_\$1_bw -d rxe0 -x 1 -s $size -n \$n -F >/dev/null 2>&1 &
  sleep 1
  ib_\$1_bw -d rxe0 -x 1 -s $size -n \$n -F 10.77.0.1 > /tmp/p-\$1.out 2>&1 &
  sleep 2
  perf record -o /tmp/p-\$1.data -e cpu-clock -a -g -- sleep 3 >/dev/null 2>&1
  wait
  echo "@@ ib_\$1_bw: \$(awk '\$1 == $size' /tmp/p-\$1.out)"
  report /tmp/p-\$1.data ib_\$1_bw
}
perftest write
perftest read
# the bench measures push_win for 10 s (from about 0.5 s), then pull_win for
# 10 s: each profiled for 4 s from its 5th second
pslab --transport rdma bench --no-pin --no-baseline --no-sparse --seconds 10 --window 8 --window-only \\
  --dense-sizes $size --json /tmp/b.json >/dev/null 2>&1 &
sleep 5
perf record -o /tmp/ps.data -e cpu-clock -a -g -- sleep 4 >/dev/null 2>&1
sleep 6
perf record -o /tmp/pl.data -e cpu-clock -a -g -- sleep 4 >/dev/null 2>&1
wait
grep -E '"op"|"gb_per_s"' /tmp/b.json
report /tmp/ps.data pslab-push
report /tmp/pl.data pslab-pull
# the pulling thread alone (the busiest thread that is not the idle loop),
# user space included: where its time outside the post goes (rxe does the
# whole READ inside ibv_post_send)
echo "@@ pslab-pull: threads"
perf report -i /tmp/pl.data --no-children --sort pid --stdio -g none 2>/dev/null | grep -v "^#" | grep "%" | head -12
tid=\$(perf report -i /tmp/pl.data --no-children --sort pid --stdio -g none 2>/dev/null | grep "%" | grep -v swapper \
  | head -1 | sed 's/.*% *\([0-9]*\):.*/\1/')
echo "@@ pslab-pull: thread \$tid, by object"
perf report -i /tmp/pl.data --tid \$tid --no-children --sort dso --stdio -g none 2>/dev/null | grep -v "^#" | grep "%" | head -12
echo "@@ pslab-pull: thread \$tid, inclusive"
perf report -i /tmp/pl.data --tid \$tid --children --sort sym --stdio -g none 2>/dev/null | grep -v "^#" | grep "%" | head -90
INNER
scripts/softroce-vm.sh --timeout 900 --bin "$dir/pslab" --bin /usr/bin/perf --bin "$dir/profile-inner.sh" \
  -- "sh /bin/profile-inner.sh"
