"""Sequential editing: N ROME edits one after another, each computed on the already-edited model.

Edit i is computed with edits 1..i-1 applied (``create_patch(mode="sequential")`` semantics: each
patch records its predecessors as lineage and is applied in memory right after it is computed). At
checkpoints the model is re-measured on *all* edits made so far (efficacy, paraphrase and
neighborhood of every earlier case, or zsRE token accuracies), next to the same cases' scores on
the unedited model, together with what explains a collapse:

- ``update_ratio``: ‖ΣΔ‖₂ / ‖W‖₂, the spectral norm of the cumulative update over the edited
  matrix's own;
- ``interference``: for each edit j, ‖Σ_{i>j} v_i (u_i·k_j)‖ / ‖v_j (u_j·k_j)‖, how much the later
  edits move the output at edit j's key relative to the change edit j made there (median and max);
- ``key_overlap_whitened``: mean and max |cos| between distinct edits' keys in the metric C⁻¹
  (u_i ∝ C⁻¹k_i, so u_i·k_j ∝ k_iᵀC⁻¹k_j is exactly how strongly edit i fires on subject j), with
  ``key_overlap_raw`` (plain cosine) for comparison;
- fluency (CounterFact, optional): GE of generations from fixed prompts of records not edited.

All edits use the base model's second-moment statistics. That is exact, not an approximation: C is
the second moment of the edited matrix's *input* (the keys), which is computed by the layers below
and the first half of the MLP at layer L; an edit of layer L's output matrix cannot change it. The
statistics cache key (``stats.key_weights_sha``) hashes exactly those weights and leaves the edited
matrix out, so asking for statistics on the edited model returns the same cached C.

With ``out_dir`` the run resumes: each edit's patch is saved to ``patches/NNNN.safetensors`` and
logged in ``edits.jsonl``; a rerun re-applies the saved chain (fingerprints checked) and goes on.
The model is left unchanged when the function returns.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..apply import apply_patch, revert_patch
from ..arch import get_spec
from ..atomic import atomic_write
from ..errors import EvalError
from ..patch import Patch, load_patch, save_patch
from ..request import EditRequest
from ..rome import ROMEHyperParams, compute_key
from ..stats import SecondMoment
from .evaluate import (
    KINDS,
    case_scores,
    check_config,
    edit_patch,
    edit_summary,
    measure_case,
    read_cases,
    write_json,
)

log = logging.getLogger(__name__)

EDITS_FILE = "edits.jsonl"
PRE_FILE = "pre.jsonl"
CHECKPOINTS_FILE = "checkpoints.jsonl"
PATCH_DIR = "patches"

CF_KEYS = ("ES", "PS", "NS", "EM", "PM", "NM")
ZSRE_KEYS = ("efficacy", "paraphrase", "specificity")


def checkpoint_schedule(n: int, every: int) -> list[int]:
    """1, every, 2·every, ..., and n."""
    if n < 1 or every < 1:
        raise EvalError(f"--sequential and --eval-every must be ≥ 1 (got {n}, {every})")
    return sorted({1, n, *range(every, n + 1, every)})


def _request(kind: str, rec: Mapping[str, Any], zsre_target: str) -> EditRequest:
    if kind == "zsre":
        from .zsre import zsre_request

        return zsre_request(rec, target=zsre_target)
    return EditRequest.from_dict(rec)


def _scores(kind: str, model, tok, rec, zsre_target: str, batch_size: int) -> dict[str, float]:
    if kind == "zsre":
        from .zsre import measure_zsre, zsre_scores

        return zsre_scores(measure_zsre(model, tok, rec, target=zsre_target, batch_size=batch_size))
    return case_scores(measure_case(model, tok, rec, batch_size=batch_size))


def _mean(xs: Sequence[float]) -> float | None:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return round(100 * statistics.fmean(xs), 2) if xs else None


@torch.no_grad()
def update_diagnostics(
    deltas: Sequence[Any], keys: Sequence[torch.Tensor], weight: torch.Tensor, stats: SecondMoment | None
) -> dict[str, Any]:
    """Norm of the cumulative update and cross-talk between edits (see module doc)."""
    U = torch.stack([d.u.double() for d in deltas])  # (n, in)
    V = torch.stack([d.v.double() for d in deltas])  # (n, out)
    K = torch.stack([k.double().cpu() for k in keys])  # (n, in)
    w_norm = float(torch.linalg.matrix_norm(weight.detach().double().cpu(), ord=2))
    total = V.T @ U  # (out, in) ΣΔ = Σ v_i u_iᵀ
    single = [float(v.norm() * u.norm()) for u, v in zip(U, V)]
    A = U @ K.T  # (n, n) A[i, j] = u_i · k_j
    n = len(deltas)
    out: dict[str, Any] = {
        "update_ratio": round(float(torch.linalg.matrix_norm(total, ord=2)) / w_norm, 5),
        "update_fro_ratio": round(float(total.norm()) / float(weight.detach().double().cpu().norm()), 5),
        "max_single_update_ratio": round(max(single) / w_norm, 5),
    }
    if n > 1:
        later = torch.tril(torch.ones(n, n, dtype=torch.float64), diagonal=-1)  # [i, j] = 1 if i > j
        cross = V.T @ (A * later)  # (out, n): column j = Σ_{i>j} v_i A[i, j]
        own = V.norm(dim=1) * A.diagonal().abs()  # (n,)
        ratio = (cross.norm(dim=0) / own.clamp_min(1e-30))[:-1]  # the last edit has no later edits
        out["interference_median"] = round(float(ratio.median()), 5)
        out["interference_max"] = round(float(ratio.max()), 5)
        off = ~torch.eye(n, dtype=torch.bool)
        Kn = K / K.norm(dim=1, keepdim=True)
        raw = (Kn @ Kn.T).abs()[off]
        out["key_overlap_raw_mean"] = round(float(raw.mean()), 5)
        out["key_overlap_raw_max"] = round(float(raw.max()), 5)
        if stats is not None:
            CinvK = torch.linalg.solve(stats.mom2.double(), K.T)  # (in, n)
            G = K @ CinvK  # (n, n) k_iᵀ C⁻¹ k_j
            d = G.diagonal().sqrt()
            cos = (G / (d[:, None] * d[None, :])).abs()[off]
            out["key_overlap_whitened_mean"] = round(float(cos.mean()), 5)
            out["key_overlap_whitened_max"] = round(float(cos.max()), 5)
    return out


def run_sequential(
    model: Any,
    tok: Any,
    records: Sequence[Mapping[str, Any]],
    *,
    kind: str,
    n: int,
    hparams: ROMEHyperParams,
    stats: SecondMoment | None,
    every: int = 10,
    checkpoints: Sequence[int] | None = None,
    out_dir: str | Path | None = None,
    config: Mapping[str, Any] | None = None,
    generation: Any = None,
    fluency_prompts: Sequence[str] = (),
    zsre_target: str = "answers",
    batch_size: int = 64,
    progress: bool = False,
    max_seconds: float | None = None,
) -> dict[str, Any]:
    """Edit ``records[:n]`` sequentially; re-measure all edits so far at each checkpoint.

    Returns {"config", "checkpoints": [...], "edits": [...], "completed", "seconds"}. ``max_seconds``
    stops after the first edit that ends past the limit, measures a checkpoint there, and says so in
    the result (a rerun with the same ``out_dir`` goes on from there).
    """
    from tqdm.auto import tqdm

    if kind not in KINDS:
        raise EvalError(f"kind must be counterfact or zsre, not {kind!r}")
    if n > len(records):
        raise EvalError(f"--sequential {n} needs {n} records but the data has {len(records)}; lower N")
    recs = list(records[:n])
    marks = sorted(set(checkpoints)) if checkpoints else checkpoint_schedule(n, every)
    layer = hparams.layer
    if layer is None:
        raise EvalError("run_sequential needs hparams.layer set")
    spec = get_spec(model)
    param = spec.mlp_out_param(layer)
    config = {**dict(config or {}), "sequential": n, "checkpoints": marks}
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        check_config(out, config)
        (out / PATCH_DIR).mkdir(exist_ok=True)
    gen_on = generation is not None and bool(fluency_prompts) and kind == "counterfact"

    # --- baselines on the unedited model (before any saved patch is re-applied)
    pre: dict[str, dict[str, float]] = {}
    if out is not None:
        pre = {str(c["case_id"]): c["pre"] for c in read_cases(out / PRE_FILE)}
    ckpts: dict[int, dict[str, Any]] = {}
    if out is not None:
        ckpts = {int(c["n"]): c for c in read_cases(out / CHECKPOINTS_FILE)}
    t0 = time.perf_counter()
    missing = [r for r in recs if str(r.get("case_id")) not in pre]
    for r in tqdm(missing, desc="baseline", unit="case", disable=not progress or not missing, leave=False):
        pre[str(r.get("case_id"))] = _scores(kind, model, tok, r, zsre_target, batch_size)
        if out is not None:
            _append(out / PRE_FILE, {"case_id": r.get("case_id"), "pre": pre[str(r.get("case_id"))]})
    if gen_on and 0 not in ckpts:
        from .fluency import fluency

        ge, texts = fluency(model, tok, list(fluency_prompts), settings=generation)
        ckpts[0] = {"n": 0, "GE": round(100 * ge, 2), "texts": texts[:3], "update_ratio": 0.0}
        if out is not None:
            _append(out / CHECKPOINTS_FILE, ckpts[0])
    weight0 = model.get_parameter(param).detach().float().cpu().clone()

    applied: list[Patch] = []
    keys: list[torch.Tensor] = []
    edits: list[dict[str, Any]] = read_cases(out / EDITS_FILE) if out is not None else []
    edits = edits[:n]
    stopped_early = False
    try:
        # --- resume: re-apply the saved chain
        for e in edits:
            p = load_patch(out / PATCH_DIR / e["patch"])
            if p.id != e["patch_id"]:
                raise EvalError(
                    f"{out / PATCH_DIR / e['patch']} is not the patch logged in {EDITS_FILE}; delete {out}"
                )
            apply_patch(model, p)
            applied.append(p)
            keys.append(_key(model, tok, p.deltas[0], layer))
        if edits:
            log.info("resuming sequential run at edit %d of %d", len(edits) + 1, n)
        bar = tqdm(total=n, initial=len(edits), desc="sequential edits", unit="edit", disable=not progress)
        try:
            for i in range(len(edits) + 1, n + 1):
                rec = recs[i - 1]
                req = _request(kind, rec, zsre_target)
                d, patch = edit_patch(
                    model, tok, req, hparams=hparams, stats=stats, lineage=[p.id for p in applied]
                )
                name = f"{i:04d}.safetensors"
                if out is not None:
                    save_patch(patch, out / PATCH_DIR / name)
                apply_patch(model, patch)
                applied.append(patch)
                keys.append(_key(model, tok, d, layer))
                entry = {
                    "i": i,
                    "case_id": rec.get("case_id"),
                    "subject": req.subject,
                    "target_new": req.target_new,
                    "patch": name,
                    "patch_id": patch.id,
                    "edit": edit_summary(d),
                    "immediate": _scores(kind, model, tok, rec, zsre_target, batch_size),
                }
                edits.append(entry)
                if out is not None:
                    _append(out / EDITS_FILE, entry)
                bar.update(1)
                over = max_seconds is not None and time.perf_counter() - t0 > max_seconds and i < n
                if (i in marks or over) and i not in ckpts:
                    ckpts[i] = _checkpoint(
                        model, tok, kind, recs[:i], pre, applied, keys, weight0, stats, zsre_target,
                        batch_size, gen_on, generation, fluency_prompts, t0,
                    )  # fmt: skip
                    if out is not None:
                        _append(out / CHECKPOINTS_FILE, ckpts[i])
                    bar.set_postfix_str(_short(kind, ckpts[i]))
                if over:
                    stopped_early = True
                    log.warning("stopping after %d edits: time limit of %.0f s reached", i, max_seconds)
                    break
        finally:
            bar.close()
        # a resumed run whose last checkpoint was not written yet
        last = len(edits)
        if last in marks and last not in ckpts and applied:
            ckpts[last] = _checkpoint(
                model,
                tok,
                kind,
                recs[:last],
                pre,
                applied,
                keys,
                weight0,
                stats,
                zsre_target,
                batch_size,
                gen_on,
                generation,
                fluency_prompts,
                t0,
            )
            if out is not None:
                _append(out / CHECKPOINTS_FILE, ckpts[last])
    finally:
        for p in reversed(applied):
            revert_patch(model, p)
    result = {
        "kind": kind,
        "config": config,
        "checkpoints": [ckpts[k] for k in sorted(ckpts)],
        "edits": edits,
        "completed": len(edits),
        "stopped_early": stopped_early,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    result["markdown"] = sequential_markdown(result)
    if out is not None:
        write_json(out / "results.json", {k: v for k, v in result.items() if k != "markdown"})
        atomic_write(out / "summary.md", lambda tmp: Path(tmp).write_text(result["markdown"] + "\n"))
    return result


def _append(path: Path, obj: Mapping[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(obj, ensure_ascii=False) + "\n")
        f.flush()


def _key(model, tok, d, layer) -> torch.Tensor:
    templates = d.hparams.get("context_templates") or ["{}"]
    weight = d.hparams.get("key_prompt_weight")  # None in patches made before it existed: plain average
    return compute_key(model, tok, d.request, layer, templates, prompt_weight=weight).cpu()


def _short(kind: str, c: Mapping[str, Any]) -> str:
    ks = ("ES", "NS") if kind == "counterfact" else ("efficacy", "specificity")
    return " ".join(f"{k} {c.get(k)}" for k in ks) + f" ‖ΣΔ‖/‖W‖ {c.get('update_ratio')}"


def _checkpoint(
    model,
    tok,
    kind,
    recs,
    pre,
    applied,
    keys,
    weight0,
    stats,
    zsre_target,
    batch_size,
    gen_on,
    generation,
    fluency_prompts,
    t0,
) -> dict[str, Any]:
    t = time.perf_counter()
    now = [_scores(kind, model, tok, r, zsre_target, batch_size) for r in recs]
    base = [pre[str(r.get("case_id"))] for r in recs]
    keys_ = CF_KEYS if kind == "counterfact" else ZSRE_KEYS
    c: dict[str, Any] = {"n": len(recs)}
    for k in keys_:
        c[k] = _mean([x[k] for x in now])
        c[f"pre_{k}"] = _mean([x[k] for x in base])
    first = keys_[0]
    c[f"{first}_by_edit"] = [x[first] for x in now]  # retention of each earlier edit, oldest first
    c.update(update_diagnostics([p.deltas[0] for p in applied], keys, weight0, stats))
    if gen_on:
        from .fluency import fluency

        ge, texts = fluency(model, tok, list(fluency_prompts), settings=generation)
        c["GE"] = round(100 * ge, 2)
        c["texts"] = texts[:3]
    c["measure_seconds"] = round(time.perf_counter() - t, 1)
    c["elapsed_seconds"] = round(time.perf_counter() - t0, 1)
    return c


def sequential_markdown(result: Mapping[str, Any]) -> str:
    kind = result["kind"]
    if kind == "counterfact":
        cols = [("ES", "ES"), ("PS", "PS"), ("NS", "NS"), ("pre_NS", "NS unedited")]
    else:
        cols = [
            ("efficacy", "Efficacy"),
            ("paraphrase", "Paraphrase"),
            ("specificity", "Specificity"),
            ("pre_specificity", "Specificity unedited"),
        ]
    extra = [
        ("update_ratio", "‖ΣΔ‖₂/‖W‖₂"),
        ("interference_median", "interference (median)"),
        ("interference_max", "interference (max)"),
        ("key_overlap_whitened_mean", "key overlap C⁻¹ (mean)"),
        ("GE", "GE"),
    ]
    rows = [c for c in result["checkpoints"] if c["n"] > 0]
    base = next((c for c in result["checkpoints"] if c["n"] == 0), None)
    present = [(k, h) for k, h in cols + extra if any(c.get(k) is not None for c in rows)]
    lines = [
        "| edits N | " + " | ".join(h for _, h in present) + " |",
        "| ---: | " + " | ".join("---:" for _ in present) + " |",
    ]
    if base is not None and "GE" in base:
        lines.append(
            "| 0 | " + " | ".join(f"{base['GE']:.1f}" if k == "GE" else "" for k, _ in present) + " |"
        )
    ratio_keys = {"update_ratio", "interference_median", "interference_max", "key_overlap_whitened_mean"}
    for c in rows:
        cells = []
        for k, _ in present:
            v = c.get(k)
            cells.append("—" if v is None else f"{v:.3f}" if k in ratio_keys else f"{v:.1f}")
        lines.append(f"| {c['n']} | " + " | ".join(cells) + " |")
    notes = [
        "",
        "Scores at N are over all N edits made so far (each earlier edit re-measured on the model with all N "
        "applied), in percent; 'unedited' is the same cases on the base model. ‖ΣΔ‖₂/‖W‖₂: spectral norm of the "
        "cumulative update over the edited matrix's. Interference: ‖Σ_{i>j} v_i(u_i·k_j)‖ / ‖v_j(u_j·k_j)‖ over "
        "edits j. Key overlap: mean |cos| of distinct edits' keys in the C⁻¹ metric.",
    ]
    if result.get("stopped_early"):
        notes.append(f"Stopped early after {result['completed']} edits (time limit).")
    return "\n".join(lines + notes)


__all__ = ["run_sequential", "checkpoint_schedule", "update_diagnostics", "sequential_markdown"]
