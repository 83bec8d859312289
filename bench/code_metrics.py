"""Structure of the rompatch package, read from its source: the numbers issue #13 asks for.

    python -m bench.code_metrics [--root DIR] [--json OUT]

It reads the import graph with ``ast`` (nothing is imported except for the timing at the end; imports under ``if TYPE_CHECKING:`` do not count):
internal imports (one per importing module and imported module and place), import loops (strongly
connected components of the module-level graph), upward imports (a module inside the package that
imports the package ``__init__``: ``from .. import x`` / ``from rompatch import x`` where ``x`` is not
a submodule), function-level internal imports, modules at the top level, the longest functions and
duplicated blocks (the ``duplicates`` tool, when it is on PATH). Last, ``import rompatch`` in a fresh
interpreter: its time (``-X importtime``, cumulative) and whether torch came with it.
"""

from __future__ import annotations

import argparse
import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def scan(root: Path) -> dict:
    pkg = root.name
    files = sorted(root.rglob("*.py"))
    modules = {module_name(f, root): f for f in files}
    edges: list[tuple[str, str, bool]] = []  # (importer, imported, inside a function)
    upward: list[str] = []
    functions: list[tuple[int, str]] = []

    for mod, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        is_package = path.name == "__init__.py"
        func_ranges = []
        typing_only = []  # `if TYPE_CHECKING:` blocks: imports for annotations, never run
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                typing_only.append((node.lineno, node.end_lineno))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                func_ranges.append((node.lineno, node.end_lineno))
                functions.append((node.end_lineno - node.lineno + 1, f"{mod}.{node.name}"))

        def in_function(line: int, ranges: list = func_ranges) -> bool:
            return any(a < line <= b for a, b in ranges)

        for node in ast.walk(tree):
            if any(a <= getattr(node, "lineno", 0) <= b for a, b in typing_only):
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = resolve(mod, is_package, node)
                for a in node.names:
                    sub = f"{base}.{a.name}" if base else a.name
                    targets.append(sub if sub in modules else base)
            for t in targets:
                if t != pkg and not t.startswith(pkg + "."):
                    continue
                if t not in modules:
                    # a name from a module path that is not one of ours (e.g. rompatch.x.y attribute)
                    while t and t not in modules:
                        t = t.rpartition(".")[0]
                if not t or t == mod:
                    continue
                if node.__class__ is ast.ImportFrom and t == pkg and mod != pkg:
                    upward.append(mod)
                elif t == pkg and mod != pkg:
                    upward.append(mod)
                # an import of a sub-package's __init__ from inside that sub-package is upward too
                if t != pkg and mod.startswith(t + ".") and modules[t].name == "__init__.py":
                    upward.append(mod)
                edges.append((mod, t, in_function(node.lineno)))

    edges = sorted(set(edges))  # one per importer, imported module and place (module or function)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for a, b, _ in edges:
        graph[a].add(b)
    loops = [sorted(c) for c in strongly_connected(graph) if len(c) > 1]
    # the same without the package __init__, whose re-exports would tie every upward import into a loop
    inner = {m: {t for t in ts if t != pkg} for m, ts in graph.items() if m != pkg}
    inner_loops = [sorted(c) for c in strongly_connected(inner) if len(c) > 1]
    top_level = [m for m, p in modules.items() if m.count(".") == 1 and p.name != "__init__.py"]
    sub_packages = sorted(m for m, p in modules.items() if p.name == "__init__.py" and m.count(".") == 1)
    functions.sort(reverse=True)
    return {
        "modules": len(modules),
        "top_level_modules": len(top_level),
        "sub_packages": sub_packages,
        "internal_imports": len({(a, b) for a, b, _ in edges}),
        "function_level_internal_imports": sum(1 for *_, f in edges if f),
        "function_level_examples": sorted({f"{a} -> {b}" for a, b, f in edges if f})[:40],
        "import_loops": loops,
        "import_loops_without_init": inner_loops,
        "upward_imports": sorted(set(upward)),
        "longest_functions": [f"{n} {name}" for n, name in functions[:12]],
        "functions_over_60_lines": sum(1 for n, _ in functions if n > 60),
    }


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
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
            out.append(comp)

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def duplicated_blocks(root: Path) -> str | None:
    tool = shutil.which("duplicates")
    if tool is None:
        return None
    run = subprocess.run([tool, "--repo", str(root), "--most", "200"], capture_output=True, text=True)
    return run.stdout.splitlines()[0] if run.stdout else run.stderr.strip()


def import_cost(root: Path) -> dict:
    code = "import sys, rompatch; print('torch' in sys.modules)"
    env_path = str(root.parent)
    best = None
    torch_loaded = None
    for _ in range(5):
        run = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", code],
            capture_output=True,
            text=True,
            cwd=env_path,
        )
        torch_loaded = run.stdout.strip() == "True"
        for line in run.stderr.splitlines():
            fields = [f.strip() for f in line.split("|")]
            if len(fields) == 3 and fields[2] == "rompatch":
                us = int(fields[1])
                best = us if best is None else min(best, us)
    return {"import_rompatch_ms": None if best is None else best / 1000, "torch_loaded": torch_loaded}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(Path(__file__).resolve().parent.parent / "rompatch"))
    ap.add_argument("--json", help="also write the numbers to this file")
    args = ap.parse_args()
    root = Path(args.root).resolve()
    report = scan(root)
    report["duplicates"] = duplicated_blocks(root)
    report.update(import_cost(root))
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
