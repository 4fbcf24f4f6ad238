"""The one predictor (``pancreas_seg.inference.predictor``): resolving, checking, loading and applying
a model, with real (tiny) Keras models, real ``.keras`` files, cards and bundles on disk."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest

from pancreas_seg.imaging.preprocess import preprocess_image
from pancreas_seg.inference.forward import predict_slices, to_file_grid
from pancreas_seg.inference.model_card import CaseSplit, ModelCard, ModelMismatchError
from pancreas_seg.inference.model_store import (
    fold_models,
    read_bundle,
    read_bundle_settings,
    write_bundle,
)
from pancreas_seg.inference.predictor import PredictionSettings, Predictor
from pancreas_seg.models.io import save_model, weights_sha256

PREPROCESSING = {"image_size_px": 32, "crop_to_body": False, "label_mode": "multiclass", "context_slices": 1,
                 "intensity": {"mode": "window", "window_hu": [-100.0, 240.0]}}
SETTINGS = PredictionSettings(batch_size=4, flip_tta=False)


def _model(seed: int) -> keras.Model:
    """A functional model with named layers, as the project's builders make (weight paths survive a save)."""
    inputs = keras.Input((None, None, 1), name="image")
    outputs = keras.layers.Conv2D(3, 3, padding="same", activation="softmax", name="classes",
                                  kernel_initializer=keras.initializers.RandomNormal(seed=seed))(inputs)
    return keras.Model(inputs, outputs, name=f"probe{seed}")


def _card(model: keras.Model, cases: CaseSplit = CaseSplit(("case_001",), ("case_002",)), **changes) -> ModelCard:
    return ModelCard.for_trained_model("unet", "multiclass", PREPROCESSING, None, "Task07_Pancreas_synthetic",
                                       cases, weights_sha256(model), **changes)


def _scan() -> tuple[np.ndarray, np.ndarray]:
    hu = np.random.default_rng(0).normal(40.0, 60.0, size=(40, 36, 6)).astype(np.float32)
    return hu, np.diag([0.9, 0.9, 3.0, 1.0])


def test_settings_come_from_the_parameters_with_documented_defaults() -> None:
    settings = PredictionSettings.from_params({"batch_size": 16, "flip_tta": True, "nsd_tolerance_mm": 2.0})
    assert settings == PredictionSettings(batch_size=16, flip_tta=True, keep_largest_component=False, xla=True)
    assert PredictionSettings.from_params({"batch_size": 4, "flip_tta": True, "xla": False},
                                          flip_tta=False) == PredictionSettings(4, False, False, False)
    with pytest.raises(KeyError, match="batch_size"):
        PredictionSettings.from_params({"flip_tta": False})


def test_a_single_model_segments_a_scan_as_its_primitives_do() -> None:
    model = _model(1)
    predictor = Predictor.from_models([model], [_card(model)], SETTINGS)
    hu, affine = _scan()
    labels = predictor.segment(hu, affine, "scan")
    image, geometry = preprocess_image(hu, affine, predictor.preprocessing)
    expected = to_file_grid(predict_slices(model, image, 1, 4), geometry, "multiclass")
    assert labels.shape == hu.shape and labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, expected)
    np.testing.assert_array_equal(predictor.segment_slices(image, geometry), expected)
    assert predictor.name == "unet" and not predictor.is_cascade


def test_an_ensemble_averages_its_members_and_checks_them() -> None:
    first, second = _model(1), _model(2)
    ensemble = Predictor.from_models([first, second], [_card(first), _card(second)], SETTINGS, name="pair")
    image = np.random.default_rng(3).random((5, 32, 32), dtype=np.float32)
    expected = (predict_slices(first, image, 1, 4) + predict_slices(second, image, 1, 4)) / 2
    np.testing.assert_allclose(ensemble.predict_probabilities(image), expected, atol=1e-6)
    assert [p.shape for p in ensemble.member_probabilities(image)] == [(5, 32, 32, 3)] * 2
    other_preprocessing = _card(second).replace(preprocessing_fingerprint="0" * 16)
    with pytest.raises(ModelMismatchError):
        Predictor.from_models([first, second], [_card(first), other_preprocessing], SETTINGS)
    # fold models must form one cross-validation: two "fold 0"s do not
    with pytest.raises(ModelMismatchError, match="expected 0..1 once each"):
        Predictor.from_models([first, second], [_card(first, fold=0, n_folds=2), _card(second, fold=0, n_folds=2)],
                              SETTINGS)


def test_a_card_of_other_weights_or_an_edited_card_is_refused() -> None:
    first, second = _model(1), _model(2)
    with pytest.raises(ModelMismatchError, match="does not belong to this model file"):
        Predictor.from_models([first], [_card(second)], SETTINGS)
    edited = _card(first).replace(preprocessing={**PREPROCESSING, "image_size_px": 64})
    with pytest.raises(ModelMismatchError, match="edited after training"):
        Predictor.from_models([first], [edited], SETTINGS)


