#!/usr/bin/env bash
# SSP vs ESSP (Dai et al., AAAI 2015), reproduced with the mf app on MovieLens
# 100k: 4 worker processes and 2 servers, staleness s in {0, 1, 3, 7}, each
# model lazy (bounded:s, the process cache refilled on a miss) and eager
# (essp:s, shards refresh the rows a worker read each time the slowest worker
# finishes a clock). SLOW_MS > 0 slows worker 0 by that much per clock (a
# straggler); by default the workers differ only as the machine makes them. Writes docs/experiments/essp.json (raw),
# docs/experiments/essp.png (objective against clock and time, read staleness)
# and prints the table of docs/experiments.md.
#   scripts/exp-essp.sh [CLOCKS] [SLOW_MS]     (defaults 60, 0)
set -euo pipefail
cd "$(dirname "$0")/.."
clocks=${1:-60}
slow=${2:-0}
scripts/fetch-movielens.sh >/dev/null
cargo build --release --quiet
out=docs/experiments
mkdir -p "$out"
runs=$(mktemp -d)
trap 'rm -rf "$runs"' EXIT
for s in 0 1 3 7; do
  for kind in bounded essp; do
    echo "== $kind:$s" >&2
    target/release/pslab local --app mf --servers 2 --workers 4 --no-pin \
      --params "{\"clocks\": $clocks, \"model\": \"$kind:$s\", \"slow_ms\": $slow}" >"$runs/$kind-$s.log" 2>&1 \
      || { cat "$runs/$kind-$s.log" >&2; exit 1; }
  done
done
python3 - "$runs" "$out" "$clocks" "$slow" <<'PY'
import json, sys, os, glob
runs, out, clocks, slow = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
def at_lines(path, kind):
    for line in open(path):
        key = f"] {kind}: "
        if key in line:
            yield json.loads(line.split(key, 1)[1])
res = {}
for s in [0, 1, 3, 7]:
    for kind in ["bounded", "essp"]:
        log = f"{runs}/{kind}-{s}.log"
        mf = next(at_lines(log, "mf"))
        reads = list(at_lines(log, "mf-reads"))
        hist = [0] * max(len(r["staleness"]) for r in reads)
        for r in reads:
            for i, n in enumerate(r["staleness"]):
                hist[i] += n
        n = sum(hist)
        res[f"{kind}:{s}"] = {
            "s": s, "kind": kind, "objective": mf["objective"], "test_rmse": mf["test_rmse"],
            "seconds": mf["seconds"], "objective_per_clock": mf["objective_per_clock"],
            "time_per_clock": mf["time_per_clock"], "staleness": hist,
            "mean_staleness": sum(i * c for i, c in enumerate(hist)) / n,
            "hits": sum(r["hits"] for r in reads), "misses": sum(r["misses"] for r in reads),
            "read_wait_ms": sum(r["read_wait_ms"] for r in reads) / len(reads),
        }
json.dump({"clocks": clocks, "slow_ms": slow, "workers": 4, "servers": 2, "runs": res},
          open(f"{out}/essp.json", "w"), indent=1)
series = lambda f: [{"name": k, "points": f(v)} for k, v in res.items() if v["s"] in (1, 3, 7)]
straggler = f", worker 0 slowed {slow} ms/clock" if slow else ""
plot = {"title": f"SSP (bounded) vs ESSP, MF on MovieLens 100k, 4 workers, 2 servers{straggler}",
  "panels": [
    {"title": "objective against clock", "x": "clock", "y": "training objective", "y_fit": True,
     "series": series(lambda v: [[c, o] for c, o in enumerate(v["objective_per_clock"])])},
    {"title": "objective against time", "x": "seconds", "y": "training objective", "y_fit": True,
     "series": series(lambda v: [[t, o] for t, o in zip(v["time_per_clock"], v["objective_per_clock"])])},
    {"title": "read staleness (share of reads)", "x": "clock minus stamp seen", "y": "share", "kind": "bar",
     "series": [{"name": k, "points": [[i, c / sum(v["staleness"])] for i, c in enumerate(v["staleness"])]}
                for k, v in res.items() if v["s"] in (3, 7)]},
    {"title": "mean read staleness against s", "x": "s", "y": "mean staleness (clocks)",
     "series": [{"name": kind, "points": [[v["s"], v["mean_staleness"]] for v in res.values() if v["kind"] == kind]}
                for kind in ("bounded", "essp")]},
  ]}
json.dump(plot, open(f"{out}/essp-plot.json", "w"))
print("| s | model | mean staleness | staleness histogram (0, 1, ...) | cache hits / misses | read wait ms/worker | objective at the end | test RMSE | seconds |")
print("|---|---|---|---|---|---|---|---|---|")
for k, v in res.items():
    print(f"| {v['s']} | {v['kind']} | {v['mean_staleness']:.2f} | {v['staleness']} | {v['hits']} / {v['misses']} | "
          f"{v['read_wait_ms']:.0f} | {v['objective']:.0f} | {v['test_rmse']:.4f} | {v['seconds']:.2f} |")
PY
target/release/pslab plot --json "$out/essp-plot.json" --out "$out/essp.png"
echo "wrote $out/essp.json and $out/essp.png" >&2
