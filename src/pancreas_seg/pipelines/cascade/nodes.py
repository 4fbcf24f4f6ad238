"""Cascade nodes: thin wrappers around :mod:`pancreas_seg.cascade`.

Stage 1 is the model trained in another namespace (its ``model_<architecture>`` and card); these
nodes measure where it puts the pancreas box on validation cases, cut the stage-2 training crops
and train stage 2. The evaluation pipeline evaluates the trained cascade like any other model
(:class:`pancreas_seg.inference.predictor.Predictor` runs both stages).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pancreas_seg import tracking
from pancreas_seg.cascade.crops import CropConfig, CropGeometry, locate_pancreas, mask_box
from pancreas_seg.cascade.localisation import (
    jitter_std_mm,
    localisation_error,
    summarise_localisation,
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
from pancreas_seg.inference.model_card import CascadeSpec, CaseSplit, ModelCard
from pancreas_seg.inference.predictor import PredictionSettings, Predictor
from pancreas_seg.inference.serving import log_model_objects
from pancreas_seg.learning.setup import architecture_settings, compile_model, resume_fingerprint
from pancreas_seg.models.names import CASCADE_NAME
from pancreas_seg.runners.parallel import LazyCaseParts
from pancreas_seg.task07.splits import manifest_dataset, split_case_ids, test_case_ids
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
        geometry = CropGeometry.plan(label.array.shape, label.affine, box, crop_config, context_px=context)
        slack = [max(0, (r - 2 * context - s) // 2) for r, s in zip(geometry.region_hw, crop_config.size_px,
                                                                      strict=True)]
        index_entries[row.case_id] = {"crop": geometry.to_dict(), "slack_px": slack}
        case = LazyCaseParts(cut_training_crop, (row.image_path, row.label_path, geometry, config, stats),
                             ("image", "label"),
                             f"{CASCADE_NAME}: cutting training crop {index}/{len(cases)}: {row.case_id}",
                             cost=float(label.array.size))   # the cut reads the whole scan
        partitions.update(case.partitions(row.case_id))
    return partitions, index_entries


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
    import keras  # noqa: PLC0415

    from pancreas_seg.learning.training import FitConfig, fit_with_resume  # noqa: PLC0415
    from pancreas_seg.models.io import weights_sha256  # noqa: PLC0415
    from pancreas_seg.models.registry import build_model  # noqa: PLC0415

    name = stage2["name"]
    label_mode = stage2.get("label_mode", "multiclass")
    settings = architecture_settings(training, stage2)
    config = PreprocessingConfig.from_params(preprocessing)
    crop_config = CropConfig.from_params(crop)
    jitter = jitter_std_mm(stage1_localisation["summary"], crop_config, float(settings["jitter_min_std_mm"]))
    train_loader, val_loader = make_crop_loaders(crop_slices, crop_index, case_manifest, intensity_stats,
                                                 settings, config, crop_config, label_mode, jitter)
    input_shape = (*crop_config.size_px, config.context_slices)
    stage1_sha = weights_sha256(stage1_model)
    fit_config = FitConfig.from_settings(settings)
    fingerprint = resume_fingerprint(fit_config, f"{CASCADE_NAME}:{name}", settings, preprocessing, intensity_stats,
                                     crop_config.to_dict(), label_mode, list(jitter), stage1_sha,
                                     sorted(train_loader.case_ids) + sorted(val_loader.case_ids))
    source = str(case_manifest["source"].iloc[0])
    logger.info("%s: stage 2 (%s, %s) on %d crop slices of %d cases (%d with tumour), window %s px at "
                "%.2f mm, position jitter %.1f/%.1f mm, %d tumour window(s) per batch%s", CASCADE_NAME, name, label_mode,
                train_loader.n_slices, len(train_loader.case_ids), train_loader.tumour_slices.size,
                crop_config.size_px, crop_config.spacing_mm, *jitter, train_loader.n_tumour_per_batch,
                " - SYNTHETIC phantoms" if source == "synthetic" else "")

    def build():
        model = build_model(name, input_shape, label_mode, **settings["model"])
        return compile_model(model, settings, label_mode, total_steps=fit_config.epochs * len(train_loader))

    policy = "mixed_float16" if settings.get("mixed_precision") else None
    with tracking.architecture_run(CASCADE_NAME) as run, dtype_policy(policy):
        run_id = run.info.run_id
        log_run_setup(CASCADE_NAME, settings, preprocessing, source, label_mode)
        tracking.set_tags({"stage1_architecture": stage1_model_card.architecture, "stage2_architecture": name})
        tracking.log_params({"cascade": {"crop": crop_config.to_dict(), "jitter_std_mm": list(jitter),
                                         "stage1_weights_sha256": stage1_sha}})
        tracking.log_json(run_id, stage1_localisation, "stage1_localisation.json")
        epoch_logger = keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs: tracking.log_epoch_metrics(run_id, logs, epoch + 1))
        with retained_heap(bool(settings["retain_heap"])):
            result = fit_with_resume(build, train_loader, val_loader, fit_config,
                                     Path(settings["checkpoint_root"]) / CASCADE_NAME, fingerprint,
                                     label=CASCADE_NAME, callbacks=[epoch_logger])
        figure = log_training_result(run_id, CASCADE_NAME, result, source)
    spec = CascadeSpec(
        stage1={"architecture": stage1_model_card.architecture, "label_mode": stage1_model_card.label_mode,
                "mlflow_run_id": stage1_model_card.mlflow_run_id, "trained_at": stage1_model_card.trained_at,
                "input_shape": list(stage1_model_card.input_shape), "weights_sha256": stage1_sha},
        stage2={"architecture": name, "label_mode": label_mode, "input_shape": list(input_shape)},
        crop=crop_config.to_dict(), jitter_std_mm=tuple(jitter), stage1_localisation=stage1_localisation["summary"],
        tumour_fraction=float(settings["tumour_fraction"]),
        min_tumour_volume_mm3=float(stage2.get("min_tumour_volume_mm3", 0.0)))
    # the cascade's output is multiclass: stage 2's, completed by stage 1 if needed
    card = training_card(CASCADE_NAME, run_id, input_shape, "multiclass", preprocessing, intensity_stats,
                         case_manifest, result, fit_config.monitor, weights_sha256(result.model), cascade=spec)
    return result.model, stage1_model, result.history, figure, card


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
