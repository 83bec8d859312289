"""Metric functions of the evaluation suite on hand-computed examples (no model needed)."""

from __future__ import annotations

import math

import pytest
import torch

from rompatch.evaluation.metrics import (
    TfidfModel,
    entropy_bits,
    harmonic_mean,
    mean_ngram_entropy,
    ngram_entropy,
    split_sentences,
    tfidf_similarity,
    token_accuracy,
    treebank_words,
    word_tokenize,
)
from rompatch.evaluation.sequential import checkpoint_schedule, update_diagnostics


def _weighted(h2: float, h3: float) -> float:
    return (2 / 3 * h2 + 4 / 3 * h3) / 2


def test_ngram_entropy_of_a_known_string():
    # words a b a b: bigrams ab ×2, ba ×1 → H2 = H(2/3, 1/3); trigrams aba, bab → H3 = 1 bit
    h2 = -(2 / 3) * math.log2(2 / 3) - (1 / 3) * math.log2(1 / 3)
    assert ngram_entropy("a b a b") == pytest.approx(_weighted(h2, 1.0), abs=1e-12)
    assert ngram_entropy("a b a b") == pytest.approx(0.972765, abs=1e-6)


def test_ngram_entropy_distinct_repetitive_and_short_texts():
    # 5 distinct words: 4 distinct bigrams (2 bits), 3 distinct trigrams (log2 3 bits)
    assert ngram_entropy("one two three four five") == pytest.approx(_weighted(2.0, math.log2(3)), abs=1e-12)
    assert ngram_entropy("the the the the the the") == 0.0  # degenerate repetition: no entropy
    assert ngram_entropy("hello") == 0.0  # no bigram at all (ROME's numpy code gives 0 too)
    # punctuation is a word of its own: "a b ." has bigrams (a,b), (b,.) and one trigram
    assert ngram_entropy("a b.") == pytest.approx(_weighted(1.0, 0.0))


def test_mean_ngram_entropy_is_the_arithmetic_mean():
    assert mean_ngram_entropy(["a b a b", "the the the"]) == pytest.approx(ngram_entropy("a b a b") / 2)
    assert math.isnan(mean_ngram_entropy([]))


def test_entropy_bits():
    assert entropy_bits({"x": 1, "y": 1, "z": 1, "w": 1}) == pytest.approx(2.0)
    assert entropy_bits({}) == 0.0


def test_word_tokenize_matches_nltk_conventions():
    assert word_tokenize("The Eiffel Tower is in Rome. It's big, isn't it? Yes!") == [
        "The", "Eiffel", "Tower", "is", "in", "Rome", ".", "It", "'s", "big", ",", "is", "n't", "it", "?",
        "Yes", "!",
    ]  # fmt: skip
    # an abbreviation or an initial does not end a sentence, so its period stays attached
    assert word_tokenize("Mr. Smith met J. Doe in 1999. Then he left.") == [
        "Mr.", "Smith", "met", "J.", "Doe", "in", "1999", ".", "Then", "he", "left", ".",
    ]  # fmt: skip
    assert split_sentences('He said "stop." She did not.') == ['He said "stop."', "She did not."]
    assert treebank_words('"Hi," she said (loudly) -- cannot stop.') == [
        "``", "Hi", ",", "''", "she", "said", "(", "loudly", ")", "--", "can", "not", "stop", ".",
    ]  # fmt: skip


def test_treebank_rules_match_nltk_when_installed():
    nltk_tok = pytest.importorskip("nltk.tokenize.destructive")
    tok = nltk_tok.NLTKWordTokenizer()
    for s in [
        "Good muffins cost $3.88 (roughly 3,36 euros) in New York.",
        "“Quoted” and ‘single’ — dashes; a@b #1 50% & *stars* 'tis gonna...",
        "Danielle Darrieux's mother tongue is French, isn't it?",
    ]:
        assert treebank_words(s) == tok.tokenize(s)


