"""The package's import graph, from the source (nothing is imported).

    python scripts/import_graph.py [--check]

Prints each module's imports of other package modules, split into module-level imports and
imports inside functions, then every cycle of the graph that counts both (a function-level import
that closes a loop is a cycle patched by hand). `--check` exits 1 when there is a cycle or a
function-level import of a package module.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys

PACKAGE = "gptoss_jax"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def modules(root: str = ROOT) -> dict[str, str]:
    """{dotted module name: path} of every .py file of the package."""
    out = {}
    for folder, _, files in os.walk(os.path.join(root, PACKAGE)):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                rel = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return out


def _resolve(name: str, level: int, here: str, is_package: bool, known) -> str | None:
    if level:
        base = here.split(".")
        base = base if is_package else base[:-1]
        base = base[: len(base) - (level - 1)]
        name = ".".join(base + ([name] if name else []))
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports(root: str = ROOT) -> dict[str, dict[str, set]]:
    """{module: {"top": {modules}, "function": {modules}}} for imports of package modules."""
    mods = modules(root)
    graph = {}
    for mod, path in mods.items():
        tree = ast.parse(open(path).read(), path)
        is_pkg = path.endswith("__init__.py")
        edges = {"top": set(), "function": set()}

        def visit(node, in_function: bool):
            for child in ast.iter_child_nodes(node):
                inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                targets = []
                if isinstance(child, ast.Import):
                    targets = [a.name for a in child.names]
                elif isinstance(child, ast.ImportFrom):
                    # `from pkg import name`: the submodule pkg.name when there is one, else pkg itself
                    base = _resolve(child.module or "", child.level, mod, is_pkg, mods)
                    targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in child.names]
                else:
                    visit(child, inner)
                    continue
                for t in targets:
                    t = t if t in mods else _resolve(t, 0, mod, is_pkg, mods) if t else None
                    if t and t != mod and t.split(".")[0] == PACKAGE:
                        edges["function" if in_function else "top"].add(t)

        visit(tree, False)
        edges["function"] -= edges["top"]
        graph[mod] = edges
    return graph


def _shortest_loop(adj, start: str) -> list[str] | None:
    """The shortest path start -> ... -> start (breadth-first), without the closing start."""
    prev, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for u in frontier:
            for v in adj.get(u, ()):
                if v == start:
                    loop = [u]
                    while prev[loop[-1]] is not None:
                        loop.append(prev[loop[-1]])
                    return loop[::-1]
                if v not in prev:
                    prev[v] = u
                    nxt.append(v)
        frontier = nxt
    return None


def cycles(graph) -> list[list[str]]:
    """The shortest cycle through each module that lies on one, over the union of top-level and
    function-level edges, each rotated to start at its smallest name and listed once."""
    adj = {m: sorted(e["top"] | e["function"]) for m, e in graph.items()}
    found = set()
    for start in adj:
        loop = _shortest_loop(adj, start)
        if loop:
            i = loop.index(min(loop))
            found.add(tuple(loop[i:] + loop[:i]))
    return [list(c) for c in sorted(found)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 on a cycle or a function-level package import")
    p.add_argument("--root", default=ROOT, help="the folder holding the package (default: this checkout)")
    args = p.parse_args(argv)
    graph = imports(args.root)
    n_fn = 0
    for mod in sorted(graph):
        e = graph[mod]
        n_fn += len(e["function"])
        print(
            f"{mod}: {', '.join(sorted(e['top'])) or '-'}"
            + (f"  | inside functions: {', '.join(sorted(e['function']))}" if e["function"] else "")
        )
    loops = cycles(graph)
    print(
        f"\n{len(graph)} modules, {sum(len(e['top']) for e in graph.values())} module-level edges, "
        f"{n_fn} function-level edges, {len(loops)} cycles"
    )
    for c in loops:
        print("  cycle: " + " -> ".join(c + [c[0]]))
    return 1 if args.check and (loops or n_fn) else 0


if __name__ == "__main__":
    sys.exit(main())
