"""Lesion-level tumour detection on hand-made 3D label maps (0 background, 1 pancreas, 2 tumour).

Each case places small tumour cubes in a (12, 12, 10) volume; the expected counts follow from the
definitions in :mod:`pancreas_seg.evaluation.metrics` ("Lesions").
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from pancreas_seg.evaluation.metrics import LESION_KEYS, lesion_detection, summarise_lesions

SHAPE = (12, 12, 10)


def _labels(*boxes: tuple[slice, slice, slice], value: int = 2, pancreas: bool = True) -> np.ndarray:
    """A label map with a pancreas slab (label 1) and the given boxes set to ``value``."""
    labels = np.zeros(SHAPE, dtype=np.uint8)
    if pancreas:
        labels[1:11, 1:11, 1:9] = 1
    for box in boxes:
        labels[box] = value
    return labels


def _cube(x: int, y: int, z: int, size: int = 2) -> tuple[slice, slice, slice]:
    return np.s_[x:x + size, y:y + size, z:z + size]


LESION_A, LESION_B = _cube(2, 2, 2), _cube(7, 7, 5)


def _check(result: dict, true: int, found: int, predicted: int, fp: int) -> None:
    assert list(result) == list(LESION_KEYS)
    assert (result["lesions_true"], result["lesions_found"], result["lesions_predicted"],
            result["fp_components"]) == (true, found, predicted, fp)
    assert all(isinstance(result[k], int) for k in LESION_KEYS[:4])
    if true:
        assert result["lesion_sensitivity"] == pytest.approx(found / true)
    else:
        assert math.isnan(result["lesion_sensitivity"])


def test_one_lesion_found_by_partial_overlap() -> None:
    truth = _labels(LESION_A)
    pred = _labels(np.s_[3:5, 3:5, 3:5])  # shares the single voxel (3, 3, 3) with the lesion
    _check(lesion_detection(pred, truth), true=1, found=1, predicted=1, fp=0)
    assert lesion_detection(pred, truth)["lesion_sensitivity"] == 1.0


def test_one_lesion_missed() -> None:
    truth = _labels(LESION_A)
    _check(lesion_detection(_labels(), truth), true=1, found=0, predicted=0, fp=0)
    assert lesion_detection(_labels(), truth)["lesion_sensitivity"] == 0.0


def test_pancreas_over_the_lesion_does_not_find_it() -> None:
    """Only the tumour label counts: a prediction of pancreas (1) on the lesion is a miss."""
    truth = _labels(LESION_A)
    pred = _labels(LESION_A, value=1)
    _check(lesion_detection(pred, truth), true=1, found=0, predicted=0, fp=0)


def test_two_lesions_one_found() -> None:
    truth = _labels(LESION_A, LESION_B)
    pred = _labels(LESION_B)
    _check(lesion_detection(pred, truth), true=2, found=1, predicted=1, fp=0)
    assert lesion_detection(pred, truth)["lesion_sensitivity"] == 0.5


def test_false_positive_blob_away_from_the_truth() -> None:
    truth = _labels(LESION_A)
    pred = _labels(LESION_A, _cube(8, 2, 6))
    _check(lesion_detection(pred, truth), true=1, found=1, predicted=2, fp=1)


def test_prediction_touching_a_lesion_only_diagonally_neither_finds_it_nor_joins_it() -> None:
    """Corner contact is adjacency, not overlap: the lesion is missed and the blob is a false positive."""
    truth = _labels(_cube(2, 2, 2))       # voxels 2..3 on every axis
    pred = _labels(_cube(4, 4, 4))        # voxels 4..5: touches (3, 3, 3) at a corner only
    _check(lesion_detection(pred, truth), true=1, found=0, predicted=1, fp=1)
    # with 26-connectivity truth and prediction together would be ONE component (corner contact)
    both = _labels(_cube(2, 2, 2), _cube(4, 4, 4))
    _check(lesion_detection(both, both), true=1, found=1, predicted=1, fp=0)


def test_default_connectivity_is_26_corner_contact_joins_a_component() -> None:
    """A predicted lesion whose two parts meet at a corner is one component (26), two with 6 or 18."""
    truth = _labels(_cube(2, 2, 2))
    # part 1 overlaps the lesion; part 2 lies outside it and meets part 1 at one corner
    pred = _labels(_cube(2, 2, 2), _cube(4, 4, 4))
    _check(lesion_detection(pred, truth), true=1, found=1, predicted=1, fp=0)
    _check(lesion_detection(pred, truth, connectivity=3), true=1, found=1, predicted=1, fp=0)
    _check(lesion_detection(pred, truth, connectivity=2), true=1, found=1, predicted=2, fp=1)
    _check(lesion_detection(pred, truth, connectivity=1), true=1, found=1, predicted=2, fp=1)
    # the same for the truth: two true cubes meeting at an edge are one lesion with 18 and 26
    edge = _labels(_cube(2, 2, 2), _cube(4, 4, 2))   # share the edge x=3/4, y=3/4 along z
    _check(lesion_detection(_labels(), edge), true=1, found=0, predicted=0, fp=0)
    _check(lesion_detection(_labels(), edge, connectivity=2), true=1, found=0, predicted=0, fp=0)
    _check(lesion_detection(_labels(), edge, connectivity=1), true=2, found=0, predicted=0, fp=0)


def test_no_true_lesion_and_no_prediction() -> None:
    _check(lesion_detection(_labels(), _labels()), true=0, found=0, predicted=0, fp=0)
    empty = np.zeros(SHAPE, dtype=np.int64)
    _check(lesion_detection(empty, empty), true=0, found=0, predicted=0, fp=0)


def test_no_true_lesion_one_predicted_is_a_false_positive() -> None:
    _check(lesion_detection(_labels(LESION_B), _labels()), true=0, found=0, predicted=1, fp=1)


def test_one_predicted_component_over_two_lesions_finds_both() -> None:
    truth = _labels(LESION_A, LESION_B)
    pred = _labels(np.s_[2:9, 2:9, 2:7])   # one block covering both cubes
    _check(lesion_detection(pred, truth), true=2, found=2, predicted=1, fp=0)


def test_two_predicted_components_on_one_lesion_are_no_false_positives() -> None:
    truth = _labels(np.s_[2:8, 2:4, 2:4])
    pred = _labels(np.s_[2:3, 2:4, 2:4], np.s_[6:8, 2:4, 2:4])
    _check(lesion_detection(pred, truth), true=1, found=1, predicted=2, fp=0)


def test_other_class_and_validation() -> None:
    truth, pred = _labels(LESION_A), _labels(LESION_B)
    # pancreas = labels 1 ∪ 2: the slab is one component in both maps and overlaps
    _check(lesion_detection(pred, truth, "pancreas"), true=1, found=1, predicted=1, fp=0)
    with pytest.raises(ValueError, match="shape"):
        lesion_detection(pred[:-1], truth)
    for connectivity in (0, 4):
        with pytest.raises(ValueError, match="connectivity"):
            lesion_detection(pred, truth, connectivity=connectivity)
    with pytest.raises(KeyError):
        lesion_detection(pred, truth, "liver")


def test_summarise_lesions_pools_lesions_and_averages_fp_over_all_cases() -> None:
    found_1_of_1 = lesion_detection(_labels(LESION_A), _labels(LESION_A))
    four = [_cube(1, 1, 1, 1), _cube(1, 8, 1, 1), _cube(8, 1, 1, 1), _cube(8, 8, 6, 1)]
    found_1_of_4 = lesion_detection(_labels(four[0]), _labels(*four))
    tumour_free_2_fp = lesion_detection(_labels(LESION_A, LESION_B), _labels())
    assert (found_1_of_4["lesions_true"], found_1_of_4["lesions_found"]) == (4, 1)
    assert tumour_free_2_fp["fp_components"] == 2
    pooled = summarise_lesions([found_1_of_1, found_1_of_4, tumour_free_2_fp])
    assert pooled == {"n_cases": 3, "n_cases_with_lesions": 2, "lesions_true": 5, "lesions_found": 2,
                      "lesions_predicted": 4, "fp_components": 2,
                      "lesion_sensitivity": pytest.approx(0.4), "fp_components_per_case": pytest.approx(2 / 3)}
    # pooled, not the mean of the per-case sensitivities (which would be 0.625)
    assert pooled["lesion_sensitivity"] != pytest.approx((1.0 + 0.25) / 2)
    assert all(isinstance(pooled[k], int) for k in ("n_cases", "lesions_true", "lesions_found", "fp_components"))


def test_summarise_lesions_reads_csv_records_and_handles_no_lesions() -> None:
    frame = pd.DataFrame([{"lesions_true": 0.0, "lesions_found": 0.0, "lesions_predicted": 1.0,
                           "fp_components": 1.0, "lesion_sensitivity": np.nan}] * 2)
    pooled = summarise_lesions(frame.to_dict(orient="records"))
    assert math.isnan(pooled["lesion_sensitivity"])
    assert pooled["fp_components_per_case"] == 1.0 and pooled["n_cases_with_lesions"] == 0
    empty = summarise_lesions([])
    assert empty["n_cases"] == 0 and math.isnan(empty["fp_components_per_case"])


@pytest.mark.parametrize("bad", [{"lesions_true": np.nan}, {"lesions_found": 2}, {"fp_components": -1},
                                 {"lesions_predicted": 0.5}])
def test_summarise_lesions_rejects_impossible_counts(bad: dict) -> None:
    case = {"lesions_true": 1, "lesions_found": 1, "lesions_predicted": 1, "fp_components": 0, **bad}
    with pytest.raises(ValueError):
        summarise_lesions([case])
