"""Tests of the paired model comparison: Wilcoxon vs SciPy, bootstrap by hand, Holm, pairing, plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.container import ErrorbarContainer
from matplotlib.figure import Figure
from scipy import stats

from pancreas_seg.evaluation.plots import plot_paired_differences
from pancreas_seg.evaluation.statistics import (
    COLUMNS,
    NOT_DIFFERENT,
    bootstrap_mean_ci,
    compare_pairs,
    comparison_markdown,
    holm_adjust,
    paired_table,
)


def _long(values: dict[str, np.ndarray], metric: str = "dice", class_name: str = "pancreas",
          model_column: str = "architecture", prefix: str = "c") -> pd.DataFrame:
    """Long per-case table from model -> per-case values (case i is ``{prefix}{i:03d}``)."""
    rows = [{"case_id": f"{prefix}{i:03d}", model_column: model, "class": class_name, metric: float(v)}
            for model, vals in values.items() for i, v in enumerate(vals)]
    return pd.DataFrame(rows)


def _three_models(n: int = 20, seed: int = 1) -> pd.DataFrame:
    """unet = fcn + 0.1 (+ small noise); vnet2d = fcn + pure noise."""
    rng = np.random.default_rng(seed)
    fcn = rng.uniform(0.55, 0.75, n)
    return _long({"unet": fcn + 0.1 + rng.normal(0, 0.02, n), "fcn": fcn,
                  "vnet2d": fcn + rng.normal(0, 0.02, n)})


# --------------------------------------------------------------------------- bootstrap
def test_bootstrap_matches_hand_computation_and_covers_the_mean() -> None:
    d = np.random.default_rng(3).normal(0.05, 0.1, 30)
    low, high = bootstrap_mean_ci(d, n_bootstrap=2000, confidence=0.9, seed=7)
    # independent recomputation: draw every resample's case indices row by row from the same stream
    rng = np.random.default_rng(7)
    draws = rng.integers(0, 30, size=2000 * 30).reshape(2000, 30)
    means = np.array([np.mean([d[j] for j in row]) for row in draws])
    expected = np.quantile(means, [0.05, 0.95])
    assert (low, high) == pytest.approx(tuple(expected), abs=1e-12)
    assert low < d.mean() < high

    constant = np.full(12, 0.25)
    assert bootstrap_mean_ci(constant, 500) == pytest.approx((0.25, 0.25))
    assert np.isnan(bootstrap_mean_ci(np.array([]))).all()
    with pytest.raises(ValueError, match="finite"):
        bootstrap_mean_ci(np.array([0.1, np.nan]))
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_mean_ci(d, confidence=1.0)


def test_bootstrap_coverage_of_a_known_mean() -> None:
    """~95% of intervals from N(0.1, 0.1) samples of 40 cover 0.1 (loose bounds, 200 replicates)."""
    rng = np.random.default_rng(11)
    covered = 0
    for seed in range(200):
        low, high = bootstrap_mean_ci(rng.normal(0.1, 0.1, 40), n_bootstrap=1000, seed=seed)
        covered += low <= 0.1 <= high
    assert 0.88 <= covered / 200 <= 0.99


# --------------------------------------------------------------------------- Holm
def test_holm_hand_example() -> None:
    np.testing.assert_allclose(holm_adjust([0.01, 0.04, 0.03]), [0.03, 0.06, 0.06])
    # capped at 1, monotone in the sorted order, NaN kept and not counted (m = 3 here)
    adjusted = holm_adjust([0.5, np.nan, 0.001, 0.4])
    np.testing.assert_allclose(adjusted, [0.8, np.nan, 0.003, 0.8])
    np.testing.assert_allclose(holm_adjust([0.9, 0.8]), [1.0, 1.0])
    assert holm_adjust([]).shape == (0,)
    assert np.isnan(holm_adjust([np.nan, np.nan])).all()


# --------------------------------------------------------------------------- Wilcoxon and pairing
def test_wilcoxon_equals_scipy_on_the_paired_vectors() -> None:
    metrics = _three_models()
    table = compare_pairs(metrics, n_bootstrap=500)
    assert list(table.columns) == COLUMNS
    wide = paired_table(metrics, "dice", "pancreas")
    for row in table.itertuples(index=False):
        expected = stats.wilcoxon(wide[row.model_a].to_numpy(), wide[row.model_b].to_numpy())
        assert row.wilcoxon_statistic == pytest.approx(float(expected.statistic))
        assert row.p_value == pytest.approx(float(expected.pvalue), rel=1e-12)
    np.testing.assert_allclose(table["p_holm"], holm_adjust(table["p_value"]))


def test_pairs_order_direction_and_verdict() -> None:
    table = compare_pairs(_three_models(), n_bootstrap=2000)
    assert list(zip(table.model_a, table.model_b, strict=True)) == [
        ("unet", "fcn"), ("unet", "vnet2d"), ("fcn", "vnet2d")]
    unet_fcn = table.iloc[0]
    assert unet_fcn.n_cases == 20
    assert unet_fcn.mean_difference == pytest.approx(unet_fcn.mean_a - unet_fcn.mean_b)
    assert 0.08 < unet_fcn.mean_difference < 0.12
    assert 0 < unet_fcn.ci_low < unet_fcn.mean_difference < unet_fcn.ci_high
    assert unet_fcn.significant and unet_fcn.verdict == "unet better than fcn"
    assert unet_fcn.warning == ""
    # fcn vs vnet2d: noise only
    assert table.iloc[2].verdict == NOT_DIFFERENT and not table.iloc[2].significant


def test_pairing_excludes_one_sided_cases_nan_and_inf() -> None:
    rng = np.random.default_rng(5)
    base = rng.uniform(10, 20, 25)
    metrics = _long({"unet": base - 3 + rng.normal(0, 0.3, 25), "fcn": base}, metric="hd95_mm")
    unet = metrics["architecture"] == "unet"
    metrics.loc[unet & (metrics.case_id == "c000"), "hd95_mm"] = np.nan
    metrics.loc[unet & (metrics.case_id == "c001"), "hd95_mm"] = np.inf
    metrics.loc[~unet & (metrics.case_id == "c002"), "hd95_mm"] = np.inf
    extra = pd.DataFrame([{"case_id": "only_fcn", "architecture": "fcn", "class": "pancreas", "hd95_mm": 4.0},
                          {"case_id": "c000", "architecture": "unet", "class": "tumour", "hd95_mm": 1.0}])
    metrics = pd.concat([metrics, extra], ignore_index=True)

    wide = paired_table(metrics, "hd95_mm", "pancreas")
    assert wide.shape == (26, 2) and np.isnan(wide.loc["only_fcn", "unet"])
    table = compare_pairs(metrics, metric="hd95_mm", higher_is_better=False, n_bootstrap=500)
    row = table.iloc[0]
    assert (row.model_a, row.model_b, row.n_cases, row.n_excluded) == ("unet", "fcn", 22, 4)
    keep = [f"c{i:03d}" for i in range(3, 25)]
    d = wide.loc[keep, "unet"].to_numpy() - wide.loc[keep, "fcn"].to_numpy()
    assert row.mean_difference == pytest.approx(d.mean())
    assert row.p_value == pytest.approx(float(stats.wilcoxon(d).pvalue))
    assert row.mean_difference < 0
    # lower HD95 is better: unet (smaller) wins
    assert row.significant and row.verdict == "unet better than fcn"
    assert "2 case(s) excluded where a value is infinite" in row.warning
    # the same numbers with higher_is_better=True flip the verdict
    flipped = compare_pairs(metrics, metric="hd95_mm", higher_is_better=True, n_bootstrap=500).iloc[0]
    assert flipped.verdict == "fcn better than unet"


def test_verdict_follows_the_ranks_and_warns_when_the_mean_disagrees() -> None:
    """14 cases where unet is slightly better, one where it fails badly: ranks favour unet, mean fcn."""
    fcn = np.linspace(0.6, 0.8, 15)
    unet = fcn + np.r_[np.linspace(0.01, 0.03, 14), -0.5]
    row = compare_pairs(_long({"unet": unet, "fcn": fcn}), n_bootstrap=1000).iloc[0]
    assert row.p_value == pytest.approx(float(stats.wilcoxon(unet, fcn).pvalue)) and row.significant
    assert row.mean_difference < 0 < row.median_difference
    assert row.verdict == "unet better than fcn"
    assert "opposite directions" in row.warning


def test_small_n_warns_and_is_not_significant() -> None:
    metrics = _long({"unet": [0.8, 0.82, 0.85, 0.9, 0.88], "fcn": [0.5, 0.52, 0.55, 0.6, 0.58]})
    row = compare_pairs(metrics, n_bootstrap=200).iloc[0]
    assert row.n_cases == 5 and row.p_value == pytest.approx(0.0625)
    assert not row.significant and row.verdict == NOT_DIFFERENT
    assert "no difference can reach significance with this n" in row.warning
    six = _long({"unet": [0.8, 0.82, 0.85, 0.9, 0.88, 0.7], "fcn": [0.5, 0.52, 0.55, 0.6, 0.58, 0.4]})
    row6 = compare_pairs(six, n_bootstrap=200).iloc[0]
    assert row6.p_value == pytest.approx(0.03125) and row6.significant and row6.warning == ""


def test_identical_models_single_case_and_models_without_values() -> None:
    values = np.linspace(0.5, 0.9, 8)
    metrics = _long({"unet": values, "unet.ensemble": values, "fcn": values - 0.2,
                     "cascade": np.full(8, np.nan)})
    one_case = pd.DataFrame([{"case_id": "c000", "architecture": "vnet2d", "class": "pancreas", "dice": 0.4}])
    metrics = pd.concat([metrics, one_case], ignore_index=True)
    table = compare_pairs(metrics, n_bootstrap=200).set_index(["model_a", "model_b"])
    assert len(table) == 10  # 5 models

    same = table.loc[("unet", "unet.ensemble")]
    assert same.n_cases == 8 and same.n_nonzero == 0 and same.mean_difference == 0
    assert np.isnan(same.p_value) and np.isnan(same.p_holm) and not same.significant
    assert same.verdict == NOT_DIFFERENT and "paired differences are zero" in same.warning

    empty = table.loc[("unet", "cascade")]
    assert empty.n_cases == 0 and np.isnan(empty.mean_difference) and np.isnan(empty.ci_low)
    assert empty.verdict == NOT_DIFFERENT and "no common case" in empty.warning

    single = table.loc[("unet", "vnet2d")]
    assert single.n_cases == 1 and single.verdict == NOT_DIFFERENT
    assert "only 1 common case" in single.warning

    # Holm family: only the pairs with a p-value count
    tested = table["p_value"].notna()
    np.testing.assert_allclose(table.loc[tested, "p_holm"], holm_adjust(table.loc[tested, "p_value"]))

    only_one_model = compare_pairs(_long({"unet": values}))
    assert only_one_model.empty and list(only_one_model.columns) == COLUMNS


def test_other_model_column_and_class() -> None:
    metrics = _three_models().rename(columns={"architecture": "configuration"})
    metrics["class"] = "tumour"
    table = compare_pairs(metrics, class_name="tumour", model_column="configuration", n_bootstrap=200)
    assert len(table) == 3 and set(table["class"]) == {"tumour"}
    with pytest.raises(KeyError, match="architecture"):
        compare_pairs(metrics)
    duplicated = pd.concat([metrics, metrics.iloc[:1]], ignore_index=True)
    with pytest.raises(ValueError, match="several rows"):
        paired_table(duplicated, "dice", "tumour", "configuration")


# --------------------------------------------------------------------------- reports
def test_markdown_lists_every_pair_with_legend() -> None:
    metrics = _three_models()
    small = _long({"cascade": [0.7, 0.75]})
    metrics = pd.concat([metrics, small], ignore_index=True)
    table = compare_pairs(metrics, n_bootstrap=200)
    text = comparison_markdown(table)
    for row in table.itertuples(index=False):
        assert f"| {row.model_a} | {row.model_b} | {row.n_cases} |" in text
    table_lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(table_lines) == 1 + len(table)
    assert "**unet better than fcn**" in text
    assert "Wilcoxon signed-rank" in text and "Holm" in text and "95% percentile bootstrap" in text
    assert "no difference can reach significance" in text
    assert "No pair" in comparison_markdown(compare_pairs(_long({"unet": [0.5]})))


def test_forest_plot_one_errorbar_per_pair(tmp_path: Path) -> None:
    metrics = pd.concat([_three_models(), _long({"cascade": [0.7, 0.75, 0.6]})], ignore_index=True)
    table = compare_pairs(metrics, n_bootstrap=200)
    fig = plot_paired_differences(table, "pancreas Dice")
    try:
        assert isinstance(fig, Figure) and len(fig.axes) == 1
        ax = fig.axes[0]
        bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
        assert len(bars) == len(table) == 6
        tops = [bar.lines[0].get_ydata()[0] for bar in bars]
        assert tops == list(range(5, -1, -1))  # first pair on top
        for bar, row in zip(bars, table.itertuples(index=False), strict=True):
            assert bar.lines[0].get_xdata()[0] == pytest.approx(row.mean_difference, nan_ok=True)
        assert any(line.get_xdata()[0] == 0 for line in ax.lines if len(line.get_xdata()) == 2)
        labels = [t.get_text() for t in ax.get_yticklabels()]
        assert labels[0] == "unet − fcn" and labels[-1] == "vnet2d − cascade †"
        texts = [t.get_text() for t in ax.texts]
        assert len(texts) == 6 and all("Holm p=" in t for t in texts)
        assert "(significant)" in texts[0] and "n.s." in texts[-1]
        assert "no difference can reach significance" in ax.get_title(loc="left")
        fig.savefig(tmp_path / "forest.png", dpi=60)
        assert (tmp_path / "forest.png").stat().st_size > 1000
    finally:
        fig.clear()
    empty = plot_paired_differences(compare_pairs(_long({"unet": [0.5]})), "none")
    assert len(empty.axes) == 1 and not empty.axes[0].containers
    empty.clear()
