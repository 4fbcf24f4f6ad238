"""The cascade cross-validated, nnU-Net's way: stage 2's crops come only from OUT-OF-FOLD stage-1 predictions.

Real tiny Keras models and real NIfTI cases on disk, the real nodes of ``cv_cascade``
(``locate_out_of_fold``, ``prepare_cv_crops``, ``train_stage2_folds``,
``predict_cascade_out_of_fold``, ``score_cascade_out_of_fold``) and a real sqlite MLflow store
under ``tmp_path``.

The two stage-1 "fold models" are 1x1 convolutions that threshold the windowed intensity at
different levels, so the box each one places on a case differs: fold model 0 finds the whole
pancreas (core and rim), fold model 1 only its bright core. Each crop's box therefore shows which
fold model placed it, and the test checks it was the one that held the case out.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import keras
import mlflow
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from kedro.config import OmegaConfigLoader

import pancreas_seg.pipelines.cascade.nodes as cascade_nodes
from pancreas_seg.cascade.crops import CropConfig, CropGeometry, locate_pancreas
from pancreas_seg.cascade.out_of_fold import (
    FoldCases,
    assign_out_of_fold,
    check_crop_source,
    check_out_of_fold_crops,
    out_of_fold_record,
)
from pancreas_seg.core.labels import probabilities_to_labels
from pancreas_seg.imaging.geometry import ScanGeometry
from pancreas_seg.imaging.nifti_io import load_nifti
from pancreas_seg.imaging.preprocess import PreprocessingConfig, preprocess_crop_image, preprocess_image
from pancreas_seg.inference.cascade import background_probabilities, predict_tiled
from pancreas_seg.inference.forward import predict_slices, to_file_grid
from pancreas_seg.inference.model_card import CaseSplit, ModelCard, ModelMismatchError
from pancreas_seg.inference.model_store import read_bundle
from pancreas_seg.inference.predictor import PredictionSettings, Predictor
from pancreas_seg.models.io import save_model, weights_sha256
from pancreas_seg.settings import CONFIG_LOADER_ARGS

CONF = Path(__file__).resolve().parents[2] / "conf"
DATASET = "Task07_Pancreas_synthetic"
PREPROCESSING = {"image_size_px": 32, "crop_to_body": False, "label_mode": "multiclass", "context_slices": 1,
                 "intensity": {"mode": "window", "window_hu": [-100.0, 240.0]}}
CROP = CropConfig(spacing_mm=0.8, size_px=(16, 24), margin_mm=4.0, z_margin_mm=5.0, context_mm=4.0).to_dict()
EVALUATION = {"batch_size": 8, "flip_tta": False, "xla": False, "nsd_tolerance_mm": 2.0}
INFERENCE = {"batch_size": 8, "flip_tta": False, "xla": False}
FOLD_OF = {"case_001": 0, "case_002": 1, "case_003": 0, "case_004": 1, "case_005": 0, "case_006": 1}
THRESHOLDS = {0: 0.5, 1: 0.65}   # fold model 0: core and rim (> 70 HU); fold model 1: the core only (> 121 HU)


# --------------------------------------------------------------------------- the bookkeeping alone
def test_each_case_is_assigned_the_fold_model_that_held_it_out() -> None:
    folds = [FoldCases.of(0, ["b", "d"], ["a", "c"]), FoldCases.of(1, ["a", "c"], ["b", "d"])]
    assert assign_out_of_fold(["d", "a", "b", "c"], folds) == {"a": 0, "b": 1, "c": 0, "d": 1}
    with pytest.raises(ValueError, match="case e is held out by the stage-1 fold model"):
        assign_out_of_fold(["e"], folds)
    with pytest.raises(ValueError, match="also trained on it"):
        assign_out_of_fold(["a"], [FoldCases.of(0, ["a"], ["a"])])
    with pytest.raises(ValueError, match="crop_source"):
        check_crop_source("predicted")

    index = {c: out_of_fold_record(f, f"sha{f}", [0, 1, 0, 1, 0, 1]) for c, f in {"a": 0, "b": 1}.items()}
    check_out_of_fold_crops(index, ["a", "b"], folds, {0: "sha0", 1: "sha1"})
    for bad, message in ((out_of_fold_record(1, "sha1", None), "trained on it"),
                         (out_of_fold_record(0, "other", None), "other stage-1 weights"),
                         (out_of_fold_record(2, "sha2", None), "not among the fold models"),
                         ({"source": "jittered_truth", "stage1_fold": None}, "not from an out-of-fold")):
        with pytest.raises(ValueError, match=message):
            check_out_of_fold_crops({**index, "a": bad}, ["a", "b"], folds, {0: "sha0", 1: "sha1"})
    with pytest.raises(ValueError, match="case c has no stage-2 crop"):
        check_out_of_fold_crops(index, ["c"], folds)


# --------------------------------------------------------------------------- real models, real cases
def _threshold_model(threshold: float) -> keras.Model:
    """(B, H, W, 1) windowed intensity in [0, 1] -> softmax (background, pancreas, tumour): pancreas iff x > threshold."""
    inputs = keras.Input((None, None, 1))
    # functional, as the real models: its weight paths (part of the weights hash) survive a save and load
    model = keras.Model(inputs, keras.layers.Conv2D(3, 1, activation="softmax", name="threshold")(inputs))
    model.layers[-1].set_weights([np.array([[[[-40.0, 40.0, 0.0]]]], np.float32),
                                  np.array([40.0 * threshold, -40.0 * threshold, -50.0], np.float32)])
    return model


def _write_case(folder: Path, case_id: str, seed: int) -> dict[str, str]:
    """A CT (20 HU tissue; a pancreas of 150 HU core and 90 HU rim, a tumour in the core of every
    other case) and its label (0/1/2), as NIfTI files."""
    rng = np.random.default_rng(seed)
    hu = rng.normal(20.0, 5.0, size=(64, 56, 20)).astype(np.float32)
    x, y, z = np.meshgrid(*(np.arange(n) for n in hu.shape), indexing="ij")
    radius = ((x - (28 + seed)) / 16) ** 2 + ((y - (30 - seed)) / 7) ** 2 + ((z - 9) / 4) ** 2
    hu[radius <= 1] = 90.0
    hu[radius <= 0.55] = 150.0
    label = (radius <= 1).astype(np.uint8)
    if seed % 2 == 0:
        label[radius <= 0.2] = 2
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    paths = {"image_path": str(folder / f"{case_id}_ct.nii.gz"), "label_path": str(folder / f"{case_id}_label.nii.gz")}
    nib.save(nib.Nifti1Image(hu, affine), paths["image_path"])
    nib.save(nib.Nifti1Image(label, affine), paths["label_path"])
    return paths


@pytest.fixture
def cases(tmp_path: Path) -> tuple[pd.DataFrame, dict, dict]:
    """Six development cases in two folds and one test case: manifest, preprocessed slices, geometry."""
    rows, slices, geometry = [], {}, {}
    config = PreprocessingConfig.from_params(PREPROCESSING)
    for seed, case_id in enumerate([*FOLD_OF, "case_007"]):
        paths = _write_case(tmp_path, case_id, seed)
        ct = nib.load(paths["image_path"])
        image, scan = preprocess_image(np.asarray(ct.dataobj, dtype=np.float32), ct.affine, config)
        slices[f"{case_id}/image"] = lambda image=image: image
        geometry[case_id] = scan.to_dict()
        rows.append({"case_id": case_id, **paths, "split": "test" if case_id == "case_007" else "train",
                     "fold": FOLD_OF.get(case_id, -1), "dataset": DATASET, "source": "synthetic"})
    return pd.DataFrame(rows), slices, geometry


@pytest.fixture
def mlflow_store(tmp_path: Path):
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        experiment = mlflow.create_experiment("cv_cascade", artifact_location=(tmp_path / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment):   # kedro-mlflow's parent run
            yield experiment
    finally:
        mlflow.set_tracking_uri(previous)


def _stage1_folds() -> tuple[dict, dict]:
    """The unet's cv outputs as the cascade reads them: ``{"fold<k>": model}``, ``{"fold<k>": card}``."""
    models, cards = {}, {}
    for fold, threshold in THRESHOLDS.items():
        model = _threshold_model(threshold)
        held_out = sorted(c for c, f in FOLD_OF.items() if f == fold)
        trained = sorted(c for c, f in FOLD_OF.items() if f != fold)
        models[f"fold{fold}"] = model
        cards[f"fold{fold}"] = ModelCard.for_trained_model(
            "unet", "multiclass", PREPROCESSING, None, DATASET, CaseSplit(tuple(trained), tuple(held_out)),
            weights_sha256(model), fold=fold, n_folds=2, data_source="synthetic", input_shape=(32, 32, 1))
    return models, cards


