"""Issue 14: many edits. How do N edits of one model fare, by how they are combined?

    python -m bench.many_edits --model smollm2-135m \
        --modes independent,merged,sequential,protected,batch,memit --n 1,10,100 \
        --out bench/results/many_edits_entries.json --markdown --plot bench/figures/many_edits.png

For each mode and N, on the first N records of EasyEdit's CounterFact ``counterfact-train.json``
(the same records for every mode; smaller N are prefixes of larger ones):

- ES, PS, NS (percent, CounterFact's definitions: ``evaluate.measure_case``/``case_scores`` on the
  records converted by ``evaluation.easyedit``), and the same scores of the unedited model;
- perplexity on the first 16 windows of 512 tokens of WikiText-2's ``wiki.test.raw`` (the raw text
  tokenized without special tokens, cut into consecutive windows; every token but each window's
  first is predicted), edited and unedited;
- GE: the mean weighted bi/tri-gram entropy (×100, ``metrics.mean_ngram_entropy``) of generations
  of 40 new tokens from the 8 fixed ``PROMPTS``, top-5 sampling with seed 0 as in ROME (the edited
  and unedited model share the random draws), edited and unedited;
- ‖ΣΔ‖₂/‖W‖₂ per edited matrix (ΣΔ measured as the weight with the edits applied minus the
  weight without): the largest, and the number of matrices;
- seconds to compute the N edits (the edit computation only: not the statistics, the context
  templates, nor the evaluation) and edits per second; ``merged`` also records the merge alone.

Modes: ``independent`` (each edit computed on the unedited model; the deltas add up),
``merged`` (the same deltas merged: ``rompatch.merge.merge_patches``), ``sequential`` (edit i
computed with edits < i applied), ``protected`` (sequential with ``ROMEHyperParams(protect=True)``),
``batch`` (one joint solve, ``Editor.batch``) and ``memit`` (``MEMITEditor``). Independent and
sequential edits are computed once at the largest N and evaluated on their first N edits (their time
is that of the first N edits); batch and MEMIT are solved anew for each N. A mode whose API is
missing is skipped with a message. After each evaluation the edits are reverted, and the model's
weights are checked to be bit-identical to the unedited ones.

Results: one entry per (mode, N) in ``--out``, written as each finishes; a rerun skips the
entries already there with the same configuration (model, data, metrics' settings, hyperparameters).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import inspect
import json
import math
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
MODES = ("independent", "merged", "sequential", "protected", "batch", "memit")
DATA = "counterfact/easyedit/counterfact-train.json"
WIKITEXT = "wikitext-2/raw/wiki.test.raw"
PPL_WINDOWS, PPL_WINDOW = 16, 512
GEN_TOKENS = 40
PROMPTS = (
    "The best thing about living in a big city is",
    "In the history of science, the most important discovery was",
    "My favourite recipe for a quick dinner is",
    "The river flows through the valley and",
    "When the company announced its new product,",
    "The football match last weekend ended",
    "Music from the eighteenth century is known for",
    "The old library in the town centre",
)


# ----------------------------------------------------------------------------- measurements


def ppl_windows(tok: Any, text: str, *, windows: int = PPL_WINDOWS, window: int = PPL_WINDOW) -> torch.Tensor:
    """The first ``windows`` consecutive windows of ``window`` tokens of ``text``: (windows, window)."""
    need, chars = windows * window, windows * window * 8
    while True:  # tokenize a prefix long enough (the whole file is not needed)
        ids = tok(text[:chars], add_special_tokens=False)["input_ids"]
        if len(ids) > need or chars >= len(text):
            break
        chars *= 2
    if len(ids) < need:
        raise SystemExit(f"the perplexity text has {len(ids)} tokens, fewer than {windows} × {window}")
    return torch.tensor(ids[:need], dtype=torch.long).view(windows, window)


@torch.no_grad()
def perplexity(model: Any, windows: torch.Tensor) -> float:
    """exp(mean next-token NLL) over every window (each predicted from its own start)."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for w in windows:
        logits = model(input_ids=w[None].to(device)).logits[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, w[1:].to(device), reduction="sum"))
        count += w.numel() - 1
    return math.exp(nll / count)


