"""Training: one namespace per architecture (unet, unet_small, fcn, vnet2d)."""

from pancreas_seg.pipelines.training.pipeline import create_pipeline

__all__ = ["create_pipeline"]
