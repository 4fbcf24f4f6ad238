"""Cross-validation pipeline: k fold models per architecture, fold ensembles, comparison, selection."""

from pancreas_seg.pipelines.cv.pipeline import create_pipeline

__all__ = ["create_pipeline"]
