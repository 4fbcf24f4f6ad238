"""Evaluation nodes: predict the held-out test split, score it in 3D, compare and plot.

Thin wrappers around :class:`pancreas_seg.inference.predictor.Predictor`,
:mod:`pancreas_seg.evaluation.scoring` and :mod:`pancreas_seg.tracking`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pandas as pd

from pancreas_seg import tracking
from pancreas_seg.evaluation.scoring import (
    LESION_CLASS,
    METRIC_COLUMNS,
    TRUTH_PRESENT_DICE,
    build_summary,
    comparison_table,
    flat_test_metrics,
    markdown_table,
    score_cases,
)
from pancreas_seg.imaging.nifti_io import CasePrediction, NiftiVolume, load_nifti
from pancreas_seg.imaging.preprocess import axial_view
from pancreas_seg.inference.case_predictions import predict_cases
from pancreas_seg.inference.model_card import ModelCard
from pancreas_seg.inference.predictor import PredictionSettings, Predictor
from pancreas_seg.task07.splits import manifest_dataset, test_case_ids

logger = logging.getLogger(__name__)


def check_model_binding(model_card: ModelCard, case_manifest: pd.DataFrame,
                        intensity_stats: dict[str, Any], preprocessing: dict[str, Any]) -> dict[str, Any]:
    """Refuse to score a model on its own training data or with other preprocessing.

    Raises :class:`~pancreas_seg.inference.model_card.ModelMismatchError` naming the cases or settings when
    the model was trained on another dataset, when its training or validation cases are among the
    test cases of the current split, or when its preprocessing differs from the one in use.
    Returns what was checked (saved as ``<architecture>/model_check.json``).
    """
    cases = test_case_ids(case_manifest)
    dataset = manifest_dataset(case_manifest)
    model_card.check_dataset(dataset)
    model_card.check_disjoint(cases, "scores as test cases")
    model_card.check_preprocessing(preprocessing, intensity_stats)
    return {"architecture": model_card.architecture, "dataset": dataset, "test_cases": cases,
            "preprocessing_fingerprint": model_card.preprocessing_fingerprint,
            "weights_sha256": model_card.weights_sha256, "trained_at": model_card.trained_at}


def predict_test_cases(model: Any, model_card: ModelCard, model_check: dict[str, Any],
                       model_input_slices: Mapping[str, Callable[[], np.ndarray]],
                       slice_geometry: dict[str, Any], case_manifest: pd.DataFrame, evaluation: dict[str, Any],
                       stage1_model: Any = None) -> dict[str, Callable[[], CasePrediction]]:
    """Lazily predict every test case on the original file's grid and affine, with the predictor.

    ``model_check`` (from :func:`check_model_binding`) is taken only so that the binding is
    checked first. A single model predicts the preprocessed slices; the cascade (its card and
    ``stage1_model``) runs both stages on each test case's CT file, as inference does.
    Returns ``{case_id: fn}``; Kedro calls each ``fn`` when it saves that partition, so only one
    case is in memory at a time. Saved predictions are not post-processed; a model with a tumour
    output also saves ``<case>_tumour_probability.nii.gz`` (detection is scored on it).
    """
    predictor = Predictor.from_models([model], [model_card], PredictionSettings.from_params(evaluation),
                                      stage1=stage1_model)
    cases = test_case_ids(case_manifest)
    if not cases:
        raise ValueError("the manifest has no test split; set split.test_fraction > 0")
    return predict_cases(predictor, cases, model_input_slices, slice_geometry, case_manifest, "test")


def score_test_cases(test_predictions: Mapping[str, Callable[[], NiftiVolume]], case_manifest: pd.DataFrame,
                     slice_geometry: dict[str, Any], model_card: ModelCard,
                     evaluation: dict[str, Any]) -> pd.DataFrame:
    """Score the held-out test cases with :func:`score_cases` (columns :data:`METRIC_COLUMNS`)."""
    return score_cases(test_predictions, test_case_ids(case_manifest), case_manifest, slice_geometry,
                       model_card.architecture, float(evaluation["nsd_tolerance_mm"]))


def summarise_model(metrics_per_case: pd.DataFrame, model_card: ModelCard) -> dict[str, Any]:
    """Build the model's summary and log it (and test metrics, detection's ``test_tumour_auroc``,
    ``test_tumour_ap``, ``test_tumour_froc_cpm`` ... among them) to the model's MLflow run."""
    summary = build_summary(metrics_per_case, model_card.architecture, model_card.mlflow_run_id,
                            model_card.data_source)
    run_id = model_card.mlflow_run_id
    tracking.log_final_metrics(run_id, flat_test_metrics(summary))
    tracking.log_json(run_id, summary, "evaluation/summary.json")
    tracking.log_json(run_id, metrics_per_case.to_dict(orient="records"), "evaluation/metrics_per_case.json")
    pancreas = summary["classes"].get("pancreas", {})
    dice_stats, hd95_stats = pancreas.get("dice", {}), pancreas.get("hd95_mm", {})
    logger.info("%s: test pancreas Dice: mean %.4f, median %.4f (n=%s); HD95 median %.1f mm over %s "
                "finite case(s), %s miss(es)", model_card.architecture,
                dice_stats.get("mean", float("nan")), dice_stats.get("median", float("nan")), dice_stats.get("n"),
                hd95_stats.get("median", float("nan")), hd95_stats.get("n_finite"), hd95_stats.get("n_inf"))
    present = summary["classes"].get(LESION_CLASS, {}).get(TRUTH_PRESENT_DICE, {})
    lesions = summary["lesions"].get(LESION_CLASS, {})
    logger.info("%s: test %s Dice over the %s case(s) with a %s: mean %.4f; lesion sensitivity %.3f "
                "(%s of %s lesions found), %.2f false-positive component(s) per case over %s case(s)",
                model_card.architecture, LESION_CLASS, present.get("n"), LESION_CLASS,
                present.get("mean", float("nan")), lesions.get("lesion_sensitivity", float("nan")),
                lesions.get("lesions_found"), lesions.get("lesions_true"),
                lesions.get("fp_components_per_case", float("nan")), lesions.get("n_cases"))
    detection = summary["detection"].get(LESION_CLASS, {})
    if detection.get("available"):
        patient = detection["patient"]
        logger.info("%s: test %s detection: patient AUROC %.3f [%.3f, %.3f], AP %.3f (%s of %s cases with a %s); "
                    "FROC CPM %.3f", model_card.architecture, LESION_CLASS, patient["auroc"], patient["auroc_ci_low"],
                    patient["auroc_ci_high"], patient["ap"], patient["n_positive"], patient["n_patients"],
                    LESION_CLASS, detection["froc"]["cpm"])
    return summary


