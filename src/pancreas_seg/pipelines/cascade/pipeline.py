"""Cascade wiring (namespace ``cascade``).

Training: cut crops around the true pancreas of the training and validation cases, measure where
stage 1 (the model trained in namespace :data:`~pancreas_seg.models.names.CASCADE_STAGE1`) puts
its box on the validation cases, train stage 2, validate it on its crops, then score the whole
cascade (both stages, from the CT scans) on the validation cases in 3D, as every model is scored
for the registry. The model and its card are published under the same plain names as the other
models' (``model_cascade``, ``model_card_cascade``, ``training_history_cascade``), so the evaluation pipeline evaluates the
cascade in its namespace like any other model.

Cross-validation (:func:`create_cv_pipeline`, in ``cv`` and ``cv_cascade``): out-of-fold stage-1
boxes from the stage-1 architecture's fold models, stage 2 per fold, out-of-fold and test scores;
the cv pipeline summarises, compares and selects the cascade with the architectures.
"""

from kedro.pipeline import Node, Pipeline

from pancreas_seg.models.names import CASCADE_NAME, CASCADE_STAGE1
from pancreas_seg.pipelines import MODEL_TRAINING_TAG
from pancreas_seg.pipelines.cascade import nodes
from pancreas_seg.tracking.selection import score_validation_cases

SHARED_INPUTS = {"model_input_slices", "slice_geometry", "case_manifest", "intensity_stats"}
SHARED_PARAMETERS = {"params:preprocessing", "params:training", "params:evaluation", "params:inference"}
PUBLISHED_OUTPUTS = ("model", "model_card", "training_history", "validation_metrics", "validation_scores")


def training_template() -> Pipeline:
    return Pipeline([
        Node(nodes.prepare_training_crops,
             ["case_manifest", "intensity_stats", "params:preprocessing", "params:crop"],
             ["crop_slices", "crop_index"], name="prepare_training_crops"),
        Node(nodes.measure_stage1_localisation,
             ["stage1_trained_model", "stage1_trained_model_card", "model_input_slices", "slice_geometry",
              "case_manifest", "intensity_stats", "params:preprocessing", "params:crop", "params:evaluation"],
             "stage1_localisation", name="measure_stage1_localisation"),
        Node(nodes.train_stage2,
             ["crop_slices", "crop_index", "stage1_localisation", "stage1_trained_model",
              "stage1_trained_model_card", "case_manifest", "intensity_stats", "params:preprocessing",
              "params:training", "params:crop", "params:stage2"],
             ["model", "stage1_model", "training_history", "training_curves", "model_card"],
             name="train_stage2", tags=MODEL_TRAINING_TAG),
        Node(nodes.validate_stage2,
             ["model", "crop_slices", "crop_index", "case_manifest", "model_card", "stage1_model",
              "intensity_stats", "params:preprocessing", "params:training", "params:crop", "params:stage2",
              "params:inference"],
             "validation_metrics", name="validate_stage2"),
        # the whole cascade (stage 1 included) on the validation scans, 3D, as the other models
        Node(score_validation_cases,
             ["model", "model_card", "model_input_slices", "slice_geometry", "case_manifest", "params:evaluation",
              "stage1_model"],
             "validation_scores", name="score_validation_cases"),
    ])


def create_pipeline(stage1: str = CASCADE_STAGE1) -> Pipeline:
    """Train the cascade's stage 2 on top of the model trained in namespace ``stage1``."""
    inputs = {name: name for name in SHARED_INPUTS} | {"stage1_trained_model": f"model_{stage1}",
                                                        "stage1_trained_model_card": f"model_card_{stage1}"}
    return Pipeline(training_template(), namespace=CASCADE_NAME, inputs=inputs, parameters=SHARED_PARAMETERS,
                    outputs={name: f"{name}_{CASCADE_NAME}" for name in PUBLISHED_OUTPUTS})


CV_PUBLISHED_OUTPUTS = ("cv_metrics_per_case", "cv_test_metrics", "fold_cards")
"""Published as ``<name>_cascade``, as cv publishes every architecture's: cv summarises, compares
and selects among them (``cv.create_pipeline(external=["cascade"])``)."""


def cv_template() -> Pipeline:
    """The cascade cross-validated, nnU-Net's way: out-of-fold stage-1 boxes, stage 2 per fold on
    their crops, every development case predicted by its own fold's cascade, scored as cv scores."""
    return Pipeline([
        Node(nodes.locate_out_of_fold,
             ["stage1_fold_models", "stage1_fold_cards", "model_input_slices", "slice_geometry", "case_manifest",
              "intensity_stats", "params:preprocessing", "params:crop", "params:evaluation"],
             "stage1_out_of_fold", name="locate_out_of_fold"),
        Node(nodes.prepare_cv_crops,
             ["stage1_out_of_fold", "case_manifest", "intensity_stats", "params:preprocessing", "params:crop",
              "params:stage2"],
             ["cv_crop_slices", "cv_crop_index"], name="prepare_cv_crops"),
        Node(nodes.train_stage2_folds,
             ["stage1_fold_models", "stage1_fold_cards", "cv_crop_slices", "cv_crop_index", "stage1_out_of_fold",
              "case_manifest", "intensity_stats", "params:preprocessing", "params:training", "params:crop",
              "params:stage2", "params:inference"],
             ["fold_models", "fold_cards"], name="train_stage2_folds", tags=MODEL_TRAINING_TAG),
        Node(nodes.predict_cascade_out_of_fold,
             ["fold_models", "fold_cards", "stage1_fold_models", "model_input_slices", "slice_geometry",
              "case_manifest", "params:evaluation"],
             "oof_predictions", name="predict_cascade_out_of_fold"),
        Node(nodes.score_cascade_out_of_fold,
             ["oof_predictions", "case_manifest", "slice_geometry", "params:evaluation"],
             "cv_metrics_per_case", name="score_cascade_out_of_fold"),
        Node(nodes.evaluate_cascade_fold_ensemble,
             ["fold_models", "fold_cards", "stage1_fold_models", "model_input_slices", "slice_geometry",
              "case_manifest", "params:evaluation", "params:cv"],
             ["ensemble_test_predictions", "cv_test_metrics"], name="evaluate_cascade_fold_ensemble"),
    ])


def create_cv_pipeline(stage1: str = CASCADE_STAGE1) -> Pipeline:
    """Cross-validate the cascade on the fold models of namespace ``stage1`` (its cv pipeline's
    ``fold_models_<stage1>`` and ``fold_cards_<stage1>``); publishes ``cv_metrics_per_case_cascade``,
    ``cv_test_metrics_cascade`` and ``fold_cards_cascade``."""
    inputs = {name: name for name in SHARED_INPUTS} | {"stage1_fold_models": f"fold_models_{stage1}",
                                                        "stage1_fold_cards": f"fold_cards_{stage1}"}
    return Pipeline(cv_template(), namespace=CASCADE_NAME, inputs=inputs,
                    parameters=SHARED_PARAMETERS | {"params:cv"},
                    outputs={name: f"{name}_{CASCADE_NAME}" for name in CV_PUBLISHED_OUTPUTS})
