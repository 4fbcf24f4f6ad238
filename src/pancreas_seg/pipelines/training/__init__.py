"""Training: one namespace per architecture (unet, unet_small, fcn, vnet2d), and the registration
of every trained model."""

from pancreas_seg.pipelines.training.pipeline import create_pipeline, create_registration_pipeline

__all__ = ["create_pipeline", "create_registration_pipeline"]
