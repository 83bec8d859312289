"""Fingerprint of what the library computes, to compare two versions of the code (issue #13).

    ROMPATCH_DATA=... PYTHONPATH=<tree> python bench/bench_restructure.py OUT.json [--records 50]
    python -m bench.run --only restructure     # this tree against bench/results/restructure_before.json

With the tree's own rompatch on ``PYTHONPATH``, it edits SmolLM2 (layer 4, WikiText-2 statistics,
100,000 tokens, a fresh cache) on the first N CounterFact records, each on the unedited model, and
records for each patch the sha256 of u and v and its metrics (timings left out). Then it applies
the first five patches to the model's checkpoint folder, reverts the third, and records the sha256
of every file each step wrote. Two trees that compute the same give the same JSON, bar the tree.
It reads only public API that every version since issue #12 has.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

TITLE = "Restructure (issue 13): same patches and checkpoints, and the package's structure before and after"
FULL_ONLY = True
HERE = Path(__file__).resolve().parent
BEFORE = HERE / "results" / "restructure_before.json"  # made by the code before the restructure (e35da83)
METRICS_BEFORE = HERE / "results" / "code_metrics_before.json"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tensor_sha(t) -> str:  # noqa: ANN001
    return sha(t.detach().contiguous().cpu().numpy().tobytes())


# Hyperparameter names issue 13 retired (recorded in every delta before, never read): a checkpoint
# record embeds each patch, so its patch ids and hparams differ by exactly these names.
RETIRED_HPARAMS = ("key", "value", "target_spacing", "fact_token")
VOLATILE = ("applied_at", "created_at", "source", "timings")  # wall-clock times, temp paths


def _record(rec: dict) -> dict:
    """A checkpoint's rompatch.json without wall-clock times and temp paths, patches by position
    instead of id, and each embedded delta without the retired hyperparameter names."""
    order = {e["patch_id"]: f"#{i}" for i, e in enumerate(rec.get("applied", []))}

    def clean(x, hparams=False):  # noqa: ANN001, ANN202
        if isinstance(x, dict):
            drop = VOLATILE + (RETIRED_HPARAMS if hparams else ())
            return {k: clean(v, k == "hparams") for k, v in x.items() if k not in drop}
        if isinstance(x, list):
            return [clean(v) for v in x]
        if isinstance(x, str) and x in order:
            return order[x]
        return x

    out = clean(rec)
    for e in out.get("applied", []):
        patch = e.pop("patch", {})
        e["deltas"] = clean(json.loads(patch.get("deltas", "[]")))
        e["lineage"] = clean(json.loads(patch.get("lineage", "[]")))
    return out


def _undo(path: Path, rec: dict) -> dict[str, str]:
    """sha256 of each tensor of rompatch-undo.st, named by the patch's position instead of its id."""
    from safetensors import safe_open

    order = {e["patch_id"]: f"#{i}" for i, e in enumerate(rec.get("applied", []))}
    out = {}
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():
            name = k
            for pid, pos in order.items():
                name = name.replace(pid, pos)
            out[name] = tensor_sha(f.get_tensor(k))
    return out


def folder_shas(folder: Path) -> dict[str, str]:
    """sha256 of each file; the record (rompatch.json) and the undo file compared as ``_record`` and
    ``_undo`` describe (times, paths, patch ids and the retired hyperparameter names left out)."""
    rec = json.loads((folder / "rompatch.json").read_text())
    out = {}
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        rel = str(p.relative_to(folder))
        if p.name == "rompatch.json":
            out[rel] = sha(json.dumps(_record(rec), sort_keys=True).encode())
        elif p.name == "rompatch-undo.st":
            out[rel] = sha(json.dumps(_undo(p, rec), sort_keys=True).encode())
        else:
            out[rel] = sha(p.read_bytes())
    return out