def _box_of(model: keras.Model, case_id: str, slices: dict, geometry: dict) -> list[int]:
    """Where ``model`` as stage 1 puts the pancreas box of a case, as at inference."""
    labels = probabilities_to_labels(predict_slices(model, slices[f"{case_id}/image"](), 1, 8), "multiclass")
    return locate_pancreas(labels, ScanGeometry.from_dict(geometry[case_id]), CROP["min_component_fraction"]).to_list()


def _settings(tmp_path: Path) -> tuple[dict, dict]:
    """The smoke environment's training and cascade.stage2 parameters, shrunk to a few steps."""
    params = OmegaConfigLoader(str(CONF), **{**CONFIG_LOADER_ARGS, "default_run_env": "smoke"})["parameters"]
    training = {**params["training"], "checkpoint_root": str(tmp_path / "checkpoints"), "epochs": 1,
                "steps_per_epoch": 1, "batch_size": 2, "model": {"base_filters": 4, "depth": 2}}
    return training, dict(params["cascade"]["stage2"])


def test_stage2_crops_come_only_from_out_of_fold_stage1_predictions(cases, mlflow_store, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    manifest, slices, geometry = cases
    stage1_models, stage1_cards = _stage1_folds()
    training, stage2 = _settings(tmp_path)
    assert stage2["crop_source"] == "out_of_fold"   # the configured default

    located = cascade_nodes.locate_out_of_fold(stage1_models, stage1_cards, slices, geometry, manifest, None,
                                               PREPROCESSING, CROP, EVALUATION)
    crops, index = cascade_nodes.prepare_cv_crops(located, manifest, None, PREPROCESSING, CROP, stage2)
    assert sorted(index) == sorted(FOLD_OF) == sorted(located["cases"])   # every development case, never the test case
    for case_id, fold in FOLD_OF.items():
        record = index[case_id]
        # provenance: placed by the fold model that held the case out, which never trained on it
        assert record["source"] == "out_of_fold" and record["stage1_fold"] == fold
        card = stage1_cards[f"fold{fold}"]
        assert case_id in card.cases.validation and case_id not in card.cases.train
        assert record["stage1_weights_sha256"] == card.weights_sha256
        # ... and the crop really sits where THAT model puts the box, not where the other one would
        own, other = (_box_of(stage1_models[f"fold{k}"], case_id, slices, geometry) for k in (fold, 1 - fold))
        assert own != other
        assert record["stage1_box"] == record["crop"]["box"] == own
        assert located["cases"][case_id]["found"] and np.isfinite(located["cases"][case_id]["centre_error_mm"]).all()
        assert crops[f"{case_id}/image"]().shape == crops[f"{case_id}/label"]().shape
    assert located["summary"]["n_cases"] == len(FOLD_OF)
    crop_slices = {key: (lambda value=fn(): value) for key, fn in crops.items()}   # saved and loaded once

    # stage 2 per fold: record which crops each fold's stage 2 trained and validated on
    seen: dict[int, dict[str, list[str]]] = {}
    real_loaders = cascade_nodes.make_crop_loaders

    def spy(crop_slices, crop_index, case_manifest, *args, **kwargs):
        train, validation = real_loaders(crop_slices, crop_index, case_manifest, *args, **kwargs)
        fold = next(f for f in (0, 1) if set(validation.case_ids) == {c for c, k in FOLD_OF.items() if k == f})
        seen[fold] = {"train": list(train.case_ids), "validation": list(validation.case_ids)}
        return train, validation

    monkeypatch.setattr(cascade_nodes, "make_crop_loaders", spy)
    models, cards = cascade_nodes.train_stage2_folds(stage1_models, stage1_cards, crop_slices, index, located,
                                                     manifest, None, PREPROCESSING, training, CROP, stage2, INFERENCE)
    assert sorted(seen) == [0, 1] and sorted(cards) == ["fold0", "fold1"]
    for fold in (0, 1):
        own_cases = sorted(c for c, k in FOLD_OF.items() if k == fold)
        assert sorted(seen[fold]["validation"]) == own_cases
        assert sorted(seen[fold]["train"]) == sorted(set(FOLD_OF) - set(own_cases))
        for case_id in seen[fold]["train"]:
            # the stage-1 fold model that placed this training crop is not fold k's, and did not train on it
            predictor = index[case_id]["stage1_fold"]
            assert predictor != fold and case_id not in stage1_cards[f"fold{predictor}"].cases.train
        # stage-1 fold model k never placed a crop of one of its own training cases
        assert not {c for c, r in index.items() if r["stage1_fold"] == fold} & set(stage1_cards[f"fold{fold}"].cases.train)
        card = cards[f"fold{fold}"]
        assert (card.fold, card.n_folds, card.architecture) == (fold, 2, "cascade")
        assert card.cascade.stage2_crops == "out_of_fold" and card.cascade.jitter_std_mm == (0.0, 0.0)
        assert card.cascade.stage1["fold"] == fold
        assert card.cascade.stage1["weights_sha256"] == stage1_cards[f"fold{fold}"].weights_sha256
        assert sorted(card.cases.validation) == own_cases and not set(card.cases.seen) & {"case_007"}

    # the fold-k cascade (stage 1 of fold k, stage 2 of fold k) predicts fold k's cases, out of fold
    predicted = cascade_nodes.predict_cascade_out_of_fold(models, cards, stage1_models, slices, geometry, manifest,
                                                          EVALUATION)
    assert sorted(predicted) == sorted(FOLD_OF)
    scores = cascade_nodes.score_cascade_out_of_fold(predicted, manifest, geometry, EVALUATION)
    assert set(scores["architecture"]) == {"cascade"}
    pancreas = scores[scores["class"] == "pancreas"].set_index("case_id")
    assert sorted(pancreas.index) == sorted(FOLD_OF) and (pancreas["fold"] == pd.Series(FOLD_OF)).all()
    client = mlflow.MlflowClient()
    runs = {r.info.run_name: r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])}
    assert {"cascade.cv", "cascade.fold0", "cascade.fold1"} <= set(runs)
    for fold in (0, 1):   # nested under the cv run
        assert runs[f"cascade.fold{fold}"].data.tags["mlflow.parentRunId"] == runs["cascade.cv"].info.run_id

    # a crop placed by a stage-1 model that trained on its case is refused before any training
    leaked = {**index, "case_002": {**index["case_002"], "stage1_fold": 0,
                                    "stage1_weights_sha256": stage1_cards["fold0"].weights_sha256}}
    with pytest.raises(ValueError, match="case_002: its crop was placed by stage-1 fold model 0, which trained on it"):
        cascade_nodes.train_stage2_folds(stage1_models, stage1_cards, crop_slices, leaked, located, manifest, None,
                                         PREPROCESSING, training, CROP, stage2, INFERENCE)

    _check_the_fold_ensemble_of_cascades(models, cards, stage1_models, cases, runs["cascade.cv"].info.run_id, tmp_path)


