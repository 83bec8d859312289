"""The audit's result: numbers, a pass/warn verdict against thresholds, text and JSON.

A report can travel inside its patch file as the metadata key ``audit`` (compact JSON, outside the
content hash like ``merged_from``: attaching it never changes the patch id). ``rompatch show``
prints it and ``rompatch push`` puts its summary into the model card.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..constants import AUDIT as AUDIT_KEY
from ..errors import AuditError, PatchFormatError
from ..patch import Patch

AUDIT_VERSION = 1


@dataclass(frozen=True)
class Thresholds:
    """What the verdict checks. Each failing check turns "pass" into "warn" with its reason."""

    firing_at: float = 0.5  # a corpus token "fires" when |reach| >= this
    max_firing: float = 0.001  # ... and at most this fraction of corpus tokens may fire
    max_leak: float = 0.0  # at most this fraction of leak probes may flip to the target
    min_kept: float = 0.5  # at least this fraction of subject probes keep their answer
    max_ppl_increase: float = 1.0  # percent, on the corpus sample
    min_efficacy: float = 0.5  # at least this fraction of the edit's own prompts give the target

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, (int, float)) or math.isnan(v) or v < 0:
                raise AuditError(f"audit threshold {f.name} must be a number >= 0, not {v!r}")
        for name in ("max_firing", "max_leak", "min_kept", "min_efficacy"):
            if getattr(self, name) > 1:
                raise AuditError(f"audit threshold {name} is a fraction in [0, 1], not {getattr(self, name)}")

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass
class AuditReport:
    """What a patch changes beyond its own fact (``rompatch.audit.audit_patch``)."""

    patch_id: str
    model: str
    corpus: str
    tokens: int
    firing: list[dict[str, Any]]  # one per delta: Firing.to_dict()
    probes: list[dict[str, Any]]  # Probe.to_dict()
    ppl_before: float
    ppl_after: float
    ppl_tokens: int
    thresholds: Thresholds = field(default_factory=Thresholds)
    notes: list[str] = field(default_factory=list)
    keys: dict[str, str] = field(default_factory=dict)  # delta index -> "stored" or "recomputed"
    candidates: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # delta -> names, reach
    seconds: float | None = None

    # ---------------------------------------------------------------------- derived numbers

    def _of(self, kind: str) -> list[dict[str, Any]]:
        return [p for p in self.probes if p["kind"] == kind]

    @property
    def ppl_increase(self) -> float:
        """Percent change of corpus perplexity."""
        return 100.0 * (self.ppl_after / self.ppl_before - 1.0)

    def firing_fraction(self, at: float | None = None) -> float:
        """The largest fraction, over deltas, of corpus tokens with |reach| >= ``at``."""
        at = self.thresholds.firing_at if at is None else at
        out = 0.0
        for f in self.firing:
            tokens = f["tokens"]
            if not tokens:
                continue
            known = {float(k): v for k, v in f["above"].items()}
            if at in known:
                out = max(out, known[at])
            else:  # a threshold the scan did not count: the next lower one bounds it from above
                lower = [v for k, v in known.items() if k <= at]
                out = max(out, max(lower) if lower else 1.0)
        return out

    def summary(self) -> dict[str, Any]:
        """The numbers the verdict checks, and the verdict."""
        edit, leak, subj = self._of("edit"), self._of("leak"), self._of("subject")
        out = {
            "efficacy": _frac([p.get("says_target", False) for p in edit]),
            "leaks": sum(1 for p in leak if p.get("flipped")),
            "leak_probes": len(leak),
            "leak_rate": _frac([p.get("flipped", False) for p in leak]),
            "kept": _frac([p.get("kept", False) for p in subj]),
            "subject_probes": len(subj),
            "firing": self.firing_fraction(),
            "firing_at": self.thresholds.firing_at,
            "ppl_before": round(self.ppl_before, 4),
            "ppl_after": round(self.ppl_after, 4),
            "ppl_increase_percent": round(self.ppl_increase, 3),
        }
        reasons = self.reasons(out)
        out["verdict"] = "warn" if reasons else "pass"
        out["reasons"] = reasons
        return out

    def reasons(self, s: Mapping[str, Any]) -> list[str]:
        t = self.thresholds
        out = []
        if s["efficacy"] is not None and s["efficacy"] < t.min_efficacy:
            out.append(
                f"the edit's own prompts give the target in {s['efficacy']:.0%} (< {t.min_efficacy:.0%})"
            )
        if s["firing"] > t.max_firing:
            out.append(
                f"{s['firing']:.3%} of corpus tokens get |reach| >= {t.firing_at} (> {t.max_firing:.3%})"
            )
        if s["leak_rate"] is not None and s["leak_rate"] > t.max_leak:
            out.append(f"{s['leaks']} of {s['leak_probes']} other subjects now answer the edit's target")
        if s["kept"] is not None and s["kept"] < t.min_kept:
            out.append(f"the subject keeps {s['kept']:.0%} of its other answers (< {t.min_kept:.0%})")
        if self.ppl_increase > t.max_ppl_increase:
            out.append(f"corpus perplexity rises {self.ppl_increase:.2f}% (> {t.max_ppl_increase}%)")
        return out

    @property
    def verdict(self) -> str:
        return self.summary()["verdict"]

    # ------------------------------------------------------------------------- serialising

    def to_dict(self) -> dict[str, Any]:
        return {
            "audit_version": AUDIT_VERSION,
            "patch_id": self.patch_id,
            "model": self.model,
            "corpus": self.corpus,
            "tokens": self.tokens,
            "summary": self.summary(),
            "thresholds": self.thresholds.to_dict(),
            "keys": self.keys,
            "firing": self.firing,
            "candidates": self.candidates,
            "probes": self.probes,
            "ppl_tokens": self.ppl_tokens,
            "notes": self.notes,
            "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AuditReport:
        try:
            if d.get("audit_version") != AUDIT_VERSION:
                raise AuditError(
                    f"saved audit has version {d.get('audit_version')!r}, expected {AUDIT_VERSION}"
                )
            return cls(
                patch_id=d["patch_id"],
                model=d["model"],
                corpus=d["corpus"],
                tokens=int(d["tokens"]),
                firing=list(d["firing"]),
                probes=list(d["probes"]),
                ppl_before=_number(d["summary"]["ppl_before"], math.nan),
                ppl_after=_number(d["summary"]["ppl_after"], math.nan),
                ppl_tokens=int(d["ppl_tokens"]),
                thresholds=Thresholds(**{k: _number(v, math.inf) for k, v in d["thresholds"].items()}),
                notes=list(d.get("notes", [])),
                keys=dict(d.get("keys", {})),
                candidates=dict(d.get("candidates", {})),
                seconds=d.get("seconds"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise AuditError(
                f"saved audit is incomplete or malformed ({type(e).__name__}: {e}); run the audit again"
            ) from None


def _number(x: Any, missing: float) -> float:
    """A number read back from a saved audit: null stands for ``missing`` (NaN for a measurement that
    could not be made, infinity for a threshold without a limit)."""
    return missing if x is None else float(x)


def _finite(x: Any) -> Any:
    """``x`` with every NaN or infinite float replaced by null: patch metadata is strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _frac(xs: list[bool]) -> float | None:
    return sum(map(bool, xs)) / len(xs) if xs else None


