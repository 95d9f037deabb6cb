#!/bin/sh
# Runs INSIDE the soft-RoCE VM (busybox sh), started by scripts/rdma-test.sh:
# every RDMA check of the RDMA issue on rxe0, in one boot. Each step prints a
# cargo-style "test result:" line (the CI totals count them) and the suite
# exits non-zero if any step failed. Bench and perftest output is printed
# between @begin/@end markers for the host to turn into the ratio table.
fail=0
step() { # step NAME COMMAND... (PS_VM_STEP=NAME: only that one, for working on it)
  name=$1; shift
  [ -n "${PS_VM_STEP:-}" ] && [ "$PS_VM_STEP" != "$name" ] && return
  echo "@step $name: $*"
  if "$@"; then
    echo "test result: ok. 1 passed; 0 failed ($name)"
  else
    echo "test result: FAILED. 0 passed; 1 failed ($name)"
    fail=1
  fi
}
# a multi-process job failed: every warning and error it printed (what made a
# node give up), then its last lines whatever they say (a node that exits
# without a word still shows where the job was); $1 is the job's output with a
# progress bar's carriage returns made line ends
job_failed() {
  echo "--- the job's warnings and errors:"
  echo "$1" | grep -iE "warn|error|fail|lost|timed? ?out|panick|exited" | tail -40
  echo "--- the job's last 80 lines (progress bars left out):"
  echo "$1" | sed "s/.*$(printf '\033')\[2K//" | grep -v '^\s*$' \
    | grep -v '\[[0-9][0-9]:[0-9][0-9]:[0-9][0-9]\] ' | tail -80
  echo "---"
}
export PS_RDMA_REQUIRE=1 PS_LOG=${PS_LOG:-info}
# PS_VM_ONLY=bench: only the bench (for measuring); PS_VM_SIZES: its sizes;
# PS_VM_WINDOW: pslab's ops in flight (8)
only=${PS_VM_ONLY:-all}
sizes=${PS_VM_SIZES:-4096 65536 262144 1048576}
rounds=${PS_VM_ROUNDS:-1 2 3 4 5}
# seconds pslab measures each op for
secs=${PS_VM_SECONDS:-2}
ulimit -l unlimited 2>/dev/null

if [ "$only" = all ]; then
# 1. the verbs layer: WRITE/READ round trips between two QPs
for t in /bin/loopback-*; do
  [ -x "$t" ] && step verbs-loopback "$t" --test-threads=1
done

# 2. doctor, with a device
step doctor pslab doctor --slab-bytes 268435456

# 3. invariant 1 over RDMA, dense and sparse, separate processes
step invariant1-rdma pslab --transport rdma local --servers 2 --workers 2 --no-pin --app check \
  --params '{"rounds": 12, "keys": 800, "window": 8}'

# 4. invariant 3: a reader READs whole blocks while writers' pushes merge; an
#    extra client is killed with SIGKILL while its pushes are in flight
step torn-reads-rdma pslab --transport rdma local --servers 2 --workers 3 --no-pin -v --app torn \
  --params '{"keys": 16384, "rounds": 150, "reads": 400, "seconds_max": 400, "hammer": 10}'

# 5. a slow shard: clients run out of ring credits and wait; nothing is lost
step slow-shard-rdma env PS_TEST_SHARD_DELAY_US=3000 pslab --transport rdma local --servers 2 --workers 2 \
  --no-pin --app check --params '{"rounds": 6, "keys": 400, "window": 32}'

# 6. invariant 2 over RDMA: worker 0 straggles; reads of bounded tables go to
#    the shard as frames (a one-sided READ cannot wait for clocks) and wait there
step ssp-rdma pslab --transport rdma local --servers 2 --workers 3 --no-pin --app ssp \
  --params '{"clocks": 10, "keys": 2000, "model": "bounded:1", "slow_ms": 30}'

# 7. the same under eager SSP and sequential: shards send Refresh frames through
#    the rings to the workers' process caches, and hold sequential pushes to
#    the end of their clock
step essp-rdma pslab --transport rdma local --servers 2 --workers 3 --no-pin --app ssp \
  --params '{"clocks": 10, "keys": 2000, "model": "essp:1", "slow_ms": 30}'
step sequential-rdma pslab --transport rdma local --servers 2 --workers 3 --no-pin --app ssp \
  --params '{"clocks": 8, "keys": 2000, "model": "sequential", "slow_ms": 30}'

