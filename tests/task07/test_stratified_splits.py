"""Splits and folds stratified by tumour presence; the embedded default's test split; old splits kept.

Issue 25: tumour numbers must stand on more than one patient. A new split gives test, validation
and every cross-validation fold its share of the tumour patients; a split persisted before that is
reused as it is until ``split.recompute=true``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from pancreas_seg.phantoms import PhantomConfig, dataset_case, tumour_indices
from pancreas_seg.pipelines.ingestion.nodes import plan_split
from pancreas_seg.task07.splits import (
    SPLITS,
    assign_folds,
    assign_splits,
    composition_lines,
    has_tumour,
    make_split,
    reconcile_split,
    split_composition,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def _cases(n: int, tumours: set[int]) -> pd.DataFrame:
    """``n`` one-case patients; those with a 0-based index in ``tumours`` have a tumour."""
    return pd.DataFrame({"case_id": [f"pancreas_{i + 1:03d}" for i in range(n)],
                         "voxels_tumour": [500 if i in tumours else 0 for i in range(n)]})


def _per_split(cases: pd.DataFrame, assigned: pd.DataFrame) -> pd.DataFrame:
    """Rows: split; columns: stratum (False/True); values: patients."""
    return pd.crosstab(assigned["split"], has_tumour(cases)).reindex(index=list(SPLITS), columns=[False, True],
                                                                      fill_value=0)


def _floor_or_ceil(count: int, exact: float) -> bool:
    return math.floor(exact + 1e-9) <= count <= math.ceil(exact - 1e-9)


# --------------------------------------------------------------------------- the split
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("n", "n_tumour"), [(24, 12), (24, 7), (30, 4), (57, 40), (10, 1), (12, 0), (9, 9)])
def test_test_and_validation_get_floor_or_ceil_of_each_stratum(seed: int, n: int, n_tumour: int) -> None:
    tumours = set(np.random.default_rng(seed + 100).permutation(n)[:n_tumour].tolist())
    cases = _cases(n, tumours)
    stratified = assign_splits(cases["case_id"], 0.2, 0.3, seed=seed, strata=has_tumour(cases))
    plain = assign_splits(cases["case_id"], 0.2, 0.3, seed=seed)
    # the sizes of the splits are those of the unstratified split
    assert stratified["split"].value_counts().to_dict() == plain["split"].value_counts().to_dict()
    table = _per_split(cases, stratified)
    n_test = int(table.loc["test"].sum())
    n_val = int(table.loc["validation"].sum())
    for stratum in (False, True):
        size = int(table[stratum].sum())
        test = int(table.loc["test", stratum])
        assert _floor_or_ceil(test, size * n_test / n), (stratum, test, size)
        assert _floor_or_ceil(int(table.loc["validation", stratum]), (size - test) * n_val / (n - n_test))


def test_the_old_default_draw_gives_one_test_tumour_even_stratified() -> None:
    """The issue's case: 7 of 24 drawn tumours, 5 test patients. Stratifying alone gives 7 x 5 / 24
    = 1.46 -> 1; the exact tumour share of the default phantoms (12 of 24) is what gives 3."""
    cases = _cases(24, {2, 3, 8, 16, 21, 22, 23})   # pancreas_003, 004, 009, 017, 022, 023, 024
    plain = _per_split(cases, assign_splits(cases["case_id"], 0.2, 0.3, seed=42))
    stratified = _per_split(cases, assign_splits(cases["case_id"], 0.2, 0.3, seed=42, strata=has_tumour(cases)))
    assert plain.loc["test", True] == 1 and stratified.loc["test", True] == 1
    assert stratified.loc["validation", True] == 2   # 6 x 6 / 19 = 1.89


def test_an_even_tie_goes_to_the_tumour_stratum() -> None:
    cases = _cases(24, set(range(0, 24, 2)))   # 12 + 12, 5 test patients: 2.5 each
    for seed in range(5):
        table = _per_split(cases, assign_splits(cases["case_id"], 0.2, 0.3, seed=seed, strata=has_tumour(cases)))
        assert table.loc["test"].tolist() == [2, 3]
        assert table.loc["validation"].tolist() == [3, 3]   # of 10 and 9 left, 6 validation patients


def test_stratified_split_is_deterministic_and_independent_of_row_order() -> None:
    cases = _cases(30, set(range(0, 30, 3)))
    first = assign_splits(cases["case_id"], 0.2, 0.3, seed=5, n_folds=3, strata=has_tumour(cases))
    again = assign_splits(cases["case_id"], 0.2, 0.3, seed=5, n_folds=3, strata=has_tumour(cases))
    pd.testing.assert_frame_equal(first, again)
    backwards = cases.iloc[::-1]
    reordered = assign_splits(backwards["case_id"], 0.2, 0.3, seed=5, n_folds=3, strata=has_tumour(backwards))
    pd.testing.assert_frame_equal(reordered.loc[cases.index], first)
    others = {tuple(assign_splits(cases["case_id"], 0.2, 0.3, seed=s, strata=has_tumour(cases))["split"])
              for s in range(5)}
    assert len(others) == 5


def test_one_stratum_gives_the_unstratified_split_and_folds() -> None:
    cases = _cases(30, set())
    for seed in range(3):
        plain = assign_splits(cases["case_id"], 0.2, 0.3, seed=seed, n_folds=4)
        one = assign_splits(cases["case_id"], 0.2, 0.3, seed=seed, n_folds=4, strata=has_tumour(cases))
        pd.testing.assert_frame_equal(one, plain)


def test_a_patient_with_a_tumour_in_one_scan_is_a_tumour_patient_and_stays_in_one_split() -> None:
    ids = pd.Series([f"p{i % 20:02d}" for i in range(40)])            # 20 patients, 2 scans each
    tumour = pd.Series([i % 20 < 8 and i >= 20 for i in range(40)])   # p00..p07: tumour in the 2nd scan only
    assigned = assign_splits(ids, 0.25, 0.3, seed=3, n_folds=3, strata=tumour)
    frame = pd.DataFrame({"patient": ids, "split": assigned["split"], "fold": assigned["fold"]})
    assert frame.groupby("patient")[["split", "fold"]].nunique().max().tolist() == [1, 1]
    per_patient = frame.drop_duplicates("patient").set_index("patient")
    tumour_patients = {f"p{i:02d}" for i in range(8)}
    in_test = set(per_patient.index[per_patient["split"] == "test"])
    assert len(in_test) == 5 and len(in_test & tumour_patients) == 2   # 8 x 5 / 20 = 2


# --------------------------------------------------------------------------- the folds
@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize(("n", "n_tumour", "n_folds"), [(19, 9, 3), (19, 5, 3), (40, 13, 5), (6, 3, 2), (23, 2, 4)])
def test_every_fold_gets_floor_or_ceil_of_each_stratum(seed: int, n: int, n_tumour: int, n_folds: int) -> None:
    patients = [f"p{i:03d}" for i in range(n)]
    tumours = set(np.random.default_rng(seed).permutation(n)[:n_tumour].tolist())
    strata = {p: i in tumours for i, p in enumerate(patients)}
    folds = assign_folds(patients, n_folds, seed, strata)
    assert set(folds) == set(patients) and set(folds.values()) == set(range(n_folds))
    sizes = pd.Series(folds).value_counts()
    assert sizes.max() - sizes.min() <= 1
    for stratum in (False, True):
        members = [p for p in patients if strata[p] is stratum]
        per_fold = pd.Series([folds[p] for p in members]).value_counts().reindex(range(n_folds), fill_value=0)
        assert per_fold.max() - per_fold.min() <= 1, (stratum, per_fold.tolist())
        assert per_fold.sum() == len(members)
    assert assign_folds(list(reversed(patients)), n_folds, seed, strata) == folds   # order-independent


def test_unstratified_folds_can_leave_a_fold_without_tumours_and_stratified_ones_do_not() -> None:
    """The test can fail: the old dealing ignores tumours, so some seed starves a fold of them."""
    patients = [f"p{i:02d}" for i in range(19)]
    strata = {p: i < 6 for i, p in enumerate(patients)}   # 6 tumour patients, 3 folds: 2 each
    def tumours_per_fold(folds: dict[str, int]) -> list[int]:
        return [sum(strata[p] for p, f in folds.items() if f == k) for k in range(3)]
    plain = [tumours_per_fold(assign_folds(patients, 3, seed)) for seed in range(20)]
    assert any(counts != [2, 2, 2] for counts in plain)
    assert all(tumours_per_fold(assign_folds(patients, 3, seed, strata)) == [2, 2, 2] for seed in range(20))


def test_a_stratum_smaller_than_the_folds_degrades_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    patients = [f"p{i}" for i in range(8)]
    strata = {p: p == "p3" for p in patients}   # one tumour patient, 3 folds
    with caplog.at_level(logging.WARNING, logger="pancreas_seg.task07.splits"):
        folds = assign_folds(patients, 3, 0, strata)
    assert sorted(pd.Series(folds).value_counts().tolist()) == [2, 3, 3]
    assert "only 1 non-test patient(s) with tumour=True for 3 folds; 2 fold(s) get none" in caplog.text


def test_tiny_strata_do_not_fail_the_split(caplog: pytest.LogCaptureFixture) -> None:
    cases = _cases(8, {5})   # one tumour patient among 8: test (2) and validation get none of it
    with caplog.at_level(logging.WARNING, logger="pancreas_seg.task07.splits"):
        assigned = assign_splits(cases["case_id"], 0.25, 0.34, seed=0, n_folds=2, strata=has_tumour(cases))
    assert assigned["split"].value_counts().to_dict() == {"train": 4, "test": 2, "validation": 2}
    assert assigned.loc[5, "split"] == "train"
    assert "test gets no patient of stratum tumour=True" in caplog.text
    # the smoke environment's settings with its 4 of 8 tumour phantoms: nothing to warn about
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pancreas_seg.task07.splits"):
        smoke = make_split(_cases(8, {1, 2, 5, 6}), {"seed": 42, "test_fraction": 0.25,
                                                   "validation_fraction": 0.34, "n_folds": 2}, "x")
    assert caplog.text == ""
    tumour_of = {f"pancreas_{i + 1:03d}": i in {1, 2, 5, 6} for i in range(8)}
    assert composition_lines(split_composition(smoke, tumour_of)) == [
        "train: 4 patients, 2 with tumour", "validation: 2 patients, 1 with tumour",
        "test: 2 patients, 1 with tumour", "fold 0: 3 patients, 2 with tumour", "fold 1: 3 patients, 1 with tumour"]


# --------------------------------------------------------------------------- the persisted split
SETTINGS = {"seed": 42, "test_fraction": 0.2, "validation_fraction": 0.3, "n_folds": 3}


def test_make_split_stratifies_when_the_cases_carry_tumour_voxels() -> None:
    cases = _cases(24, set(range(12)))
    record = make_split(cases, SETTINGS, "Task07_Pancreas")
    assert record["stratified_by"] == "tumour"
    tumour_of = dict(zip(cases["case_id"], has_tumour(cases), strict=True))
    composition = split_composition(record, tumour_of)
    assert composition["test"] == {"patients": 5, "with_tumour": 3}
    assert [composition["folds"][k]["with_tumour"] for k in ("0", "1", "2")] == [3, 3, 3]
    assert "stratified_by" not in make_split(cases[["case_id"]], SETTINGS, "Task07_Pancreas")


def _old_record() -> dict:
    """A split as the previous version persisted it: unstratified, no ``stratified_by``."""
    return json.loads(json.dumps({
        "dataset": "Task07_Pancreas", "settings": SETTINGS, "created_at": "2026-12-06T21:42:44+00:00",
        "train": ["pancreas_001", "pancreas_002", "pancreas_003", "pancreas_005", "pancreas_006"],
        "validation": ["pancreas_004", "pancreas_007"], "test": ["pancreas_008", "pancreas_009"],
        "folds": {"pancreas_001": 0, "pancreas_002": 0, "pancreas_003": 0, "pancreas_004": 1,
                  "pancreas_005": 1, "pancreas_006": 2, "pancreas_007": 2},
        "dropped": []}))


def test_an_old_persisted_split_is_reused_unchanged_and_recompute_makes_a_stratified_one(
        caplog: pytest.LogCaptureFixture) -> None:
    """Through the ingestion node: the old split (no tumour in test) is kept as it is, with a warning;
    ``split.recompute`` replaces it by a stratified one."""
    valid = _cases(9, {0, 1, 2, 4}).assign(subset="training")   # 4 tumours, none of them in the old test
    old = _old_record()
    persisted = {"Task07_Pancreas": lambda: json.loads(json.dumps(old))}
    with caplog.at_level(logging.INFO):
        kept = plan_split(valid, "/data/Task07_Pancreas", persisted, dict(SETTINGS))["Task07_Pancreas"]
    for key in (*SPLITS, "folds", "settings", "created_at", "dropped"):
        assert kept[key] == old[key], key
    assert "stratified_by" not in kept
    assert kept["composition"]["test"] == {"patients": 2, "with_tumour": 0}
    assert "predates stratification by tumour presence" in caplog.text
    assert "Split of Task07_Pancreas: test: 2 patients, 0 with tumour" in caplog.text
    # n_folds changed: the folds are re-dealt, now stratified; no case moves between the splits
    redealt, _ = reconcile_split(old, valid["case_id"], {**SETTINGS, "n_folds": 2}, "Task07_Pancreas",
                                 tumour_of=dict(zip(valid["case_id"], has_tumour(valid), strict=True)))
    assert all(redealt[name] == old[name] for name in SPLITS)
    assert sorted(sum(redealt["folds"][c] == k for c in ("pancreas_001", "pancreas_002", "pancreas_003",
                                                          "pancreas_005")) for k in (0, 1)) == [2, 2]

    new = plan_split(valid, "/data/Task07_Pancreas", persisted,
                     {**SETTINGS, "recompute": True})["Task07_Pancreas"]
    assert new["stratified_by"] == "tumour"
    assert new["composition"]["test"] == {"patients": 2, "with_tumour": 1}   # 4 x 2 / 9 = 0.89
    assert new["test"] != old["test"]


# --------------------------------------------------------------------------- the embedded default
def test_the_default_phantoms_give_the_test_split_at_least_three_tumour_patients() -> None:
    """conf/base's phantoms (the real generator, labels rendered in memory) and split settings."""
    params = yaml.safe_load((REPO_ROOT / "conf" / "base" / "parameters_ingestion.yml").read_text())
    synthetic, split = params["ingestion"]["synthetic"], params["split"]
    config = PhantomConfig(**synthetic["phantom"])
    n_train, n_test, seed = int(synthetic["n_train"]), int(synthetic["n_test"]), int(synthetic["seed"])
    assert config.tumour_fraction is not None, "the default's tumour share must be exact, not drawn"
    voxels = [int((dataset_case(i, n_train, n_test, config, seed).label == 2).sum()) for i in range(n_train)]
    expected = tumour_indices(n_train, n_test, config, seed)
    assert {i for i, v in enumerate(voxels) if v > 0} == {i for i in expected if i < n_train}
    assert sum(v > 0 for v in voxels) == math.floor(n_train * config.tumour_fraction + 0.5)
    cases = pd.DataFrame({"case_id": [f"pancreas_{i + 1:03d}" for i in range(n_train)], "voxels_tumour": voxels})
    record = make_split(cases, split, "Task07_Pancreas_synthetic")
    composition = split_composition(record, dict(zip(cases["case_id"], has_tumour(cases), strict=True)))
    assert composition["test"]["with_tumour"] >= 3, composition
    assert composition["validation"]["with_tumour"] >= 3, composition
    assert all(fold["with_tumour"] >= 3 for fold in composition["folds"].values()), composition
