#!/usr/bin/env python3
"""Turns the soft-RoCE suite's log into the RDMA bench table: pslab's dense push
and pull goodput beside ib_write_bw and ib_read_bw (perftest) on the same rxe
device in the same VM boot.

The suite runs, per round and size: perftest, pslab bench, perftest again. A
round's ratio is pslab over the mean of the perftest runs around it (the VM's
speed drifts over minutes); the table shows the median over rounds.
For pslab the better of one-op-at-a-time and 8-in-flight where both ran (the
suite runs only the windowed ops, 8 in flight; perftest keeps 128).

usage: rdma-bench-table.py LOG [OUT.json]"""
import json
import statistics
import sys

lines = open(sys.argv[1], errors="replace").read().splitlines()
perf = {}   # (round, op, size) -> [GB/s]
bench = {}  # (round, size) -> {op: GB/s}
inside, buf, rnd = False, [], None
for line in lines:
    if line.startswith("@begin bench-json"):
        inside, buf, rnd = True, [], line.split()[-1]
    elif line.startswith("@end bench-json"):
        inside = False
        try:
            for r in json.loads("".join(buf))["rows"]:
                if r["layout"] == "dense":
                    bench.setdefault((rnd, r["size"]), {})[r["op"]] = r["gb_per_s"]
        except (ValueError, KeyError):
            pass
    elif inside:
        buf.append(line.strip())
    elif line.startswith("@perf "):
        f = line.split()
        # @perf ROUND OP SIZE bytes iters bw_peak bw_avg msg_rate; perftest's
        # MB/s is 2^20 B/s (its MEGA is 1048576 unless --report_gbits), pslab's
        # GB/s is 10^9 B/s: converted here, so the ratio compares like with like
        if len(f) >= 9 and float(f[7]) > 0:
            perf.setdefault((f[1], f[2], int(f[3])), []).append(float(f[7]) * 1048576 / 1e9)
if not bench or not perf:
    print("rdma-bench-table: no bench or perftest output in the log (bench skipped?)")
    sys.exit(0)

rows = []
print("RDMA bench on soft-RoCE (rxe0, qemu TCG), 1 server x 1 shard, 1 worker: pslab vs perftest, same boot")
print("GB/s, medians over rounds; ratio = median over rounds of pslab / perftest measured around it")
print(f"{'size':>9} {'push':>8} {'push_win':>9} {'ib_write':>9} {'ratio':>6}   {'pull':>8} {'pull_win':>9} {'ib_read':>9} {'ratio':>6}")
med = lambda xs: statistics.median(xs) if xs else None
for size in sorted({s for (_, s) in bench}):
    rounds = sorted(r for (r, s) in bench if s == size)
    row = {"size": size, "rounds": len(rounds)}
    for kind, ops, pop in (("push", ("push", "push_win"), "write"), ("pull", ("pull", "pull_win"), "read")):
        ratios, base = [], []
        for r in rounds:
            b = bench[(r, size)]
            best = max([b.get(o) or 0 for o in ops])
            p = perf.get((r, pop, size))
            if p:
                base.append(sum(p) / len(p))
                ratios.append(best / base[-1])
        for o in ops:
            row[f"{o}_gb_per_s"] = med([bench[(r, size)][o] for r in rounds if o in bench[(r, size)]])
        row[f"ib_{pop}_bw_gb_per_s"] = med(base)
        row[f"{kind}_ratio"] = med(ratios)
        row[f"{kind}_ratios"] = ratios
    rows.append(row)
    fmt = lambda x, p=4: "-" if x is None else f"{x:.{p}f}"
    print(f"{size:>9} {fmt(row['push_gb_per_s']):>8} {fmt(row['push_win_gb_per_s']):>9} {fmt(row['ib_write_bw_gb_per_s']):>9} "
          f"{fmt(row['push_ratio'], 2):>6}   {fmt(row['pull_gb_per_s']):>8} {fmt(row['pull_win_gb_per_s']):>9} "
          f"{fmt(row['ib_read_bw_gb_per_s']):>9} {fmt(row['pull_ratio'], 2):>6}")
if len(sys.argv) > 2:
    json.dump({"rows": rows}, open(sys.argv[2], "w"), indent=2)
