"""``rompatch eval``: create each CounterFact edit on the base and measure it before and after."""

from __future__ import annotations

import json
import time

import click

from ..arch import check_layer, default_layer
from ..evaluate import evaluate_counterfact, load_counterfact, summarize, update_too_large
from ..models import load_model
from ..rome import ROMEHyperParams
from ..stats import DEFAULT_STATS_TOKENS, get_second_moment, text_source
from .common import device_option, dtype_option, echo_json, info, json_option, model_argument


@click.command(name="eval")
@model_argument
@click.option(
    "--data",
    "data_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="CounterFact JSON (list of records with requested_rewrite, paraphrase_prompts, ...).",
)
@click.option("--limit", type=click.IntRange(1), default=None, help="Evaluate only the first N records.")
@click.option("--layer", type=int, default=None, help="Layer to edit (default: the architecture's default).")
@click.option("--stats-data", default=None, metavar="PATH|DATASET", help="As for `rompatch create`.")
@click.option("--stats-tokens", default=DEFAULT_STATS_TOKENS, show_default=True, type=click.IntRange(1))
@click.option("--no-mom2", is_flag=True, help="Disable the covariance adjustment (ablation).")
@click.option("--fast", is_flag=True, help="bfloat16 autocast for the v* optimisation.")
@click.option(
    "--out",
    "out_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also write per-case results as JSON Lines to this file.",
)
@device_option
@dtype_option
@json_option
def eval_cmd(
    model, data_path, limit, layer, stats_data, stats_tokens, no_mom2, fast, out_path, device, dtype, as_json
):
    """Efficacy, paraphrase and neighborhood scores (and magnitudes, S) of ROME edits on CounterFact."""
    from tqdm.auto import tqdm

    records = load_counterfact(data_path, limit=limit)
    if stats_data is not None:
        text_source(stats_data)
    m, tok = load_model(model, device=device, dtype=dtype)
    if layer is not None:
        check_layer(m, layer)
    hp = ROMEHyperParams(
        layer=layer if layer is not None else default_layer(m),
        mom2_adjustment=not no_mom2,
        optim_autocast="bfloat16" if fast else "none",
    )
    stats = (
        None
        if no_mom2
        else get_second_moment(m, tok, hp.layer, stats_data=stats_data, n_tokens=stats_tokens, progress=True)
    )
    cases = []
    t0 = time.perf_counter()
    sink = open(out_path, "w", encoding="utf-8") if out_path else None
    try:
        for c in tqdm(
            evaluate_counterfact(m, tok, records, hparams=hp, stats=stats),
            total=len(records),
            desc="counterfact",
            unit="case",
        ):
            cases.append(c)
            if sink:
                sink.write(json.dumps(c) + "\n")
                sink.flush()
    finally:
        if sink:
            sink.close()
    summary = summarize(cases)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    summary["median_edit_seconds"] = sorted(c["edit"]["seconds"] for c in cases)[len(cases) // 2]
    summary["updates_larger_than_matrix"] = [c["case_id"] for c in cases if update_too_large(c)]
    summary["hparams"] = hp.to_dict()
    if as_json:
        echo_json({"summary": summary, "cases": cases})
        return
    click.echo(
        f"{len(cases)} CounterFact cases, layer {hp.layer}, {summary['seconds']} s "
        f"(median {summary['median_edit_seconds']:.1f} s per edit)"
    )
    click.echo("phase   ES     PS     NS     S      EM     PM     NM")
    for phase in ("pre", "post"):
        s = summary[phase]
        click.echo(
            f"{phase:<6}" + "".join(f" {s[k]:6.1f}" for k in ("ES", "PS", "NS", "S", "EM", "PM", "NM"))
        )
    if summary["updates_larger_than_matrix"]:
        info(f"updates with spectral norm above the matrix's: {summary['updates_larger_than_matrix']}")


COMMANDS = [eval_cmd]
