"""The study's statistics, each one a call into scipy or statsmodels (nothing re-derived here).

Per size, every arm is compared with the baseline on the final validation loss:

* **test**: a paired t-test on the per-seed differences (``scipy.stats.ttest_rel``) when the arms
  share at least 3 seeds and the seed pairing correlates (Pearson r >= the plan's
  ``welch_below_pairing_corr``, 0.5 by default). Otherwise Welch's t-test on all runs
  (``ttest_ind(equal_var=False)``): pairing only pays for its halved degrees of freedom when the
  seeds' losses move together. The rule is fixed before any data is seen; the report names the
  test and the reason for every comparison.
* **multiplicity**: Holm over the size's comparisons at FWER ``alpha`` (``multipletests``).
* **effect**: the mean difference (arm - baseline) with the t interval of that test at
  ``ci_level``, and Hedges' g (``effectsize_smd``: the difference over the pooled between-run SD,
  bias-corrected), the same definition for both tests so that g is comparable across arms.
* **equivalence**: TOST against +-``equivalence_margin`` (``ttost_paired`` / ``ttost_ind``).
* **power**: the minimum detectable difference at ``power`` for the observed SD (of the
  differences, or pooled) and alpha / m, the threshold Holm's first step applies.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np
from scipy import stats
from statsmodels.stats.meta_analysis import effectsize_smd
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestIndPower, TTestPower
from statsmodels.stats.weightstats import ttost_ind, ttost_paired

PAIRED, WELCH, NO_TEST = "paired t", "Welch t", "none"
MIN_PAIRS = 3  # a correlation of 2 points is always +-1


@dataclass
class Rules:
    """The pre-declared analysis; the plan's ``analysis`` section."""
    alpha: float = 0.01
    ci_level: float = 0.99
    equivalence_margin: float = 0.01
    welch_below_pairing_corr: float = 0.5
    power: float = 0.8


@dataclass
class Describe:
    n: int
    mean: Optional[float]
    std: Optional[float]       # sample SD (ddof=1)
    median: Optional[float]

    def cell(self, digits: int = 4) -> str:
        """'mean ± std (n)', the headline table's cell."""
        if self.n == 0:
            return "– (0)"
        std = "n/a" if self.std is None else f"{self.std:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {std} ({self.n})"


def describe(values) -> Describe:
    x = np.asarray(list(values), dtype=float)
    if len(x) == 0:
        return Describe(0, None, None, None)
    return Describe(len(x), float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else None,
                    float(np.median(x)))


@dataclass
class Comparison:
    arm: str
    baseline: str
    n_arm: int
    n_baseline: int
    n_pairs: int
    pairing_corr: Optional[float]
    test: str                       # PAIRED, WELCH or NO_TEST
    test_reason: str
    diff: Optional[float] = None    # mean(arm) - mean(baseline); over pairs for the paired test
    ci_low: Optional[float] = None
    ci_high: Optional[float] = None
    df: Optional[float] = None
    t: Optional[float] = None
    p: Optional[float] = None
    p_holm: Optional[float] = None
    significant: bool = False
    hedges_g: Optional[float] = None
    tost_p: Optional[float] = None
    equivalent: bool = False
    sd: Optional[float] = None      # SD the test works with: of the differences, or pooled
    mdd: Optional[float] = None     # minimum detectable |difference| at the Holm alpha / m

    def to_dict(self) -> dict[str, Any]:
        return {k: clean(v) for k, v in asdict(self).items()}


