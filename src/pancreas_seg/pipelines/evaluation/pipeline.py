"""Evaluation wiring: per-architecture prediction and scoring, then a cross-model comparison."""

from collections.abc import Iterable

from kedro.pipeline import Node, Pipeline

from pancreas_seg.pipelines.evaluation import nodes


def template() -> Pipeline:
    return Pipeline([
        Node(nodes.predict_test_cases,
             ["model", "model_input_slices", "slice_geometry", "case_manifest", "model_card", "params:evaluation"],
             "test_predictions", name="predict_test_cases"),
        Node(nodes.score_test_cases, ["test_predictions", "case_manifest", "model_card", "params:evaluation"],
             "metrics_per_case", name="score_test_cases"),
        Node(nodes.summarise_model, ["metrics_per_case", "model_card"], "evaluation_summary",
             name="summarise_model"),
    ])


def create_pipeline(architectures: Iterable[str] = ("unet", "unet_small", "fcn", "vnet2d")) -> Pipeline:
    archs = list(architectures)
    per_model = sum(
        (Pipeline(template(), namespace=arch,
                  inputs={"model_input_slices", "slice_geometry", "case_manifest"},
                  parameters={"params:evaluation"})
         for arch in archs),
        Pipeline([]),
    )
    comparison = Pipeline([
        Node(nodes.compare_architectures,
             [f"{a}.metrics_per_case" for a in archs] + [f"{a}.evaluation_summary" for a in archs],
             ["metrics_per_case", "model_comparison", "model_comparison_markdown", "dice_boxplots"],
             name="compare_architectures"),
        Node(nodes.plot_test_overlays,
             ["case_manifest", "params:evaluation"] + [f"{a}.model_card" for a in archs]
             + [f"{a}.test_predictions" for a in archs],
             "test_overlays", name="plot_test_overlays"),
    ])
    return per_model + comparison
