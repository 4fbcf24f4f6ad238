"""The registry's ``champion`` follows the 3D validation score, not the score on a model's own input.

Real tiny Keras models with set weights (1x1 convolutions that threshold the windowed intensity),
real NIfTI cases on disk, the real nodes (``tracking.selection.score_validation_cases`` for every
model, the cascade included, then the training pipeline's ``register_trained_models``) and a real
sqlite MLflow store under ``tmp_path``.

The phantoms' pancreas has a bright core (150 HU) and a dimmer rim (90 HU) in 20 HU tissue. The
``unet`` calls pancreas above ~121 HU: it finds the core only. The cascade's stage 2 calls pancreas
above 70 HU, so on crops around the TRUE pancreas (what the old rule scored it on) it is perfect;
but its stage 1 finds nothing, so on the scans it segments nothing. The crop Dice ranks the cascade
first, the 3D Dice the unet; with a stage 1 that does find the pancreas the cascade wins in 3D too.
"""

from __future__ import annotations

from pathlib import Path

import keras
import mlflow
import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from pancreas_seg.cascade.crops import CropConfig, CropGeometry, mask_box
from pancreas_seg.evaluation.selection import SelectionRule, check_selection_cases, rank_models, scored_case_ids
from pancreas_seg.imaging.geometry import ScanGeometry
from pancreas_seg.imaging.preprocess import PreprocessingConfig, preprocess_image, preprocess_label
from pancreas_seg.inference.forward import predict_slices
from pancreas_seg.inference.model_card import CascadeSpec, CaseSplit, ModelCard, ModelMismatchError
from pancreas_seg.inference.predictor import PredictionSettings
from pancreas_seg.inference.serving import log_model_objects
from pancreas_seg.models.io import weights_sha256
from pancreas_seg.pipelines.cascade.nodes import cut_training_crop
from pancreas_seg.pipelines.cv.nodes import select_best_configuration
from pancreas_seg.pipelines.training.nodes import register_trained_models
from pancreas_seg.tracking.selection import score_validation_cases

DATASET = "Task07_Pancreas_synthetic"
PREPROCESSING = {"image_size_px": 32, "crop_to_body": False, "label_mode": "multiclass", "context_slices": 1,
                 "intensity": {"mode": "window", "window_hu": [-100.0, 240.0]}}
CROP = CropConfig(spacing_mm=0.8, size_px=(16, 24), margin_mm=4.0, z_margin_mm=5.0)
EVALUATION = {"batch_size": 8, "flip_tta": False, "xla": False, "nsd_tolerance_mm": 2.0}
REGISTRY = {"register": True, "registered_model": "pancreas_seg", "alias": "champion",
            "selection": {"classes": ["pancreas"], "metric": "dice"}}
SPLIT = {"case_001": "train", "case_002": "train", "case_003": "validation", "case_004": "validation",
         "case_005": "test"}
VALIDATION, TEST = ["case_003", "case_004"], ["case_005"]
CASES = CaseSplit(("case_001", "case_002"), tuple(VALIDATION))


def _threshold_model(threshold: float = 0.5, always_background: bool = False) -> keras.Model:
    """(B, H, W, 1) windowed intensity in [0, 1] -> softmax (background, pancreas, tumour):
    pancreas iff x > ``threshold`` (never, with ``always_background``)."""
    model = keras.Sequential([keras.Input((None, None, 1)), keras.layers.Conv2D(3, 1, activation="softmax")])
    slope = 0.0 if always_background else 40.0
    bias = (np.array([10.0, -10.0, -10.0]) if always_background
            else np.array([slope * threshold, -slope * threshold, -50.0]))
    model.layers[-1].set_weights([np.array([[[[-slope, slope, 0.0]]]], np.float32), bias.astype(np.float32)])
    return model


def _write_case(folder: Path, case_id: str, seed: int) -> dict[str, str]:
    """A CT (20 HU tissue, a pancreas of 150 HU core and 90 HU rim) and its label, as NIfTI files."""
    rng = np.random.default_rng(seed)
    hu = rng.normal(20.0, 5.0, size=(64, 56, 20)).astype(np.float32)
    x, y, z = np.meshgrid(*(np.arange(n) for n in hu.shape), indexing="ij")
    cx, cy, cz = 30 + seed, 28 - seed, 9
    radius = ((x - cx) / 16) ** 2 + ((y - cy) / 7) ** 2 + ((z - cz) / 4) ** 2
    pancreas, core = radius <= 1, radius <= 0.55
    hu[pancreas] = 90.0
    hu[core] = 150.0
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    paths = {"image_path": str(folder / f"{case_id}_ct.nii.gz"), "label_path": str(folder / f"{case_id}_label.nii.gz")}
    nib.save(nib.Nifti1Image(hu, affine), paths["image_path"])
    nib.save(nib.Nifti1Image(pancreas.astype(np.uint8), affine), paths["label_path"])
    return paths


