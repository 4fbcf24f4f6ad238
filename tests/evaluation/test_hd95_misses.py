"""Misses are reported: every HD95 mean/median comes with its count of infinite values.

A hand-made metrics frame with known misses (HD95 = inf: exactly one of prediction and truth empty)
and known both-empty cases (HD95 = NaN) goes through the comparison CSV, the markdown table, the
MLflow metric dict and the box-plot caption; each must show the counts. The same frame carries
known lesion counts and ``truth_present`` flags: the tumour Dice over the cases with a tumour, the
pooled lesion sensitivity and the false-positive components per case must reach the summary, the
CSV, MLflow and the markdown table. :func:`score_test_cases` itself is run on small NIfTI files.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pancreas_seg.evaluation.metrics import LESION_KEYS
from pancreas_seg.evaluation.plots import hd95_counts, hd95_miss_caption, plot_dice_boxplots
from pancreas_seg.imaging.geometry import ScanGeometry
from pancreas_seg.imaging.nifti_io import NiftiVolume, save_nifti
from pancreas_seg.evaluation.scoring import (
    METRIC_COLUMNS,
    build_summary,
    comparison_table,
    flat_test_metrics,
    markdown_table,
)
from pancreas_seg.inference.model_card import CaseSplit, ModelCard
from pancreas_seg.pipelines.evaluation import nodes
from pancreas_seg.pipelines.evaluation.nodes import score_test_cases

INF, NAN = np.inf, np.nan
#: Per architecture: pancreas HD95 and tumour HD95 of cases c0..c4 (the LCC column is the same
#: plus 1 mm). "missy" misses one pancreas (c2) and predicts a tumour in a tumour-free case (c1);
#: "steady" finds every structure, badly. Tumour truth is empty in c0 and c1.
HD95 = {
    "missy": ([4.0, 5.0, INF, 6.0, 5.0], [NAN, INF, 3.0, 4.0, INF]),
    "steady": ([20.0, 22.0, 24.0, 26.0, 28.0], [NAN, NAN, 9.0, 11.0, 13.0]),
}
#: Per architecture and case c0..c4: tumour (lesions_true, lesions_found, lesions_predicted,
#: fp_components). "missy": c1 is a false positive in a tumour-free case, c3 finds 1 of 2 lesions
#: and adds one false positive, c4 misses its lesion -> 2 of 4 found, 2 FP in 5 cases. "steady"
#: finds all 4 (c4: one component over both lesions), no FP.
LESIONS = {
    "missy": [(0, 0, 0, 0), (0, 0, 1, 1), (1, 1, 1, 0), (2, 1, 2, 1), (1, 0, 0, 0)],
    "steady": [(0, 0, 0, 0), (0, 0, 0, 0), (1, 1, 1, 0), (1, 1, 1, 0), (2, 2, 1, 0)],
}
TUMOUR_IN_TRUTH = [False, False, True, True, True]


def _frame(arch: str) -> pd.DataFrame:
    pancreas, tumour = HD95[arch]
    rows = []
    for i, (hd_p, hd_t) in enumerate(zip(pancreas, tumour, strict=True)):
        true, found, predicted, fp = LESIONS[arch][i]
        lesions = {"lesions_true": true, "lesions_found": found, "lesions_predicted": predicted,
                   "fp_components": fp, "lesion_sensitivity": found / true if true else NAN}
        for class_name, hd in (("pancreas", hd_p), ("tumour", hd_t)):
            dice = NAN if np.isnan(hd) else (0.0 if np.isinf(hd) else 0.7)
            rows.append({"case_id": f"c{i}", "architecture": arch, "class": class_name, "dice": dice,
                         "hd95_mm": hd, "nsd": dice, "slice_dice": dice, "dice_lcc": dice,
                         "hd95_mm_lcc": hd + 1.0, "nsd_lcc": dice,
                         "truth_present": class_name == "pancreas" or TUMOUR_IN_TRUTH[i],
                         **(lesions if class_name == "tumour" else dict.fromkeys(LESION_KEYS, NAN))})
    return pd.DataFrame(rows, columns=METRIC_COLUMNS)


def _card(arch: str) -> ModelCard:
    return ModelCard.for_trained_model(arch, "multiclass", {"image_size_px": 96}, None, "Task07_Pancreas",
                                       CaseSplit(("t0",), ("v0",)), "a" * 64, mlflow_run_id=f"run-{arch}",
                                       data_source="synthetic")


def _summary(frame: pd.DataFrame, arch: str) -> dict:
    return build_summary(frame, arch, f"run-{arch}", "synthetic")


@pytest.fixture
def summaries() -> list[dict]:
    return [_summary(_frame(arch), arch) for arch in HD95]


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
    text = markdown_table(comparison_table([_summary(frame, "missy")]))
    assert "n/a (5 misses of 5)" in text


def test_mlflow_metrics_carry_miss_counts(summaries: list[dict]) -> None:
    flat = flat_test_metrics(summaries[0])
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
    summaries = [_summary(frame, arch) for frame, arch in zip(frames, HD95, strict=True)]
    metrics, table, markdown, figure, _ = nodes.compare_architectures(*frames, *summaries)
    assert len(metrics) == 20 and int(np.isinf(metrics["hd95_mm"]).sum()) == 3
    assert table.set_index(["architecture", "class"]).loc[("missy", "pancreas"), "hd95_mm_n_inf"] == 1
    assert "1 miss of 5" in markdown and logged_text["run-steady"] == markdown
    assert "pancreas: missy 1 of 5, steady 0 of 5" in figure.get_supxlabel()


# --- tumour Dice over the cases with a tumour, and lesion detection --------------------------------


def _label_file(path, labels: np.ndarray, affine: np.ndarray) -> str:
    save_nifti(path, labels, affine)
    return str(path)


def test_score_test_cases_writes_truth_present_and_lesion_columns(tmp_path) -> None:
    """Two NIfTI cases through the node: the lesion columns on tumour rows, ``truth_present`` on all."""
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    shape = (16, 16, 8)
    pancreas = np.zeros(shape, dtype=np.uint8)
    pancreas[2:14, 2:14, 1:7] = 1
    # c0: two true lesions; the prediction finds one and adds a blob outside the truth's tumour
    truth_0, pred_0 = pancreas.copy(), pancreas.copy()
    truth_0[3:5, 3:5, 2:4] = 2
    truth_0[10:12, 10:12, 4:6] = 2
    pred_0[4:6, 4:6, 3:5] = 2
    pred_0[3:5, 11:13, 2:3] = 2
    # c1: no tumour in the truth, none predicted
    truth_1, pred_1 = pancreas.copy(), pancreas.copy()
    manifest = pd.DataFrame({"case_id": ["c0", "c1"], "split": ["test", "test"],
                             "label_path": [_label_file(tmp_path / "c0.nii.gz", truth_0, affine),
                                            _label_file(tmp_path / "c1.nii.gz", truth_1, affine)]})
    predictions = {"c0": lambda: NiftiVolume(pred_0, affine), "c1": lambda: NiftiVolume(pred_1, affine)}
    geometry = ScanGeometry.plan(shape, affine, (16, 16)).to_dict()
    frame = score_test_cases(predictions, manifest, {"c0": geometry, "c1": geometry},
                             _card("probe"), {"nsd_tolerance_mm": 2.0})

    assert list(frame.columns) == METRIC_COLUMNS
    assert METRIC_COLUMNS[-9:-3] == ["truth_present", "lesions_true", "lesions_found", "lesions_predicted",
                                     "fp_components", "lesion_sensitivity"]
    assert METRIC_COLUMNS[-3:] == ["patient_tumour_score", "detection_candidates", "detection_lesions"]
    assert frame["patient_tumour_score"].isna().all()   # label maps without a probability map: no detection
    rows = frame.set_index(["case_id", "class"])
    assert rows.loc[("c0", "tumour"), ["lesions_true", "lesions_found", "lesions_predicted",
                                       "fp_components", "lesion_sensitivity"]].tolist() == [2, 1, 2, 1, 0.5]
    assert rows.loc[("c1", "tumour"), ["lesions_true", "lesions_predicted", "fp_components"]].tolist() == [0, 0, 0]
    assert np.isnan(rows.loc[("c1", "tumour"), "lesion_sensitivity"])
    assert rows[list(LESION_KEYS)].xs("pancreas", level="class").isna().all().all()
    assert rows["truth_present"].to_dict() == {("c0", "pancreas"): True, ("c0", "tumour"): True,
                                               ("c1", "pancreas"): True, ("c1", "tumour"): False}

    # the CSV the pipeline saves reads back to the same summary
    frame.to_csv(tmp_path / "metrics.csv", index=False)
    loaded = pd.read_csv(tmp_path / "metrics.csv")
    assert loaded["truth_present"].dtype == bool
    summary = _summary(loaded, "probe")
    assert json.dumps(summary, sort_keys=True) == json.dumps(_summary(frame, "probe"), sort_keys=True)
    tumour = summary["classes"]["tumour"]
    assert tumour["dice_truth_present"]["n"] == 1
    assert tumour["dice_truth_present"]["mean"] == pytest.approx(rows.loc[("c0", "tumour"), "dice"])
    assert summary["lesions"]["tumour"]["lesions_true"] == 2 and summary["lesions"]["tumour"]["fp_components"] == 1
    assert summary["lesions"]["tumour"]["fp_components_per_case"] == pytest.approx(0.5)


def test_summary_has_dice_over_truth_present_cases_and_pooled_lesions(summaries: list[dict]) -> None:
    missy, steady = summaries
    tumour = missy["classes"]["tumour"]
    assert tumour["dice"]["mean"] == pytest.approx(0.35)                # (0 + 0.7 + 0.7 + 0) / 4
    assert tumour["dice_truth_present"]["n"] == 3                      # c2, c3, c4
    assert tumour["dice_truth_present"]["mean"] == pytest.approx(1.4 / 3)
    assert missy["classes"]["pancreas"]["dice_truth_present"]["n"] == 5
    assert missy["lesions"]["tumour"] == {
        "n_cases": 5, "n_cases_with_lesions": 3, "lesions_true": 4, "lesions_found": 2, "lesions_predicted": 4,
        "fp_components": 2, "lesion_sensitivity": pytest.approx(0.5), "fp_components_per_case": pytest.approx(0.4)}
    assert steady["lesions"]["tumour"]["lesion_sensitivity"] == pytest.approx(1.0)
    assert steady["lesions"]["tumour"]["fp_components_per_case"] == 0.0
    assert set(missy["lesions"]) == {"tumour"}
    # the existing per-class statistics are unchanged
    assert set(tumour) == {"dice", "hd95_mm", "nsd", "hd95_surfel_mm", "nsd_surfel", "slice_dice", "dice_lcc", "hd95_mm_lcc", "nsd_lcc",
                           "dice_truth_present"}


def test_comparison_csv_has_lesion_columns_on_tumour_rows(summaries: list[dict], tmp_path) -> None:
    comparison_table(summaries).to_csv(tmp_path / "comparison.csv", index=False)
    table = pd.read_csv(tmp_path / "comparison.csv").set_index(["architecture", "class"])
    missy = table.loc[("missy", "tumour")]
    assert missy["dice_truth_present_mean"] == pytest.approx(1.4 / 3)
    assert missy["dice_truth_present_n"] == 3
    assert missy["lesion_sensitivity"] == pytest.approx(0.5)
    assert (missy["lesions_found"], missy["lesions_true"], missy["fp_components"]) == (2, 4, 2)
    assert missy["fp_components_per_case"] == pytest.approx(0.4)
    assert table.loc[("steady", "tumour"), "lesion_sensitivity"] == pytest.approx(1.0)
    pancreas = table.xs("pancreas", level="class")
    assert pancreas[["lesion_sensitivity", "fp_components_per_case", "lesions_true", "lesions_found"]].isna().all().all()
    assert (pancreas["dice_truth_present_n"] == 5).all()


def test_markdown_shows_tumour_dice_with_tumour_lesion_sensitivity_and_fp(summaries: list[dict]) -> None:
    text = markdown_table(comparison_table(summaries))
    header = text.splitlines()[0]
    for column in ("Dice (cases with tumour)", "lesion sensitivity (found/true)", "FP components / case"):
        assert f"| {column} |" in header or header.endswith(f"| {column} |")
    assert header.count("|") == text.splitlines()[1].count("|")
    rows = {tuple(cell.strip() for cell in line.strip("|").split("|")[:2]): [c.strip() for c in line.strip("|").split("|")]
            for line in text.splitlines() if line.startswith(("| missy", "| steady"))}
    assert rows[("missy", "tumour")][-3:] == ["0.467 ± 0.404 (n=3)", "0.500 (2/4)", "0.40 (2 in 5 cases)"]
    assert rows[("steady", "tumour")][-3:] == ["0.700 ± 0.000 (n=3)", "1.000 (4/4)", "0.00 (0 in 5 cases)"]
    assert rows[("missy", "pancreas")][-3:] == ["–", "–", "–"]
    assert all(len(cells) == header.count("|") - 1 for cells in rows.values())
    notes = text.split("\n\n", 1)[1]
    for words in ("Dice (cases with tumour)", "Lesion sensitivity", "FP components / case", "26-connectivity",
                  "found / true"):
        assert words in notes, words


def test_markdown_without_true_lesions_reads_na() -> None:
    frame = _frame("steady")
    tumour = frame["class"] == "tumour"
    frame.loc[tumour, ["lesions_true", "lesions_found", "lesions_predicted", "fp_components"]] = [0, 0, 1, 1]
    frame.loc[tumour, "lesion_sensitivity"] = NAN
    frame.loc[tumour, "truth_present"] = False
    text = markdown_table(comparison_table([_summary(frame, "steady")]))
    tumour_row = next(line for line in text.splitlines() if line.startswith("| steady | tumour"))
    assert tumour_row.endswith("| n/a (n=0) | n/a (0/0) | 1.00 (5 in 5 cases) |")


def test_mlflow_metrics_carry_lesion_metrics(summaries: list[dict]) -> None:
    flat = flat_test_metrics(summaries[0])
    assert flat["test_dice_truth_present_tumour_mean"] == pytest.approx(1.4 / 3)
    assert flat["test_dice_truth_present_tumour_n"] == 3
    assert flat["test_lesion_sensitivity_tumour"] == pytest.approx(0.5)
    assert flat["test_fp_components_per_case_tumour"] == pytest.approx(0.4)
    assert (flat["test_lesions_true_tumour"], flat["test_lesions_found_tumour"]) == (4, 2)
    assert (flat["test_lesions_predicted_tumour"], flat["test_fp_components_tumour"]) == (4, 2)
    assert not any("lesion" in key and "pancreas" in key for key in flat)
    assert flat["test_dice_tumour_mean"] == pytest.approx(0.35)  # unchanged


def test_summarise_model_logs_lesion_metrics(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    logged: dict = {}
    monkeypatch.setattr(nodes.tracking, "log_final_metrics", lambda run_id, m: logged.update({run_id: dict(m)}))
    monkeypatch.setattr(nodes.tracking, "log_json", lambda *args: None)
    with caplog.at_level("INFO", logger=nodes.logger.name):
        nodes.summarise_model(_frame("missy"), _card("missy"))
    assert logged["run-missy"]["test_lesion_sensitivity_tumour"] == pytest.approx(0.5)
    assert logged["run-missy"]["test_dice_truth_present_tumour_mean"] == pytest.approx(1.4 / 3)
    assert ("test tumour Dice over the 3 case(s) with a tumour: mean 0.4667; lesion sensitivity 0.500 "
            "(2 of 4 lesions found), 0.40 false-positive component(s) per case over 5 case(s)") in caplog.text


def test_compare_architectures_reads_per_case_frames_from_before_the_lesion_columns(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An old per-case CSV and summary (no lesion columns) still compare; their lesion cells read n/a."""
    monkeypatch.setattr(nodes.tracking, "log_figure", lambda *args: None)
    monkeypatch.setattr(nodes.tracking, "log_text", lambda *args: None)
    old_frame = _frame("steady").drop(columns=["truth_present", *LESION_KEYS])
    old_summary = _summary(_frame("steady"), "steady")
    del old_summary["lesions"]
    for stats in old_summary["classes"].values():
        del stats["dice_truth_present"]
    new_frame = _frame("missy")
    metrics, table, markdown, _, _ = nodes.compare_architectures(
        new_frame, old_frame, _summary(new_frame, "missy"), old_summary)
    assert list(metrics.columns) == METRIC_COLUMNS
    assert metrics.loc[metrics["architecture"] == "steady", "lesions_true"].isna().all()
    assert "| steady | tumour |" in markdown
    old_row = next(line for line in markdown.splitlines() if line.startswith("| steady | tumour"))
    assert old_row.endswith("| n/a | n/a | n/a |")
    assert "| 0.500 (2/4) |" in markdown
