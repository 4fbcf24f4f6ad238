"""Ingestion wiring."""

from kedro.pipeline import Node, Pipeline

from pancreas_seg.pipelines import NO_MLFLOW_RUN_TAG
from pancreas_seg.pipelines.ingestion import nodes


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        Node(nodes.stage_raw_dataset, "params:ingestion", "raw_task07_root", name="stage_raw_dataset"),
        Node(nodes.validate_raw_dataset, ["raw_task07_root", "params:ingestion"],
             ["validation_report", "validated_cases"], name="validate_raw_dataset"),
        Node(nodes.apply_invalid_policy, ["validation_report", "validated_cases"], "valid_cases",
             name="apply_invalid_policy"),
        Node(nodes.plan_split, ["valid_cases", "raw_task07_root", "persisted_splits", "params:split"],
             "case_splits", name="plan_split"),
        Node(nodes.build_case_manifest, ["valid_cases", "case_splits", "raw_task07_root"], "case_manifest",
             name="build_case_manifest"),
    ], tags=NO_MLFLOW_RUN_TAG)  # they never log to MLflow: no MLflow on the Dask workers
