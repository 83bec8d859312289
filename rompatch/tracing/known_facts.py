"""Causal tracing averaged over many known facts: the paper's average indirect effect (Figure 2).

Each fact the model gets right (greedy decoding reproduces its attribute) is traced with
:func:`rompatch.tracing.trace.trace_fact`; its restored probabilities are rolled up per token category
(first/middle/last subject token, first subsequent token, further tokens, last token) and layer.
Per-fact results can be cached in a folder, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..arch import ModelSpec, get_spec, num_layers
from ..atomic import atomic_write
from ..errors import TraceError
from ..models import model_identity
from ..placement import input_device
from ..tokens import encode
from .trace import (
    CATEGORIES,
    Noise,
    TraceResult,
    TraceSettings,
    answer_ids,
    eval_mode,
    resolve_noise,
    subject_range,
    trace_prompt,
    write_json,
    write_npz,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KnownFact:
    """A fact to trace: ``prompt`` (subject filled in), ``subject``, and the expected ``attribute``."""

    prompt: str
    subject: str
    attribute: str
    key: str  # known_id / case_id, or the record's index

    @classmethod
    def from_record(cls, rec: Mapping[str, Any], index: int) -> KnownFact:
        if "requested_rewrite" in rec:  # a CounterFact record: trace its true fact
            rr = rec["requested_rewrite"]
            true = rr.get("target_true", {})
            return cls(
                rr["prompt"].replace("{}", rr["subject"], 1),
                rr["subject"],
                true["str"] if isinstance(true, Mapping) else str(true),
                str(rec.get("case_id", index)),
            )
        prompt = rec.get("prompt") or (
            rec["template"].replace("{}", rec["subject"], 1) if "template" in rec else None
        )
        return cls(prompt, rec["subject"], rec["attribute"], str(rec.get("known_id", index)))


def load_known(records: str | os.PathLike | Iterable[Mapping[str, Any]]) -> list[KnownFact]:
    """Facts from a known_1000.json-style file or list (``prompt``/``template``, ``subject``,
    ``attribute``), or from CounterFact records (their true fact)."""
    where = "the records"
    if isinstance(records, (str, os.PathLike)):
        where = str(records)
        try:
            with open(records, encoding="utf-8") as f:
                records = json.load(f)
        except FileNotFoundError:
            raise TraceError(f"fact file {where} not found; pass a known_1000.json-style JSON file") from None
        except (OSError, json.JSONDecodeError) as e:
            raise TraceError(
                f"cannot read fact file {where} ({e}); it must be a JSON list of records"
            ) from None
    if isinstance(records, Mapping) or not isinstance(records, Iterable):
        raise TraceError(f"{where} must be a JSON list of fact records")
    out = []
    for i, rec in enumerate(records):
        try:
            fact = KnownFact.from_record(rec, i)
        except (KeyError, TypeError, AttributeError) as e:
            raise TraceError(
                f"record {i} of {where} lacks {e}; expected known_1000.json-style records (prompt, subject, "
                "attribute) or CounterFact records"
            ) from None
        if not fact.prompt or not fact.subject or not fact.attribute:
            raise TraceError(f"record {i} of {where} has an empty prompt, subject or attribute")
        out.append(fact)
    if not out:
        raise TraceError(f"{where} holds no facts")
    return out


@torch.no_grad()
def predicts_attribute(model: Any, tok: Any, prompt: str, attribute: str) -> bool:
    """Whether greedy decoding after ``prompt`` produces exactly the attribute's tokens.

    For a one-token attribute this is the reference's check (the top prediction *is* the
    attribute); longer attributes must be reproduced token by token (one teacher-forced pass).
    """
    ids = encode(tok, prompt)
    target = answer_ids(tok, prompt, attribute)
    x = torch.tensor([ids + target[:-1]], device=input_device(model))
    with eval_mode(model):
        logits = model(input_ids=x, use_cache=False).logits[0]
    pred = logits[len(ids) - 1 :].argmax(-1).tolist()
    return pred == target


def _category_rows(subject_range: tuple[int, int], n_tokens: int) -> list[list[int]]:
    """Token rows of each of the paper's CATEGORIES (the notebook's rollup): a one-token subject is
    both the first and the last subject token; middle and further tokens contribute each token."""
    first_e, first_a = subject_range
    last_e, last_a = first_a - 1, n_tokens - 1
    return [
        [first_e],
        list(range(first_e + 1, last_e)),
        [last_e],
        [first_a],
        list(range(first_a + 1, last_a)),
        [last_a],
    ]


@dataclass
class AverageTrace:
    """The average over many facts of the restored probability per token category and layer.

    ``effect(kind)`` is the paper's average indirect effect (AIE): the mean restored probability
    minus the mean corrupted probability, ``(len(CATEGORIES), n_layers)``. ``effect_std`` is the std
    of the per-instance indirect effect (score minus that fact's corrupted probability); ``ci95``
    is the 95% band drawn around the lines (``1.96·std/√count``).
    """

    kinds: tuple[str, ...]
    n_layers: int
    mean_scores: dict[str, np.ndarray]
    effect_std: dict[str, np.ndarray]
    counts: np.ndarray  # instances per category
    n_facts: int
    mean_clean_prob: float
    mean_corrupted_prob: float
    facts: list[dict[str, Any]]
    skipped: dict[str, int]
    considered: int
    settings: dict[str, Any]
    stopped: str | None = None  # why the run ended before the fact list did
    seconds: float = 0.0
    categories: tuple[str, ...] = CATEGORIES

    def effect(self, kind: str) -> np.ndarray:
        return self.mean_scores[kind] - self.mean_corrupted_prob

    def ci95(self, kind: str) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return 1.96 * self.effect_std[kind] / np.sqrt(self.counts)[:, None]

    @property
    def total_effect(self) -> float:
        return self.mean_clean_prob - self.mean_corrupted_prob

    def peak_layer(self, kind: str = "mlp", category: str = "last subject token") -> int | None:
        """The layer with the largest AIE for ``kind`` at ``category`` (None without data)."""
        if kind not in self.mean_scores or self.n_facts == 0:
            return None
        return int(np.nanargmax(self.effect(kind)[self.categories.index(category)]))

    def top_layers(
        self, kind: str = "mlp", category: str = "last subject token", k: int = 5
    ) -> list[tuple[int, float]]:
        if kind not in self.mean_scores or self.n_facts == 0:
            return []
        row = self.effect(kind)[self.categories.index(category)]
        order = np.argsort(-np.nan_to_num(row, nan=-np.inf))[:k]
        return [(int(i), float(row[i])) for i in order]

    def to_dict(self) -> dict[str, Any]:
        def arr(a: np.ndarray) -> list:
            return [[None if not math.isfinite(x) else float(x) for x in r] for r in np.atleast_2d(a)]

        return {
            "format": "rompatch-trace-average/1",
            "settings": self.settings,
            "categories": list(self.categories),
            "kinds": list(self.kinds),
            "n_layers": self.n_layers,
            "n_facts": self.n_facts,
            "considered": self.considered,
            "skipped": self.skipped,
            "stopped": self.stopped,
            "seconds": self.seconds,
            "counts": [int(c) for c in self.counts],
            "mean_clean_prob": _num(self.mean_clean_prob),
            "mean_corrupted_prob": _num(self.mean_corrupted_prob),
            "total_effect": _num(self.total_effect),
            "summary": {
                k: {
                    "peak_layer_last_subject_token": self.peak_layer(k),
                    "top_layers_last_subject_token": [{"layer": i, "aie": v} for i, v in self.top_layers(k)],
                    "peak_layer_last_token": self.peak_layer(k, "last token"),
                }
                for k in self.kinds
            },
            "mean_scores": {k: arr(self.mean_scores[k]) for k in self.kinds},
            "effect": {k: arr(self.effect(k)) for k in self.kinds},
            "effect_std": {k: arr(self.effect_std[k]) for k in self.kinds},
            "facts": self.facts,
        }


def _num(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


class _Tally:
    """What the facts traced so far add up to: the rollup per category and layer, the per-fact list
    and the skipped facts by reason."""

    def __init__(self, kinds: Sequence[str], n_layers: int) -> None:
        C = len(CATEGORIES)
        self.kinds, self.n_layers = tuple(kinds), n_layers
        self.sum = {k: np.zeros((C, n_layers)) for k in kinds}
        self.ie_sum = {k: np.zeros((C, n_layers)) for k in kinds}
        self.ie_sq = {k: np.zeros((C, n_layers)) for k in kinds}
        self.counts = np.zeros(C, dtype=np.int64)
        self.clean: list[float] = []
        self.low: list[float] = []
        self.traced: list[dict[str, Any]] = []
        self.skipped: dict[str, int] = defaultdict(int)
        self.considered = 0

    def add(self, fact: KnownFact, case: Mapping[str, Any]) -> bool:
        """Count one fact's case; whether it was traced (not skipped)."""
        self.considered += 1
        if case["status"] != "traced":
            self.skipped[case["status"]] += 1
            return False
        r = TraceResult.from_dict(case["result"])
        self.clean.append(r.clean_prob)
        self.low.append(r.corrupted_prob)
        for c, rows in enumerate(_category_rows(r.subject_range, len(r.tokens))):
            self.counts[c] += len(rows)
            for k in self.kinds:
                s = r.scores[k][rows]
                ie = s - r.corrupted_prob
                self.sum[k][c] += s.sum(0)
                self.ie_sum[k][c] += ie.sum(0)
                self.ie_sq[k][c] += (ie**2).sum(0)
        self.traced.append(_fact_summary(fact, r))
        return True

    def average(self, *, settings: dict[str, Any], stopped: str | None, seconds: float) -> AverageTrace:
        n = self.counts[:, None].astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            mean = {k: self.sum[k] / n for k in self.kinds}
            std = {
                k: np.sqrt(np.maximum(self.ie_sq[k] / n - (self.ie_sum[k] / n) ** 2, 0.0)) for k in self.kinds
            }
        return AverageTrace(
            kinds=self.kinds,
            n_layers=self.n_layers,
            mean_scores=mean,
            effect_std=std,
            counts=self.counts.copy(),
            n_facts=len(self.traced),
            mean_clean_prob=float(np.mean(self.clean)) if self.clean else float("nan"),
            mean_corrupted_prob=float(np.mean(self.low)) if self.low else float("nan"),
            facts=self.traced,
            skipped=dict(self.skipped),
            considered=self.considered,
            settings=settings,
            stopped=stopped,
            seconds=seconds,
        )


def _settings_record(model: Any, settings: TraceSettings, noise: Noise) -> dict[str, Any]:
    """The settings as written into the result and into each cached case."""
    return {
        "model": model_identity(model),
        "samples": int(settings.samples),
        "window": int(settings.window),
        "kinds": list(settings.kinds),
        "noise": noise.record,
        "seed": int(settings.seed),
        "criterion": "greedy decoding reproduces the attribute's tokens",
    }


def _fact_summary(fact: KnownFact, r: TraceResult) -> dict[str, Any]:
    return {
        "key": fact.key,
        "prompt": r.prompt,
        "subject": r.subject,
        "answer": r.answer,
        "subject_range": list(r.subject_range),
        "n_tokens": len(r.tokens),
        "clean_prob": r.clean_prob,
        "corrupted_prob": r.corrupted_prob,
        "suggested_layer": r.suggested_layer,
        "seconds": r.seconds,
    }


@dataclass
class _KnownRun:
    """One ``trace_known`` call: the model, the settings shared by every fact, the cache."""

    model: Any
    tok: Any
    settings: TraceSettings
    noise: Noise
    spec: ModelSpec
    cache: _CaseCache

    def case(self, fact: KnownFact) -> dict[str, Any]:
        """The fact's case, from the cache or traced now (and cached)."""
        case = self.cache.load(fact)
        if case is None:
            case = self.trace(fact)
            self.cache.save(fact, case)
        return case

    def trace(self, fact: KnownFact) -> dict[str, Any]:
        model, tok = self.model, self.tok
        try:
            if not predicts_attribute(model, tok, fact.prompt, fact.attribute):
                return {"status": "wrong prediction"}
            span = subject_range(tok, fact.prompt, fact.subject)
        except TraceError as e:
            log.info("skipping fact %s: %s", fact.key, e)
            return {"status": "subject not in prompt" if "subject" in str(e) else "unusable record"}
        if span[1] >= len(encode(tok, fact.prompt)):
            return {"status": "subject ends the prompt"}
        r = trace_prompt(model, tok, fact.prompt, fact.subject, self.settings, self.noise, spec=self.spec)
        return {"status": "traced", "result": r.to_dict()}


class _CaseCache:
    """Per-fact results in a folder (``None``: no cache), keyed by the fact and the settings."""

    def __init__(self, folder: str | os.PathLike | None, settings: dict[str, Any]) -> None:
        self.folder = None if folder is None else Path(folder)
        self.settings = settings

    def _path(self, fact: KnownFact) -> Path:
        safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in fact.key)
        return self.folder / f"fact-{safe}.json"

    def load(self, fact: KnownFact) -> dict | None:
        if self.folder is None:
            return None
        path = self._path(fact)
        if not path.is_file():
            return None
        try:
            case = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            log.warning("ignoring unreadable cached case %s", path)
            return None
        if case.get("settings") != json.loads(json.dumps(self.settings)) or case.get("prompt") != fact.prompt:
            log.info("cached case %s was traced with other settings; tracing again", path)
            return None
        return case

    def save(self, fact: KnownFact, case: dict) -> None:
        if self.folder is None:
            return
        case = {"settings": self.settings, "prompt": fact.prompt, "attribute": fact.attribute, **case}
        text = json.dumps(case, ensure_ascii=False)
        atomic_write(self._path(fact), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def trace_known(
    model: Any,
    tok: Any,
    records: str | os.PathLike | Iterable[Mapping[str, Any]],
    *,
    limit: int | None = None,
    spec: ModelSpec | None = None,
    cache_dir: str | os.PathLike | None = None,
    time_budget: float | None = None,
    progress: bool = False,
    **settings: Any,
) -> AverageTrace:
    """The average indirect effect over the facts of ``records`` that the model gets right.

    A fact counts when greedy decoding reproduces its attribute (``predicts_attribute``); the
    others are skipped and counted. ``limit``: stop after this many traced facts. ``cache_dir``:
    each fact's result is written there as it finishes (``<key>.json``) and reused by a later run
    with the same settings, so an interrupted run resumes. ``time_budget`` (seconds): start no new
    fact after it. ``settings``: how each fact is traced, the fields of ``TraceSettings`` (as for
    ``trace_fact``: ``samples``, ``noise``, ``noise_std``, ``embed_std``, ``window``, ``kinds``,
    ``batch_size``, ``seed``). The noise std is measured once and shared by all facts.
    """
    t_start = time.perf_counter()
    facts = load_known(records)
    options = TraceSettings(**settings).checked()
    if limit is not None and limit < 1:
        raise TraceError(f"limit={limit}; pass at least 1")
    spec = get_spec(model, spec)
    noise = resolve_noise(model, tok, options, fallback_texts=[f.prompt for f in facts], spec=spec)
    record = _settings_record(model, options, noise)
    run = _KnownRun(model, tok, options, noise, spec, _CaseCache(cache_dir, record))
    tally = _Tally(options.kinds, num_layers(model))
    total = min(limit, len(facts)) if limit else len(facts)
    with tqdm(total=total, disable=not progress, file=sys.stderr, unit="fact", desc="tracing") as bar:
        stopped = _trace_facts(run, facts, tally, bar, limit=limit, time_budget=time_budget, t_start=t_start)
    return tally.average(settings=record, stopped=stopped, seconds=round(time.perf_counter() - t_start, 1))


def _trace_facts(
    run: _KnownRun,
    facts: Sequence[KnownFact],
    tally: _Tally,
    bar: Any,
    *,
    limit: int | None,
    time_budget: float | None,
    t_start: float,
) -> str | None:
    """Trace ``facts`` in order into ``tally`` until ``limit`` facts are traced or the time budget
    is spent; why it stopped early, or ``None``."""
    for fact in facts:
        if limit is not None and len(tally.traced) >= limit:
            break
        if time_budget is not None and time.perf_counter() - t_start > time_budget:
            return f"time budget of {time_budget:.0f} s reached"
        if tally.add(fact, run.case(fact)) or not limit:
            bar.update(1)
        bar.set_postfix(traced=len(tally.traced), skipped=sum(tally.skipped.values()))
    return None


def save_average(avg: AverageTrace, out_dir: str | os.PathLike, *, name: str = "average") -> list[Path]:
    """Write ``<name>.json`` (summary, per-fact list, arrays) and ``<name>.npz`` (the arrays)."""
    out = Path(out_dir)
    d = avg.to_dict()
    arrays: dict[str, np.ndarray] = {
        "counts": avg.counts,
        "categories": np.asarray(avg.categories),
        "mean_clean_prob": np.asarray(avg.mean_clean_prob),
        "mean_corrupted_prob": np.asarray(avg.mean_corrupted_prob),
        "n_facts": np.asarray(avg.n_facts),
    }
    for k in avg.kinds:
        arrays[f"mean_scores_{k}"] = avg.mean_scores[k]
        arrays[f"effect_{k}"] = avg.effect(k)
        arrays[f"effect_std_{k}"] = avg.effect_std[k]
    return [write_json(out / f"{name}.json", d), write_npz(out / f"{name}.npz", arrays)]