def compare_architectures(*inputs: Any) -> tuple[pd.DataFrame, pd.DataFrame, str, Any, Any]:
    """Inputs: each architecture's metrics frame, then each one's summary (same order).

    Returns the combined per-case CSV, the comparison table (CSV and markdown, with the tumour
    detection columns and table), the Dice and HD95 box plots (misses counted in the labels and
    caption) and the tumour FROC plot of all models, the plots and markdown also logged to every
    architecture's run.
    """
    n = len(inputs) // 2
    frames, summaries = list(inputs[:n]), list(inputs[n:])
    # reindex, not [METRIC_COLUMNS]: a per-case CSV kept from before a column existed gets NaN there
    metrics = pd.concat(frames, ignore_index=True).reindex(columns=METRIC_COLUMNS)
    table = comparison_table(summaries)
    markdown = markdown_table(table)
    from pancreas_seg.evaluation.plots import plot_dice_boxplots, plot_froc  # noqa: PLC0415 - matplotlib when plotting only

    figure = plot_dice_boxplots(metrics)
    froc_figure = plot_froc({s["architecture"]: s.get("detection", {}).get(LESION_CLASS, {}) for s in summaries},
                            "tumour FROC, held-out test cases")
    for summary in summaries:
        tracking.log_figure(summary["mlflow_run_id"], figure, "plots/dice_boxplots.png")
        tracking.log_figure(summary["mlflow_run_id"], froc_figure, "plots/froc.png")
        tracking.log_text(summary["mlflow_run_id"], markdown, "evaluation/comparison.md")
    logger.info("Held-out test comparison:\n%s", markdown)
    return metrics, table, markdown, figure, froc_figure


def compare_statistically(metrics_per_case: pd.DataFrame,
                          statistics: dict[str, Any]) -> tuple[pd.DataFrame, str, Any]:
    """Paired tests of every two models on the same cases
    (:func:`pancreas_seg.evaluation.statistics.paired_comparisons`): the table, its markdown and a
    forest plot of the first comparison, all three also logged to the active MLflow run."""
    from pancreas_seg.evaluation.plots import plot_paired_comparison  # noqa: PLC0415 - matplotlib
    from pancreas_seg.evaluation.statistics import paired_comparisons  # noqa: PLC0415

    table, markdown = paired_comparisons(metrics_per_case, statistics)
    figure = plot_paired_comparison(table, statistics)
    tracking.log_paired_comparison(table, markdown, figure)
    logger.info("Paired comparison:\n%s", markdown)
    return table, markdown, figure


def plot_test_overlays(case_manifest: pd.DataFrame, evaluation: dict[str, Any], *inputs: Any) -> Any:
    """Overlays of CT (HU window), ground truth and every model on representative test slices.

    Inputs after the parameters: each architecture's evaluation summary, then its test predictions.
    """
    from pancreas_seg.evaluation.plots import pick_representative_slices, plot_overlays  # noqa: PLC0415

    n = len(inputs) // 2
    summaries, predictions = inputs[:n], inputs[n:]
    manifest = case_manifest.set_index("case_id")
    case_id = _most_informative_test_case(case_manifest)
    ct = load_nifti(manifest.loc[case_id, "image_path"], dtype=np.float32)
    truth = load_nifti(manifest.loc[case_id, "label_path"])
    ct_slices = axial_view(ct.array, ct.affine)
    truth_slices = axial_view(truth.array, ct.affine)
    chosen = pick_representative_slices(np.moveaxis(truth_slices, 0, -1), int(evaluation["overlay_slices"]))
    model_slices = {summary["architecture"]: axial_view(pred[case_id]().array, ct.affine)[chosen]
                    for summary, pred in zip(summaries, predictions, strict=True)}
    figure = plot_overlays(ct_slices[chosen], truth_slices[chosen], model_slices,
                           tuple(evaluation["overlay_window_hu"]),
                           [f"{case_id} (held-out test) slice {z}" for z in chosen])
    for summary in summaries:
        tracking.log_figure(summary["mlflow_run_id"], figure, "plots/test_overlays.png")
    return figure


def _most_informative_test_case(case_manifest: pd.DataFrame) -> str:
    """The test case with a tumour and the most pancreas voxels (else the most pancreas voxels)."""
    test = case_manifest[case_manifest["split"] == "test"].copy()
    test["has_tumour"] = test["voxels_tumour"] > 0
    return str(test.sort_values(["has_tumour", "voxels_pancreas"], ascending=False)["case_id"].iloc[0])