def clean(x: Any) -> Any:
    """NaN/inf -> None and numpy scalars -> Python (JSON has neither)."""
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def choose_test(arm: dict[int, float], base: dict[int, float],
                rules: Rules) -> tuple[str, str, Optional[float]]:
    """(test, reason, pairing correlation) by the pre-declared rule."""
    common = sorted(set(arm) & set(base))
    if len(arm) < 2 or len(base) < 2:
        return NO_TEST, f"too few successful runs ({len(arm)} vs {len(base)}; need 2 each)", None
    if len(common) < MIN_PAIRS:
        return WELCH, f"only {len(common)} shared seeds (paired test needs {MIN_PAIRS})", None
    a, b = [arm[s] for s in common], [base[s] for s in common]
    if np.std(a) == 0 or np.std(b) == 0:
        return WELCH, "no seed-to-seed variation to pair on", None
    r = float(stats.pearsonr(a, b).statistic)
    threshold = rules.welch_below_pairing_corr
    if r < threshold:
        return WELCH, f"pairing correlation r={r:.3f} < {threshold}", r
    unpaired = len(arm) + len(base) - 2 * len(common)
    note = f"; {unpaired} unpaired run(s) left out" if unpaired else ""
    return PAIRED, f"r={r:.3f} >= {threshold} over {len(common)} seeds{note}", r


def compare(arm_name: str, arm: dict[int, float], base_name: str, base: dict[int, float],
            rules: Rules, alpha_per_test: Optional[float] = None) -> Comparison:
    """One arm against the baseline: seed -> final loss for each (successful runs only)."""
    test, reason, r = choose_test(arm, base, rules)
    common = sorted(set(arm) & set(base))
    c = Comparison(arm_name, base_name, len(arm), len(base), len(common) if test == PAIRED else 0,
                   r, test, reason)
    if test == NO_TEST:
        return c
    alpha_per_test = rules.alpha if alpha_per_test is None else alpha_per_test
    m = rules.equivalence_margin
    x_all, y_all = np.array(list(arm.values())), np.array(list(base.values()))
    with np.errstate(divide="ignore", invalid="ignore"):  # zero spread: NaN/inf, reported as n/a
        c.hedges_g = effectsize_smd(x_all.mean(), x_all.std(ddof=1), len(x_all),
                                    y_all.mean(), y_all.std(ddof=1), len(y_all))[0]
        if test == PAIRED:
            x, y = np.array([arm[s] for s in common]), np.array([base[s] for s in common])
            res = stats.ttest_rel(x, y)
            c.diff, c.sd = float((x - y).mean()), float((x - y).std(ddof=1))
            c.tost_p = ttost_paired(x, y, -m, m)[0]
            effect = detectable_effect(TTestPower(), alpha_per_test, rules.power, nobs=len(x))
        else:
            x, y = x_all, y_all
            res = stats.ttest_ind(x, y, equal_var=False)
            c.diff = float(x.mean() - y.mean())
            c.sd = float(np.sqrt(((len(x) - 1) * x.var(ddof=1) + (len(y) - 1) * y.var(ddof=1))
                                 / (len(x) + len(y) - 2)))
            c.tost_p = ttost_ind(x, y, -m, m, usevar="unequal")[0]
            effect = detectable_effect(TTestIndPower(), alpha_per_test, rules.power,
                                       nobs1=len(x), ratio=len(y) / len(x))
        ci = res.confidence_interval(confidence_level=rules.ci_level)
    c.t, c.p, c.df = float(res.statistic), float(res.pvalue), float(res.df)
    c.ci_low, c.ci_high = float(ci.low), float(ci.high)
    c.equivalent = bool(math.isfinite(c.tost_p) and c.tost_p < rules.alpha)
    c.mdd = float(effect) * c.sd
    return c


def detectable_effect(power_model, alpha: float, power: float, **nobs) -> float:
    """The standardized effect a two-sided test at ``alpha`` detects with ``power``.

    Solved one-sided at alpha/2: scipy's noncentral-t CDF returns NaN far in the lower tail (at
    n=5 and alpha ~1e-3), which makes statsmodels' two-sided power NaN and its solver return a
    wrong effect without a warning. The lower tail adds < 1e-9 of power here, so the one-sided
    solve is the two-sided answer.
    """
    return float(power_model.solve_power(alpha=alpha / 2, power=power, alternative="larger",
                                         **nobs))


def compare_all(losses: dict[str, dict[int, float]], baseline: str,
                rules: Rules) -> list[Comparison]:
    """Every arm against the baseline at one size, Holm-corrected as one family."""
    arms = [a for a in losses if a != baseline]
    alpha_first = rules.alpha / max(1, len(arms))  # the bar Holm sets for the smallest p
    comparisons = [compare(a, losses[a], baseline, losses[baseline], rules, alpha_first)
                   for a in arms]
    holm(comparisons, rules.alpha)
    return comparisons