@pytest.fixture
def phantoms(tmp_path: Path) -> tuple[pd.DataFrame, dict, dict]:
    """The manifest, the preprocessed slices and the slice geometry of five cases on disk."""
    rows, slices, geometry = [], {}, {}
    config = PreprocessingConfig.from_params(PREPROCESSING)
    for seed, (case_id, split) in enumerate(SPLIT.items()):
        paths = _write_case(tmp_path, case_id, seed)
        ct = nib.load(paths["image_path"])
        image, scan = preprocess_image(np.asarray(ct.dataobj, dtype=np.float32), ct.affine, config)
        slices[f"{case_id}/image"] = lambda image=image: image
        geometry[case_id] = scan.to_dict()
        rows.append({"case_id": case_id, **paths, "split": split, "fold": -1, "dataset": DATASET,
                     "source": "synthetic"})
    return pd.DataFrame(rows), slices, geometry


@pytest.fixture
def mlflow_store(tmp_path: Path):
    """A real sqlite MLflow store under ``tmp_path`` (artifacts there too), current for the test."""
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        experiment = mlflow.create_experiment("selection", artifact_location=(tmp_path / "artifacts").as_uri())
        # the active experiment is process-wide: an in-process Kedro session before this test set its own
        mlflow.set_experiment(experiment_id=experiment)
        yield experiment
    finally:
        mlflow.set_tracking_uri(previous)


def _unet(experiment_id: str, cases: CaseSplit = CASES) -> tuple[keras.Model, ModelCard]:
    model = _threshold_model(0.65)   # ~121 HU: the core, not the rim
    run_id = mlflow.MlflowClient().create_run(experiment_id, run_name="unet").info.run_id
    card = ModelCard.for_trained_model("unet", "multiclass", PREPROCESSING, None, DATASET, cases,
                                       weights_sha256(model), mlflow_run_id=run_id, data_source="synthetic")
    log_model_objects(run_id, "unet", model, card, PredictionSettings(4, flip_tta=False))
    return model, card


def _cascade(experiment_id: str, stage1: keras.Model) -> tuple[keras.Model, keras.Model, ModelCard]:
    stage2 = _threshold_model(0.5)   # 70 HU: core and rim
    spec = CascadeSpec(stage1={"architecture": "unet", "label_mode": "multiclass", "weights_sha256": weights_sha256(stage1)},
                       stage2={"architecture": "unet", "label_mode": "multiclass"}, crop=CROP.to_dict())
    run_id = mlflow.MlflowClient().create_run(experiment_id, run_name="cascade").info.run_id
    card = ModelCard.for_trained_model("cascade", "multiclass", PREPROCESSING, None, DATASET, CASES,
                                       weights_sha256(stage2), cascade=spec, mlflow_run_id=run_id,
                                       data_source="synthetic")
    log_model_objects(run_id, "cascade", stage2, card, PredictionSettings(4, flip_tta=False), stage1)
    return stage2, stage1, card


def _crop_dice(stage2: keras.Model, manifest: pd.DataFrame) -> float:
    """Stage 2's pancreas Dice pooled over the validation crops around the TRUE pancreas (the
    cascade's old validation number), cut by the cascade pipeline's own crop function."""
    config, hits, totals = PreprocessingConfig.from_params(PREPROCESSING), 0, 0
    for row in manifest[manifest["split"] == "validation"].itertuples():
        label = nib.load(row.label_path)
        truth = np.asarray(label.dataobj)
        box = mask_box(ScanGeometry.plan(truth.shape, label.affine, (1, 1)).to_slices(truth) > 0)
        crop = cut_training_crop(row.image_path, row.label_path, CropGeometry.plan(truth.shape, label.affine, box, CROP),
                                 config, None)
        predicted = predict_slices(stage2, crop["image"], 1, 8).argmax(-1) == 1
        hits += 2 * int((predicted & (crop["label"] == 1)).sum())
        totals += int(predicted.sum() + (crop["label"] == 1).sum())
    return hits / totals


