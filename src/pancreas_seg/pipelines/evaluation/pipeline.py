"""Evaluation wiring: per-model prediction and scoring, then a cross-model comparison.

Each model's evaluation runs in its namespace (``unet.test_predictions`` ...); the cascade's
prediction node also reads its stage-1 model (``cascade.stage1_model``). The two
results the comparison reads across namespaces are published under plain names
(``evaluation_summary_unet``, ``metrics_per_case_unet``, ``test_predictions_unet``), because Kedro
reserves dotted names for a node's own namespace.
"""

from collections.abc import Iterable

from kedro.pipeline import Node, Pipeline

from pancreas_seg.models.names import CASCADE_NAME, MODEL_NAMES
from pancreas_seg.pipelines.evaluation import nodes

SHARED_INPUTS = {"model_input_slices", "slice_geometry", "case_manifest", "intensity_stats"}
SHARED_PARAMETERS = {"params:evaluation", "params:preprocessing"}
PUBLISHED_OUTPUTS = ("test_predictions", "metrics_per_case", "evaluation_summary")
MODEL_INPUTS = ("model", "model_card")   # published by the training pipeline as model_<name>, ...


def template(cascade: bool = False) -> Pipeline:
    """Check the model's binding, predict the held-out test cases, score and summarise them.

    With ``cascade``, prediction also takes the cascade's ``stage1_model`` and runs both stages.
    """
    predict = Node(nodes.predict_test_cases,
                   ["model", "model_card", "model_check", "model_input_slices", "slice_geometry", "case_manifest",
                    "params:evaluation"] + (["stage1_model"] if cascade else []),
                   "test_predictions", name="predict_test_cases")
    return Pipeline([
        Node(nodes.check_model_binding,
             ["model_card", "case_manifest", "intensity_stats", "params:preprocessing"],
             "model_check", name="check_model_binding"),
        predict,
        Node(nodes.score_test_cases,
             ["test_predictions", "case_manifest", "slice_geometry", "model_card", "params:evaluation"],
             "metrics_per_case", name="score_test_cases"),
        Node(nodes.summarise_model, ["metrics_per_case", "model_card"], "evaluation_summary",
             name="summarise_model"),
    ])


def create_pipeline(models: Iterable[str] = MODEL_NAMES) -> Pipeline:
    """Evaluation of ``models`` (architecture names and/or ``cascade``), then their comparison."""
    archs = list(models)
    per_model = sum(
        (Pipeline(template(cascade=arch == CASCADE_NAME), namespace=arch, parameters=SHARED_PARAMETERS,
                  inputs={name: name for name in SHARED_INPUTS} | {name: f"{name}_{arch}" for name in MODEL_INPUTS},
                  outputs={name: f"{name}_{arch}" for name in PUBLISHED_OUTPUTS})
         for arch in archs),
        Pipeline([]),
    )
    comparison = Pipeline([
        Node(nodes.compare_architectures,
             [f"metrics_per_case_{a}" for a in archs] + [f"evaluation_summary_{a}" for a in archs],
             ["metrics_per_case", "model_comparison", "model_comparison_markdown", "dice_boxplots", "froc_plot"],
             name="compare_architectures"),
        Node(nodes.plot_test_overlays,
             ["case_manifest", "params:evaluation"] + [f"evaluation_summary_{a}" for a in archs]
             + [f"test_predictions_{a}" for a in archs],
             "test_overlays", name="plot_test_overlays"),
        Node(nodes.compare_statistically, ["metrics_per_case", "params:statistics"],
             ["paired_comparison", "paired_comparison_markdown", "paired_comparison_plot"],
             name="compare_statistically"),
    ])
    return per_model + comparison
