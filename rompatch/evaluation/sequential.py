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

import logging
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..apply import apply_patch, revert_patch
from ..arch import get_spec
from ..create import Editor
from ..errors import EvalError
from ..patch import Patch, load_patch, save_patch
from ..placement import param_value
from ..request import EditRequest
from ..rome import ROMEHyperParams, compute_key
from ..stats import SecondMoment
from .edits import edit_patch, edit_summary
from .evaluate import check_kind, score_case
from .fluency import GenerationSettings, fluency
from .records import append_record, check_config, read_cases, write_results
from .zsre import score_zsre, zsre_request

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


@dataclass
class _Measure:
    """How a sequential run measures the model as it is now: the scores of a record, and fluency."""

    model: Any
    tok: Any
    kind: str
    zsre_target: str
    batch_size: int
    generation: GenerationSettings | None  # None: fluency is not measured
    fluency_prompts: list[str]

    def request(self, rec: Mapping[str, Any]) -> EditRequest:
        if self.kind == "zsre":
            return zsre_request(rec, target=self.zsre_target)
        return EditRequest.from_dict(rec)

    def scores(self, rec: Mapping[str, Any]) -> dict[str, float]:
        if self.kind == "zsre":
            return score_zsre(self.model, self.tok, rec, target=self.zsre_target, batch_size=self.batch_size)
        return score_case(self.model, self.tok, rec, batch_size=self.batch_size)

    def fluency(self) -> dict[str, Any]:
        """GE (×100) of the fluency prompts' generations, and the first three texts."""
        ge, texts = fluency(self.model, self.tok, self.fluency_prompts, settings=self.generation)
        return {"GE": round(100 * ge, 2), "texts": texts[:3]}


@dataclass
class _Run:
    """A sequential run in progress: its records and folder, and the chain of edits made so far."""

    measure: _Measure
    recs: list[Mapping[str, Any]]
    marks: list[int]
    hparams: ROMEHyperParams
    stats: SecondMoment | None
    out: Path | None
    t0: float = 0.0
    pre: dict[str, dict[str, float]] = field(default_factory=dict)
    ckpts: dict[int, dict[str, Any]] = field(default_factory=dict)
    edits: list[dict[str, Any]] = field(default_factory=list)
    applied: list[Patch] = field(default_factory=list)
    keys: list[torch.Tensor] = field(default_factory=list)
    weight0: torch.Tensor | None = None
    editor: Editor = field(init=False)

    def __post_init__(self) -> None:
        self.editor = Editor(self.measure.model, self.measure.tok, hparams=self.hparams, stats=self.stats)

    def _log(self, name: str, obj: Mapping[str, Any]) -> None:
        if self.out is not None:
            append_record(self.out / name, obj)

    def read_logs(self) -> None:
        """Baselines and checkpoints measured and edits made by an earlier run into the same folder."""
        if self.out is not None:
            self.pre = {str(c["case_id"]): c["pre"] for c in read_cases(self.out / PRE_FILE)}
            self.ckpts = {int(c["n"]): c for c in read_cases(self.out / CHECKPOINTS_FILE)}

    def baselines(self, progress: bool) -> None:
        """Every record's scores on the unedited model, and its fluency (checkpoint 0)."""
        from tqdm.auto import tqdm

        missing = [r for r in self.recs if str(r.get("case_id")) not in self.pre]
        for r in tqdm(
            missing, desc="baseline", unit="case", disable=not progress or not missing, leave=False
        ):
            self.pre[str(r.get("case_id"))] = self.measure.scores(r)
            self._log(PRE_FILE, {"case_id": r.get("case_id"), "pre": self.pre[str(r.get("case_id"))]})
        if self.measure.generation is not None and 0 not in self.ckpts:
            self.ckpts[0] = {"n": 0, **self.measure.fluency(), "update_ratio": 0.0}
            self._log(CHECKPOINTS_FILE, self.ckpts[0])

    def push(self, patch: Patch, d: Any) -> None:
        """Apply ``patch`` (of the one delta ``d``) on top of the chain."""
        m = self.measure
        apply_patch(m.model, patch)
        self.applied.append(patch)
        self.keys.append(_key(m.model, m.tok, d, self.hparams.layer))

    def reapply_logged(self) -> None:
        """Re-apply the chain of patches an earlier run saved (each checked against the edit log)."""
        if self.out is None:
            return
        self.edits = read_cases(self.out / EDITS_FILE)[: len(self.recs)]
        for e in self.edits:
            p = load_patch(self.out / PATCH_DIR / e["patch"])
            if p.id != e["patch_id"]:
                raise EvalError(
                    f"{self.out / PATCH_DIR / e['patch']} is not the patch logged in {EDITS_FILE}; "
                    f"delete {self.out}"
                )
            self.push(p, p.deltas[0])
        if self.edits:
            log.info("resuming sequential run at edit %d of %d", len(self.edits) + 1, len(self.recs))

    def edit(self, i: int) -> None:
        """Compute edit ``i`` (from 1) on the model with edits 1..i-1 applied; save, apply and log it."""
        m = self.measure
        rec = self.recs[i - 1]
        req = m.request(rec)
        lineage = [p.id for p in self.applied]
        d, patch = edit_patch(self.editor, req, lineage=lineage)
        name = f"{i:04d}.safetensors"
        if self.out is not None:
            save_patch(patch, self.out / PATCH_DIR / name)
        self.push(patch, d)
        entry = {
            "i": i,
            "case_id": rec.get("case_id"),
            "subject": req.subject,
            "target_new": req.target_new,
            "patch": name,
            "patch_id": patch.id,
            "edit": edit_summary(d),
            "immediate": m.scores(rec),
        }
        self.edits.append(entry)
        self._log(EDITS_FILE, entry)

    def checkpoint(self) -> dict[str, Any]:
        """Re-measure all edits made so far, with the update diagnostics and fluency; logged."""
        c = _checkpoint(
            self.measure,
            self.recs[: len(self.edits)],
            self.pre,
            deltas=[p.deltas[0] for p in self.applied],
            keys=self.keys,
            weight0=self.weight0,
            stats=self.stats,
            t0=self.t0,
        )
        self.ckpts[c["n"]] = c
        self._log(CHECKPOINTS_FILE, c)
        return c

    def edit_rest(self, *, progress: bool, max_seconds: float | None) -> bool:
        """Make the remaining edits, measuring at the marks; True when the time limit stopped it early."""
        from tqdm.auto import tqdm

        n = len(self.recs)
        bar = tqdm(
            total=n, initial=len(self.edits), desc="sequential edits", unit="edit", disable=not progress
        )
        try:
            for i in range(len(self.edits) + 1, n + 1):
                self.edit(i)
                bar.update(1)
                over = max_seconds is not None and time.perf_counter() - self.t0 > max_seconds and i < n
                if (i in self.marks or over) and i not in self.ckpts:
                    bar.set_postfix_str(_short(self.measure.kind, self.checkpoint()))
                if over:
                    log.warning("stopping after %d edits: time limit of %.0f s reached", i, max_seconds)
                    return True
        finally:
            bar.close()
        return False

    def revert_all(self) -> None:
        for p in reversed(self.applied):
            revert_patch(self.measure.model, p)

    def result(self, config: Mapping[str, Any], stopped_early: bool) -> dict[str, Any]:
        result = {
            "kind": self.measure.kind,
            "config": config,
            "checkpoints": [self.ckpts[k] for k in sorted(self.ckpts)],
            "edits": self.edits,
            "completed": len(self.edits),
            "stopped_early": stopped_early,
            "seconds": round(time.perf_counter() - self.t0, 1),
        }
        result["markdown"] = sequential_markdown(result)
        return result


