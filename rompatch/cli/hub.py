"""``rompatch push``, ``rompatch pull`` and ``rompatch export-peft``: share and serve patches."""

from __future__ import annotations

import click

from ..audit import DEFAULT_AUDIT_TOKENS
from ..hub.peft import export_peft
from ..hub.pull import pull_patch
from ..hub.push import push_patch
from ..refs import resolve_patches
from .common import echo_json, info, json_option, revision_option


@click.command()
@click.argument("args", nargs=-1, required=True, metavar="PATCH... REPO_ID")
@click.option("--private", is_flag=True, help="Create the repo private (an existing public repo is refused).")
@click.option("--revision", default=None, help="Branch to commit to (created from main if missing).")
@click.option("-m", "--message", default=None, help="Commit message (default: describes the patches).")
@click.option(
    "--base-model", default=None, help="Hub id for the card's base_model (default: from the patches)."
)
@click.option(
    "--audit",
    "run_audit",
    is_flag=True,
    help="Upload each patch with an audit attached: the one its file carries, else one run now on its "
    "base model ('rompatch audit'); the card gets an Audit section.",
)
@click.option(
    "--audit-tokens",
    default=DEFAULT_AUDIT_TOKENS,
    show_default=True,
    type=click.IntRange(1),
    help="Tokens of text an audit run by --audit scans.",
)
@json_option
def push(args, private, revision, message, base_model, run_audit, audit_tokens, as_json) -> None:
    """Upload PATCH files and a generated model card to the Hub repo REPO_ID, in one commit.

    Creates the repo if needed. Files already in the repo are kept. The token comes from HF_TOKEN
    or `hf auth login`. PATCH may also be a Hub reference (copied to REPO_ID).
    """
    if len(args) < 2:
        raise click.UsageError("pass at least one PATCH and the REPO_ID to push to")
    *patches, repo_id = args
    commit = push_patch(
        list(patches),
        repo_id,
        private=private,
        revision=revision,
        message=message,
        base_model=base_model,
        audit=run_audit,
        audit_tokens=audit_tokens,
    )
    url = str(getattr(commit, "commit_url", commit))
    if as_json:
        echo_json(
            {
                "repo_id": repo_id,
                "revision": revision or "main",
                "commit": getattr(commit, "oid", None),
                "commit_url": url,
                "repo_url": str(getattr(commit, "repo_url", "")),
            }
        )
        return
    info(f"pushed {len(patches)} patch(es) to {repo_id}" + (f" (branch {revision})" if revision else ""))
    click.echo(url)


@click.command()
@click.argument("ref", metavar="REF")
@click.option(
    "-o",
    "--output",
    "local_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Copy the patch into this folder (default: leave it in the Hugging Face cache).",
)
@revision_option
def pull(ref, local_dir, revision) -> None:
    """Download the patch REF (REPO_ID[/file.safetensors][@REV]) and print its local path."""
    click.echo(str(pull_patch(ref, revision=revision, local_dir=local_dir)))


@click.command("export-peft")
@click.argument("patches", nargs=-1, required=True, metavar="PATCH...")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(), help="Adapter folder to write.")
@click.option("--base-model", default=None, help="base_model_name_or_path (default: the patch's base).")
@click.option("--force", is_flag=True, help="Export even if a patch's lineage is not exported with it.")
@click.option(
    "--num-layers",
    type=click.IntRange(1),
    default=None,
    help="Also write exact all-zero weights on every layer 0..N-1, one rank for all (for TGI/LoRAX).",
)
@click.option(
    "--uniform-rank",
    is_flag=True,
    help="Zero-pad every module to one rank instead of rank_pattern (llama.cpp).",
)
@revision_option
def export_peft_cmd(patches, out_dir, base_model, force, num_layers, uniform_rank, revision) -> None:
    """Write PATCH (several: a stack, in order) as an exactly equal PEFT LoRA adapter in -o DIR.

    Rank = deltas per module, lora_A rows = uᵀ, lora_B columns = v, lora_alpha = r (scale 1).
    """
    plist = resolve_patches(patches, revision=revision)
    out = export_peft(
        plist,
        out_dir,
        base_model_name_or_path=base_model,
        force=force,
        num_layers=num_layers,
        uniform_rank=uniform_rank,
    )
    info(f"wrote a LoRA adapter for {', '.join(p.short_id for p in plist)}")
    click.echo(str(out))


COMMANDS = [push, pull, export_peft_cmd]
