"""Model cards (``pancreas_seg.inference.model_card``): the typed, versioned card, its JSON round
trip, the preprocessing fingerprint and the checks that refuse a model used on data or settings it
is not bound to."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest

from pancreas_seg.inference.model_card import (
    SCHEMA_VERSION,
    CascadeSpec,
    CaseSplit,
    ModelCard,
    ModelMismatchError,
    check_fold_ensemble,
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


def _stored(**changes) -> dict:
    """A card as stored by the version before the schema was versioned (no ``schema_version``)."""
    card = {
        "architecture": "unet", "trained_at": "2026-11-28T10:00:00+00:00", "dataset": "Task07_Pancreas",
        "cases": {"train": ["pancreas_001", "pancreas_004", "pancreas_007"], "validation": ["pancreas_010"]},
        "preprocessing": copy.deepcopy(PREPROCESSING), "intensity_stats": copy.deepcopy(WINDOW_STATS),
        "preprocessing_fingerprint": preprocessing_fingerprint(PREPROCESSING, WINDOW_STATS),
        "weights_sha256": WEIGHTS, "label_mode": "multiclass", "mlflow_run_id": "run0", "input_shape": [96, 96, 1],
        "data_source": "synthetic", "monitor": "val_dice_pancreas", "best_value": 0.8, "epochs_completed": 3,
        "keras_backend": "tensorflow", "git_commit": "abc", "version": "2026-11-28T10.00.00.000Z",
    }
    card.update(changes)
    return card


def _card(**changes) -> ModelCard:
    stored = _stored()
    for key in [k for k in changes if k in ("cases",)]:
        changes[key] = CaseSplit.from_dict(changes[key])
    if isinstance(changes.get("cascade"), dict):
        changes["cascade"] = CascadeSpec.from_dict(changes["cascade"])
    return ModelCard.from_dict(stored).replace(**changes)


# --------------------------------------------------------------------------- the typed card
def test_a_card_of_the_unversioned_format_loads_and_round_trips() -> None:
    card = ModelCard.from_dict(_stored(), "model_card.json", version="v1")
    assert card.schema_version == SCHEMA_VERSION and card.version == "v1"
    assert card.cases == CaseSplit(("pancreas_001", "pancreas_004", "pancreas_007"), ("pancreas_010",))
    assert card.input_shape == (96, 96, 1) and card.fold is None and card.cascade is None
    stored = json.loads(card.to_json())
    assert stored["schema_version"] == SCHEMA_VERSION and "version" not in stored
    assert {k: v for k, v in stored.items() if k != "schema_version"} == {k: v for k, v in _stored().items()
                                                                         if k != "version"}
    assert ModelCard.from_json(card.to_json()) == card
    with pytest.raises(dataclasses.FrozenInstanceError):
        card.architecture = "fcn"


def test_fold_and_cascade_fields_round_trip() -> None:
    spec = {"stage1": {"architecture": "unet", "label_mode": "multiclass", "weights_sha256": "b" * 64},
            "stage2": {"architecture": "unet", "label_mode": "tumour", "input_shape": [64, 64, 1]},
            "crop": {"spacing_mm": 1.5}, "jitter_std_mm": [2.0, 3.0], "stage1_localisation": {"n": 2},
            "tumour_fraction": 0.5, "min_tumour_volume_mm3": 10.0, "stage2_crops": "out_of_fold"}
    card = ModelCard.from_dict(_stored(fold=1, n_folds=3, cv_run_id="cv", cascade=spec))
    assert card.cascade.stage2_crops == "out_of_fold"
    older = {k: v for k, v in spec.items() if k != "stage2_crops"}   # cards written before the field
    assert ModelCard.from_dict(_stored(cascade=older)).cascade.stage2_crops == "jittered_truth"
    assert (card.fold, card.n_folds, card.cv_run_id) == (1, 3, "cv")
    assert card.is_cascade and card.cascade.stage2_label_mode == "tumour" and card.cascade.jitter_std_mm == (2.0, 3.0)
    assert ModelCard.from_json(card.to_json()) == card
    assert json.loads(card.to_json())["cascade"] == spec


@pytest.mark.parametrize("missing", ["preprocessing_fingerprint", "cases", "weights_sha256", "label_mode"])
def test_a_card_without_a_binding_field_is_refused_with_how_to_retrain(missing: str) -> None:
    stored = _stored()
    del stored[missing]
    with pytest.raises(ModelMismatchError, match=rf"data/06_models/unet/x.json: the model card has no {missing}.*"
                                                 r"Retrain the model"):
        ModelCard.from_dict(stored, "data/06_models/unet/x.json")


def test_a_card_of_a_newer_schema_or_not_json_is_refused() -> None:
    with pytest.raises(ModelMismatchError, match="schema version 99 was written by a newer pancreas_seg"):
        ModelCard.from_dict(_stored(schema_version=99), "card.json")
    with pytest.raises(ModelMismatchError, match="card.json: not a JSON model card"):
        ModelCard.from_json("{not json", "card.json")
    with pytest.raises(ModelMismatchError, match="card.json: not a JSON model card"):
        ModelCard.from_json("[1, 2]", "card.json")


def test_for_trained_model_fingerprints_the_settings() -> None:
    card = ModelCard.for_trained_model("unet", "multiclass", PREPROCESSING, WINDOW_STATS, "Task07_Pancreas",
                                       CaseSplit(("a",), ("b",)), WEIGHTS)
    assert card.preprocessing_fingerprint == preprocessing_fingerprint(PREPROCESSING, WINDOW_STATS)
    assert card.trained_at and card.preprocessing_config.image_size_px == (96, 96)
    card.check_consistent()


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
    card.check_preprocessing({**PREPROCESSING, "image_size_px": [96, 96]}, WINDOW_STATS)
    card.check_consistent()


def test_check_preprocessing_lists_the_differing_setting() -> None:
    current = {**copy.deepcopy(PREPROCESSING), "image_size_px": 64}
    with pytest.raises(ModelMismatchError) as excinfo:
        _card(version=None).check_preprocessing(current, WINDOW_STATS)
    message = str(excinfo.value)
    assert "preprocessing.image_size_px: [96, 96] -> [64, 64]" in message
    assert "unet model (trained 2026-11-28T10:00:00+00:00)" in message
    assert "crop_to_body" not in message and "window_hu" not in message  # only what differs

    with pytest.raises(ModelMismatchError, match=r"intensity_stats\.foreground\.mean: 80\.0 -> 81\.0"):
        refitted = copy.deepcopy(ZSCORE_STATS)
        refitted["foreground"]["mean"] = 81.0
        card = _card(intensity_stats=ZSCORE_STATS,
                     preprocessing_fingerprint=preprocessing_fingerprint(PREPROCESSING, ZSCORE_STATS))
        card.check_preprocessing(PREPROCESSING, refitted)


def test_an_edited_card_is_inconsistent() -> None:
    stored = _stored()
    stored["preprocessing"]["crop_to_body"] = False  # edited after training; fingerprint kept
    card = ModelCard.from_dict(stored)
    with pytest.raises(ModelMismatchError, match="do not match its preprocessing fingerprint") as excinfo:
        card.check_consistent()
    assert card.preprocessing_fingerprint in str(excinfo.value)
    assert "(settings differ)" not in str(excinfo.value)


def test_check_disjoint_names_the_overlapping_cases() -> None:
    card = _card()
    card.check_disjoint(["pancreas_002", "pancreas_003"], "scores as test cases")
    with pytest.raises(ModelMismatchError) as excinfo:
        card.check_disjoint(["pancreas_002", "pancreas_010", "pancreas_004"], "scores as test cases")
    message = str(excinfo.value)
    assert "2 case(s) that this run scores as test cases: pancreas_004, pancreas_010" in message
    assert "pancreas_002" not in message


def test_check_weights() -> None:
    _card().check_weights(WEIGHTS)
    with pytest.raises(ModelMismatchError, match=r"does not belong to this model file .*bbbbbbbbbbbb\.\.\..*aaaaaaaaaaaa"):
        _card().check_weights("b" * 64)


def test_check_dataset() -> None:
    _card().check_dataset("Task07_Pancreas")
    with pytest.raises(ModelMismatchError, match="trained on dataset 'Task07_Pancreas', but this run evaluates "
                                                 "'Task07_Pancreas_smoke'"):
        _card().check_dataset("Task07_Pancreas_smoke")


# --------------------------------------------------------------------------- cascade
SPLIT = {"train": ["pancreas_001", "pancreas_004", "pancreas_007"], "validation": ["pancreas_010"]}


def _check_stage1(card: ModelCard, **changes) -> None:
    arguments = {"dataset": "Task07_Pancreas", "cases": SPLIT, "test_case_ids": ["pancreas_020"],
                 "preprocessing": PREPROCESSING, "intensity_stats": WINDOW_STATS} | changes
    arguments["cases"] = CaseSplit.from_dict(arguments["cases"])
    card.check_stage1(**arguments)


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
    card.check_cascade_weights("b" * 64, WEIGHTS)
    with pytest.raises(ModelMismatchError, match="stage-1 model"):
        card.check_cascade_weights("c" * 64, WEIGHTS)
    with pytest.raises(ModelMismatchError, match="does not belong"):
        card.check_cascade_weights("b" * 64, "c" * 64)


# --------------------------------------------------------------------------- fold ensembles
def _fold_cards() -> list[ModelCard]:
    cases = ["pancreas_001", "pancreas_004", "pancreas_007", "pancreas_010"]
    return [_card(fold=k, n_folds=2, cases={"train": [c for i, c in enumerate(cases) if i % 2 != k],
                                            "validation": [c for i, c in enumerate(cases) if i % 2 == k]})
            for k in (0, 1)]


def test_fold_cards_of_one_cross_validation_form_an_ensemble() -> None:
    check_fold_ensemble(_fold_cards())


@pytest.mark.parametrize(("change", "message"), [
    (lambda cards: cards.__setitem__(1, cards[1].replace(architecture="fcn")), "differ in architecture"),
    (lambda cards: cards.__setitem__(1, cards[1].replace(preprocessing_fingerprint="x")),
     "differ in preprocessing_fingerprint"),
    (lambda cards: cards.__setitem__(1, cards[1].replace(fold=0)), "expected 0..1 once each"),
    (lambda cards: cards.pop(), "expected 0..1 once each"),
    (lambda cards: cards.__setitem__(1, cards[1].replace(cases=CaseSplit(
        cards[1].cases.train, (*cards[1].cases.validation, "pancreas_001")))), "validation case of fold 0 and of fold 1"),
])
def test_fold_cards_that_do_not_belong_together_are_refused(change, message: str) -> None:
    cards = _fold_cards()
    change(cards)
    with pytest.raises(ModelMismatchError, match=message):
        check_fold_ensemble(cards)
