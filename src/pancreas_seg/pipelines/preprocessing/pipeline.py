"""Preprocessing wiring."""

from kedro.pipeline import Node, Pipeline

from pancreas_seg.pipelines import NO_MLFLOW_RUN_TAG
from pancreas_seg.pipelines.preprocessing import nodes


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        Node(nodes.fit_intensity_stats, ["case_manifest", "params:preprocessing"], "intensity_stats",
             name="fit_intensity_stats"),
        Node(nodes.preprocess_cases, ["case_manifest", "intensity_stats", "params:preprocessing"],
             ["model_input_slices", "slice_geometry"], name="preprocess_cases"),
    ], tags=NO_MLFLOW_RUN_TAG)  # they never log to MLflow: no MLflow on the Dask workers
