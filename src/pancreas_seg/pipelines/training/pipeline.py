"""Training wiring: the same template pipeline under one namespace per architecture."""

from collections.abc import Iterable

from kedro.pipeline import Node, Pipeline

from pancreas_seg.models.names import ARCHITECTURE_NAMES
from pancreas_seg.pipelines.training import nodes

SHARED_INPUTS = {"model_input_slices", "case_manifest", "intensity_stats"}
SHARED_PARAMETERS = {"params:preprocessing", "params:training"}


def template() -> Pipeline:
    """Train one architecture, then score its best checkpoint on the validation split."""
    return Pipeline([
        Node(nodes.train_model,
             ["model_input_slices", "case_manifest", "intensity_stats", "params:preprocessing",
              "params:training", "params:architecture"],
             ["model", "training_history", "training_curves", "model_card"], name="train_model"),
        Node(nodes.validate_model,
             ["model", "model_input_slices", "case_manifest", "model_card", "params:preprocessing",
              "params:training", "params:architecture"],
             "validation_metrics", name="validate_model"),
    ])


def create_pipeline(architectures: Iterable[str] = ARCHITECTURE_NAMES) -> Pipeline:
    return sum(
        (Pipeline(template(), namespace=arch, inputs=SHARED_INPUTS, parameters=SHARED_PARAMETERS)
         for arch in architectures),
        Pipeline([]),
    )
