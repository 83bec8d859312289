"""``rompatch audit``: what a patch changes beyond its own fact."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..atomic import atomic_write
from ..audit import DEFAULT_AUDIT_TOKENS, Thresholds, attach_audit, audit_patch, render
from ..models import load_model
from ..patch import save_patch
from ..placement import describe
from ..refs import resolve_patch
from ..stats import check_stats_data
from .common import (
    device_option,
    dtype_option,
    echo_json,
    info,
    json_option,
    note_placement,
    placement_options,
    revision_option,
)

_T = Thresholds()
# The verdict's thresholds as options: (field, what a warning means); defaults from Thresholds.
_THRESHOLDS = (
    ("firing_at", "A token fires at |reach| >= this."),
    ("max_firing", "Warn when more than this fraction of corpus tokens fire."),
    ("max_leak", "Warn when more than this fraction of other subjects flip to the target."),
    ("min_kept", "Warn when the subject keeps fewer than this fraction of its other answers."),
    ("max_ppl_increase", "Warn when corpus perplexity rises more than this many percent."),
    ("min_efficacy", "Warn when fewer than this fraction of the edit's own prompts give the target."),
)


def _threshold_options(f):
    for name, text in reversed(_THRESHOLDS):
        option = "--" + name.replace("_", "-")
        f = click.option(option, name, default=getattr(_T, name), show_default=True, type=float, help=text)(f)
    return f


@click.command()
@click.argument("patch", metavar="PATCH")
@click.option("--model", default=None, help="The model to audit on (default: the patch's base model).")
@click.option("--on", multiple=True, metavar="PATCH", help="Apply these patches first (the patch's lineage).")
@click.option(
    "--stats-data",
    default=None,
    metavar="PATH|DATASET|sampled[:SEED]",
    help="The text to scan, as for 'create' (default: the statistics text create would use).",
)
@click.option(
    "--tokens",
    default=DEFAULT_AUDIT_TOKENS,
    show_default=True,
    type=click.IntRange(1),
    help="Tokens of that text to scan.",
)
@click.option(
    "--top", default=20, show_default=True, type=click.IntRange(1, 1000), help="Top contexts kept per edit."
)
@click.option(
    "--leaks",
    default=10,
    show_default=True,
    type=click.IntRange(0, 100),
    help="Other subjects (the names that reach highest in the edit's prompt) to probe per edit.",
)
@click.option(
    "--paraphrase",
    "paraphrases",
    multiple=True,
    help="Another wording of the edit's prompt to probe ('{} ...' or a full text; repeatable).",
)
@_threshold_options
@click.option(
    "-o", "--output", default=None, type=click.Path(dir_okay=False), help="Also write the JSON report here."
)
@click.option(
    "--attach",
    is_flag=True,
    help="Write the report into PATCH's file (metadata 'audit'; the patch id does not change).",
)
@click.option("--strict", is_flag=True, help="Exit with status 1 when the verdict is warn.")
@click.option(
    "--seed", default=0, show_default=True, type=int, help="Seed of the text sampled near the subject."
)
@revision_option
@device_option
@placement_options
@dtype_option
@json_option
def audit(
    patch, model, on, stats_data, tokens, top, leaks, paraphrases, output, attach, strict, seed, revision, device,
    placement, dtype, as_json, **thresholds,
) -> None:  # fmt: skip
    """What PATCH changes beyond its own fact: where it fires, what else it changes, and a verdict.

    \b
    rompatch audit patches/michael-jordan-baseball.safetensors --tokens 20000

    Runs the text to the edited layer and measures each edit's reach (u·k)/(u·k*) at every token;
    probes the edit's own prompts, the same prompt with other names found where it fires, and the
    subject with other relations, before and after; and measures perplexity. The verdict is pass,
    or warn with the reasons (thresholds below).
    """
    limits = Thresholds(**thresholds)
    p = resolve_patch(patch, revision=revision)
    if attach and not Path(patch).is_file():
        raise click.UsageError(f"--attach rewrites a local patch file; {patch} is not one (pull it first)")
    lineage = [resolve_patch(x, revision=revision) for x in on]
    if output is not None and Path(output).is_dir():
        raise click.UsageError(f"--output {output} is a folder; pass a file name such as audit.json")
    check_stats_data(stats_data)
    m, tok = load_model(model or p.base["model"], device=device, dtype=dtype, **placement)
    note_placement(describe(m))
    report = audit_patch(
        m,
        tok,
        p,
        on=lineage,
        stats_data=stats_data,
        tokens=tokens,
        top=top,
        leaks=leaks,
        paraphrases=paraphrases,
        thresholds=limits,
        seed=seed,
        notify=None if as_json else info,
    )
    data = report.to_dict()
    if output is not None:
        atomic_write(
            output, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
        )
    if attach:
        save_patch(attach_audit(p, report), patch)
    if as_json:
        echo_json(data)
    else:
        click.echo(render(report))
        if attach:
            info(f"attached the audit to {patch}")
    if strict and report.verdict != "pass":
        raise SystemExit(1)


COMMANDS = [audit]
