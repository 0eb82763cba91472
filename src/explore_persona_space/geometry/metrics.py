"""Metrics over persona vectors: M1 (cosine collapse), M2 (shift along an EM axis), M3 (classification).

All take plain arrays - persona vectors ``[P, H]`` (one layer, one method) or
per-question states ``[P, Q, H]`` - so they are tested on synthetic vectors whose
answer is known, and an experiment only chooses what to feed them.

**Centring.** Raw hidden states share a large common component (every prompt
has the same chat frame), so raw cosines sit near 1 for any two personas. M1
subtracts a *reference* mean first. The reference must be the same for the
conditions compared: if each condition were centred on its own mean over
personas, its centred vectors would sum to zero and their mean off-diagonal
cosine would be about ``-1/(P-1)`` whatever the model did (exactly that for
equal norms) - a constant, not a measurement (:func:`m1` with
``center=vectors.mean(0)`` shows it, and a test pins it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

from explore_persona_space.seeds import derive_seed
from explore_persona_space.stats import wilson_ci


def _unit(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError("a zero vector has no direction (a persona vector equal to the centre?)")
    return x / norms


def pair_cosines(vectors: np.ndarray, center: np.ndarray | None = None) -> np.ndarray:
    """Cosines of every persona pair ``i < j`` (row-major upper triangle), after subtracting ``center``."""
    v = np.asarray(vectors, dtype=np.float64)
    if v.ndim != 2 or v.shape[0] < 2:
        raise ValueError(f"expected [personas >= 2, hidden], got {v.shape}")
    if center is not None:
        v = v - np.asarray(center, dtype=np.float64)
    u = _unit(v)
    i, j = np.triu_indices(v.shape[0], k=1)
    return np.einsum("ph,ph->p", u[i], u[j])


def m1(vectors: np.ndarray, center: np.ndarray | None = None) -> float:
    """M1: mean off-diagonal cosine of the persona-vector matrix (after subtracting ``center``)."""
    return float(pair_cosines(vectors, center).mean())


@dataclass(frozen=True)
class M1Result:
    m1: float  # the condition
    m1_base: float  # the reference condition, same centre
    delta: float
    n_pairs: int
    statistic: float | None
    p: float
    test: str = "Wilcoxon signed-rank, paired over persona pairs, two-sided"


def _wilcoxon(diff: np.ndarray) -> tuple[float | None, float]:
    """Two-sided Wilcoxon signed-rank of ``diff`` against 0; all-zero differences give p = 1."""
    diff = np.asarray(diff, dtype=np.float64)
    if not np.any(diff != 0):
        return None, 1.0
    res = sps.wilcoxon(diff, alternative="two-sided", method="auto")
    return float(res.statistic), float(res.pvalue)


def m1_test(cond: np.ndarray, base: np.ndarray, center: np.ndarray | None = None) -> M1Result:
    """M1 of ``cond`` vs ``base`` (the same personas, in the same order), paired over the persona pairs.

    The pairs are not independent (66 pairs from 12 vectors), so the p-value is a
    description of how consistently the pairs moved, not an exact error rate.
    """
    if cond.shape != base.shape:
        raise ValueError(f"condition {cond.shape} and base {base.shape} differ in shape")
    a, b = pair_cosines(cond, center), pair_cosines(base, center)
    stat, p = _wilcoxon(a - b)
    return M1Result(float(a.mean()), float(b.mean()), float(a.mean() - b.mean()), len(a), stat, p)


def em_axis(reference: np.ndarray, base: np.ndarray) -> np.ndarray:
    """The EM axis: the reference condition's mean persona vector minus the base model's (E0 - base)."""
    axis = np.asarray(reference, dtype=np.float64).mean(axis=0) - np.asarray(base, dtype=np.float64).mean(
        axis=0
    )
    if not np.any(axis):
        raise ValueError("the EM axis is zero: the reference and base vectors have the same mean")
    return axis


@dataclass(frozen=True)
class M2Result:
    shift: dict[str, float]  # per persona: (v_cond - v_base) . axis / |axis|^2, in units of the axis
    cosine: dict[str, float]  # per persona: cos(v_cond - v_base, axis)
    mean_shift: float
    mean_cosine: float
    n: int
    statistic: float | None
    p: float
    test: str = "Wilcoxon signed-rank of the per-persona shifts against 0, two-sided"


def m2_test(
    cond: np.ndarray, base: np.ndarray, axis: np.ndarray, personas: list[str], exclude: tuple[str, ...] = ()
) -> M2Result:
    """M2: how far each persona (except ``exclude``) moved along ``axis`` from base to ``cond``.

    A shift of 1 is as far as the axis itself (the reference condition's average
    move); the cosine says how much of the persona's move is along the axis.
    """
    keep = [k for k, p in enumerate(personas) if p not in exclude]
    delta = np.asarray(cond, dtype=np.float64)[keep] - np.asarray(base, dtype=np.float64)[keep]
    axis = np.asarray(axis, dtype=np.float64)
    shift = delta @ axis / float(axis @ axis)
    norms = np.linalg.norm(delta, axis=1)
    cosine = np.where(norms > 0, delta @ axis / (np.where(norms > 0, norms, 1) * np.linalg.norm(axis)), 0.0)
    stat, p = _wilcoxon(shift)
    names = [personas[k] for k in keep]
    return M2Result(
        shift=dict(zip(names, map(float, shift), strict=True)),
        cosine=dict(zip(names, map(float, cosine), strict=True)),
        mean_shift=float(shift.mean()),
        mean_cosine=float(cosine.mean()),
        n=len(keep),
        statistic=stat,
        p=p,
    )


def question_folds(n_questions: int, n_folds: int, seed: int) -> list[np.ndarray]:
    """Question indices in ``n_folds`` held-out folds of near-equal size, shuffled by ``seed``."""
    if not 2 <= n_folds <= n_questions:
        raise ValueError(f"need 2 <= folds <= questions; got {n_folds} folds over {n_questions} questions")
    order = np.random.default_rng(derive_seed(seed, "m3-folds", n_questions)).permutation(n_questions)
    return [np.sort(f) for f in np.array_split(order, n_folds)]


@dataclass(frozen=True)
class M3Result:
    correct: int
    n: int
    accuracy: float
    wilson: tuple[float, float]
    chance: float
    fold_accuracy: list[float]
    per_persona: list[float]  # accuracy on each persona's held-out rows


def nearest_centroid(states: np.ndarray, n_folds: int, seed: int) -> M3Result:
    """M3: held-out nearest-centroid persona classification of per-question states ``[P, Q, H]``.

    Folds are over questions and the same for every persona (so each fold is
    stratified: every persona has the same training and held-out questions).
    Centroids are the training questions' mean per persona; each held-out row
    goes to the centroid at the smallest Euclidean distance.
    """
    x = np.asarray(states, dtype=np.float64)
    if x.ndim != 3:
        raise ValueError(f"expected [personas, questions, hidden], got {x.shape}")
    n_personas, n_questions, _ = x.shape
    hits = np.zeros((n_personas, n_questions), dtype=bool)
    folds = question_folds(n_questions, n_folds, seed)
    for held in folds:
        train = np.setdiff1d(np.arange(n_questions), held)
        centroids = x[:, train].mean(axis=1)  # [P, H]
        test = x[:, held]  # [P, q, H]
        dist = (test**2).sum(-1)[..., None] - 2 * test @ centroids.T + (centroids**2).sum(-1)
        hits[:, held] = dist.argmin(-1) == np.arange(n_personas)[:, None]
    correct, n = int(hits.sum()), hits.size
    return M3Result(
        correct=correct,
        n=n,
        accuracy=correct / n,
        wilson=wilson_ci(correct, n),
        chance=1 / n_personas,
        fold_accuracy=[float(hits[:, f].mean()) for f in folds],
        per_persona=[float(v) for v in hits.mean(axis=1)],
    )
