"""Simplified U-Net: the same blocks as :mod:`pancreas_seg.models.unet` with 2 levels."""

from __future__ import annotations

import keras

from pancreas_seg.models.unet import unet_graph


def build_unet_small(
    input_shape: tuple[int, int, int],
    label_mode: str = "multiclass",
    *,
    base_filters: int = 16,
    depth: int = 2,
    dropout: float = 0.2,
    l2_weight: float = 1e-4,
    activation: str = "relu",
    kernel_size: int = 3,
) -> keras.Model:
    """Build the simplified U-Net (model name ``"unet_small"``): 2 pooling levels by default.

    Same arguments and output as :func:`pancreas_seg.models.unet.build_unet`; input H and W
    must be divisible by 2**depth. Output float32 probabilities (B, H, W, 3) or (B, H, W, 1).
    """
    return unet_graph(
        input_shape,
        label_mode,
        base_filters=base_filters,
        depth=depth,
        dropout=dropout,
        l2_weight=l2_weight,
        name="unet_small",
        activation=activation,
        kernel_size=kernel_size,
    )
