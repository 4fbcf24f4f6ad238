"""Evaluation nodes: predict the held-out test split, score it in 3D, compare and plot.

Thin wrappers around :mod:`pancreas_seg.prediction` and :mod:`pancreas_seg.evaluation`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pandas as pd

from pancreas_seg import tracking
from pancreas_seg.evaluation.metrics import case_metrics, slice_dice, summarise
from pancreas_seg.evaluation.plots import (
    pick_representative_slices,
    plot_dice_boxplots,
    plot_overlays,
)
from pancreas_seg.evaluation.postprocessing import keep_largest_foreground
from pancreas_seg.imaging.geometry import ScanGeometry, axial_axis
from pancreas_seg.imaging.nifti_io import NiftiVolume, load_nifti
from pancreas_seg.imaging.preprocess import (
    PreprocessingConfig,
    axial_view,
)
from pancreas_seg.prediction import labels_from_probabilities, predict_slices, use_xla

logger = logging.getLogger(__name__)
METRIC_COLUMNS = ["case_id", "architecture", "class", "dice", "hd95_mm", "nsd", "slice_dice",
                  "dice_lcc", "hd95_mm_lcc", "nsd_lcc"]


def test_case_ids(case_manifest: pd.DataFrame) -> list[str]:
    return sorted(case_manifest.loc[case_manifest["split"] == "test", "case_id"])


def predict_test_cases(model: Any, model_input_slices: Mapping[str, Callable[[], np.ndarray]],
                       slice_geometry: dict[str, Any], case_manifest: pd.DataFrame,
                       model_card: dict[str, Any], evaluation: dict[str, Any]) -> dict[str, Callable[[], NiftiVolume]]:
    """Lazily predict every test case and map it back to the original file's grid and affine.

    Returns ``{case_id: fn}``; Kedro calls each ``fn`` when it saves that partition, so only one
    case is in memory at a time. Saved predictions are not post-processed.
    """
    config = PreprocessingConfig.from_params(model_card["preprocessing"])
    cases = test_case_ids(case_manifest)
    if not cases:
        raise ValueError("the manifest has no test split; set split.test_fraction > 0")
    use_xla(model, bool(evaluation.get("xla", True)))

    def predict(index: int, case_id: str) -> NiftiVolume:
        logger.info("[%s] predicting test case %d/%d: %s", model_card["architecture"], index, len(cases), case_id)
        geometry = ScanGeometry.from_dict(slice_geometry[case_id])
        probabilities = predict_slices(model, model_input_slices[f"{case_id}/image"](), config.context_slices,
                                       int(evaluation["batch_size"]), bool(evaluation["flip_tta"]))
        labels = labels_from_probabilities(probabilities, geometry, config.label_mode)
        return NiftiVolume(labels, geometry.affine)

    return {case_id: functools.partial(predict, i, case_id) for i, case_id in enumerate(cases, start=1)}


def score_test_cases(test_predictions: Mapping[str, Callable[[], NiftiVolume]], case_manifest: pd.DataFrame,
                     model_card: dict[str, Any], evaluation: dict[str, Any]) -> pd.DataFrame:
    """Per case and class: Dice, HD95 (mm), NSD and slice Dice, without and with largest-component."""
    name = model_card["architecture"]
    manifest = case_manifest.set_index("case_id")
    rows = []
    cases = test_case_ids(case_manifest)
    for index, case_id in enumerate(cases, start=1):
        logger.info("[%s] scoring test case %d/%d: %s", name, index, len(cases), case_id)
        prediction = test_predictions[case_id]()
        truth = load_nifti(manifest.loc[case_id, "label_path"])
        if prediction.array.shape != truth.array.shape or not np.allclose(prediction.affine, truth.affine, atol=1e-3):
            raise ValueError(f"prediction for {case_id} is not on the label's grid "
                             f"({prediction.array.shape} vs {truth.array.shape})")
        spacing = truth.spacing_mm
        axial = axial_axis(truth.affine)  # the file's own axial axis: not always array axis 2
        tolerance = float(evaluation["nsd_tolerance_mm"])
        raw = case_metrics(prediction.array, truth.array, spacing, tolerance)
        lcc = case_metrics(keep_largest_foreground(prediction.array), truth.array, spacing, tolerance)
        for plain, post in zip(raw, lcc, strict=True):
            rows.append({"case_id": case_id, "architecture": name, "class": plain["class"],
                         "dice": plain["dice"], "hd95_mm": plain["hd95_mm"], "nsd": plain["nsd"],
                         "slice_dice": slice_dice(prediction.array, truth.array, plain["class"], axis=axial),
                         "dice_lcc": post["dice"], "hd95_mm_lcc": post["hd95_mm"], "nsd_lcc": post["nsd"]})
    return pd.DataFrame(rows, columns=METRIC_COLUMNS)


def build_summary(metrics_per_case: pd.DataFrame, model_card: dict[str, Any]) -> dict[str, Any]:
    """Mean/median/std per class and metric (NaN excluded, inf counted separately)."""
    summary: dict[str, Any] = {"architecture": model_card["architecture"],
                               "mlflow_run_id": model_card["mlflow_run_id"],
                               "n_cases": int(metrics_per_case["case_id"].nunique()),
                               "data_source": model_card["data_source"], "classes": {}}
    for class_name, frame in metrics_per_case.groupby("class"):
        summary["classes"][class_name] = {m: summarise(frame[m].to_numpy(dtype=float))
                                          for m in METRIC_COLUMNS[3:]}
    return summary


def summarise_model(metrics_per_case: pd.DataFrame, model_card: dict[str, Any]) -> dict[str, Any]:
    """Build the model's summary and log it (and test metrics) to the model's MLflow run."""
    summary = build_summary(metrics_per_case, model_card)
    flat = {f"test_{metric}_{class_name}_{stat}": stats[stat]
            for class_name, metrics in summary["classes"].items()
            for metric, stats in metrics.items() for stat in ("mean", "median")}
    run_id = model_card["mlflow_run_id"]
    tracking.log_final_metrics(run_id, flat)
    tracking.log_json(run_id, summary, "evaluation/summary.json")
    tracking.log_json(run_id, metrics_per_case.to_dict(orient="records"), "evaluation/metrics_per_case.json")
    pancreas = summary["classes"].get("pancreas", {}).get("dice", {})
    logger.info("[%s] test pancreas Dice: mean %.4f, median %.4f (n=%s)", model_card["architecture"],
                pancreas.get("mean", float("nan")), pancreas.get("median", float("nan")), pancreas.get("n"))
    return summary


def comparison_table(summaries: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per architecture × class with mean ± std of each metric."""
    rows = []
    for summary in summaries:
        for class_name, metrics in summary["classes"].items():
            row = {"architecture": summary["architecture"], "class": class_name, "n_cases": summary["n_cases"]}
            for metric, stats in metrics.items():
                row[f"{metric}_mean"] = stats["mean"]
                row[f"{metric}_std"] = stats["std"]
                if metric.startswith("hd95"):
                    row[f"{metric}_n_inf"] = stats["n_inf"]
            rows.append(row)
    return pd.DataFrame(rows).sort_values(["class", "dice_mean"], ascending=[True, False])


