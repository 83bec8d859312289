"""``rompatch eval``: the ROME paper's evaluation suite (CounterFact, zsRE) and sequential editing."""

from __future__ import annotations

from pathlib import Path

import click

from ..constants import DEFAULT_STATS_TOKENS
from ..distributed import joining
from ..evaluation.suite import DEFAULT_GEN_LENGTH, EvalSettings, SuiteResult, run_suite
from .common import (
    device_option,
    dtype_option,
    echo_json,
    info,
    json_option,
    model_argument,
    placement_options,
)


# The options are declarations: blocks of the same shape (type, default, help) repeat no logic.
@click.command(name="eval")
@model_argument
@click.option(
    "--data",
    "data_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="CounterFact JSON (records with requested_rewrite, ...) or zsRE JSON (MEND format: src, loc, ...).",
)
@click.option(
    "--kind",
    type=click.Choice(["auto", "counterfact", "zsre"]),
    default="auto",
    show_default=True,
    help="Data kind; auto detects it from the records.",
)
@click.option("--limit", type=click.IntRange(1), default=None, help="Evaluate only the first N records.")
@click.option("--layer", type=int, default=None, help="Layer to edit (default: the architecture's default).")
@click.option("--stats-data", default=None, metavar="PATH|DATASET", help="As for `rompatch create`.")
@click.option(
    "--stats-tokens",
    default=None,
    type=click.IntRange(1),
    help=f"Statistics budget. Default: {DEFAULT_STATS_TOKENS:,} tokens of a corpus, fewer of sampled text.",
)
@click.option("--no-mom2", is_flag=True, help="Disable the covariance adjustment (ablation).")
@click.option("--fast", is_flag=True, help="bfloat16 autocast for the v* optimisation.")
@click.option(
    "--neighbours",
    type=click.IntRange(0),
    default=None,
    metavar="N",
    help="As for `rompatch create`: keep each edit away from up to N names near its subject "
    "(default: the model's, 64 for gemma3-270m, else 0).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(1),
    default=64,
    show_default=True,
    help="Sequences per forward pass when scoring (a case's prompts are scored together).",
)
@click.option(
    "--fluency/--no-fluency",
    default=True,
    show_default=True,
    help="CounterFact: generate from generation_prompts and report fluency GE (slow on CPU).",
)
@click.option(
    "--gen-length",
    type=click.IntRange(2),
    default=DEFAULT_GEN_LENGTH,
    show_default=True,
    help="Tokens per generation including the prompt (the paper: 100).",
)
@click.option("--gen-seed", type=int, default=0, show_default=True, help="Seed of the top-k sampling.")
@click.option(
    "--snippets",
    type=click.Path(dir_okay=False),
    default=None,
    help="ROME's attribute_snippets.json: enables the consistency score RS.",
)
@click.option(
    "--tfidf",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder with ROME's idf.npy and tfidf_vocab.json for RS (default: fitted on the snippets).",
)
@click.option(
    "--zsre-target",
    type=click.Choice(["answers", "alt"]),
    default="answers",
    show_default=True,
    help="zsRE edit target: answers[0] (ROME's reference code) or alt (MEND/EasyEdit).",
)
@click.option(
    "--sequential",
    type=click.IntRange(1),
    default=None,
    metavar="N",
    help="Sequential editing: N edits one after another, each on the already-edited model.",
)
@click.option(
    "--eval-every",
    type=click.IntRange(1),
    default=10,
    show_default=True,
    metavar="K",
    help="With --sequential: re-measure all edits so far every K edits (and after the first and last).",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Output folder: per-case JSONL (resumed on rerun), results.json, summary.md and a plot.",
)
@click.option("--plot/--no-plot", default=True, show_default=True, help="Write a PNG plot into --out.")
@click.option("--label", default=None, help="Model name in the summary table (default: MODEL).")
@device_option
@placement_options
@dtype_option
@json_option
def eval_cmd(model, data_path, no_mom2, out_dir, as_json, **options):
    """Evaluate ROME edits on CounterFact or zsRE, before and after each edit, or sequentially.

    \b
    CounterFact: efficacy, paraphrase and neighborhood scores and magnitudes, S, fluency GE
    (and consistency RS with --snippets). zsRE: efficacy, paraphrase and specificity as
    token-level accuracy. With --out DIR an interrupted run resumes where it stopped.
    Under torchrun the processes share the records and rank 0 writes the results:
    torchrun --standalone --nproc-per-node 2 -m rompatch eval MODEL --data FILE --out DIR
    """
    settings = EvalSettings(model=model, data=data_path, mom2=not no_mom2, out_dir=out_dir, **options)
    with joining(options.get("device")) as group:  # under torchrun: the records are shared
        run = run_suite(settings, notify=info, group=group)
    if not group.is_main:
        return
    if run.plot is not None:
        info(f"plot: {run.plot}")
    if as_json:
        echo_json({k: v for k, v in run.result.items() if k != "markdown"})
    elif run.sequential:
        _print_sequential(run)
    else:
        _print_evaluation(run, out_dir)


def _print_evaluation(run: SuiteResult, out_dir: str | None) -> None:
    res, s = run.result, run.result["summary"]
    info(
        f"{s['n']} {run.kind} cases, layer {run.hparams.layer}; {res['computed']} computed in {res['seconds']} s"
        + (f" (median {s['median_edit_seconds']:.1f} s per edit)" if s.get("median_edit_seconds") else "")
    )
    click.echo(res["markdown"])
    if s.get("updates_larger_than_matrix"):
        info(f"updates with spectral norm above the matrix's: {s['updates_larger_than_matrix']}")
    if out_dir:
        info(f"results: {Path(out_dir) / 'results.json'}, {Path(out_dir) / 'summary.md'}")


def _print_sequential(run: SuiteResult) -> None:
    res = run.result
    info(f"{res['completed']} sequential {run.kind} edits, layer {run.hparams.layer}, {res['seconds']} s")
    click.echo(res["markdown"])


COMMANDS = [eval_cmd]
