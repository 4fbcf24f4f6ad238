"""Training wiring: the same template pipeline under one namespace per architecture, the
registration of every trained model and the learning curves of all of them.

Each model, its card and its training history are published under plain names (``model_unet``,
``model_card_unet``, ``training_history_unet``): the evaluation pipeline, the cascade's stage 1
and the learning curves read them from other namespaces, and Kedro keeps dotted names for a
node's own namespace. The cascade's own training is the ``cascade`` pipeline;
``pipeline_registry`` puts the two together.
"""

from collections.abc import Iterable

from kedro.pipeline import Node, Pipeline

from pancreas_seg.models.names import ARCHITECTURE_NAMES
from pancreas_seg.pipelines import MODEL_TRAINING_TAG
from pancreas_seg.pipelines.training import nodes
from pancreas_seg.tracking.selection import score_validation_cases
from pancreas_seg.tracking.training_run import train_model

SHARED_INPUTS = {"model_input_slices", "case_manifest", "intensity_stats", "slice_geometry"}
SHARED_PARAMETERS = {"params:preprocessing", "params:training", "params:inference", "params:evaluation"}
PUBLISHED_OUTPUTS = ("model", "model_card", "training_history", "validation_metrics", "validation_scores")


def template() -> Pipeline:
    """Train one architecture, then score its best checkpoint on the validation split: on the model's
    input (slice Dice, logged) and in 3D on the original grid (what the registry selects on)."""
    return Pipeline([
        Node(train_model,
             ["model_input_slices", "case_manifest", "intensity_stats", "params:preprocessing",
              "params:training", "params:architecture"],
             ["model", "training_history", "training_curves", "model_card"], name="train_model", tags=MODEL_TRAINING_TAG),
        Node(nodes.validate_model,
             ["model", "model_input_slices", "case_manifest", "model_card", "params:preprocessing",
              "params:training", "params:architecture", "params:inference"],
             "validation_metrics", name="validate_model"),
        Node(score_validation_cases,
             ["model", "model_card", "model_input_slices", "slice_geometry", "case_manifest", "params:evaluation"],
             "validation_scores", name="score_validation_cases"),
    ])


def create_pipeline(models: Iterable[str] = ARCHITECTURE_NAMES) -> Pipeline:
    """Training of the architectures ``models``, one namespace each."""
    return sum((Pipeline(template(), namespace=name, inputs=SHARED_INPUTS, parameters=SHARED_PARAMETERS,
                         outputs={output: f"{output}_{name}" for output in PUBLISHED_OUTPUTS})
                for name in models), Pipeline([]))


def create_registration_pipeline(models: Iterable[str]) -> Pipeline:
    """Register every trained model in ``models`` (architectures and/or ``cascade``); the best by
    its 3D score on the validation cases (``registry.selection``) gets the registry alias."""
    names = list(models)
    return Pipeline([
        Node(nodes.register_trained_models,
             ["params:registry", "case_manifest"] + [f"model_card_{n}" for n in names]
             + [f"validation_metrics_{n}" for n in names] + [f"validation_scores_{n}" for n in names],
             "model_registration", name="register_trained_models"),
    ])


def create_learning_curves_pipeline(models: Iterable[str]) -> Pipeline:
    """After every model in ``models`` has trained: one figure of their validation pancreas Dice
    against optimizer steps and against seconds (``learning_curves``), also logged to the parent run."""
    return Pipeline([
        Node(nodes.learning_curves, {name: f"training_history_{name}" for name in models}, "learning_curves",
             name="plot_learning_curves"),
    ])
