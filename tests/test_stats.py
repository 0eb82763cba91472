import math

import numpy as np
import pytest
from scipy import stats as sps
from statsmodels.stats.proportion import proportion_confint

from explore_persona_space import stats as S


@pytest.mark.parametrize(
    ("k", "n"), [(0, 10), (10, 10), (1, 3), (50, 100), (260, 280), (0, 3080), (385, 3080)]
)
def test_wald_and_wilson_match_statsmodels(k, n):
    assert S.wald_ci(k, n) == pytest.approx(proportion_confint(k, n, method="normal"), abs=1e-12)
    assert S.wilson_ci(k, n) == pytest.approx(proportion_confint(k, n, method="wilson"), abs=1e-12)


def test_wald_hand_values_and_degenerate_ends():
    lo, hi = S.wald_ci(50, 100)
    assert (lo, hi) == pytest.approx((0.5 - 0.0979982, 0.5 + 0.0979982), abs=1e-6)
    assert S.wald_ci(0, 280) == (0.0, 0.0)
    assert S.wald_ci(280, 280) == (1.0, 1.0)
    lo, hi = S.wilson_ci(0, 280)  # Wilson stays informative at p = 0
    assert lo == pytest.approx(0.0, abs=1e-12) and 0.01 < hi < 0.02


def test_bad_proportions_raise():
    for k, n in [(0, 0), (5, 4), (-1, 4)]:
        with pytest.raises(ValueError):
            S.wald_ci(k, n)


def test_cluster_bootstrap_two_cluster_hand_case():
    # clusters (0/10) and (10/10): resamples are 0 (1/4), 0.5 (1/2), 1 (1/4)
    ci = S.cluster_bootstrap_ratio([[0, 10]], [[10, 10]], n_boot=4000, seed=1)
    assert ci.estimate == 0.5 and (ci.lo, ci.hi) == (0.0, 1.0) and ci.n_undefined == 0
    again = S.cluster_bootstrap_ratio([[0, 10]], [[10, 10]], n_boot=4000, seed=1)
    assert again == ci


def test_cluster_bootstrap_constant_rate_has_zero_width():
    ci = S.cluster_bootstrap_ratio([[2, 4, 6]], [[10, 20, 30]], n_boot=500, seed=0)
    assert ci.estimate == pytest.approx(0.2) and ci.lo == pytest.approx(0.2) and ci.hi == pytest.approx(0.2)


def test_cluster_bootstrap_counts_undefined_resamples():
    # conditional rate with one cluster where A never fired: P(all-undefined resample) = 1/4
    ci = S.cluster_bootstrap_ratio([[0, 3]], [[0, 4]], n_boot=8000, seed=3)
    assert ci.estimate == 0.75
    assert ci.n_undefined / 8000 == pytest.approx(0.25, abs=0.02)
    nothing = S.cluster_bootstrap_ratio([[0, 0]], [[0, 0]], n_boot=100, seed=3)
    assert nothing.estimate is None and nothing.lo is None and nothing.n_undefined == 100


def test_cluster_bootstrap_matches_scipy_percentile_bootstrap():
    rng = np.random.default_rng(0)
    den = rng.integers(5, 15, size=26)
    num = rng.binomial(den, 0.3)
    ours = S.cluster_bootstrap_ratio([num], [den], n_boot=20000, seed=5)
    ref = sps.bootstrap(
        (num, den),
        lambda n, d, axis=-1: n.sum(axis=axis) / d.sum(axis=axis),
        paired=True,
        n_resamples=20000,
        method="percentile",
        rng=np.random.default_rng(9),
    ).confidence_interval
    assert ours.lo == pytest.approx(ref.low, abs=0.01) and ours.hi == pytest.approx(ref.high, abs=0.01)


def test_cluster_bootstrap_paired_difference():
    # condition T and C share the question clusters; identical data -> difference exactly 0
    num = [[1, 2, 0, 3], [1, 2, 0, 3]]
    den = [[4, 4, 4, 4], [4, 4, 4, 4]]
    ci = S.cluster_bootstrap_ratio(num, den, weights=[1, -1], n_boot=300, seed=0)
    assert ci.estimate == 0 and ci.lo == 0 and ci.hi == 0 and ci.straddles_zero()
    shifted = S.cluster_bootstrap_ratio([[4, 4, 4, 4], num[1]], den, weights=[1, -1], n_boot=300, seed=0)
    assert shifted.estimate == pytest.approx(1 - 6 / 16) and not shifted.straddles_zero()
    with pytest.raises(ValueError, match="one weight per group"):
        S.cluster_bootstrap_ratio(num, den, weights=[1], n_boot=10)


def test_fisher_and_z_hand_case():
    res = S.two_proportion_test(3, 3, 0, 3)
    # hypergeometric: each extreme table has probability 1/C(6,3) = 1/20
    assert res.p_fisher == pytest.approx(0.1)
    assert res.difference == 1.0
    res = S.two_proportion_test(60, 100, 40, 100)
    z = 0.2 / math.sqrt(0.5 * 0.5 * (2 / 100))
    assert res.p_z == pytest.approx(2 * sps.norm.sf(z))
    assert res.p_fisher == pytest.approx(sps.fisher_exact([[60, 40], [40, 60]]).pvalue)
    assert S.two_proportion_test(0, 10, 0, 10).p_z == 1.0


def test_spearman_exact_matches_write_up_and_scipy():
    # #205: rho = -0.90 over five conditions, exact p = 0.083 (= 10/120)
    res = S.spearman_exact([1, 2, 3, 4, 5], [5, 4, 3, 1, 2])
    assert res.rho == pytest.approx(-0.9) and res.p_exact == pytest.approx(10 / 120)
    assert S.spearman_exact([1, 2, 3, 4, 5], [2, 4, 6, 8, 10]).p_exact == pytest.approx(2 / 120)
    x, y = [0.3, 0.1, 0.7, 0.2, 0.9, 0.4], [1.0, 3.0, 2.0, 5.0, 4.0, 6.0]
    res = S.spearman_exact(x, y)
    assert res.rho == pytest.approx(sps.spearmanr(x, y).statistic)
    ref = sps.permutation_test(
        (y,), lambda yy: sps.spearmanr(x, yy).statistic, permutation_type="pairings", n_resamples=np.inf
    )
    assert res.p_exact == pytest.approx(ref.pvalue)


def test_spearman_rejects_bad_input():
    with pytest.raises(ValueError, match="constant"):
        S.spearman_exact([1, 2, 3], [1, 1, 1])
    with pytest.raises(ValueError, match="n <= 9"):
        S.spearman_exact(list(range(10)), list(range(10)))


def test_p_text_reads_like_the_write_ups():
    # write-up 001: EM-first assistant leakage 127/280 against 0/280 in a control is "p<1e-46"
    assert S.p_text(S.two_proportion_test(127, 280, 0, 280).p_fisher) == "p<1e-46"
    assert S.p_text(0.0834) == "p=0.0834" and S.p_text(1.0) == "p=1"
    assert S.p_text(0.0) == "p<1e-300" and S.p_text(9e-4) == "p<1e-3"
