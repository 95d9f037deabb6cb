#!/usr/bin/env python3
"""Makes docs/benchmarks.md, the page of current results, from measurements.

  scripts/bench-page.py run [SECTION ...]   measure (every section when none is
                                            named), save each as
                                            docs/bench/SECTION.json, then render
  scripts/bench-page.py render              write docs/benchmarks.md from the
                                            saved docs/bench/*.json alone
  scripts/bench-page.py list                the sections and their commands

PS_RDMA_LOG=FILE takes the rdma section from a log of scripts/rdma-test.sh
(e.g. a CI run's output) instead of running the suite again.

Each saved record holds the commands that made it, the commit (with "-dirty"
when the tree had changes), the date, the machine, and what was measured. The
page shows, per section: the hand-written note on what it measures and how to
read it (docs/bench/notes/SECTION.md), the commands, where and when they ran,
and the tables. Old results live in git history, not on the page.

Every section keeps a baseline measured in the same run beside pslab's number
(raw TCP, perftest, memcpy, one copy of every shard): on a shared machine only
ratios taken within one run carry over.
"""
import glob
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
BENCH_DIR = os.path.join(ROOT, "docs", "bench")
PAGE = os.path.join(ROOT, "docs", "benchmarks.md")
PSLAB = os.path.join(ROOT, "target", "release", "pslab")

# --- running -----------------------------------------------------------------


def sh(cmd, log=True):
    """Runs a shell command in the repository root; returns its stdout and
    stderr together. A failing command ends the script: a section is never
    saved from a run that did not finish."""
    if log:
        print(f"bench-page: $ {cmd}", file=sys.stderr, flush=True)
    p = subprocess.run(cmd, shell=True, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       errors="replace")
    if p.returncode != 0:
        sys.stderr.write(p.stdout[-4000:])
        sys.exit(f"bench-page: `{cmd}` exited {p.returncode}; nothing saved for this section")
    return p.stdout


def build_pslab():
    sh("cargo build --locked --release --bin pslab")


def read_json(path):
    with open(os.path.join(ROOT, path)) as f:
        return json.load(f)


def run_tcp():
    build_pslab()
    cmd = "target/release/pslab bench --repeat 3 --seconds 1 --json /tmp/bench-page-tcp.json --plot docs/bench/tcp-1s1w.png"
    sh(cmd)
    return [cmd], {"bench": read_json("/tmp/bench-page-tcp.json")}


def run_replication():
    build_pslab()
    cmds, runs = [], {}
    for c in (1, 2):
        cmd = (f"target/release/pslab bench --servers 2 --workers 2 --copies {c} --seconds 1 --window 8 "
               f"--dense-sizes 65536,1048576 --sparse-sizes 65536 --no-pin --no-baseline --json /tmp/bench-page-copies{c}.json")
        sh(cmd)
        cmds.append(cmd)
        runs[str(c)] = read_json(f"/tmp/bench-page-copies{c}.json")
    return cmds, runs


FAILOVER_RE = re.compile(r"failover: (\d+) connections moved .*longest (\d+) ms, mean (\d+) ms .*: (\d+) ms")


def run_failover():
    build_pslab()
    cmds, rows = [], []
    for s in (0, 1, 2):
        cmd = (f"target/release/pslab local --servers 3 --workers 3 --no-pin --app check "
               f"--params '{{\"rounds\": 300, \"keys\": 1500}}' --kill server{s}@400")
        out = sh(cmd)
        m = FAILOVER_RE.search(out)
        if not m or out.count("finished: invariant 1 holds") != 3:
            sys.exit(f"bench-page: `{cmd}` did not report a failover with invariant 1 held:\n{out[-3000:]}")
        cmds.append(cmd)
        rows.append({"killed": f"server{s}", "connections": int(m[1]), "longest_ms": int(m[2]), "mean_ms": int(m[3]),
                     "since_kill_ms": int(m[4])})
    return cmds, {"rows": rows}


SSP_RE = re.compile(r"^\[worker(\d+)\] ssp: (\{.*\})$", re.M)


def trim_zeros(counts):
    """A count per lag, without the zeros after the largest lag seen."""
    while counts and counts[-1] == 0:
        counts = counts[:-1]
    return counts


