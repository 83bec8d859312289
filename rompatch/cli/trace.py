"""``rompatch trace``: causal tracing of one prompt, or the average over many known facts."""

from __future__ import annotations

from pathlib import Path

import click

from ..constants import TRACE_BATCH_SIZE, TRACE_KINDS, TRACE_NOISE, TRACE_SAMPLES, TRACE_WINDOW
from ..errors import TraceError, require_matplotlib
from ..models import load_model
from ..placement import describe
from ..tracing.known_facts import trace_known
from ..tracing.plotting import save_with_figures
from ..tracing.trace import trace_fact
from .common import (
    device_option,
    dtype_option,
    echo_json,
    info,
    json_option,
    model_argument,
    note_placement,
    placement_options,
    revision_option,
)


def _kinds(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    if not value:
        return TRACE_KINDS
    kinds = [k.strip() for v in value for k in v.split(",") if k.strip()]
    bad = [k for k in kinds if k not in TRACE_KINDS]
    if bad or not kinds:
        raise click.BadParameter(f"{', '.join(bad) or '(none)'}; choose from {', '.join(TRACE_KINDS)}")
    return tuple(dict.fromkeys(kinds))


def _count_option(flag: str, default: int, help: str):
    """A whole number of at least 1, with its default shown."""
    return click.option(flag, default=default, show_default=True, type=click.IntRange(1), help=help)


def _positive_option(flag: str, help: str):
    """A number above 0, or None when not given."""
    return click.option(flag, type=click.FloatRange(min=0, min_open=True), default=None, help=help)


@click.command()
@model_argument
@click.option("--prompt", help="The prompt, with the subject written in it (or '{}' where it goes).")
@click.option("--subject", help="The subject, exactly as it appears in the prompt: its tokens get the noise.")
@click.option(
    "--known",
    "known_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Average over the facts of this JSON file (known_1000.json style) that the model gets right.",
)
@click.option("--target", help="Measure this answer's probability instead of the model's top prediction.")
@_count_option("--samples", TRACE_SAMPLES, "Noise draws per cell.")
@_positive_option(
    "--noise",
    f"Noise std as a multiple of the embedding std measured on WikiText-2 [default: {TRACE_NOISE:g}].",
)
@_positive_option("--noise-std", "Absolute noise std instead of --noise (no measurement).")
@_count_option("--window", TRACE_WINDOW, "Layers restored together for the mlp and attn kinds.")
@click.option(
    "--kinds",
    multiple=True,
    callback=_kinds,
    help="What to restore: hidden, mlp, attn (comma-separated or repeated) [default: all three].",
)
@click.option("--limit", type=click.IntRange(1), default=None, help="--known: trace at most N facts.")
@_count_option("--batch-size", TRACE_BATCH_SIZE, "Corrupted rows per forward pass.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the noise.")
@click.option(
    "-o",
    "--output",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write scores (JSON, NPZ) and PNG plots into this folder.",
)
@click.option("--no-plot", is_flag=True, help="Write no PNGs (matplotlib not needed).")
@revision_option
@device_option
@placement_options
@dtype_option
@json_option
def trace(
    model,
    prompt,
    subject,
    known_file,
    target,
    samples,
    noise,
    noise_std,
    window,
    kinds,
    limit,
    batch_size,
    seed,
    output,
    no_plot,
    revision,
    device,
    placement,
    dtype,
    as_json,
) -> None:
    """Causal tracing: which layers and tokens carry a fact (ROME paper, §2.1).

    With --prompt/--subject: corrupts the subject's embeddings with Gaussian noise and restores one
    state at a time (hidden states, MLP and attention outputs), writing scores.json, scores.npz and
    trace-<kind>.png, and prints the suggested edit layer (where the MLP effect at the last subject
    token peaks).

    With --known FILE: the average indirect effect over the facts the model gets right, by token
    category; writes average.json, average.npz, average-<kind>.png, average-lines.png and one
    cached result per fact under cases/ (a rerun with the same settings resumes).

    \b
    Examples:
      rompatch trace smollm2-135m --prompt "The Eiffel Tower is located in the city of" \\
          --subject "The Eiffel Tower" -o eiffel/
      rompatch trace smollm2-135m --known known_1000.json --limit 50 --kinds mlp -o known/
    """
    _check_usage(prompt, subject, known_file, target, limit, noise, noise_std)
    plot = output is not None and not no_plot
    if plot:
        require_matplotlib()  # fail before minutes of tracing
    settings = dict(
        samples=samples,
        noise=TRACE_NOISE if noise is None else noise,
        noise_std=noise_std,
        window=window,
        kinds=kinds,
        batch_size=batch_size,
        seed=seed,
    )
    m, tok = load_model(model, device=device, dtype=dtype, revision=revision, **placement)
    note_placement(describe(m))
    if known_file is None:
        result = _trace_prompt(m, tok, prompt, subject, target, settings)
    else:
        result = _trace_known(m, tok, known_file, limit, output, settings)
    files = [] if output is None else save_with_figures(result, output, plot=plot, model_name=model)
    if as_json:
        echo_json({**result.to_dict(), "files": [str(f) for f in files]})
    elif known_file is None:
        _print_trace(result)
    else:
        _print_average(result)
    for f in files if not as_json else []:
        info(f"wrote {f}")


def _check_usage(prompt, subject, known_file, target, limit, noise, noise_std) -> None:
    """The options that go together, checked before a model is loaded."""
    if known_file is None and (prompt is None or subject is None):
        raise click.UsageError("pass --prompt and --subject, or --known FILE")
    if known_file is not None and (prompt is not None or subject is not None or target is not None):
        raise click.UsageError("--known traces the file's facts; leave out --prompt, --subject and --target")
    if limit is not None and known_file is None:
        raise click.UsageError("--limit applies to --known only")
    if noise is not None and noise_std is not None:
        raise click.UsageError("pass --noise (a multiple of the embedding std) or --noise-std, not both")
    if known_file is not None and not known_file.is_file():
        raise TraceError(f"fact file {known_file} not found; pass a known_1000.json-style JSON file")


def _trace_prompt(m, tok, prompt, subject, target, settings):
    return trace_fact(m, tok, prompt, subject, target=target, **settings)


def _trace_known(m, tok, known_file, limit, output, settings):
    cases = None if output is None else output / "cases"
    avg = trace_known(m, tok, known_file, limit=limit, cache_dir=cases, progress=True, **settings)
    if avg.n_facts == 0:
        raise TraceError(
            f"none of the {avg.considered} facts checked is predicted correctly by this model "
            f"(skipped: {avg.skipped}); pass a fact file this model knows"
        )
    return avg


def _print_trace(r) -> None:
    sub = "".join(r.tokens[slice(*r.subject_range)])
    click.echo(
        f"prompt:     {r.prompt!r}  (subject {sub!r}, tokens {r.subject_range[0]}..{r.subject_range[1] - 1})"
    )
    click.echo(
        f"answer:     {r.answer!r}  p clean {r.clean_prob:.4f}, corrupted {r.corrupted_prob:.4f} "
        f"(noise std {r.noise['std']:.4g}, {r.samples} samples)"
    )
    if r.total_effect <= 0:
        info(r.no_effect_note())
    for k in r.kinds:
        s = r.scores[k]
        t, layer = divmod(int(s.argmax()), s.shape[1])
        click.echo(f"{k:<7} max restored p {s.max():.4f} at token {t} {r.tokens[t]!r}, layer {layer}")
    if r.suggested_layer is None:
        info("no suggested layer: trace the mlp kind for one")
        return
    last = r.tokens[r.last_subject_token]
    p = r.scores["mlp"][r.last_subject_token, r.suggested_layer]
    click.echo(
        f"suggested edit layer: {r.suggested_layer}  (MLP effect at the last subject token {last!r} "
        f"peaks there: p {p:.4f}, window {r.window})"
    )
    note = r.weak_subject_note()
    if note:
        info(note)


def _print_average(avg) -> None:
    skipped = ", ".join(f"{v} {k}" for k, v in sorted(avg.skipped.items())) or "none"
    click.echo(f"facts traced: {avg.n_facts} of {avg.considered} checked (skipped: {skipped})")
    click.echo(
        f"mean p clean {avg.mean_clean_prob:.4f}, corrupted {avg.mean_corrupted_prob:.4f}, "
        f"total effect {avg.total_effect:.4f}"
    )
    for k in avg.kinds:
        top = ", ".join(f"{layer} ({v:.3f})" for layer, v in avg.top_layers(k))
        click.echo(
            f"{k:<7} AIE at the last subject token peaks at layer {avg.peak_layer(k)}; top layers: {top}"
        )
    if "mlp" in avg.kinds:
        click.echo(f"MLP effect concentrates at layer {avg.peak_layer('mlp')} (last subject token)")


COMMANDS = [trace]
