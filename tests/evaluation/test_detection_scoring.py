"""Detection in the evaluation (issue 26): per-case patient scores and lesion candidates from real
label files and probability maps, pooled into AUROC / AP (checked against scikit-learn), FROC and size
strata in the summary, the comparison table, the markdown, MLflow's flat metrics and the FROC plot."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from pancreas_seg.core.labels import PANCREAS, TUMOUR
from pancreas_seg.datasets import PredictionDataset
from pancreas_seg.evaluation.detection import FROC_FP_RATES
from pancreas_seg.evaluation.plots import plot_froc
from pancreas_seg.evaluation.scoring import (
    DETECTION_COLUMNS,
    build_summary,
    comparison_table,
    flat_test_metrics,
    markdown_table,
    score_cases,
)
from pancreas_seg.imaging.geometry import ScanGeometry
from pancreas_seg.imaging.nifti_io import PROBABILITY_LEVELS, CasePrediction, NiftiVolume, save_nifti

SHAPE = (24, 24, 8)
AFFINE = np.diag([2.0, 2.0, 4.0, 1.0])
CASES = [f"c{i}" for i in range(8)]


def _truth(index: int) -> np.ndarray:
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[4:20, 4:20, 1:7] = PANCREAS
    if index % 2 == 0:                       # cases 0, 2, 4, 6 have a tumour
        labels[6:10, 6:10, 2:5] = TUMOUR     # 8 x 8 x 12 mm: ~10.6 mm equivalent diameter
    if index == 4:
        labels[14:16, 14:16, 3:4] = TUMOUR   # a second, small lesion (< 10 mm)
    return labels


def _prediction(index: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and a probability map whose maximum is a known, case-specific score."""
    rng = np.random.default_rng(index)
    probability = rng.uniform(0.0, 0.05, size=SHAPE).astype(np.float32)
    labels = np.where(_truth(index) > 0, PANCREAS, 0).astype(np.uint8)
    peak = [0.9, 0.2, 0.8, 0.6, 0.7, 0.3, 0.4, 0.5][index]   # not separable: tumour cases 0.9 0.8 0.7 0.4
    if index % 2 == 0 and index != 6:      # found: a candidate on the true lesion
        labels[6:10, 6:10, 2:5] = TUMOUR
        probability[6:10, 6:10, 2:5] = peak
    else:                                  # a false-positive candidate elsewhere, or the missed lesion's score
        labels[16:18, 5:7, 4:6] = TUMOUR
        probability[16:18, 5:7, 4:6] = peak
    return labels, probability


@pytest.fixture
def manifest(tmp_path) -> pd.DataFrame:
    paths = []
    for index, case in enumerate(CASES):
        save_nifti(tmp_path / f"{case}_label.nii.gz", _truth(index), AFFINE)
        paths.append(str(tmp_path / f"{case}_label.nii.gz"))
    return pd.DataFrame({"case_id": CASES, "split": "test", "label_path": paths})


@pytest.fixture
def geometry() -> dict:
    record = ScanGeometry.plan(SHAPE, AFFINE, (16, 16)).to_dict()
    return dict.fromkeys(CASES, record)


def _predictions() -> dict:
    def one(index: int) -> CasePrediction:
        labels, probability = _prediction(index)
        return CasePrediction(NiftiVolume(labels, AFFINE), probability)
    return {case: (lambda i=i: one(i)) for i, case in enumerate(CASES)}


