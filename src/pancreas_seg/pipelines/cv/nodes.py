"""Cross-validation nodes: one model per fold, out-of-fold scores, fold ensembles, comparison, selection.

Thin wrappers: training is :func:`pancreas_seg.tracking.training_run.train_model` on a fold
manifest (:func:`pancreas_seg.task07.splits.fold_manifest`), prediction is the one
:class:`~pancreas_seg.inference.predictor.Predictor` (a fold ensemble averages softmax outputs),
and scoring is :func:`pancreas_seg.evaluation.scoring.score_cases`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pandas as pd

from pancreas_seg import tracking
from pancreas_seg.evaluation.scoring import (
    LESION_CLASS,
    build_summary,
    detection_values,
    flat_test_metrics,
    score_cases,
    score_out_of_fold_cases,
)
from pancreas_seg.evaluation.selection import SelectionRule, check_selection_cases, rank_models, scored_case_ids
from pancreas_seg.evaluation.statistics import bootstrap_mean_ci
from pancreas_seg.imaging.geometry import ScanGeometry
from pancreas_seg.imaging.nifti_io import CasePrediction, NiftiVolume
from pancreas_seg.inference.forward import mean_probabilities
from pancreas_seg.inference.model_card import ModelCard, ModelMismatchError, check_fold_ensemble
from pancreas_seg.inference.model_store import ENSEMBLE_SUFFIX
from pancreas_seg.inference.predictor import PredictionSettings, Predictor
from pancreas_seg.inference.serving import MODEL_NAME, log_ensemble_objects, log_model_objects
from pancreas_seg.task07.splits import (
    development_case_ids,
    fold_manifest,
    manifest_dataset,
    manifest_folds,
    test_case_ids,
)
from pancreas_seg.tracking.selection import selection_tags
from pancreas_seg.tracking.training_run import train_model

logger = logging.getLogger(__name__)

FOLD_KEY = "fold{}"
"""Partition names of the fold models and cards (``fold0``, ``fold1`` ...)."""


def _loaded(value: Any) -> Any:
    """A partition's value: PartitionedDataset loads give callables, a node's own output the value."""
    return value() if callable(value) and not hasattr(value, "predict_on_batch") else value


def _fold_items(partitions: Mapping[str, Any]) -> list[tuple[int, Any]]:
    """``[(fold, loaded value)]`` sorted by fold from ``{"fold0": ..., "fold1": ...}``."""
    return sorted((int(key.removeprefix("fold")), _loaded(value)) for key, value in partitions.items())


# --------------------------------------------------------------------------- training
def train_fold_models(model_input_slices: Mapping[str, Callable[[], np.ndarray]], case_manifest: pd.DataFrame,
                      intensity_stats: dict[str, Any], preprocessing: dict[str, Any], training: dict[str, Any],
                      architecture: dict[str, Any], inference: dict[str, Any]) -> tuple[dict[str, Any], dict[str, ModelCard]]:
    """Train one model per fold of the persisted split, each validated on its own fold.

    All folds run under one MLflow run ``<architecture>.cv`` with a nested run per fold
    (``unet.fold0`` ...), each resumable from its own checkpoint folder. Each fold model is logged
    as a pyfunc model to its fold's run, and the fold ensemble to the cv run (ready for the registry),
    both applying the ``inference`` prediction settings by default.

    Returns ``({"fold<k>": fn -> model}, {"fold<k>": model card})``; every card records ``fold``,
    ``n_folds`` and ``cv_run_id``.
    """
    name = architecture["name"]
    n_folds = manifest_folds(case_manifest)
    settings = PredictionSettings.from_params(inference)
    models, cards = {}, {}
    with tracking.architecture_run(f"{name}.cv") as cv_run:
        tracking.set_tags({"architecture": name, "n_folds": n_folds, "kind": "cross_validation"})
        for fold in range(n_folds):
            logger.info("%s: cross-validation fold %d/%d", name, fold + 1, n_folds)
            model, _, figure, card = train_model(model_input_slices, fold_manifest(case_manifest, fold),
                                                 intensity_stats, preprocessing, training,
                                                 {**architecture, "fold": fold, "n_folds": n_folds})
            _close(figure)
            card = card.replace(cv_run_id=cv_run.info.run_id)
            tracking.log_json(card.mlflow_run_id, card.to_dict(), "model_card.json")
            log_model_objects(card.mlflow_run_id, f"{name}.fold{fold}", model, card, settings,
                              serving=inference.get("serving"))
            models[FOLD_KEY.format(fold)], cards[FOLD_KEY.format(fold)] = model, card
        log_ensemble_objects(cv_run.info.run_id, f"{name}{ENSEMBLE_SUFFIX}", models, cards, settings,
                             serving=inference.get("serving"))
    # PartitionedDataset calls callable partitions to get their data, and a Keras model is callable
    return {key: functools.partial(_identity, model) for key, model in models.items()}, cards


def _identity(value: Any) -> Any:
    return value


def _close(figure: Any) -> None:
    import matplotlib.pyplot as plt  # noqa: PLC0415

    plt.close(figure)


# --------------------------------------------------------------------------- checks
def check_fold_models(models: list[tuple[int, Any]], cards: list[tuple[int, ModelCard]],
                      case_manifest: pd.DataFrame, preprocessing: dict[str, Any] | None = None,
                      intensity_stats: dict[str, Any] | None = None) -> None:
    """Refuse fold models that are not this split's cross-validation of one architecture.

    Checks the cards form one ensemble, belong to this dataset and preprocessing, and that fold k
    was validated on exactly the manifest's fold-k cases and trained on none of them. Each model
    is checked against its card (weights hash) when its :class:`Predictor` is built.
    """
    card_list = [card for _, card in cards]
    check_fold_ensemble(card_list)
    if [k for k, _ in models] != [k for k, _ in cards]:
        raise ModelMismatchError(f"fold models {[k for k, _ in models]} and cards {[k for k, _ in cards]} differ")
    n_folds = manifest_folds(case_manifest)
    if len(card_list) != n_folds:
        raise ModelMismatchError(f"{card_list[0].describe()}: {len(card_list)} fold models for a split with "
                                 f"{n_folds} folds; rerun the cv pipeline")
    dataset = manifest_dataset(case_manifest)
    for fold, card in cards:
        card.check_dataset(dataset)
        if preprocessing is not None:
            card.check_preprocessing(preprocessing, intensity_stats)
        in_fold = set(case_manifest.loc[case_manifest["fold"] == fold, "case_id"].astype(str))
        if set(card.cases.validation) != in_fold or in_fold & set(card.cases.train):
            raise ModelMismatchError(f"{card.describe()} (fold {fold}) was not validated on exactly the "
                                     f"split's fold-{fold} cases: the folds changed since it was trained. "
                                     "Rerun the cv pipeline.")


# --------------------------------------------------------------------------- out of fold
def predict_out_of_fold(fold_models: Mapping[str, Any], fold_cards: Mapping[str, Any],
                        model_input_slices: Mapping[str, Callable[[], np.ndarray]], slice_geometry: dict[str, Any],
                        case_manifest: pd.DataFrame, intensity_stats: dict[str, Any], preprocessing: dict[str, Any],
                        evaluation: dict[str, Any]) -> dict[str, Callable[[], CasePrediction]]:
    """Predict every development case with the model of the fold that held it out (lazily, per case).

    Returns ``{case_id: fn}`` on each case's original grid (saved one case at a time): the labels
    and, for a model with a tumour output, the tumour probability map out-of-fold detection is
    scored on.
    """
    models, cards = _fold_items(fold_models), _fold_items(fold_cards)
    check_fold_models(models, cards, case_manifest, preprocessing, intensity_stats)
    settings = PredictionSettings.from_params(evaluation)
    fold_of = dict(zip(case_manifest["case_id"].astype(str), case_manifest["fold"].astype(int), strict=True))
    by_fold = {fold: Predictor.from_models([model], [card], settings)
               for (fold, model), (_, card) in zip(models, cards, strict=True)}
    cases = development_case_ids(case_manifest)
    name = cards[0][1].architecture

    def predict(index: int, case_id: str) -> CasePrediction:
        fold = fold_of[case_id]
        logger.info("%s: out-of-fold prediction %d/%d: %s (fold %d)", name, index, len(cases), case_id, fold)
        geometry = ScanGeometry.from_dict(slice_geometry[case_id])
        predictor = by_fold[fold]
        prediction = predictor.to_prediction(predictor.predict_probabilities(model_input_slices[f"{case_id}/image"]()),
                                             geometry, with_probability=predictor.has_tumour_output)
        return CasePrediction(NiftiVolume(prediction.labels, geometry.affine), prediction.tumour_probability)

    return {case_id: functools.partial(predict, i, case_id) for i, case_id in enumerate(cases, start=1)}


def score_out_of_fold(oof_predictions: Mapping[str, Callable[[], NiftiVolume]], case_manifest: pd.DataFrame,
                      slice_geometry: dict[str, Any], fold_cards: Mapping[str, Any],
                      evaluation: dict[str, Any]) -> pd.DataFrame:
    """Score the out-of-fold predictions: the evaluation's per-case columns plus ``fold``."""
    cards = _fold_items(fold_cards)
    name = cards[0][1].architecture
    cases = development_case_ids(case_manifest)
    return score_out_of_fold_cases(oof_predictions, cases, case_manifest, slice_geometry, name,
                                   float(evaluation["nsd_tolerance_mm"]))


