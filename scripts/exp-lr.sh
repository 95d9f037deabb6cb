#!/usr/bin/env bash
# The lr app's experiments (OSDI 2014 §5.1 on the clothing reviews, L1, C = 1,
# 2 servers and 4 worker processes):
#   1. the share of keys the KKT filter drops, per sweep;
#   2. bytes the workers send per sweep, and the final objective, with each
#      filter on and off;
#   3. time to reach the objective within 1e-3 of the liblinear optimum under
#      delay τ in {0, 2, 4, 8, 16} (32 blocks; every worker waits a seeded
#      uniform 0..JITTER_MS before each iteration, an emulated straggler
#      pattern that τ is there to hide).
# Writes docs/experiments/lr.json (raw) and lr.png, prints the tables of
# docs/experiments.md.
#   scripts/exp-lr.sh [SWEEPS] [JITTER_MS]     (defaults 150, 1)
set -euo pipefail
cd "$(dirname "$0")/.."
sweeps=${1:-150}
jitter=${2:-1}
scripts/fetch-clothing.sh >/dev/null
cargo build --release --quiet
out=docs/experiments
mkdir -p "$out"
runs=$(mktemp -d)
trap 'rm -rf "$runs"' EXIT
run() { # name params
  echo "== $1: $2" >&2
  target/release/pslab local --app lr --servers 2 --workers 4 --no-pin --params "$2" >"$runs/$1.log" 2>&1 \
    || { cat "$runs/$1.log" >&2; exit 1; }
}
kc='{"filter":"key_cache"}'
run none "{\"sweeps\": $sweeps, \"kkt\": false, \"filters\": []}"
run kkt "{\"sweeps\": $sweeps, \"filters\": []}"
run kkt+key_cache "{\"sweeps\": $sweeps, \"filters\": [$kc]}"
run kkt+key_cache+lz4 "{\"sweeps\": $sweeps, \"filters\": [$kc, {\"filter\":\"lz4\"}]}"
run kkt+key_cache+quantize16 "{\"sweeps\": $sweeps, \"filters\": [$kc, {\"filter\":\"quantize\",\"bits\":16}]}"
run kkt+key_cache+quantize8 "{\"sweeps\": $sweeps, \"filters\": [$kc, {\"filter\":\"quantize\",\"bits\":8}]}"
run kkt+key_cache+sigmod0.01 "{\"sweeps\": $sweeps, \"filters\": [{\"filter\":\"significantly_modified\",\"threshold\":0.01}, $kc]}"
run kkt+key_cache+skip0.5 "{\"sweeps\": $sweeps, \"filters\": [{\"filter\":\"random_skip\",\"p\":0.5,\"seed\":1}, $kc]}"
for tau in 0 2 4 8 16; do
  run "tau$tau" "{\"sweeps\": 250, \"blocks\": 32, \"tau\": $tau, \"jitter_ms\": $jitter}"
done
python3 - "$runs" "$out" "$sweeps" "$jitter" <<'PY'
import json, re, sys
runs, out, sweeps, jitter = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
optimum = 3309.7433
target = optimum * 1.001
line = re.compile(r"^sweep (\d+)/\d+  objective ([\d.]+)  non-zeros (\d+)  filtered ([\d.]+)%  sent (\d+) B  \(([\d.]+) s\)")
def parse(name):
    rows, final = [], None
    for l in open(f"{runs}/{name}.log"):
        m = line.match(l)
        if m:
            rows.append({"sweep": int(m[1]), "objective": float(m[2]), "nonzeros": int(m[3]),
                         "filtered_pct": float(m[4]), "bytes": int(m[5]), "secs": float(m[6])})
        if l.startswith("objective "):
            final = float(l.split()[1])
    return {"sweeps": rows, "final_objective": final}
filters = ["none", "kkt", "kkt+key_cache", "kkt+key_cache+lz4", "kkt+key_cache+quantize16",
           "kkt+key_cache+quantize8", "kkt+key_cache+sigmod0.01", "kkt+key_cache+skip0.5"]
res = {n: parse(n) for n in filters}
taus = {t: parse(f"tau{t}") for t in (0, 2, 4, 8, 16)}
json.dump({"sweeps": sweeps, "jitter_ms": jitter, "optimum": optimum, "filters": res,
           "tau": {str(k): v for k, v in taus.items()}}, open(f"{out}/lr.json", "w"), indent=1)
base = sum(r["bytes"] for r in res["none"]["sweeps"]) / len(res["none"]["sweeps"])
print("| filters | bytes per sweep (mean) | vs none | final objective | rel. to optimum |")
print("|---|---|---|---|---|")
for n in filters:
    s = res[n]["sweeps"]
    b = sum(r["bytes"] for r in s) / len(s)
    f = res[n]["final_objective"]
    print(f"| {n} | {b:,.0f} | {b / base:.2f} | {f:.4f} | {(f - optimum) / optimum:.1e} |")
print()
print("| τ | seconds per sweep | sweeps to 1e-3 | seconds to 1e-3 | final objective |")
print("|---|---|---|---|---|")
for t, r in taus.items():
    s = r["sweeps"]
    hit = next((x for x in s if x["objective"] <= target), None)
    per = s[-1]["secs"] / len(s)
    print(f"| {t} | {per:.3f} | {hit['sweep'] if hit else 'not in 250'} | {hit['secs'] if hit else float('nan'):.2f} | {r['final_objective']:.4f} |")
print()
kkt = res["kkt+key_cache"]["sweeps"]
print("KKT filter, % of keys dropped per sweep (every 10th sweep, and the first):",
      ", ".join(f"{x['sweep']}: {x['filtered_pct']:.1f}" for x in kkt if x["sweep"] == 1 or x["sweep"] % 10 == 0))
plot = {"title": "sparse LR by delayed block proximal gradient, clothing reviews, L1, 4 workers, 2 servers",
  "panels": [
    {"title": "keys dropped by the KKT filter (full sweeps every 10th)", "x": "sweep", "y": "% of keys",
     "series": [{"name": "kkt", "points": [[x["sweep"], x["filtered_pct"]] for x in kkt]}]},
    {"title": "bytes sent per sweep, mean", "x": "configuration", "y": "bytes", "kind": "bar",
     "series": [{"name": n, "points": [[i, sum(r["bytes"] for r in res[n]["sweeps"]) / len(res[n]["sweeps"])]]}
                for i, n in enumerate(filters)]},
    {"title": f"objective - optimum against time, jitter {jitter} ms", "x": "seconds", "y": "objective - optimum",
     "log_y": True,
     "series": [{"name": f"tau {t}", "points": [[x["secs"], max(x["objective"] - optimum, 1e-3)] for x in r["sweeps"]]}
                for t, r in taus.items()]},
    {"title": "objective - optimum against sweep", "x": "sweep", "y": "objective - optimum", "log_y": True,
     "series": [{"name": f"tau {t}", "points": [[x["sweep"], max(x["objective"] - optimum, 1e-3)] for x in r["sweeps"]]}
                for t, r in taus.items()]},
  ]}
json.dump(plot, open(f"{out}/lr-plot.json", "w"))
PY
target/release/pslab plot --json "$out/lr-plot.json" --out "$out/lr.png"
echo "wrote $out/lr.json and $out/lr.png" >&2
