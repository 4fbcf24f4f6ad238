"""Tumour detection metrics: AUROC / AP against scikit-learn and by hand, the patient bootstrap,
IoU matching and FROC on hand-made 3D masks, size strata on voxelised spheres.

Expected values follow from the definitions in :mod:`pancreas_seg.evaluation.detection`.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from pancreas_seg.evaluation import detection
from pancreas_seg.evaluation.detection import (
    CANDIDATE_COLUMNS,
    FROC_FP_RATES,
    LESION_COLUMNS,
    SIZE_BIN_LABELS,
    auroc,
    average_precision,
    froc,
    lesion_candidates,
    patient_detection,
    patient_tumour_score,
    size_bin,
    size_stratified_sensitivity,
)

SHAPE = (20, 20, 10)
ISO = (1.0, 1.0, 1.0)


def _case(shape: tuple[int, ...], truth_boxes: list, pred_boxes: list[tuple[tuple, float]],
          spacing: tuple[float, ...] = ISO, **kwargs) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run lesion_candidates on boxes: truth boxes, and predicted boxes each with its probability."""
    truth = np.zeros(shape, dtype=bool)
    for box in truth_boxes:
        truth[box] = True
    pred = np.zeros(shape, dtype=bool)
    prob = np.full(shape, 0.05, dtype=np.float32)
    for box, p in pred_boxes:
        pred[box] = True
        prob[box] = p
    return lesion_candidates(pred.astype(np.uint8), prob, truth, spacing, **kwargs)


# --------------------------------------------------------------------------- patient score
def test_patient_score_is_the_maximum_and_refuses_bad_probabilities() -> None:
    prob = np.random.default_rng(0).uniform(0, 0.6, (6, 5, 4)).astype(np.float32)
    prob[3, 2, 1] = 0.875
    assert patient_tumour_score(prob) == pytest.approx(0.875)
    assert patient_tumour_score(np.zeros(3)) == 0.0
    bad = prob.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        patient_tumour_score(bad)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        patient_tumour_score(prob * 2)
    with pytest.raises(ValueError, match="empty"):
        patient_tumour_score(np.zeros((0, 3)))
    with pytest.raises(ValueError, match="real-valued"):
        patient_tumour_score(np.zeros(3, dtype=bool))


# --------------------------------------------------------------------------- AUROC / AP
def test_auroc_and_ap_by_hand() -> None:
    scores, labels = [0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]
    # positive-negative pairs: 0.35>0.1 yes, 0.35>0.4 no, 0.8>0.1 yes, 0.8>0.4 yes -> 3/4
    assert auroc(scores, labels) == pytest.approx(0.75)
    # descending: 0.8 (pos) P=1 R=1/2; 0.4 (neg) R unchanged; 0.35 (pos) P=2/3 R=1
    # AP = 1/2 * 1 + 1/2 * 2/3 = 5/6
    assert average_precision(scores, labels) == pytest.approx(5 / 6)
    # ties: the positive ties a negative at 0.5 (counts 1/2) and beats 0.2 -> (0.5 + 1) / 2 = 0.75;
    # the tie group {0.5, 0.5} enters at once: P = 1/2 at R = 1 -> AP = 0.5
    assert auroc([0.5, 0.5, 0.2], [1, 0, 0]) == pytest.approx(0.75)
    assert average_precision([0.5, 0.5, 0.2], [True, False, False]) == pytest.approx(0.5)
    # perfect separation and perfect inversion
    assert auroc([0.9, 0.8, 0.2, 0.1], [1, 1, 0, 0]) == 1.0
    assert average_precision([0.9, 0.8, 0.2, 0.1], [1, 1, 0, 0]) == 1.0
    assert auroc([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0]) == 0.0
    # one class: undefined
    assert math.isnan(auroc([0.1, 0.2], [0, 0]))
    assert math.isnan(average_precision([0.1, 0.2], [1, 1]))


@pytest.mark.parametrize("seed", range(6))
def test_auroc_and_ap_match_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 40 + 7 * seed
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]
    tied = np.round(rng.uniform(0, 1, n) * 0.4 + 0.3 * labels, 1)   # coarse: many ties
    continuous = rng.uniform(0, 1, n) + 0.5 * labels
    for scores in (tied, continuous):
        assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
        assert average_precision(scores, labels) == pytest.approx(average_precision_score(labels, scores),
                                                                   abs=1e-12)
    assert np.unique(tied).size < n / 3


