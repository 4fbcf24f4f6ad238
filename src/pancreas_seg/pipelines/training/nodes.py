"""Training nodes: thin wrappers around :mod:`pancreas_seg.tracking.training_run` (training one model
in its MLflow run), :mod:`pancreas_seg.learning` and the MLflow model registry (the selection rule:
:mod:`pancreas_seg.evaluation.selection`; the validation scores it reads:
:func:`pancreas_seg.tracking.selection.score_validation_cases`).

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
from pancreas_seg.evaluation.plots import plot_learning_curves
from pancreas_seg.evaluation.selection import SelectionRule, check_selection_cases, rank_models, scored_case_ids
from pancreas_seg.imaging.preprocess import PreprocessingConfig
from pancreas_seg.inference.model_card import ModelCard
from pancreas_seg.inference.predictor import PredictionSettings
from pancreas_seg.inference.serving import MODEL_NAME, log_model_objects
from pancreas_seg.learning.setup import architecture_settings, make_loaders
from pancreas_seg.models.names import CASCADE_NAME
from pancreas_seg.task07.splits import split_case_ids, test_case_ids
from pancreas_seg.tracking.selection import selection_tags

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


def register_trained_models(registry: dict[str, Any], case_manifest: pd.DataFrame, *inputs: Any) -> dict[str, Any]:
    """Register each trained model's pyfunc model; the best by validation 3D score gets the alias.

    Inputs after ``case_manifest``: every model's card, then its validation metrics (model input
    level: 96 px slices, the cascade's crops; recorded, never used to select), then its per-case
    VALIDATION scores from :func:`pancreas_seg.tracking.selection.score_validation_cases` (same order). Every model was scored on
    the same validation cases, in 3D on the original grid, and ``registry.selection``
    (:class:`~pancreas_seg.evaluation.selection.SelectionRule`) turns them into one score per
    model: by default the mean pancreas Dice over the validation cases, ties to the first name.
    Each model becomes a version of ``registry.registered_model`` tagged with its architecture,
    that score (``selection_score``: its name, ``selection_score_value``, ``selection_cases``: the
    case ids) and its source run; ``registry.alias`` (``champion``) points at the best.
    Returns what was registered (also saved as ``data/08_reporting/training/model_registration.json``).
    """
    if not registry.get("register", True):
        return {"registered": False, "reason": "registry.register is false"}
    n = len(inputs) // 3
    cards, metrics, scores = inputs[:n], inputs[n:2 * n], inputs[2 * n:]
    rule = SelectionRule.from_params(registry["selection"], split="validation")
    per_case = pd.concat(scores, ignore_index=True)
    cases = scored_case_ids(per_case)
    check_selection_cases(cases, split_case_ids(case_manifest)["validation"], test_case_ids(case_manifest))
    by_model = rule.scores(per_case)
    name, alias = str(registry["registered_model"]), str(registry["alias"])
    entries = []
    for card, values in zip(cards, metrics, strict=True):
        score = float(by_model.get(card.architecture, float("nan")))
        version = tracking.register_model(
            f"runs:/{card.mlflow_run_id}/{MODEL_NAME}", name,
            {"architecture": card.architecture, **selection_tags(rule, cases, score), "source": "train",
             "data_source": str(card.data_source), "dataset": str(card.dataset)})
        entries.append({"architecture": card.architecture, "version": version,
                        rule.score_name: None if np.isnan(score) else score,
                        "model_input_validation_metrics": dict(values), "mlflow_run_id": card.mlflow_run_id})
    ranking = rank_models(by_model.reindex([e["architecture"] for e in entries]))
    report: dict[str, Any] = {"registered": True, "registered_model": name, "score": rule.score_name,
                              "rule": rule.describe(), "cases": cases, "models": entries,
                              "ranking": [{"architecture": a, "score": None if np.isnan(s) else s} for a, s in ranking],
                              "alias": None, "champion": None}
    if ranking and not np.isnan(ranking[0][1]):
        best = next(e for e in entries if e["architecture"] == ranking[0][0])
        tracking.set_registered_alias(name, alias, best["version"])
        report |= {"alias": alias, "champion": best["architecture"], "version": best["version"],
                   "uri": f"models:/{name}@{alias}"}
        logger.info("Registered %d model(s) as %s; %s = %s (version %s, %s %.4f over %d validation case(s))",
                    len(entries), name, alias, best["architecture"], best["version"], rule.score_name,
                    ranking[0][1], len(cases))
    return report


#: The y-axis of the learning curves: every model's validation pancreas Dice per epoch.
LEARNING_CURVE_METRIC = "val_dice_pancreas"
LEARNING_CURVES_ARTIFACT = "plots/learning_curves.png"


def learning_curves(**histories: Mapping[str, Any]) -> Any:
    """One figure of every trained model's validation pancreas Dice against optimizer steps and
    against training seconds (keyword = model name, value = its training history); also logged to
    the active MLflow run (the parent run of ``kedro run``) as ``plots/learning_curves.png``.

    The cascade's line is its stage 2, on crops around the true pancreas (not the whole slices the
    other models see), and says so in the legend.
    """
    labels = {CASCADE_NAME: f"{CASCADE_NAME} (stage 2, on crops)"}
    figure = plot_learning_curves(histories, metric=LEARNING_CURVE_METRIC, labels=labels)
    if not tracking.log_figure_to_active_run(figure, LEARNING_CURVES_ARTIFACT):
        logger.info("No active MLflow run: learning curves saved through the catalog only")
    return figure