def fingerprint(records: int, model_path: str) -> dict:
    """Edit the first ``records`` CounterFact records and apply/revert five of them on a checkpoint;
    the sha256s and metrics (see the module docstring)."""
    import torch

    data = Path(os.environ["ROMPATCH_DATA"])
    saved_cache = os.environ.get("ROMPATCH_CACHE")
    # Float sums in matrix products depend on how many threads split them: both versions run on one
    # thread (the 'before' fingerprint was made with OMP_NUM_THREADS=1), or equal code differs in the
    # last bits of v (seen: 19 of 50 v differ between 1 and 2 threads, with u and metrics equal).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="rompatch-restructure-"))
    os.environ["ROMPATCH_CACHE"] = str(work / "cache")

    import rompatch
    from rompatch import EditRequest, ROMEHyperParams, create_patch, load_model, load_records

    t0 = time.time()
    model, tok = load_model(model_path)
    _, recs = load_records(str(data / "counterfact" / "counterfact_subset.json"), limit=records)
    hp = ROMEHyperParams(layer=4)
    stats_data = None  # the default: WikiText-2 from $ROMPATCH_DATA
    out: dict = {"rompatch": rompatch.__file__, "records": len(recs), "patches": []}
    patch_files = []
    for i, rec in enumerate(recs):
        rw = rec["requested_rewrite"]
        req = EditRequest(
            prompt=rw["prompt"],
            subject=rw["subject"],
            target_new=rw["target_new"]["str"],
            target_true=rw["target_true"]["str"],
        )
        p = create_patch(model, tok, req, hparams=hp, stats_data=stats_data, stats_tokens=100_000)
        (d,) = p.deltas
        metrics = {k: v for k, v in sorted(d.metrics.items()) if "second" not in k}
        out["patches"].append(
            {
                "case": rec.get("case_id", i),
                "param": d.parameter,
                "u": tensor_sha(d.u),
                "v": tensor_sha(d.v),
                "metrics": metrics,
            }
        )
        if i < 5:
            f = work / f"p{i}.safetensors"
            p.save(f)
            patch_files.append(f)
        print(f"{i + 1}/{len(recs)} {time.time() - t0:.0f}s", file=sys.stderr, flush=True)

    from rompatch import apply_to_checkpoint, revert_checkpoint

    applied = work / "applied"
    apply_to_checkpoint(model_path, patch_files, applied, link=False)
    reverted = work / "reverted"
    revert_checkpoint(applied, [patch_files[2]], out=reverted, link=False)
    out["checkpoint_applied"] = folder_shas(applied)
    out["checkpoint_reverted"] = folder_shas(reverted)
    out["seconds"] = round(time.time() - t0, 1)
    torch.set_num_threads(threads)
    if saved_cache is None:
        os.environ.pop("ROMPATCH_CACHE", None)
    else:
        os.environ["ROMPATCH_CACHE"] = saved_cache
    return out


def compare(before: dict, after: dict) -> dict:
    """How many patches agree in u, v and metrics, and which checkpoint files differ."""
    pairs = list(zip(before["patches"], after["patches"]))
    same = {k: sum(a[k] == b[k] for a, b in pairs) for k in ("u", "v", "metrics")}
    files = {}
    for step in ("checkpoint_applied", "checkpoint_reverted"):
        files[step] = sorted(
            f for f in set(before[step]) | set(after[step]) if before[step].get(f) != after[step].get(f)
        )
    return {"n": len(pairs), "same": same, "different_files": files}


def skip_reason() -> str | None:
    from bench.data import missing_data

    if not BEFORE.is_file():
        return f"{BEFORE} (the fingerprint of the code before the restructure) is missing"
    return missing_data("counterfact/counterfact_subset.json", "wikitext-2/wiki.valid.tokens")


def _metrics_table() -> str:
    from bench.code_metrics import duplicated_blocks, import_cost, scan

    before = json.loads(METRICS_BEFORE.read_text())
    root = HERE.parent / "rompatch"
    after = {**scan(root), **import_cost(root), "duplicates": duplicated_blocks(root)}
    rows = [
        ("modules at the top level of rompatch/", "top_level_modules", len),
        ("sub-packages", "sub_packages", None),
        ("internal imports (importer → module pairs)", "internal_imports", None),
        ("import loops", "import_loops_without_init", None),
        ("upward imports (of the package __init__)", "upward_imports", None),
        ("function-level internal imports", "function_level_internal_imports", None),
        ("functions over 60 lines", "functions_over_60_lines", None),
        ("pairs of duplicated blocks in rompatch/ (`duplicates`)", "duplicates", None),
        ("`import rompatch` (ms, best of 5)", "import_rompatch_ms", None),
        ("torch loaded by `import rompatch`", "torch_loaded", None),
    ]
    lines = ["| | before (e35da83) | after |", "| --- | --- | --- |"]
    for label, key, _ in rows:
        lines.append(f"| {label} | {_cell(before.get(key))} | {_cell(after.get(key))} |")
    lines += ["", "Longest functions before: " + "; ".join(before["longest_functions"][:6])]
    lines += ["", "Longest functions after: " + "; ".join(after["longest_functions"][:6])]
    return "\n".join(lines)