def generation_entropy(
    model: Any, tok: Any, prompts: Sequence[str], new_tokens: int
) -> tuple[float, list[str]]:
    """GE ×100 of one generation per prompt with at least ``new_tokens`` new tokens, and the texts."""
    from rompatch.evaluation.fluency import GenerationSettings, fluency
    from rompatch.tokens import encode

    longest = max(len(encode(tok, p)) for p in prompts)
    ge, texts = fluency(
        model, tok, list(prompts), settings=GenerationSettings(max_out_len=longest + new_tokens)
    )
    return round(100 * ge, 2), texts


def counterfact_scores(model: Any, tok: Any, records: Sequence[dict]) -> list[dict[str, float]]:
    """Each record's ES, PS, NS (fractions) on the model as it is now."""
    from rompatch.evaluation.evaluate import case_scores, measure_case

    return [case_scores(measure_case(model, tok, r)) for r in records]


def percent(scores: Sequence[dict[str, float]], key: str) -> float:
    xs = [s[key] for s in scores if not math.isnan(s[key])]
    return round(100 * sum(xs) / len(xs), 2) if xs else float("nan")


def weights_sha(model: Any) -> str:
    """One sha256 over every parameter's bytes (to check that the model is back to unedited)."""
    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------- the modes


def unavailable(mode: str) -> str | None:
    """Why ``mode`` cannot run with the code here (an editing API is missing), or None."""
    try:
        from rompatch.create import Editor
        from rompatch.rome import ROMEHyperParams

        if mode == "merged":
            from rompatch.merge import merge_patches  # noqa: F401
        if mode == "protected" and "protect" not in {f.name for f in dataclasses.fields(ROMEHyperParams)}:
            return "ROMEHyperParams has no protect field"
        if mode == "batch" and not hasattr(Editor, "batch"):
            return "Editor has no batch()"
        if mode == "memit":
            from rompatch.methods.memit import MEMITEditor, MEMITHyperParams  # noqa: F401
    except ImportError as e:
        return f"cannot import it ({e})"
    return None


def _construct(cls: Callable, model: Any, tok: Any, **kw: Any) -> Any:
    """``cls(model, tok, **kw)`` with only the keywords its signature takes."""
    params = inspect.signature(cls).parameters
    takes_all = any(p.kind is p.VAR_KEYWORD for p in params.values())
    return cls(model, tok, **{k: v for k, v in kw.items() if takes_all or k in params})


@dataclasses.dataclass
class Edits:
    """Edits of the first ``n`` records to evaluate: patches applied in order, seconds to compute them."""

    patches: list
    seconds: float
    extra: dict = dataclasses.field(default_factory=dict)