def test_patient_scores_and_summary_auroc_match_scikit_learn(manifest, geometry) -> None:
    frame = score_cases(_predictions(), CASES, manifest, geometry, "probe", 2.0)
    tumour = frame[frame["class"] == "tumour"].set_index("case_id")
    expected = {case: float(_prediction(i)[1].max()) for i, case in enumerate(CASES)}
    assert tumour["patient_tumour_score"].to_dict() == pytest.approx(expected)
    assert frame.loc[frame["class"] == "pancreas", "patient_tumour_score"].isna().all()
    lesions = {case: json.loads(tumour.loc[case, "detection_lesions"]) for case in CASES}
    assert [len(lesions[c]) for c in CASES] == [1, 0, 1, 0, 2, 0, 1, 0]
    assert lesions["c0"][0][1] is True and lesions["c6"][0][1] is False   # c6's candidate is elsewhere

    summary = build_summary(frame, "probe", None, "synthetic")
    detection = summary["detection"]["tumour"]
    truth = tumour["truth_present"].astype(bool).to_numpy()
    scores = tumour["patient_tumour_score"].to_numpy()
    assert detection["patient"]["auroc"] == pytest.approx(roc_auc_score(truth, scores))
    assert detection["patient"]["ap"] == pytest.approx(average_precision_score(truth, scores))
    assert 0.5 < detection["patient"]["auroc"] < 1.0   # the example is not separable: the check can fail
    assert detection["patient"]["auroc_ci_low"] <= detection["patient"]["auroc"] <= detection["patient"]["auroc_ci_high"]
    assert detection["patient"]["n_positive"] == 4 and detection["patient"]["n_patients"] == 8

    froc = detection["froc"]
    assert (froc["n_lesions"], froc["n_detected"], froc["n_cases"]) == (5, 3, 8)
    assert froc["fp_rates"] == list(FROC_FP_RATES) and froc["cpm"] == pytest.approx(np.mean(froc["sensitivity_at_rates"]))
    assert froc["sensitivity_at_rates"][-1] == pytest.approx(3 / 5)   # every candidate at 8 FP per case
    sizes = {row["size_bin"]: (row["n_detected"], row["n_lesions"]) for row in detection["size_sensitivity"]}
    assert sizes == {"<10 mm": (0, 1), "10-20 mm": (3, 4), ">20 mm": (0, 0)}
    json.dumps(summary)   # the summary stays JSON (it is saved with json.JSONDataset)

    flat = flat_test_metrics(summary)
    assert flat["test_tumour_auroc"] == detection["patient"]["auroc"]
    assert flat["test_tumour_ap"] == detection["patient"]["ap"] and flat["test_tumour_froc_cpm"] == froc["cpm"]
    table = comparison_table([summary])
    row = table[table["class"] == "tumour"].iloc[0]
    assert set(DETECTION_COLUMNS) <= set(table.columns) and row["auroc"] == detection["patient"]["auroc"]
    assert table.loc[table["class"] == "pancreas", list(DETECTION_COLUMNS)].isna().all().all()
    markdown = markdown_table(table)
    assert "### Tumour detection" in markdown and f"| probe | 8 (4) | {row['auroc']:.3f} [" in markdown

    figure = plot_froc({"probe": detection, "pancreas_only": {"available": False}})
    (ax,) = figure.axes
    assert len(ax.get_lines()) == 2   # the step curve and its operating points
    assert any("pancreas_only: n/a" in t.get_text() for t in ax.get_legend().get_texts())


def test_saved_probability_maps_next_to_the_labels_are_scored_the_same(manifest, geometry, tmp_path) -> None:
    from kedro_datasets.partitions import PartitionedDataset  # noqa: PLC0415

    folder = PartitionedDataset(path=str(tmp_path / "predictions"), dataset="pancreas_seg.datasets.PredictionDataset",
                                filename_suffix=".nii.gz")
    folder.save(_predictions())
    loaded = folder.load()
    assert {f"{c}_tumour_probability" for c in CASES} <= set(loaded)
    in_memory = score_cases(_predictions(), CASES, manifest, geometry, "probe", 2.0)
    from_disk = score_cases(loaded, CASES, manifest, geometry, "probe", 2.0)
    np.testing.assert_allclose(from_disk["patient_tumour_score"].to_numpy(dtype=float),
                               in_memory["patient_tumour_score"].to_numpy(dtype=float),
                               atol=0.5 / PROBABILITY_LEVELS + 1e-6, equal_nan=True)
    assert (from_disk["dice"].fillna(-1) == in_memory["dice"].fillna(-1)).all()
    assert isinstance(PredictionDataset(filepath=str(tmp_path / "predictions" / "c0.nii.gz")).load(), NiftiVolume)


def test_a_model_without_probability_maps_has_no_detection(manifest, geometry) -> None:
    labels_only = {case: (lambda i=i: NiftiVolume(_prediction(i)[0], AFFINE)) for i, case in enumerate(CASES)}
    frame = score_cases(labels_only, CASES, manifest, geometry, "pancreas_model", 2.0)
    summary = build_summary(frame, "pancreas_model", None, None)
    assert frame["patient_tumour_score"].isna().all()
    assert summary["detection"]["tumour"]["available"] is False
    assert "test_tumour_auroc" in flat_test_metrics(summary) and np.isnan(flat_test_metrics(summary)["test_tumour_auroc"])
    assert "### Tumour detection" not in markdown_table(comparison_table([summary]))