def run_ssp():
    build_pslab()
    cmds, rows = [], []
    for model in ("eventual", "bounded:3", "bounded:1", "sequential"):
        params = json.dumps({"clocks": 15, "keys": 2000, "model": model, "check": "bounded:15", "slow_ms": 30})
        cmd = f"target/release/pslab local --servers 2 --workers 3 --no-pin --app ssp --params '{params}'"
        out = sh(cmd)
        workers = {int(m[1]): json.loads(m[2]) for m in SSP_RE.finditer(out)}
        if len(workers) != 3:
            sys.exit(f"bench-page: `{cmd}` did not report 3 workers:\n{out[-3000:]}")
        cmds.append(cmd)
        rows.append({"model": model, "workers": {str(k): {"lags": trim_zeros(v["staleness_seen"]),
                                                          "wait_ms": round(v["read_wait_ms"])}
                                                 for k, v in sorted(workers.items())}})
    return cmds, {"rows": rows}


def criterion_results(groups):
    """Median estimates of the criterion benchmarks of `groups`, from
    target/criterion (written by the run just made)."""
    out = []
    for bench_json in sorted(glob.glob(os.path.join(ROOT, "target", "criterion", "**", "new", "benchmark.json"),
                                       recursive=True)):
        with open(bench_json) as f:
            b = json.load(f)
        if b["group_id"] not in groups:
            continue
        with open(os.path.join(os.path.dirname(bench_json), "estimates.json")) as f:
            est = json.load(f)
        out.append({"group": b["group_id"], "id": b["full_id"][len(b["group_id"]) + 1:],
                    "median_ns": est["median"]["point_estimate"], "throughput": b.get("throughput")})
    return out


def run_criterion(bench, groups):
    def run():
        # results of earlier runs would pass for this one's
        for g in groups:
            sh(f"rm -rf target/criterion/{g}", log=False)
        cmd = f"cargo bench --locked --bench {bench} -- --warm-up-time 0.5 --measurement-time 2"
        sh(cmd)
        return [cmd], {"results": criterion_results(groups)}
    return run


def run_rdma():
    """The soft-RoCE suite (build, lints, every RDMA step, the bench beside
    perftest), or, with PS_RDMA_LOG=FILE, the table from a log it already
    printed (a CI run's output: `.ci/run` runs it on every commit)."""
    log = os.environ.get("PS_RDMA_LOG")
    if log:
        cmd = f"scripts/rdma-test.sh (its output in {os.path.basename(log)}, read back by scripts/rdma-bench-table.py)"
        sh(f"python3 scripts/rdma-bench-table.py {log} /tmp/bench-page-rdma.json")
        with open(log, errors="replace") as f:
            out = f.read()
    else:
        cmd = "scripts/rdma-test.sh --bench-out /tmp/bench-page-rdma.json"
        out = sh(cmd)
    # the torn step's workers: READ blocks found torn and read again; and
    # whether any torn block reached a caller (the step fails if one did)
    torn = [int(m) for m in re.findall(r'"torn_retries":(\d+)', out)]
    return [cmd], {"rows": read_json("/tmp/bench-page-rdma.json")["rows"], "torn_reread": sum(torn) if torn else None}


# --- rendering ---------------------------------------------------------------


def size_label(n):
    for unit, k in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= k and n % k == 0:
            return f"{n // k} {unit}iB"
    return f"{n} B"


def fmt(x, digits=3):
    if x is None:
        return "-"
    if x == 0:
        return "0"
    mag = max(0, digits - 1 - int(f"{abs(x):e}".split("e")[1]))
    return f"{x:.{mag}f}"


def table(head, rows):
    """A markdown table: the header cells, then one list of cells per row."""
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(map(str, r)) + " |" for r in rows]


def render_tcp(res):
    b = res["bench"]
    lines = ["![throughput and latency](bench/tcp-1s1w.png)", "",
             f"{b['servers']} server x {b['shards']} shard, {b['workers']} worker; medians of {b.get('repeat', 1)} runs, "
             "each ratio taken within its run.", "",
             ]
    lines += table(["layout", "op", "bytes", "keys", "ops/s", "GB/s", "p50 µs", "p99 µs", "raw GB/s", "GB/s / raw", "p50 / raw"],
                   [[r["layout"], r["op"], size_label(r["size"]), r["keys"], fmt(r["ops_per_s"], 4), fmt(r["gb_per_s"]),
                     fmt(r["p50_us"]), fmt(r["p99_us"]), fmt(r.get("baseline_gb_per_s")), fmt(r.get("ratio_gb_per_s"), 2),
                     fmt(r.get("ratio_p50"), 2)] for r in b["rows"]])
    return lines


