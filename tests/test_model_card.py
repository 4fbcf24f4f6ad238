"""Model cards (``pancreas_seg.inference.model_card``): the preprocessing fingerprint and the checks that
refuse a model used on data or settings it is not bound to."""

from __future__ import annotations

import copy
import json

import pytest

from pancreas_seg.inference.model_card import (
    ModelMismatchError,
    check_card_consistent,
    check_cascade_weights,
    check_dataset,
    check_disjoint,
    check_fold_ensemble,
    check_preprocessing,
    check_stage1,
    check_weights,
    preprocessing_fingerprint,
)

PREPROCESSING = {
    "image_size_px": 96, "target_spacing_mm": None, "crop_to_body": True, "body_threshold_hu": -500.0,
    "body_margin_mm": 10.0, "label_mode": "multiclass", "image_dtype": "float32", "context_slices": 1,
    "intensity": {"mode": "window", "window_hu": [-100.0, 240.0]},
}
WINDOW_STATS = {"mode": "window", "window_hu": [-100.0, 240.0], "foreground": None}
ZSCORE_STATS = {"mode": "zscore", "foreground": {"mean": 80.0, "std": 40.0, "p_low": -50.0, "p_high": 250.0}}
WEIGHTS = "a" * 64


def _card(**changes) -> dict:
    card = {
        "architecture": "unet", "trained_at": "2026-11-28T10:00:00+00:00", "dataset": "Task07_Pancreas",
        "cases": {"train": ["pancreas_001", "pancreas_004", "pancreas_007"], "validation": ["pancreas_010"]},
        "preprocessing": copy.deepcopy(PREPROCESSING), "intensity_stats": copy.deepcopy(WINDOW_STATS),
        "preprocessing_fingerprint": preprocessing_fingerprint(PREPROCESSING, WINDOW_STATS),
        "weights_sha256": WEIGHTS,
    }
    card.update(changes)
    return card


# --------------------------------------------------------------------------- fingerprint
def test_fingerprint_is_stable_under_equivalent_parameters() -> None:
    reference = preprocessing_fingerprint(PREPROCESSING, WINDOW_STATS)
    assert len(reference) == 16 and int(reference, 16) >= 0
    assert preprocessing_fingerprint(copy.deepcopy(PREPROCESSING), dict(WINDOW_STATS)) == reference
    equivalent = copy.deepcopy(PREPROCESSING)
    equivalent["image_size_px"] = [96, 96]                       # 96 and [96, 96] are one size
    equivalent["intensity"]["window_hu"] = [-100, 240]            # ints for the same HU values
    equivalent["intensity"]["foreground_percentiles"] = [0.5, 99.5]  # zscore-only: the stats carry it
    assert preprocessing_fingerprint(equivalent, WINDOW_STATS) == reference
    reordered = dict(reversed(list(PREPROCESSING.items())))       # key order does not matter
    assert preprocessing_fingerprint(reordered, dict(reversed(list(WINDOW_STATS.items())))) == reference
    # after a JSON round trip (what the card stores)
    assert preprocessing_fingerprint(json.loads(json.dumps(PREPROCESSING)),
                                     json.loads(json.dumps(WINDOW_STATS))) == reference


@pytest.mark.parametrize(("key", "value"), [
    ("image_size_px", 64), ("image_size_px", [96, 64]), ("crop_to_body", False), ("context_slices", 3),
    ("label_mode", "pancreas"), ("target_spacing_mm", 1.5), ("body_margin_mm", 20.0)])
def test_fingerprint_changes_with_a_real_setting(key: str, value) -> None:
    changed = {**copy.deepcopy(PREPROCESSING), key: value}
    assert preprocessing_fingerprint(changed, WINDOW_STATS) != preprocessing_fingerprint(PREPROCESSING, WINDOW_STATS)


