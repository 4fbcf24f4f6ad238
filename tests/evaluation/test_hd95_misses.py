"""Misses are reported: every HD95 mean/median comes with its count of infinite values.

A hand-made metrics frame with known misses (HD95 = inf: exactly one of prediction and truth empty)
and known both-empty cases (HD95 = NaN) goes through the comparison CSV, the markdown table, the
MLflow metric dict and the box-plot caption; each must show the counts.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pancreas_seg.evaluation.plots import hd95_counts, hd95_miss_caption, plot_dice_boxplots
from pancreas_seg.pipelines.evaluation import nodes
from pancreas_seg.pipelines.evaluation.nodes import (
    METRIC_COLUMNS,
    build_summary,
    comparison_table,
    markdown_table,
    mlflow_test_metrics,
)

INF, NAN = np.inf, np.nan
#: Per architecture: pancreas HD95 and tumour HD95 of cases c0..c4 (the LCC column is the same
#: plus 1 mm). "missy" misses one pancreas (c2) and predicts a tumour in a tumour-free case (c1);
#: "steady" finds every structure, badly. Tumour truth is empty in c0 and c1.
HD95 = {
    "missy": ([4.0, 5.0, INF, 6.0, 5.0], [NAN, INF, 3.0, 4.0, INF]),
    "steady": ([20.0, 22.0, 24.0, 26.0, 28.0], [NAN, NAN, 9.0, 11.0, 13.0]),
}


def _frame(arch: str) -> pd.DataFrame:
    pancreas, tumour = HD95[arch]
    rows = []
    for i, (hd_p, hd_t) in enumerate(zip(pancreas, tumour, strict=True)):
        for class_name, hd in (("pancreas", hd_p), ("tumour", hd_t)):
            dice = NAN if np.isnan(hd) else (0.0 if np.isinf(hd) else 0.7)
            rows.append({"case_id": f"c{i}", "architecture": arch, "class": class_name, "dice": dice,
                         "hd95_mm": hd, "nsd": dice, "slice_dice": dice, "dice_lcc": dice,
                         "hd95_mm_lcc": hd + 1.0, "nsd_lcc": dice})
    return pd.DataFrame(rows, columns=METRIC_COLUMNS)


def _card(arch: str) -> dict:
    return {"architecture": arch, "mlflow_run_id": f"run-{arch}", "data_source": "synthetic"}


@pytest.fixture
def summaries() -> list[dict]:
    return [build_summary(_frame(arch), _card(arch)) for arch in HD95]


@pytest.fixture
def table(summaries: list[dict]) -> pd.DataFrame:
    return comparison_table(summaries).set_index(["architecture", "class"])


def test_comparison_csv_has_median_and_counts_next_to_every_hd95_mean(table: pd.DataFrame) -> None:
    for metric in ("hd95_mm", "hd95_mm_lcc"):
        for stat in ("mean", "std", "median", "n_finite", "n_inf", "n_nan"):
            assert f"{metric}_{stat}" in table.columns, (metric, stat)
        shift = 1.0 if metric.endswith("lcc") else 0.0
        missy, steady = table.loc[("missy", "pancreas")], table.loc[("steady", "pancreas")]
        assert missy[f"{metric}_n_inf"] == 1 and missy[f"{metric}_n_finite"] == 4
        assert missy[f"{metric}_mean"] == pytest.approx(5.0 + shift)  # over the 4 finite cases
        assert missy[f"{metric}_median"] == pytest.approx(5.0 + shift)
        assert steady[f"{metric}_n_inf"] == 0 and steady[f"{metric}_n_finite"] == 5
        tumour = table.loc[("missy", "tumour")]
        assert (tumour[f"{metric}_n_finite"], tumour[f"{metric}_n_inf"], tumour[f"{metric}_n_nan"]) == (2, 2, 1)
        assert table.loc[("steady", "tumour"), f"{metric}_n_nan"] == 2



def test_comparison_csv_round_trip_keeps_integer_counts(summaries: list[dict], tmp_path) -> None:
    comparison_table(summaries).to_csv(tmp_path / "comparison.csv", index=False)
    loaded = pd.read_csv(tmp_path / "comparison.csv")
    for metric in ("hd95_mm", "hd95_mm_lcc"):
        for count in ("n_finite", "n_inf", "n_nan"):
            assert pd.api.types.is_integer_dtype(loaded[f"{metric}_{count}"]), (metric, count)
    assert loaded["hd95_mm_n_inf"].sum() == 3


def test_markdown_shows_misses_and_both_empty_counts(summaries: list[dict]) -> None:
    text = markdown_table(comparison_table(summaries))
    rows = {tuple(cell.strip() for cell in line.strip("|").split("|")[:2]): line
            for line in text.splitlines() if line.startswith("| missy") or line.startswith("| steady")}
    assert "5.0 ± 0.8 (median 5.0; 1 miss of 5)" in rows[("missy", "pancreas")]
    assert "6.0 ± 0.8 (median 6.0; 1 miss of 5)" in rows[("missy", "pancreas")]  # the LCC column
    assert "(median 24.0; 0 misses of 5)" in rows[("steady", "pancreas")]
    assert "2 misses of 4; 1 both empty" in rows[("missy", "tumour")]
    assert "0 misses of 3; 2 both empty" in rows[("steady", "tumour")]
    note = text.split("\n\n", 1)[1]
    assert "finite" in note and "miss" in note and "both empty" in note and "NaN" in note


def test_markdown_all_missed_reads_na_with_count() -> None:
    frame = _frame("missy")
    frame.loc[frame["class"] == "pancreas", ["hd95_mm", "hd95_mm_lcc"]] = INF
    text = markdown_table(comparison_table([build_summary(frame, _card("missy"))]))
    assert "n/a (5 misses of 5)" in text


def test_mlflow_metrics_carry_miss_counts(summaries: list[dict]) -> None:
    flat = mlflow_test_metrics(summaries[0])
    for metric in ("hd95_mm", "hd95_mm_lcc"):
        assert flat[f"test_{metric}_pancreas_n_inf"] == 1
        assert flat[f"test_{metric}_pancreas_n_finite"] == 4
        assert flat[f"test_{metric}_tumour_n_inf"] == 2
        assert flat[f"test_{metric}_tumour_n_nan"] == 1
        # every HD95 mean/median is logged together with its counts
        for class_name in ("pancreas", "tumour"):
            assert {f"test_{metric}_{class_name}_{s}" for s in ("mean", "median", "n_inf", "n_finite")} <= set(flat)
    assert flat["test_hd95_mm_pancreas_mean"] == pytest.approx(5.0)
    assert flat["test_dice_pancreas_mean"] == pytest.approx(0.56)  # the miss counts as Dice 0
    assert "test_dice_pancreas_n_inf" not in flat
    assert all(np.isfinite(v) for k, v in flat.items() if k.endswith(("_n_inf", "_n_finite", "_n_nan")))


def test_summarise_model_logs_the_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    logged: dict = {}
    monkeypatch.setattr(nodes.tracking, "log_final_metrics", lambda run_id, m: logged.update({run_id: dict(m)}))
    monkeypatch.setattr(nodes.tracking, "log_json", lambda *args: None)
    nodes.summarise_model(_frame("missy"), _card("missy"))
    assert logged["run-missy"]["test_hd95_mm_pancreas_n_inf"] == 1
    assert logged["run-missy"]["test_hd95_mm_lcc_tumour_n_inf"] == 2


def test_plot_caption_and_labels_count_misses() -> None:
    metrics = pd.concat([_frame(arch) for arch in HD95], ignore_index=True)
    counts = hd95_counts(metrics)
    assert counts[("pancreas", "missy")] == {"n_finite": 4, "n_inf": 1, "n_nan": 0}
    assert counts[("tumour", "steady")] == {"n_finite": 3, "n_inf": 0, "n_nan": 2}
    caption = hd95_miss_caption(metrics)
    assert "pancreas: missy 1 of 5, steady 0 of 5" in caption
    assert "tumour: missy 2 of 4, steady 0 of 3" in caption
    assert "tumour: missy 1, steady 2" in caption  # both empty, excluded
    assert "pancreas: missy 1 of 5" in hd95_miss_caption(metrics, "hd95_mm_lcc")

    fig = plot_dice_boxplots(metrics)
    assert fig.get_supxlabel() == caption
    dice_axes, hd_axes = fig.axes[:2], fig.axes[2:]
    assert [ax.get_title() for ax in dice_axes] == ["pancreas Dice (3D, per case)", "tumour Dice (3D, per case)"]
    assert "1 miss not drawn" in hd_axes[0].get_title() and "2 misses not drawn" in hd_axes[1].get_title()
    assert [t.get_text() for t in hd_axes[0].get_xticklabels()] == ["missy\n(n=4, 1 miss)", "steady\n(n=5, 0 misses)"]
    assert [t.get_text() for t in hd_axes[1].get_xticklabels()] == ["missy\n(n=2, 2 misses)", "steady\n(n=3, 0 misses)"]


def test_compare_architectures_reports_misses_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    logged_text: dict = {}
    monkeypatch.setattr(nodes.tracking, "log_figure", lambda *args: None)
    monkeypatch.setattr(nodes.tracking, "log_text", lambda run_id, text, name: logged_text.update({run_id: text}))
    frames = [_frame(arch) for arch in HD95]
    summaries = [build_summary(frame, _card(arch)) for frame, arch in zip(frames, HD95, strict=True)]
    metrics, table, markdown, figure = nodes.compare_architectures(*frames, *summaries)
    assert len(metrics) == 20 and int(np.isinf(metrics["hd95_mm"]).sum()) == 3
    assert table.set_index(["architecture", "class"]).loc[("missy", "pancreas"), "hd95_mm_n_inf"] == 1
    assert "1 miss of 5" in markdown and logged_text["run-steady"] == markdown
    assert "pancreas: missy 1 of 5, steady 0 of 5" in figure.get_supxlabel()
