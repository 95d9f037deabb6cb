#!/usr/bin/env python3
"""Import cycles between the top-level modules of a crate (issue 17: "no import
cycle between modules").

    scripts/module-cycles.py crates/ps-core/src [more source folders...]

A module is a file or folder directly under the source folder; an edge A -> B
is a `crate::B` path in A's non-test code (comment lines, what follows a
`#[cfg(test)] mod tests`, and files declared `#[cfg(test)] mod x;` left out). Prints each strongly connected component
of more than one module; exits 1 if there is any. Crates themselves are
acyclic by Cargo's rules.
"""
import os
import re
import sys


def test_only_files(root):
    """Files declared `#[cfg(test)] mod name;` by their parent module."""
    skip = set()
    for folder, _, files in os.walk(root):
        for name in files:
            if not name.endswith(".rs"):
                continue
            src = open(os.path.join(folder, name), encoding="utf-8").read()
            here = folder if name in ("mod.rs", "lib.rs", "main.rs") else os.path.join(folder, name[:-3])
            for m in re.findall(r"#\[cfg\(test\)\]\s*(?:pub(?:\([^)]*\))?\s+)?mod (\w+);", src):
                skip.add(os.path.join(here, m + ".rs"))
                skip.add(os.path.join(here, m, "mod.rs"))
    return skip


def edges(root):
    graph = {}
    skip = test_only_files(root)
    for folder, _, files in os.walk(root):
        for name in files:
            if not name.endswith(".rs"):
                continue
            path = os.path.join(folder, name)
            if path in skip:
                continue
            top = os.path.relpath(path, root).split("/")[0].removesuffix(".rs")
            if top in ("lib", "main"):
                continue
            src = open(path, encoding="utf-8").read()
            src = re.split(r"#\[cfg\(test\)\]\s*mod tests", src)[0]
            src = "\n".join(l for l in src.split("\n") if not l.strip().startswith("//"))
            graph.setdefault(top, set())
            for m in re.findall(r"crate::([a-z_0-9]+)", src):
                if m != top:
                    graph[top].add(m)
    return graph


def components(graph):
    """Tarjan's strongly connected components, those of two or more."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


found = False
for root in sys.argv[1:]:
    comps = components(edges(root))
    found |= bool(comps)
    print(f"{root}: " + ("; ".join(" <-> ".join(c) for c in comps) if comps else "no cycle"))
sys.exit(1 if found else 0)
