"""Issue 6 (parts 3–4): the evaluation suite on SmolLM2-135M, default layer, default statistics.

(a) zsRE: every record of the shared zsRE subset (efficacy, paraphrase, specificity);
(b) sequential editing: 100 CounterFact edits, each on the already-edited model, with all earlier
    edits re-measured at checkpoints 1, 5, 10, 20, 30, 40, 50, 75, 100;
(c) CounterFact with fluency: every record, ES/PS/NS, magnitudes, S and GE before and after, the
    generations made as in the paper (top-5 sampling, 100 tokens including the prompt).

Every part is resumable (bench/_work/eval-*-L<layer>), so a rerun continues instead of starting over.
Long parts can be shared by single-threaded processes with torchrun (``rompatch.distributed``: the
records are dealt out, rank 0 gathers them into the part's folder)::

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 -m bench.bench_eval_suite zsre

Parts: ``zsre``, ``counterfact`` and ``sequential`` (one process). Cases that earlier runs left in
``shard-*`` folders (workers of the home-made ROMPATCH_BENCH_SHARD split this replaced) are merged in. Wall time per part is the union
of its workers' running intervals (bench/_work/eval-suite-times-L<layer>.json). A part run by
``run()`` itself can be limited with ROMPATCH_BENCH_ZSRE_MIN, _SEQ_MIN, _CF_MIN (minutes; 0: only
summarise what is there).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path

from bench.data import data_file, missing_data

TITLE = "Evaluation suite: zsRE, sequential editing and CounterFact with fluency on SmolLM2-135M (issue 6)"
FULL_ONLY = True


def skip_reason() -> str | None:
    return missing_data(
        "counterfact/counterfact_subset.json",
        "zsre/zsre_mend_eval_subset.json",
        "wikitext-2/raw/wiki.test.raw",
    )


HERE = Path(__file__).resolve().parent
WORK = HERE / "_work"
FIGURES = HERE / "figures"
PARTS = ("zsre", "counterfact", "sequential")

# The ROME paper (Meng et al., NeurIPS 2022), GPT-2 XL. Table 4 (CounterFact) and Table 1 (zsRE).
# S, ES, PS, NS, RS and the zsRE rows were checked against a section-by-section summary of the
# paper (viktor-shcherb/msc_thesis, references/2022-12-locating-editing-factual-associations-gpt);
# the other values (†) are the paper's Table 4 as commonly quoted, not re-checked against the PDF.
PAPER_CF = {
    "GPT-2 XL (unedited)": {
        "S": 30.5,
        "ES": "22.2†",
        "PS": "24.7†",
        "NS": "78.1†",
        "GE": "626.6†",
        "RS": "31.9†",
    },
    "GPT-2 XL + ROME": {"S": 89.2, "ES": 100.0, "PS": 96.4, "NS": 75.4, "GE": "621.9†", "RS": 41.9},
}
PAPER_ZSRE = {
    "GPT-2 XL (unedited)": {"efficacy": 22.2, "paraphrase": 21.3, "specificity": 24.2},
    "GPT-2 XL + ROME": {"efficacy": 99.8, "paraphrase": 88.1, "specificity": 24.2},
}


class _Budget(Exception):
    pass


def _budget(minutes: float | None):
    t0 = time.perf_counter()

    def on_case(_c):
        if minutes is not None and time.perf_counter() - t0 > minutes * 60:
            raise _Budget

    return on_case


def _minutes(name: str) -> float | None:
    v = os.environ.get(f"ROMPATCH_BENCH_{name}_MIN")
    return float(v) if v else None


class _Setup:
    """The model, statistics and configuration every part shares (loaded once per process)."""

    def __init__(self, group=None) -> None:
        import torch

        from rompatch.arch import default_layer
        from rompatch.distributed import SINGLE, rank_device
        from rompatch.evaluation.evaluate import load_records
        from rompatch.models import load_model
        from rompatch.rome import ROMEHyperParams
        from rompatch.stats import DEFAULT_STATS_TOKENS, get_second_moment

        # Workers share the 2 cores; one thread each avoids oversubscription (measured: 10×100-token
        # generations took 23 s with 1 thread and 114 s with 2 threads under that load).
        torch.set_num_threads(int(os.environ.get("ROMPATCH_BENCH_THREADS", "1")))
        WORK.mkdir(exist_ok=True)
        FIGURES.mkdir(exist_ok=True)
        # ROMPATCH_BENCH_DEVICE=cuda runs the workers on a GPU (several worker processes can share one).
        self.model, self.tok = load_model(
            "smollm2-135m", device=rank_device(os.environ.get("ROMPATCH_BENCH_DEVICE", "cpu"))
        )
        self.layer = default_layer(self.model)
        self.hp = ROMEHyperParams(layer=self.layer)
        self.stats = get_second_moment(
            self.model, self.tok, self.layer, n_tokens=DEFAULT_STATS_TOKENS, group=group or SINGLE
        )
        self.base_cfg = {
            "model": "smollm2-135m",
            "hparams": self.hp.to_dict(),
            "stats": self.stats.sha256[:16],
        }
        _, self.zrecs = load_records(str(data_file("zsre/zsre_mend_eval_subset.json")), kind="zsre")
        _, self.crecs = load_records(
            str(data_file("counterfact/counterfact_subset.json")), kind="counterfact"
        )

    def out(self, part: str) -> Path:
        return WORK / f"eval-{part}-L{self.layer}"

    def eval_args(self, part: str) -> dict:
        from rompatch.evaluation.fluency import GenerationSettings

        if part == "zsre":
            return dict(records=self.zrecs, kind="zsre",
                        config={**self.base_cfg, "kind": "zsre", "zsre_target": "answers"})  # fmt: skip
        gen = GenerationSettings(max_out_len=100, seed=0)  # as in the paper
        return dict(records=self.crecs, kind="counterfact", generation=gen,
                    config={**self.base_cfg, "kind": "counterfact", "generation": gen.to_dict()})  # fmt: skip

    def sequential(self, max_seconds: float | None = None) -> dict:
        from rompatch.evaluation.fluency import GenerationSettings
        from rompatch.evaluation.sequential import run_sequential

        gen = GenerationSettings(max_out_len=50, seed=0)
        return run_sequential(
            self.model, self.tok, self.crecs, kind="counterfact", n=100, hparams=self.hp, stats=self.stats,
            checkpoints=[1, 5, 10, 20, 30, 40, 50, 75, 100], out_dir=self.out("seq"),
            config={**self.base_cfg, "kind": "counterfact", "generation": gen.to_dict()},
            generation=gen, fluency_prompts=self.crecs[100]["generation_prompts"], progress=True,
            max_seconds=max_seconds,
        )  # fmt: skip


def _times_path(layer: int) -> Path:
    return WORK / f"eval-suite-times-L{layer}.json"


class _Interval:
    """One worker's running interval for ``part``, kept in the times file while it runs.

    The entry is written at the start and its end moved forward on every ``tick()`` (each finished
    case), so a worker that is killed still leaves the time it ran. Workers share the file under a lock.
    """

    def __init__(self, layer: int, part: str):
        self.path, self.part = _times_path(layer), part
        self.key = f"{os.getpid()}-{time.time():.3f}"
        self.start = time.time()

    def _write(self, end: float) -> None:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            times = json.loads(self.path.read_text()) if self.path.is_file() else {}
            iv = [e for e in times.get(self.part, []) if e[2:] != [self.key]]
            times[self.part] = iv + [[round(self.start, 1), round(end, 1), self.key]]
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(times, indent=1))
            tmp.replace(self.path)

    def tick(self, *_: object) -> None:
        self._write(time.time())

    def __enter__(self) -> _Interval:
        self._write(self.start)
        return self

    def __exit__(self, *exc: object) -> None:
        self._write(time.time())


def _wall(layer: int, part: str) -> tuple[float, float, int]:
    """(wall seconds = union of intervals, worker-seconds = their sum, number of intervals)."""
    path = _times_path(layer)
    iv = sorted(json.loads(path.read_text()).get(part, [])) if path.is_file() else []
    wall, busy, cur = 0.0, 0.0, None
    for a, b, *_ in iv:
        busy += b - a
        if cur is None or a > cur[1]:
            if cur is not None:
                wall += cur[1] - cur[0]
            cur = [a, b]
        else:
            cur[1] = max(cur[1], b)
    if cur is not None:
        wall += cur[1] - cur[0]
    return wall, busy, len(iv)


def work(part: str, setup: _Setup | None = None) -> None:
    """This process's share of ``part``, resumable, in the part's folder: all of it when run alone;
    under torchrun the records dealt to its rank (``rompatch.distributed``)."""
    from rompatch.distributed import joining
    from rompatch.evaluation.evaluate import run_evaluation

    if part not in PARTS:
        raise SystemExit(f"unknown part {part!r}; choose one of {', '.join(PARTS)}")
    with joining(os.environ.get("ROMPATCH_BENCH_DEVICE", "cpu")) as group:
        if part == "sequential" and group.world > 1:
            raise SystemExit("the sequential part is one chain of edits: run it without torchrun")
        st = setup or _Setup(group)
        with _Interval(st.layer, part) as iv:
            if part == "sequential":
                st.sequential()
                return
            if group.is_main:
                _merge_legacy(st.out(part))
            group.barrier()
            a = st.eval_args(part)
            run_evaluation(st.model, st.tok, a.pop("records"), out_dir=st.out(part), hparams=st.hp,
                           stats=st.stats, progress=True, model_label="SmolLM2-135M", on_case=iv.tick,
                           group=group, **a)  # fmt: skip


def _merge_legacy(out: Path) -> tuple[dict[str, str], int, int]:
    """Merge the cases of the legacy ``shard-*`` folders into ``out/cases.jsonl``; returns their
    provenance: case -> machine (folders shard-gpu* came from an H200), and for cases computed on
    two machines, how many and how many with the same scores."""
    from rompatch.evaluation.records import CASES_FILE, read_cases

    out.mkdir(parents=True, exist_ok=True)
    have = {str(c["case_id"]): c for c in read_cases(out / CASES_FILE)}
    source: dict[str, str] = {}
    twice, same = 0, 0
    for f in sorted(out.glob(f"shard-*/{CASES_FILE}")):
        family = "an NVIDIA H200" if f.parent.name.startswith("shard-gpu") else "CPU"
        for c in read_cases(f):
            cid = str(c["case_id"])
            if cid in source and source[cid] != family:
                twice += 1
                same += have[cid]["post"] == c["post"] and have[cid]["pre"] == c["pre"]
            source.setdefault(cid, family)
            have.setdefault(cid, c)
    tmp = out / (CASES_FILE + ".tmp")
    tmp.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in have.values()), encoding="utf-8")
    tmp.replace(out / CASES_FILE)
    return source, twice, same


def _merged(st: _Setup, part: str, minutes: float | None) -> dict:
    """Merge the legacy shards' cases into the part's folder, compute what is missing, and summarise."""
    from rompatch.evaluation.evaluate import run_evaluation
    from rompatch.evaluation.records import CASES_FILE, read_cases

    out = st.out(part)
    source, twice, same = _merge_legacy(out)
    a = st.eval_args(part)
    records = a.pop("records")
    kw = dict(out_dir=out, hparams=st.hp, stats=st.stats, model_label="SmolLM2-135M", **a)
    if minutes != 0:  # 0: only merge and summarise what the workers wrote
        budget = _budget(minutes)
        with _Interval(st.layer, part) as iv:

            def on_case(c: dict) -> None:
                iv.tick()
                budget(c)

            try:
                run_evaluation(st.model, st.tok, records, on_case=on_case, progress=True, **kw)
            except _Budget:
                pass
    done = {str(c["case_id"]) for c in read_cases(out / CASES_FILE)}
    res = run_evaluation(st.model, st.tok, [r for r in records if str(r["case_id"]) in done], **kw)
    fams = Counter(source.get(cid, "this run") for cid in done)
    res["provenance"] = {"families": fams, "computed_twice": twice, "same_scores": same}
    return res


# Runs whose interval was never written: the workers were killed at a session's end, before the
# interval was kept up to date after every case (the per-case results they wrote are kept).
UNTIMED = {
    "counterfact": "not in that time: 71 CPU records of an earlier 2-worker run (stopped at a session's end "
    "before it wrote its interval; about 45 min by its files' timestamps, beside other jobs)",
}


def _provenance_note(res: dict) -> str:
    p = res["provenance"]
    fams = ", ".join(f"{n} computed on {k}" for k, n in sorted(p["families"].items()))
    note = f"{fams} (the H200's: 6–8 worker processes sharing the GPU for 331 s)"
    if p["computed_twice"]:
        note += f"; {p['computed_twice']} computed on both machines, {p['same_scores']} with identical scores"
    return note


def _fmt_row(label, vals, keys):
    def cell(v):
        return "—" if v is None else (v if isinstance(v, str) else f"{v:.1f}")

    return f"| {label} | " + " | ".join(cell(vals.get(k)) for k in keys) + " |"


def _time_note(layer: int, part: str) -> str:
    wall, busy, k = _wall(layer, part)
    return f"{wall / 60:.0f} min wall ({busy / 60:.0f} worker-minutes over {k} worker run(s))"


def run() -> dict:
    from rompatch.evaluation.plot import plot_distributions, plot_sequential

    st = _Setup()
    LAYER = st.layer
    rows, md = [], []

    # ---------------------------------------------------------------- (a) zsRE
    z = _merged(st, "zsre", _minutes("ZSRE"))
    zs = z["summary"]
    plot_distributions(z, FIGURES / "eval-zsre.png", title=f"SmolLM2-135M, zsRE ({zs['n']} records)")
    for k, name in (("efficacy", "Efficacy"), ("paraphrase", "Paraphrase"), ("specificity", "Specificity")):
        rows.append({"metric": f"zsRE {name}", "value": f"{zs['pre'][k]:.1f} → {zs['post'][k]:.1f}", "unit": "%",
                     "note": f"token accuracy, unedited → edited, {zs['n']} of {len(st.zrecs)} records"})  # fmt: skip
    rows.append({"metric": "zsRE records evaluated", "value": zs["n"], "unit": "records",
                 "note": f"of {len(st.zrecs)}; {_time_note(LAYER, 'zsre')}; {_provenance_note(z)}"})  # fmt: skip

    # ---------------------------------------------------------------- (b) sequential
    smin = _minutes("SEQ")
    if smin == 0:  # only summarise the checkpoints already written
        s = st.sequential(max_seconds=0)
    else:
        with _Interval(LAYER, "sequential"):
            s = st.sequential(max_seconds=smin * 60 if smin is not None else None)
    plot_sequential(
        s, FIGURES / "eval-sequential.png", title=f"SmolLM2-135M, layer {LAYER}: sequential ROME edits"
    )
    last = [c for c in s["checkpoints"] if c["n"] > 0][-1]
    rows.append({"metric": "sequential edits completed", "value": s["completed"], "unit": "edits",
                 "target": "100", "note": _time_note(LAYER, "sequential")
                 + ("; stopped by the time budget" if s["stopped_early"] else "")})  # fmt: skip
    rows.append({"metric": f"after {last['n']} sequential edits: ES / PS / NS on all of them",
                 "value": f"{last['ES']:.1f} / {last['PS']:.1f} / {last['NS']:.1f}", "unit": "%",
                 "note": f"unedited NS on the same cases {last['pre_NS']:.1f}; ‖ΣΔ‖₂/‖W‖₂ {last['update_ratio']:.3f}"})  # fmt: skip

    # ---------------------------------------------------------------- (c) CounterFact with fluency
    f = _merged(st, "counterfact", _minutes("CF"))
    fs = f["summary"]
    plot_distributions(f, FIGURES / "eval-counterfact-fluency.png",
                       title=f"SmolLM2-135M, CounterFact with fluency ({fs['n']} cases)")  # fmt: skip
    for k in ("S", "ES", "PS", "NS", "GE"):
        rows.append({"metric": f"CounterFact {k}", "value": f"{fs['pre'][k]:.1f} → {fs['post'][k]:.1f}",
                     "unit": "entropy ×100" if k == "GE" else "%",
                     "note": f"{fs['n']} of {len(st.crecs)} records, unedited → edited"
                     + ("; top-5 sampling, 100 tokens incl. prompt" if k == "GE" else "")})  # fmt: skip
    rows.append({"metric": "CounterFact records evaluated", "value": fs["n"], "unit": "records",
                 "note": f"of {len(st.crecs)}; {_time_note(LAYER, 'counterfact')}; {_provenance_note(f)}; "
                         f"{UNTIMED['counterfact']}"})  # fmt: skip

    # ---------------------------------------------------------------- comparison tables
    zkeys = ["efficacy", "paraphrase", "specificity"]
    cf_keys = ["S", "ES", "PS", "NS", "GE", "RS"]
    md += ["### Single edits on CounterFact, with the paper's GPT-2 XL numbers (a different model)", ""]
    md += ["| Editor | Score S | Efficacy ES | Generalization PS | Specificity NS | Fluency GE | Consistency RS |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for phase, label in (
        ("pre", "SmolLM2-135M (unedited)"),
        ("post", f"SmolLM2-135M + ROME (layer {LAYER})"),
    ):
        md.append(_fmt_row(f"{label}, {fs['n']} records", fs[phase], cf_keys))
    for label, vals in PAPER_CF.items():
        md.append(_fmt_row(label + " — paper, different model", vals, cf_keys))
    md += [
        "",
        f"All of S/ES/PS/NS/GE come from one run over {fs['n']} of the {len(st.crecs)} CounterFact records: "
        "each edit made on the unedited model, measured, and its generations sampled as in the paper (top-5, "
        "100 tokens including the prompt). RS is not reported: it needs ROME's attribute_snippets.json and "
        "TF-IDF statistics, which are not in the shared data (`rompatch eval --snippets ... --tfidf ...` "
        "computes it when they are available). GPT-2 XL (1.5B, 48 layers) is not like-for-like with "
        "SmolLM2-135M (135M, 30 layers); † = quoted from the paper's Table 4, not re-checked here.",
        "",
        "### zsRE, with the paper's GPT-2 XL numbers (a different model)",
        "",
        "| Editor | Efficacy | Paraphrase | Specificity |",
        "| --- | ---: | ---: | ---: |",
        _fmt_row(f"SmolLM2-135M (unedited), {zs['n']} records", zs["pre"], zkeys),
        _fmt_row(f"SmolLM2-135M + ROME (layer {LAYER}), {zs['n']} records", zs["post"], zkeys),
    ]
    for label, vals in PAPER_ZSRE.items():
        md.append(_fmt_row(label + " — paper, different model", vals, zkeys))
    md += [
        "",
        f"Token-level accuracy; edit target answers[0] as in ROME's reference code; {zs['n']} of "
        f"{len(st.zrecs)} records; {_time_note(LAYER, 'zsre')}.",
        "",
        "![zsRE](figures/eval-zsre.png)",
        "",
        "### Sequential editing",
        "",
        s["markdown"],
        "",
        "![sequential](figures/eval-sequential.png)",
        "",
        "### CounterFact with fluency, single edits",
        "",
        f["markdown"],
        "",
        "![fluency](figures/eval-counterfact-fluency.png)",
    ]
    setup = (
        f"SmolLM2-135M-Instruct, layer {LAYER}, statistics {st.stats.count:,} WikiText tokens. Worker processes "
        "with one torch thread each; parts resume from bench/_work/eval-*-L<layer>. Wall time per part: "
        f"zsRE {_time_note(LAYER, 'zsre')}; sequential {_time_note(LAYER, 'sequential')}; CounterFact "
        f"{_time_note(LAYER, 'counterfact')}."
    )
    return {"setup": setup, "rows": rows, "markdown": "\n".join(md),
            "summary": {"zsre": zs, "counterfact": fs, "sequential": s["checkpoints"]}}  # fmt: skip


if __name__ == "__main__":  # torchrun --nproc-per-node N -m bench.bench_eval_suite PART
    import sys

    work(sys.argv[1] if len(sys.argv) > 1 else "zsre")