def holm(comparisons: list[Comparison], alpha: float) -> None:
    """Holm step-down over the comparisons that have a p-value (a missing test is never
    significant, but counts in the family so that it cannot make the others easier)."""
    tested = [c for c in comparisons if c.p is not None and math.isfinite(c.p)]
    if not tested:
        return
    # Untested comparisons enter as p = 1: they keep the family size m honest.
    pvals = [c.p for c in tested] + [1.0] * (len(comparisons) - len(tested))
    reject, adjusted, _, _ = multipletests(pvals, alpha=alpha, method="holm")
    for c, rej, adj in zip(tested, reject, adjusted):
        c.p_holm, c.significant = float(adj), bool(rej)


# ------------------------------------------------------------------------------------------------
# The factorial model of the layer-adaptive grid

FACTORS = ("scaling", "momentum", "clip")


def factorial_anova(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """OLS ``loss ~ C(scaling)*C(momentum)*C(clip) + C(seed)`` with a type-II ANOVA table.

    rows: {"loss", "scaling", "momentum", "clip", "seed"} per successful run. Returns
    {"table": [...]} or {"skipped": reason} when the grid cannot estimate the model.
    """
    import pandas as pd
    import statsmodels.formula.api as smf
    from statsmodels.stats.anova import anova_lm

    if not rows:
        return {"skipped": "no layer-adaptive (la-*) runs finished"}
    frame = pd.DataFrame(rows)
    levels = {f: sorted(frame[f].unique()) for f in FACTORS}
    single = [f"{f} ({levels[f][0]})" for f in FACTORS if len(levels[f]) < 2]
    if single:
        return {"skipped": f"every factor needs >= 2 levels; only one level of {', '.join(single)}"}
    cells = frame.groupby(list(FACTORS)).size()
    n_cells = math.prod(len(v) for v in levels.values())
    if len(cells) < n_cells:
        return {"skipped": f"{len(cells)} of the {n_cells} cells of "
                           f"{' x '.join(f'{f}{levels[f]}' for f in FACTORS)} have runs; the "
                           f"interactions are not estimable"}
    seeds = frame["seed"].nunique()
    formula = "loss ~ C(scaling)*C(momentum)*C(clip)" + (" + C(seed)" if seeds > 1 else "")
    fit = smf.ols(formula, data=frame).fit()
    if fit.df_resid < 1:
        return {"skipped": f"no residual degrees of freedom ({len(frame)} runs for "
                           f"{int(fit.df_model) + 1} parameters): need >= 2 seeds per cell"}
    table = anova_lm(fit, typ=2)
    ss_resid = float(table.loc["Residual", "sum_sq"])
    out = []
    for term, row in table.iterrows():
        entry = {"term": term, "df": row["df"], "sum_sq": row["sum_sq"], "F": row.get("F"),
                 "p": row.get("PR(>F)")}
        if term != "Residual":
            entry["partial_eta_sq"] = row["sum_sq"] / (row["sum_sq"] + ss_resid)
        out.append({k: clean(v) for k, v in entry.items()})
    return {"formula": formula, "n": len(frame), "table": out}


def residual_normality(comparisons: list[Comparison],
                       losses: dict[str, dict[int, float]]) -> Optional[dict]:
    """Shapiro-Wilk on the pooled centred paired differences (t-tests assume rough normality;
    a spike-prone arm shows up here). None when there are fewer than 3 residuals."""
    residuals = []
    for c in comparisons:
        if c.test != PAIRED:
            continue
        arm, base = losses[c.arm], losses[c.baseline]
        d = np.array([arm[s] - base[s] for s in sorted(set(arm) & set(base))])
        residuals.extend(d - d.mean())
    if len(residuals) < 3 or np.ptp(residuals) == 0:
        return None
    res = stats.shapiro(residuals)
    return {"n": len(residuals), "W": clean(res.statistic), "p": clean(res.pvalue)}