def _slice_dice(model: keras.Model, manifest: pd.DataFrame, slices: dict, geometry: dict) -> float:
    """The unet's pancreas Dice pooled over its own input slices of the validation cases (its old
    validation number), against the label shards the preprocessing would write."""
    hits = totals = 0
    for case_id in VALIDATION:
        label = nib.load(manifest.set_index("case_id").loc[case_id, "label_path"])
        truth = preprocess_label(np.asarray(label.dataobj), ScanGeometry.from_dict(geometry[case_id]), "multiclass") == 1
        predicted = predict_slices(model, slices[f"{case_id}/image"](), 1, 8).argmax(-1) == 1
        hits += 2 * int((predicted & truth).sum())
        totals += int(predicted.sum() + truth.sum())
    return hits / totals


def _score(model, card, phantoms, stage1=None) -> pd.DataFrame:
    manifest, slices, geometry = phantoms
    return score_validation_cases(model, card, slices, geometry, manifest, EVALUATION, stage1_model=stage1)


def test_the_champion_follows_the_3d_validation_dice_not_the_crop_dice(phantoms, mlflow_store: str) -> None:
    manifest, slices, geometry = phantoms
    unet, unet_card = _unet(mlflow_store)
    stage2, blind_stage1, cascade_card = _cascade(mlflow_store, _threshold_model(always_background=True))

    unet_scores, cascade_scores = _score(unet, unet_card, phantoms), _score(stage2, cascade_card, phantoms, blind_stage1)
    for scores in (unet_scores, cascade_scores):   # the validation cases, never the test case
        assert sorted(scores["case_id"].unique()) == VALIDATION
    unet_3d = unet_scores.loc[unet_scores["class"] == "pancreas", "dice"]
    cascade_3d = cascade_scores.loc[cascade_scores["class"] == "pancreas", "dice"]
    assert 0.2 < unet_3d.mean() < 0.9 and (cascade_3d == 0.0).all()
    # on its crops around the TRUE pancreas the cascade is perfect: the old rule would pick it
    crop_dice, slice_dice = _crop_dice(stage2, manifest), _slice_dice(unet, manifest, slices, geometry)
    assert crop_dice > 0.99 > slice_dice > 0.2
    metrics = {"unet": {"final_val_dice_pancreas": slice_dice}, "cascade": {"final_val_dice_pancreas": crop_dice}}

    report = register_trained_models(REGISTRY, manifest, unet_card, cascade_card, metrics["unet"], metrics["cascade"],
                                     unet_scores, cascade_scores)
    assert report["champion"] == "unet" and report["score"] == "validation_dice_pancreas_mean"
    assert report["cases"] == VALIDATION
    assert [r["architecture"] for r in report["ranking"]] == ["unet", "cascade"]
    client = mlflow.MlflowClient()
    champion = client.get_model_version_by_alias("pancreas_seg", "champion")
    assert champion.run_id == unet_card.mlflow_run_id
    for entry in report["models"]:
        tags = client.get_model_version("pancreas_seg", entry["version"]).tags
        assert tags["selection_score"] == "validation_dice_pancreas_mean"
        assert tags["selection_cases"] == ",".join(VALIDATION) and tags["selection_n_cases"] == "2"
        assert tags["selection_split"] == "validation"
    assert float(client.get_model_version("pancreas_seg", report["models"][0]["version"]).tags[
        "selection_score_value"]) == pytest.approx(unet_3d.mean(), abs=1e-4)
    # the score the tags name is the metric each model's run logged
    logged = client.get_run(unet_card.mlflow_run_id).data.metrics
    assert logged["validation_dice_pancreas_mean"] == pytest.approx(unet_3d.mean())
    assert client.get_run(cascade_card.mlflow_run_id).data.metrics["validation_dice_pancreas_mean"] == 0.0

    # a stage 1 that finds the pancreas: now the cascade is best in 3D too, and the alias follows
    stage2, stage1, cascade_card = _cascade(mlflow_store, _threshold_model(0.5))
    cascade_scores = _score(stage2, cascade_card, phantoms, stage1)
    assert cascade_scores.loc[cascade_scores["class"] == "pancreas", "dice"].min() > unet_3d.max()
    report = register_trained_models(REGISTRY, manifest, unet_card, cascade_card, metrics["unet"], metrics["cascade"],
                                     unet_scores, cascade_scores)
    assert report["champion"] == "cascade"
    assert client.get_model_version_by_alias("pancreas_seg", "champion").run_id == cascade_card.mlflow_run_id


