"""Training nodes: thin wrappers around :mod:`pancreas_seg.learning` and :mod:`pancreas_seg.models`.

Keras is imported inside the nodes so ``kedro viz``, ``kedro --help`` and catalog loading stay fast.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pancreas_seg import tracking
from pancreas_seg.imaging.preprocess import PreprocessingConfig
from pancreas_seg.learning.setup import (
    architecture_settings,
    compile_model,
    make_loaders,
    resume_fingerprint,
)
from pancreas_seg.inference.model_card import preprocessing_fingerprint
from pancreas_seg.core.runtime import dtype_policy, retained_heap
from pancreas_seg.inference.serving import log_model_objects
from pancreas_seg.task07.splits import manifest_dataset

logger = logging.getLogger(__name__)


def split_case_ids(case_manifest: pd.DataFrame) -> dict[str, list[str]]:
    """``{"train": [...], "validation": [...]}``: the sorted case ids a model is trained on."""
    return {split: sorted(case_manifest.loc[case_manifest["split"] == split, "case_id"].astype(str))
            for split in ("train", "validation")}


def build_model_card(name: str, run_id: str, input_shape: tuple[int, int, int], config: PreprocessingConfig,
                     preprocessing: dict[str, Any], intensity_stats: dict[str, Any],
                     case_manifest: pd.DataFrame, result: Any, monitor: str, weights_sha256: str) -> dict[str, Any]:
    """The model card: what inference needs, and what the model is bound to (see :mod:`model_card`)."""
    import keras  # noqa: PLC0415

    return {
        "architecture": name, "mlflow_run_id": run_id, "input_shape": list(input_shape),
        "label_mode": config.label_mode, "preprocessing": preprocessing, "intensity_stats": intensity_stats,
        "preprocessing_fingerprint": preprocessing_fingerprint(preprocessing, intensity_stats),
        "dataset": manifest_dataset(case_manifest),
        "data_source": str(case_manifest["source"].iloc[0]),
        "cases": split_case_ids(case_manifest),
        "weights_sha256": weights_sha256,
        "monitor": monitor, "best_value": result.best_value,
        "epochs_completed": len(next(iter(result.history.values()), [])),
        "keras_backend": keras.backend.backend(), "git_commit": tracking.git_commit(),
        "trained_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def log_run_setup(name: str, settings: dict[str, Any], preprocessing: dict[str, Any], source: str,
                   label_mode: str) -> None:
    import keras  # noqa: PLC0415
    import mlflow  # noqa: PLC0415

    mlflow.set_tags({"architecture": name, "data_source": source, "keras_backend": keras.backend.backend(),
                     "git_commit": tracking.git_commit(), "label_mode": label_mode})
    mlflow.log_params(tracking.flatten({"architecture": name, "training": settings,
                                        "preprocessing": preprocessing}))


def log_training_result(run_id: str, name: str, result: Any, source: str) -> Any:
    """Complete the epoch curves after a resume; log the training-curve figure and history."""
    from pancreas_seg.evaluation.plots import plot_training_curves  # noqa: PLC0415

    if result.resumed_from_epoch:
        import mlflow  # noqa: PLC0415

        mlflow.set_tag("resumed_from_epoch", result.resumed_from_epoch)
        for epoch in range(result.resumed_from_epoch):  # earlier epochs, so curves are complete
            tracking.log_epoch_metrics(run_id, {k: v[epoch] for k, v in result.history.items()}, epoch + 1)
    figure = plot_training_curves(result.history, title=f"{name} ({source} data)")
    tracking.log_figure(run_id, figure, "plots/training_curves.png")
    tracking.log_json(run_id, result.history, "training_history.json")
    return figure


def train_model(model_input_slices: Mapping[str, Callable[[], np.ndarray]], case_manifest: pd.DataFrame,
                intensity_stats: dict[str, Any], preprocessing: dict[str, Any], training: dict[str, Any],
                architecture: dict[str, Any]) -> tuple[Any, dict[str, Any], Any, dict[str, Any]]:
    """Train one architecture with resume; log it to its own nested MLflow run.

    Steps: merge the settings, build the loaders, fit (resuming a checkpoint of the same settings
    and data) under the configured dtype policy and allocator tuning, log the run, write the card.
    Process-wide settings (mixed precision, malloc tuning) are restored when the node ends.

    Returns the best model (by ``monitor``), the training history, the training-curve figure and
    the model card (see :mod:`pancreas_seg.inference.model_card`).
    """
    import keras  # noqa: PLC0415

    from pancreas_seg.learning.training import FitConfig, fit_with_resume  # noqa: PLC0415
    from pancreas_seg.models.io import weights_sha256  # noqa: PLC0415
    from pancreas_seg.models.registry import build_model  # noqa: PLC0415

    name = architecture["name"]
    fold = architecture.get("fold")   # set by the cross-validation pipeline: one model per fold
    run_name = name if fold is None else f"{name}.fold{fold}"
    settings = architecture_settings(training, architecture)
    config = PreprocessingConfig.from_params(preprocessing)
    fit_config = FitConfig.from_settings(settings)
    train_loader, val_loader = make_loaders(model_input_slices, case_manifest, settings, config)
    input_shape = (*config.image_size_px, config.context_slices)
    data_key = sorted(train_loader.case_ids) + sorted(val_loader.case_ids)
    fingerprint = resume_fingerprint(fit_config, name, settings, preprocessing, intensity_stats, data_key)
    source = str(case_manifest["source"].iloc[0])
    logger.info("%s: training on %d slices (%d cases), validating on %d slices (%d cases)%s", run_name,
                train_loader.n_slices, len(train_loader.case_ids), val_loader.n_slices,
                len(val_loader.case_ids), " - SYNTHETIC phantoms" if source == "synthetic" else "")

    def build():
        model = build_model(name, input_shape, config.label_mode, **settings["model"])
        return compile_model(model, settings, config.label_mode, total_steps=fit_config.epochs * len(train_loader))

    policy = "mixed_float16" if settings.get("mixed_precision") else None
    checkpoint_dir = Path(settings["checkpoint_root"]) / name / ("" if fold is None else f"fold{fold}")
    with tracking.architecture_run(run_name) as run, dtype_policy(policy):
        run_id = run.info.run_id
        log_run_setup(name, settings, preprocessing, source, config.label_mode)
        if fold is not None:
            import mlflow  # noqa: PLC0415

            mlflow.set_tags({"fold": fold, "n_folds": architecture["n_folds"]})
        epoch_logger = keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs: tracking.log_epoch_metrics(run_id, logs, epoch + 1))
        with retained_heap(bool(settings["retain_heap"])):
            result = fit_with_resume(build, train_loader, val_loader, fit_config, checkpoint_dir, fingerprint,
                                     label=run_name, callbacks=[epoch_logger])
        figure = log_training_result(run_id, run_name, result, source)
    card = build_model_card(name, run_id, input_shape, config, preprocessing, intensity_stats, case_manifest,
                            result, fit_config.monitor, weights_sha256(result.model))
    if fold is not None:
        card |= {"fold": int(fold), "n_folds": int(architecture["n_folds"])}
    return result.model, result.history, figure, card


def validate_model(model: Any, model_input_slices: Mapping[str, Callable[[], np.ndarray]],
                   case_manifest: pd.DataFrame, model_card: dict[str, Any], preprocessing: dict[str, Any],
                   training: dict[str, Any], architecture: dict[str, Any]) -> dict[str, float]:
    """Validation Dice per class of the best model (slice level, all validation slices)."""
    config = PreprocessingConfig.from_params(preprocessing)
    settings = architecture_settings(training, architecture)
    _, val_loader = make_loaders(model_input_slices, case_manifest, settings, config)
    with retained_heap(bool(settings["retain_heap"])):
        scores = model.evaluate(val_loader, return_dict=True, verbose=0)
    metrics = {f"final_{k}" if k.startswith("val_") else f"final_val_{k}": float(v) for k, v in scores.items()}
    logger.info("%s: validation: %s", model_card["architecture"],
                ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    tracking.log_final_metrics(model_card["mlflow_run_id"], metrics)
    tracking.log_json(model_card["mlflow_run_id"], model_card, "model_card.json")
    log_model_objects(model_card["mlflow_run_id"], model_card["architecture"], model, model_card)
    return metrics


def register_trained_models(registry: dict[str, Any], *inputs: Any) -> dict[str, Any]:
    """Register each trained model's pyfunc model; the best by validation pancreas Dice gets the alias.

    Inputs after ``registry`` (the ``registry`` parameters): every model's card, then its
    validation metrics (same order). Each model becomes a version of ``registry.registered_model``
    tagged with its architecture, validation Dice and source run; ``registry.alias`` (``champion``)
    points at the one with the highest ``registry.metric``. Note: the cascade's validation Dice is
    measured on its stage-2 crops, not on whole scans.
    Returns what was registered (also saved as ``data/08_reporting/training/model_registration.json``).
    """
    if not registry.get("register", True):
        return {"registered": False, "reason": "registry.register is false"}
    n = len(inputs) // 2
    cards, metrics = inputs[:n], inputs[n:]
    name, alias, metric = str(registry["registered_model"]), str(registry["alias"]), str(registry["metric"])
    entries = []
    for card, values in zip(cards, metrics, strict=True):
        score = float(values.get(metric, float("nan")))
        version = tracking.register_model(
            f"runs:/{card['mlflow_run_id']}/segmenter", name,
            {"architecture": card["architecture"], metric: f"{score:.4f}", "source": "train",
             "data_source": str(card.get("data_source")), "dataset": str(card.get("dataset"))})
        entries.append({"architecture": card["architecture"], "version": version, metric: score,
                        "mlflow_run_id": card["mlflow_run_id"]})
    ranked = sorted((e for e in entries if e[metric] == e[metric]), key=lambda e: (-e[metric], e["architecture"]))
    report: dict[str, Any] = {"registered": True, "registered_model": name, "metric": metric, "models": entries,
                              "alias": None, "champion": None}
    if ranked:
        best = ranked[0]
        tracking.set_registered_alias(name, alias, best["version"])
        report |= {"alias": alias, "champion": best["architecture"], "version": best["version"],
                   "uri": f"models:/{name}@{alias}"}
        logger.info("Registered %d model(s) as %s; %s = %s (version %s, %s %.4f)", len(entries), name, alias,
                    best["architecture"], best["version"], metric, best[metric])
    return report
