"""`make bench`: run the benchmarks, print a table, and write bench/RESULTS.md.

Each ``bench/bench_<name>.py`` defines ``TITLE``, ``FULL_ONLY`` (True for long runs that only
``make bench-full`` or ``--only`` starts), optionally ``skip_reason() -> str | None`` (a benchmark
that cannot run here, such as the GPU one without CUDA, is skipped and its last result kept) and
``run() -> dict`` returning::

    {"rows": [{"metric": str, "value": str|float, "unit": str, "target": str, "note": str}, ...],
     "markdown": "optional extra Markdown (tables, figures) for RESULTS.md",
     "setup": "what was measured, on what"}

Results are kept per benchmark in ``bench/results/<name>.json`` so a long run (for example the
full CounterFact evaluation) is written once and shown in every later RESULTS.md.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"


def machine() -> str:
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    load = os.getloadavg()[0]
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch "
        f"threads, {dev}, torch {torch.__version__}, load average {load:.1f} when it finished"
    )


def discover() -> list[str]:
    return sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))


def run_one(name: str) -> dict:
    mod = importlib.import_module(f"bench.bench_{name}")
    t0 = time.perf_counter()
    res = mod.run()
    res.update(
        name=name,
        title=getattr(mod, "TITLE", name),
        seconds=round(time.perf_counter() - t0, 1),
        machine=machine(),
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    RESULTS_DIR.mkdir(exist_ok=True)
    tmp = RESULTS_DIR / f".{name}.json.tmp"
    tmp.write_text(json.dumps(res, indent=2, ensure_ascii=False) + "\n")
    tmp.replace(RESULTS_DIR / f"{name}.json")
    return res


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def table(rows: list[dict]) -> str:
    out = ["| metric | value | unit | target | note |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        out.append(
            f"| {r['metric']} | {_fmt(r['value'])} | {r.get('unit', '')} | {r.get('target', '')} | {r.get('note', '')} |"
        )
    return "\n".join(out)


def render() -> str:
    parts = [
        "# Benchmark results",
        "",
        "Written by `make bench` (quick benchmarks) and `make bench-full` (long runs such as the full",
        "CounterFact evaluation). Each section records when, where and how long it ran. Numbers are",
        "measurements, never asserted in tests.",
        "",
    ]
    for name in discover():
        f = RESULTS_DIR / f"{name}.json"
        if not f.is_file():
            continue
        r = json.loads(f.read_text())
        parts += [f"## {r['title']}", "", f"_{r['date']} · {r['machine']} · run took {r['seconds']} s_", ""]
        if r.get("setup"):
            parts += [r["setup"], ""]
        parts += [table(r["rows"]), ""]
        if r.get("markdown"):
            parts += [r["markdown"].rstrip(), ""]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="also run the long benchmarks")
    ap.add_argument("--only", nargs="*", help="run only these benchmarks (by name)")
    ap.add_argument("--render", action="store_true", help="only re-render RESULTS.md from bench/results")
    args = ap.parse_args(argv)
    names = discover()
    if args.only:
        unknown = set(args.only) - set(names)
        if unknown:
            print(
                f"error: unknown benchmark(s) {', '.join(sorted(unknown))}; known: {', '.join(names)}",
                file=sys.stderr,
            )
            return 2
        names = args.only
    elif not args.full:
        names = [
            n for n in names if not getattr(importlib.import_module(f"bench.bench_{n}"), "FULL_ONLY", False)
        ]
    if not args.render:
        for n in names:
            why = getattr(importlib.import_module(f"bench.bench_{n}"), "skip_reason", lambda: None)()
            if why:  # e.g. the GPU benchmark without a GPU: the last result (if any) is kept
                print(f"== {n}: skipped ({why})", file=sys.stderr, flush=True)
                continue
            print(f"== {n}", file=sys.stderr, flush=True)
            res = run_one(n)
            print(f"\n{res['title']} ({res['seconds']} s)\n{table(res['rows'])}\n", flush=True)
    (HERE / "RESULTS.md").write_text(render())
    print(f"wrote {HERE / 'RESULTS.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
