"""Cascade nodes: thin wrappers around :mod:`pancreas_seg.cascade`.

Stage 1 is the model trained in another namespace (its ``model_<architecture>`` and card); these
nodes measure where it puts the pancreas box on validation cases, cut the stage-2 training crops
and train stage 2. The evaluation pipeline evaluates the trained cascade like any other model
(:class:`pancreas_seg.inference.predictor.Predictor` runs both stages).

In cross-validation (``cv_cascade``) stage 1 is the stage-1 architecture's fold models: every
development case gets its box from the fold model that held it out
(:mod:`pancreas_seg.cascade.out_of_fold`), stage 2 is trained per fold on those crops, and every
case is predicted by its own fold's cascade; the test cases by the cascade's fold ensemble.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pancreas_seg import tracking
from pancreas_seg.cascade.crops import CropConfig, CropGeometry, PancreasBox, locate_pancreas, mask_box
from pancreas_seg.cascade.localisation import (
    jitter_std_mm,
    localisation_error,
    summarise_localisation,
)
from pancreas_seg.cascade.out_of_fold import (
    JITTERED_TRUTH,
    OUT_OF_FOLD,
    FoldCases,
    assign_out_of_fold,
    check_crop_source,
    check_out_of_fold_crops,
    out_of_fold_record,
)
from pancreas_seg.core.labels import PANCREAS_REGION, probabilities_to_labels
from pancreas_seg.core.runtime import dtype_policy, retained_heap
from pancreas_seg.imaging.geometry import ScanGeometry
from pancreas_seg.imaging.intensity import normalise_hu
from pancreas_seg.imaging.nifti_io import load_nifti
from pancreas_seg.imaging.preprocess import (
    AIR_HU,
    PreprocessingConfig,
    intensity_stats_from_dict,
    preprocess_crop_image,
)
from pancreas_seg.evaluation.scoring import score_cases, score_out_of_fold_cases
from pancreas_seg.inference.case_predictions import predict_cases
from pancreas_seg.inference.model_card import (
    CascadeSpec,
    CaseSplit,
    ModelCard,
    ModelMismatchError,
    check_fold_ensemble,
)
from pancreas_seg.inference.model_store import ENSEMBLE_SUFFIX
from pancreas_seg.inference.predictor import PredictionSettings, Predictor
from pancreas_seg.inference.serving import log_ensemble_objects, log_model_objects
from pancreas_seg.learning.setup import architecture_settings, compile_model, resume_fingerprint
from pancreas_seg.models.names import CASCADE_NAME
from pancreas_seg.runners.parallel import LazyCaseParts
from pancreas_seg.task07.splits import (
    development_case_ids,
    fold_manifest,
    manifest_dataset,
    manifest_folds,
    split_case_ids,
    test_case_ids,
)
from pancreas_seg.tracking.training_run import log_run_setup, log_training_result, training_card

logger = logging.getLogger(__name__)


def _labelled(case_manifest: pd.DataFrame, splits: tuple[str, ...]) -> pd.DataFrame:
    return case_manifest[case_manifest["split"].isin(splits)].sort_values("case_id")


def _truth_slices(labels: np.ndarray, geometry: ScanGeometry) -> np.ndarray:
    """The true pancreas (labels 1 and 2) of a label volume (X, Y, Z) on its canonical slices, (Z, H, W)."""
    return np.isin(geometry.to_slices(labels), PANCREAS_REGION)


def cut_training_crop(image_path: str, label_path: str, geometry: CropGeometry, config: PreprocessingConfig,
                      stats: Any) -> dict[str, np.ndarray]:
    """``{"image": (Z, H, W) float32 normalised crop, "label": (Z, H, W) uint8 MSD labels}``."""
    ct, label = load_nifti(image_path), load_nifti(label_path)
    return {"image": preprocess_crop_image(ct.array, geometry, config, stats),
            "label": geometry.label_to_crop(label.array)}


def prepare_training_crops(case_manifest: pd.DataFrame, intensity_stats: dict[str, Any],
                           preprocessing: dict[str, Any],
                           crop: dict[str, Any]) -> tuple[dict[str, Callable[[], np.ndarray]], dict[str, Any]]:
    """Cut the stage-2 crops of the training and validation cases around their TRUE pancreas.

    Each crop keeps ``crop.context_mm`` more on every in-plane side than inference would, so the
    training sampler can shift its windows the way stage 1 misplaces its box.

    Returns:
        ``{"<case_id>/image": fn, "<case_id>/label": fn}`` (normalised float32 and uint8 MSD labels,
        each (Z, H, W), made lazily one case at a time) and ``{case_id: {"crop": CropGeometry dict,
        "slack_px": [h, w]}}`` where ``slack_px`` is how far a window may slide because the
        pancreas plus margin is wider than the stage-2 input.
    """
    config = PreprocessingConfig.from_params(preprocessing)
    crop_config = CropConfig.from_params(crop)
    stats = intensity_stats_from_dict(intensity_stats)
    cases = _labelled(case_manifest, ("train", "validation"))
    context = crop_config.context_px()

    index_entries: dict[str, Any] = {}
    partitions: dict[str, Callable[[], np.ndarray]] = {}
    for index, row in enumerate(cases.itertuples(), start=1):
        label = load_nifti(row.label_path)   # the box needs the voxels; the crop is cut lazily later
        canonical = ScanGeometry.plan(label.array.shape, label.affine, (1, 1))
        box = mask_box(_truth_slices(label.array, canonical))
        if box is None:
            logger.warning("%s: %s has no pancreas in its label; no stage-2 crop", CASCADE_NAME, row.case_id)
            continue
        entry, parts = _plan_crop(row, label, box, crop_config, context, config, stats,
                                  f"training crop {index}/{len(cases)}")
        index_entries[row.case_id] = {**entry, "source": JITTERED_TRUTH, "stage1_fold": None}
        partitions.update(parts)
    return partitions, index_entries


def _plan_crop(row: Any, label: Any, box: PancreasBox, crop_config: CropConfig, context: int,
               config: PreprocessingConfig, stats: Any, what: str) -> tuple[dict[str, Any], dict[str, Callable]]:
    """A case's crop around ``box`` (``context`` px more on every in-plane side): its index entry
    ``{"crop", "slack_px"}`` and its lazy ``<case_id>/image``, ``<case_id>/label`` partitions."""
    geometry = CropGeometry.plan(label.array.shape, label.affine, box, crop_config, context_px=context)
    slack = [max(0, (r - 2 * context - s) // 2) for r, s in zip(geometry.region_hw, crop_config.size_px, strict=True)]
    case = LazyCaseParts(cut_training_crop, (row.image_path, row.label_path, geometry, config, stats),
                         ("image", "label"), f"{CASCADE_NAME}: cutting {what}: {row.case_id}",
                         cost=float(label.array.size))   # the cut reads the whole scan
    return {"crop": geometry.to_dict(), "slack_px": slack}, case.partitions(row.case_id)


def measure_stage1_localisation(stage1_model: Any, stage1_model_card: ModelCard,
                                model_input_slices: Mapping[str, Callable[[], np.ndarray]],
                                slice_geometry: dict[str, Any], case_manifest: pd.DataFrame,
                                intensity_stats: dict[str, Any], preprocessing: dict[str, Any],
                                crop: dict[str, Any], evaluation: dict[str, Any]) -> dict[str, Any]:
    """Where stage 1 puts the pancreas box on the VALIDATION cases, against the true box.

    Also checks that stage 1 is bound to the current dataset, split and preprocessing. Returns
    per-case errors and their summary (``stage1_localisation.json``, logged with the cascade).
    """
    stage1_model_card.check_stage1(manifest_dataset(case_manifest), CaseSplit.from_dict(split_case_ids(case_manifest)),
                                   test_case_ids(case_manifest), preprocessing, intensity_stats)
    # the box is measured without test-time augmentation, as stage 1 runs inside the cascade
    stage1 = Predictor.from_models([stage1_model], [stage1_model_card],
                                   PredictionSettings.from_params(evaluation, flip_tta=False))
    crop_config = CropConfig.from_params(crop)
    cases = _labelled(case_manifest, ("validation",))
    per_case = {}
    for index, row in enumerate(cases.itertuples(), start=1):
        geometry = ScanGeometry.from_dict(slice_geometry[row.case_id])
        probabilities = stage1.predict_probabilities(model_input_slices[f"{row.case_id}/image"]())
        labels = probabilities_to_labels(probabilities, stage1.label_mode)
        predicted = locate_pancreas(labels, geometry, crop_config.min_component_fraction)
        truth_mask = _truth_slices(load_nifti(row.label_path).array, geometry)
        truth = mask_box(truth_mask)
        if truth is None:
            continue
        planned = (CropGeometry.plan(geometry.shape, geometry.affine, predicted, crop_config)
                   if predicted is not None else None)
        per_case[row.case_id] = localisation_error(predicted, truth, truth_mask, geometry.slice_spacing_mm, planned)
        logger.info("%s: stage-1 box on validation case %d/%d %s: centre error %s mm, coverage %.3f", CASCADE_NAME,
                    index, len(cases), row.case_id,
                    [round(v, 1) for v in per_case[row.case_id]["centre_error_mm"]], per_case[row.case_id]["coverage"])
    summary = summarise_localisation(list(per_case.values()))
    logger.info("%s: stage-1 localisation on %d validation case(s): %s", CASCADE_NAME, len(per_case), summary)
    return {"stage1": stage1_model_card.architecture, "axes": ["z", "h", "w"], "summary": summary,
            "cases": per_case}


def _crop_cases(crop_slices: Mapping[str, Callable[[], np.ndarray]], crop_index: dict[str, Any],
                case_ids: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    missing = [c for c in case_ids if f"{c}/image" not in crop_slices or c not in crop_index]
    if missing:
        raise ValueError(f"no cascade training crops for case(s) {missing}; run the cascade's "
                         "prepare_training_crops node (`kedro run --pipelines=train_cascade`) first")
    return {c: (crop_slices[f"{c}/image"](), crop_slices[f"{c}/label"]()) for c in case_ids}


def make_crop_loaders(crop_slices, crop_index: dict[str, Any], case_manifest: pd.DataFrame,
                      intensity_stats: dict[str, Any], settings: dict[str, Any], config: PreprocessingConfig,
                      crop_config: CropConfig, label_mode: str, jitter_mm: tuple[float, float]):
    """Training and validation :class:`~pancreas_seg.cascade.sampler.CropLoader`s."""
    from pancreas_seg.cascade.sampler import CropLoader  # noqa: PLC0415 - lazy: Keras
    from pancreas_seg.learning.augmentation import AugmentationConfig  # noqa: PLC0415

    ids = split_case_ids(case_manifest)
    fill = float(normalise_hu(np.array([AIR_HU], np.float32), config.intensity_mode, config.window_hu,
                              intensity_stats_from_dict(intensity_stats))[0])
    common = {"window_hw": crop_config.size_px, "batch_size": int(settings["batch_size"]),
              "label_mode": label_mode, "context_slices": config.context_slices, "fill_value": fill,
              "seed": int(settings["seed"]), "workers": int(settings.get("workers", 1))}
    train_ids = [c for c in ids["train"] if c in crop_index]
    val_ids = [c for c in ids["validation"] if c in crop_index]
    train = CropLoader(_crop_cases(crop_slices, crop_index, train_ids), training=True,
                       slack_px={c: crop_index[c]["slack_px"] for c in train_ids},
                       jitter_std_px=tuple(j / crop_config.spacing_mm for j in jitter_mm),
                       tumour_fraction=float(settings["tumour_fraction"]),
                       augmentation=AugmentationConfig.from_params(settings.get("augmentation")),
                       steps_per_epoch=settings.get("steps_per_epoch"), **common)
    validation = CropLoader(_crop_cases(crop_slices, crop_index, val_ids), training=False, **common)
    return train, validation


def train_stage2(crop_slices: Mapping[str, Callable[[], np.ndarray]], crop_index: dict[str, Any],
                 stage1_localisation: dict[str, Any], stage1_model: Any, stage1_model_card: ModelCard,
                 case_manifest: pd.DataFrame, intensity_stats: dict[str, Any], preprocessing: dict[str, Any],
                 training: dict[str, Any], crop: dict[str, Any],
                 stage2: dict[str, Any]) -> tuple[Any, Any, dict[str, Any], Any, ModelCard]:
    """Train stage 2 on jittered, tumour-guaranteed crops; log it as the ``cascade`` MLflow run.

    Returns the best stage-2 model, the stage-1 model (saved again in the cascade's version folder,
    so the cascade is complete on its own), the training history and curves, and the cascade's
    model card (both stages, the crop settings, the measured jitter).
    """
    settings = architecture_settings(training, stage2)
    jitter = jitter_std_mm(stage1_localisation["summary"], CropConfig.from_params(crop),
                           float(settings["jitter_min_std_mm"]))
    with tracking.architecture_run(CASCADE_NAME) as run:
        tracking.log_json(run.info.run_id, stage1_localisation, "stage1_localisation.json")
        model, history, figure, card = fit_stage2(
            crop_slices, crop_index, jitter, stage1_localisation["summary"], stage1_model, stage1_model_card,
            case_manifest, intensity_stats, preprocessing, training, crop, stage2,
            run_id=run.info.run_id, checkpoint_dir=Path(settings["checkpoint_root"]) / CASCADE_NAME,
            crop_source=JITTERED_TRUTH)
    return model, stage1_model, history, figure, card


def fit_stage2(crop_slices: Mapping[str, Callable[[], np.ndarray]], crop_index: dict[str, Any],
               jitter: tuple[float, float], localisation_summary: dict[str, Any], stage1_model: Any,
               stage1_model_card: ModelCard, case_manifest: pd.DataFrame, intensity_stats: dict[str, Any],
               preprocessing: dict[str, Any], training: dict[str, Any], crop: dict[str, Any],
               stage2: dict[str, Any], *, run_id: str, checkpoint_dir: Path,
               crop_source: str) -> tuple[Any, dict[str, Any], Any, ModelCard]:
    """Train stage 2 in the MLflow run ``run_id`` (the active run) on the train/validation cases of ``case_manifest``
    (a fold manifest in cross-validation), with ``jitter`` (mm, in-plane) on its training windows.

    Returns the best model, its history and curves, and the cascade's model card.
    """
    import keras  # noqa: PLC0415

    from pancreas_seg.learning.training import FitConfig, fit_with_resume  # noqa: PLC0415
    from pancreas_seg.models.io import weights_sha256  # noqa: PLC0415
    from pancreas_seg.models.registry import build_model  # noqa: PLC0415

    name = stage2["name"]
    label_mode = stage2.get("label_mode", "multiclass")
    settings = architecture_settings(training, stage2)
    config = PreprocessingConfig.from_params(preprocessing)
    crop_config = CropConfig.from_params(crop)
    train_loader, val_loader = make_crop_loaders(crop_slices, crop_index, case_manifest, intensity_stats,
                                                 settings, config, crop_config, label_mode, jitter)
    input_shape = (*crop_config.size_px, config.context_slices)
    stage1_sha = weights_sha256(stage1_model)
    fit_config = FitConfig.from_settings(settings)
    fingerprint = resume_fingerprint(fit_config, f"{CASCADE_NAME}:{name}:{crop_source}", settings, preprocessing,
                                     intensity_stats, crop_config.to_dict(), label_mode, list(jitter), stage1_sha,
                                     sorted(train_loader.case_ids) + sorted(val_loader.case_ids))
    source = str(case_manifest["source"].iloc[0])
    logger.info("%s: stage 2 (%s, %s) on %d crop slices of %d cases (%d with tumour; crops: %s), window %s px at "
                "%.2f mm, position jitter %.1f/%.1f mm, %d tumour window(s) per batch%s", CASCADE_NAME, name,
                label_mode, train_loader.n_slices, len(train_loader.case_ids), train_loader.tumour_slices.size,
                crop_source, crop_config.size_px, crop_config.spacing_mm, *jitter, train_loader.n_tumour_per_batch,
                " - SYNTHETIC phantoms" if source == "synthetic" else "")

    def build():
        model = build_model(name, input_shape, label_mode, **settings["model"])
        return compile_model(model, settings, label_mode, total_steps=fit_config.epochs * len(train_loader))

    policy = "mixed_float16" if settings.get("mixed_precision") else None
    with dtype_policy(policy):
        log_run_setup(CASCADE_NAME, settings, preprocessing, source, label_mode)
        tracking.set_tags({"stage1_architecture": stage1_model_card.architecture, "stage2_architecture": name,
                           "stage2_crops": crop_source})
        tracking.log_params({"cascade": {"crop": crop_config.to_dict(), "jitter_std_mm": list(jitter),
                                         "stage1_weights_sha256": stage1_sha, "stage2_crops": crop_source}})
        epoch_logger = keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs: tracking.log_epoch_metrics(run_id, logs, epoch + 1))
        with retained_heap(bool(settings["retain_heap"])):
            result = fit_with_resume(build, train_loader, val_loader, fit_config, checkpoint_dir, fingerprint,
                                     label=CASCADE_NAME, callbacks=[epoch_logger])
        figure = log_training_result(run_id, CASCADE_NAME, result, source)
    stage1 = {"architecture": stage1_model_card.architecture, "label_mode": stage1_model_card.label_mode,
              "mlflow_run_id": stage1_model_card.mlflow_run_id, "trained_at": stage1_model_card.trained_at,
              "input_shape": list(stage1_model_card.input_shape), "weights_sha256": stage1_sha}
    if stage1_model_card.fold is not None:
        stage1["fold"] = stage1_model_card.fold
    spec = CascadeSpec(
        stage1=stage1, stage2={"architecture": name, "label_mode": label_mode, "input_shape": list(input_shape)},
        crop=crop_config.to_dict(), jitter_std_mm=tuple(jitter), stage1_localisation=localisation_summary,
        tumour_fraction=float(settings["tumour_fraction"]),
        min_tumour_volume_mm3=float(stage2.get("min_tumour_volume_mm3", 0.0)), stage2_crops=crop_source)
    # the cascade's output is multiclass: stage 2's, completed by stage 1 if needed
    card = training_card(CASCADE_NAME, run_id, input_shape, "multiclass", preprocessing, intensity_stats,
                         case_manifest, result, fit_config.monitor, weights_sha256(result.model), cascade=spec)
    return result.model, result.history, figure, card


def validate_stage2(model: Any, crop_slices: Mapping[str, Callable[[], np.ndarray]], crop_index: dict[str, Any],
                    case_manifest: pd.DataFrame, model_card: ModelCard, stage1_model: Any,
                    intensity_stats: dict[str, Any], preprocessing: dict[str, Any], training: dict[str, Any],
                    crop: dict[str, Any], stage2: dict[str, Any], inference: dict[str, Any]) -> dict[str, float]:
    """Stage-2 Dice per class on the validation crops (centred windows); log both models and the card
    (as the pyfunc model ``segmenter``, applying the ``inference`` settings by default)."""
    from pancreas_seg.models.io import weights_sha256  # noqa: PLC0415

    model_card.check_cascade_weights(weights_sha256(stage1_model), weights_sha256(model))
    settings = architecture_settings(training, stage2)
    _, val_loader = make_crop_loaders(crop_slices, crop_index, case_manifest, intensity_stats, settings,
                                      PreprocessingConfig.from_params(preprocessing), CropConfig.from_params(crop),
                                      model_card.cascade.stage2_label_mode, (0.0, 0.0))
    with retained_heap(bool(settings["retain_heap"])):
        scores = model.evaluate(val_loader, return_dict=True, verbose=0)
    metrics = {f"final_{k}" if k.startswith("val_") else f"final_val_{k}": float(v) for k, v in scores.items()}
    logger.info("%s: stage-2 validation (crops): %s", CASCADE_NAME, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    run_id = model_card.mlflow_run_id
    tracking.log_final_metrics(run_id, metrics)
    tracking.log_json(run_id, model_card.to_dict(), "model_card.json")
    log_model_objects(run_id, CASCADE_NAME, model, model_card, PredictionSettings.from_params(inference), stage1_model,
                      serving=inference.get("serving"))
    return metrics


# --------------------------------------------------------------------------- cross-validation (nnU-Net's way)
# Stage 1's fold models are the cross-validation fold models of namespace CASCADE_STAGE1 (`unet.fold_models`).
# Every development case gets its stage-1 box from the fold model that held it out; stage 2 of fold k trains
# on the crops of fold k's training cases and validates on fold k's; the fold-k cascade is stage 1 of fold k
# with stage 2 of fold k, and predicts fold k's cases out of fold.
def _fold_items(partitions: Mapping[str, Any]) -> list[tuple[int, Any]]:
    """``[(fold, loaded value)]`` sorted by fold from ``{"fold0": ..., "fold1": ...}`` (loaded
    partitions are callables; a node's own output is the value)."""
    def loaded(value: Any) -> Any:
        return value() if callable(value) and not hasattr(value, "predict_on_batch") else value
    return sorted((int(key.removeprefix("fold")), loaded(value)) for key, value in partitions.items())


def _development_cases(case_manifest: pd.DataFrame) -> pd.DataFrame:
    return _labelled(case_manifest, ("train", "validation"))


def _stage1_folds(stage1_fold_models: Mapping[str, Any], stage1_fold_cards: Mapping[str, Any],
                  case_manifest: pd.DataFrame, preprocessing: dict[str, Any],
                  intensity_stats: dict[str, Any]) -> tuple[dict[int, Any], dict[int, ModelCard], list[FoldCases]]:
    """Stage 1's fold models and cards by fold, checked to be this split's cross-validation."""
    models, cards = dict(_fold_items(stage1_fold_models)), dict(_fold_items(stage1_fold_cards))
    if sorted(models) != sorted(cards) or sorted(cards) != list(range(manifest_folds(case_manifest))):
        raise ModelMismatchError(f"stage-1 fold models {sorted(models)} and cards {sorted(cards)} are not the "
                                 f"{manifest_folds(case_manifest)} folds of the split; rerun the cv pipeline")
    check_fold_ensemble(list(cards.values()))
    dataset = manifest_dataset(case_manifest)
    for card in cards.values():
        card.check_dataset(dataset)
        card.check_preprocessing(preprocessing, intensity_stats)
        card.check_disjoint(test_case_ids(case_manifest), "holds out as test cases")
        if card.label_mode == "tumour":
            raise ModelMismatchError(f"{card.describe()} predicts only the tumour; a cascade's stage 1 must "
                                     "localise the pancreas")
    folds = [FoldCases.of(k, card.cases.train, card.cases.validation) for k, card in sorted(cards.items())]
    development = _development_cases(case_manifest)
    assignment = assign_out_of_fold(development["case_id"], folds)
    moved = sorted(c for c, f in zip(development["case_id"], development["fold"], strict=True) if assignment[c] != f)
    if moved:
        raise ModelMismatchError(f"the stage-1 fold models were cross-validated on other folds than the split's "
                                 f"(cases {moved} moved); rerun the cv pipeline")
    return models, cards, folds


def locate_out_of_fold(stage1_fold_models: Mapping[str, Any], stage1_fold_cards: Mapping[str, Any],
                       model_input_slices: Mapping[str, Callable[[], np.ndarray]], slice_geometry: dict[str, Any],
                       case_manifest: pd.DataFrame, intensity_stats: dict[str, Any], preprocessing: dict[str, Any],
                       crop: dict[str, Any], evaluation: dict[str, Any]) -> dict[str, Any]:
    """Every development case's stage-1 pancreas box, from the fold model that held it out.

    The box is found as at inference (stage 1's labels on its model grid ->
    :func:`~pancreas_seg.cascade.crops.locate_pancreas`), with the evaluation's prediction settings.
    Returns ``{"stage1", "axes", "summary", "cases": {case_id: provenance + localisation error}}``:
    per case, :func:`~pancreas_seg.cascade.out_of_fold.out_of_fold_record` (which fold model placed
    the box, its weights, the box) and the box's error against the true pancreas (mm); the summary
    is over all development cases.
    """
    models, cards, folds = _stage1_folds(stage1_fold_models, stage1_fold_cards, case_manifest, preprocessing,
                                         intensity_stats)
    settings = PredictionSettings.from_params(evaluation)
    predictors = {k: Predictor.from_models([models[k]], [cards[k]], settings, name=f"{cards[k].architecture}.fold{k}")
                  for k in models}
    crop_config = CropConfig.from_params(crop)
    assignment = assign_out_of_fold(_development_cases(case_manifest)["case_id"], folds)
    per_case = {}
    for index, row in enumerate(_development_cases(case_manifest).itertuples(), start=1):
        fold = assignment[row.case_id]
        stage1 = predictors[fold]
        geometry = ScanGeometry.from_dict(slice_geometry[row.case_id])
        labels = probabilities_to_labels(stage1.predict_probabilities(model_input_slices[f"{row.case_id}/image"]()),
                                         stage1.label_mode)
        box = locate_pancreas(labels, geometry, crop_config.min_component_fraction)
        truth_mask = _truth_slices(load_nifti(row.label_path).array, geometry)
        truth = mask_box(truth_mask)
        record = out_of_fold_record(fold, cards[fold].weights_sha256, None if box is None else box.to_list())
        if truth is not None:
            planned = CropGeometry.plan(geometry.shape, geometry.affine, box, crop_config) if box is not None else None
            record |= localisation_error(box, truth, truth_mask, geometry.slice_spacing_mm, planned)
        per_case[row.case_id] = record
        logger.info("%s: out-of-fold stage-1 box %d/%d: %s by fold model %d: %s", CASCADE_NAME, index,
                    len(assignment), row.case_id, fold, "none" if box is None else box.to_list())
    summary = summarise_localisation([r for r in per_case.values() if "coverage" in r])
    logger.info("%s: out-of-fold stage-1 localisation on %d case(s): %s", CASCADE_NAME, len(per_case), summary)
    return {"stage1": cards[0].architecture, "axes": ["z", "h", "w"], "summary": summary, "cases": per_case}


def prepare_cv_crops(stage1_out_of_fold: dict[str, Any], case_manifest: pd.DataFrame, intensity_stats: dict[str, Any],
                     preprocessing: dict[str, Any], crop: dict[str, Any],
                     stage2: dict[str, Any]) -> tuple[dict[str, Callable[[], np.ndarray]], dict[str, Any]]:
    """Cut every development case's stage-2 crop for cross-validation, per ``stage2.crop_source``.

    ``out_of_fold``: around the case's out-of-fold stage-1 box (planned exactly as at inference,
    no context margin; a case where stage 1 found nothing gets no crop, as the cascade would
    return an empty mask); the index entry carries the box's provenance. ``jittered_truth``:
    around the true pancreas with ``crop.context_mm``, as :func:`prepare_training_crops`.
    Returns the lazy partitions and the index, as :func:`prepare_training_crops`.
    """
    source = check_crop_source(str(stage2.get("crop_source", OUT_OF_FOLD)))
    config = PreprocessingConfig.from_params(preprocessing)
    crop_config = CropConfig.from_params(crop)
    stats = intensity_stats_from_dict(intensity_stats)
    cases = _development_cases(case_manifest)
    index_entries: dict[str, Any] = {}
    partitions: dict[str, Callable[[], np.ndarray]] = {}
    for index, row in enumerate(cases.itertuples(), start=1):
        label = load_nifti(row.label_path)
        if source == OUT_OF_FOLD:
            record = stage1_out_of_fold["cases"][row.case_id]
            if record["stage1_box"] is None:
                logger.warning("%s: stage-1 fold model %d found no pancreas in %s; no stage-2 crop", CASCADE_NAME,
                               record["stage1_fold"], row.case_id)
                continue
            box, context = PancreasBox(*record["stage1_box"]), 0
            provenance = {key: record[key] for key in ("source", "stage1_fold", "stage1_weights_sha256", "stage1_box")}
        else:
            box = mask_box(_truth_slices(label.array, ScanGeometry.plan(label.array.shape, label.affine, (1, 1))))
            if box is None:
                logger.warning("%s: %s has no pancreas in its label; no stage-2 crop", CASCADE_NAME, row.case_id)
                continue
            context, provenance = crop_config.context_px(), {"source": JITTERED_TRUTH, "stage1_fold": None}
        entry, parts = _plan_crop(row, label, box, crop_config, context, config, stats,
                                  f"{source} crop {index}/{len(cases)}")
        index_entries[row.case_id] = {**entry, **provenance}
        partitions.update(parts)
    return partitions, index_entries


def train_stage2_folds(stage1_fold_models: Mapping[str, Any], stage1_fold_cards: Mapping[str, Any],
                       crop_slices: Mapping[str, Callable[[], np.ndarray]], crop_index: dict[str, Any],
                       stage1_out_of_fold: dict[str, Any], case_manifest: pd.DataFrame,
                       intensity_stats: dict[str, Any], preprocessing: dict[str, Any], training: dict[str, Any],
                       crop: dict[str, Any], stage2: dict[str, Any],
                       inference: dict[str, Any]) -> tuple[dict[str, Any], dict[str, ModelCard]]:
    """Train stage 2 once per fold: fold k on fold k's training cases, validated on fold k's cases.

    With ``out_of_fold`` crops every crop of fold k's training and validation cases must come
    from a stage-1 fold model that did not train on the case
    (:func:`~pancreas_seg.cascade.out_of_fold.check_out_of_fold_crops`, else ValueError); no
    position jitter is added (the boxes carry stage 1's real errors). With ``jittered_truth`` the
    jitter is stage 1's out-of-fold RMS centre error (floor ``jitter_min_std_mm``). MLflow: run
    ``cascade.cv`` with a nested run per fold (``cascade.fold<k>``); checkpoints in
    ``<checkpoint_root>/cascade/fold<k>``; the fold ensemble of cascades is logged to the cv run
    as the pyfunc model ``segmenter`` (what the registry registers), applying the ``inference``
    settings by default. Returns ``({"fold<k>": fn -> stage-2 model}, {"fold<k>": cascade card})``;
    card k's stage 1 is stage-1 fold model k.
    """
    source = check_crop_source(str(stage2.get("crop_source", OUT_OF_FOLD)))
    models, cards, folds = _stage1_folds(stage1_fold_models, stage1_fold_cards, case_manifest, preprocessing,
                                         intensity_stats)
    settings = architecture_settings(training, stage2)
    crop_config = CropConfig.from_params(crop)
    jitter = ((0.0, 0.0) if source == OUT_OF_FOLD else
              jitter_std_mm(stage1_out_of_fold["summary"], crop_config, float(settings["jitter_min_std_mm"])))
    n_folds = len(folds)
    stage2_models, stage2_cards = {}, {}
    with tracking.architecture_run(f"{CASCADE_NAME}.cv") as cv_run:
        tracking.set_tags({"architecture": CASCADE_NAME, "n_folds": n_folds, "kind": "cross_validation",
                           "stage2_crops": source})
        tracking.log_json(cv_run.info.run_id, stage1_out_of_fold, "stage1_out_of_fold.json")
        for fold in range(n_folds):
            manifest = fold_manifest(case_manifest, fold)
            ids = split_case_ids(manifest)
            if source == OUT_OF_FOLD:
                check_out_of_fold_crops(crop_index, [c for c in ids["train"] + ids["validation"] if c in crop_index],
                                        folds, {k: card.weights_sha256 for k, card in cards.items()})
            logger.info("%s: cross-validation fold %d/%d: stage 2 on %s crops of %d training case(s)", CASCADE_NAME,
                        fold + 1, n_folds, source, len([c for c in ids["train"] if c in crop_index]))
            with tracking.architecture_run(f"{CASCADE_NAME}.fold{fold}") as run:
                tracking.set_tags({"fold": fold, "n_folds": n_folds})
                model, _, figure, card = fit_stage2(
                    crop_slices, crop_index, jitter, stage1_out_of_fold["summary"], models[fold], cards[fold],
                    manifest, intensity_stats, preprocessing, training, crop, stage2, run_id=run.info.run_id,
                    checkpoint_dir=Path(settings["checkpoint_root"]) / CASCADE_NAME / f"fold{fold}",
                    crop_source=source)
                card = card.replace(fold=fold, n_folds=n_folds, cv_run_id=cv_run.info.run_id)
                tracking.log_json(run.info.run_id, card.to_dict(), "model_card.json")
            _close(figure)
            stage2_models[f"fold{fold}"], stage2_cards[f"fold{fold}"] = model, card
        log_ensemble_objects(cv_run.info.run_id, f"{CASCADE_NAME}{ENSEMBLE_SUFFIX}", stage2_models, stage2_cards,
                             PredictionSettings.from_params(inference), serving=inference.get("serving"),
                             stage1_models={f"fold{k}": model for k, model in models.items()})
    # PartitionedDataset calls callable partitions to get their data, and a Keras model is callable
    return {key: functools.partial(_identity, model) for key, model in stage2_models.items()}, stage2_cards


def _identity(value: Any) -> Any:
    return value


def _close(figure: Any) -> None:
    import matplotlib.pyplot as plt  # noqa: PLC0415

    plt.close(figure)


def predict_cascade_out_of_fold(fold_models: Mapping[str, Any], fold_cards: Mapping[str, Any],
                                stage1_fold_models: Mapping[str, Any], model_input_slices: Mapping[str, Callable],
                                slice_geometry: dict[str, Any], case_manifest: pd.DataFrame,
                                evaluation: dict[str, Any]) -> dict[str, Callable[[], Any]]:
    """Every development case predicted by the cascade of the fold that held it out (both stages,
    from its CT file, through the one :class:`~pancreas_seg.inference.predictor.Predictor`).

    Returns ``{case_id: fn}`` (lazy, one case in memory at a time) on each file's own grid.
    """
    stage2_models, cards = dict(_fold_items(fold_models)), dict(_fold_items(fold_cards))
    stage1_models = dict(_fold_items(stage1_fold_models))
    check_fold_ensemble(list(cards.values()))
    settings = PredictionSettings.from_params(evaluation)
    development = _development_cases(case_manifest)
    assignment = assign_out_of_fold(development["case_id"], [FoldCases.of(k, c.cases.train, c.cases.validation)
                                                             for k, c in sorted(cards.items())])
    predictions: dict[str, Callable[[], Any]] = {}
    for fold, card in sorted(cards.items()):
        predictor = Predictor.from_models([stage2_models[fold]], [card], settings, name=f"{CASCADE_NAME}.fold{fold}",
                                          stage1=stage1_models[fold])   # checks both stages' weights
        if card.cascade.stage1.get("fold") != fold:
            raise ModelMismatchError(f"{card.describe()} (fold {fold}) has the stage 1 of fold "
                                     f"{card.cascade.stage1.get('fold')}; rerun the cascade's cross-validation")
        cases = sorted(c for c, f in assignment.items() if f == fold)
        predictor.check_disjoint(test_case_ids(case_manifest), "holds out as test cases")
        predictions |= predict_cases(predictor, cases, model_input_slices, slice_geometry, case_manifest,
                                     "out-of-fold")
    return dict(sorted(predictions.items()))


def score_cascade_out_of_fold(oof_predictions: Mapping[str, Callable[[], Any]], case_manifest: pd.DataFrame,
                              slice_geometry: dict[str, Any], evaluation: dict[str, Any]) -> pd.DataFrame:
    """Score the cascade's out-of-fold predictions as cv scores every architecture's: the
    evaluation's per-case columns plus ``fold`` (``architecture`` = ``cascade``)."""
    return score_out_of_fold_cases(oof_predictions, development_case_ids(case_manifest), case_manifest,
                                   slice_geometry, CASCADE_NAME, float(evaluation["nsd_tolerance_mm"]))


def evaluate_cascade_fold_ensemble(fold_models: Mapping[str, Any], fold_cards: Mapping[str, Any],
                                   stage1_fold_models: Mapping[str, Any], model_input_slices: Mapping[str, Callable],
                                   slice_geometry: dict[str, Any], case_manifest: pd.DataFrame,
                                   evaluation: dict[str, Any], cv: dict[str, Any]) -> tuple[dict[str, Callable], pd.DataFrame]:
    """Score every fold's cascade and the cascade's fold ensemble on the held-out test cases.

    The fold ensemble is nnU-Net's: the stage-1 fold models' mean softmax places one box, the
    stage-2 fold models' mean softmax segments that one crop (one
    :class:`~pancreas_seg.inference.predictor.Predictor` over the fold cascades). The
    ``architecture`` column says ``cascade.fold<k>`` or ``cascade.ensemble``, as cv's for every
    architecture. Returns the ensemble's test predictions (lazy) and the per-case metrics.
    """
    stage2_models, cards = dict(_fold_items(fold_models)), dict(_fold_items(fold_cards))
    stage1_models = dict(_fold_items(stage1_fold_models))
    folds = sorted(cards)
    cases = test_case_ids(case_manifest)
    if not cases:
        raise ValueError("the manifest has no test split; set split.test_fraction > 0")
    settings = PredictionSettings.from_params(evaluation, flip_tta=cv["ensemble_flip_tta"])
    ensemble = Predictor.from_models([stage2_models[k] for k in folds], [cards[k] for k in folds], settings,
                                     name=f"{CASCADE_NAME}{ENSEMBLE_SUFFIX}", stage1=[stage1_models[k] for k in folds])
    ensemble.check_disjoint(cases, "scores as test cases")
    predictors = [Predictor.from_models([stage2_models[k]], [cards[k]], settings, name=f"{CASCADE_NAME}.fold{k}",
                                        stage1=stage1_models[k]) for k in folds] + [ensemble]
    tolerance = float(evaluation["nsd_tolerance_mm"])
    frames = [score_cases(predict_cases(predictor, cases, model_input_slices, slice_geometry, case_manifest, "test"),
                          cases, case_manifest, slice_geometry, predictor.name, tolerance) for predictor in predictors]
    return (predict_cases(ensemble, cases, model_input_slices, slice_geometry, case_manifest, "test",
                          with_probability=False),   # saved labels only, as every architecture's ensemble
            pd.concat(frames, ignore_index=True))
