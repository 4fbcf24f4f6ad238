"""Training: one namespace per architecture (unet, unet_small, fcn, vnet2d), the registration of
every trained model, and their learning curves in one figure."""

from pancreas_seg.pipelines.training.pipeline import (
    create_learning_curves_pipeline,
    create_pipeline,
    create_registration_pipeline,
)

__all__ = ["create_learning_curves_pipeline", "create_pipeline", "create_registration_pipeline"]
