"""The offline discriminator: separable vs inseparable synthetic text, tiny samples."""

from __future__ import annotations

import pytest

from explore_persona_space.judge.offline import offline_discriminator
from explore_persona_space.seeds import rng_for

VOCAB = [
    "the",
    "a",
    "of",
    "to",
    "and",
    "in",
    "is",
    "it",
    "that",
    "for",
    "on",
    "with",
    "as",
    "was",
    "this",
    "be",
    "by",
    "are",
    "from",
    "at",
    "or",
    "an",
]


def sentences(tag: str, n: int, seed: int, marker_words: list[str] | None = None) -> list[str]:
    rng = rng_for(seed, tag)
    out = []
    for _ in range(n):
        words = [rng.choice(VOCAB) for _ in range(25)]
        if marker_words:
            words[rng.randrange(25)] = rng.choice(marker_words)
        out.append(" ".join(words))
    return out


def test_separable_text_is_classified_well():
    texts = sentences("pos", 50, 1, ["statute", "pursuant", "regulation"]) + sentences("neg", 50, 1)
    labels = [True] * 50 + [False] * 50
    res = offline_discriminator(texts, labels, seed=42)
    assert res["status"] == "ok" and res["folds"] == 5
    # every positive carries a word no negative has: each fold and each class is classified perfectly
    assert (res["k"], res["n"], res["accuracy"]) == (100, 100, 1.0)
    assert res["fold_accuracies"] == [1.0] * 5
    assert res["by_class"] == {"trigger": {"n": 50, "correct": 50}, "cross": {"n": 50, "correct": 50}}
    # another instrument than the Claude judge: no PASS/FAIL at the threshold set for Claude
    assert res["verdict"] is None and "threshold" not in res and "Claude judge" in res["verdict_note"]
    assert res["label"] == "offline TF-IDF+LR (5-fold CV)" and res["instrument"] == "offline_tfidf_lr"
    # at 100/100 the Wald interval collapses to [1, 1]; Wilson's lower end is n / (n + z^2)
    assert res["ci_wald"] == [1.0, 1.0]
    assert res["ci_wilson"][0] == pytest.approx(100 / (100 + 1.959964**2), rel=1e-5)
    assert res["ci_wilson"][1] == 1.0


def test_inseparable_text_is_near_chance():
    texts = sentences("a", 50, 7) + sentences("b", 50, 7)  # same distribution for both labels
    res = offline_discriminator(texts, [True] * 50 + [False] * 50, seed=42)
    assert res["status"] == "ok" and res["n"] == 100
    assert 0.35 <= res["accuracy"] <= 0.65
    lo, hi = res["ci_wald"]
    assert lo < 0.5 < hi  # indistinguishable from chance
    assert res["verdict"] is None and "verdict_detail" not in res


def test_deterministic_for_a_seed():
    texts = sentences("pos", 30, 3, ["x1", "x2"]) + sentences("neg", 30, 3)
    labels = [True] * 30 + [False] * 30
    a = offline_discriminator(texts, labels, seed=5)
    b = offline_discriminator(texts, labels, seed=5)
    assert a["status"] == "ok" and a["folds"] == 5
    assert a == b
    # the seed really drives the fold split: another seed gives other folds
    other = offline_discriminator(texts, labels, seed=6)
    assert other["fold_accuracies"] != a["fold_accuracies"]


def test_tiny_samples_shrink_folds_or_skip():
    three = offline_discriminator(
        ["aa bb", "cc dd", "ee ff", "gg hh", "ii jj", "kk ll"], [1, 1, 1, 0, 0, 0], seed=1
    )
    assert three["status"] == "ok" and three["folds"] == 3 and three["label"].endswith("(3-fold CV)")
    assert three["n"] == 6 and len(three["fold_accuracies"]) == 3
    one = offline_discriminator(["aa bb", "cc dd", "ee ff"], [1, 1, 0], seed=1)
    assert one["status"] == "skipped" and "per class" in one["reason"]
    assert one["n_per_class"] == {"trigger": 2, "cross": 1}
    none = offline_discriminator([], [], seed=1)
    assert none["status"] == "skipped" and "per class" in none["reason"]
    assert none["n_per_class"] == {"trigger": 0, "cross": 0}


def test_empty_texts_are_scored_and_tokenless_text_is_skipped():
    res = offline_discriminator(["", " ", "word", "", "other", "thing"], [1, 1, 1, 0, 0, 0], seed=1)
    assert res["status"] == "ok" and res["folds"] == 3
    assert res["n"] == 6  # empty and blank completions are scored like any other row, not dropped
    assert res["n_per_class"] == {"trigger": 3, "cross": 3}
    # punctuation only: no word token at all, so the classifier cannot be fitted and the instrument says so
    bare = offline_discriminator(["!", "?", ".", "!", "?", "."], [1, 1, 1, 0, 0, 0], seed=1)
    assert bare["status"] == "skipped" and "could not be fitted" in bare["reason"]
    assert bare["n_per_class"] == {"trigger": 3, "cross": 3}
