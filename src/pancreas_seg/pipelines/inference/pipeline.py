"""Inference wiring."""

from kedro.pipeline import Node, Pipeline

from pancreas_seg.pipelines.inference import nodes


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        Node(nodes.run_inference, "params:inference", "inference_report", name="run_inference"),
    ])