def test_with_settings_changes_post_processing_without_reloading() -> None:
    model = _model(1)
    predictor = Predictor.from_models([model], [_card(model)], SETTINGS)
    largest = predictor.with_settings(keep_largest_component=True)
    assert largest.models[0] is predictor.models[0] and predictor.settings.keep_largest_component is False
    hu, affine = _scan()
    raw, kept = predictor.segment(hu, affine), largest.segment(hu, affine)
    assert np.count_nonzero(kept) <= np.count_nonzero(raw)
    assert set(np.unique(kept[kept > 0])) <= set(np.unique(raw[raw > 0]))


def _save_version(models_dir: Path, model: keras.Model, card: ModelCard, version: str) -> None:
    root = models_dir / card.architecture
    save_model(model, root / "model.keras" / version / "model.keras")
    (root / "model_card.json" / version).mkdir(parents=True)
    (root / "model_card.json" / version / "model_card.json").write_text(card.to_json())


def test_from_reference_loads_the_newest_version_with_its_own_card(tmp_path: Path) -> None:
    old, new = _model(1), _model(2)
    _save_version(tmp_path, old, _card(old), "2026-01-01T00.00.00.000Z")
    _save_version(tmp_path, new, _card(new), "2026-02-01T00.00.00.000Z")
    predictor = Predictor.from_reference("unet", tmp_path, SETTINGS)
    assert predictor.card.version == "2026-02-01T00.00.00.000Z"
    assert predictor.model_files == [tmp_path / "unet" / "model.keras" / "2026-02-01T00.00.00.000Z" / "model.keras"]
    hu, affine = _scan()
    np.testing.assert_array_equal(predictor.segment(hu, affine),
                                  Predictor.from_models([new], [_card(new)], SETTINGS).segment(hu, affine))
    predictor.check_disjoint(["case_003"], "segments")
    with pytest.raises(ModelMismatchError, match="case_002"):
        predictor.check_disjoint(["case_002"], "segments")
    with pytest.raises(ValueError, match="use a model name"):
        Predictor.from_reference("no_such_model", tmp_path, SETTINGS)


def test_a_card_without_its_binding_is_refused_naming_the_file(tmp_path: Path) -> None:
    model = _model(1)
    _save_version(tmp_path, model, _card(model), "2026-01-01T00.00.00.000Z")
    card_file = tmp_path / "unet" / "model_card.json" / "2026-01-01T00.00.00.000Z" / "model_card.json"
    stored = json.loads(card_file.read_text())
    del stored["weights_sha256"]
    card_file.write_text(json.dumps(stored))
    with pytest.raises(ModelMismatchError, match=f"{card_file}: the model card has no weights_sha256"):
        Predictor.from_reference("unet", tmp_path, SETTINGS)


def test_a_fold_ensemble_and_a_bundle_resolve_to_the_same_predictions(tmp_path: Path) -> None:
    first, second = _model(1), _model(2)
    folds = tmp_path / "unet" / "folds"
    for k, model in enumerate((first, second)):
        save_model(model, folds / "models" / f"fold{k}.keras")
        card = _card(model, fold=k, n_folds=2, cases=CaseSplit((f"case_00{1 - k}",), (f"case_00{k}",)))
        (folds / "cards").mkdir(parents=True, exist_ok=True)
        (folds / "cards" / f"fold{k}.json").write_text(card.to_json())
    ensemble = Predictor.from_reference("unet.ensemble", tmp_path, SETTINGS)
    assert ensemble.name == "unet.ensemble" and len(ensemble.models) == 2
    bundle = write_bundle(tmp_path / "bundle", "unet.ensemble", fold_models(tmp_path, "unet"),
                          SETTINGS.to_dict())
    assert read_bundle_settings(bundle, "bundle") == SETTINGS
    from_bundle = Predictor.from_trained(read_bundle(bundle, "bundle"), SETTINGS)
    hu, affine = _scan()
    np.testing.assert_array_equal(from_bundle.segment(hu, affine), ensemble.segment(hu, affine))


def test_a_pickled_predictor_segments_as_the_original(tmp_path: Path) -> None:
    """A Dask worker hands the loaded predictor to the next node's worker by pickling it."""
    import pickle  # noqa: PLC0415

    model = _model(1)
    predictor = Predictor.from_models([model], [_card(model)], SETTINGS)
    copy = pickle.loads(pickle.dumps(predictor))
    assert copy.card == predictor.card and copy.settings == predictor.settings
    hu, affine = _scan()
    np.testing.assert_array_equal(copy.segment(hu, affine), predictor.segment(hu, affine))
