"""Scoring a trained model on its validation cases for the registry, and the registry's selection tags.

:func:`score_validation_cases` is a node of both the training and the cascade pipeline (each model's
namespace): every model, the cascade included, is predicted by the one
:class:`~pancreas_seg.inference.predictor.Predictor` and scored by
:func:`~pancreas_seg.evaluation.scoring.score_cases` on the VALIDATION cases, 3D on the original
grid, as the evaluation pipeline scores the test cases. :func:`selection_tags` are what every
registered version carries about the score it was selected on (after ``train`` and after ``cv``).
No Kedro imports.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from pancreas_seg import tracking
from pancreas_seg.evaluation.scoring import build_summary, flat_test_metrics
from pancreas_seg.evaluation.selection import SelectionRule
from pancreas_seg.inference.case_predictions import score_validation_cases as score_on_validation_cases
from pancreas_seg.inference.model_card import ModelCard
from pancreas_seg.inference.predictor import PredictionSettings, Predictor
from pancreas_seg.task07.splits import split_case_ids, test_case_ids

logger = logging.getLogger(__name__)


def score_validation_cases(model: Any, model_card: ModelCard,
                           model_input_slices: Mapping[str, Callable[[], np.ndarray]], slice_geometry: dict[str, Any],
                           case_manifest: pd.DataFrame, evaluation: dict[str, Any],
                           stage1_model: Any = None) -> pd.DataFrame:
    """Score the model (the cascade: with its ``stage1_model``) on the split's VALIDATION cases.

    The same prediction settings (``evaluation``), prediction path and scores as the evaluation of
    the test cases (:func:`pancreas_seg.inference.case_predictions.score_validation_cases`, which
    first refuses a model that saw a test case or was not validated on these cases). The summary
    goes to the model's MLflow run as ``validation_<metric>_<class>_<stat>`` metrics (e.g.
    ``validation_dice_pancreas_mean``). Returns the per-case rows the registry's ``champion`` is
    chosen on (saved as ``data/08_reporting/training/<model>_validation_metrics_per_case.csv``).
    """
    predictor = Predictor.from_models([model], [model_card], PredictionSettings.from_params(evaluation),
                                      stage1=stage1_model)
    metrics_per_case = score_on_validation_cases(
        predictor, split_case_ids(case_manifest)["validation"], test_case_ids(case_manifest), model_input_slices,
        slice_geometry, case_manifest, float(evaluation["nsd_tolerance_mm"]))
    summary = build_summary(metrics_per_case, model_card.architecture, model_card.mlflow_run_id, model_card.data_source)
    flat = {f"validation_{key.removeprefix('test_')}": value for key, value in flat_test_metrics(summary).items()}
    tracking.log_final_metrics(model_card.mlflow_run_id, flat)
    logger.info("%s: validation, 3D on the original grid: pancreas Dice mean %.4f over %d case(s)",
                model_card.architecture, flat.get("validation_dice_pancreas_mean", float("nan")), summary["n_cases"])
    return metrics_per_case


def selection_tags(rule: SelectionRule, cases: Sequence[str], score: float) -> dict[str, str]:
    """Registry tags saying what a version was (or was not) selected on.

    ``selection_score``: the score's name (``validation_dice_pancreas_mean``); ``selection_score_value``:
    this version's value (empty when it has none); ``selection_rule``: the rule in words;
    ``selection_split``: ``validation`` or ``cv``; ``selection_cases``: the comma-separated case ids
    the score was computed on; ``selection_n_cases``: how many.
    """
    return {"selection_score": rule.score_name, "selection_score_value": "" if np.isnan(score) else f"{score:.4f}",
            "selection_rule": rule.describe(), "selection_split": rule.split,
            "selection_cases": ",".join(cases), "selection_n_cases": str(len(cases))}
