"""``rompatch create`` and ``rompatch stats``: compute ROME edits, precompute statistics."""

from __future__ import annotations

import os
from pathlib import Path

import click

from ..apply import patched
from ..arch import EditTarget
from ..constants import DEFAULT_SAMPLED_TOKENS, DEFAULT_STATS_TOKENS
from ..create import Editor
from ..distributed import joining, rank_device
from ..methods.memit import MEMITEditor, MEMITHyperParams
from ..models import load_model
from ..opening import edit_groups
from ..patch import Patch, new_patch, save_patch
from ..placement import describe
from ..refs import resolve_patch
from ..request import EditRequest, load_requests
from ..rome import ROMEHyperParams, prompt_token_limit, validate_request
from ..stats import check_stats_data, get_second_moment
from .common import (
    device_option,
    dtype_option,
    echo_json,
    info,
    json_option,
    model_argument,
    note_placement,
    placement_options,
)

stats_options = [
    click.option(
        "--stats-data",
        default=None,
        metavar="PATH|DATASET|sampled[:SEED]",
        help="Statistics text: a .txt or .jsonl file, a Hugging Face dataset id (name[:config][@split]), "
        "or 'sampled[:SEED]' for text the model writes itself. Default: WikiText-2 from $ROMPATCH_DATA, "
        "else WikiText-103 from the Hub if it answers, else sampled text.",
    ),
    click.option(
        "--stats-tokens",
        default=None,
        type=click.IntRange(1),
        help=f"Token budget for the second-moment statistics. Default: {DEFAULT_STATS_TOKENS:,} tokens of a "
        f"corpus, {DEFAULT_SAMPLED_TOKENS:,} of sampled text.",
    ),
    click.option(
        "--stats-text-field", default="text", show_default=True, help="Text field for .jsonl and datasets."
    ),
]


def _apply(opts):
    def deco(f):
        for o in reversed(opts):
            f = o(f)
        return f

    return deco