def test_fingerprint_changes_with_the_intensity_window_and_stats() -> None:
    reference = preprocessing_fingerprint(PREPROCESSING, WINDOW_STATS)
    window = copy.deepcopy(PREPROCESSING)
    window["intensity"]["window_hu"] = [-150.0, 250.0]
    assert preprocessing_fingerprint(window, WINDOW_STATS) != reference
    assert preprocessing_fingerprint(PREPROCESSING, ZSCORE_STATS) != reference
    refitted = copy.deepcopy(ZSCORE_STATS)
    refitted["foreground"]["mean"] = 81.0  # fitted on other training cases
    assert preprocessing_fingerprint(PREPROCESSING, refitted) != preprocessing_fingerprint(PREPROCESSING, ZSCORE_STATS)
    assert preprocessing_fingerprint(PREPROCESSING, None) != reference


# --------------------------------------------------------------------------- checks
def test_check_preprocessing_accepts_the_same_settings() -> None:
    card = _card()
    check_preprocessing(card, {**PREPROCESSING, "image_size_px": [96, 96]}, WINDOW_STATS)
    check_card_consistent(card)


def test_check_preprocessing_lists_the_differing_setting() -> None:
    current = {**copy.deepcopy(PREPROCESSING), "image_size_px": 64}
    with pytest.raises(ModelMismatchError) as excinfo:
        check_preprocessing(_card(), current, WINDOW_STATS)
    message = str(excinfo.value)
    assert "preprocessing.image_size_px: [96, 96] -> [64, 64]" in message
    assert "unet model (trained 2026-11-28T10:00:00+00:00)" in message
    assert "crop_to_body" not in message and "window_hu" not in message  # only what differs

    with pytest.raises(ModelMismatchError, match=r"intensity_stats\.foreground\.mean: 80\.0 -> 81\.0"):
        refitted = copy.deepcopy(ZSCORE_STATS)
        refitted["foreground"]["mean"] = 81.0
        card = _card(intensity_stats=ZSCORE_STATS,
                     preprocessing_fingerprint=preprocessing_fingerprint(PREPROCESSING, ZSCORE_STATS))
        check_preprocessing(card, PREPROCESSING, refitted)


def test_check_preprocessing_refuses_a_card_without_fingerprint() -> None:
    card = _card()
    del card["preprocessing_fingerprint"]
    with pytest.raises(ModelMismatchError, match="no preprocessing fingerprint"):
        check_preprocessing(card, PREPROCESSING, WINDOW_STATS)


def test_an_edited_card_is_inconsistent() -> None:
    card = _card()
    card["preprocessing"]["crop_to_body"] = False  # edited after training; fingerprint kept
    with pytest.raises(ModelMismatchError, match="do not match its preprocessing fingerprint") as excinfo:
        check_card_consistent(card)
    assert card["preprocessing_fingerprint"] in str(excinfo.value)
    assert "(settings differ)" not in str(excinfo.value)
    del card["preprocessing_fingerprint"]
    with pytest.raises(ModelMismatchError, match="no preprocessing fingerprint"):
        check_card_consistent(card)


def test_check_disjoint_names_the_overlapping_cases() -> None:
    card = _card()
    check_disjoint(card, ["pancreas_002", "pancreas_003"], "scores as test cases")
    with pytest.raises(ModelMismatchError) as excinfo:
        check_disjoint(card, ["pancreas_002", "pancreas_010", "pancreas_004"], "scores as test cases")
    message = str(excinfo.value)
    assert "2 case(s) that this run scores as test cases: pancreas_004, pancreas_010" in message
    assert "pancreas_002" not in message
    card_without_cases = _card()
    del card_without_cases["cases"]
    with pytest.raises(ModelMismatchError, match="does not list its training cases"):
        check_disjoint(card_without_cases, ["pancreas_002"], "scores as test cases")


def test_check_weights() -> None:
    check_weights(_card(), WEIGHTS)
    with pytest.raises(ModelMismatchError, match=r"does not belong to this model file .*bbbbbbbbbbbb\.\.\..*aaaaaaaaaaaa"):
        check_weights(_card(), "b" * 64)
    with pytest.raises(ModelMismatchError, match="does not belong"):
        check_weights({k: v for k, v in _card().items() if k != "weights_sha256"}, WEIGHTS)


