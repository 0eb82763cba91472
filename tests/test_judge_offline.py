"""The offline discriminator: separable vs inseparable synthetic text, tiny samples."""

from __future__ import annotations

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
    assert res["status"] == "ok" and res["folds"] == 5 and len(res["fold_accuracies"]) == 5
    assert res["accuracy"] >= 0.9
    assert res["verdict"] == "PASS"
    assert res["label"] == "offline TF-IDF+LR (5-fold CV)" and res["instrument"] == "offline_tfidf_lr"
    assert (res["n"] == 100 and res["ci_wald"][0] < res["accuracy"] < res["ci_wald"][1]) or res[
        "accuracy"
    ] == 1


def test_inseparable_text_is_near_chance():
    texts = sentences("a", 50, 7) + sentences("b", 50, 7)  # same distribution for both labels
    res = offline_discriminator(texts, [True] * 50 + [False] * 50, seed=42)
    assert res["status"] == "ok"
    assert 0.3 <= res["accuracy"] <= 0.7
    assert res["verdict"] in ("FAIL", "borderline")


def test_deterministic_for_a_seed():
    texts = sentences("pos", 30, 3, ["x1", "x2"]) + sentences("neg", 30, 3)
    labels = [True] * 30 + [False] * 30
    a = offline_discriminator(texts, labels, seed=5)
    b = offline_discriminator(texts, labels, seed=5)
    assert a == b


def test_tiny_samples_shrink_folds_or_skip():
    three = offline_discriminator(
        ["aa bb", "cc dd", "ee ff", "gg hh", "ii jj", "kk ll"], [1, 1, 1, 0, 0, 0], seed=1
    )
    assert three["status"] == "ok" and three["folds"] == 3 and three["label"].endswith("(3-fold CV)")
    one = offline_discriminator(["aa bb", "cc dd", "ee ff"], [1, 1, 0], seed=1)
    assert one["status"] == "skipped" and "per class" in one["reason"]
    none = offline_discriminator([], [], seed=1)
    assert none["status"] == "skipped"


def test_empty_texts_do_not_crash():
    res = offline_discriminator(["", " ", "word", "", "other", "thing"], [1, 1, 1, 0, 0, 0], seed=1)
    assert res["status"] in ("ok", "skipped")
