"""Cascade wiring (namespace ``cascade``).

Training: cut crops around the true pancreas of the training and validation cases, measure where
stage 1 (the model trained in namespace :data:`~pancreas_seg.models.names.CASCADE_STAGE1`) puts
its box on the validation cases, train stage 2, validate it. Evaluation: the evaluation pipeline's
binding check, scoring and summary around a prediction node that runs both stages. Results are
published under the same plain names as the other models' (``model_cascade``,
``evaluation_summary_cascade`` ...).
"""

from kedro.pipeline import Node, Pipeline

from pancreas_seg.models.names import CASCADE_NAME, CASCADE_STAGE1
from pancreas_seg.pipelines import MODEL_TRAINING_TAG
from pancreas_seg.pipelines.cascade import nodes
from pancreas_seg.pipelines.evaluation import pipeline as evaluation_pipeline

SHARED_INPUTS = {"model_input_slices", "slice_geometry", "case_manifest", "intensity_stats"}
SHARED_PARAMETERS = {"params:preprocessing", "params:training", "params:evaluation"}
EVALUATION_INPUTS = {"slice_geometry", "case_manifest", "intensity_stats"}
EVALUATION_PARAMETERS = {"params:preprocessing", "params:evaluation"}
PUBLISHED_OUTPUTS = ("model", "model_card", "validation_metrics")
MODEL_INPUTS = ("model", "model_card")   # what evaluation reads of the published outputs
PUBLISHED_EVALUATION_OUTPUTS = ("test_predictions", "metrics_per_case", "evaluation_summary")


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
              "intensity_stats", "params:preprocessing", "params:training", "params:crop", "params:stage2"],
             "validation_metrics", name="validate_stage2"),
    ])


def evaluation_template() -> Pipeline:
    """The evaluation pipeline's template with a prediction node that runs both stages."""
    return evaluation_pipeline.template(
        Node(nodes.predict_test_cases_cascade,
             ["model", "stage1_model", "model_check", "case_manifest", "model_card", "params:evaluation"],
             "test_predictions", name="predict_test_cases"))


def create_training_pipeline(stage1: str = CASCADE_STAGE1) -> Pipeline:
    """Train the cascade's stage 2 on top of the model trained in namespace ``stage1``."""
    inputs = {name: name for name in SHARED_INPUTS} | {"stage1_trained_model": f"model_{stage1}",
                                                        "stage1_trained_model_card": f"model_card_{stage1}"}
    return Pipeline(training_template(), namespace=CASCADE_NAME, inputs=inputs, parameters=SHARED_PARAMETERS,
                    outputs={name: f"{name}_{CASCADE_NAME}" for name in PUBLISHED_OUTPUTS})


def create_evaluation_pipeline() -> Pipeline:
    """Predict (both stages) and score the held-out test cases with the newest cascade."""
    inputs = {name: name for name in EVALUATION_INPUTS} | {name: f"{name}_{CASCADE_NAME}" for name in MODEL_INPUTS}
    return Pipeline(evaluation_template(), namespace=CASCADE_NAME, inputs=inputs, parameters=EVALUATION_PARAMETERS,
                    outputs={name: f"{name}_{CASCADE_NAME}" for name in PUBLISHED_EVALUATION_OUTPUTS})
