"""Patient-level, seeded train/validation/test splits and k-fold assignment."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pancreas_seg.task07.splits import assign_splits


def _patients(n: int) -> pd.Series:
    return pd.Series([f"pancreas_{i:03d}" for i in range(1, n + 1)])


def _split_of_patient(ids: pd.Series, assigned: pd.DataFrame) -> dict[str, str]:
    frame = pd.DataFrame({"patient": ids.astype(str), "split": assigned["split"]})
    per_patient = frame.groupby("patient")["split"].nunique()
    assert per_patient.max() == 1, "a patient is in two splits"
    return frame.drop_duplicates("patient").set_index("patient")["split"].to_dict()


def test_fractions_are_respected_for_100_patients() -> None:
    ids = _patients(100)
    assigned = assign_splits(ids, test_fraction=0.2, validation_fraction=0.3, seed=42)
    assert list(assigned.columns) == ["split", "fold"]
    assert assigned.index.equals(ids.index)
    counts = assigned["split"].value_counts().to_dict()
    assert counts == {"train": 56, "validation": 24, "test": 20}
    assert set(assigned["fold"]) == {-1}  # no folds requested


def test_one_patient_is_never_in_two_splits_with_duplicate_ids() -> None:
    # 40 patients, 25 of them scanned twice (two rows, one patient id), shuffled row order
    rng = np.random.default_rng(0)
    ids = [f"patient_{i:02d}" for i in range(40)] + [f"patient_{i:02d}" for i in range(25)]
    rng.shuffle(ids)
    series = pd.Series(ids, index=pd.RangeIndex(100, 165))
    for seed in range(10):
        assigned = assign_splits(series, test_fraction=0.25, validation_fraction=0.3, seed=seed)
        assert assigned.index.equals(series.index)
        mapping = _split_of_patient(series, assigned)
        assert len(mapping) == 40
        assert sorted(pd.Series(mapping).value_counts().to_dict().items()) == [
            ("test", 10), ("train", 21), ("validation", 9)]


def test_same_seed_is_deterministic_and_independent_of_row_order() -> None:
    ids = _patients(30)
    first = assign_splits(ids, 0.2, 0.3, seed=7, n_folds=3)
    again = assign_splits(ids, 0.2, 0.3, seed=7, n_folds=3)
    pd.testing.assert_frame_equal(first, again)
    reversed_ids = ids.iloc[::-1]
    reordered = assign_splits(reversed_ids, 0.2, 0.3, seed=7, n_folds=3)
    pd.testing.assert_frame_equal(reordered.loc[ids.index], first)


def test_different_seeds_give_different_splits() -> None:
    ids = _patients(30)
    splits = {seed: tuple(assign_splits(ids, 0.2, 0.3, seed=seed)["split"]) for seed in range(5)}
    assert len(set(splits.values())) == 5
    # but the sizes never change
    for split in splits.values():
        assert split.count("test") == 6 and split.count("validation") == 7


def test_k_fold_only_for_non_test_patients_and_balanced() -> None:
    ids = _patients(100)
    assigned = assign_splits(ids, 0.2, 0.3, seed=3, n_folds=5)
    test_rows = assigned["split"] == "test"
    assert (assigned.loc[test_rows, "fold"] == -1).all()
    development = assigned.loc[~test_rows, "fold"]
    assert set(development) == {0, 1, 2, 3, 4}
    assert development.value_counts().tolist() == [16] * 5
    assert assigned["fold"].dtype.kind == "i"


def test_k_fold_with_uneven_sizes_differs_by_at_most_one_and_keeps_patients_together() -> None:
    ids = pd.Series([f"p{i % 23}" for i in range(46)])  # 23 patients, 2 scans each
    assigned = assign_splits(ids, 0.2, 0.3, seed=1, n_folds=4)
    frame = pd.DataFrame({"patient": ids, "fold": assigned["fold"], "split": assigned["split"]})
    assert frame.groupby("patient")["fold"].nunique().max() == 1
    per_patient = frame.drop_duplicates("patient")
    folds = per_patient.loc[per_patient["split"] != "test", "fold"]
    sizes = folds.value_counts()
    assert set(folds) == {0, 1, 2, 3}
    assert sizes.max() - sizes.min() <= 1
    assert (per_patient.loc[per_patient["split"] == "test", "fold"] == -1).all()


@pytest.mark.parametrize(("n", "test_fraction", "validation_fraction"), [
    (0, 0.2, 0.3),
    (3, 0.5, 0.3),   # 2 test + at least 1 validation leaves no training patient
    (2, 0.9, 0.0),
])
def test_too_few_patients_raise(n: int, test_fraction: float, validation_fraction: float) -> None:
    with pytest.raises(ValueError, match="too few"):
        assign_splits(_patients(n), test_fraction, validation_fraction, seed=0)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_fractions_outside_unit_interval_raise(bad: float) -> None:
    with pytest.raises(ValueError, match="fraction"):
        assign_splits(_patients(10), bad, 0.3, seed=0)
    with pytest.raises(ValueError, match="fraction"):
        assign_splits(_patients(10), 0.2, bad, seed=0)


def test_small_sets_still_get_a_validation_patient() -> None:
    assigned = assign_splits(_patients(4), test_fraction=0.25, validation_fraction=0.1, seed=0)
    assert assigned["split"].value_counts().to_dict() == {"train": 2, "test": 1, "validation": 1}
