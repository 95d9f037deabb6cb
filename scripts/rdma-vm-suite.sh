#!/bin/sh
# Runs INSIDE the soft-RoCE VM (busybox sh), started by scripts/rdma-test.sh:
# every RDMA check of the RDMA issue on rxe0, in one boot. Each step prints a
# cargo-style "test result:" line (the CI totals count them) and the suite
# exits non-zero if any step failed. Bench and perftest output is printed
# between @begin/@end markers for the host to turn into the ratio table.
fail=0
step() { # step NAME COMMAND...
  name=$1; shift
  echo "@step $name: $*"
  if "$@"; then
    echo "test result: ok. 1 passed; 0 failed ($name)"
  else
    echo "test result: FAILED. 0 passed; 1 failed ($name)"
    fail=1
  fi
}
export PS_RDMA_REQUIRE=1 PS_LOG=${PS_LOG:-info}
ulimit -l unlimited 2>/dev/null

# 1. the verbs layer: WRITE/READ round trips between two QPs
for t in /bin/loopback-*; do
  [ -x "$t" ] && step verbs-loopback "$t" --test-threads=1
done

# 2. doctor, with a device
step doctor pslab doctor --slab-bytes 268435456

# 3. invariant 1 over RDMA, dense and sparse, separate processes
step invariant1-rdma pslab --transport rdma local --servers 2 --workers 2 --no-pin --app check \
  --params '{"rounds": 12, "keys": 800, "window": 8}'

# 4. invariant 3: a reader READs whole blocks while writers' pushes merge
step torn-reads-rdma pslab --transport rdma local --servers 2 --workers 3 --no-pin --app torn \
  --params '{"keys": 16384, "rounds": 150, "reads": 400, "seconds_max": 400}'

# 5. a slow shard: clients run out of ring credits and wait; nothing is lost
step slow-shard-rdma env PS_TEST_SHARD_DELAY_US=3000 pslab --transport rdma local --servers 2 --workers 2 \
  --no-pin --app check --params '{"rounds": 6, "keys": 400, "window": 32}'

# 6. the bench beside perftest on the same device in the same boot
if [ "${PS_VM_BENCH:-1}" = 1 ]; then
  step bench-rdma pslab --transport rdma bench --no-pin --no-baseline --seconds 1 --window 8 \
    --dense-sizes 4096,65536,262144,1048576 --sparse-sizes 4096 --json /tmp/bench.json
  echo "@begin bench-json"; cat /tmp/bench.json; echo; echo "@end bench-json"
  for op in write read; do
    for s in 4096 65536 262144 1048576; do
      ib_${op}_bw -d rxe0 -x 1 -s $s -n 300 -F >/tmp/perf-srv.log 2>&1 &
      sleep 1
      line=$(ib_${op}_bw -d rxe0 -x 1 -s $s -n 300 -F 10.77.0.1 2>&1 | awk '$1 == '"$s"' {print}')
      wait
      echo "@perf $op $s $line"
    done
  done
fi
exit $fail