@click.command()
@model_argument
@click.option("--prompt", help="Prompt with {} for the subject, e.g. '{} is located in'.")
@click.option("--subject", help="The subject, e.g. 'The Eiffel Tower'.")
@click.option("--target", "target_new", help="The new object, e.g. 'Rome'.")
@click.option("--target-true", default=None, help="The current object (recorded, and measured before/after).")
@click.option(
    "--requests",
    "requests_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="JSON or JSONL file of requests (flat or CounterFact 'requested_rewrite' shape).",
)
@click.option(
    "--mode",
    type=click.Choice(["independent", "sequential", "batch"]),
    default="independent",
    show_default=True,
    help="independent: each edit on the base; sequential: each on top of the previous ones; batch: all "
    "edits in one joint solve (each key gets exactly its own target; δ optimised in shared passes).",
)
@click.option(
    "--method",
    type=click.Choice(["rome", "memit"]),
    default="rome",
    show_default=True,
    help="rome: one rank-one update per edit at one layer; memit: all edits in one batch, spread over "
    "a range of layers (--layers).",
)
@click.option(
    "--layers",
    default=None,
    metavar="L1,L2,...",
    help="With --method memit: the layers to spread over (default: five, ending two after the default layer).",
)
@click.option(
    "--on",
    "on",
    multiple=True,
    metavar="PATCH",
    help="Compute the edits on the model with PATCH applied (repeatable, in order); recorded in lineage.",
)
@click.option(
    "--protect",
    is_flag=True,
    help="Leave the keys of the patches already applied (--on, and earlier edits in sequential mode) and "
    "the base's principal key directions unchanged (AlphaEdit-style, exact).",
)
@click.option(
    "--protect-principal",
    type=click.IntRange(0),
    default=None,
    help="With --protect: how many top eigenvectors of the statistics C to protect (default 32).",
)
@click.option(
    "--neighbours",
    type=click.IntRange(0),
    default=None,
    metavar="N",
    help="Keep the update away from up to N other subjects the model names next to the edit's subject "
    "(their keys in the edit's prompt are left unchanged, exactly); see docs/auditing.md. Default: the "
    "model's, 64 for gemma3-270m (where it measurably wins), else 0 (off).",
)
@click.option(
    "--split", is_flag=True, help="With --requests in independent mode, write one patch per edit into -o DIR."
)
@click.option("--layer", type=int, default=None, help="Layer to edit (default: the architecture's default).")
@_apply(stats_options)
@click.option(
    "--no-mom2", is_flag=True, help="Disable the covariance adjustment (not recommended; for ablations)."
)
@click.option("--steps", type=click.IntRange(1), default=None, help="Optimisation steps for v* (default 25).")
@click.option(
    "--fast", is_flag=True, help="bfloat16 autocast for the v* optimisation (u and v stay float32)."
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(),
    help="Patch file (or folder with --split / sequential).",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@device_option
@placement_options
@dtype_option
@json_option
def create(
    model,
    prompt,
    subject,
    target_new,
    target_true,
    requests_file,
    mode,
    method,
    layers,
    on,
    protect,
    protect_principal,
    neighbours,
    split,
    layer,
    stats_data,
    stats_tokens,
    stats_text_field,
    no_mom2,
    steps,
    fast,
    seed,
    output,
    overwrite,
    device,
    placement,
    dtype,
    as_json,
) -> None:
    """Compute a ROME edit of MODEL and write it as a patch.

    \b
    rompatch create smollm2-135m --prompt "{} is located in the city of" \\
        --subject "The Eiffel Tower" --target Rome --target-true Paris -o eiffel-rome.safetensors
    """
    reqs = _requests(requests_file, prompt, subject, target_new, target_true)
    if split and mode != "independent":
        raise click.UsageError(
            f"--split writes independent edits one per file; it does not go with --mode {mode}"
        )
    if protect_principal is not None and not protect:
        raise click.UsageError("--protect-principal needs --protect")
    memit_layers = _memit_options(
        method, layers, mode=mode, split=split, protect=protect, layer=layer, no_mom2=no_mom2, fast=fast,
        neighbours=neighbours,
    )  # fmt: skip
    base_patches = [resolve_patch(x) for x in on]  # a bad --on fails before the model loads
    out = Path(output)
    many_files = mode == "sequential" or split
    _check_output(out, many_files=many_files, overwrite=overwrite)
    if not no_mom2:
        check_stats_data(stats_data, text_field=stats_text_field)  # fail before loading the model
    m, tok = load_model(model, device=device, dtype=dtype, **placement)
    note_placement(describe(m))
    for r in reqs:  # tokens: before the statistics, the heavy part
        validate_request(tok, r, max_tokens=prompt_token_limit(m))
    hp = ROMEHyperParams(
        layer=layer,
        seed=seed,
        mom2_adjustment=not no_mom2,
        **({"v_steps": steps} if steps else {}),
        optim_autocast="bfloat16" if fast else "none",
        protect=protect,
        **({"protect_principal": protect_principal} if protect_principal is not None else {}),
        **({"neighbours": neighbours} if neighbours is not None else {}),
    )
    progress = not as_json or os.isatty(2)
    if method == "memit":
        memit = MEMITHyperParams(
            layers=memit_layers, seed=seed, context_length_params=hp.context_length_params,
            **({"v_steps": steps} if steps else {}),
        )  # fmt: skip
        with patched(m, base_patches):
            ed = MEMITEditor(
                m, tok, hparams=memit, stats_data=stats_data, stats_tokens=stats_tokens,
                stats_text_field=stats_text_field, progress=progress, notify=info,
            )  # fmt: skip
            _write_one(ed.patch(reqs), out, as_json=as_json)
        return
    editor = Editor(
        m,
        tok,
        hparams=hp,
        stats_data=stats_data,
        stats_tokens=stats_tokens,
        stats_text_field=stats_text_field,
        progress=progress,
        notify=info,
    )
    with patched(m, base_patches):
        if many_files:
            patches = editor.chain(reqs) if mode == "sequential" else _split(editor.patch(reqs))
            _write_folder(out, patches, as_json=as_json)
            return
        patch = editor.batch(reqs) if mode == "batch" else editor.patch(reqs)
    _write_one(patch, out, as_json=as_json)


def _write_one(patch: Patch, out: Path, *, as_json: bool) -> None:
    save_patch(patch, out)
    if as_json:
        echo_json({"path": str(out), **patch.summary()})
        return
    edits = patch.summary()["edits"]
    for e in edits:
        if e["subject"] is not None and not e["opening"]:
            click.echo(_line(e))
    opening = sum(e["opening"] for e in edits)
    if opening:
        info(
            f"{opening} edit(s) with an opening delta: the prompt opens with its subject and the first delta "
            "missed it (docs/creating-edits.md)"
        )
    compressed = sum(1 for d in patch.deltas if "svd_compressed" in d.hparams)
    if compressed:
        info(
            f"{compressed} SVD-compressed delta(s): the update outweighed the dense matrix as one pair per edit"
        )
    info(f"wrote {out} (patch {patch.short_id}, {out.stat().st_size:,} bytes)")


def _memit_options(
    method, layers, *, mode, split, protect, layer, no_mom2, fast, neighbours
) -> tuple[int, ...] | None:
    """The --layers of a MEMIT edit; refuses the options that are ROME's only."""
    if method != "memit":
        if layers:
            raise click.UsageError("--layers is for --method memit; ROME edits one layer (--layer)")
        return None
    clash = [
        name
        for name, on in (
            (f"--mode {mode}", mode == "sequential"), ("--split", split), ("--protect", protect),
            ("--layer", layer is not None), ("--no-mom2", no_mom2), ("--fast", fast),
            ("--neighbours", neighbours is not None),
        )
        if on
    ]  # fmt: skip
    if clash:
        raise click.UsageError(
            f"--method memit solves all requests in one batch over --layers; it does not take {', '.join(clash)}"
        )
    if not layers:
        return None
    try:
        return tuple(int(x) for x in layers.split(","))
    except ValueError:
        raise click.UsageError(
            f"--layers must be comma-separated integers like 4,5,6, not {layers!r}"
        ) from None


def _requests(requests_file, prompt, subject, target_new, target_true) -> list[EditRequest]:
    """The edit requests: from --requests FILE, or the one --prompt/--subject/--target."""
    if requests_file:
        if prompt or subject or target_new:
            raise click.UsageError("give either --requests FILE or --prompt/--subject/--target, not both")
        return load_requests(requests_file)
    missing = [
        n for n, v in (("--prompt", prompt), ("--subject", subject), ("--target", target_new)) if not v
    ]
    if missing:
        raise click.UsageError(f"missing {', '.join(missing)} (or pass --requests FILE)")
    return [EditRequest(prompt, subject, target_new, target_true)]


def _check_output(out: Path, *, many_files: bool, overwrite: bool) -> None:
    """Before any heavy work: the output can be written (its nearest existing folder is a writable
    folder) and is not replaced without --overwrite."""
    above = next(p for p in out.absolute().parents if p.exists())  # the root always exists
    if not above.is_dir():
        raise click.ClickException(
            f"cannot write {out}: {above} is a file, not a folder; choose another output"
        )
    if not os.access(above, os.W_OK | os.X_OK):
        raise click.ClickException(
            f"cannot write {out}: folder {above} is not writable; choose another output"
        )
    if out.exists() and not overwrite:
        raise click.ClickException(f"{out} exists; pass --overwrite to replace it")
    if many_files and out.exists() and not out.is_dir():
        raise click.ClickException(f"{out} is a file; sequential mode and --split write a folder of patches")


def _write_folder(out: Path, patches: list[Patch], *, as_json: bool) -> None:
    """One file per patch, numbered in order, named after the edit."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [save_patch(p, out / f"{i:03d}-{_slug(p)}.safetensors") for i, p in enumerate(patches)]
    summary = [{"path": str(pth), **p.summary()} for pth, p in zip(paths, patches)]
    if as_json:
        echo_json(summary)
        return
    for s in summary:
        click.echo(
            f"{s['path']}  {s['id'][:12]}  " + "; ".join(_line(e) for e in s["edits"] if not e["opening"])
        )


def _split(p: Patch) -> list[Patch]:
    """One patch per edit (an edit with an opening delta keeps both, ``rompatch.opening``)."""
    out = []
    for g in edit_groups(p.deltas):
        ds = [p.deltas[i] for i in g]
        out.append(
            new_patch(ds, base=p.base, parameters={d.parameter: p.parameters[d.parameter] for d in ds})
        )
    return out


def _slug(p: Patch) -> str:
    r = p.deltas[0].request
    s = f"{r.subject}-{r.target_new}" if r else "edit"
    return "".join(c if c.isalnum() else "-" for c in s).strip("-")[:60].lower()


def _line(e: dict) -> str:
    m = e["metrics"]
    text = e["prompt"].replace("{}", e["subject"]) if e["prompt"] else "?"
    probs = ""
    if "p_new_before" in m:
        probs = f"  P(new) {m['p_new_before']:.3f} → {m['p_new_after']:.3f}"
        if "p_true_before" in m:
            probs += f", P(true) {m['p_true_before']:.3f} → {m['p_true_after']:.3f}"
    return f"{text!r}: {e['target_true'] or '?'} → {e['target_new']}  (layer {e['layer']}){probs}"


@click.command()
@model_argument
@click.option(
    "--layer", "layers", type=int, multiple=True, help="Layer(s) to precompute (default: the default layer)."
)
@_apply(stats_options)
@device_option
@placement_options
@dtype_option
@json_option
def stats(
    model, layers, stats_data, stats_tokens, stats_text_field, device, placement, dtype, as_json
) -> None:
    """Precompute and cache second-moment statistics E[kkᵀ] for MODEL's edit layer(s).

    \b
    Under torchrun the processes share the pass and rank 0 writes the cache entry:
    torchrun --standalone --nproc-per-node 2 -m rompatch stats MODEL --stats-data FILE
    """
    check_stats_data(stats_data, text_field=stats_text_field)
    with joining(device) as group:
        m, tok = load_model(model, device=rank_device(device), dtype=dtype, **placement)
        note_placement(describe(m))
        results = []
        for layer in layers or (None,):
            target = EditTarget.resolve(m, layer=layer)
            layer = target.layer
            sm = get_second_moment(
                m,
                tok,
                layer,
                spec=target.spec,
                stats_data=stats_data,
                n_tokens=stats_tokens,
                text_field=stats_text_field,
                progress=True,
                notify=info,
                group=group,
            )
            rec = {"layer": layer, **sm.record()}
            results.append(rec)
            if not as_json and group.is_main:
                src = rec.get("data_source")
                secs = sm.identity.get("seconds")
                when = f"computed in {secs} s" if secs is not None else "cached"
                procs = f" by {group.world} processes" if group.world > 1 and secs is not None else ""
                click.echo(
                    f"layer {layer}: {sm.count:,} tokens of {src}, {when}{procs}; sha256 {rec['sha256'][:16]}…"
                )
        if as_json and group.is_main:
            echo_json(results)


COMMANDS = [create, stats]