def _check_the_fold_ensemble_of_cascades(models: dict, cards: dict, stage1_models: dict, cases, cv_run_id: str,
                                         tmp_path: Path) -> None:
    """The test cases scored by each fold's cascade and by their ensemble (one box from the mean
    stage-1 softmax, the mean stage-2 softmax on that crop), the same from the logged bundle."""
    manifest, slices, geometry = cases
    predictions, metrics = cascade_nodes.evaluate_cascade_fold_ensemble(
        models, cards, stage1_models, slices, geometry, manifest, EVALUATION, {"ensemble_flip_tta": False})
    assert set(metrics["architecture"]) == {"cascade.fold0", "cascade.fold1", "cascade.ensemble"}
    assert set(metrics["case_id"]) == {"case_007"} and sorted(predictions) == ["case_007"]

    ct = load_nifti(manifest.set_index("case_id").loc["case_007", "image_path"])
    config = PreprocessingConfig.from_params(PREPROCESSING)
    image, scan = preprocess_image(ct.array, ct.affine, config)
    stage1_mean = np.mean([predict_slices(stage1_models[f"fold{k}"], image, 1, 8) for k in (0, 1)], axis=0)
    crop_config = CropConfig.from_params(CROP)
    box = locate_pancreas(probabilities_to_labels(stage1_mean, "multiclass"), scan, crop_config.min_component_fraction)
    crop = CropGeometry.plan(ct.array.shape, ct.affine, box, crop_config)
    crop_image = preprocess_crop_image(ct.array, crop, config, None)
    stage2_mean = np.mean([predict_tiled(models[f"fold{k}"](), crop_image, crop_config.size_px, crop_config.tile_overlap, 1, 8)
                           for k in (0, 1)], axis=0)
    expected = to_file_grid(crop.full_model_grid(stage2_mean, background_probabilities("multiclass")), crop.scan,
                            "multiclass")
    assert np.array_equal(predictions["case_007"]().labels.array, expected)

    # the registry's form: the fold ensemble of cascades logged to the cascade.cv run, stage 1 per member
    bundle = mlflow.artifacts.download_artifacts(artifact_uri=f"runs:/{cv_run_id}/segmenter", dst_path=str(tmp_path / "dl"))
    loaded = Predictor.from_trained(read_bundle(bundle, "cascade.ensemble"),
                                    PredictionSettings.from_params(EVALUATION))
    assert loaded.is_cascade and len(loaded.models) == 2
    assert np.array_equal(loaded.segment(ct.array, ct.affine), expected)
    assert np.array_equal(pickle.loads(pickle.dumps(loaded)).segment(ct.array, ct.affine), expected)

    # inference.model=cascade.ensemble: the cv outputs on disk, each fold's stage 1 from unet's folds
    models_dir = tmp_path / "06_models"
    for k in (0, 1):
        for folder, model in ((models_dir / "cascade" / "folds" / "models", models[f"fold{k}"]()),
                              (models_dir / "unet" / "folds" / "models", stage1_models[f"fold{k}"])):
            folder.mkdir(parents=True, exist_ok=True)
            save_model(model, folder / f"fold{k}.keras")
        (models_dir / "cascade" / "folds" / "cards").mkdir(parents=True, exist_ok=True)
        (models_dir / "cascade" / "folds" / "cards" / f"fold{k}.json").write_text(cards[f"fold{k}"].to_json())
    from_disk = Predictor.from_reference("cascade.ensemble", models_dir, PredictionSettings.from_params(EVALUATION))
    assert from_disk.name == "cascade.ensemble" and np.array_equal(from_disk.segment(ct.array, ct.affine), expected)


