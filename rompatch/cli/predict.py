"""``rompatch predict``: what the model says, without and with patches, side by side."""

from __future__ import annotations

import click

from ..apply import patched
from ..models import load_model
from ..placement import describe
from ..predict import greedy, top_next_tokens
from ..refs import resolve_patches
from .common import (
    device_option,
    dtype_option,
    echo_json,
    json_option,
    model_argument,
    note_placement,
    placement_options,
    revision_option,
)


def _run(model, tok, prompt: str, top_k: int, max_new_tokens: int) -> dict:

    return {
        "top": [{"token": t, "prob": p} for t, p in top_next_tokens(model, tok, prompt, k=top_k)],
        "greedy": greedy(model, tok, prompt, max_new_tokens=max_new_tokens),
    }


def _print(label: str, r: dict) -> None:
    click.echo(label)
    click.echo("  next:   " + "  ".join(f"{t['token']!r} {t['prob']:.3f}" for t in r["top"]))
    click.echo(f"  greedy: {r['greedy']!r}")


@click.command()
@model_argument
@click.option("--prompt", "prompts", multiple=True, required=True, help="Prompt text (repeatable).")
@click.option(
    "--patch",
    "patch_refs",
    multiple=True,
    help="Patch file or Hub reference to apply (repeatable, in order).",
)
@click.option("--top-k", default=5, show_default=True, type=click.IntRange(1, 100))
@click.option("--max-new-tokens", default=8, show_default=True, type=click.IntRange(1, 512))
@click.option("--force", is_flag=True, help="Apply patches even if base fingerprints differ.")
@revision_option
@device_option
@placement_options
@dtype_option
@json_option
def predict(
    model, prompts, patch_refs, top_k, max_new_tokens, force, revision, device, placement, dtype, as_json
) -> None:
    """Top next tokens and the greedy continuation of each --prompt.

    With --patch, prints the result without and with the patches, so you see what they change.
    """
    patches = resolve_patches(patch_refs, revision=revision)
    m, tok = load_model(model, device=device, dtype=dtype, **placement)
    note_placement(describe(m))
    results = []
    for prompt in prompts:
        r = {"prompt": prompt, "base": _run(m, tok, prompt, top_k, max_new_tokens)}
        if patches:
            with patched(m, *patches, force=force):
                r["patched"] = _run(m, tok, prompt, top_k, max_new_tokens)
        results.append(r)
    if as_json:
        echo_json({"model": model, "patches": [p.id for p in patches], "results": results})
        return
    for r in results:
        click.echo(f"prompt: {r['prompt']!r}")
        _print("without patches" if patches else "model", r["base"])
        if patches:
            _print("with " + ", ".join(p.short_id for p in patches), r["patched"])


COMMANDS = [predict]