def markdown_table(table: pd.DataFrame) -> str:
    """A GitHub-markdown version of the comparison table (mean ± std)."""
    header = "| architecture | class | n | Dice | HD95 (mm) | NSD | slice Dice | Dice (LCC) |\n|---|---|---|---|---|---|---|---|\n"

    def fmt(row: pd.Series, metric: str) -> str:
        mean, std = row[f"{metric}_mean"], row[f"{metric}_std"]
        return "n/a" if pd.isna(mean) else f"{mean:.3f} ± {0 if pd.isna(std) else std:.3f}"

    lines = [f"| {r['architecture']} | {r['class']} | {r['n_cases']} | {fmt(r, 'dice')} | {fmt(r, 'hd95_mm')} "
             f"| {fmt(r, 'nsd')} | {fmt(r, 'slice_dice')} | {fmt(r, 'dice_lcc')} |" for _, r in table.iterrows()]
    return header + "\n".join(lines) + "\n"


def compare_architectures(*inputs: Any) -> tuple[pd.DataFrame, pd.DataFrame, str, Any]:
    """Inputs: each architecture's metrics frame, then each one's summary (same order).

    Returns the combined per-case CSV, the comparison table (CSV and markdown) and Dice box plots,
    which are also logged to every architecture's run.
    """
    n = len(inputs) // 2
    frames, summaries = list(inputs[:n]), list(inputs[n:])
    metrics = pd.concat(frames, ignore_index=True)[METRIC_COLUMNS]
    table = comparison_table(summaries)
    markdown = markdown_table(table)
    figure = plot_dice_boxplots(metrics)
    for summary in summaries:
        tracking.log_figure(summary["mlflow_run_id"], figure, "plots/dice_boxplots.png")
        tracking.log_text(summary["mlflow_run_id"], markdown, "evaluation/comparison.md")
    logger.info("Held-out test comparison:\n%s", markdown)
    return metrics, table, markdown, figure


def plot_test_overlays(case_manifest: pd.DataFrame, evaluation: dict[str, Any], *inputs: Any) -> Any:
    """Overlays of CT (HU window), ground truth and every model on representative test slices.

    Inputs after the parameters: each architecture's model card, then its test predictions.
    """
    n = len(inputs) // 2
    cards, predictions = inputs[:n], inputs[n:]
    manifest = case_manifest.set_index("case_id")
    case_id = _most_informative_test_case(case_manifest)
    ct = load_nifti(manifest.loc[case_id, "image_path"], dtype=np.float32)
    truth = load_nifti(manifest.loc[case_id, "label_path"])
    ct_slices = axial_view(ct.array, ct.affine)
    truth_slices = axial_view(truth.array, ct.affine)
    chosen = pick_representative_slices(np.moveaxis(truth_slices, 0, -1), int(evaluation["overlay_slices"]))
    model_slices = {card["architecture"]: axial_view(pred[case_id]().array, ct.affine)[chosen]
                    for card, pred in zip(cards, predictions, strict=True)}
    figure = plot_overlays(ct_slices[chosen], truth_slices[chosen], model_slices,
                           tuple(evaluation["overlay_window_hu"]),
                           [f"{case_id} (held-out test) slice {z}" for z in chosen])
    for card in cards:
        tracking.log_figure(card["mlflow_run_id"], figure, "plots/test_overlays.png")
    return figure


def _most_informative_test_case(case_manifest: pd.DataFrame) -> str:
    """The test case with a tumour and the most pancreas voxels (else the most pancreas voxels)."""
    test = case_manifest[case_manifest["split"] == "test"].copy()
    test["has_tumour"] = test["voxels_tumour"] > 0
    return str(test.sort_values(["has_tumour", "voxels_pancreas"], ascending=False)["case_id"].iloc[0])