# --------------------------------------------------------------------------- test: folds and ensemble
def evaluate_fold_ensemble(fold_models: Mapping[str, Any], fold_cards: Mapping[str, Any],
                           model_input_slices: Mapping[str, Callable[[], np.ndarray]], slice_geometry: dict[str, Any],
                           case_manifest: pd.DataFrame, intensity_stats: dict[str, Any],
                           preprocessing: dict[str, Any], evaluation: dict[str, Any],
                           cv: dict[str, Any]) -> tuple[dict[str, Callable[[], NiftiVolume]], pd.DataFrame]:
    """Score every fold model and the fold ensemble (mean softmax) on the held-out test cases.

    Each test case is predicted once per fold; the fold models' labels and the ensemble's are
    scored from those probabilities (``cv.ensemble_flip_tta`` adds mirrored test-time
    augmentation to all of them). The ``architecture`` column says ``<arch>.fold<k>`` or
    ``<arch>.ensemble``. Returns the ensemble's test predictions (lazy, recomputed per case when
    saved) and the per-case metrics.
    """
    models, cards = _fold_items(fold_models), _fold_items(fold_cards)
    check_fold_models(models, cards, case_manifest, preprocessing, intensity_stats)
    cases = test_case_ids(case_manifest)
    if not cases:
        raise ValueError("the manifest has no test split; set split.test_fraction > 0")
    name = cards[0][1].architecture
    ensemble_name = f"{name}{ENSEMBLE_SUFFIX}"
    ensemble = Predictor.from_models([model for _, model in models], [card for _, card in cards],
                                     PredictionSettings.from_params(evaluation, flip_tta=cv["ensemble_flip_tta"]),
                                     name=ensemble_name)
    ensemble.check_disjoint(cases, "scores as test cases")
    tolerance = float(evaluation["nsd_tolerance_mm"])

    def fold_probabilities(case_id: str) -> list[np.ndarray]:
        return list(ensemble.member_probabilities(model_input_slices[f"{case_id}/image"]()))

    def volume(probabilities: np.ndarray, case_id: str) -> CasePrediction:
        geometry = ScanGeometry.from_dict(slice_geometry[case_id])
        prediction = ensemble.to_prediction(probabilities, geometry, with_probability=ensemble.has_tumour_output)
        return CasePrediction(NiftiVolume(prediction.labels, geometry.affine), prediction.tumour_probability)

    frames = []
    for index, case_id in enumerate(cases, start=1):
        logger.info("%s: test case %d/%d: %s (%d fold models and their ensemble)", ensemble_name, index,
                    len(cases), case_id, len(models))
        per_fold = fold_probabilities(case_id)
        scored = {f"{name}.fold{fold}": p for (fold, _), p in zip(models, per_fold, strict=True)}
        scored[ensemble_name] = mean_probabilities(per_fold)
        for model_name, probabilities in scored.items():   # one file-grid prediction in memory at a time
            frames.append(score_cases({case_id: functools.partial(volume, probabilities, case_id)}, [case_id],
                                      case_manifest, slice_geometry, model_name, tolerance))

    def predict_ensemble(case_id: str) -> NiftiVolume:
        geometry = ScanGeometry.from_dict(slice_geometry[case_id])
        return NiftiVolume(ensemble.segment_slices(model_input_slices[f"{case_id}/image"](), geometry),
                           geometry.affine)

    predictions = {case_id: functools.partial(predict_ensemble, case_id) for case_id in cases}
    return predictions, pd.concat(frames, ignore_index=True)


