"""Training nodes: thin wrappers around :mod:`pancreas_seg.tracking.training_run` (training one model
in its MLflow run), :mod:`pancreas_seg.learning` and the MLflow model registry.

Keras is imported inside the functions so ``kedro viz``, ``kedro --help`` and catalog loading stay fast.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pandas as pd

from pancreas_seg import tracking
from pancreas_seg.core.runtime import retained_heap
from pancreas_seg.imaging.preprocess import PreprocessingConfig
from pancreas_seg.inference.model_card import ModelCard
from pancreas_seg.inference.predictor import PredictionSettings
from pancreas_seg.inference.serving import MODEL_NAME, log_model_objects
from pancreas_seg.learning.setup import architecture_settings, make_loaders

logger = logging.getLogger(__name__)


def validate_model(model: Any, model_input_slices: Mapping[str, Callable[[], np.ndarray]],
                   case_manifest: pd.DataFrame, model_card: ModelCard, preprocessing: dict[str, Any],
                   training: dict[str, Any], architecture: dict[str, Any], inference: dict[str, Any]) -> dict[str, float]:
    """Validation Dice per class of the best model (slice level, all validation slices).

    Also logs the card and the model as the pyfunc model ``segmenter`` of its run, which applies
    the ``inference`` prediction settings by default.
    """
    config = PreprocessingConfig.from_params(preprocessing)
    settings = architecture_settings(training, architecture)
    _, val_loader = make_loaders(model_input_slices, case_manifest, settings, config)
    with retained_heap(bool(settings["retain_heap"])):
        scores = model.evaluate(val_loader, return_dict=True, verbose=0)
    metrics = {f"final_{k}" if k.startswith("val_") else f"final_val_{k}": float(v) for k, v in scores.items()}
    logger.info("%s: validation: %s", model_card.architecture, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    tracking.log_final_metrics(model_card.mlflow_run_id, metrics)
    tracking.log_json(model_card.mlflow_run_id, model_card.to_dict(), "model_card.json")
    log_model_objects(model_card.mlflow_run_id, model_card.architecture, model, model_card,
                      PredictionSettings.from_params(inference), serving=inference.get("serving"))
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
            f"runs:/{card.mlflow_run_id}/{MODEL_NAME}", name,
            {"architecture": card.architecture, metric: f"{score:.4f}", "source": "train",
             "data_source": str(card.data_source), "dataset": str(card.dataset)})
        entries.append({"architecture": card.architecture, "version": version, metric: score,
                        "mlflow_run_id": card.mlflow_run_id})
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