# ------------------------------------------------------------------------ inside a patch file


def attach_audit(patch: Patch, report: AuditReport) -> Patch:
    """``patch`` with ``report`` in its metadata (the id does not change). The report must be of it."""
    if report.patch_id != patch.id:
        raise AuditError(
            f"the audit is of patch {report.patch_id[:12]}, not of {patch.short_id}; audit this patch"
        )
    patch.extra[AUDIT_KEY] = json.dumps(
        _finite(report.to_dict()), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    return patch


def saved_audit(patch: Patch) -> AuditReport | None:
    """The audit a patch file carries, checked to be of this patch; None when it has none."""
    try:
        raw = patch.audit()
    except PatchFormatError as e:
        raise AuditError(str(e)) from None
    if raw is None:
        return None
    try:
        report = AuditReport.from_dict(raw)
    except AuditError as e:
        raise AuditError(f"patch {patch.short_id}: {e}") from None
    if report.patch_id != patch.id:
        raise AuditError(
            f"patch {patch.short_id} carries an audit of another patch ({report.patch_id[:12]}); "
            "run 'rompatch audit --attach' again"
        )
    return report


# ------------------------------------------------------------------------------------- text


def _p(x: Any) -> str:
    return "—" if x is None else f"{x:.3g}"


def render(report: AuditReport, *, top: int = 10) -> str:
    """The human-readable report."""
    s = report.summary()
    lines = [
        f"audit of patch {report.patch_id[:12]} on {report.model}",
        f"verdict  {s['verdict'].upper()}" + "".join(f"\n  - {r}" for r in s["reasons"]),
        "",
        f"where it fires ({report.tokens:,} tokens of {report.corpus}):",
    ]
    for f in report.firing:
        above = "  ".join(f"≥{k}: {v:.3%}" for k, v in f["above"].items())
        lines.append(
            f"  delta {f['delta']} (key {report.keys.get(str(f['delta']), '?')}): {above}  max {f['max_reach']:.2f}"
        )
        for c in f["top"][:top]:
            mark = " (subject)" if c["on_subject"] else ""
            src = "" if c["source"] == "corpus" else f" [{c['source']}]"
            lines.append(f"    {c['reach']:+.2f}  {c['text']}{mark}{src}")
    for i, names in report.candidates.items():
        if names:
            shown = ", ".join(f"{c['name']} {c['reach']:+.2f}" for c in names[:top])
            lines.append(f"  names by reach in delta {i}'s prompt: {shown}")
    for kind, title in (
        ("edit", "the edit's own prompts (does it work?)"),
        ("leak", "other subjects, same prompt (does it leak?)"),
        ("subject", "same subject, other relations (what survives?)"),
    ):
        probes = report._of(kind)
        if not probes:
            continue
        lines += ["", title + ":"]
        for p in probes:
            flag = ""
            if kind == "leak" and p.get("flipped"):
                flag = "  LEAK"
            elif kind == "subject" and not p.get("kept"):
                flag = "  changed"
            elif kind == "edit" and not p.get("says_target"):
                flag = "  miss"
            reach = f"  reach {p['reach']:+.2f}" if p.get("reach") is not None else ""
            lines.append(
                f"  {p['prompt']!r}: {p['answer_before']!r} → {p['answer_after']!r}; "
                f"P({p['target']}) {_p(p['p_target_before'])} → {_p(p['p_target_after'])}"
                + (
                    f"; P({p['reference']}) {_p(p['p_reference_before'])} → {_p(p['p_reference_after'])}"
                    if kind == "subject"
                    else ""
                )
                + reach
                + flag
            )
    lines += [
        "",
        f"perplexity on {report.ppl_tokens:,} corpus tokens: {report.ppl_before:.3f} → {report.ppl_after:.3f} "
        f"({report.ppl_increase:+.2f}%)",
    ]
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines)


def summary_line(report: AuditReport | Mapping[str, Any]) -> str:
    """One line from a report or its ``summary()``: verdict, efficacy, leaks, kept, firing,
    perplexity (for ``show`` and model cards)."""
    s = report.summary() if isinstance(report, AuditReport) else report
    eff = "—" if s.get("efficacy") is None else f"{s['efficacy']:.0%}"
    kept = "—" if s.get("kept") is None else f"{s['kept']:.0%}"
    return (
        f"{s['verdict']}: efficacy {eff}, {s['leaks']}/{s['leak_probes']} other subjects leak, "
        f"subject keeps {kept} of its answers, {s['firing']:.3%} of corpus tokens fire "
        f"(|reach| ≥ {s['firing_at']}), perplexity {s['ppl_increase_percent']:+.2f}%"
        + ("".join(f"; {r}" for r in s.get("reasons", [])) if s["verdict"] != "pass" else "")
    )