# --------------------------------------------------------------------------- summaries
CV_CLASSES = ("pancreas", "tumour")


def summarise_cross_validation(oof_metrics: pd.DataFrame, test_metrics: pd.DataFrame,
                               fold_cards: Mapping[str, Any]) -> dict[str, Any]:
    """One architecture's cross-validation: out-of-fold, per-fold and test (folds vs ensemble) Dice.

    ``cv`` is :func:`build_summary` of the out-of-fold cases; ``folds`` the out-of-fold mean Dice
    of each fold; ``test`` the test summary of every fold model and of the ensemble, and
    ``ensemble_vs_folds`` per class: the ensemble's test Dice, the mean of the fold models' test
    Dice and whether the ensemble is at least that mean. Logged to the ``<arch>.cv`` MLflow run.
    """
    cards = [card for _, card in _fold_items(fold_cards)]
    first = cards[0]
    name, run_id = first.architecture, first.cv_run_id
    summary: dict[str, Any] = {"architecture": name, "n_folds": len(cards), "mlflow_run_id": run_id,
                               "cv": build_summary(oof_metrics, name, run_id, first.data_source), "folds": {}, "test": {},
                               "ensemble_vs_folds": {}}
    for fold, frame in oof_metrics.groupby("fold"):
        summary["folds"][f"fold{fold}"] = {c: float(frame.loc[frame["class"] == c, "dice"].mean())
                                           for c in CV_CLASSES}
    for model_name, frame in test_metrics.groupby("architecture"):
        summary["test"][model_name] = build_summary(frame, model_name, run_id, first.data_source)
    ensemble_name = f"{name}{ENSEMBLE_SUFFIX}"
    for class_name in CV_CLASSES:
        fold_means = [summary["test"][f"{name}.fold{c.fold}"]["classes"][class_name]["dice"]["mean"] for c in cards]
        ensemble = summary["test"][ensemble_name]["classes"][class_name]["dice"]["mean"]
        fold_mean = float(np.nanmean(fold_means)) if np.isfinite(fold_means).any() else float("nan")
        summary["ensemble_vs_folds"][class_name] = {
            "ensemble_dice": ensemble, "fold_mean_dice": fold_mean, "fold_dice": fold_means,
            "ensemble_at_least_fold_mean": bool(ensemble >= fold_mean) if np.isfinite([ensemble, fold_mean]).all() else None}
    metrics = {f"cv_{k.removeprefix('test_')}": v for k, v in flat_test_metrics(summary["cv"]).items()}
    metrics |= {f"test_ensemble_dice_{c}_mean": v["ensemble_dice"] for c, v in summary["ensemble_vs_folds"].items()}
    metrics |= {f"test_fold_mean_dice_{c}_mean": v["fold_mean_dice"] for c, v in summary["ensemble_vs_folds"].items()}
    tracking.log_final_metrics(run_id, metrics)
    tracking.log_json(run_id, summary, "cv/summary.json")
    pancreas = summary["ensemble_vs_folds"]["pancreas"]
    logger.info("%s: cross-validation: out-of-fold pancreas Dice %.4f over %d cases; test pancreas Dice: "
                "ensemble %.4f, fold models %s (mean %.4f)", name,
                summary["cv"]["classes"]["pancreas"]["dice"]["mean"], summary["cv"]["n_cases"],
                pancreas["ensemble_dice"], ", ".join(f"{d:.4f}" for d in pancreas["fold_dice"]),
                pancreas["fold_mean_dice"])
    return summary


