"""The ``cascade`` namespace: stage 2 trained on crops around the pancreas stage 1 finds."""

from pancreas_seg.pipelines.cascade.pipeline import create_pipeline

__all__ = ["create_pipeline"]