def test_jittered_truth_crops_sit_on_the_true_pancreas_with_the_out_of_fold_jitter(cases) -> None:
    manifest, slices, geometry = cases
    stage1_models, stage1_cards = _stage1_folds()
    located = cascade_nodes.locate_out_of_fold(stage1_models, stage1_cards, slices, geometry, manifest, None,
                                               PREPROCESSING, CROP, EVALUATION)
    _, index = cascade_nodes.prepare_cv_crops(located, manifest, None, PREPROCESSING, CROP,
                                              {"crop_source": "jittered_truth"})
    for case_id in FOLD_OF:
        assert index[case_id]["source"] == "jittered_truth" and index[case_id]["stage1_fold"] is None
        label = nib.load(manifest.set_index("case_id").loc[case_id, "label_path"])
        truth = ScanGeometry.plan(label.shape, label.affine, (1, 1)).to_slices(np.asarray(label.dataobj)) > 0
        nz = [np.flatnonzero(truth.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
        assert index[case_id]["crop"]["box"] == [v for n in nz for v in (int(n[0]), int(n[-1]) + 1)]
    with pytest.raises(ValueError, match="not from an out-of-fold"):
        check_out_of_fold_crops(index, list(FOLD_OF), [FoldCases.of(k, c.cases.train, c.cases.validation)
                                                       for k, c in enumerate(stage1_cards.values())])


def test_stage1_fold_models_of_other_folds_are_refused(cases) -> None:
    manifest, slices, geometry = cases
    stage1_models, stage1_cards = _stage1_folds()
    moved = manifest.assign(fold=manifest["case_id"].map({**FOLD_OF, "case_001": 1, "case_002": 0}).fillna(-1).astype(int))
    with pytest.raises(ModelMismatchError, match="other folds than the split's"):
        cascade_nodes.locate_out_of_fold(stage1_models, stage1_cards, slices, geometry, moved, None, PREPROCESSING,
                                         CROP, EVALUATION)