def test_token_accuracy():
    assert token_accuracy([1, 2, 3], [1, 5, 3]) == pytest.approx(2 / 3)
    assert token_accuracy([7], [7]) == 1.0
    assert math.isnan(token_accuracy([], []))
    with pytest.raises(ValueError):
        token_accuracy([1, 2], [1])


def test_harmonic_mean():
    assert harmonic_mean([100.0, 50.0]) == pytest.approx(200 / 3)
    assert harmonic_mean([90.0, 90.0, 90.0]) == pytest.approx(90.0)
    assert harmonic_mean([100.0, 0.0, 50.0]) == 0.0
    assert harmonic_mean([80.0, float("nan")]) == pytest.approx(80.0)
    assert math.isnan(harmonic_mean([]))


def test_tfidf_matches_sklearn_definitions():
    docs = ["Paris is in France", "Rome is in Italy", "Rome Rome pasta"]
    m = TfidfModel.fit(docs)
    # smooth idf: ln((1 + n) / (1 + df)) + 1 with n = 3
    assert m.idf[m.vocab["rome"]] == pytest.approx(math.log(4 / 3) + 1)
    assert m.idf[m.vocab["paris"]] == pytest.approx(math.log(4 / 2) + 1)
    assert "a" not in m.vocab  # one-letter tokens are not words for \b\w\w+\b
    assert tfidf_similarity("Rome pasta", "rome PASTA", m) == pytest.approx(1.0)
    assert tfidf_similarity("Paris France", "Italy pasta", m) == pytest.approx(0.0)
    # hand-computed: "paris rome" vs "rome": cosine = idf_rome / sqrt(idf_rome² + idf_paris²)
    ir, ip = math.log(4 / 3) + 1, math.log(2) + 1
    assert tfidf_similarity("paris rome", "rome", m) == pytest.approx(ir / math.hypot(ir, ip))
    assert math.isnan(tfidf_similarity("zzz", "rome", m))


def test_checkpoint_schedule():
    assert checkpoint_schedule(100, 25) == [1, 25, 50, 75, 100]
    assert checkpoint_schedule(7, 3) == [1, 3, 6, 7]
    assert checkpoint_schedule(1, 10) == [1]


class _D:
    def __init__(self, u, v):
        self.u, self.v = torch.tensor(u, dtype=torch.float32), torch.tensor(v, dtype=torch.float32)


def test_update_diagnostics_on_constructed_edits():
    # keys k1 = e1, k2 = (1, 1); u1 = e1, u2 = (0.6, 0.8); v1 = (1, 0), v2 = (0, 2); W = I.
    d1, d2 = _D([1.0, 0.0], [1.0, 0.0]), _D([0.6, 0.8], [0.0, 2.0])
    keys = [torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])]
    out = update_diagnostics([d1, d2], keys, torch.eye(2), None)
    total = torch.tensor([[1.0, 0.0], [1.2, 1.6]], dtype=torch.float64)  # v1 u1ᵀ + v2 u2ᵀ
    assert out["update_ratio"] == pytest.approx(float(torch.linalg.matrix_norm(total, ord=2)), abs=1e-5)
    assert out["max_single_update_ratio"] == pytest.approx(2.0)
    # edit 2 fires on key 1 with u2·k1 = 0.6, adding 0.6·v2 (norm 1.2) where edit 1 changed ‖v1‖·1 = 1
    assert out["interference_median"] == pytest.approx(1.2) and out["interference_max"] == pytest.approx(1.2)
    assert out["key_overlap_raw_mean"] == pytest.approx(1 / math.sqrt(2), abs=1e-5)
    # whitened overlap with C = I equals the raw one
    from rompatch.stats import SecondMoment

    sm = SecondMoment(mom2=torch.eye(2), count=1, identity={})
    assert update_diagnostics([d1, d2], keys, torch.eye(2), sm)["key_overlap_whitened_mean"] == pytest.approx(
        1 / math.sqrt(2), abs=1e-5
    )
    # orthogonal later edit: no interference
    d3 = _D([0.0, 1.0], [5.0, 5.0])
    out = update_diagnostics(
        [d1, d3], [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])], torch.eye(2), None
    )
    assert out["interference_max"] == 0.0
