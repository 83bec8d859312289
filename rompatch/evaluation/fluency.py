"""Generation-based CounterFact metrics: fluency (GE) and reference-score consistency (RS).

Generation follows ROME's ``util/generate.py::generate_fast`` exactly in what it samples:
- top-k sampling with k = 5 from the softmax of the last position's logits, renormalised over the
  k tokens, no temperature;
- one generation per prompt, ``max_out_len`` tokens in total *including the prompt* (ROME's
  evaluation uses 100);
- no stop at end-of-text (GPT-2's ``<|endoftext|>`` is sampled, later removed from the text, and
  generation goes on); the text is the decoded prompt plus continuation, special tokens removed,
  NFKD-normalised, with blank lines replaced by a space.
Batches are left-padded with explicit position ids and a KV cache, so each prompt sees exactly
what it would see alone. Sampling uses a ``torch.Generator`` seeded per call, so the same prompts
give the same texts on the same model (pre- and post-edit generations share their random draws).
"""

from __future__ import annotations

import logging
import math
import unicodedata
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import EvalError
from ..generate import sample_topk_ids
from .metrics import TfidfModel, mean_ngram_entropy, tfidf_similarity
from .records import read_json

log = logging.getLogger(__name__)

ROME_MAX_OUT_LEN = 100  # experiments/py/eval_utils_counterfact.py: generate_fast(..., max_out_len=100)
ROME_TOP_K = 5  # util/generate.py: generate_fast(top_k=5)


@dataclass(frozen=True)
class GenerationSettings:
    """How fluency generations are sampled (recorded with every result)."""

    max_out_len: int = ROME_MAX_OUT_LEN  # total tokens, prompt included
    top_k: int = ROME_TOP_K
    seed: int = 0
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.max_out_len < 2:
            raise EvalError(f"generation length must be at least 2 tokens, not {self.max_out_len}")
        if self.top_k < 1:
            raise EvalError(f"top-k must be at least 1, not {self.top_k}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _clean(text: str) -> str:
    return unicodedata.normalize("NFKD", text).replace("\n\n", " ")


def generate_topk_ids(
    model: Any,
    tok: Any,
    prompts: Sequence[str],
    *,
    settings: GenerationSettings = GenerationSettings(),
) -> list[list[int]]:
    """Token ids (prompt + sampled continuation, ``settings.max_out_len`` in all) per prompt."""
    return sample_topk_ids(
        model,
        tok,
        prompts,
        max_out_len=settings.max_out_len,
        top_k=settings.top_k,
        seed=settings.seed,
        batch_size=settings.batch_size,
    )


def generate_topk(
    model: Any,
    tok: Any,
    prompts: Sequence[str],
    *,
    settings: GenerationSettings = GenerationSettings(),
) -> list[str]:
    """One top-k sampled text per prompt (prompt included), ``settings.max_out_len`` tokens each."""
    ids = generate_topk_ids(model, tok, prompts, settings=settings)
    return [_clean(tok.decode(x, skip_special_tokens=True)) for x in ids]


def fluency(
    model: Any,
    tok: Any,
    prompts: Sequence[str],
    *,
    settings: GenerationSettings = GenerationSettings(),
) -> tuple[float, list[str]]:
    """(mean weighted bi/tri-gram entropy of the generations, the generations)."""
    texts = generate_topk(model, tok, prompts, settings=settings)
    return mean_ngram_entropy(texts), texts


# ----------------------------------------------------------------------------- consistency


class AttributeSnippets:
    """ROME's ``attribute_snippets.json``: Wikipedia texts per (relation_id, target_id)."""

    def __init__(self, by_key: Mapping[tuple[str, str], list[dict[str, Any]]]) -> None:
        self._by_key = by_key

    @classmethod
    def load(cls, path: str | Path) -> AttributeSnippets:
        data = read_json(
            path,
            unreadable="cannot read attribute snippets {path}: {reason}",
            invalid="{path} is not valid JSON ({msg}); pass ROME's attribute_snippets.json",
        )
        by_key: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
        try:
            for el in data:
                by_key[(str(el["relation_id"]), str(el["target_id"]))].extend(el["samples"])
        except (TypeError, KeyError) as e:
            raise EvalError(
                f"{path} is not in ROME's attribute_snippets format (list of {{relation_id, target_id, "
                f"samples: [{{name, text}}]}}; missing {e})"
            ) from None
        return cls(by_key)

    def texts(self, relation_id: str, target_id: str) -> list[str]:
        return [s["text"] for s in self._by_key.get((str(relation_id), str(target_id)), [])]

    def all_texts(self) -> list[str]:
        return [s["text"] for samples in self._by_key.values() for s in samples]


@dataclass
class Consistency:
    """What reference-score consistency needs: snippets and a TF-IDF model."""

    snippets: AttributeSnippets
    tfidf: TfidfModel

    @classmethod
    def load(cls, snippets_path: str | Path, tfidf_dir: str | Path | None = None) -> Consistency:
        """Snippets, and ROME's idf.npy/tfidf_vocab.json from ``tfidf_dir`` (else fitted on the
        snippets, as ROME's ``collect_stats`` does when the cache cannot be downloaded)."""
        snips = AttributeSnippets.load(snippets_path)
        if tfidf_dir is not None:
            try:
                model = TfidfModel.load(tfidf_dir)
            except (OSError, ValueError) as e:
                raise EvalError(
                    f"cannot read TF-IDF statistics in {tfidf_dir} ({e}); it must hold idf.npy and tfidf_vocab.json"
                ) from None
        else:
            model = TfidfModel.fit(snips.all_texts())
        return cls(snips, model)

    def score(self, record: Mapping[str, Any], texts: Sequence[str]) -> float:
        """RS: TF-IDF cosine between the generations and the target_new's reference texts."""
        rr = record["requested_rewrite"]
        refs = self.snippets.texts(rr.get("relation_id", ""), rr["target_new"].get("id", ""))
        if not refs:
            return math.nan
        return tfidf_similarity(" ".join(texts), " ".join(refs), self.tfidf)


__all__ = [
    "GenerationSettings",
    "generate_topk",
    "generate_topk_ids",
    "fluency",
    "AttributeSnippets",
    "Consistency",
    "ROME_MAX_OUT_LEN",
    "ROME_TOP_K",
]
