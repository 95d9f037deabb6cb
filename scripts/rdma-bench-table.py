#!/usr/bin/env python3
"""Turns the soft-RoCE suite's log into the RDMA bench table: pslab's dense push
and pull goodput beside ib_write_bw and ib_read_bw (perftest) measured on the
same rxe device in the same VM boot, and their ratios.

usage: rdma-bench-table.py LOG [OUT.json]"""
import json
import sys

log = open(sys.argv[1], errors="replace").read().splitlines()
bench, perf, inside = None, {}, False
buf = []
for line in log:
    if line.startswith("@begin bench-json"):
        inside, buf = True, []
    elif line.startswith("@end bench-json"):
        inside = False
        try:
            bench = json.loads("".join(buf))
        except ValueError:
            bench = None
    elif inside:
        buf.append(line.strip())
    elif line.startswith("@perf "):
        f = line.split()
        # @perf OP SIZE bytes iters bw_peak bw_avg msg_rate  (MB/s = 10^6 B/s, perftest's unit)
        if len(f) >= 8:
            perf[(f[1], int(f[2]))] = float(f[6]) * 1e6 / 1e9
if bench is None or not perf:
    print("rdma-bench-table: no bench or perftest output in the log (bench skipped?)")
    sys.exit(0)
rows = []
print("RDMA bench on soft-RoCE (rxe0, qemu TCG): pslab goodput vs perftest, same device, same boot")
print("push/pull: one op at a time; push_win/pull_win: 8 in flight (perftest keeps 128 in flight)")
print(f"{'size':>9} {'push':>8} {'push_win':>9} {'ib_write_bw':>12} {'ratio':>6}   {'pull':>8} {'pull_win':>9} {'ib_read_bw':>11} {'ratio':>6}")
for size in sorted({r["size"] for r in bench["rows"] if r["layout"] == "dense"}):
    get = lambda op: next((r for r in bench["rows"] if r["layout"] == "dense" and r["op"] == op and r["size"] == size), None)
    g = lambda op: (get(op) or {}).get("gb_per_s")
    w, rd = perf.get(("write", size)), perf.get(("read", size))
    row = {"size": size, "push_gb_per_s": g("push"), "push_win_gb_per_s": g("push_win"), "ib_write_bw_gb_per_s": w,
           "pull_gb_per_s": g("pull"), "pull_win_gb_per_s": g("pull_win"), "ib_read_bw_gb_per_s": rd}
    best_push = max(x for x in (row["push_gb_per_s"], row["push_win_gb_per_s"], 0) if x is not None)
    best_pull = max(x for x in (row["pull_gb_per_s"], row["pull_win_gb_per_s"], 0) if x is not None)
    row["push_ratio"] = best_push / w if w else None
    row["pull_ratio"] = best_pull / rd if rd else None
    rows.append(row)
    fmt = lambda x, p=4: "-" if x is None else f"{x:.{p}f}"
    print(f"{size:>9} {fmt(row['push_gb_per_s']):>8} {fmt(row['push_win_gb_per_s']):>9} {fmt(w):>12} {fmt(row['push_ratio'], 2):>6}   "
          f"{fmt(row['pull_gb_per_s']):>8} {fmt(row['pull_win_gb_per_s']):>9} {fmt(rd):>11} {fmt(row['pull_ratio'], 2):>6}")
print("ratio: the better of push/push_win (pull/pull_win) over perftest")
if len(sys.argv) > 2:
    json.dump({"rows": rows, "bench": bench, "perftest_gb_per_s": {f"{k[0]}-{k[1]}": v for k, v in perf.items()}},
              open(sys.argv[2], "w"), indent=2)
