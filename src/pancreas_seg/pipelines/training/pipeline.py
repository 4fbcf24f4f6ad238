"""Training wiring: the same template pipeline under one namespace per architecture, and the
registration of every trained model.

Each model and its card are published under plain names (``model_unet``, ``model_card_unet``):
the evaluation pipeline and the cascade's stage 1 read them from other namespaces, and Kedro keeps
dotted names for a node's own namespace. The cascade's own training is the ``cascade`` pipeline;
``pipeline_registry`` puts the two together.
"""

from collections.abc import Iterable

from kedro.pipeline import Node, Pipeline

from pancreas_seg.models.names import ARCHITECTURE_NAMES
from pancreas_seg.pipelines import MODEL_TRAINING_TAG
from pancreas_seg.pipelines.training import nodes
from pancreas_seg.tracking.training_run import train_model

SHARED_INPUTS = {"model_input_slices", "case_manifest", "intensity_stats"}
SHARED_PARAMETERS = {"params:preprocessing", "params:training", "params:inference"}
PUBLISHED_OUTPUTS = ("model", "model_card", "validation_metrics")


def template() -> Pipeline:
    """Train one architecture, then score its best checkpoint on the validation split."""
    return Pipeline([
        Node(train_model,
             ["model_input_slices", "case_manifest", "intensity_stats", "params:preprocessing",
              "params:training", "params:architecture"],
             ["model", "training_history", "training_curves", "model_card"], name="train_model", tags=MODEL_TRAINING_TAG),
        Node(nodes.validate_model,
             ["model", "model_input_slices", "case_manifest", "model_card", "params:preprocessing",
              "params:training", "params:architecture", "params:inference"],
             "validation_metrics", name="validate_model"),
    ])


def create_pipeline(models: Iterable[str] = ARCHITECTURE_NAMES) -> Pipeline:
    """Training of the architectures ``models``, one namespace each."""
    return sum((Pipeline(template(), namespace=name, inputs=SHARED_INPUTS, parameters=SHARED_PARAMETERS,
                         outputs={output: f"{output}_{name}" for output in PUBLISHED_OUTPUTS})
                for name in models), Pipeline([]))


def create_registration_pipeline(models: Iterable[str]) -> Pipeline:
    """Register every trained model in ``models`` (architectures and/or ``cascade``); the best by
    validation Dice gets the registry alias."""
    names = list(models)
    return Pipeline([
        Node(nodes.register_trained_models,
             ["params:registry"] + [f"model_card_{n}" for n in names] + [f"validation_metrics_{n}" for n in names],
             "model_registration", name="register_trained_models"),
    ])
