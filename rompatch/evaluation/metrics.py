"""Pure metric functions of the ROME evaluation suite (no model, no torch).

- ``ngram_entropy``: the paper's generation fluency (GE), exactly as the reference code
  (kmeng01/rome ``experiments/py/eval_utils_counterfact.py``): for one text, the entropy in bits of
  the word bi-gram and tri-gram frequency distributions, weighted 2/3 and 4/3, then the arithmetic
  mean of the two; over many texts, the arithmetic mean. Reported ×100 (the paper's 621.9 is 6.219).
- ``word_tokenize``: the words those n-grams are made of. The reference calls
  ``nltk.word_tokenize`` (Punkt sentence split, then NLTK's improved Treebank rules). The Treebank
  rules are ported here verbatim from NLTK 3.7 (the release current when ROME was published); the
  Punkt model (a data download) is replaced by a rule-based sentence split with Punkt's decisions
  for ordinary text: a word ending in . ? or ! ends a sentence unless it is a single-letter
  initial, an ellipsis or a common abbreviation. The only effect of the sentence split on the words
  is whether a sentence-final period is its own token.
- ``token_accuracy``: zsRE's token-level accuracy (fraction of teacher-forced argmax predictions
  that equal the answer tokens).
- ``harmonic_mean``: the S score.
- ``TfidfModel`` / ``tfidf_similarity``: the paper's reference-score consistency (RS), the cosine of
  TF-IDF vectors with scikit-learn's ``TfidfVectorizer`` defaults (lower-cased ``\\b\\w\\w+\\b``
  tokens, smooth idf, l2 norm), from ROME's ``idf.npy``/``tfidf_vocab.json`` or fitted on snippets.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

# ----------------------------------------------------------------------------- word tokenizer
# NLTK 3.7 ``NLTKWordTokenizer`` (nltk/tokenize/destructive.py, Apache 2.0), rules in order.

_STARTING_QUOTES = [
    (re.compile("([«“‘„]|[`]+)", re.U), r" \1 "),
    (re.compile(r"^\""), r"``"),
    (re.compile(r"(``)"), r" \1 "),
    (re.compile(r"([ \(\[{<])(\"|\'{2})"), r"\1 `` "),
    (re.compile(r"(?i)(\')(?!re|ve|ll|m|t|s|d|n)(\w)\b", re.U), r"\1 \2"),
]
_ENDING_QUOTES = [
    (re.compile("([»”’])", re.U), r" \1 "),
    (re.compile(r"''"), " '' "),
    (re.compile(r'"'), " '' "),
    (re.compile(r"([^' ])('[sS]|'[mM]|'[dD]|') "), r"\1 \2 "),
    (re.compile(r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) "), r"\1 \2 "),
]
_PUNCTUATION = [
    (re.compile(r'([^\.])(\.)([\]\)}>"\'' "»”’ " r"]*)\s*$", re.U), r"\1 \2 \3 "),
    (re.compile(r"([:,])([^\d])"), r" \1 \2"),
    (re.compile(r"([:,])$"), r" \1 "),
    (re.compile(r"\.{2,}", re.U), r" \g<0> "),
    (re.compile(r"[;@#$%&]"), r" \g<0> "),
    (re.compile(r'([^\.])(\.)([\]\)}>"\']*)\s*$'), r"\1 \2\3 "),
    (re.compile(r"[?!]"), r" \g<0> "),
    (re.compile(r"([^'])' "), r"\1 ' "),
    (re.compile(r"[*]", re.U), r" \g<0> "),
]
_PARENS_BRACKETS = (re.compile(r"[\]\[\(\)\{\}\<\>]"), r" \g<0> ")
_DOUBLE_DASHES = (re.compile(r"--"), r" -- ")
_CONTRACTIONS2 = [
    re.compile(p)
    for p in (
        r"(?i)\b(can)(?#X)(not)\b",
        r"(?i)\b(d)(?#X)('ye)\b",
        r"(?i)\b(gim)(?#X)(me)\b",
        r"(?i)\b(gon)(?#X)(na)\b",
        r"(?i)\b(got)(?#X)(ta)\b",
        r"(?i)\b(lem)(?#X)(me)\b",
        r"(?i)\b(more)(?#X)('n)\b",
        r"(?i)\b(wan)(?#X)(na)(?=\s)",
    )
]
_CONTRACTIONS3 = [re.compile(r"(?i) ('t)(?#X)(is)\b"), re.compile(r"(?i) ('t)(?#X)(was)\b")]


def treebank_words(sentence: str) -> list[str]:
    """NLTK's improved Treebank word tokenizer (``NLTKWordTokenizer().tokenize``) on one sentence."""
    text = sentence
    for rx, sub in _STARTING_QUOTES:
        text = rx.sub(sub, text)
    for rx, sub in _PUNCTUATION:
        text = rx.sub(sub, text)
    text = _PARENS_BRACKETS[0].sub(_PARENS_BRACKETS[1], text)
    text = _DOUBLE_DASHES[0].sub(_DOUBLE_DASHES[1], text)
    text = " " + text + " "
    for rx, sub in _ENDING_QUOTES:
        text = rx.sub(sub, text)
    for rx in _CONTRACTIONS2:
        text = rx.sub(r" \1 \2 ", text)
    for rx in _CONTRACTIONS3:
        text = rx.sub(r" \1 \2 ", text)
    return text.split()


