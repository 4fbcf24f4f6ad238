"""inference pipeline."""

from pancreas_seg.pipelines.inference.pipeline import create_pipeline

__all__ = ["create_pipeline"]
