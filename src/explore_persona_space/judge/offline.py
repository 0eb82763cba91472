"""Offline discriminator: a cross-validated text classifier on the same stripped completions.

Needs no API and no key, so every cell gets a discriminator number. It is a
different instrument from the Claude judge and is always labelled as such: the
classifier learns from the cell's own labelled rows (word and character n-gram
TF-IDF, logistic regression) and is scored on out-of-fold predictions, whereas
the Claude judge sees one completion and a persona description, zero-shot. The
70% threshold was set for the Claude judge, so no PASS/FAIL is given here: the
result is an accuracy with its intervals, beside chance and the majority
baseline, and reports show it in a column and a colour of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from explore_persona_space.seeds import derive_seed
from explore_persona_space.stats import wald_ci, wilson_ci

INSTRUMENT = "offline_tfidf_lr"
MIN_PER_CLASS = 2


def _pipeline():
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import FeatureUnion, make_pipeline

    features = FeatureUnion(
        [
            ("word", TfidfVectorizer(analyzer="word", ngram_range=(1, 2), sublinear_tf=True)),
            ("char", TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True)),
        ]
    )
    return make_pipeline(features, LogisticRegression(C=1.0, max_iter=2000))


def _skipped(reason: str, n_per_class: dict[str, int]) -> dict[str, Any]:
    return {"status": "skipped", "instrument": INSTRUMENT, "reason": reason, "n_per_class": n_per_class}


def offline_discriminator(
    texts: Sequence[str],
    labels: Sequence[bool],
    *,
    seed: int,
    n_splits: int = 5,
) -> dict[str, Any]:
    """Stratified k-fold accuracy of TF-IDF + logistic regression at telling label True from False.

    With fewer rows than folds in a class, the folds shrink to the class size;
    below ``MIN_PER_CLASS`` rows in a class the instrument is skipped with a reason.
    """
    import numpy as np
    from sklearn.base import clone
    from sklearn.model_selection import StratifiedKFold

    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
    y = np.asarray([bool(v) for v in labels], dtype=int)
    n_per_class = {"trigger": int(y.sum()), "cross": int(len(y) - y.sum())}
    smallest = min(n_per_class.values())
    if smallest < MIN_PER_CLASS:
        return _skipped(f"needs at least {MIN_PER_CLASS} rows per class, have {n_per_class}", n_per_class)
    folds = min(n_splits, smallest)
    docs = np.asarray([t if t.strip() else "<empty>" for t in texts], dtype=object)
    splitter = StratifiedKFold(
        n_splits=folds, shuffle=True, random_state=derive_seed(seed, INSTRUMENT) % 2**32
    )
    predicted = np.zeros_like(y)
    fold_acc = []
    for train, test in splitter.split(docs, y):
        model = clone(_pipeline())
        try:
            model.fit(docs[train], y[train])
        except ValueError as exc:  # e.g. an empty vocabulary on degenerate text
            return _skipped(f"classifier could not be fitted: {exc}", n_per_class)
        predicted[test] = model.predict(docs[test])
        fold_acc.append(float(np.mean(predicted[test] == y[test])))
    correct, n = int(np.sum(predicted == y)), len(y)
    return {
        "status": "ok",
        "instrument": INSTRUMENT,
        "label": f"offline TF-IDF+LR ({folds}-fold CV)",
        "accuracy": correct / n,
        "k": correct,
        "n": n,
        "ci_wald": list(wald_ci(correct, n)),
        "ci_wilson": list(wilson_ci(correct, n)),
        "verdict": None,
        "verdict_note": "no PASS/FAIL: the 70% threshold was set for the Claude judge, not this instrument",
        "folds": folds,
        "fold_accuracies": fold_acc,
        "n_per_class": n_per_class,
        "majority_baseline": max(n_per_class.values()) / len(y),
        "by_class": {
            "trigger": {"n": n_per_class["trigger"], "correct": int(np.sum((predicted == y) & (y == 1)))},
            "cross": {"n": n_per_class["cross"], "correct": int(np.sum((predicted == y) & (y == 0)))},
        },
        "seed": seed,
    }