# Abbreviations Punkt's English model does not end a sentence on (lower-case, without the final '.').
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof st sr jr mt ft vs etc e.g i.e inc ltd co corp jan feb mar apr jun jul aug sep "
    "sept oct nov dec gen col lt sgt capt gov sen rep rev hon u.s u.k u.n no vol pp ed al approx est "
    "dept univ assn bros".split()
)
_SENT_END = re.compile(r"(?<=[.?!])([\"'”’)\]]*)\s+")


def split_sentences(text: str) -> list[str]:
    """Rule-based stand-in for Punkt: split after . ? ! (plus closing quotes/brackets) and whitespace,
    except after single-letter initials, ellipses and common abbreviations."""
    out, start = [], 0
    for m in _SENT_END.finditer(text):
        end = m.start(1)  # the position just after the terminator
        words = text[start:end].split()
        last = words[-1] if words else ""
        if last.endswith("."):
            stem = last.rstrip(".").lstrip("\"'“‘([").lower()
            if last.endswith("..") or (len(stem) == 1 and stem.isalpha()) or stem in _ABBREVIATIONS:
                continue
        out.append(text[start : m.end(1)].strip())
        start = m.end()
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return [s for s in out if s]


def word_tokenize(text: str) -> list[str]:
    """Words as ``nltk.word_tokenize`` splits them (sentence split, then Treebank rules per sentence)."""
    return [w for s in split_sentences(text) for w in treebank_words(s)]


# ------------------------------------------------------------------------------ fluency (GE)

NGRAM_ORDERS = (2, 3)
NGRAM_WEIGHTS = (2 / 3, 4 / 3)


def ngram_counts(words: Sequence[str], n: int) -> Counter:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def entropy_bits(counts: Mapping[object, int]) -> float:
    """Shannon entropy (bits) of the distribution given by ``counts``; 0 for an empty one."""
    total = sum(counts.values())
    if total == 0:
        return 0.0
    return -sum((c / total) * math.log2(c / total) for c in counts.values() if c > 0)


def ngram_entropy(
    text: str,
    *,
    ns: Sequence[int] = NGRAM_ORDERS,
    weights: Sequence[float] = NGRAM_WEIGHTS,
) -> float:
    """ROME's ``compute_n_gram_entropy``: mean over n of weight_n × H(n-gram distribution) in bits."""
    if len(ns) != len(weights) or not ns:
        raise ValueError("ns and weights must be non-empty and of equal length")
    words = word_tokenize(text)
    return sum(w * entropy_bits(ngram_counts(words, n)) for n, w in zip(ns, weights)) / len(ns)