def render_replication(res):
    one = {(r["layout"], r["op"], r["size"]): r for r in res["1"]["rows"]}
    two = {(r["layout"], r["op"], r["size"]): r for r in res["2"]["rows"]}
    rows = []
    for k, r1 in one.items():
        r2 = two.get(k)
        g2 = r2["gb_per_s"] if r2 else None
        ratio = g2 / r1["gb_per_s"] if g2 and r1["gb_per_s"] else None
        rows.append([k[0], k[1], size_label(k[2]), fmt(r1["gb_per_s"]), fmt(g2), fmt(ratio, 2)])
    lines = ["GB/s of the workers together.", ""] + table(["layout", "op", "bytes", "1 copy", "2 copies", "2 / 1"], rows)
    return lines


def render_failover(res):
    lines = table(["killed", "connections moved", "longest, lost connection to first answer", "mean", "kill to last answer"],
                  [[r["killed"], r["connections"], f"{r['longest_ms']} ms", f"{r['mean_ms']} ms", f"{r['since_kill_ms']} ms"]
                   for r in res["rows"]])
    return lines


def render_ssp(res):
    rows = []
    for r in res["rows"]:
        w = r["workers"]
        fast = [w[k] for k in ("1", "2") if k in w]
        rows.append([r["model"], "; ".join(str(f["lags"]) for f in fast), " and ".join(f"{f['wait_ms']} ms" for f in fast),
                     f"{w['0']['wait_ms']} ms"])
    lines = table(["model", "lags seen (count at lag 0, 1, ...), workers 1 and 2", "their wait in reads",
                   "the straggler's wait"], rows)
    return lines


def rate(r):
    t = r.get("throughput") or {}
    secs = r["median_ns"] * 1e-9
    if "Bytes" in t:
        return f"{fmt(t['Bytes'] / secs / (1 << 30))} GiB/s"
    if "Elements" in t:
        return f"{fmt(t['Elements'] / secs / 1e6)} M/s"
    return ""


def time_label(ns):
    for unit, k in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if ns >= k:
            return f"{ns / k:.3g} {unit}"
    return f"{ns:.3g} ns"


BASELINE_RE = re.compile(r"^(copy|memcpy)(/|-|$)")


def size_part(bench_id):
    """The size a benchmark id ends in: `add/avx512/1MiB` and `memcpy-16MiB`
    name theirs last (after a slash, else after a dash)."""
    return bench_id.rsplit("/", 1)[-1] if "/" in bench_id else bench_id.rsplit("-", 1)[-1]


def render_criterion(res):
    """One table per group; where the group has a baseline of the same size
    (copy or memcpy, same last path part), the ratio of rates against it."""
    lines = []
    groups = {}
    for r in res["results"]:
        groups.setdefault(r["group"], []).append(r)
    for g, rows in groups.items():
        base = {}
        for r in rows:
            if BASELINE_RE.match(r["id"]):
                base[size_part(r["id"])] = r
        lines += [f"`{g}`:", "", "| benchmark | median | rate | rate / baseline's |", "|---|---|---|---|"]
        for r in rows:
            b = base.get(size_part(r["id"]))
            ratio = "" if b is None or b is r else f"{b['median_ns'] / r['median_ns']:.2f}"
            lines.append(f"| {r['id']} | {time_label(r['median_ns'])} | {rate(r)} | {ratio} |")
        lines.append("")
    return lines


