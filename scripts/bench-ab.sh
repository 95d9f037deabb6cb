#!/usr/bin/env bash
# Two pslab builds side by side on this machine (is a change a regression, or
# is it noise?): per round, A's `pslab bench` then B's (order alternating), over
# TCP on 127.0.0.1, dense and sparse push and pull at SIZES. Prints, per
# (layout, op, size), the median GB/s of each build, B/A, and the noise: how
# far two rounds of the same build differ (the median over A's consecutive
# rounds of |a_i / a_(i+1) - 1|, and the same for B). A change is "no slower"
# where B/A is above 1 minus that noise.
#
#   scripts/bench-ab.sh A_PSLAB B_PSLAB [ROUNDS] [SIZES] [SECONDS]
# e.g. the tree against an older commit (build it in a worktree, then copy
# its target/release/pslab away):
#   scripts/bench-ab.sh /tmp/pslab-old target/release/pslab 6 4096,262144,4194304 1
set -euo pipefail
a=${1:?usage: bench-ab.sh A_PSLAB B_PSLAB [ROUNDS] [SIZES] [SECONDS]}
b=${2:?usage: bench-ab.sh A_PSLAB B_PSLAB [ROUNDS] [SIZES] [SECONDS]}
rounds=${3:-6}
sizes=${4:-4096,262144,4194304}
secs=${5:-1}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
for r in $(seq 1 "$rounds"); do
  order="a b"
  [ $((r % 2)) -eq 0 ] && order="b a"
  for who in $order; do
    bin=$a
    [ "$who" = b ] && bin=$b
    "$bin" bench --no-baseline --seconds "$secs" --dense-sizes "$sizes" --sparse-sizes "$sizes" \
      --json "$dir/$who-$r.json" >/dev/null 2>&1 || { echo "bench-ab: $who ($bin) failed in round $r" >&2; exit 1; }
  done
  echo "bench-ab: round $r of $rounds done" >&2
done
python3 - "$dir" "$rounds" <<'PY'
import json, statistics, sys
d, rounds = sys.argv[1], int(sys.argv[2])
runs = {w: [json.load(open(f"{d}/{w}-{r}.json"))["rows"] for r in range(1, rounds + 1)] for w in "ab"}
def series(w, key):
    return [next(x["gb_per_s"] for x in rows if (x["layout"], x["op"], x["size"]) == key) for rows in runs[w]]
def noise(v):
    return statistics.median(abs(x / y - 1) for x, y in zip(v, v[1:])) if len(v) > 1 else float("nan")
keys = [(x["layout"], x["op"], x["size"]) for x in runs["a"][0]]
print(f"{'layout':7} {'op':9} {'size':>8}  {'A GB/s':>8} {'B GB/s':>8}  {'B/A':>5}  {'noise A':>7} {'noise B':>7}  verdict")
for k in keys:
    va, vb = series("a", k), series("b", k)
    ma, mb = statistics.median(va), statistics.median(vb)
    n = max(noise(va), noise(vb))
    verdict = "same" if abs(mb / ma - 1) <= n else ("faster" if mb > ma else "SLOWER")
    print(f"{k[0]:7} {k[1]:9} {k[2]:>8}  {ma:8.3f} {mb:8.3f}  {mb / ma:5.2f}  {noise(va):7.1%} {noise(vb):7.1%}  {verdict}")
PY
