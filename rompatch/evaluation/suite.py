"""The evaluation as ``rompatch eval`` runs it: from settings (a model name, a data file, options)
to results, output files and plots.

``run_suite(EvalSettings(...))`` reads the records, loads the model, resolves the layer and the
hyperparameters, gets the statistics, and runs either the per-record evaluation
(``evaluate.run_evaluation``) or sequential editing (``sequential.run_sequential``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..create import Editor
from ..distributed import SINGLE, Group, rank_device
from ..errors import EvalError, require_matplotlib
from ..models import load_model
from ..placement import describe
from ..rome import ROMEHyperParams
from ..stats import check_stats_data
from .evaluate import load_records, run_evaluation
from .fluency import Consistency, GenerationSettings
from .plot import plot_distributions, plot_sequential
from .records import file_sha256
from .sequential import run_sequential

DEFAULT_GEN_LENGTH = 50  # tokens per generation incl. the prompt; the paper uses 100 (slow on CPU)


@dataclass(frozen=True)
class EvalSettings:
    """What to evaluate and how (the options of ``rompatch eval``)."""

    model: str
    data: str  # a CounterFact or zsRE JSON file
    kind: str = "auto"  # auto, counterfact or zsre
    limit: int | None = None  # only the first N records
    layer: int | None = None  # default: the architecture's default layer
    stats_data: str | None = None
    stats_tokens: int | None = None
    mom2: bool = True  # False: no covariance adjustment (ablation)
    fast: bool = False  # bfloat16 autocast for the v* optimisation
    neighbours: int | None = None  # ROMEHyperParams.neighbours (None: the model's default)
    batch_size: int = 64
    fluency: bool = True  # CounterFact: fluency GE from generation_prompts
    gen_length: int = DEFAULT_GEN_LENGTH
    gen_seed: int = 0
    snippets: str | None = None  # ROME's attribute_snippets.json: consistency RS
    tfidf: str | None = None  # folder with ROME's idf.npy and tfidf_vocab.json
    zsre_target: str = "answers"  # answers or alt
    sequential: int | None = None  # N edits one after another
    eval_every: int = 10  # with sequential: re-measure every K edits
    out_dir: str | None = None
    plot: bool = True  # a PNG plot into out_dir
    label: str | None = None  # the model's name in the summary (default: model)
    device: str | None = None
    placement: dict[str, Any] | None = None  # load_model's device_map, max_memory, offload_folder
    dtype: str | None = None

    @property
    def model_label(self) -> str:
        return self.label or self.model


@dataclass
class SuiteResult:
    """What ``run_suite`` did: the kind of data, the hyperparameters, the result and the plot."""

    kind: str
    hparams: ROMEHyperParams
    result: dict[str, Any]  # run_evaluation's or run_sequential's
    plot: Path | None
    sequential: bool


def load_editor(
    s: EvalSettings, *, notify: Callable[[str], None] | None = None, group: Group = SINGLE
) -> Editor:
    """Load the model (under torchrun, onto this process's GPU); its ``Editor`` resolves the layer
    and gets the statistics (``s.mom2``), shared by ``group``'s processes."""
    model, tok = load_model(s.model, device=rank_device(s.device), dtype=s.dtype, **(s.placement or {}))
    where = describe(model)
    if where is not None and notify is not None and group.is_main:
        notify(where)
    hp = ROMEHyperParams(
        layer=s.layer,
        mom2_adjustment=s.mom2,
        optim_autocast="bfloat16" if s.fast else "none",
        neighbours=s.neighbours,
    )
    return Editor(
        model,
        tok,
        hparams=hp,
        stats_data=s.stats_data,
        stats_tokens=s.stats_tokens,
        progress=True,
        notify=notify if group.is_main else None,
        group=group,
    )


def _read_records(s: EvalSettings) -> tuple[str, list[dict[str, Any]]]:
    """The records to evaluate (checked before any model is loaded)."""
    if s.tfidf and not s.snippets:
        raise EvalError("--tfidf needs --snippets (the reference texts RS compares against)")
    if s.plot and s.out_dir:
        require_matplotlib()  # fail before any heavy work if matplotlib is missing
    kind, records = load_records(s.data, kind=s.kind, limit=None if s.sequential else s.limit)
    if s.sequential and s.limit:
        records = records[: s.limit]
    if s.sequential and s.sequential > len(records):
        raise EvalError(
            f"--sequential {s.sequential} needs {s.sequential} records but the data has {len(records)}; lower N"
        )
    return kind, records


def suite_config(
    s: EvalSettings,
    kind: str,
    editor: Editor,
    generation: GenerationSettings | None,
    consistency: Consistency | None,
) -> dict[str, Any]:
    """The configuration results are recorded with (an output folder holds results of one only)."""
    stats = editor.stats
    return {
        "model": s.model,
        "dtype": s.dtype,
        "kind": kind,
        "data": Path(s.data).name,
        "data_sha256": file_sha256(s.data),
        "hparams": editor.hparams.to_dict(),
        "stats": None if stats is None else hashlib.sha256(stats.sha256.encode()).hexdigest()[:16],
        "generation": None if generation is None else generation.to_dict(),
        "consistency": bool(consistency),
        "zsre_target": s.zsre_target if kind == "zsre" else None,
    }


def spare_fluency_prompts(kind: str, records: Sequence[Mapping[str, Any]], n: int) -> list[str]:
    """Fluency of unrelated text: generation prompts of the two records after the ``n`` edited ones."""
    if kind != "counterfact":
        return []
    spare = records[n : n + 2] or records[:2]
    return [p for r in spare for p in r.get("generation_prompts", [])]


def run_suite(
    s: EvalSettings, *, notify: Callable[[str], None] | None = None, group: Group = SINGLE
) -> SuiteResult:
    """Evaluate ROME edits as ``s`` says: per record before and after its edit, or sequentially.

    ``group``: torchrun processes that share the records (``run_evaluation``); a sequential run is
    one chain of edits and takes one process."""
    if s.sequential and group.world > 1:
        raise EvalError("--sequential is one chain of edits on one model; run it without torchrun")
    kind, records = _read_records(s)
    consistency = Consistency.load(s.snippets, s.tfidf) if s.snippets and kind == "counterfact" else None
    generation = (
        GenerationSettings(max_out_len=s.gen_length, seed=s.gen_seed)
        if s.fluency and kind == "counterfact"
        else None
    )
    check_stats_data(s.stats_data)
    editor = load_editor(s, notify=notify, group=group)
    common: dict[str, Any] = {
        "kind": kind,
        "hparams": editor.hparams,
        "stats": editor.stats,
        "config": suite_config(s, kind, editor, generation, consistency),
        "out_dir": s.out_dir,
        "generation": generation,
        "zsre_target": s.zsre_target,
        "batch_size": s.batch_size,
        "progress": True,
    }
    m, tok, out, plot = editor.model, editor.tok, Path(s.out_dir or "."), None
    if s.sequential:
        prompts = spare_fluency_prompts(kind, records, s.sequential)
        res = run_sequential(
            m, tok, records, n=s.sequential, every=s.eval_every, fluency_prompts=prompts, **common
        )
        if s.out_dir and s.plot:
            title = f"{s.model_label}: {s.sequential} sequential edits"
            plot = plot_sequential(res, out / f"eval-sequential-{kind}.png", title=title)
    else:
        res = run_evaluation(
            m, tok, records, consistency=consistency, model_label=s.model_label, group=group, **common
        )
        if s.out_dir and s.plot and group.is_main:
            plot = plot_distributions(res, out / f"eval-{kind}.png", title=f"{s.model_label}: {kind}")
    return SuiteResult(
        kind=kind, hparams=editor.hparams, result=res, plot=plot, sequential=bool(s.sequential)
    )


__all__ = ["EvalSettings", "SuiteResult", "load_editor", "run_suite", "suite_config"]