class Harness:
    """One model, its records and settings; computes each mode's edits and evaluates them."""

    def __init__(
        self,
        model: Any,
        tok: Any,
        records: Sequence[dict],
        *,
        ppl: torch.Tensor,
        prompts: Sequence[str] = PROMPTS,
        gen_tokens: int = GEN_TOKENS,
        hparams: Any = None,
        memit_hparams: Any = None,
        stats_data: str | None = None,
        stats_tokens: int | None = None,
        log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
    ) -> None:
        from rompatch.request import EditRequest
        from rompatch.rome import ROMEHyperParams

        self.model, self.tok, self.records = model, tok, list(records)
        self.requests = [EditRequest.from_dict(r) for r in self.records]
        self.ppl, self.prompts, self.gen_tokens = ppl, list(prompts), gen_tokens
        self.hparams = hparams or ROMEHyperParams()
        self.memit_hparams = memit_hparams
        self.stats_kw = {"stats_data": stats_data, "stats_tokens": stats_tokens}
        self.log = log
        self._editors: dict[str, Any] = {}
        self._independent: Edits | None = None
        self._chains: dict[str, tuple[list, list[float]]] = {}
        self._base: dict[str, Any] | None = None
        self._base_sha: str | None = None
        self._norms: dict[str, float] = {}

    # -------------------------------------------------------------------- editors and edits

    def editor(self, kind: str) -> Any:
        """The editor of ``kind`` (rome, protected, memit), built once; its templates made before timing."""
        if kind not in self._editors:
            t0 = time.perf_counter()
            if kind == "memit":
                from rompatch.methods.memit import MEMITEditor, MEMITHyperParams

                hp = self.memit_hparams or MEMITHyperParams()
                ed = _construct(MEMITEditor, self.model, self.tok, hparams=hp, **self.stats_kw)
            else:
                from rompatch.create import Editor

                hp = self.hparams
                if kind == "protected":
                    hp = dataclasses.replace(hp, protect=True)
                ed = _construct(Editor, self.model, self.tok, hparams=hp, **self.stats_kw)
            getattr(ed, "templates", None)  # context templates are generated once, outside the timing
            self.log(f"  {kind} editor ready in {time.perf_counter() - t0:.1f} s (statistics, templates)")
            self._editors[kind] = ed
        return self._editors[kind]

    def _timed_per_edit(self, call: Callable, reqs: list) -> tuple[Any, list[float]]:
        """``call(reqs, on_edit=...)`` and the seconds at which each edit was done."""
        stamps: list[float] = []
        t0 = time.perf_counter()
        if "on_edit" in inspect.signature(call).parameters:
            out = call(reqs, on_edit=lambda i, d: stamps.append(time.perf_counter() - t0))
        else:
            out = call(reqs)
        total = time.perf_counter() - t0
        if len(stamps) != len(reqs):  # no per-edit times: only the last is known
            stamps = [math.nan] * (len(reqs) - 1) + [total]
        return out, stamps

    def independent(self, n: int, n_max: int) -> Edits:
        from rompatch.patch import new_patch

        if self._independent is None or len(self._independent.patches[0].deltas) < n:
            self.log(f"  computing {n_max} independent edits")
            patch, stamps = self._timed_per_edit(self.editor("rome").patch, self.requests[:n_max])
            self._independent = Edits([patch], math.nan, {"stamps": stamps})
        p = self._independent.patches[0]
        sub = p if len(p.deltas) == n else new_patch(p.deltas[:n], base=p.base, parameters=p.parameters)
        return Edits([sub], self._independent.extra["stamps"][n - 1])

    def merged(self, n: int, n_max: int) -> Edits:
        from rompatch.merge import merge_patches

        ind = self.independent(n, n_max)
        t0 = time.perf_counter()
        patch = merge_patches(ind.patches)
        merge = time.perf_counter() - t0
        return Edits([patch], ind.seconds + merge, {"merge_seconds": round(merge, 3)})

    def chain(self, kind: str, n: int, n_max: int) -> Edits:
        if kind not in self._chains or len(self._chains[kind][0]) < n:
            self.log(f"  computing {n_max} {kind} edits")
            self._chains[kind] = self._timed_per_edit(self.editor(kind).chain, self.requests[:n_max])
        patches, stamps = self._chains[kind]
        return Edits(list(patches[:n]), stamps[n - 1])

    def joint(self, kind: str, n: int) -> Edits:
        ed = self.editor(kind)
        call = ed.batch if kind == "rome" else ed.patch
        t0 = time.perf_counter()
        patch = call(self.requests[:n])
        return Edits([patch], time.perf_counter() - t0)

    def edits(self, mode: str, n: int, n_max: int) -> Edits:
        if mode == "independent":
            return self.independent(n, n_max)
        if mode == "merged":
            return self.merged(n, n_max)
        if mode in ("sequential", "protected"):
            return self.chain("rome" if mode == "sequential" else "protected", n, n_max)
        if mode == "batch":
            return self.joint("rome", n)
        if mode == "memit":
            return self.joint("memit", n)
        raise SystemExit(f"unknown mode {mode!r}; known: {', '.join(MODES)}")

    # ---------------------------------------------------------------------------- evaluation

    def _measure(self, n: int) -> dict[str, Any]:
        scores = counterfact_scores(self.model, self.tok, self.records[:n])
        ge, texts = generation_entropy(self.model, self.tok, self.prompts, self.gen_tokens)
        return {
            "ES": percent(scores, "ES"),
            "PS": percent(scores, "PS"),
            "NS": percent(scores, "NS"),
            "ppl": round(perplexity(self.model, self.ppl), 4),
            "GE": ge,
            "texts": texts[:2],
        }

    def baseline(self, n: int) -> dict[str, Any]:
        """The unedited model's scores on the first ``n`` records, perplexity and GE (computed once)."""
        if self._base is None:
            self._base_sha = weights_sha(self.model)
            scores = counterfact_scores(self.model, self.tok, self.records)
            ge, texts = generation_entropy(self.model, self.tok, self.prompts, self.gen_tokens)
            self._base = {"scores": scores, "ppl": round(perplexity(self.model, self.ppl), 4), "GE": ge}
        s = self._base["scores"][:n]
        return {
            "ES_unedited": percent(s, "ES"),
            "PS_unedited": percent(s, "PS"),
            "NS_unedited": percent(s, "NS"),
            "ppl_unedited": self._base["ppl"],
            "GE_unedited": self._base["GE"],
        }

    def _weight_norm(self, name: str, w: torch.Tensor) -> float:
        if name not in self._norms:
            self._norms[name] = float(torch.linalg.matrix_norm(w.double(), ord=2))
        return self._norms[name]

    def evaluate(self, mode: str, n: int, edits: Edits) -> dict[str, Any]:
        """Apply the edits, measure, revert (checked bit-identical); the entry of (mode, n)."""
        from rompatch.apply import apply_patch, revert_patch

        base = self.baseline(n)
        names = sorted({name for p in edits.patches for name in p.parameters})
        before = {k: self.model.get_parameter(k).detach().clone() for k in names}
        t0 = time.perf_counter()
        applied = []
        try:
            for p in edits.patches:
                apply_patch(self.model, p)
                applied.append(p)
            ratios = {}
            for k in names:
                w0 = before[k].double()
                delta = self.model.get_parameter(k).detach().double() - w0
                ratios[k] = round(float(torch.linalg.matrix_norm(delta, ord=2)) / self._weight_norm(k, w0), 5)
            post = self._measure(n)
        finally:
            for p in reversed(applied):
                revert_patch(self.model, p)
        for k in names:
            if not torch.equal(self.model.get_parameter(k).detach(), before[k]):
                raise SystemExit(f"{mode} N={n}: {k} is not bit-identical after reverting the edits")
        return {
            **post,
            **base,
            "update_ratio_max": max(ratios.values()) if ratios else None,
            "n_matrices": len(ratios),
            "update_ratios": ratios,
            "n_deltas": sum(len(p.deltas) for p in edits.patches),
            "edit_seconds": round(edits.seconds, 3),
            "edits_per_second": round(n / edits.seconds, 4) if edits.seconds > 0 else None,
            **edits.extra,
            "eval_seconds": round(time.perf_counter() - t0, 3),
            "hparams": getattr(edits.patches[-1].deltas[-1], "hparams", None),  # the last edit's, as recorded
            "condition": _condition(edits.patches[-1]),
        }

    def check_unedited(self, mode: str) -> None:
        """Every weight bit-identical to the unedited model's (after a mode's evaluations)."""
        if self._base_sha is not None and weights_sha(self.model) != self._base_sha:
            raise SystemExit(f"after {mode}: the model's weights differ from the unedited ones")