def test_check_dataset() -> None:
    check_dataset(_card(), "Task07_Pancreas")
    with pytest.raises(ModelMismatchError, match="trained on dataset 'Task07_Pancreas', but this run evaluates "
                                                 "'Task07_Pancreas_smoke'"):
        check_dataset(_card(), "Task07_Pancreas_smoke")
    with pytest.raises(ModelMismatchError, match="trained on dataset None"):
        check_dataset({k: v for k, v in _card().items() if k != "dataset"}, "Task07_Pancreas")


# --------------------------------------------------------------------------- cascade
SPLIT = {"train": ["pancreas_001", "pancreas_004", "pancreas_007"], "validation": ["pancreas_010"]}


def _check_stage1(card: dict, **changes) -> None:
    arguments = {"dataset": "Task07_Pancreas", "cases": SPLIT, "test_case_ids": ["pancreas_020"],
                 "preprocessing": PREPROCESSING, "intensity_stats": WINDOW_STATS} | changes
    check_stage1(card, **arguments)


def test_stage1_bound_to_the_current_split_and_settings_is_accepted() -> None:
    _check_stage1(_card())
    _check_stage1(_card(label_mode="pancreas"))


@pytest.mark.parametrize(("card_changes", "call_changes", "message"), [
    ({"label_mode": "tumour"}, {}, "localise the pancreas"),
    ({}, {"dataset": "Task07_Pancreas_smoke"}, "trained on dataset"),
    ({}, {"test_case_ids": ["pancreas_010"]}, "pancreas_010"),
    ({}, {"cases": {"train": SPLIT["train"][:2], "validation": ["pancreas_010", "pancreas_007"]}},
     "cases that moved: pancreas_007"),
    ({}, {"preprocessing": {**PREPROCESSING, "image_size_px": 64}}, "image_size_px"),
])
def test_stage1_of_another_split_dataset_or_preprocessing_is_refused(card_changes, call_changes, message) -> None:
    with pytest.raises(ModelMismatchError, match=message):
        _check_stage1(_card(**card_changes), **call_changes)


def test_cascade_card_must_belong_to_both_stages() -> None:
    card = _card(architecture="cascade", cascade={"stage1": {"weights_sha256": "b" * 64}})
    check_cascade_weights(card, "b" * 64, WEIGHTS)
    with pytest.raises(ModelMismatchError, match="stage-1 model"):
        check_cascade_weights(card, "c" * 64, WEIGHTS)
    with pytest.raises(ModelMismatchError, match="does not belong"):
        check_cascade_weights(card, "b" * 64, "c" * 64)


# --------------------------------------------------------------------------- fold ensembles
def _fold_cards() -> list[dict]:
    cases = ["pancreas_001", "pancreas_004", "pancreas_007", "pancreas_010"]
    return [_card(fold=k, n_folds=2, cases={"train": [c for i, c in enumerate(cases) if i % 2 != k],
                                            "validation": [c for i, c in enumerate(cases) if i % 2 == k]})
            for k in (0, 1)]


def test_fold_cards_of_one_cross_validation_form_an_ensemble() -> None:
    check_fold_ensemble(_fold_cards())


@pytest.mark.parametrize(("change", "message"), [
    (lambda cards: cards[1].update(architecture="fcn"), "differ in architecture"),
    (lambda cards: cards[1].update(preprocessing_fingerprint="x"), "differ in preprocessing_fingerprint"),
    (lambda cards: cards[1].update(fold=0), "expected 0..1 once each"),
    (lambda cards: cards.pop(), "expected 0..1 once each"),
    (lambda cards: cards[1]["cases"]["validation"].append("pancreas_001"), "validation case of fold 0 and of fold 1"),
])
def test_fold_cards_that_do_not_belong_together_are_refused(change, message: str) -> None:
    cards = _fold_cards()
    change(cards)
    with pytest.raises(ModelMismatchError, match=message):
        check_fold_ensemble(cards)
