"""Paired comparison of models on the same cases: Wilcoxon signed-rank, bootstrap CI, Holm.

Input is the long per-case metrics table (``metrics_per_case.csv``): one row per case x model x
class with columns ``case_id``, a model column (``architecture`` by default), ``class`` and metric
columns (``dice``, ``hd95_mm``, ``nsd``, ...). Values may be NaN (both masks empty) or ``inf``
(HD95 of a miss).

Conventions
-----------
Pairing
    A pair of models is compared on the cases where BOTH have a finite value of the metric for the
    class; cases present for one model only, NaN and ``inf`` are left out: ``n_excluded`` counts
    the cases of the class (a row for any model) not used by the pair. Excluding ``inf`` flatters
    a model that misses, so the pair's warning says so.
Difference
    ``a - b`` per case, in the metric's unit (Dice: unitless, HD95: mm); ``mean_difference`` is
    its mean. Pairs are the unordered model pairs in first-seen order of the model column
    (``itertools.combinations``), so ``a`` is the model seen first.
Test
    Two-sided paired Wilcoxon signed-rank test, ``scipy.stats.wilcoxon(differences)`` with
    SciPy's defaults: ``zero_method="wilcox"`` (zero differences are dropped, ``n_nonzero``
    counts the rest) and ``method="auto"`` (exact null distribution for up to 50 pairs without
    ties or zeros, a permutation test for up to 13 pairs with ties or zeros, else the normal
    approximation with continuity correction). With no non-zero difference (identical models, or
    no common case) no test is run: statistic and p-value are NaN and the warning says why.
Small n
    With ``n`` non-zero differences the smallest attainable exact two-sided p is ``2 / 2**n``. If
    that is above ``alpha`` (``n <= 5`` at 0.05) no difference can reach significance and the
    warning says so; fewer than 2 common cases also gets a warning.
Multiplicity
    Holm step-down adjustment over all pairs of one table (:func:`holm_adjust`); pairs without a
    p-value do not count in the family. ``significant`` is ``p_holm < alpha``.
Confidence interval
    Percentile bootstrap of the mean difference over cases (:func:`bootstrap_mean_ci`); it is
    NOT adjusted for multiplicity.
Verdict
    ``"<better> better than <worse>"`` when significant, otherwise ``"not significantly
    different"``. The direction is the test's: the sign whose differences carry the larger
    signed-rank sum, read with ``higher_is_better``. If the mean difference points the other way
    (a few large differences), or its CI includes 0, the warning says so.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

NOT_DIFFERENT = "not significantly different"

COLUMNS = [
    "model_a", "model_b", "metric", "class", "n_cases", "n_nonzero", "n_excluded",
    "mean_a", "mean_b", "mean_difference", "median_difference", "ci_low", "ci_high",
    "wilcoxon_statistic", "p_value", "p_holm", "significant", "verdict", "warning",
    "higher_is_better", "confidence", "alpha", "n_bootstrap", "seed",
]
"""Columns of :func:`compare_pairs`, in order."""


def bootstrap_mean_ci(differences: np.ndarray, n_bootstrap: int = 10000, confidence: float = 0.95,
                      seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of paired differences.

    Resampling, exactly (so it can be recomputed by hand)::

        rng = np.random.default_rng(seed)
        idx = rng.integers(0, n, size=(n_bootstrap, n))   # cases drawn with replacement
        means = differences[idx].mean(axis=1)             # one mean per resample
        low, high = np.quantile(means, [(1 - confidence) / 2, 1 - (1 - confidence) / 2])

    Args:
        differences: per-case paired differences, shape (n,), finite, in the metric's unit.
        n_bootstrap: number of resamples (>= 1).
        confidence: coverage of the interval, in (0, 1).
        seed: seed of ``np.random.default_rng``.

    Returns:
        ``(low, high)`` in the metric's unit; ``(nan, nan)`` when ``n == 0``.
    """
    d = np.asarray(differences, dtype=np.float64).ravel()
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be >= 1, got {n_bootstrap}")
    if not np.all(np.isfinite(d)):
        raise ValueError("differences must be finite; drop NaN/inf cases before the bootstrap")
    n = d.size
    if n == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_bootstrap, n))
    means = d[idx].mean(axis=1)
    low, high = np.quantile(means, [(1.0 - confidence) / 2.0, 1.0 - (1.0 - confidence) / 2.0])
    return float(low), float(high)


