"""Figures for causal tracing: per-prompt heatmaps and the average-effect plots over many facts.

Needs matplotlib (the optional extra ``pip install 'rompatch[plot]'``), imported only when a figure
is drawn. Figures are rendered with the Agg canvas directly (``matplotlib.figure.Figure``), so
pyplot's global state and the user's backend are left alone and nothing opens a window.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_write
from ..errors import require_matplotlib
from .known_facts import AverageTrace, save_average
from .trace import CATEGORIES, TraceResult, save_trace

CMAPS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
TITLES = {
    "hidden": "Impact of restoring state after corrupted input",
    "mlp": "Impact of restoring MLP after corrupted input",
    "attn": "Impact of restoring Attn after corrupted input",
}
LINE_TITLES = {
    "hidden": "single hidden vector",
    "mlp": "run of {w} MLP lookups",
    "attn": "run of {w} Attn modules",
}


def _figure(figsize: tuple[float, float], dpi: int = 150) -> Any:
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | os.PathLike) -> Path:
    return atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight"))


def _layer_ticks(ax: Any, n_layers: int) -> None:
    step = 5 if n_layers > 12 else 1
    ticks = list(range(0, n_layers, step))
    ax.set_xticks([0.5 + i for i in ticks])
    ax.set_xticklabels([str(i) for i in ticks])


def plot_trace(
    result: TraceResult,
    kind: str,
    path: str | os.PathLike,
    *,
    model_name: str | None = None,
    title: str | None = None,
) -> Path:
    """One heatmap (tokens × layers) of ``result.scores[kind]``, written to ``path`` as PNG.

    As in the paper: rows are the prompt's tokens with the subject's marked ``*``, columns the
    (centre) layer restored, colour the probability of the answer from ``corrupted_prob`` up.
    """
    scores = result.scores[kind]
    labels = [repr(t)[1:-1] if t.strip() != t or not t else t for t in result.tokens]
    s0, s1 = result.subject_range
    for i in range(s0, s1):
        labels[i] = labels[i] + "*"
    T, L = scores.shape
    fig = _figure((max(3.5, 0.16 * L + 1.6), max(2.0, 0.24 * T + 0.9)))
    ax = fig.subplots()
    h = ax.pcolormesh(
        scores,
        cmap=CMAPS[kind],
        vmin=result.corrupted_prob,
        vmax=max(scores.max(), result.corrupted_prob + 1e-9),
    )
    ax.invert_yaxis()
    ax.set_yticks([0.5 + i for i in range(T)])
    ax.set_yticklabels(labels, fontsize=8)
    _layer_ticks(ax, L)
    name = model_name or str(result.model.get("model") or "the model")
    ax.set_title(title or TITLES[kind], fontsize=9)
    if kind == "hidden":
        ax.set_xlabel(f"single restored layer within {name}", fontsize=8)
    else:
        what = "MLP" if kind == "mlp" else "Attn"
        ax.set_xlabel(f"center of interval of {result.window} restored {what} layers", fontsize=8)
    if result.suggested_layer is not None and kind == "mlp":
        ax.add_patch(_box(result.suggested_layer, result.last_subject_token))
    cb = fig.colorbar(h, ax=ax)
    cb.ax.set_title(f"p({result.answer.strip()})", y=-0.1, fontsize=8, va="top")
    return _save(fig, path)


def _box(layer: int, token: int) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle((layer, token), 1, 1, fill=False, edgecolor="black", linewidth=1.0)


def plot_trace_all(
    result: TraceResult, out_dir: str | os.PathLike, *, prefix: str = "trace", model_name: str | None = None
) -> list[Path]:
    """One PNG per traced kind: ``<out_dir>/<prefix>-<kind>.png``."""
    require_matplotlib()
    out = Path(out_dir)
    return [plot_trace(result, k, out / f"{prefix}-{k}.png", model_name=model_name) for k in result.kinds]


def plot_average(
    avg: AverageTrace,
    out_dir: str | os.PathLike,
    *,
    prefix: str = "average",
    model_name: str | None = None,
) -> list[Path]:
    """The average-effect figures over many facts (the paper's Figure 2 style):

    - ``<prefix>-<kind>.png``: AIE heatmap, token category × layer (clipped at 0; the MLP and
      attention maps share the hidden-state map's colour scale, as in the reference notebook);
    - ``<prefix>-lines.png``: AIE per layer for each category and kind, with 95% bands.
    """
    require_matplotlib()
    out = Path(out_dir)
    name = model_name or str(avg.settings.get("model", {}).get("model") or "the model")
    window = avg.settings.get("window", 10)
    paths = []
    high = None
    for kind in avg.kinds:
        eff = np.clip(np.nan_to_num(avg.effect(kind), nan=0.0), 0, None)
        if high is None or kind == "hidden":
            high = float(eff.max()) or 1e-9
        fig = _average_heatmap(avg, kind, eff, vmax=max(high, float(eff.max())), name=name, window=window)
        paths.append(_save(fig, out / f"{prefix}-{kind}.png"))
    paths.append(_save(_average_lines(avg, name=name, window=window), out / f"{prefix}-lines.png"))
    return paths


def _average_heatmap(
    avg: AverageTrace, kind: str, eff: np.ndarray, *, vmax: float, name: str, window: int
) -> Any:
    """The AIE heatmap of one kind: token category × layer."""
    fig = _figure((5.0, 2.4))
    ax = fig.subplots()
    h = ax.pcolormesh(eff, cmap=CMAPS[kind], vmin=0.0, vmax=vmax)
    ax.invert_yaxis()
    ax.set_yticks([0.5 + i for i in range(len(CATEGORIES))])
    ax.set_yticklabels([c.capitalize() for c in avg.categories], fontsize=8)
    _layer_ticks(ax, avg.n_layers)
    what = {
        "hidden": "Indirect Effect of $h_i^{(l)}$",
        "mlp": "Indirect Effect of MLP",
        "attn": "Indirect Effect of Attn",
    }[kind]
    ax.set_title(f"Avg {what} over {avg.n_facts} prompts", fontsize=9)
    if kind == "hidden":
        ax.set_xlabel(f"single restored layer within {name}", fontsize=8)
    else:
        what = "MLP" if kind == "mlp" else "Attn"
        ax.set_xlabel(f"center of interval of {window} restored {what} layers", fontsize=8)
    cb = fig.colorbar(h, ax=ax)
    cb.ax.set_title("AIE", y=-0.12, fontsize=8, va="top")
    return fig


def _average_lines(avg: AverageTrace, *, name: str, window: int) -> Any:
    """AIE per layer for each category, one panel per kind, with 95% bands."""
    fig = _figure((4.3 * len(avg.kinds), 3.4))
    axes = np.atleast_1d(fig.subplots(1, len(avg.kinds), sharey=True))
    from matplotlib import colormaps

    colors = colormaps["tab10"].colors
    order = [0, 1, 2, 4, 5, 3]  # the reference notebook's colour order
    x = np.arange(avg.n_layers)
    for ax, kind in zip(axes, avg.kinds):
        eff, ci = avg.effect(kind), avg.ci95(kind)
        for i, label in enumerate(avg.categories):
            if avg.counts[i] == 0:
                continue
            c = colors[order[i]]
            ax.fill_between(x, eff[i] - ci[i], eff[i] + ci[i], alpha=0.25, color=c, linewidth=0)
            ax.plot(x, eff[i], label=label.capitalize(), color=c, linewidth=1.2)
        ax.set_title(f"AIE of a {LINE_TITLES[kind].format(w=window)}", fontsize=9)
        ax.set_xlabel(f"Layer number in {name}", fontsize=8)
        ax.axhline(0, color="0.6", linewidth=0.6)
    axes[0].set_ylabel("Average indirect effect on p(o)", fontsize=8)
    axes[min(1, len(axes) - 1)].legend(frameon=False, fontsize=7)
    fig.suptitle(f"{avg.n_facts} facts", fontsize=9)
    fig.tight_layout()
    return fig


def plot_layer_curves(
    curves: dict[str, tuple[np.ndarray, np.ndarray | None]],
    path: str | os.PathLike,
    *,
    title: str,
    xlabel: str = "Layer",
    ylabel: str = "Average indirect effect on p(o)",
) -> Path:
    """Line plot of per-layer curves, each ``label -> (mean, 95% half-width or None)``."""
    fig = _figure((5.2, 3.2))
    ax = fig.subplots()
    for label, (mean, ci) in curves.items():
        x = np.arange(len(mean))
        (line,) = ax.plot(x, mean, label=label, linewidth=1.3, marker="o", markersize=2.5)
        if ci is not None:
            ax.fill_between(x, mean - ci, mean + ci, alpha=0.2, color=line.get_color(), linewidth=0)
    ax.axhline(0, color="0.6", linewidth=0.6)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.legend(frameon=False, fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def save_with_figures(
    result: TraceResult | AverageTrace,
    out_dir: str | os.PathLike,
    *,
    plot: bool = True,
    model_name: str | None = None,
) -> list[Path]:
    """What ``rompatch trace -o DIR`` writes: the scores (``save_trace`` or ``save_average``) and,
    with ``plot``, the PNGs (``plot_trace_all`` or ``plot_average``)."""
    if isinstance(result, AverageTrace):
        files = save_average(result, out_dir)
        return files + (plot_average(result, out_dir, model_name=model_name) if plot else [])
    files = save_trace(result, out_dir)
    return files + (plot_trace_all(result, out_dir, model_name=model_name) if plot else [])
