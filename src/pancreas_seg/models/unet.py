"""U-Net (Ronneberger et al. 2015 layout) for 2D / 2.5D slices.

``depth`` pooling levels; each level is two Conv-BN-ReLU blocks; filters start at ``base_filters``
and double per level; 2x2 max-pooling down, 2x2 Conv2DTranspose up, skip concatenation; dropout
at the bottleneck and after every decoder concatenation; L2 kernel regularisation on all convs.
"""

from __future__ import annotations

import keras
from keras import layers

from pancreas_seg.models.blocks import (
    conv_stack,
    segmentation_head,
    up_transpose,
    validate_input_shape,
    validate_label_mode,
)


def unet_graph(
    input_shape: tuple[int, int, int],
    label_mode: str,
    *,
    base_filters: int,
    depth: int,
    dropout: float,
    l2_weight: float,
    name: str,
    activation: str = "relu",
    kernel_size: int = 3,
    convs_per_level: int = 2,
) -> keras.Model:
    """Shared U-Net graph used by ``unet`` and ``unet_small`` (differ only in defaults and name).

    Input float32 (B, H, W, C), H and W divisible by 2**depth; output float32 probabilities
    (B, H, W, 3) softmax for ``"multiclass"`` or (B, H, W, 1) sigmoid otherwise.
    """
    validate_label_mode(label_mode)
    if depth < 1:
        raise ValueError(f"{name}: depth must be >= 1, got {depth}.")
    if base_filters < 1:
        raise ValueError(f"{name}: base_filters must be >= 1, got {base_filters}.")
    shape = validate_input_shape(input_shape, 2**depth, name)

    stack_kwargs = {
        "n_convs": convs_per_level,
        "kernel_size": kernel_size,
        "activation": activation,
        "l2_weight": l2_weight,
    }
    inputs = keras.Input(shape=shape, name="image")
    x = inputs
    skips: list[keras.KerasTensor] = []
    for level in range(depth):
        x = conv_stack(x, base_filters * 2**level, name=f"enc{level + 1}", **stack_kwargs)
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"pool{level + 1}")(x)

    x = conv_stack(x, base_filters * 2**depth, name="bottleneck", **stack_kwargs)
    if dropout > 0:
        x = layers.Dropout(dropout, name="bottleneck_dropout")(x)

    for level in reversed(range(depth)):
        filters = base_filters * 2**level
        x = up_transpose(x, filters, l2_weight=l2_weight, name=f"up{level + 1}")
        x = layers.Concatenate(name=f"skip{level + 1}")([x, skips[level]])
        if dropout > 0:
            x = layers.Dropout(dropout, name=f"dec{level + 1}_dropout")(x)
        x = conv_stack(x, filters, name=f"dec{level + 1}", **stack_kwargs)

    outputs = segmentation_head(x, label_mode, l2_weight=l2_weight)
    return keras.Model(inputs, outputs, name=name)


def build_unet(
    input_shape: tuple[int, int, int],
    label_mode: str = "multiclass",
    *,
    base_filters: int = 16,
    depth: int = 4,
    dropout: float = 0.2,
    l2_weight: float = 1e-4,
    activation: str = "relu",
    kernel_size: int = 3,
) -> keras.Model:
    """Build the study's U-Net (model name ``"unet"``).

    Args:
        input_shape: (H, W, C); C = number of 2.5D context slices; H, W divisible by 2**depth.
        label_mode: "multiclass" (3-channel softmax) or "pancreas"/"tumour" (1-channel sigmoid).
        base_filters: filters at the first level, doubled per level (64 in the original paper).
        depth: number of pooling levels.
        dropout: rate at the bottleneck and after each decoder skip concatenation (0 disables).
        l2_weight: L2 kernel regularisation factor (0 disables).
        activation: "relu" or "prelu".
        kernel_size: convolution kernel size.

    Returns:
        keras.Model mapping float32 (B, H, W, C) to float32 probabilities (B, H, W, 3 or 1).
    """
    return unet_graph(
        input_shape,
        label_mode,
        base_filters=base_filters,
        depth=depth,
        dropout=dropout,
        l2_weight=l2_weight,
        name="unet",
        activation=activation,
        kernel_size=kernel_size,
    )