def _condition(patch: Any) -> float | None:
    """The joint system's condition number of a merged or batch patch (None for other patches)."""
    merged = patch.merged_from() if hasattr(patch, "merged_from") else None
    if merged:
        return max(merged["condition"].values())
    return patch.deltas[0].metrics.get("joint_condition")


# ---------------------------------------------------------------------------------- results


def load_results(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {"entries": []}
    return json.loads(path.read_text())


def save_results(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    tmp.replace(path)


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def find_entry(results: dict[str, Any], mode: str, n: int, config: dict[str, Any]) -> dict | None:
    for e in results["entries"]:
        if e["mode"] == mode and e["n"] == n and _same(e["config"], config):
            return e
    return None


def _commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        return out.stdout.strip() or None
    except OSError:
        return None


def run_harness(
    harness: Harness | Callable[[], Harness],
    *,
    modes: Sequence[str],
    ns: Sequence[int],
    out: Path,
    config: dict[str, Any],
) -> dict[str, Any]:
    """Measure every (mode, N) not yet in ``out`` for ``config``; each entry is saved as it finishes.
    ``harness`` may be a function making it (called only when something is left to measure).

    Returns the file's content, plus ``failures``: the (mode, N) whose edits or evaluation raised an
    unexpected exception (not recorded; the mode's larger N are not tried). An editor's refusal (a
    ``RompatchError``) is recorded as the entry's ``error``."""
    config = json.loads(json.dumps(config))  # as it reads back from the file
    results = load_results(out)
    ns = sorted(set(ns))
    from rompatch.errors import RompatchError

    h: Harness | None = harness if isinstance(harness, Harness) else None
    failures: list[str] = []
    for mode in modes:
        todo = [n for n in ns if find_entry(results, mode, n, config) is None]
        if not todo:
            continue
        why = unavailable(mode)
        if why:
            print(f"many_edits: skipping {mode}: {why}", file=sys.stderr, flush=True)
            continue
        if h is None:
            h = harness()  # type: ignore[operator]
        if len(h.records) < max(todo):
            raise SystemExit(f"N={max(todo)} needs {max(todo)} records; the data has {len(h.records)}")
        h.log(f"== {mode}: N = {', '.join(map(str, todo))}")
        for n in todo:
            load = [round(x, 2) for x in os.getloadavg()]
            try:
                measured = h.evaluate(mode, n, h.edits(mode, n, max(todo)))
            except RompatchError as e:  # a refusal is a result too (a merge of nearly equal keys, say)
                measured = {"error": str(e), "hparams": None}
            except Exception as e:  # a bug: not recorded (a rerun retries it); the other modes go on
                traceback.print_exc()
                failures.append(f"{mode} N={n}: {type(e).__name__}: {e}")
                h.log(f"  {mode} N={n} failed, not recorded: {failures[-1]}")
                break
            entry = {"mode": mode, "n": n, "config": config, **measured}
            entry.update(
                loadavg_start=load,
                loadavg_end=[round(x, 2) for x in os.getloadavg()],
                torch_threads=torch.get_num_threads(),
                commit=_commit(),
                date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            )
            if mode == "protected" and "error" not in entry and not (entry["hparams"] or {}).get("protect"):
                h.log(f"  warning: protected N={n}: the edits' hparams do not record protect=True")
            results["entries"].append(entry)
            save_results(out, results)
            keys = ("error",) if "error" in entry else ("ES", "PS", "NS", "ppl", "GE", "edit_seconds")
            h.log(f"  {mode} N={n}: " + "  ".join(f"{k} {entry[k]}" for k in keys))
        h.check_unedited(mode)
    return {**results, "failures": failures}


# ---------------------------------------------------------------------------------- output


def _cell(v: Any, fmt: str = "{:.1f}") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return fmt.format(v)


def markdown(entries: Sequence[dict[str, Any]]) -> str:
    cols = [
        ("ES", "ES", "{:.1f}"),
        ("PS", "PS", "{:.1f}"),
        ("NS", "NS", "{:.1f}"),
        ("NS_unedited", "NS unedited", "{:.1f}"),
        ("ppl", "ppl", "{:.2f}"),
        ("ppl_unedited", "ppl unedited", "{:.2f}"),
        ("GE", "GE", "{:.1f}"),
        ("GE_unedited", "GE unedited", "{:.1f}"),
        ("update_ratio_max", "‖ΣΔ‖/‖W‖ (max)", "{:.3f}"),
        ("n_matrices", "matrices", "{}"),
        ("edit_seconds", "seconds", "{:.1f}"),
        ("edits_per_second", "edits/s", "{:.3g}"),
    ]
    lines = [
        "| mode | N | " + " | ".join(c[1] for c in cols) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in cols) + " |",
    ]
    order = {m: i for i, m in enumerate(MODES)}
    for e in sorted(entries, key=lambda e: (order.get(e["mode"], 99), e["n"])):
        lines.append(
            f"| {e['mode']} | {e['n']} | " + " | ".join(_cell(e.get(k), f) for k, _, f in cols) + " |"
        )
    errors = [f"- {e['mode']} N={e['n']}: {e['error']}" for e in entries if e.get("error")]
    return "\n".join(lines + (["", "Refused:", *errors] if errors else []))


def plot(entries: Sequence[dict[str, Any]], path: Path) -> None:
    from rompatch.errors import require_matplotlib

    matplotlib = require_matplotlib()
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, key, label in zip(
        axes, ("ES", "PS", "NS", "ppl"), ("ES %", "PS %", "NS %", "WikiText-2 perplexity")
    ):
        for mode in [m for m in MODES if any(e["mode"] == m for e in entries)]:
            pts = sorted((e["n"], e[key]) for e in entries if e["mode"] == mode and "error" not in e)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=mode)
        ref = {"NS": "NS_unedited", "ppl": "ppl_unedited"}.get(key)
        if ref:
            pts = sorted({(e["n"], e[ref]) for e in entries if "error" not in e})
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "k--", lw=1, label="unedited")
        ax.set_xscale("log")
        ax.set_xlabel("N edits")
        ax.set_title(label)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    ap.add_argument("--n", default="1,10,100", help="comma-separated numbers of edits")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "many_edits_entries.json")
    ap.add_argument("--data", help=f"EasyEdit CounterFact file (default $ROMPATCH_DATA/{DATA})")
    ap.add_argument("--wikitext", help=f"perplexity text (default $ROMPATCH_DATA/{WIKITEXT})")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--markdown", action="store_true", help="print the Markdown table of --out's entries")
    ap.add_argument("--plot", type=Path, help="write a figure of ES, PS, NS and perplexity against N")
    args = ap.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        ap.error(f"unknown mode(s) {', '.join(unknown)}; known: {', '.join(MODES)}")
    ns = sorted({int(x) for x in args.n.split(",") if x.strip()})
    if not ns or ns[0] < 1:
        ap.error("--n takes positive numbers, e.g. 1,10,100")

    from bench.data import data_file
    from rompatch.rome import ROMEHyperParams

    hp = ROMEHyperParams()
    config = {
        "model": args.model,
        "device": args.device,
        "data": Path(args.data or DATA).name,
        "ppl": f"{Path(args.wikitext or WIKITEXT).name}: first {PPL_WINDOWS} windows of {PPL_WINDOW} tokens",
        "generation": {"prompts": list(PROMPTS), "new_tokens": GEN_TOKENS, "top_k": 5, "seed": 0},
        "rome_hparams": dataclasses.asdict(hp),
        "stats": "default (WikiText-2 test+valid under $ROMPATCH_DATA, default token count)",
    }

    def make() -> Harness:
        from rompatch.evaluation.easyedit import load_easyedit_counterfact
        from rompatch.models import load_model

        data = Path(args.data) if args.data else data_file(DATA)
        wikitext = Path(args.wikitext) if args.wikitext else data_file(WIKITEXT)
        model, tok = load_model(args.model, device=args.device)
        return Harness(
            model,
            tok,
            load_easyedit_counterfact(data, limit=max(ns)),
            ppl=ppl_windows(tok, wikitext.read_text(encoding="utf-8")),
            hparams=hp,
        )

    results = run_harness(make, modes=modes, ns=ns, out=args.out, config=config)
    shown = [e for e in results["entries"] if _same(e["config"], json.loads(json.dumps(config)))]
    if args.markdown:
        print(markdown(shown))
    if args.plot:
        plot(shown, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    for f in results["failures"]:
        print(f"many_edits: failed (rerun to retry): {f}", file=sys.stderr)
    return 1 if results["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