# run_sequential and evaluate.run_evaluation take the same keyword arguments where they mean the same
# (hparams, stats, out_dir, config, generation, zsre_target, batch_size, progress): alike on purpose,
# the public signatures documented in docs/evaluation.md.
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
    generation: GenerationSettings | None = None,
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
    check_kind(kind)
    if n > len(records):
        raise EvalError(f"--sequential {n} needs {n} records but the data has {len(records)}; lower N")
    marks = sorted(set(checkpoints)) if checkpoints else checkpoint_schedule(n, every)
    if hparams.layer is None:
        raise EvalError("run_sequential needs hparams.layer set")
    param = get_spec(model).mlp_out_param(hparams.layer)
    config = {**dict(config or {}), "sequential": n, "checkpoints": marks}
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        check_config(out, config)
        (out / PATCH_DIR).mkdir(exist_ok=True)
    gen_on = generation is not None and bool(fluency_prompts) and kind == "counterfact"
    measure = _Measure(
        model, tok, kind, zsre_target, batch_size, generation if gen_on else None, list(fluency_prompts)
    )
    run = _Run(measure, list(records[:n]), marks, hparams, stats, out)
    run.read_logs()
    run.t0 = time.perf_counter()
    run.baselines(progress)  # on the unedited model, before any saved patch is re-applied
    run.weight0 = param_value(model, param).detach().float().cpu().clone()
    try:
        run.reapply_logged()
        stopped_early = run.edit_rest(progress=progress, max_seconds=max_seconds)
        last = len(run.edits)  # a resumed run whose last checkpoint was not written yet
        if last in marks and last not in run.ckpts and run.applied:
            run.checkpoint()
    finally:
        run.revert_all()
    result = run.result(config, stopped_early)
    if out is not None:
        write_results(out, result)
    return result


def _key(model, tok, d, layer) -> torch.Tensor:
    templates = d.hparams.get("context_templates") or ["{}"]
    weight = d.hparams.get("key_prompt_weight")  # None in patches made before it existed: plain average
    return compute_key(model, tok, d.request, layer, templates, prompt_weight=weight).cpu()


def _short(kind: str, c: Mapping[str, Any]) -> str:
    ks = ("ES", "NS") if kind == "counterfact" else ("efficacy", "specificity")
    return " ".join(f"{k} {c.get(k)}" for k in ks) + f" ‖ΣΔ‖/‖W‖ {c.get('update_ratio')}"


def _checkpoint(
    measure: _Measure,
    recs: Sequence[Mapping[str, Any]],
    pre: Mapping[str, dict[str, float]],
    *,
    deltas: Sequence[Any],
    keys: Sequence[torch.Tensor],
    weight0: torch.Tensor,
    stats: SecondMoment | None,
    t0: float,
) -> dict[str, Any]:
    """Scores of ``recs`` now and on the unedited model (``pre``), update diagnostics, fluency."""
    t = time.perf_counter()
    now = [measure.scores(r) for r in recs]
    base = [pre[str(r.get("case_id"))] for r in recs]
    keys_ = CF_KEYS if measure.kind == "counterfact" else ZSRE_KEYS
    c: dict[str, Any] = {"n": len(recs)}
    for k in keys_:
        c[k] = _mean([x[k] for x in now])
        c[f"pre_{k}"] = _mean([x[k] for x in base])
    first = keys_[0]
    c[f"{first}_by_edit"] = [x[first] for x in now]  # retention of each earlier edit, oldest first
    c.update(update_diagnostics(deltas, keys, weight0, stats))
    if measure.generation is not None:
        c.update(measure.fluency())
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
