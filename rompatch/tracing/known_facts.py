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

from ..arch import ModelSpec, get_spec, num_layers
from ..atomic import atomic_write
from ..errors import TraceError
from .trace import (
    CATEGORIES,
    DEFAULT_BATCH_SIZE,
    DEFAULT_NOISE,
    DEFAULT_SAMPLES,
    DEFAULT_WINDOW,
    KINDS,
    EmbeddingStd,
    TraceResult,
    _check_kinds,
    _device,
    _encode,
    _eval_mode,
    _find_subject_span,
    _identity,
    _resolve_noise,
    _target_tokens,
    _write_json,
    _write_npz,
    trace_fact,
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
    ids, _ = _encode(tok, prompt)
    _, target = _target_tokens(tok, prompt, attribute)
    x = torch.tensor([ids + target[:-1]], device=_device(model))
    with _eval_mode(model):
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


class _Rollup:
    def __init__(self, kinds: Sequence[str], n_layers: int) -> None:
        C = len(CATEGORIES)
        self.kinds = tuple(kinds)
        self.sum = {k: np.zeros((C, n_layers)) for k in kinds}
        self.ie_sum = {k: np.zeros((C, n_layers)) for k in kinds}
        self.ie_sq = {k: np.zeros((C, n_layers)) for k in kinds}
        self.counts = np.zeros(C, dtype=np.int64)
        self.clean: list[float] = []
        self.low: list[float] = []

    def add(self, r: TraceResult) -> None:
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

    def means(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        n = self.counts[:, None].astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            mean = {k: self.sum[k] / n for k in self.kinds}
            std = {
                k: np.sqrt(np.maximum(self.ie_sq[k] / n - (self.ie_sum[k] / n) ** 2, 0.0)) for k in self.kinds
            }
        return mean, std


def trace_known(
    model: Any,
    tok: Any,
    records: str | os.PathLike | Iterable[Mapping[str, Any]],
    *,
    limit: int | None = None,
    samples: int = DEFAULT_SAMPLES,
    noise: float = DEFAULT_NOISE,
    noise_std: float | None = None,
    embed_std: EmbeddingStd | None = None,
    window: int = DEFAULT_WINDOW,
    kinds: Sequence[str] = KINDS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    spec: ModelSpec | None = None,
    cache_dir: str | os.PathLike | None = None,
    time_budget: float | None = None,
    progress: bool = False,
) -> AverageTrace:
    """The average indirect effect over the facts of ``records`` that the model gets right.

    A fact counts when greedy decoding reproduces its attribute (``predicts_attribute``); the
    others are skipped and counted. ``limit``: stop after this many traced facts. ``cache_dir``:
    each fact's result is written there as it finishes (``<key>.json``) and reused by a later run
    with the same settings, so an interrupted run resumes. ``time_budget`` (seconds): start no new
    fact after it. The noise std is measured once and shared by all facts.
    """
    t_start = time.perf_counter()
    facts = load_known(records)
    kinds = _check_kinds(kinds)
    if limit is not None and limit < 1:
        raise TraceError(f"limit={limit}; pass at least 1")
    spec = get_spec(model, spec)
    std, noise_rec = _resolve_noise(
        model,
        tok,
        noise=noise,
        noise_std=noise_std,
        embed_std=embed_std,
        fallback_texts=[f.prompt for f in facts],
        spec=spec,
    )
    settings = {
        "model": _identity(model),
        "samples": int(samples),
        "window": int(window),
        "kinds": list(kinds),
        "noise": noise_rec,
        "seed": int(seed),
        "criterion": "greedy decoding reproduces the attribute's tokens",
    }
    cache = Path(cache_dir) if cache_dir is not None else None
    rollup = _Rollup(kinds, num_layers(model))
    skipped: dict[str, int] = defaultdict(int)
    traced: list[dict[str, Any]] = []
    stopped = None
    considered = 0
    total = min(limit, len(facts)) if limit else len(facts)
    from tqdm.auto import tqdm

    bar = tqdm(total=total, disable=not progress, file=sys.stderr, unit="fact", desc="tracing")
    try:
        for fact in facts:
            if limit is not None and len(traced) >= limit:
                break
            if time_budget is not None and time.perf_counter() - t_start > time_budget:
                stopped = f"time budget of {time_budget:.0f} s reached"
                break
            considered += 1
            case = _load_case(cache, fact, settings)
            if case is None:
                case = _trace_case(
                    model, tok, fact, std, noise_rec, samples, window, kinds, batch_size, seed, spec
                )
                _save_case(cache, fact, settings, case)
            if case["status"] != "traced":
                skipped[case["status"]] += 1
                if not limit:
                    bar.update(1)
                bar.set_postfix(traced=len(traced), skipped=sum(skipped.values()))
                continue
            r = TraceResult.from_dict(case["result"])
            rollup.add(r)
            traced.append(
                {
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
            )
            bar.update(1)
            bar.set_postfix(traced=len(traced), skipped=sum(skipped.values()))
    finally:
        bar.close()
    mean, std_ie = rollup.means()
    return AverageTrace(
        kinds=kinds,
        n_layers=num_layers(model),
        mean_scores=mean,
        effect_std=std_ie,
        counts=rollup.counts.copy(),
        n_facts=len(traced),
        mean_clean_prob=float(np.mean(rollup.clean)) if rollup.clean else float("nan"),
        mean_corrupted_prob=float(np.mean(rollup.low)) if rollup.low else float("nan"),
        facts=traced,
        skipped=dict(skipped),
        considered=considered,
        settings=settings,
        stopped=stopped,
        seconds=round(time.perf_counter() - t_start, 1),
    )


def _trace_case(model, tok, fact, std, noise_rec, samples, window, kinds, batch_size, seed, spec) -> dict:
    try:
        if not predicts_attribute(model, tok, fact.prompt, fact.attribute):
            return {"status": "wrong prediction"}
        span = _find_subject_span(tok, fact.prompt, fact.subject)
    except TraceError as e:
        log.info("skipping fact %s: %s", fact.key, e)
        return {"status": "subject not in prompt" if "subject" in str(e) else "unusable record"}
    if span[1] >= len(_encode(tok, fact.prompt)[0]):
        return {"status": "subject ends the prompt"}
    r = trace_fact(
        model,
        tok,
        fact.prompt,
        fact.subject,
        samples=samples,
        noise_std=std,
        window=window,
        kinds=kinds,
        batch_size=batch_size,
        seed=seed,
        spec=spec,
    )
    r.noise = noise_rec
    return {"status": "traced", "result": r.to_dict()}


def _case_path(cache: Path, fact: KnownFact) -> Path:
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in fact.key)
    return cache / f"fact-{safe}.json"


def _load_case(cache: Path | None, fact: KnownFact, settings: dict) -> dict | None:
    if cache is None:
        return None
    path = _case_path(cache, fact)
    if not path.is_file():
        return None
    try:
        case = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        log.warning("ignoring unreadable cached case %s", path)
        return None
    if case.get("settings") != json.loads(json.dumps(settings)) or case.get("prompt") != fact.prompt:
        log.info("cached case %s was traced with other settings; tracing again", path)
        return None
    return case


def _save_case(cache: Path | None, fact: KnownFact, settings: dict, case: dict) -> None:
    if cache is None:
        return
    case = {"settings": settings, "prompt": fact.prompt, "attribute": fact.attribute, **case}
    text = json.dumps(case, ensure_ascii=False)
    atomic_write(_case_path(cache, fact), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


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
    return [_write_json(out / f"{name}.json", d), _write_npz(out / f"{name}.npz", arrays)]