def _tracing_section() -> str:
    """The known-facts comparison bench/trace_tokens.py stored (tracing tokenizes as editing does)."""
    f = HERE / "results" / "trace_tokens.json"
    if not f.is_file():
        return ""
    c = json.loads(f.read_text())["comparison"]
    rows = [
        "| kind | peak layer, AIE before | after | 95% band over facts | second seed: layer, AIE | largest seed-to-seed difference |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for kind, k in c["kinds"].items():
        sd = k["seed_difference"]
        rows.append(
            f"| {kind} | {k['peak_layer'][0]}, {k['peak_aie'][0]:.4f} | {k['peak_layer'][1]}, {k['peak_aie'][1]:.4f} | "
            f"±{k['peak_ci95_over_facts']:.3f} | {sd['peak_layer']}, {sd['peak_aie']:.4f} | {sd['max_abs_aie_difference']:.3f} |"
        )
    return "\n".join(
        [
            "",
            "**Tracing tokenizes as editing does.** Causal tracing takes its target ids and subject tokens from "
            "`rompatch.tokens`, the functions editing uses (`tests/test_tokens.py` fails if they differ; on the "
            f"former copy 8 of its 20 cases did). On known_1000, {c['target_ids_changed']} of {c['facts_tokenized']:,} "
            f"facts change target ids and {c['subject_range_changed']} change subject range. The known-facts average "
            f"(SmolLM2-135M, the first {c['n_facts'][0]} facts it gets right, 2 samples, window 10, noise 3σ, seed 0) "
            "before and after, at the last subject token, with the noise scale for comparison "
            "(`bench/trace_tokens.py`, `bench/results/trace_tokens.json`):",
            "",
            *rows,
            "",
            "Largest difference anywhere in the average-effect arrays, before vs after: "
            + ", ".join(f"{kind} {k['max_abs_aie_difference']}" for kind, k in c["kinds"].items())
            + ".",
        ]
    )


def _cell(v: object) -> str:
    if isinstance(v, str) and " pairs of places" in v:  # "N pairs of places (...) (S by shape alone, ...)"
        total = int(v.split(" pairs of places")[0])
        shape = int(re.search(r"\((\d+) by shape alone", v).group(1)) if "by shape alone" in v else 0
        return f"{total}: {total - shape} identical, {shape} alike in shape only"
    if isinstance(v, list):
        return f"{len(v)}" + (
            f" ({', '.join(' ↔ '.join(x) if isinstance(x, list) else str(x) for x in v)})" if v else ""
        )
    return str(v)


def run() -> dict:
    before = json.loads(BEFORE.read_text())
    after = fingerprint(before["records"], str(Path.home() / ".cache/rompatch/models/smollm2-135m"))
    c = compare(before, after)
    n = c["n"]
    rows = [
        {
            "metric": f"patches with identical u / v / metrics (of {n})",
            "value": f"{c['same']['u']} / {c['same']['v']} / {c['same']['metrics']}",
            "unit": "",
            "target": f"{n} / {n} / {n}",
            "note": "timings left out",
        },
        {
            "metric": "checkpoint files that differ after apply, after revert",
            "value": f"{len(c['different_files']['checkpoint_applied'])}, {len(c['different_files']['checkpoint_reverted'])}",
            "unit": "files",
            "target": "0, 0",
            "note": "sha256 of every file; the record and undo file without times, temp paths, patch ids and the retired hyperparameter names",
        },
    ]
    setup = (
        f"SmolLM2-135M, layer 4, WikiText-2 statistics (100,000 tokens), the first {n} shared CounterFact "
        "records, each edited on the unedited model in a fresh cache, on one torch thread (as the 'before' run); then the first five patches applied to "
        "the model's checkpoint folder and the third reverted. 'Before' was computed by the code at e35da83 "
        "(bench/results/restructure_before.json)."
    )
    return {
        "rows": rows,
        "markdown": _metrics_table() + "\n" + _tracing_section(),
        "setup": setup,
        "comparison": c,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--records", type=int, default=50)
    ap.add_argument("--model", default=str(Path.home() / ".cache/rompatch/models/smollm2-135m"))
    args = ap.parse_args()
    Path(args.out).write_text(json.dumps(fingerprint(args.records, args.model), indent=1) + "\n")


if __name__ == "__main__":
    main()
