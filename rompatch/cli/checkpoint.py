"""``rompatch apply | revert | log | stack | diff | extract``: patches on checkpoint folders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from ..checkpoint.diff import diff
from ..checkpoint.extract import EXTRACTED_FROM, extract_patch
from ..checkpoint.operations import CheckpointResult, apply_to_checkpoint, checkpoint_log, revert_checkpoint
from ..merge import DEFAULT_MAX_CONDITION, merge_patches
from ..patch import Patch, save_patch
from ..signing import trusted_keys
from ..stack import stack_patches
from .common import echo_json, info, json_option, revision_option
from .show import merge_lines

out_option = click.option(
    "-o",
    "--out",
    "out",
    type=click.Path(file_okay=False),
    help="Output checkpoint folder (written atomically).",
)
overwrite_option = click.option("--overwrite", is_flag=True, help="Replace an existing output (atomically).")
copy_option = click.option(
    "--copy", "copy_files", is_flag=True, help="Copy untouched shards instead of hard-linking them."
)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 10_000 else f"{n} bytes"


def _print_result(r: CheckpointResult, verb: str) -> None:
    s = r.stats
    click.echo(f"wrote    {r.path}")
    if r.reverted:
        click.echo(f"{verb}  {', '.join(p[:12] for p in r.reverted)}")
    click.echo(
        f"applied  {', '.join(p[:12] + (' (forced)' if p in r.forced else '') for p in r.applied) or 'none'}"
    )
    click.echo(
        f"files    rewrote {', '.join(s.rewritten) or 'nothing'}; other files: {len(s.linked)} hard-linked, "
        f"{len(s.copied)} copied" + (f"; skipped {', '.join(s.skipped)}" if s.skipped else "")
    )
    click.echo(f"tensors  {', '.join(r.touched)} ({_mb(s.touched_bytes)})")
    if r.applied:
        click.echo(f"undo     {_mb(r.undo_bytes)} in rompatch-undo.st")
    for name, res in r.residuals.items():
        click.echo(
            f"residual {name}: max |stored - exact float32 subtraction| = {res['max_abs_residual']:.3g}; "
            f"base fingerprint {'restored exactly' if res['restored_base_fingerprint'] else 'NOT restored'}"
        )


@click.command("apply")
@click.argument("base")
@click.argument("patches", nargs=-1, required=True)
@out_option
@overwrite_option
@click.option("--force", is_flag=True, help="Apply despite fingerprint or lineage mismatches (recorded).")
@copy_option
@click.option(
    "--require-signature",
    "require_signature",
    multiple=True,
    type=click.Path(dir_okay=False),
    metavar="PUBKEY",
    help="Refuse patches not signed by one of these trusted public keys (repeatable; see rompatch verify); "
    "checked before anything is written, and --force does not override it.",
)
@revision_option
@json_option
def apply_cmd(base, patches, out, overwrite, force, copy_files, require_signature, revision, as_json) -> None:
    """Apply patches to checkpoint BASE and write the complete model folder OUT.

    PATCH files (or Hub patch references) are applied in the order given.

    BASE is an embedded alias (smollm2-135m, gemma3-270m; fetched and converted on first use), a
    local model folder (model.safetensors, or shards with model.safetensors.index.json) or a Hub
    model id. Only shards holding edited tensors are rewritten; the others are hard-linked
    (or copied with --copy). OUT records the patches, so `rompatch revert` restores BASE exactly.
    """
    if not out:
        raise click.UsageError("missing -o/--out OUT (the folder to write)")
    trusted = trusted_keys(list(require_signature)) if require_signature else None  # key files first
    r = apply_to_checkpoint(
        base,
        list(patches),
        out,
        overwrite=overwrite,
        force=force,
        link=not copy_files,
        revision=revision,
        require_signature=trusted,
    )
    echo_json(r.to_json()) if as_json else _print_result(r, "reverted")


@click.command("revert")
@click.argument("checkpoint")
@click.argument("patches", nargs=-1)
@out_option
@click.option(
    "--in-place", is_flag=True, help="Replace CHECKPOINT itself (atomically; never edits files in place)."
)
@click.option("--all", "revert_all", is_flag=True, help="Revert every patch applied to CHECKPOINT.")
@click.option(
    "--force", is_flag=True, help="Revert even if later patches depend on it or the record is stale."
)
@overwrite_option
@copy_option
@json_option
def revert_cmd(checkpoint, patches, out, in_place, revert_all, force, overwrite, copy_files, as_json) -> None:
    """Remove patches from CHECKPOINT, writing OUT (-o) or replacing it (--in-place).

    CHECKPOINT is a local model folder, an embedded alias or a Hub model id (--in-place needs a
    local folder). PATCH is a patch file, a Hub patch reference or the id (prefix, 4+ hex digits)
    of an applied patch, as `rompatch log` shows it. On a
    checkpoint written by `rompatch apply`, tensors come back bit for bit from the undo data (no
    base or patch files needed). On any other checkpoint the deltas are subtracted and the largest
    rounding residual is reported.
    """
    if bool(out) == bool(in_place):
        raise click.UsageError("pass exactly one of -o/--out OUT or --in-place")
    if revert_all and patches:
        raise click.UsageError("pass either PATCH... or --all, not both")
    r = revert_checkpoint(
        checkpoint,
        list(patches),
        out=out,
        in_place=in_place,
        all=revert_all,
        force=force,
        overwrite=overwrite,
        link=not copy_files,
    )
    echo_json(r.to_json()) if as_json else _print_result(r, "reverted")


@click.command("log")
@click.argument("checkpoint")
@click.option("--no-verify", is_flag=True, help="Do not re-hash the edited tensors against the record.")
@json_option
def log_cmd(checkpoint, no_verify, as_json) -> None:
    """The patches applied to CHECKPOINT, in order, with their edits and fingerprints."""
    r = checkpoint_log(checkpoint, verify=not no_verify)
    if as_json:
        echo_json(r)
        return
    if not r["rompatch"]:
        click.echo(f"{r['path']}: no rompatch record (no patches applied by rompatch)")
        return
    base = r["base"]
    click.echo(f"checkpoint {r['path']}")
    click.echo(f"base       {base.get('model')}" + (f" @ {base['revision']}" if base.get("revision") else ""))
    click.echo(f"undo data  {_mb(r['undo_bytes'])}")
    for e in r["applied"]:
        forced = f"  FORCED ({', '.join(e['forced_reasons'])})" if e["forced"] else ""
        click.echo(f"\n[{e['index']}] patch {e['id']}{forced}")
        click.echo(f"    applied {e['applied_at']}" + (f" from {e['source']}" if e["source"] else ""))
        if e["lineage"]:
            click.echo(f"    on top of {', '.join(x[:12] for x in e['lineage'])}")
        for line in merge_lines(e.get("merged_from"), indent="    "):
            click.echo(line)
        for ed in e["edits"]:
            if ed["subject"] is not None:
                old = ed["target_true"] if ed["target_true"] is not None else "?"
                click.echo(f"    {ed['prompt'].replace('{}', ed['subject'])!r}: {old} → {ed['target_new']}")
            else:
                click.echo(f"    ({ed['kind']} delta, no request)")
            click.echo(f"      layer {ed['layer']}  {ed['parameter']}")
        for name, fp in e["fingerprints"].items():
            click.echo(f"    {name}: {fp['before'][:16]}… → {fp['after'][:16]}…")
    if r["modified"]:
        info(f"warning: {', '.join(r['modified'])} changed after rompatch wrote them; the record is stale")


def _save(patch: Patch, out: str, overwrite: bool) -> Path:
    if Path(out).exists() and not overwrite:
        raise click.ClickException(f"{out} already exists; pass --overwrite to replace it")
    return save_patch(patch, out)


@click.command("stack")
@click.argument("patches", nargs=-1, required=True)
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="Output patch file.")
@click.option(
    "--allow-conflicts", is_flag=True, help="Stack edits of one fact with different targets anyway."
)
@click.option(
    "--merge",
    is_flag=True,
    help="Re-solve the deltas that share a matrix so every edit's key maps exactly to its own target "
    "(no cross-talk between edits; needs patches with keys, format 1.2).",
)
@click.option(
    "--max-condition",
    type=click.FloatRange(min=1.0),
    default=DEFAULT_MAX_CONDITION,
    show_default=True,
    help="With --merge: refuse a joint system with a larger condition number.",
)
@overwrite_option
@json_option
def stack_cmd(patches, out, allow_conflicts, merge, max_condition, overwrite, as_json) -> None:
    """Combine patches into one patch file holding all their deltas, in order.

    Refuses patches on different base models, and (unless --allow-conflicts) edits of the same
    subject and relation with different targets. Lineage between the inputs is kept inside the stack.
    With --merge, the deltas are re-solved jointly (rompatch.merge): each edit's key gets exactly its
    own target value, the cross-talk of a plain stack is gone, and the condition number is reported.
    """
    if merge:
        p = merge_patches(list(patches), allow_conflicts=allow_conflicts, max_condition=max_condition)
    else:
        p = stack_patches(list(patches), allow_conflicts=allow_conflicts)
    path = _save(p, out, overwrite)
    if as_json:
        echo_json({"path": str(path), **p.summary()})
        return
    how = " merged" if merge else ""
    click.echo(f"wrote {path}: patch {p.id}, {len(p.deltas)} delta(s){how} from {len(patches)} patch(es)")
    for line in merge_lines(p.merged_from()):
        click.echo(line.replace("merged   ", "  "))


@click.command("extract")
@click.argument("base")
@click.argument("edited")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="Output patch file.")
@click.option(
    "--max-rank", type=click.IntRange(1), default=None, help="Keep at most R components per matrix."
)
@revision_option
@overwrite_option
@json_option
def extract_cmd(base, edited, out, max_rank, revision, overwrite, as_json) -> None:
    """Recover the edit between checkpoints BASE and EDITED as a patch.

    Compares each layer's MLP output matrix; the low-rank difference becomes kind "extracted"
    deltas (the requests are unknown). Apply the result to BASE to reproduce EDITED.
    """
    p = extract_patch(base, edited, max_rank=max_rank, revision=revision)
    path = _save(p, out, overwrite)
    report = json.loads(p.extra[EXTRACTED_FROM])["tensors"]
    if as_json:
        echo_json({"path": str(path), "report": report, **p.summary()})
        return
    click.echo(f"wrote {path}: patch {p.id}, {len(p.deltas)} extracted delta(s)")
    for name, t in report.items():
        if t["rank"]:
            click.echo(
                f"  {name}: rank {t['rank']} (kept {t['kept']}), relative residual {t['relative_residual']:.2e}"
            )


def _fmt_edit(e: dict) -> str:
    if e.get("subject") is None:
        return f"({e['kind']}) layer {e['layer']} {e['parameter']}"
    return f"{e['prompt'].replace('{}', e['subject'])!r} → {e['target_new']}  (layer {e['layer']})"


@click.command("diff")
@click.argument("a")
@click.argument("b")
@click.option("--base", default=None, help="For checkpoint vs patch: the base checkpoint to compare against.")
@json_option
def diff_cmd(a, b, base, as_json) -> None:
    """Compare two patches, two checkpoints, or a checkpoint and a patch.

    A folder is a checkpoint and a file a patch. Patches: edits only in A, only in B and in both
    (with cosines of u and v). Checkpoints: tensors that differ, with the numerical rank and relative
    size of each difference. Checkpoint and patch: whether the checkpoint contains the patch.
    """
    r = diff(a, b, base=base)
    if as_json:
        echo_json(r)
    elif r["kind"] == "patch/patch":
        _print_patch_diff(r)
    elif r["kind"] == "checkpoint/checkpoint":
        _print_checkpoint_diff(r)
    else:
        _print_contains(r)


def _print_sides(r: dict[str, Any], note: str | None, fmt: Any = str) -> None:
    """Both sides, a note, and what is only in one side (patches' edits or checkpoints' tensors)."""
    click.echo(f"A {r['a']}\nB {r['b']}")
    if note:
        click.echo(note)
    for e in r["only_a"]:
        click.echo(f"- only in A: {fmt(e)}")
    for e in r["only_b"]:
        click.echo(f"+ only in B: {fmt(e)}")


def _print_patch_diff(r: dict[str, Any]) -> None:
    _print_sides(r, "same base" if r["same_base"] else f"DIFFERENT bases: {r['base_differences']}", _fmt_edit)
    for side in ("a", "b"):
        for line in merge_lines(r["merged_from"][side]):
            click.echo(f"{side.upper()} {line}")
    for e in r["both"]:
        cos = (
            f"cos u {e['cos_u']:.6f}, cos v {e['cos_v']:.6f}"
            if e.get("cos_u") is not None
            else "different shapes"
        )
        same = " (identical)" if e.get("identical") else ""
        click.echo(f"= in both ({e['matched_by']}): {_fmt_edit(e['edit'])}: {cos}{same}")


def _print_checkpoint_diff(r: dict[str, Any]) -> None:
    _print_sides(r, "identical tensors" if r["identical"] else None)
    for m in r["dtype_or_shape_differs"]:
        click.echo(f"! {m['tensor']}: {m['a']} vs {m['b']}")
    for t in r["differ"]:
        rank = (
            "" if t.get("rank") is None else f"rank {'>=' if t['rank_is_lower_bound'] else ''}{t['rank']}, "
        )
        size = f"‖Δ‖/‖A‖ {t['relative_size']:.3g}" if "relative_size" in t else "non-float"
        click.echo(f"~ {t['tensor']} {t['shape']} {t['dtype']}: {rank}{size}")
    click.echo(f"{len(r['differ'])} tensor(s) differ, {r['n_identical']} identical")


def _print_contains(r: dict[str, Any]) -> None:
    verdict = {True: "contains", False: "does NOT contain", None: "cannot tell whether it contains"}[
        r["contains"]
    ]
    click.echo(f"{r['checkpoint']} {verdict} patch {r['patch'][:12]} (by {r['how']})")
    if r["how"] == "record" and r["contains"]:
        part = f" as part of {r['part_of'][:12]}" if r["part_of"] else ""
        click.echo(f"  applied at position {r['position']}{part}" + (" (forced)" if r["forced"] else ""))
    for name, t in r.get("tensors", {}).items():
        click.echo(f"  {name}: {', '.join(f'{k}={v}' for k, v in t.items())}")
    if r["contains"] is None:
        info("hint: pass --base BASE (the checkpoint the patch was made for) for a definite answer")


COMMANDS = [apply_cmd, revert_cmd, log_cmd, stack_cmd, diff_cmd, extract_cmd]