def mean_ngram_entropy(texts: Iterable[str]) -> float:
    """ROME's ``n_gram_entropy`` (arithmetic aggregation) over a record's generations."""
    values = [ngram_entropy(t) for t in texts]
    if not values:
        return float("nan")
    return sum(values) / len(values)


# -------------------------------------------------------------------------- accuracy, S


def token_accuracy(predicted: Sequence[int], expected: Sequence[int]) -> float:
    """Fraction of positions where the predicted token id equals the expected one (zsRE metric)."""
    if len(predicted) != len(expected):
        raise ValueError(f"{len(predicted)} predictions for {len(expected)} expected tokens")
    if not expected:
        return float("nan")
    return sum(int(a == b) for a, b in zip(predicted, expected)) / len(expected)


def harmonic_mean(xs: Iterable[float]) -> float:
    """Harmonic mean ignoring NaNs; 0 when any value is ≤ 0 (as scipy's hmean for zeros)."""
    vals = [float(x) for x in xs if not math.isnan(float(x))]
    if not vals:
        return float("nan")
    if min(vals) <= 0:
        return 0.0
    return len(vals) / sum(1 / x for x in vals)


# ------------------------------------------------------------------------- consistency (RS)

_TFIDF_TOKEN = re.compile(r"(?u)\b\w\w+\b")


@dataclass
class TfidfModel:
    """scikit-learn ``TfidfVectorizer`` transform with a fixed vocabulary and idf (defaults:
    lower-case, ``\\b\\w\\w+\\b`` tokens, raw term counts × idf, l2-normalised)."""

    vocab: dict[str, int]
    idf: list[float]

    @classmethod
    def fit(cls, documents: Iterable[str]) -> TfidfModel:
        """Fit idf like ``TfidfVectorizer().fit`` (smooth_idf: ln((1+n)/(1+df)) + 1)."""
        df: Counter = Counter()
        n = 0
        for doc in documents:
            n += 1
            df.update(set(_TFIDF_TOKEN.findall(doc.lower())))
        terms = sorted(df)
        return cls(
            vocab={t: i for i, t in enumerate(terms)},
            idf=[math.log((1 + n) / (1 + df[t])) + 1 for t in terms],
        )

    @classmethod
    def load(cls, directory: str | Path) -> TfidfModel:
        """ROME's cached statistics: ``idf.npy`` and ``tfidf_vocab.json`` in ``directory``."""
        import numpy as np

        d = Path(directory)
        idf = np.load(d / "idf.npy", allow_pickle=False)
        with open(d / "tfidf_vocab.json", encoding="utf-8") as f:
            vocab = json.load(f)
        return cls(vocab={k: int(v) for k, v in vocab.items()}, idf=[float(x) for x in idf])

    def vector(self, text: str) -> dict[int, float]:
        counts = Counter(self.vocab[t] for t in _TFIDF_TOKEN.findall(text.lower()) if t in self.vocab)
        vec = {i: c * self.idf[i] for i, c in counts.items()}
        norm = math.sqrt(sum(v * v for v in vec.values()))
        return {i: v / norm for i, v in vec.items()} if norm > 0 else {}


def tfidf_similarity(text_a: str, text_b: str, model: TfidfModel) -> float:
    """Cosine similarity of the TF-IDF vectors of two texts (ROME's ``tfidf_similarity``)."""
    a, b = model.vector(text_a), model.vector(text_b)
    if not a or not b:
        return float("nan")
    return sum(v * b.get(i, 0.0) for i, v in a.items())


__all__ = [
    "word_tokenize",
    "treebank_words",
    "split_sentences",
    "ngram_entropy",
    "mean_ngram_entropy",
    "entropy_bits",
    "token_accuracy",
    "harmonic_mean",
    "TfidfModel",
    "tfidf_similarity",
]
