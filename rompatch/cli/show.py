"""``rompatch show PATCH``: what a patch changes, where, and where it came from."""

from __future__ import annotations

import click

from ..audit.report import summary_line
from ..patch import Patch
from ..refs import resolve_patch
from .common import echo_json, json_option, revision_option


def merge_lines(merged: dict | None, indent: str = "") -> list[str]:
    """For a merged patch: its inputs and each matrix's condition number (none for other patches)."""
    if not merged:
        return []
    ids = ", ".join(c["id"][:12] for c in merged["inputs"])
    conds = ", ".join(f"{v:.3g}" for v in merged["condition"].values())
    return [f"{indent}merged   from {len(merged['inputs'])} patch(es): {ids}; condition number {conds}"]


def audit_lines(audit: dict | None, indent: str = "") -> list[str]:
    """For a patch carrying an audit (``rompatch audit --attach``): its one-line summary."""
    if not audit:
        return []
    return [
        f"{indent}audit    {summary_line(audit['summary'])}",
        f"{indent}         (on {audit.get('model')}, {audit.get('tokens', 0):,} tokens of {audit.get('corpus')})",
    ]


def format_patch(patch: Patch) -> str:
    s = patch.summary()
    base = s["base"]
    lines = [
        f"patch    {s['id']}",
        f"base     {base.get('model')} (model_type {base.get('model_type')}, dtype {base.get('dtype')}"
        + (f", revision {base['revision']}" if base.get("revision") else "")
        + ")",
        f"lineage  {', '.join(x[:12] for x in s['lineage']) or 'none (computed on the base model)'}",
        *merge_lines(s.get("merged_from")),
        *audit_lines(s.get("audit")),
        f"size     {len(patch.deltas)} delta(s), {s['tensor_bytes']:,} bytes of tensors",
        f"created  {s['created_at'] or 'unsaved'} by rompatch {s['rompatch_version']}",
        "edits:",
    ]
    for e in s["edits"]:
        if e.get("opening"):
            lines.append(
                f"  [{e['index']}] opening delta of [{e['index'] - 1}]: keyed at its prompt, which opens with "
                "its subject (no BOS)"
            )
        elif e["subject"] is not None:
            text = e["prompt"].replace("{}", e["subject"])
            old = e["target_true"] if e["target_true"] is not None else "?"
            lines.append(f"  [{e['index']}] {text!r}: {old} → {e['target_new']}")
        else:
            lines.append(f"  [{e['index']}] ({e['kind']}, no request recorded)")
        lines.append(
            f"      layer {e['layer']}  {e['parameter']} {e['shape']}  ‖u‖={e['u_norm']:.3g} ‖v‖={e['v_norm']:.3g}"
        )
        m = e["metrics"]
        if e.get("statistics"):
            lines.append(f"      statistics: {e['statistics']}")
        if "p_new_before" in m:
            probs = f"P(new) {m['p_new_before']:.3g} → {m['p_new_after']:.3g}"
            if "p_true_before" in m:
                probs += f", P(true) {m['p_true_before']:.3g} → {m['p_true_after']:.3g}"
            lines.append(f"      at creation: {probs}")
        if "neighbours" in m:
            names = m["neighbours"]
            shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
            lines.append(
                f"      neighbours: {len(names)} names kept unchanged (reach {m['neighbour_reach_before']:.3g} → "
                f"{m['neighbour_reach_after']:.3g})" + (f": {shown}" if names else "")
            )
        if "update_spectral_norm" in m:
            lines.append(
                f"      ‖ΔW‖₂ {m['update_spectral_norm']:.3g} vs ‖W‖₂ {m['weight_spectral_norm']:.3g}; "
                f"{m.get('v_steps_run', '?')} steps"
                + (f", {e['seconds']:.1f} s" if e.get("seconds") is not None else "")
            )
    return "\n".join(lines)


@click.command()
@click.argument("patch")
@revision_option
@json_option
def show(patch: str, revision: str | None, as_json: bool) -> None:
    """Describe PATCH: base model, edits (subject, prompt, old → new), layer, sizes, id, lineage.

    PATCH is a patch file or a Hub reference (REPO_ID[/file.safetensors][@REV]).
    """
    p = resolve_patch(patch, revision=revision)
    if as_json:
        echo_json(p.summary())
    else:
        click.echo(format_patch(p))


COMMANDS = [show]
