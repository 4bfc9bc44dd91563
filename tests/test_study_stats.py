"""The study statistics against direct scipy/statsmodels calls and textbook formulas, plus
planted-effect checks: a known effect is found, no effect is not."""
from __future__ import annotations

import gc
import math

import numpy as np
import pandas as pd
import pytest
import statsmodels.formula.api as smf
from scipy import stats
from statsmodels.stats.anova import anova_lm
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestPower
from statsmodels.stats.weightstats import ttost_ind, ttost_paired

from stratopt_ds.study.stats import (NO_TEST, PAIRED, WELCH, Rules, compare, compare_all,
                                     describe, detectable_effect, factorial_anova, holm)

RULES = Rules()
# Five seeds of a baseline and an arm whose losses move with the seed (pairing correlation ~0.97).
BASE = {0: 3.2810, 1: 3.2950, 2: 3.2710, 3: 3.3020, 4: 3.2880}
ARM = {0: 3.2700, 1: 3.2880, 2: 3.2620, 3: 3.2890, 4: 3.2800}


def arrays(a: dict, b: dict):
    seeds = sorted(set(a) & set(b))
    return np.array([a[s] for s in seeds]), np.array([b[s] for s in seeds])


def hedges_g(x: np.ndarray, y: np.ndarray) -> float:
    """Hedges' g from its definition: Cohen's d on the pooled SD times J = 1 - 3/(4N - 9)."""
    n1, n2 = len(x), len(y)
    pooled = math.sqrt(((n1 - 1) * x.var(ddof=1) + (n2 - 1) * y.var(ddof=1)) / (n1 + n2 - 2))
    return (x.mean() - y.mean()) / pooled * (1 - 3 / (4 * (n1 + n2) - 9))


def test_paired_comparison_equals_scipy_and_statsmodels():
    x, y = arrays(ARM, BASE)
    c = compare("arm", ARM, "base", BASE, RULES, alpha_per_test=0.002)
    assert c.test == PAIRED and c.n_pairs == 5
    assert c.pairing_corr == pytest.approx(np.corrcoef(x, y)[0, 1])
    ref = stats.ttest_rel(x, y)
    assert c.p == pytest.approx(ref.pvalue) and c.t == pytest.approx(ref.statistic) and c.df == 4
    d = x - y
    half = stats.t.ppf(0.995, 4) * d.std(ddof=1) / math.sqrt(5)  # the textbook 99% t interval
    assert (c.ci_low, c.ci_high) == pytest.approx((d.mean() - half, d.mean() + half))
    assert c.diff == pytest.approx(d.mean())
    assert c.hedges_g == pytest.approx(hedges_g(x, y))
    assert c.tost_p == pytest.approx(ttost_paired(x, y, -0.01, 0.01)[0])
    # At the MDD the two-sided paired t-test has 80% power, from the noncentral t written out
    # (upper tail; the lower one is below 1e-9 here).
    nc = c.mdd / d.std(ddof=1) * math.sqrt(5)
    assert stats.nct.sf(stats.t.ppf(1 - 0.002 / 2, 4), 4, nc) == pytest.approx(0.8, abs=1e-6)
    # The study anchors' simulated MDD at n=5 and 13 Holm-corrected tests: 5.11 SDs.
    assert detectable_effect(TTestPower(), 0.01 / 13, 0.8, nobs=5) == pytest.approx(5.11, abs=0.02)


