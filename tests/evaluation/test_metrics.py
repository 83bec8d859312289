"""Metric functions of the evaluation suite on hand-computed examples (no model needed)."""

from __future__ import annotations

import math

import pytest

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
