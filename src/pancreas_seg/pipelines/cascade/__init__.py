"""The ``cascade`` namespace: stage 2 trained on crops around the pancreas stage 1 finds, and its
cross-validation on out-of-fold stage-1 predictions (``cv_cascade``)."""

from pancreas_seg.pipelines.cascade.pipeline import create_cv_pipeline, create_pipeline

__all__ = ["create_cv_pipeline", "create_pipeline"]
