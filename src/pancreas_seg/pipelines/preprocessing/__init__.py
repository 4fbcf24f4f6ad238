"""Preprocessing: reorient, resize and normalise every labelled case into per-case .npy shards."""

from pancreas_seg.pipelines.preprocessing.pipeline import create_pipeline

__all__ = ["create_pipeline"]