def test_scores_and_labels_are_checked() -> None:
    with pytest.raises(ValueError, match="scores has 3 values, labels has 2"):
        auroc([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ValueError, match="finite"):
        average_precision([0.1, np.nan], [0, 1])
    with pytest.raises(ValueError, match="labels must be 0/1"):
        patient_detection([0.1, 0.2, 0.3], [0, 1, 2])


# --------------------------------------------------------------------------- bootstrap
def _separable(n: int = 60, seed: int = 4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    return rng.normal(0, 1, n) + 1.2 * labels, labels


def test_bootstrap_covers_point_estimate_and_is_deterministic() -> None:
    scores, labels = _separable()
    result = patient_detection(scores, labels, n_bootstrap=500, seed=3)
    assert result["auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert result["ap"] == pytest.approx(average_precision_score(labels, scores))
    assert result["auroc_ci_low"] < result["auroc"] < result["auroc_ci_high"]
    assert result["ap_ci_low"] < result["ap"] < result["ap_ci_high"]
    assert result["n_bootstrap_used"] == 500 and result["note"] == ""
    assert (result["n_patients"], result["n_positive"]) == (60, int(labels.sum()))
    assert patient_detection(scores, labels, n_bootstrap=500, seed=3) == result
    other = patient_detection(scores, labels, n_bootstrap=500, seed=4)
    assert other["auroc"] == result["auroc"]
    assert other["auroc_ci_low"] != result["auroc_ci_low"]
    narrow = patient_detection(scores, labels, n_bootstrap=500, confidence=0.5, seed=3)
    assert result["auroc_ci_low"] < narrow["auroc_ci_low"] < narrow["auroc_ci_high"] < result["auroc_ci_high"]


def test_bootstrap_resamples_by_hand_and_skips_one_class_resamples() -> None:
    scores = np.array([0.9, 0.3, 0.5, 0.2, 0.6, 0.1])
    labels = np.array([1, 0, 0, 0, 1, 0])
    result = patient_detection(scores, labels, n_bootstrap=300, confidence=0.9, seed=11)
    # recompute: the same draws, one resample at a time, with scikit-learn as the metric
    draws = np.random.default_rng(11).integers(0, 6, size=(300, 6))
    aucs, aps = [], []
    for row in draws:
        y, s = labels[row], scores[row]
        if 0 < y.sum() < y.size:
            aucs.append(roc_auc_score(y, s))
            aps.append(average_precision_score(y, s))
    assert 0 < len(aucs) < 300   # (4/6)^6 ~ 9 % of the resamples hold no positive
    assert result["n_bootstrap_used"] == len(aucs)
    assert f"{300 - len(aucs)} of 300 bootstrap resamples" in result["note"]
    assert (result["auroc_ci_low"], result["auroc_ci_high"]) == pytest.approx(
        tuple(np.quantile(aucs, [0.05, 0.95])), abs=1e-12)
    assert (result["ap_ci_low"], result["ap_ci_high"]) == pytest.approx(
        tuple(np.quantile(aps, [0.05, 0.95])), abs=1e-12)


def test_one_class_gives_nan_with_reason() -> None:
    result = patient_detection([0.2, 0.7, 0.4], [0, 0, 0], n_bootstrap=50)
    for key in ("auroc", "auroc_ci_low", "auroc_ci_high", "ap", "ap_ci_low", "ap_ci_high"):
        assert math.isnan(result[key]), key
    assert result["n_bootstrap_used"] == 0 and result["n_positive"] == 0
    assert "only one class" in result["note"]
    with pytest.raises(ValueError, match="confidence"):
        patient_detection([0.2, 0.7], [0, 1], confidence=1.0)
    with pytest.raises(ValueError, match="n_bootstrap"):
        patient_detection([0.2, 0.7], [0, 1], n_bootstrap=0)


# --------------------------------------------------------------------------- candidates and FROC
LESION_A = np.s_[2:5, 2:5, 2:5]       # 27 voxels
LESION_B = np.s_[12:15, 12:15, 2:5]   # 27 voxels, never predicted
HIT_A = np.s_[3:6, 2:5, 2:5]          # 27 voxels, 18 shared with A: IoU = 18 / 36 = 0.5
FP_FAR = np.s_[2:4, 14:16, 6:8]


def _froc_cases() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Case 1: lesion A hit at 0.8, lesion B missed, a FP at 0.4; case 2: tumour-free, a FP at 0.9."""
    c1, l1 = _case(SHAPE, [LESION_A, LESION_B], [(HIT_A, 0.8), (FP_FAR, 0.4)])
    c2, l2 = _case(SHAPE, [], [(np.s_[8:10, 8:10, 8:10], 0.9)])
    candidates = pd.concat([c1.assign(case_id="c1"), c2.assign(case_id="c2")], ignore_index=True)
    lesions = pd.concat([l1.assign(case_id="c1"), l2.assign(case_id="c2")], ignore_index=True)
    return candidates, lesions


def test_candidates_and_lesions_tables() -> None:
    candidates, lesions = _case(SHAPE, [LESION_A, LESION_B], [(HIT_A, 0.8), (FP_FAR, 0.4)],
                                spacing=(0.5, 0.5, 2.0))
    assert list(candidates.columns) == list(CANDIDATE_COLUMNS)
    assert list(lesions.columns) == list(LESION_COLUMNS)
    # ids are scipy's labels in C order: the far FP (first voxel at x = 2, y = 14) is candidate 1
    assert candidates["candidate_id"].tolist() == [1, 2]
    fp, hit = candidates.iloc[0], candidates.iloc[1]
    assert hit["confidence"] == pytest.approx(0.8)
    assert (hit["lesion_id"], hit["true_positive"]) == (1, True)
    assert hit["iou"] == pytest.approx(0.5) and hit["volume_mm3"] == pytest.approx(27 * 0.5)
    assert (fp["lesion_id"], fp["true_positive"], fp["max_iou"]) == (-1, False, 0.0)
    assert math.isnan(fp["iou"]) and fp["confidence"] == pytest.approx(0.4)
    assert lesions["detected"].tolist() == [True, False]
    assert lesions["candidate_id"].tolist() == [2, -1]
    assert lesions["confidence"].iloc[0] == pytest.approx(0.8) and math.isnan(lesions["confidence"].iloc[1])
    assert lesions["volume_mm3"].tolist() == pytest.approx([13.5, 13.5])
    assert lesions["diameter_mm"].iloc[0] == pytest.approx((6 * 13.5 / math.pi) ** (1 / 3))


def test_froc_by_hand() -> None:
    candidates, lesions = _froc_cases()
    result = froc(candidates, lesions, n_cases=2)
    # thresholds 0.9 (FP, case 2), 0.8 (hit A), 0.4 (FP, case 1); 2 lesions, 2 cases
    assert result["thresholds"].tolist() == pytest.approx([np.inf, 0.9, 0.8, 0.4])
    assert result["fp_per_case"].tolist() == [0.0, 0.5, 0.5, 1.0]
    assert result["sensitivity"].tolist() == [0.0, 0.0, 0.5, 0.5]
    # at 1/8 and 1/4 FP per case only the origin qualifies; from 0.5 on the hit of A counts
    assert result["sensitivity_at_rates"].tolist() == [0.0, 0.0, 0.5, 0.5, 0.5, 0.5, 0.5]
    assert result["cpm"] == pytest.approx(5 * 0.5 / 7)
    assert result["fp_rates"].tolist() == list(FROC_FP_RATES)
    assert (result["n_lesions"], result["n_detected"], result["n_candidates"], result["n_false_positives"]) == (2, 1, 3, 2)

    # case 1 alone: the same sensitivities with half the false positives
    alone = froc(candidates[candidates.case_id == "c1"], lesions[lesions.case_id == "c1"], n_cases=1)
    assert alone["fp_per_case"].tolist() == [0.0, 0.0, 1.0]
    assert alone["sensitivity_at_rates"].tolist() == [0.5] * 7
    assert alone["cpm"] == pytest.approx(0.5)


def test_tumour_free_case_only_adds_false_positives() -> None:
    candidates, lesions = _case(SHAPE, [], [(np.s_[8:10, 8:10, 8:10], 0.9), (FP_FAR, 0.3)])
    assert len(lesions) == 0 and not candidates["true_positive"].any() and len(candidates) == 2
    result = froc(candidates, lesions, n_cases=1)
    assert result["fp_per_case"].tolist() == [0.0, 1.0, 2.0]
    assert np.isnan(result["sensitivity_at_rates"]).all() and math.isnan(result["cpm"])
    assert "no true lesion" in result["note"]

    base_c, base_l = _froc_cases()
    pooled = froc(pd.concat([base_c, candidates]), pd.concat([base_l, lesions]), n_cases=3)
    assert pooled["n_lesions"] == 2 and pooled["n_false_positives"] == 4
    assert pooled["sensitivity"].max() == 0.5
    # with 3 cases: 0.9 -> 2 FP (2/3 per case); the hit of A at 0.8 only counts from 1 FP per case on
    assert pooled["sensitivity_at_rates"].tolist() == [0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5]


def test_empty_prediction_misses_every_lesion() -> None:
    candidates, lesions = _case(SHAPE, [LESION_A, LESION_B], [])
    assert len(candidates) == 0 and lesions["detected"].tolist() == [False, False]
    assert lesions["max_iou"].tolist() == [0.0, 0.0]
    result = froc(candidates, lesions, n_cases=1)
    assert result["sensitivity_at_rates"].tolist() == [0.0] * 7 and result["cpm"] == 0.0
    assert result["fp_per_case"].tolist() == [0.0]


@pytest.mark.parametrize(("length", "hit"), [(9, True), (10, True), (11, False)])
def test_iou_threshold_boundary(length: int, hit: bool) -> None:
    # a one-voxel candidate inside a straight lesion of `length` voxels: IoU = 1 / length
    shape = (16, 5, 5)
    candidates, lesions = _case(shape, [np.s_[0:length, 2, 2]], [(np.s_[0, 2, 2], 0.7)])
    assert lesions["max_iou"].iloc[0] == pytest.approx(1 / length)
    assert bool(lesions["detected"].iloc[0]) is hit
    assert bool(candidates["true_positive"].iloc[0]) is hit
    # a stricter threshold turns every one of them into a miss
    _, strict = _case(shape, [np.s_[0:length, 2, 2]], [(np.s_[0, 2, 2], 0.7)], iou_threshold=0.2)
    assert not strict["detected"].any()


def test_one_candidate_over_two_lesions_counts_once() -> None:
    # lesions 2x2x2 (8 voxels) and 3x2x2 (12), one candidate box covering both (24 voxels):
    # IoU 8/24 = 1/3 and 12/24 = 1/2, both hits; it takes the better one, the other is missed
    shape = (10, 6, 6)
    candidates, lesions = _case(shape, [np.s_[0:2, 1:3, 1:3], np.s_[3:6, 1:3, 1:3]],
                                [(np.s_[0:6, 1:3, 1:3], 0.9)])
    assert len(candidates) == 1 and candidates["lesion_id"].tolist() == [2]
    assert candidates["iou"].iloc[0] == pytest.approx(0.5)
    assert lesions["detected"].tolist() == [False, True]
    assert lesions["max_iou"].tolist() == pytest.approx([1 / 3, 1 / 2])
    result = froc(candidates, lesions, n_cases=1)
    assert result["sensitivity_at_rates"].tolist() == [0.5] * 7 and result["n_false_positives"] == 0


@pytest.mark.parametrize(("conf_small", "conf_large", "winner"), [(0.9, 0.6, 1), (0.6, 0.9, 2)])
def test_greedy_by_confidence_and_duplicates_are_false_positives(conf_small: float, conf_large: float,
                                                                 winner: int) -> None:
    # one straight lesion of 10 voxels; candidate 1 covers 2 of them (IoU 0.2), candidate 2 covers 5
    # (IoU 0.5): the more confident one takes the lesion, the other is a false positive
    shape = (12, 5, 5)
    candidates, lesions = _case(shape, [np.s_[0:10, 2, 2]],
                                [(np.s_[0:2, 2, 2], conf_small), (np.s_[3:8, 2, 2], conf_large)])
    assert candidates["true_positive"].tolist() == [winner == 1, winner == 2]
    assert lesions["candidate_id"].tolist() == [winner]
    assert lesions["iou"].iloc[0] == pytest.approx(0.2 if winner == 1 else 0.5)
    assert lesions["max_iou"].iloc[0] == pytest.approx(0.5)
    assert froc(candidates, lesions, n_cases=1)["n_false_positives"] == 1


def test_confidence_is_max_probability_and_diagonal_voxels_join() -> None:
    shape = (6, 6, 6)
    pred = np.zeros(shape, dtype=bool)
    pred[1, 1, 1] = pred[2, 2, 2] = True            # corner neighbours: one candidate at 26-connectivity
    prob = np.zeros(shape)
    prob[1, 1, 1], prob[2, 2, 2] = 0.55, 0.95
    truth = np.zeros(shape, dtype=bool)
    candidates, _ = lesion_candidates(pred, prob, truth, ISO)
    assert len(candidates) == 1 and candidates["confidence"].iloc[0] == pytest.approx(0.95)
    faces, _ = lesion_candidates(pred, prob, truth, ISO, connectivity=1)
    assert faces["confidence"].tolist() == pytest.approx([0.55, 0.95])


def test_invalid_inputs_name_the_problem() -> None:
    pred = np.zeros(SHAPE, dtype=bool)
    prob = np.zeros(SHAPE, dtype=np.float32)
    with pytest.raises(ValueError, match="shape"):
        lesion_candidates(pred, prob, np.zeros((20, 20, 9), dtype=bool), ISO)
    with pytest.raises(ValueError, match="probability shape"):
        lesion_candidates(pred, prob[:, :, :5], pred, ISO)
    nan_prob = prob.copy()
    nan_prob[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        lesion_candidates(pred, nan_prob, pred, ISO)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        lesion_candidates(pred, prob - 0.5, pred, ISO)
    with pytest.raises(ValueError, match="spacing_mm"):
        lesion_candidates(pred, prob, pred, (1.0, 1.0))
    with pytest.raises(ValueError, match="iou_threshold"):
        lesion_candidates(pred, prob, pred, ISO, iou_threshold=0.0)
    candidates, lesions = _froc_cases()
    with pytest.raises(ValueError, match="n_cases"):
        froc(candidates, lesions, n_cases=0)
    with pytest.raises(ValueError, match="lacks columns"):
        froc(candidates.drop(columns="true_positive"), lesions, n_cases=2)
    with pytest.raises(ValueError, match="tables disagree"):
        froc(candidates, lesions.iloc[1:], n_cases=2)
    with pytest.raises(ValueError, match="fp_rates"):
        froc(candidates, lesions, n_cases=2, fp_rates=(0.0, 1.0))


# --------------------------------------------------------------------------- size strata
def _sphere(shape: tuple[int, int, int], centre_vox: tuple[float, float, float], radius_mm: float,
            spacing: tuple[float, float, float]) -> np.ndarray:
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum(((g - c) * s) ** 2 for g, c, s in zip(grids, centre_vox, spacing, strict=True)) <= radius_mm ** 2


def test_size_strata_on_spheres_with_anisotropic_spacing() -> None:
    spacing = (1.0, 1.0, 2.5)
    shape = (90, 30, 14)
    radii = (3.5, 7.0, 12.0)                      # diameters 7, 14, 24 mm: one per bin
    spheres = [_sphere(shape, (cx, 15, 7), r, spacing) for cx, r in zip((8, 30, 62), radii, strict=True)]
    truth = spheres[0] | spheres[1] | spheres[2]
    pred = spheres[1] | spheres[2]                # the small sphere is missed
    prob = pred * 0.9
    _, lesions = lesion_candidates(pred, prob, truth, spacing)
    assert len(lesions) == 3
    voxels = [int(s.sum()) for s in spheres]
    assert lesions["volume_mm3"].tolist() == pytest.approx([2.5 * v for v in voxels])
    # voxelised spheres: +10 % volume at 3.5 mm radius on 2.5 mm slices (+3 % in diameter), < 1 % above
    for diameter, radius in zip(lesions["diameter_mm"], radii, strict=True):
        assert diameter == pytest.approx(2 * radius, rel=0.05)
    assert size_bin(lesions["diameter_mm"]).tolist() == list(SIZE_BIN_LABELS)
    table = size_stratified_sensitivity(lesions)
    assert table["size_bin"].tolist() == list(SIZE_BIN_LABELS)
    assert table["n_lesions"].tolist() == [1, 1, 1]
    assert table["n_detected"].tolist() == [0, 1, 1]
    assert table["sensitivity"].tolist() == [0.0, 1.0, 1.0]


def test_size_bin_edges_and_empty_bins() -> None:
    assert size_bin([9.999, 10.0, 15.0, 20.0, 20.001]).tolist() == [
        "<10 mm", "10-20 mm", "10-20 mm", "10-20 mm", ">20 mm"]
    lesions = pd.DataFrame({"diameter_mm": [5.0, 20.0, 10.0, 3.0], "detected": [True, False, True, False]})
    table = size_stratified_sensitivity(lesions).set_index("size_bin")
    assert table.loc["<10 mm", ["n_lesions", "n_detected"]].tolist() == [2, 1]
    assert table.loc["<10 mm", "sensitivity"] == 0.5
    assert table.loc["10-20 mm", "sensitivity"] == 0.5
    assert table.loc[">20 mm", "n_lesions"] == 0 and math.isnan(table.loc[">20 mm", "sensitivity"])
    assert table.loc[">20 mm", "diameter_high_mm"] == np.inf
    with pytest.raises(ValueError, match="finite"):
        size_bin([np.nan])


# --------------------------------------------------------------------------- layering
def test_module_imports_no_sklearn_kedro_or_mlflow() -> None:
    tree = ast.parse(Path(detection.__file__).read_text(encoding="utf-8"))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert "numpy" in imported   # the walk does see the imports
    assert not imported & {"sklearn", "kedro", "kedro_datasets", "mlflow"}