def compare_cross_validation(cv_metrics_per_case: pd.DataFrame, statistics: dict[str, Any],
                             *summaries: dict[str, Any]) -> tuple[pd.DataFrame, str]:
    """One row per architecture and class: out-of-fold Dice (mean ± std, n, and the percentile
    bootstrap CI of the mean over the out-of-fold cases with ``statistics``' settings, NaN cases
    left out), per-fold Dice, test Dice of the fold models' mean and of the ensemble. Returns the
    table and its markdown."""
    rows = []
    for summary in summaries:
        for class_name in CV_CLASSES:
            cv_dice = summary["cv"]["classes"][class_name]["dice"]
            versus = summary["ensemble_vs_folds"][class_name]
            cases = cv_metrics_per_case[(cv_metrics_per_case["architecture"] == summary["architecture"])
                                        & (cv_metrics_per_case["class"] == class_name)]["dice"].to_numpy(float)
            ci_low, ci_high = bootstrap_mean_ci(cases[np.isfinite(cases)], int(statistics["n_bootstrap"]),
                                                float(statistics["confidence"]), int(statistics["seed"]))
            rows.append({
                "architecture": summary["architecture"], "class": class_name, "n_folds": summary["n_folds"],
                "cv_n_cases": cv_dice["n"], "cv_dice_mean": cv_dice["mean"], "cv_dice_std": cv_dice["std"],
                "cv_dice_ci_low": ci_low, "cv_dice_ci_high": ci_high,
                **{f"{fold}_dice": values[class_name] for fold, values in summary["folds"].items()},
                "test_fold_mean_dice": versus["fold_mean_dice"], "test_ensemble_dice": versus["ensemble_dice"],
                "ensemble_at_least_fold_mean": versus["ensemble_at_least_fold_mean"],
                "mlflow_run_id": summary["mlflow_run_id"],
                **{f"cv_{key}": value if class_name == LESION_CLASS else np.nan
                   for key, value in detection_values(summary["cv"].get("detection", {}).get(LESION_CLASS, {})).items()}})
    table = pd.DataFrame(rows).sort_values(["class", "cv_dice_mean"], ascending=[True, False])
    confidence = float(statistics["confidence"])
    lines = [f"| architecture | class | out-of-fold Dice ± std (n) | {confidence:.0%} CI of the mean | per-fold Dice "
             "| test Dice, fold models' mean | test Dice, fold ensemble |", "|---|---|---|---|---|---|---|"]

    def number(value: float) -> str:
        return "n/a" if pd.isna(value) else f"{value:.3f}"

    for _, row in table.iterrows():
        folds = ", ".join(number(row[c]) for c in table.columns if c.startswith("fold") and c.endswith("_dice")
                          and not pd.isna(row[c]))
        lines.append(f"| {row['architecture']} | {row['class']} | {number(row['cv_dice_mean'])} ± "
                     f"{number(row['cv_dice_std'])} (n={int(row['cv_n_cases'])}) "
                     f"| [{number(row['cv_dice_ci_low'])}, {number(row['cv_dice_ci_high'])}] | {folds} "
                     f"| {number(row['test_fold_mean_dice'])} | {number(row['test_ensemble_dice'])} |")
    markdown = "\n".join(lines) + (
        "\n\nOut-of-fold Dice: every non-test case scored once, by the fold model that did not see it; "
        f"CI: percentile bootstrap of the mean over those cases ({int(statistics['n_bootstrap'])} resamples). "
        "Test Dice: the held-out test cases, scored by each fold model (their mean) and by the fold "
        "ensemble (softmax averaged).\n")
    detection = table[table["class"] == LESION_CLASS]
    if detection["cv_n_patients_with_tumour"].notna().any():
        def with_ci(row: pd.Series, name: str) -> str:
            return (f"{number(row[f'cv_{name}'])} [{number(row[f'cv_{name}_ci_low'])}, "
                    f"{number(row[f'cv_{name}_ci_high'])}]")

        lines = ["| architecture | out-of-fold cases (with tumour) | AUROC [95% CI] | AP [95% CI] | FROC CPM "
                 "| sensitivity at 1 FP/case |", "|---|---|---|---|---|---|"]
        lines += [f"| {row['architecture']} | {int(row['cv_n_cases'])} ("
                  f"{'n/a' if pd.isna(row['cv_n_patients_with_tumour']) else int(row['cv_n_patients_with_tumour'])}) "
                  f"| {with_ci(row, 'auroc')} | {with_ci(row, 'ap')} | {number(row['cv_froc_cpm'])} "
                  f"| {number(row['cv_froc_sensitivity_at_1_fp'])} |" for _, row in detection.iterrows()]
        markdown += ("\n### Tumour detection, out of fold\n\n" + "\n".join(lines) + "\n\nPatient score: the maximum "
                     "tumour probability of the scan; AUROC and AP of it against a tumour in the truth, with a "
                     "95 % percentile bootstrap CI over the out-of-fold cases; FROC: lesion hits at IoU >= 0.1, "
                     "CPM = mean sensitivity at 1/8 ... 8 false positives per case (docs/detection.md).\n")
    logger.info("Cross-validation comparison:\n%s", markdown)
    return table, markdown


