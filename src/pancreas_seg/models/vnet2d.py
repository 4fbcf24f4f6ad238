"""2D V-Net (Milletari et al. 2016, adapted to slices).

5x5 convolutions, residual stages (the stage input is added to its output), PReLU, learned
downsampling by 2x2 stride-2 convolutions (no pooling), 2x2 Conv2DTranspose upsampling, skip
concatenation and dropout in the bottom and decoder stages. Filters start at ``base_filters`` and
double per level. Stage convolution counts default to (1, 2, 3, 3, 3) for depth 4 (encoder levels
then bottom); decoder level ``i`` reuses the count of encoder level ``i`` (3, 3, 2, 1 going up).
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import layers

from pancreas_seg.models.blocks import (
    down_conv,
    residual_stage,
    segmentation_head,
    up_transpose,
    validate_input_shape,
    validate_label_mode,
)


def default_stage_convs(depth: int) -> tuple[int, ...]:
    """Convolutions per stage for ``depth`` levels: 1, 2, 3, 3, ... (length ``depth + 1``)."""
    return tuple(min(i + 1, 3) for i in range(depth + 1))


def build_vnet2d(
    input_shape: tuple[int, int, int],
    label_mode: str = "multiclass",
    *,
    base_filters: int = 16,
    depth: int = 4,
    dropout: float = 0.2,
    l2_weight: float = 1e-4,
    stage_convs: Sequence[int] | None = None,
    kernel_size: int = 5,
    activation: str = "prelu",
) -> keras.Model:
    """Build the 2D V-Net (model name ``"vnet2d"``).

    Args:
        input_shape: (H, W, C); H and W divisible by 2**depth.
        label_mode: "multiclass" (3-channel softmax) or "pancreas"/"tumour" (1-channel sigmoid).
        base_filters: filters of the first stage, doubled per level (16 in the paper).
        depth: number of stride-2 downsampling steps.
        dropout: rate after the bottom stage and after each decoder stage (0 disables).
        l2_weight: L2 kernel regularisation factor (0 disables).
        stage_convs: convolutions per stage, length ``depth + 1`` (encoder levels, then bottom);
            default :func:`default_stage_convs`.
        kernel_size: convolution kernel size inside stages (5 in the paper).
        activation: "prelu" (paper) or "relu".

    Returns:
        keras.Model mapping float32 (B, H, W, C) to float32 probabilities (B, H, W, 3 or 1).
    """
    validate_label_mode(label_mode)
    if depth < 1:
        raise ValueError(f"vnet2d: depth must be >= 1, got {depth}.")
    shape = validate_input_shape(input_shape, 2**depth, "vnet2d")
    convs = tuple(int(n) for n in (stage_convs or default_stage_convs(depth)))
    if len(convs) != depth + 1:
        raise ValueError(
            f"vnet2d: stage_convs needs depth + 1 = {depth + 1} entries, got {list(convs)}."
        )

    common = {"kernel_size": kernel_size, "activation": activation, "l2_weight": l2_weight}
    inputs = keras.Input(shape=shape, name="image")
    x = inputs
    skips: list[keras.KerasTensor] = []
    for level in range(depth):
        filters = base_filters * 2**level
        x = residual_stage(x, filters, n_convs=convs[level], name=f"enc{level + 1}", **common)
        skips.append(x)
        x = down_conv(
            x, filters * 2, activation=activation, l2_weight=l2_weight, name=f"down{level + 1}"
        )

    x = residual_stage(x, base_filters * 2**depth, n_convs=convs[depth], name="bottom", **common)
    if dropout > 0:
        x = layers.Dropout(dropout, name="bottom_dropout")(x)

    for level in reversed(range(depth)):
        filters = base_filters * 2**level
        up = up_transpose(x, filters, l2_weight=l2_weight, name=f"up{level + 1}")
        x = layers.Concatenate(name=f"skip{level + 1}")([up, skips[level]])
        x = residual_stage(
            x, filters, n_convs=convs[level], name=f"dec{level + 1}", shortcut=up, **common
        )
        if dropout > 0:
            x = layers.Dropout(dropout, name=f"dec{level + 1}_dropout")(x)

    outputs = segmentation_head(x, label_mode, l2_weight=l2_weight)
    return keras.Model(inputs, outputs, name="vnet2d")
