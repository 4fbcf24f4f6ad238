"""Patient-level, seeded train/validation/test splits, k-fold assignment and the persisted split."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pancreas_seg.task07.splits import (
    SPLITS,
    SplitMismatchError,
    assign_splits,
    fold_manifest,
    make_split,
    manifest_folds,
    reconcile_split,
    split_assignment,
)


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


# --------------------------------------------------------------------------- persisted split
SETTINGS = {"seed": 42, "test_fraction": 0.2, "validation_fraction": 0.3, "n_folds": 0}
DATASET = "Task07_Pancreas"


def _cases(n: int) -> pd.DataFrame:
    return pd.DataFrame({"case_id": _patients(n)})


def _membership(record: dict) -> dict[str, str]:
    return {case: name for name in SPLITS for case in record[name]}


def test_make_split_is_deterministic_from_the_seed_and_matches_assign_splits() -> None:
    cases = _cases(30)
    first = make_split(cases, SETTINGS, DATASET)
    again = make_split(cases.iloc[::-1].reset_index(drop=True), dict(SETTINGS), DATASET)
    for key in ("dataset", "settings", *SPLITS, "folds", "dropped"):
        assert first[key] == again[key], key
    assert first["dataset"] == DATASET and first["dropped"] == []
    assert first["settings"] == SETTINGS
    assert [len(first[name]) for name in SPLITS] == [17, 7, 6]
    assert sorted(c for name in SPLITS for c in first[name]) == sorted(cases["case_id"])
    assert all(first[name] == sorted(first[name]) for name in SPLITS)
    assigned = assign_splits(cases["case_id"], 0.2, 0.3, seed=42)
    assert _membership(first) == dict(zip(cases["case_id"], assigned["split"], strict=True))
    other = make_split(cases, {**SETTINGS, "seed": 7}, DATASET)
    assert _membership(other) != _membership(first)


def test_make_split_keeps_patients_together_and_records_folds() -> None:
    cases = pd.DataFrame({"case_id": [f"scan_{i:02d}" for i in range(20)],
                          "patient_id": [f"patient_{i // 2:02d}" for i in range(20)]})
    record = make_split(cases, {**SETTINGS, "n_folds": 3}, DATASET)
    split_of = _membership(record)
    for patient, group in cases.groupby("patient_id"):
        assert len({split_of[c] for c in group["case_id"]}) == 1, patient
        assert len({record["folds"].get(c, -1) for c in group["case_id"]}) == 1, patient
    assert set(record["folds"]) == set(record["train"]) | set(record["validation"])
    assert set(record["folds"].values()) == {0, 1, 2}


def test_reconcile_reuses_the_persisted_split_unchanged() -> None:
    record = make_split(_cases(20), SETTINGS, DATASET)
    reused, dropped = reconcile_split(record, _patients(20)[::-1], dict(SETTINGS), DATASET)
    assert dropped == []
    assert reused == record
    # a missing n_folds is the default 0, not a changed setting
    reused, _ = reconcile_split(record, _patients(20), {"seed": 42, "test_fraction": 0.2,
                                                        "validation_fraction": 0.3}, DATASET)
    assert _membership(reused) == _membership(record)


def test_a_dropped_case_is_removed_and_no_other_case_moves() -> None:
    record = make_split(_cases(20), {**SETTINGS, "n_folds": 4}, DATASET)
    victim = record["train"][1]
    remaining = [c for c in _patients(20) if c != victim]
    updated, dropped = reconcile_split(record, remaining, SETTINGS | {"n_folds": 4}, DATASET)
    assert dropped == [victim]
    before, after = _membership(record), _membership(updated)
    assert victim not in after and victim not in updated["folds"]
    assert after == {c: s for c, s in before.items() if c != victim}
    assert updated["folds"] == {c: f for c, f in record["folds"].items() if c != victim}
    assert [d["case_id"] for d in updated["dropped"]] == [victim]
    assert updated["settings"] == record["settings"] and updated["created_at"] == record["created_at"]
    # the input record is not modified, and a later run keeps the history of dropped cases
    assert victim in record["train"] and record["dropped"] == []
    second = record["test"][0]
    again, dropped_again = reconcile_split(updated, [c for c in remaining if c != second],
                                           SETTINGS | {"n_folds": 4}, DATASET)
    assert dropped_again == [second]
    assert [d["case_id"] for d in again["dropped"]] == [victim, second]


@pytest.mark.parametrize(("setting", "value"), [
    ("seed", 7), ("test_fraction", 0.25), ("validation_fraction", 0.2)])
def test_changed_split_settings_raise_naming_the_setting(setting: str, value: float) -> None:
    record = make_split(_cases(20), SETTINGS, DATASET)
    with pytest.raises(SplitMismatchError) as excinfo:
        reconcile_split(record, _patients(20), {**SETTINGS, setting: value}, DATASET)
    message = str(excinfo.value)
    assert f"split.{setting}: {SETTINGS[setting]} -> {value}" in message
    assert "split.recompute=true" in message
    assert sum(f"split.{name}:" in message for name in SETTINGS) == 1  # only the changed one


def test_unknown_new_cases_raise_naming_them() -> None:
    record = make_split(_cases(20), SETTINGS, DATASET)
    current = [*_patients(20), "pancreas_777", "pancreas_555"]
    with pytest.raises(SplitMismatchError, match=r"2 labelled case\(s\).*pancreas_555, pancreas_777"):
        reconcile_split(record, current, SETTINGS, DATASET)


def test_a_split_of_another_dataset_raises() -> None:
    record = make_split(_cases(20), SETTINGS, "Task07_Pancreas_synthetic")
    with pytest.raises(SplitMismatchError, match="'Task07_Pancreas_synthetic', not 'Task07_Pancreas'"):
        reconcile_split(record, _patients(20), SETTINGS, DATASET)


def test_no_training_case_left_raises() -> None:
    record = make_split(_cases(5), {**SETTINGS, "test_fraction": 0.2, "validation_fraction": 0.5}, DATASET)
    assert len(record["train"]) == 2
    remaining = [c for c in _patients(5) if c not in record["train"]]
    with pytest.raises(SplitMismatchError, match="no training case"):
        reconcile_split(record, remaining, {**SETTINGS, "validation_fraction": 0.5}, DATASET)


def test_split_assignment_gives_split_and_fold_per_case() -> None:
    record = make_split(_cases(20), {**SETTINGS, "n_folds": 3}, DATASET)
    wanted = [record["test"][0], record["train"][0], record["validation"][0]]
    frame = split_assignment(record, wanted)
    assert list(frame.index) == wanted and list(frame.columns) == ["split", "fold"]
    assert list(frame["split"]) == ["test", "train", "validation"]
    assert frame.loc[wanted[0], "fold"] == -1
    assert frame.loc[wanted[1], "fold"] == record["folds"][wanted[1]] >= 0
    assert frame["fold"].dtype.kind == "i"
    with pytest.raises(KeyError):
        split_assignment(record, ["pancreas_999"])  # not in the split: never silently "train"


def test_manifest_dataset_names_the_one_dataset_or_says_how_to_rebuild() -> None:
    from pancreas_seg.task07.splits import manifest_dataset  # noqa: PLC0415

    assert manifest_dataset(pd.DataFrame({"case_id": ["a", "b"], "dataset": ["Task07", "Task07"]})) == "Task07"
    with pytest.raises(ValueError, match="no 'dataset' column.*--pipelines=data"):
        manifest_dataset(pd.DataFrame({"case_id": ["a"]}))
    with pytest.raises(ValueError, match="mixes datasets"):
        manifest_dataset(pd.DataFrame({"case_id": ["a", "b"], "dataset": ["x", "y"]}))


def test_changing_n_folds_redeals_folds_without_moving_a_case() -> None:
    record = make_split(_cases(20), SETTINGS, DATASET)
    assert record["folds"] == {}
    updated, dropped = reconcile_split(record, _patients(20), {**SETTINGS, "n_folds": 3}, DATASET)
    assert dropped == [] and _membership(updated) == _membership(record)
    development = set(record["train"]) | set(record["validation"])
    assert set(updated["folds"]) == development
    sizes = pd.Series(updated["folds"]).value_counts()
    assert set(sizes.index) == {0, 1, 2} and sizes.max() - sizes.min() <= 1
    assert updated["settings"]["n_folds"] == 3 and record["settings"]["n_folds"] == 0
    # the same folds as a split made with n_folds=3 from the start (same patients, same seed)
    fresh = make_split(_cases(20), {**SETTINGS, "n_folds": 3}, DATASET)
    assert updated["folds"] == fresh["folds"]
    # reused as it is on the next run; back to 0 folds clears them
    again, _ = reconcile_split(updated, _patients(20), {**SETTINGS, "n_folds": 3}, DATASET)
    assert again["folds"] == updated["folds"]
    cleared, _ = reconcile_split(updated, _patients(20), SETTINGS, DATASET)
    assert cleared["folds"] == {} and _membership(cleared) == _membership(record)


def test_redealt_folds_keep_a_patients_scans_together() -> None:
    record = make_split(_cases(20), SETTINGS, DATASET)
    patient_of = {c: f"patient{i // 2}" for i, c in enumerate(sorted(_patients(20)))}
    updated, _ = reconcile_split(record, _patients(20), {**SETTINGS, "n_folds": 2}, DATASET, patient_of)
    by_patient: dict[str, set[int]] = {}
    for case, fold in updated["folds"].items():
        by_patient.setdefault(patient_of[case], set()).add(fold)
    assert all(len(folds) == 1 for folds in by_patient.values())


def test_fold_manifest_validates_on_one_fold_and_never_touches_test_cases() -> None:
    record = make_split(_cases(20), {**SETTINGS, "n_folds": 3}, DATASET)
    manifest = split_assignment(record, _patients(20)).rename_axis("case_id").reset_index()
    manifest.loc[len(manifest)] = {"case_id": "unlabelled_1", "split": "unlabelled", "fold": -1}
    assert manifest_folds(manifest) == 3
    development = set(record["train"]) | set(record["validation"])
    for fold in range(3):
        view = fold_manifest(manifest, fold)
        assert set(view.loc[view["split"] == "validation", "case_id"]) == {c for c, f in record["folds"].items() if f == fold}
        assert set(view.loc[view["split"] == "train", "case_id"]) == development - set(view.loc[view["split"] == "validation", "case_id"])
        assert set(view.loc[view["split"] == "test", "case_id"]) == set(record["test"])
        assert view.loc[view["case_id"] == "unlabelled_1", "split"].item() == "unlabelled"
    assert set(manifest["split"]) == {"train", "validation", "test", "unlabelled"}   # input unchanged
    with pytest.raises(ValueError, match="fold 3 does not exist"):
        fold_manifest(manifest, 3)
    with pytest.raises(ValueError, match="split.n_folds >= 2"):
        manifest_folds(manifest.assign(fold=-1))