def test_welch_when_pairing_correlates_weakly():
    base = {0: 3.30, 1: 3.28, 2: 3.31, 3: 3.27, 4: 3.29}
    arm = {0: 3.26, 1: 3.29, 2: 3.25, 3: 3.28, 4: 3.24}   # anti-correlated with the baseline
    c = compare("arm", arm, "base", base, RULES)
    assert c.test == WELCH and "pairing correlation" in c.test_reason and c.pairing_corr < 0.5
    x, y = np.array(list(arm.values())), np.array(list(base.values()))
    ref = stats.ttest_ind(x, y, equal_var=False)
    assert c.p == pytest.approx(ref.pvalue) and c.df == pytest.approx(ref.df)
    # Welch-Satterthwaite df and interval, written out.
    v1, v2 = x.var(ddof=1) / 5, y.var(ddof=1) / 5
    df = (v1 + v2) ** 2 / (v1 ** 2 / 4 + v2 ** 2 / 4)
    half = stats.t.ppf(0.995, df) * math.sqrt(v1 + v2)
    diff = x.mean() - y.mean()
    assert (c.ci_low, c.ci_high) == pytest.approx((diff - half, diff + half))
    assert c.tost_p == pytest.approx(ttost_ind(x, y, -0.01, 0.01, usevar="unequal")[0])
    assert c.hedges_g == pytest.approx(hedges_g(x, y))
    pooled = math.sqrt((x.var(ddof=1) + y.var(ddof=1)) / 2)
    nc = c.mdd / pooled * math.sqrt(5 / 2)   # two-sample t, 8 df, noncentral t upper tail
    assert stats.nct.sf(stats.t.ppf(1 - 0.01 / 2, 8), 8, nc) == pytest.approx(0.8, abs=1e-6)


def test_test_choice_when_seeds_do_not_match():
    arm = {0: 3.27, 1: 3.29, 7: 3.26, 8: 3.28}   # only two seeds shared with BASE
    c = compare("arm", arm, "base", BASE, RULES)
    assert c.test == WELCH and "2 shared seeds" in c.test_reason and c.n_arm == 4
    # A failed seed leaves 4 pairs: still paired, on the shared seeds, and said so.
    partial = {s: v for s, v in ARM.items() if s != 3}
    c = compare("arm", partial, "base", BASE, RULES)
    assert c.test == PAIRED and c.n_pairs == 4 and "1 unpaired" in c.test_reason
    x, y = arrays(partial, BASE)
    assert c.p == pytest.approx(stats.ttest_rel(x, y).pvalue)
    # One successful run cannot be tested at all.
    c = compare("arm", {0: 3.2}, "base", BASE, RULES)
    assert c.test == NO_TEST and c.p is None and not c.significant


def test_holm_equals_multipletests_and_the_step_down_by_hand():
    p = [0.001, 0.004, 0.03, 0.2]
    comparisons = [compare(f"a{i}", ARM, "base", BASE, RULES) for i in range(4)]
    for c, pi in zip(comparisons, p):
        c.p = pi
    holm(comparisons, 0.01)
    reject, adjusted, _, _ = multipletests(p, alpha=0.01, method="holm")
    assert [c.p_holm for c in comparisons] == pytest.approx(list(adjusted))
    # By hand: sorted p times (m - rank), made monotone: 0.004, 0.012, 0.06, 0.2.
    assert [c.p_holm for c in comparisons] == pytest.approx([0.004, 0.012, 0.06, 0.2])
    assert [c.significant for c in comparisons] == [True, False, False, False] == list(reject)


def test_untested_comparison_keeps_the_family_size():
    comparisons = [compare("a", ARM, "base", BASE, RULES),
                   compare("b", {0: 3.2}, "base", BASE, RULES)]
    comparisons[0].p = 0.006
    holm(comparisons, 0.01)
    assert comparisons[0].p_holm == pytest.approx(0.012) and not comparisons[0].significant
    assert comparisons[1].p_holm is None and not comparisons[1].significant


def planted_table(effects: dict[str, float], seeds: int = 5, sd_seed: float = 0.004,
                  sd_noise: float = 0.0015, seed: int = 1) -> dict[str, dict[int, float]]:
    """Final losses with a shared per-seed component (init + data order) and run noise."""
    rng = np.random.default_rng(seed)
    seed_effect = rng.normal(0, sd_seed, seeds)
    return {arm: {s: 3.28 + effect + seed_effect[s] + rng.normal(0, sd_noise)
                  for s in range(seeds)} for arm, effect in effects.items()}