def render_rdma(res):
    lines = ["GB/s (10^9 B/s for both tools), medians over rounds; ratio = median over rounds of pslab over the "
             "perftest runs around it.", "",
             "| size | push_win | ib_write_bw | push ratio | pull_win | ib_read_bw | pull ratio |", "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {size_label(r['size'])} | {fmt(r.get('push_win_gb_per_s'))} | {fmt(r.get('ib_write_bw_gb_per_s'))} | "
                     f"{fmt(r.get('push_ratio'), 2)} | {fmt(r.get('pull_win_gb_per_s'))} | {fmt(r.get('ib_read_bw_gb_per_s'))} | "
                     f"{fmt(r.get('pull_ratio'), 2)} |")
    if res.get("torn_reread") is not None:
        lines += ["", f"In the same suite run, the torn-read step's workers found {res['torn_reread']} blocks torn by "
                      "concurrent pushes and read them again; none reached a caller (the step fails if one does)."]
    return lines


SECTIONS = [
    ("tcp", "Push/pull over TCP on 127.0.0.1 (`pslab bench`)", run_tcp, render_tcp),
    ("rdma", "Push/pull over RDMA on soft-RoCE, beside perftest", run_rdma, render_rdma),
    ("replication", "What chain replication costs", run_replication, render_replication),
    ("failover", "How fast a failover is", run_failover, render_failover),
    ("ssp", "Reads under a staleness bound with a straggler (`ssp` app)", run_ssp, render_ssp),
    ("kernels", "Merge kernels (criterion)", run_criterion("kernels", ["dense_add", "bulk_copy", "axpy", "scatter_add"]),
     render_criterion),
    ("store", "Shard-side merge cost (criterion)", run_criterion("store", ["sparse_store", "dense_store"]), render_criterion),
]


def git(*args):
    return subprocess.run(["git", *args], cwd=ROOT, stdout=subprocess.PIPE, text=True).stdout.strip()


def machine():
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu": cpu, "kernel": platform.release()}


def measure(name, run):
    commit = git("rev-parse", "--short", "HEAD")
    # a change under docs/ (this page, its records) does not change what runs
    if git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!docs"):
        commit += "-dirty"
    started = time.time()
    commands, result = run()
    record = {"section": name, "commands": commands, "commit": commit,
              "date": time.strftime("%Y-%m-%d", time.gmtime(started)), "seconds": round(time.time() - started),
              "machine": machine(), "result": result}
    with open(os.path.join(BENCH_DIR, f"{name}.json"), "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    print(f"bench-page: {name} measured in {record['seconds']} s", file=sys.stderr)


def render():
    out = ["# Benchmarks", "",
           "<!-- made by scripts/bench-page.py from docs/bench/*.json and docs/bench/notes/*.md: edit those, then "
           "run `scripts/bench-page.py render` -->", ""]
    with open(os.path.join(BENCH_DIR, "notes", "intro.md")) as f:
        out += [f.read().strip(), ""]
    for name, title, _, rend in SECTIONS:
        path = os.path.join(BENCH_DIR, f"{name}.json")
        out += [f"## {title}", ""]
        note = os.path.join(BENCH_DIR, "notes", f"{name}.md")
        if os.path.exists(note):
            with open(note) as f:
                out += [f.read().strip(), ""]
        if not os.path.exists(path):
            out += [f"Not measured yet: `scripts/bench-page.py run {name}`.", ""]
            continue
        with open(path) as f:
            rec = json.load(f)
        m = rec["machine"]
        out += ["```sh"] + rec["commands"] + ["```", "",
                f"Commit {rec['commit']}, {rec['date']}, {m['cpus']} cores ({m['cpu'] or 'cpu unknown'}), "
                f"kernel {m['kernel']}; {rec['seconds']} s of measuring.", ""]
        out += rend(rec["result"]) + [""]
    with open(PAGE, "w") as f:
        f.write("\n".join(out).rstrip() + "\n")
    print(f"bench-page: wrote {os.path.relpath(PAGE, ROOT)}", file=sys.stderr)


def main(argv):
    names = [s[0] for s in SECTIONS]
    if not argv or argv[0] not in ("run", "render", "list"):
        sys.exit(__doc__)
    if argv[0] == "list":
        for name, title, _, _ in SECTIONS:
            print(f"{name:12} {title}")
        return
    if argv[0] == "run":
        wanted = argv[1:] or names
        unknown = [w for w in wanted if w not in names]
        if unknown:
            sys.exit(f"bench-page: no section {', '.join(unknown)}; the sections: {', '.join(names)}")
        for name, _, run, _ in SECTIONS:
            if name in wanted:
                measure(name, run)
    render()


if __name__ == "__main__":
    main(sys.argv[1:])
