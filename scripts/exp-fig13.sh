#!/usr/bin/env bash
# Bounded delay and idle time (OSDI 2014, Fig. 13), with the ssp app: 2 servers
# and 4 worker processes, worker 0 sleeps SLOW_MS at the start of every clock
# (a straggler), the others run flat out. For each staleness bound s in
# {0, 1, 4, 8, 16} (model bounded:s), and eventual consistency as the no-bound
# reference, it measures how long the fast workers (ranks 1-3) sit in reads
# waiting for the straggler, the straggler's own wait, the job time and the
# staleness the reads saw. Each setting runs REPEATS times; the table shows
# medians. Writes docs/experiments/fig13.json (raw, every worker of every run),
# docs/experiments/fig13-plot.json and docs/experiments/fig13.png, and prints
# the markdown table of docs/experiments.md.
#   scripts/exp-fig13.sh [CLOCKS] [SLOW_MS] [REPEATS]     (defaults 40, 20, 3)
set -euo pipefail
cd "$(dirname "$0")/.."
clocks=${1:-40}
slow=${2:-20}
repeats=${3:-3}
cargo build --release --quiet
out=docs/experiments
mkdir -p "$out"
runs=$(mktemp -d)
trap 'rm -rf "$runs"' EXIT
models="bounded:0 bounded:1 bounded:4 bounded:8 bounded:16 eventual"
for r in $(seq 1 "$repeats"); do
  for model in $models; do
    # eventual never waits; check its reads against a bound no run can break
    # (a read at clock c < CLOCKS needs c - CLOCKS = 0 clocks of the others)
    check=$model
    [ "$model" = eventual ] && check="bounded:$clocks"
    echo "== $model (run $r of $repeats)" >&2
    log="$runs/${model/:/-}.$r.log"
    t0=$(date +%s%N)
    target/release/pslab local --app ssp --servers 2 --workers 4 --no-pin \
      --params "{\"clocks\": $clocks, \"keys\": 4096, \"model\": \"$model\", \"check\": \"$check\", \"slow_ms\": $slow}" \
      >"$log" 2>&1 || { cat "$log" >&2; exit 1; }
    echo "@wall_ms $(( ($(date +%s%N) - t0) / 1000000 ))" >>"$log"
  done
done
python3 - "$runs" "$out" "$clocks" "$slow" "$repeats" "$models" <<'PY'
import json, sys
from statistics import mean, median
runs, out, clocks, slow, repeats, models = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6].split()

def parse(path):
    """The four workers' `@ssp` reports (printed by `pslab local` as `[workerN] ssp: {json}`) and the wall time."""
    workers, wall = {}, None
    for line in open(path):
        if "] ssp: {" in line:
            w = json.loads(line.split("] ssp: ", 1)[1])
            workers[w["rank"]] = w
        elif line.startswith("@wall_ms "):
            wall = int(line.split()[1]) / 1e3
    assert sorted(workers) == [0, 1, 2, 3], f"{path}: reports from ranks {sorted(workers)}"
    return workers, wall

def hist_sum(hs):
    out = [0] * max(len(h) for h in hs)
    for h in hs:
        for i, n in enumerate(h):
            out[i] += n
    return out

res = {}
for model in models:
    reps = []
    for r in range(1, repeats + 1):
        workers, wall = parse(f"{runs}/{model.replace(':', '-')}.{r}.log")
        fast = [workers[k] for k in (1, 2, 3)]
        reps.append({
            "fast_wait_ms": mean(w["read_wait_ms"] for w in fast),
            "slow_wait_ms": workers[0]["read_wait_ms"],
            # every worker's `seconds` ends after the closing barrier: the job's time
            "job_seconds": max(w["seconds"] for w in workers.values()),
            "wall_seconds": wall,
            "workers": [workers[k] for k in sorted(workers)],
        })
    fast_hist = hist_sum([w["staleness_seen"] for rep in reps for w in rep["workers"][1:]])
    n = sum(fast_hist)
    res[model] = {
        "model": model,
        "s": None if model == "eventual" else int(model.split(":")[1]),
        "fast_wait_ms": median(x["fast_wait_ms"] for x in reps),
        "fast_wait_ms_range": [min(x["fast_wait_ms"] for x in reps), max(x["fast_wait_ms"] for x in reps)],
        "slow_wait_ms": median(x["slow_wait_ms"] for x in reps),
        "job_seconds": median(x["job_seconds"] for x in reps),
        "wall_seconds": median(x["wall_seconds"] for x in reps),
        "fast_staleness_seen": fast_hist,
        "fast_mean_staleness": sum(i * c for i, c in enumerate(fast_hist)) / n,
        "fast_max_staleness": max(i for i, c in enumerate(fast_hist) if c),
        "runs": reps,
    }
json.dump({"experiment": "OSDI 2014 Fig. 13: idle time against the staleness bound, one worker slowed",
           "app": "ssp", "servers": 2, "workers": 4, "slow_rank": 0, "clocks": clocks, "slow_ms": slow,
           "keys": 4096, "repeats": repeats, "results": res}, open(f"{out}/fig13.json", "w"), indent=1)

bounded = [v for v in res.values() if v["s"] is not None]
xs = [v["s"] for v in bounded]
ev = res.get("eventual")
flat = lambda y: [[min(xs), y], [max(xs), y]]
idle = [{"name": "fast workers (mean of ranks 1-3)", "points": [[v["s"], v["fast_wait_ms"]] for v in bounded]},
        {"name": "slow worker (rank 0)", "points": [[v["s"], v["slow_wait_ms"]] for v in bounded]}]
job = [{"name": "job time (bounded:s)", "points": [[v["s"], v["job_seconds"]] for v in bounded]},
       {"name": f"straggler's sleep alone ({clocks} x {slow} ms)", "points": flat(clocks * slow / 1e3)}]
if ev:
    idle.append({"name": "fast workers, eventual (no bound)", "points": flat(ev["fast_wait_ms"])})
    job.append({"name": "job time, eventual", "points": flat(ev["job_seconds"])})
plot = {"title": f"Idle time against the staleness bound s: 4 workers, worker 0 sleeps {slow} ms per clock, "
                 f"{clocks} clocks (median of {repeats})",
        "panels": [{"title": "time waiting in reads", "x": "staleness bound s (clocks)", "y": "ms per worker",
                    "series": idle},
                   {"title": "job time", "x": "staleness bound s (clocks)", "y": "seconds", "series": job}]}
json.dump(plot, open(f"{out}/fig13-plot.json", "w"), indent=1)

print("| model | fast workers' read wait, ms (min-max) | slow worker's read wait, ms | job s | wall s | "
      "fast workers' staleness: mean / max | fast workers' staleness histogram (0, 1, ...) |")
print("|---|---|---|---|---|---|---|")
for v in res.values():
    lo, hi = v["fast_wait_ms_range"]
    h = v["fast_staleness_seen"]
    h = h[: max(i for i, c in enumerate(h) if c) + 1]
    print(f"| {v['model']} | {v['fast_wait_ms']:.0f} ({lo:.0f}-{hi:.0f}) | {v['slow_wait_ms']:.0f} | "
          f"{v['job_seconds']:.2f} | {v['wall_seconds']:.2f} | {v['fast_mean_staleness']:.2f} / "
          f"{v['fast_max_staleness']} | {h} |")
PY
target/release/pslab plot --json "$out/fig13-plot.json" --out "$out/fig13.png"
echo "wrote $out/fig13.json, $out/fig13-plot.json and $out/fig13.png" >&2
