"""Plots of evaluation results (matplotlib, Agg backend; an optional extra: ``rompatch[plot]``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..atomic import atomic_write
from ..errors import require_matplotlib


def _pyplot():
    matplotlib = require_matplotlib()
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    out = atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    import matplotlib.pyplot as plt

    plt.close(fig)
    return out


def plot_distributions(result: Mapping[str, Any], path: str | Path, *, title: str = "") -> Path:
    """Per-case score distributions before and after the edit (one panel per metric)."""
    plt = _pyplot()
    cases: Sequence[Mapping[str, Any]] = result["cases"]
    if result["kind"] == "counterfact":
        panels = [
            ("EM", "efficacy: P(new) − P(true), rewrite prompt"),
            ("PM", "paraphrase: P(new) − P(true)"),
            ("NM", "neighborhood: P(true) − P(new)"),
        ]
        if any("GE" in c.get("post", {}) for c in cases):
            panels.append(("GE", "fluency: bi/tri-gram entropy"))
    else:
        panels = [
            ("efficacy", "efficacy: token accuracy"),
            ("paraphrase", "paraphrase: token accuracy"),
            ("specificity", "specificity: token accuracy"),
        ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    axes = [axes] if len(panels) == 1 else list(axes)
    for ax, (key, label) in zip(axes, panels):
        for phase, color in (("pre", "#888888"), ("post", "#d62728")):
            xs = [c[phase][key] for c in cases if c.get(phase, {}).get(key) is not None]
            xs = [x for x in xs if x == x]  # drop NaN
            if xs:
                ax.hist(
                    xs,
                    bins=20,
                    alpha=0.55,
                    color=color,
                    label=f"{'unedited' if phase == 'pre' else 'edited'}",
                )
        ax.set_title(label, fontsize=9)
        ax.set_ylabel("cases")
        ax.legend(fontsize=8)
    fig.suptitle(title or f"{result['kind']}: per-case scores before and after the edit ({len(cases)} cases)")
    fig.tight_layout()
    return _save(fig, path)


def plot_sequential(result: Mapping[str, Any], path: str | Path, *, title: str = "") -> Path:
    """Scores on all earlier edits, update norm and cross-talk as the number of edits grows."""
    plt = _pyplot()
    rows = [c for c in result["checkpoints"] if c["n"] > 0]
    ns = [c["n"] for c in rows]
    cf = result["kind"] == "counterfact"
    keys = (
        [("ES", "efficacy ES"), ("PS", "paraphrase PS"), ("NS", "neighborhood NS")]
        if cf
        else [
            ("efficacy", "efficacy"),
            ("paraphrase", "paraphrase"),
            ("specificity", "specificity"),
        ]
    )
    has_ge = any(c.get("GE") is not None for c in result["checkpoints"])
    ncols = 3 if has_ge else 2
    fig, axes = plt.subplots(1, ncols, figsize=(5.0 * ncols, 3.8))
    ax = axes[0]
    colors = ["#1f77b4", "#2ca02c", "#d62728"]
    for (k, label), col in zip(keys, colors):
        ax.plot(ns, [c.get(k) for c in rows], marker="o", color=col, label=label)
        ax.plot(ns, [c.get(f"pre_{k}") for c in rows], ls="--", color=col, alpha=0.5)
    ax.set_xlabel("edits made (N)")
    ax.set_ylabel("% over all N edited cases")
    ax.set_ylim(-2, 102)
    ax.set_title("scores on every earlier edit (dashed: unedited)", fontsize=9)
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.plot(ns, [c.get("update_ratio") for c in rows], marker="o", label="‖ΣΔ‖₂ / ‖W‖₂")
    if any(c.get("interference_median") is not None for c in rows):
        ax.plot(ns, [c.get("interference_median") for c in rows], marker="s", label="interference (median)")
        ax.plot(
            ns, [c.get("interference_max") for c in rows], marker="^", label="interference (max)", alpha=0.6
        )
    ax.set_xlabel("edits made (N)")
    ax.set_yscale("log")
    ax.set_title("cumulative update and cross-talk", fontsize=9)
    ax.legend(fontsize=8)
    if has_ge:
        ax = axes[2]
        pts = [(c["n"], c["GE"]) for c in result["checkpoints"] if c.get("GE") is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color="#9467bd")
        ge = [p[1] for p in pts]
        ax.set_ylim(min(ge) - 100, max(ge) + 50)  # a collapse drops GE by hundreds; noise is ±5
        ax.set_xlabel("edits made (N)")
        ax.set_ylabel("GE (entropy ×100)")
        ax.set_title("fluency of unrelated generations", fontsize=9)
    fig.suptitle(title or f"sequential editing ({result['completed']} edits)")
    fig.tight_layout()
    return _save(fig, path)


__all__ = ["plot_distributions", "plot_sequential"]
