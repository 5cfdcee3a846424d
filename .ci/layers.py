#!/usr/bin/env python3
"""Keeps the source's layers pointing one way. Fails (exit 1) when

- a module outside src/http/, src/startup.rs and src/main.rs uses `crate::http`
  (the services below the web must not reach back up into it), or
- source files import each other in a circle (file A uses something of file
  B, which uses something of A, directly or through others).

A module's own file (`mod.rs`, or `x.rs` beside `x/`) declaring and
re-exporting its children is not an edge: a child using its parent's types
is how Rust modules are built, the other way round would not be.

Usage: .ci/layers.py [REPO]   (a stdlib-only script: rustc has no such lint,
and a crate graph tool would see crates, not files.)
"""
import pathlib
import re
import sys

root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else ".")
src = root / "src"
ABOVE = ("http", "startup", "main")


def module_of(path):
    """`src/chat/send.rs` → ("chat", "send"); `src/chat/mod.rs` → ("chat",)."""
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "mod" or (len(parts) == 1 and parts[0] in ("lib", "main")):
        parts = parts[:-1] if parts[-1] == "mod" else []
    return tuple(parts)


files = {module_of(f): f for f in sorted(src.rglob("*.rs")) if f.name != "main.rs"}
files[("main",)] = src / "main.rs"


def strip_comments(text):
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def expand(prefix, tree):
    """Expands a use tree (`a::{b, c::{d}}`) into full paths."""
    tree = tree.strip()
    if not tree:
        return []
    brace = tree.find("{")
    if brace < 0:
        path = tree.split(" as ")[0].strip()
        return [prefix + [p for p in path.split("::") if p]]
    head = [p for p in tree[:brace].split("::") if p]
    inner, depth, item, out = tree[brace + 1 : tree.rfind("}")], 0, "", []
    for ch in inner + ",":
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        if ch == "," and depth == 0:
            out += expand(prefix + head, item)
            item = ""
        else:
            item += ch
    return out


def resolve(here, path):
    """The module a path starting `crate`/`super`/`self` lands in, as the
    longest prefix that is a file of ours."""
    if path[0] == "crate":
        base, rest = [], path[1:]
    elif path[0] in ("super", "self"):
        base = list(here)
        rest = list(path)
        while rest and rest[0] in ("super", "self"):
            if rest.pop(0) == "super":
                base = base[:-1]
    else:
        return None
    full = base + [p for p in rest if p != "self"]
    for n in range(len(full), -1, -1):
        if tuple(full[:n]) in files:
            return tuple(full[:n])
    return None


edges = {m: set() for m in files}
below_uses_http = []
for mod, path in files.items():
    text = strip_comments(path.read_text(errors="replace"))
    paths = []
    for m in re.finditer(r"\b(?:pub(?:\([^)]*\))?\s+)?use\s+([^;]*);", text, re.S):
        tree = re.sub(r"\s+", " ", m.group(1))
        paths += expand([], tree)
    # Paths written out in code, not imported.
    paths += [p.split("::") for p in re.findall(r"\b(?:crate|super)(?:::\w+)+", text)]
    for p in paths:
        if not p or p[0] not in ("crate", "super", "self"):
            continue
        target = resolve(mod, p)
        if target is None or target == mod:
            continue
        # A parent declaring or re-exporting its own children is no edge.
        if target[: len(mod)] == mod:
            continue
        edges[mod].add(target)
        if target[:1] == ("http",) and (mod[0] if mod else "") not in ABOVE:
            below_uses_http.append(f"src/{'/'.join(mod)} uses crate::http")


def cycles(graph):
    """Strongly connected components with more than one file (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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
                out.append(comp)

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


problems = sorted(set(below_uses_http))
for comp in cycles(edges):
    names = sorted("src/" + ("/".join(m) or "lib") + ".rs" for m in comp)
    problems.append("files importing each other in a circle: " + ", ".join(names))
if problems:
    print("\n".join(problems))
    sys.exit(1)
print(f"layers: {len(files)} files, no import from below into http, no circle of files")
