"""Confidence intervals and tests used across the write-ups.

Wald is what the write-ups report; Wilson is kept beside it because Wald
collapses to a zero-width interval at 0% and 100%, which is exactly where
marker rates often sit.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

Z95 = 1.959963984540054


def _check(k: int, n: int) -> None:
    if n <= 0:
        raise ValueError(f"a proportion needs n > 0 (got k={k}, n={n})")
    if not 0 <= k <= n:
        raise ValueError(f"k must lie in [0, n] (got k={k}, n={n})")


def wald_ci(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """p +- z*sqrt(p(1-p)/n), clipped to [0, 1]; zero width at p = 0 and p = 1."""
    _check(k, n)
    p = k / n
    half = z * math.sqrt(p * (1 - p) / n)
    return max(0.0, p - half), min(1.0, p + half)


def wilson_ci(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    _check(k, n)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class BootstrapCI:
    estimate: float | None  # the statistic on the observed clusters
    lo: float | None
    hi: float | None
    n_boot: int  # resamples drawn
    n_undefined: int  # resamples where the statistic was undefined (0 denominator)

    def straddles_zero(self) -> bool:
        return self.lo is not None and self.hi is not None and self.lo <= 0 <= self.hi


def cluster_bootstrap_ratio(
    numerators: Sequence[Sequence[float]],
    denominators: Sequence[Sequence[float]],
    *,
    weights: Sequence[float] | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> BootstrapCI:
    """Percentile CI of ``sum_g w_g * sum(num_g) / sum(den_g)`` under cluster resampling.

    ``numerators[g][c]`` / ``denominators[g][c]`` are per-cluster (per-question)
    counts for group ``g``; all groups share the cluster axis, and every resample
    draws one set of clusters (questions, with replacement) used by all groups.
    One group with weight 1 is a rate (num=hits, den=trials) or a conditional
    rate (num=joint, den=A firings); two groups with weights (1, -1) give the
    paired difference of two conditions over the same questions. Resamples where a
    denominator sums to 0 are undefined: dropped from the percentiles and counted.
    """
    num = np.asarray(numerators, dtype=float)
    den = np.asarray(denominators, dtype=float)
    if num.ndim != 2 or num.shape != den.shape or num.shape[1] == 0:
        raise ValueError("numerators and denominators must be equal-shaped [groups][clusters]")
    w = np.ones(num.shape[0]) if weights is None else np.asarray(weights, dtype=float)
    if w.shape != (num.shape[0],):
        raise ValueError(f"need one weight per group ({num.shape[0]}), got {w.shape}")

    def statistic(n_sum: np.ndarray, d_sum: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = np.where(d_sum > 0, n_sum / np.where(d_sum > 0, d_sum, 1), np.nan)
        return (ratio * w[:, None]).sum(axis=0)  # nan if any group is undefined

    observed = statistic(num.sum(axis=1)[:, None], den.sum(axis=1)[:, None])[0]
    rng = np.random.default_rng(seed)
    m = num.shape[1]
    idx = rng.integers(0, m, size=(n_boot, m))
    boot = statistic(num[:, idx].sum(axis=2), den[:, idx].sum(axis=2))
    ok = boot[~np.isnan(boot)]
    alpha = (1 - level) / 2
    lo, hi = (float(x) for x in np.quantile(ok, [alpha, 1 - alpha])) if ok.size else (None, None)
    return BootstrapCI(
        estimate=None if np.isnan(observed) else float(observed),
        lo=lo,
        hi=hi,
        n_boot=n_boot,
        n_undefined=int(n_boot - ok.size),
    )


@dataclass(frozen=True)
class TwoProportionTest:
    rate1: float
    rate2: float
    difference: float
    odds_ratio: float
    p_fisher: float
    p_z: float


def two_proportion_test(k1: int, n1: int, k2: int, n2: int) -> TwoProportionTest:
    """Fisher exact (two-sided) and the pooled two-proportion z test."""
    _check(k1, n1)
    _check(k2, n2)
    res = sps.fisher_exact([[k1, n1 - k1], [k2, n2 - k2]], alternative="two-sided")
    p1, p2 = k1 / n1, k2 / n2
    pooled = (k1 + k2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    p_z = 1.0 if se == 0 else float(2 * sps.norm.sf(abs(p1 - p2) / se))
    return TwoProportionTest(p1, p2, p1 - p2, float(res.statistic), float(res.pvalue), p_z)


def no_variance(k1: int, n1: int, k2: int, n2: int) -> bool:
    """True when the pooled outcome never varies (every trial a miss, or every one a hit).

    A two-proportion test has nothing to test there: Fisher's p comes out as 1 and
    the z statistic is 0/0, and neither is evidence of anything. Reports say
    "undefined (no variance)" instead of printing such a p-value.
    """
    _check(k1, n1)
    _check(k2, n2)
    return k1 + k2 in (0, n1 + n2)


@dataclass(frozen=True)
class SpearmanResult:
    rho: float
    p_exact: float  # two-sided, over all n! permutations
    n: int


def spearman_exact(x: Sequence[float], y: Sequence[float], max_n: int = 9) -> SpearmanResult:
    """Spearman's rho with an exact permutation p-value (two-sided).

    The write-ups test trends over five conditions, where the asymptotic p-value
    is meaningless; with n <= ``max_n`` every permutation is enumerated.
    """
    if len(x) != len(y) or len(x) < 3:
        raise ValueError("need two equal-length sequences of at least 3 values")
    if len(x) > max_n:
        raise ValueError(f"exact enumeration is for n <= {max_n}; got n={len(x)}")
    rx, ry = sps.rankdata(x), sps.rankdata(y)
    if np.ptp(rx) == 0 or np.ptp(ry) == 0:
        raise ValueError("Spearman's rho is undefined when one sequence is constant")
    rxc = rx - rx.mean()
    perms = np.array(list(itertools.permutations(ry - ry.mean())))
    rhos = perms @ rxc / (np.linalg.norm(rxc) * np.linalg.norm(perms, axis=1))
    rho = float(rhos[0])  # the identity permutation comes first
    p = float(np.mean(np.abs(rhos) >= abs(rho) - 1e-12))
    return SpearmanResult(rho=rho, p_exact=p, n=len(x))


def p_text(p: float) -> str:
    """A p-value the write-ups' way: the value from 1e-3 up, an order-of-magnitude bound below it.

    ``p_text(3e-47) == "p<1e-46"``; a p-value that underflows to 0 reads ``p<1e-300``.
    """
    if p >= 1e-3:
        return f"p={p:.3g}"
    return "p<1e-300" if p <= 1e-300 else f"p<1e{math.ceil(math.log10(p))}"
