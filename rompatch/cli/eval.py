"""``rompatch eval``: the ROME paper's evaluation suite (CounterFact, zsRE) and sequential editing."""

from __future__ import annotations

import hashlib
from pathlib import Path

import click

from ..arch import check_layer, default_layer
from ..constants import DEFAULT_STATS_TOKENS
from ..errors import EvalError
from .common import device_option, dtype_option, echo_json, info, json_option, model_argument

DEFAULT_GEN_LENGTH = 50  # tokens per generation incl. the prompt; the paper uses 100 (slow on CPU)


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
@dtype_option
@json_option
def eval_cmd(
    model,
    data_path,
    kind,
    limit,
    layer,
    stats_data,
    stats_tokens,
    no_mom2,
    fast,
    batch_size,
    fluency,
    gen_length,
    gen_seed,
    snippets,
    tfidf,
    zsre_target,
    sequential,
    eval_every,
    out_dir,
    plot,
    label,
    device,
    dtype,
    as_json,
):
    """Evaluate ROME edits on CounterFact or zsRE, before and after each edit, or sequentially.

    \b
    CounterFact: efficacy, paraphrase and neighborhood scores and magnitudes, S, fluency GE
    (and consistency RS with --snippets). zsRE: efficacy, paraphrase and specificity as
    token-level accuracy. With --out DIR an interrupted run resumes where it stopped.
    """
    from ..evaluation.evaluate import file_sha256, load_records, run_evaluation
    from ..evaluation.fluency import GenerationSettings
    from ..models import load_model
    from ..rome import ROMEHyperParams
    from ..stats import check_stats_data, get_second_moment

    if tfidf and not snippets:
        raise EvalError("--tfidf needs --snippets (the reference texts RS compares against)")
    if plot and out_dir:
        from ..evaluation.plot import _pyplot

        _pyplot()  # fail before any heavy work if matplotlib is missing
    found, records = load_records(data_path, kind=kind, limit=None if sequential else limit)
    if sequential and limit:
        records = records[:limit]
    if sequential and sequential > len(records):
        raise EvalError(
            f"--sequential {sequential} needs {sequential} records but the data has {len(records)}; lower N"
        )
    consistency = None
    if snippets and found == "counterfact":
        from ..evaluation.fluency import Consistency

        consistency = Consistency.load(snippets, tfidf)
    check_stats_data(stats_data)
    m, tok = load_model(model, device=device, dtype=dtype)
    if layer is not None:
        check_layer(m, layer)
    hp = ROMEHyperParams(
        layer=layer if layer is not None else default_layer(m),
        mom2_adjustment=not no_mom2,
        optim_autocast="bfloat16" if fast else "none",
    )
    generation = (
        GenerationSettings(max_out_len=gen_length, seed=gen_seed)
        if fluency and found == "counterfact"
        else None
    )
    stats = (
        None
        if no_mom2
        else get_second_moment(
            m, tok, hp.layer, stats_data=stats_data, n_tokens=stats_tokens, progress=True, notify=info
        )
    )
    config = {
        "model": model,
        "dtype": dtype,
        "kind": found,
        "data": Path(data_path).name,
        "data_sha256": file_sha256(data_path),
        "hparams": hp.to_dict(),
        "stats": None if stats is None else hashlib.sha256(stats.sha256.encode()).hexdigest()[:16],
        "generation": None if generation is None else generation.to_dict(),
        "consistency": bool(consistency),
        "zsre_target": zsre_target if found == "zsre" else None,
    }
    name = label or model
    if sequential:
        _sequential(
            m,
            tok,
            found,
            records,
            sequential,
            eval_every,
            hp,
            stats,
            config,
            out_dir,
            generation,
            zsre_target,
            batch_size,
            plot,
            name,
            as_json,
        )
        return
    res = run_evaluation(
        m,
        tok,
        records,
        kind=found,
        hparams=hp,
        stats=stats,
        config=config,
        out_dir=out_dir,
        generation=generation,
        consistency=consistency,
        zsre_target=zsre_target,
        batch_size=batch_size,
        progress=True,
        model_label=name,
    )
    if out_dir and plot:
        from ..evaluation.plot import plot_distributions

        p = plot_distributions(res, Path(out_dir) / f"eval-{found}.png", title=f"{name}: {found}")
        info(f"plot: {p}")
    if as_json:
        echo_json({k: v for k, v in res.items() if k != "markdown"})
        return
    s = res["summary"]
    info(
        f"{s['n']} {found} cases, layer {hp.layer}; {res['computed']} computed in {res['seconds']} s"
        + (f" (median {s['median_edit_seconds']:.1f} s per edit)" if s.get("median_edit_seconds") else "")
    )
    click.echo(res["markdown"])
    if s.get("updates_larger_than_matrix"):
        info(f"updates with spectral norm above the matrix's: {s['updates_larger_than_matrix']}")
    if out_dir:
        info(f"results: {Path(out_dir) / 'results.json'}, {Path(out_dir) / 'summary.md'}")


def _sequential(
    m,
    tok,
    kind,
    records,
    n,
    every,
    hp,
    stats,
    config,
    out_dir,
    generation,
    zsre_target,
    batch_size,
    plot,
    name,
    as_json,
):
    from ..evaluation.sequential import run_sequential

    # Fluency of unrelated text: generation prompts of the two records after the edited ones.
    spare = records[n : n + 2] or records[:2]
    prompts = [p for r in spare for p in r.get("generation_prompts", [])] if kind == "counterfact" else []
    res = run_sequential(
        m,
        tok,
        records,
        kind=kind,
        n=n,
        hparams=hp,
        stats=stats,
        every=every,
        out_dir=out_dir,
        config=config,
        generation=generation,
        fluency_prompts=prompts,
        zsre_target=zsre_target,
        batch_size=batch_size,
        progress=True,
    )
    if out_dir and plot:
        from ..evaluation.plot import plot_sequential

        p = plot_sequential(
            res, Path(out_dir) / f"eval-sequential-{kind}.png", title=f"{name}: {n} sequential edits"
        )
        info(f"plot: {p}")
    if as_json:
        echo_json({k: v for k, v in res.items() if k != "markdown"})
        return
    info(f"{res['completed']} sequential {kind} edits, layer {hp.layer}, {res['seconds']} s")
    click.echo(res["markdown"])


COMMANDS = [eval_cmd]