def holm_adjust(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm step-down adjusted p-values, in the input order.

    With the ``m`` non-NaN p-values sorted ascending, ``p_(1) <= ... <= p_(m)``, the adjusted
    value is ``max_{j <= i} min(1, (m - j + 1) * p_(j))`` (monotone, capped at 1). NaN entries stay
    NaN and do not count in ``m``.

    Args:
        p_values: shape (k,), values in [0, 1] or NaN.

    Returns:
        Float array of shape (k,).
    """
    p = np.asarray(p_values, dtype=np.float64).ravel()
    adjusted = np.full(p.shape, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    m = valid.size
    if m == 0:
        return adjusted
    order = valid[np.argsort(p[valid], kind="stable")]
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adjusted[order] = np.maximum.accumulate(scaled)
    return adjusted


def _first_seen(values: pd.Series) -> list:
    return list(dict.fromkeys(values.tolist()))


def paired_table(metrics_per_case: pd.DataFrame, metric: str, class_name: str,
                 model_column: str = "architecture") -> pd.DataFrame:
    """Wide table of one metric for one class: one row per case, one column per model.

    Args:
        metrics_per_case: long table with columns ``case_id``, ``model_column``, ``class`` and
            ``metric``; at most one row per (case, model, class).
        metric: metric column, e.g. ``"dice"`` or ``"hd95_mm"``.
        class_name: value of ``class``, e.g. ``"pancreas"``.
        model_column: column naming the model (``architecture``, or a CV configuration).

    Returns:
        Float DataFrame (cases x models), index ``case_id`` (first-seen order), columns every model
        of ``model_column`` in the whole table (first-seen order), values as given (NaN/``inf``
        kept); NaN where a model has no row for a case, all-NaN for a model without this class.
    """
    missing = {"case_id", model_column, "class", metric} - set(metrics_per_case.columns)
    if missing:
        raise KeyError(f"metrics_per_case lacks columns {sorted(missing)}")
    models = _first_seen(metrics_per_case[model_column])
    rows = metrics_per_case[metrics_per_case["class"] == class_name]
    duplicated = rows.duplicated(["case_id", model_column])
    if duplicated.any():
        first = rows.loc[duplicated, ["case_id", model_column]].iloc[0].tolist()
        raise ValueError(f"several rows for (case_id, {model_column}) = {tuple(first)} in class {class_name!r}")
    wide = rows.pivot(index="case_id", columns=model_column, values=metric)
    wide = wide.reindex(index=_first_seen(rows["case_id"]), columns=models).astype(np.float64)
    wide.columns.name = model_column
    return wide


def _smallest_exact_p(n_nonzero: int) -> float:
    """Smallest attainable exact two-sided Wilcoxon signed-rank p with ``n_nonzero`` pairs."""
    return min(1.0, 2.0 / 2.0 ** n_nonzero)


def _rank_sign(differences: np.ndarray) -> int:
    """+1 if the positive differences carry the larger signed-rank sum (``a`` tends higher), -1 if
    the negative ones do, 0 on a tie or without non-zero differences (Wilcoxon's ranking: zeros
    dropped, average ranks of ``|d|``)."""
    nonzero = differences[differences != 0]
    ranks = stats.rankdata(np.abs(nonzero))
    return int(np.sign(ranks[nonzero > 0].sum() - ranks[nonzero < 0].sum()))


def _pair_warnings(n_cases: int, n_nonzero: int, n_inf_excluded: int, alpha: float) -> list[str]:
    """Warnings that depend on the pair's data only (not on the test's outcome)."""
    notes: list[str] = []
    if n_cases == 0:
        notes.append("no common case with a finite value for both models: nothing to compare")
    elif n_cases < 2:
        notes.append(f"only {n_cases} common case: too few to conclude anything")
    if n_cases > 0 and n_nonzero == 0:
        notes.append(f"all {n_cases} paired differences are zero: no test (p = NaN)")
    elif n_cases > 0 and _smallest_exact_p(n_nonzero) > alpha:
        notes.append(f"with {n_nonzero} non-zero paired differences the smallest attainable two-sided "
                     f"Wilcoxon p is 2/2^{n_nonzero} = {_smallest_exact_p(n_nonzero):.3g} > alpha = "
                     f"{alpha:g}: no difference can reach significance with this n")
    if n_inf_excluded:
        notes.append(f"{n_inf_excluded} case(s) excluded where a value is infinite (a miss): the means "
                     "over finite cases flatter the model that misses")
    return notes


def compare_pairs(metrics_per_case: pd.DataFrame, metric: str = "dice", class_name: str = "pancreas",
                  model_column: str = "architecture", higher_is_better: bool = True,
                  n_bootstrap: int = 10000, confidence: float = 0.95, alpha: float = 0.05,
                  seed: int = 0) -> pd.DataFrame:
    """Paired comparison of every pair of models on one metric and class (see module docstring).

    Args:
        metrics_per_case: long per-case table (see :func:`paired_table`).
        metric: metric column; ``class_name``: class compared; ``model_column``: model column.
        higher_is_better: True for Dice/NSD, False for HD95 (mm); sets the verdict's direction.
        n_bootstrap, confidence, seed: bootstrap CI settings (:func:`bootstrap_mean_ci`).
        alpha: family-wise significance level applied to the Holm-adjusted p-values.

    Returns:
        One row per unordered model pair (first-seen order), columns :data:`COLUMNS`: ``n_cases``
        common finite cases, ``n_nonzero`` of them with a non-zero difference, ``n_excluded``
        cases of this class (a row for any model) left out of this pair; ``mean_a``, ``mean_b`` over
        the common cases; ``mean_difference`` / ``median_difference`` of ``a - b``;
        ``ci_low``, ``ci_high`` bootstrap CI of the mean difference; ``wilcoxon_statistic``
        (SciPy's two-sided statistic, the smaller signed-rank sum), ``p_value``, ``p_holm``
        (NaN when no test was possible), ``significant`` (bool), ``verdict``, ``warning`` (empty
        or sentences separated by "; "), and the settings used.
    """
    wide = paired_table(metrics_per_case, metric, class_name, model_column)
    rows, pair_notes, rank_signs = [], [], []
    for model_a, model_b in itertools.combinations(wide.columns, 2):
        a = wide[model_a].to_numpy()
        b = wide[model_b].to_numpy()
        both = np.isfinite(a) & np.isfinite(b)
        n_inf_excluded = int(np.count_nonzero(~both & (np.isinf(a) | np.isinf(b))))
        d = a[both] - b[both]
        n_cases, n_nonzero = int(d.size), int(np.count_nonzero(d))
        nan = float("nan")
        if n_nonzero:
            result = stats.wilcoxon(d)
            statistic, p_value = float(result.statistic), float(result.pvalue)
        else:
            statistic, p_value = nan, nan
        rank_signs.append(_rank_sign(d))
        ci_low, ci_high = bootstrap_mean_ci(d, n_bootstrap, confidence, seed)
        rows.append({
            "model_a": model_a, "model_b": model_b, "metric": metric, "class": class_name,
            "n_cases": n_cases, "n_nonzero": n_nonzero,
            "n_excluded": len(wide) - n_cases,
            "mean_a": float(a[both].mean()) if n_cases else nan,
            "mean_b": float(b[both].mean()) if n_cases else nan,
            "mean_difference": float(d.mean()) if n_cases else nan,
            "median_difference": float(np.median(d)) if n_cases else nan,
            "ci_low": ci_low, "ci_high": ci_high,
            "wilcoxon_statistic": statistic, "p_value": p_value,
        })
        pair_notes.append(_pair_warnings(n_cases, n_nonzero, n_inf_excluded, alpha))
    table = pd.DataFrame(rows, columns=COLUMNS[:15])
    table["p_holm"] = holm_adjust(table["p_value"].to_numpy(dtype=float))
    table["significant"] = (table["p_holm"] < alpha).astype(bool)
    verdicts, warnings = [], []
    for row, notes, rank_sign in zip(table.itertuples(index=False), pair_notes, rank_signs, strict=True):
        verdict = NOT_DIFFERENT
        if row.significant:
            a_better = (rank_sign > 0) == higher_is_better
            better, worse = (row.model_a, row.model_b) if a_better else (row.model_b, row.model_a)
            verdict = f"{better} better than {worse}"
            if np.sign(row.mean_difference) != rank_sign:
                notes.append("the signed ranks and the mean difference point in opposite directions "
                             "(a few cases dominate the mean): inspect the per-case differences")
            elif row.ci_low <= 0.0 <= row.ci_high:
                notes.append("significant by ranks but the bootstrap CI of the mean difference "
                             "includes 0")
        verdicts.append(verdict)
        warnings.append("; ".join(notes))
    table["verdict"] = verdicts
    table["warning"] = warnings
    table["higher_is_better"] = bool(higher_is_better)
    table["confidence"] = float(confidence)
    table["alpha"] = float(alpha)
    table["n_bootstrap"] = int(n_bootstrap)
    table["seed"] = int(seed)
    return table[COLUMNS].reset_index(drop=True)


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _p(value: float) -> str:
    if not np.isfinite(value):
        return "n/a"
    return f"{value:.2e}" if value < 1e-3 else f"{value:.3f}"


def comparison_markdown(table: pd.DataFrame) -> str:
    """Markdown table of a :func:`compare_pairs` result plus a one-line legend.

    One row per pair: models, ``n`` (common cases), means, mean difference ``a - b`` with its CI,
    Wilcoxon p, Holm p, verdict and warning (``-`` when none).
    """
    header = ["model a", "model b", "n", "mean a", "mean b", "mean diff (a − b) [CI]",
              "p (Wilcoxon)", "p (Holm)", "verdict", "warning"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table.itertuples(index=False):
        diff = ("n/a" if not np.isfinite(row.mean_difference) else
                f"{row.mean_difference:+.3f} [{row.ci_low:+.3f}, {row.ci_high:+.3f}]")
        means = [("n/a" if not np.isfinite(v) else f"{v:.3f}") for v in (row.mean_a, row.mean_b)]
        verdict = f"**{row.verdict}**" if row.significant else row.verdict
        cells = [row.model_a, row.model_b, row.n_cases, *means, diff, _p(row.p_value),
                 _p(row.p_holm), verdict, row.warning or "-"]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    if table.empty:
        lines.append("| " + " | ".join(["-"] * len(header)) + " |")
        title = "No pair of models to compare."
    else:
        first = table.iloc[0]
        direction = "higher" if first["higher_is_better"] else "lower"
        title = (f"Paired comparison of `{first['metric']}` ({first['class']}, {direction} is better) "
                 f"over the cases where both models have a finite value.")
        conf, alpha, n_boot = first["confidence"], first["alpha"], first["n_bootstrap"]
    legend = ("Legend: p = two-sided paired Wilcoxon signed-rank test (scipy, zero differences "
              "dropped); Holm = Holm step-down adjustment over all pairs of this table, significant "
              f"if below alpha = {alpha:g}; CI = {conf:.0%} percentile bootstrap of the mean "
              f"difference over cases ({n_boot} resamples), not adjusted for multiplicity."
              if not table.empty else
              "Legend: p = two-sided paired Wilcoxon signed-rank test; Holm = Holm-adjusted p; "
              "CI = percentile bootstrap of the mean difference.")
    return "\n".join([title, "", *lines, "", legend]) + "\n"


def paired_comparisons(metrics_per_case: pd.DataFrame, statistics: Mapping[str, Any]) -> tuple[pd.DataFrame, str]:
    """Paired tests of every two models on the same cases, for each configured (metric, class).

    For each entry of ``statistics["comparisons"]`` (``metric``, ``class``, optional
    ``higher_is_better``): :func:`compare_pairs` over the ``architecture`` column with the
    bootstrap and test settings of ``statistics``. Returns the tables of all entries in one frame
    and their markdown (a section per entry).
    """
    tables, sections = [], []
    for entry in statistics["comparisons"]:
        table = compare_pairs(metrics_per_case, metric=entry["metric"], class_name=entry["class"],
                              model_column="architecture", higher_is_better=bool(entry.get("higher_is_better", True)),
                              n_bootstrap=int(statistics["n_bootstrap"]), confidence=float(statistics["confidence"]),
                              alpha=float(statistics["alpha"]), seed=int(statistics["seed"]))
        tables.append(table)
        sections.append(f"### {entry['metric']}, {entry['class']}\n\n{comparison_markdown(table)}")
    return pd.concat(tables, ignore_index=True), "\n\n".join(sections) + "\n"