def plot_cross_validation_froc(*summaries: dict[str, Any]) -> Any:
    """The out-of-fold tumour FROC of every architecture on one plot
    (:func:`~pancreas_seg.evaluation.plots.plot_froc`), also logged to the active MLflow run."""
    from pancreas_seg.evaluation.plots import plot_froc  # noqa: PLC0415 - matplotlib

    figure = plot_froc({s["architecture"]: s["cv"].get("detection", {}).get(LESION_CLASS, {}) for s in summaries},
                       "tumour FROC, out-of-fold cases")
    tracking.log_figure_to_active_run(figure, "cv/froc.png")
    return figure


# --------------------------------------------------------------------------- selection + registry
def select_best_configuration(cv_comparison: pd.DataFrame, cv_metrics_per_case: pd.DataFrame,
                              case_manifest: pd.DataFrame, cv: dict[str, Any]) -> dict[str, Any]:
    """Choose the fold ensemble with the best out-of-fold score and register it as ``champion``.

    The score (:class:`~pancreas_seg.evaluation.selection.SelectionRule`, the rule the registry
    uses after ``train`` too) is the mean over ``selection.classes`` of each architecture's mean
    out-of-fold 3D Dice per case (NaN left out), like nnU-Net's ``find_best_configuration``; every
    architecture must have been scored on the same out-of-fold cases, none of them a test case.
    With ``selection.register`` every candidate's fold ensemble (the pyfunc model of its cv run)
    becomes a version of the registered model ``selection.registered_model`` tagged with its
    architecture, the score's name, value and the case ids
    (:func:`pancreas_seg.tracking.selection.selection_tags`), and the best gets ``selection.alias``.
    """
    selection = cv["selection"]
    rule = SelectionRule.from_params(selection, split="cv")
    cases = scored_case_ids(cv_metrics_per_case)
    check_selection_cases(cases, development_case_ids(case_manifest), test_case_ids(case_manifest))
    scores = rule.scores(cv_metrics_per_case)
    if scores.isna().all():
        raise ValueError(f"no configuration has an out-of-fold {rule.metric} for {list(rule.classes)}")
    ranking = rank_models(scores)   # ties go to the alphabetically first architecture
    best = ranking[0][0]
    run_of = dict(zip(cv_comparison["architecture"], cv_comparison["mlflow_run_id"], strict=False))
    result: dict[str, Any] = {
        "selected": f"{best}{ENSEMBLE_SUFFIX}", "architecture": best, "score": ranking[0][1],
        "score_name": rule.score_name, "criterion": rule.describe(), "cases": cases,
        "ranking": [{"configuration": f"{a}{ENSEMBLE_SUFFIX}", "score": None if np.isnan(s) else s}
                    for a, s in ranking],
        "cv_run_id": run_of[best], "registered_model": None, "version": None, "alias": None}
    logger.info("Best configuration by %s: %s (%.4f); ranking: %s", rule.score_name, result["selected"],
                result["score"], ", ".join(f"{r['configuration']} {r['score']}" for r in result["ranking"]))
    if selection.get("register", True):
        name, alias = str(selection["registered_model"]), str(selection["alias"])
        versions = {a: tracking.register_model(f"runs:/{run_of[a]}/{MODEL_NAME}", name,
                                               {"architecture": a, "configuration": f"{a}{ENSEMBLE_SUFFIX}",
                                                "score": "" if np.isnan(s) else f"{s:.4f}",
                                                **selection_tags(rule, cases, s), "source": "cv"})
                    for a, s in ranking}
        tracking.set_registered_alias(name, alias, versions[best])
        result |= {"registered_model": name, "version": versions[best], "alias": alias,
                   "uri": f"models:/{name}@{alias}"}
        logger.info("Registered %s as %s version %s with alias %s (models:/%s@%s)", result["selected"], name,
                    versions[best], alias, name, alias)
    return result


def compare_statistically(cv_metrics_per_case: pd.DataFrame,
                          statistics: dict[str, Any]) -> tuple[pd.DataFrame, str, Any]:
    """Paired tests of every two architectures on the same out-of-fold cases
    (:func:`pancreas_seg.evaluation.statistics.paired_comparisons`), logged to the active MLflow run."""
    from pancreas_seg.evaluation.plots import plot_paired_comparison  # noqa: PLC0415 - matplotlib
    from pancreas_seg.evaluation.statistics import paired_comparisons  # noqa: PLC0415

    table, markdown = paired_comparisons(cv_metrics_per_case, statistics)
    figure = plot_paired_comparison(table, statistics)
    tracking.log_paired_comparison(table, markdown, figure)
    logger.info("Cross-validation paired comparison:\n%s", markdown)
    return table, markdown, figure


def combine_out_of_fold(*frames: pd.DataFrame) -> pd.DataFrame:
    """Every architecture's out-of-fold per-case metrics in one frame (the paired comparison's input)."""
    return pd.concat(frames, ignore_index=True)
