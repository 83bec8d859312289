"""Fingerprint of what the library computes, to compare two versions of the code (issue #13).

    ROMPATCH_DATA=... PYTHONPATH=<tree> python bench/bench_restructure.py OUT.json [--records 50]

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
import sys
import tempfile
import time
from pathlib import Path


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tensor_sha(t) -> str:  # noqa: ANN001
    return sha(t.detach().contiguous().cpu().numpy().tobytes())


def _untimed(x):  # noqa: ANN001, ANN202
    if isinstance(x, dict):
        return {k: _untimed(v) for k, v in x.items() if k != "applied_at"}
    if isinstance(x, list):
        return [_untimed(v) for v in x]
    return x


def folder_shas(folder: Path) -> dict[str, str]:
    """sha256 of each file; rompatch.json with its wall-clock ``applied_at`` stamps left out."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        data = p.read_bytes()
        if p.name == "rompatch.json":
            data = json.dumps(_untimed(json.loads(data)), sort_keys=True).encode()
        out[str(p.relative_to(folder))] = sha(data)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--records", type=int, default=50)
    ap.add_argument("--model", default=str(Path.home() / ".cache/rompatch/models/smollm2-135m"))
    args = ap.parse_args()
    data = Path(os.environ["ROMPATCH_DATA"])
    work = Path(tempfile.mkdtemp(prefix="rompatch-restructure-"))
    os.environ["ROMPATCH_CACHE"] = str(work / "cache")

    import rompatch
    from rompatch import EditRequest, ROMEHyperParams, create_patch, load_model, load_records

    t0 = time.time()
    model, tok = load_model(args.model)
    _, records = load_records(str(data / "counterfact" / "counterfact_subset.json"), limit=args.records)
    hp = ROMEHyperParams(layer=4)
    stats_data = None  # the default: WikiText-2 from $ROMPATCH_DATA
    out: dict = {"rompatch": rompatch.__file__, "records": len(records), "patches": []}
    patch_files = []
    for i, rec in enumerate(records):
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
        print(f"{i + 1}/{len(records)} {time.time() - t0:.0f}s", file=sys.stderr, flush=True)

    from rompatch import apply_to_checkpoint, revert_checkpoint

    applied = work / "applied"
    apply_to_checkpoint(args.model, patch_files, applied, link=False)
    reverted = work / "reverted"
    revert_checkpoint(applied, [patch_files[2]], out=reverted, link=False)
    out["checkpoint_applied"] = folder_shas(applied)
    out["checkpoint_reverted"] = folder_shas(reverted)
    out["seconds"] = round(time.time() - t0, 1)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