def test_a_model_that_saw_a_test_case_is_not_scored_for_selection(phantoms, mlflow_store: str) -> None:
    unet, card = _unet(mlflow_store, CaseSplit(("case_001", "case_005"), tuple(VALIDATION)))
    with pytest.raises(ModelMismatchError, match="case_005"):
        _score(unet, card, phantoms)
    # nor one that was not validated on the split's validation cases
    unet, card = _unet(mlflow_store, CaseSplit(("case_001", "case_003"), ("case_002", "case_004")))
    with pytest.raises(ModelMismatchError, match="case_003"):
        _score(unet, card, phantoms)


def _per_case(rows: list[tuple[str, str, str, float]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["architecture", "case_id", "class", "dice"])


def test_the_rule_averages_cases_then_classes_and_breaks_ties_by_name() -> None:
    per_case = _per_case([
        ("b", "c1", "pancreas", 0.8), ("b", "c2", "pancreas", 0.6), ("b", "c1", "tumour", np.nan),
        ("b", "c2", "tumour", 0.2),
        ("a", "c1", "pancreas", 0.6), ("a", "c2", "pancreas", 0.8), ("a", "c1", "tumour", 0.0),
        ("a", "c2", "tumour", 0.4),
        ("c", "c1", "pancreas", np.nan), ("c", "c2", "pancreas", np.nan), ("c", "c1", "tumour", np.nan),
        ("c", "c2", "tumour", np.nan)])
    pancreas = SelectionRule("validation").scores(per_case)
    assert pancreas["a"] == pytest.approx(0.7) and pancreas["b"] == pytest.approx(0.7)
    assert rank_models(pancreas)[:2] == [("a", pytest.approx(0.7)), ("b", pytest.approx(0.7))]   # tie: by name
    assert rank_models(pancreas)[2][0] == "c" and np.isnan(rank_models(pancreas)[2][1])        # no score: last
    both = SelectionRule("cv", ("pancreas", "tumour")).scores(per_case)
    assert both["a"] == pytest.approx((0.7 + 0.2) / 2) and both["b"] == pytest.approx((0.7 + 0.2) / 2)
    assert SelectionRule("cv", ("pancreas", "tumour")).score_name == "cv_dice_pancreas_tumour_mean"
    with pytest.raises(ValueError, match="higher is better"):
        SelectionRule("validation", metric="hd95_mm")
    assert scored_case_ids(per_case) == ["c1", "c2"]
    with pytest.raises(ValueError, match="different cases"):
        scored_case_ids(per_case[~((per_case["architecture"] == "a") & (per_case["case_id"] == "c2"))])
    with pytest.raises(ValueError, match="never used for selection"):
        check_selection_cases(["c1", "t1"], ["c1", "t1"], ["t1"])
    with pytest.raises(ValueError, match="not on the split"):
        check_selection_cases(["c1"], ["c1", "c2"], ["t1"])


def test_cv_registers_fold_ensembles_with_the_out_of_fold_score_and_cases(phantoms, mlflow_store: str) -> None:
    manifest = phantoms[0].assign(fold=[0, 1, 0, 1, -1])
    client, runs = mlflow.MlflowClient(), {}
    for arch in ("unet", "fcn"):
        model, card = _unet(mlflow_store)   # each cv run's pyfunc model (a stand-in ensemble)
        runs[arch] = card.mlflow_run_id
    development = ["case_001", "case_002", "case_003", "case_004"]
    dice = {"unet": [0.9, 0.7, 0.8, 0.6], "fcn": [0.5, 0.9, 0.9, 0.9]}
    per_case = _per_case([(a, c, "pancreas", d) for a, values in dice.items() for c, d in zip(development, values)])
    comparison = pd.DataFrame({"architecture": list(runs), "mlflow_run_id": list(runs.values())})
    cv = {"selection": {"classes": ["pancreas"], "register": True, "registered_model": "pancreas_seg",
                        "alias": "champion"}}
    result = select_best_configuration(comparison, per_case, manifest, cv)
    assert result["architecture"] == "fcn" and result["score"] == pytest.approx(0.8)
    assert result["score_name"] == "cv_dice_pancreas_mean" and result["cases"] == development
    champion = client.get_model_version_by_alias("pancreas_seg", "champion")
    assert champion.run_id == runs["fcn"] and champion.tags["selection_cases"] == ",".join(development)
    assert champion.tags["selection_score"] == "cv_dice_pancreas_mean" and champion.tags["selection_split"] == "cv"
    # a test case among the scored cases is refused before anything is registered
    leaked = pd.concat([per_case, _per_case([(a, "case_005", "pancreas", 1.0) for a in dice])])
    with pytest.raises(ValueError, match="case_005"):
        select_best_configuration(comparison, leaked, manifest, cv)
