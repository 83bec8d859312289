"""``rompatch show PATCH``: what a patch changes, where, and where it came from.

Any patch that loads can be shown: a metric that is missing or not a number prints as ``?``, and an
attached audit that cannot be read is reported as such.
"""

from __future__ import annotations

from typing import Any

import click

from ..audit.report import summary_line
from ..patch import Patch
from ..refs import resolve_patch
from ..signing import describe_signature, signature_info
from .common import echo_json, json_option, revision_option


def _g(x: Any, spec: str = ".3g") -> str:
    """A number formatted with ``spec``; ``?`` when it is missing (None) or not a number."""
    return format(x, spec) if isinstance(x, (int, float)) and not isinstance(x, bool) else "?"


def merge_lines(merged: dict | None, indent: str = "") -> list[str]:
    """For a merged patch: its inputs and each matrix's condition number (none for other patches)."""
    if not merged or not isinstance(merged, dict):
        return []
    inputs = merged.get("inputs") if isinstance(merged.get("inputs"), list) else []
    ids = ", ".join(str(c.get("id", "?"))[:12] if isinstance(c, dict) else "?" for c in inputs)
    condition = merged.get("condition") if isinstance(merged.get("condition"), dict) else {}
    conds = ", ".join(_g(v) for v in condition.values()) or "?"
    return [f"{indent}merged   from {len(inputs)} patch(es): {ids}; condition number {conds}"]


def audit_lines(audit: dict | None, indent: str = "") -> list[str]:
    """For a patch carrying an audit (``rompatch audit --attach``): its one-line summary."""
    if not audit:
        return []
    try:
        line = summary_line(audit["summary"])
    except (KeyError, TypeError, ValueError, AttributeError):
        return [
            f"{indent}audit    attached, but unreadable (not an audit summary); run rompatch audit --attach again"
        ]
    tokens = audit.get("tokens")
    return [
        f"{indent}audit    {line}",
        f"{indent}         (on {audit.get('model')}, {_g(tokens, ',')} tokens of {audit.get('corpus')})",
    ]


def signature_lines(patch: Patch, indent: str = "") -> list[str]:
    """For a signed patch: who signed it, and whether the signature verifies against the key it
    carries (trust in that key is ``rompatch verify --key``'s question)."""
    info = signature_info(patch)
    return [] if info is None else [f"{indent}signed   {describe_signature(info)}"]


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
        *signature_lines(patch),
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
        m = e["metrics"] if isinstance(e["metrics"], dict) else {}
        if e.get("statistics"):
            lines.append(f"      statistics: {e['statistics']}")
        if "p_new_before" in m or "p_new_after" in m:
            probs = f"P(new) {_g(m.get('p_new_before'))} → {_g(m.get('p_new_after'))}"
            if "p_true_before" in m or "p_true_after" in m:
                probs += f", P(true) {_g(m.get('p_true_before'))} → {_g(m.get('p_true_after'))}"
            lines.append(f"      at creation: {probs}")
        if "neighbours" in m:
            names = [str(x) for x in m["neighbours"]] if isinstance(m["neighbours"], list) else []
            shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
            lines.append(
                f"      neighbours: {len(names)} names kept unchanged (reach {_g(m.get('neighbour_reach_before'))} "
                f"→ {_g(m.get('neighbour_reach_after'))})" + (f": {shown}" if names else "")
            )
        if isinstance(m.get("neighbours_released"), list) and m["neighbours_released"]:
            gone = [str(x) for x in m["neighbours_released"]]
            lines.append(
                f"      neighbours let go: {len(gone)} (kept away from all, P(new) on the prompt was "
                f"{_g(m.get('p_prompt_with_all_neighbours'))} at the size cap)"
            )
        if "update_spectral_norm" in m:
            lines.append(
                f"      ‖ΔW‖₂ {_g(m.get('update_spectral_norm'))} vs ‖W‖₂ {_g(m.get('weight_spectral_norm'))}; "
                f"{_g(m.get('v_steps_run'), '')} steps"
                + (f", {_g(e['seconds'], '.1f')} s" if e.get("seconds") is not None else "")
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
        echo_json({**p.summary(), "signature": signature_info(p)})
    else:
        click.echo(format_patch(p))


COMMANDS = [show]