# 7a. fault tolerance over RDMA: 3 servers, 2 copies of every shard, server 1
#     killed with SIGKILL while 3 workers push through the rings and pull by
#     READ; the workers set up new QPs to the copies that take over (their
#     slabs registered at start), send again what had no answer, and every
#     value still equals the sum of the acknowledged pushes
# (the kill counts from the workers' connections: at a fixed 1.5 s it landed,
# on a loaded host, before they connected, and they found the new head at
# once, so nothing failed over)
failover_rdma() {
  pslab --transport rdma local --servers 3 --workers 3 --copies 2 --no-pin --app check \
    --kill server1@connected+300 --params '{"rounds": 60, "keys": 800}' >/tmp/step.log 2>&1
  rc=$?
  out=$(tr '\r' '\n' </tmp/step.log)
  echo "$out" | grep -E "killed|failing over|promoted|failed over|failover:|invariant 1|completed|error" | head -20
  [ $rc -eq 0 ] || job_failed "$out"
  [ $rc -eq 0 ] && echo "$out" | grep -q "^failover: 3 connections" \
    && [ "$(echo "$out" | grep -c 'finished: invariant 1 holds')" -eq 3 ]
}
step failover-rdma failover_rdma
# ... and then the lost copies rebuilt on the others (a bulk copy from each
# chain's tail while the workers push), so a second server may die later: the
# workers then READ from rebuilt copies, whose slabs were registered when
# they were placed. The second kill waits for the rebuild (whole+MS): at a
# fixed time it raced the bulk copy, which on a loaded TCG guest can take
# longer than any fixed margin, and then took the last copy of a shard
rebuild_rdma() {
  pslab --transport rdma local --servers 3 --workers 3 --copies 2 --no-pin -v --app check \
    --kill server1@connected+300 --kill server2@whole+500 --params '{"rounds": 150, "keys": 800}' >/tmp/step.log 2>&1
  rc=$?
  out=$(tr '\r' '\n' </tmp/step.log)
  echo "$out" | grep -E "killed|rebuilt|joined its chain|failover:|completed|error" | head -20
  [ $rc -eq 0 ] || job_failed "$out"
  [ $rc -eq 0 ] && echo "$out" | grep -q "killed server2" \
    && [ "$(echo "$out" | grep -c 'joined its chain: 2 copies again')" -eq 2 ] \
    && [ "$(echo "$out" | grep -c 'finished: invariant 1 holds')" -eq 3 ]
}
step rebuild-rdma rebuild_rdma

# 7b. filters over RDMA: coded pushes (key caching, LZ4) and held-back values
#     (significantly-modified, random skip; flushed at the end) through the
#     rings lose no update; the lr app (block proximal steps settled by the
#     shards, KKT filter, key caching) descends on the clothing reviews when the
#     host fetched them (rdma-test.sh copies its LIBSVM files to /bin)
step filters-rdma pslab --transport rdma local --servers 2 --workers 2 --no-pin --app check \
  --params '{"rounds": 8, "keys": 800, "filters": [{"filter": "significantly_modified", "threshold": 2.5}, {"filter": "random_skip", "p": 0.3, "seed": 1}, {"filter": "key_cache"}, {"filter": "lz4"}]}'
step quantize-rdma pslab --transport rdma local --servers 2 --workers 2 --no-pin --app check \
  --params '{"rounds": 8, "keys": 800, "tolerance": 1e-4, "filters": [{"filter": "quantize", "bits": 8}, {"filter": "key_cache"}]}'
if [ -e /bin/train.libsvm ]; then
  step lr-rdma pslab --transport rdma local --servers 2 --workers 2 --no-pin --app lr \
    --params '{"data": "/bin", "sweeps": 30, "tau": 1, "objective_max": 3400, "checkpoint_every": 15, "filters": [{"filter": "key_cache"}, {"filter": "lz4"}]}'
  # restart from the checkpoint it wrote after sweep 15 (checkpoint frames
  # and their late acknowledgements through the rings; tables restored
  # before the slabs are registered)
  step lr-resume-rdma env PS_RESUME=pslab-checkpoints/ckpt-15 pslab --transport rdma local --servers 2 --workers 2 \
    --no-pin --app lr --params '{"data": "/bin", "sweeps": 30, "tau": 1, "objective_max": 3400, "resume_sweep": 15, "filters": [{"filter": "key_cache"}, {"filter": "lz4"}]}'
fi

fi

# 8. the bench beside perftest on the same device in the same boot: per size,
#    ib_write_bw and ib_read_bw just before and just after each pslab run (the
#    VM's speed drifts); perftest moves 64 MiB per run (about 2 s here, as long
#    as pslab measures each op; its duration mode -D reports nothing for 1 MiB
#    messages at these speeds); five rounds; the host takes per-round ratios,
#    then medians
perf() { # perf ROUND OP SIZE
  n=$((67108864 / $3))
  ib_$2_bw -d rxe0 -x 1 -s $3 -n $n -F >/tmp/perf-srv.log 2>&1 &
  sleep 1
  line=$(ib_$2_bw -d rxe0 -x 1 -s $3 -n $n -F 10.77.0.1 2>&1 | awk '$1 == '"$3"' {print}')
  wait
  echo "@perf $1 $2 $3 $line"
}
if [ "${PS_VM_BENCH:-1}" = 1 ]; then
  for r in $rounds; do
    for s in $sizes; do
      perf $r write $s; perf $r read $s
      step bench-rdma-$s-round$r pslab --transport rdma bench --no-pin --no-baseline --no-sparse --seconds $secs \
        --window ${PS_VM_WINDOW:-8} --window-only --dense-sizes $s --json /tmp/bench.json
      perf $r write $s; perf $r read $s
      echo "@begin bench-json $r"; cat /tmp/bench.json; echo; echo "@end bench-json"
    done
  done
fi
exit $fail