def test_planted_effect_is_detected_and_no_effect_is_not():
    # 0.02 nats is ~13 SDs of the run noise: far above the n=5, m=3 detectable difference.
    effects = {"adamw": 0.0, "better": -0.02, "same": 0.0, "worse": 0.02}
    losses = planted_table(effects)
    result = {c.arm: c for c in compare_all(losses, "adamw", RULES)}
    assert result["better"].significant and result["better"].diff < 0
    assert result["worse"].significant and result["worse"].diff > 0
    assert result["better"].ci_high < 0 < result["worse"].ci_low
    assert not result["same"].significant and result["same"].ci_low < 0 < result["same"].ci_high
    assert all(c.test == PAIRED for c in result.values())
    # No difference, little noise: TOST declares "same" equivalent within +-0.01, not the others.
    assert result["same"].equivalent
    assert not result["better"].equivalent and not result["worse"].equivalent


def test_family_wise_error_stays_near_alpha_without_effects():
    """100 null studies of 4 comparisons: Holm keeps P(any rejection) <= 0.01, so about one
    study in 100 may reject; 5 or more would happen by chance with probability 0.003."""
    studies_with_rejection = 0
    # statsmodels' Holm branch calls gc.collect(), ~0.2 s each with torch's heap in the test
    # process; freezing the heap makes the 100 calls cheap.
    gc.freeze()
    try:
        for seed in range(100):
            losses = planted_table({"adamw": 0, "a": 0, "b": 0, "c": 0, "d": 0}, seed=100 + seed)
            studies_with_rejection += any(c.significant
                                          for c in compare_all(losses, "adamw", RULES))
    finally:
        gc.unfreeze()
    assert studies_with_rejection <= 4


def grid_rows(scaling_effect: dict[str, float], seeds: int = 3, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(seeds):
        for scaling in ("linear", "sqrt", "inverse"):
            for momentum in ("const", "depth"):
                for clip in ("global", "layer"):
                    rows.append({"loss": 3.3 + scaling_effect[scaling] + 0.003 * s
                                 + rng.normal(0, 0.002), "seed": s, "scaling": scaling,
                                 "momentum": momentum, "clip": clip})
    return rows


def test_factorial_anova_equals_statsmodels_and_finds_the_planted_factor():
    rows = grid_rows({"linear": 0.0, "sqrt": 0.0, "inverse": 0.03})
    result = factorial_anova(rows)
    ref = anova_lm(smf.ols("loss ~ C(scaling)*C(momentum)*C(clip) + C(seed)",
                           data=pd.DataFrame(rows)).fit(), typ=2)
    table = {t["term"]: t for t in result["table"]}
    assert set(table) == set(ref.index)
    for term in ref.index:
        assert table[term]["sum_sq"] == pytest.approx(ref.loc[term, "sum_sq"])
        if term != "Residual":
            assert table[term]["p"] == pytest.approx(ref.loc[term, "PR(>F)"])
            ss_res = ref.loc["Residual", "sum_sq"]
            assert table[term]["partial_eta_sq"] == pytest.approx(
                ref.loc[term, "sum_sq"] / (ref.loc[term, "sum_sq"] + ss_res))
    assert table["C(scaling)"]["p"] < 1e-6
    assert table["C(momentum)"]["p"] > 0.01 and table["C(clip)"]["p"] > 0.01
    assert table["Residual"]["df"] == 36 - 12 - 2


def test_factorial_anova_says_why_it_is_skipped():
    rows = grid_rows({"linear": 0, "sqrt": 0, "inverse": 0})
    missing = [r for r in rows if not (r["scaling"] == "sqrt" and r["clip"] == "layer")]
    assert "10 of the 12 cells" in factorial_anova(missing)["skipped"]
    one_level = [r for r in rows if r["clip"] == "global"]
    assert "only one level of clip" in factorial_anova(one_level)["skipped"]
    one_seed = [r for r in rows if r["seed"] == 0]
    assert "no residual degrees of freedom" in factorial_anova(one_seed)["skipped"]
    assert "no layer-adaptive" in factorial_anova([])["skipped"]


def test_describe_cell():
    d = describe([3.0, 3.2, 3.1])
    assert d.cell() == "3.1000 ± 0.1000 (3)" and d.median == pytest.approx(3.1)
    assert describe([]).cell() == "– (0)" and describe([3.0]).cell() == "3.0000 ± n/a (1)"
