"""Reusable functional building blocks shared by every architecture.

All blocks take and return Keras symbolic tensors of shape (B, H, W, C), channels-last, and use
only ``keras`` layers, so models build under any Keras 3 backend (TensorFlow, JAX, PyTorch).
Layer names are derived from the ``name`` argument, which keeps saved ``.keras`` files readable.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import layers

from pancreas_seg.core.labels import LABEL_MODES, check_label_mode
from pancreas_seg.core.labels import output_channels as label_output_channels

__all__ = ["LABEL_MODES"]  # re-exported: the registry lists it next to the builders

#: Supported hidden activations.
ACTIVATIONS: tuple[str, ...] = ("relu", "prelu")


# Moving-statistics momentum of every BatchNormalization. Keras' 0.99 needs ~500 steps before
# inference statistics settle; short CPU runs (a few hundred steps) then validate far worse than
# they train. 0.9 settles within ~50 steps and is what the reference U-Net implementations use.
BATCH_NORM_MOMENTUM = 0.9


def validate_label_mode(label_mode: str) -> str:
    """Return ``label_mode``, or raise ValueError when it is not in :data:`LABEL_MODES`."""
    return check_label_mode(label_mode)


def output_channels(label_mode: str) -> int:
    """Number of output channels for a label mode (see :mod:`pancreas_seg.core.labels`)."""
    return label_output_channels(label_mode)


def output_activation(label_mode: str) -> str:
    """Final activation for a label mode: ``"softmax"`` for multiclass, else ``"sigmoid"``."""
    return "softmax" if validate_label_mode(label_mode) == "multiclass" else "sigmoid"


def validate_input_shape(
    input_shape: Sequence[int], divisor: int, architecture: str
) -> tuple[int, int, int]:
    """Check an ``(H, W, C)`` input shape and that H and W are divisible by ``divisor``.

    Returns the shape as a tuple of ints; raises ValueError with a readable message otherwise.
    """
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(
            f"{architecture}: input_shape must be (H, W, C) with positive sizes, "
            f"got {input_shape!r}."
        )
    height, width, _ = shape
    if height % divisor or width % divisor:
        raise ValueError(
            f"{architecture}: input height and width must be divisible by {divisor} "
            f"(the total downsampling factor), got H={height}, W={width}."
        )
    return shape  # type: ignore[return-value]


def l2_regulariser(l2_weight: float) -> keras.regularizers.Regularizer | None:
    """An L2 kernel regulariser, or None when ``l2_weight`` is 0."""
    return keras.regularizers.L2(l2_weight) if l2_weight and l2_weight > 0 else None


def activation_layer(x: keras.KerasTensor, activation: str, name: str) -> keras.KerasTensor:
    """Apply ``"relu"`` or ``"prelu"`` (one learnable slope per channel, shared over H and W)."""
    if activation == "relu":
        return layers.ReLU(name=name)(x)
    if activation == "prelu":
        return layers.PReLU(shared_axes=[1, 2], name=name)(x)
    raise ValueError(f"Unknown activation {activation!r}; expected one of {list(ACTIVATIONS)}.")


def conv_bn_act(
    x: keras.KerasTensor,
    filters: int,
    *,
    kernel_size: int = 3,
    activation: str | None = "relu",
    l2_weight: float = 0.0,
    name: str = "conv",
    strides: int = 1,
) -> keras.KerasTensor:
    """Conv2D ('same' padding, no bias) -> BatchNormalization -> activation (skipped if None).

    Input (B, H, W, C_in) -> output (B, H/strides, W/strides, filters).
    """
    x = layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding="same",
        use_bias=False,
        kernel_initializer="he_normal",
        kernel_regularizer=l2_regulariser(l2_weight),
        name=f"{name}_conv",
    )(x)
    x = layers.BatchNormalization(momentum=BATCH_NORM_MOMENTUM, name=f"{name}_bn")(x)
    if activation is not None:
        x = activation_layer(x, activation, name=f"{name}_{activation}")
    return x


def conv_stack(
    x: keras.KerasTensor,
    filters: int,
    *,
    n_convs: int = 2,
    kernel_size: int = 3,
    activation: str = "relu",
    l2_weight: float = 0.0,
    name: str = "stack",
) -> keras.KerasTensor:
    """``n_convs`` successive :func:`conv_bn_act` blocks: (B, H, W, C_in) -> (B, H, W, filters)."""
    for i in range(n_convs):
        x = conv_bn_act(
            x,
            filters,
            kernel_size=kernel_size,
            activation=activation,
            l2_weight=l2_weight,
            name=f"{name}_{i + 1}",
        )
    return x


def residual_stage(
    x: keras.KerasTensor,
    filters: int,
    *,
    n_convs: int,
    kernel_size: int = 5,
    activation: str = "prelu",
    l2_weight: float = 0.0,
    name: str = "stage",
    shortcut: keras.KerasTensor | None = None,
) -> keras.KerasTensor:
    """V-Net residual stage: ``n_convs`` convolutions whose output is added to the stage input.

    The first ``n_convs - 1`` convolutions are Conv-BN-act; the last is Conv-BN, then the shortcut
    is added and the activation applied. ``shortcut`` defaults to ``x`` (decoder stages pass the
    upsampled tensor); when its channel count differs from ``filters`` a 1x1 projection is used.
    Input (B, H, W, C_in) -> output (B, H, W, filters).
    """
    if n_convs < 1:
        raise ValueError(f"{name}: a residual stage needs at least one convolution, got {n_convs}.")
    residual = x if shortcut is None else shortcut
    y = x
    for i in range(n_convs):
        last = i == n_convs - 1
        y = conv_bn_act(
            y,
            filters,
            kernel_size=kernel_size,
            activation=None if last else activation,
            l2_weight=l2_weight,
            name=f"{name}_{i + 1}",
        )
    if residual.shape[-1] != filters:
        residual = layers.Conv2D(
            filters,
            1,
            padding="same",
            kernel_regularizer=l2_regulariser(l2_weight),
            name=f"{name}_proj",
        )(residual)
    y = layers.Add(name=f"{name}_add")([y, residual])
    return activation_layer(y, activation, name=f"{name}_out_{activation}")


def down_conv(
    x: keras.KerasTensor,
    filters: int,
    *,
    activation: str = "prelu",
    l2_weight: float = 0.0,
    name: str = "down",
) -> keras.KerasTensor:
    """Learned downsampling: 2x2 convolution with stride 2 -> BN -> activation.

    (B, H, W, C_in) -> (B, H/2, W/2, filters).
    """
    return conv_bn_act(
        x,
        filters,
        kernel_size=2,
        activation=activation,
        l2_weight=l2_weight,
        name=name,
        strides=2,
    )


@keras.saving.register_keras_serializable(package="pancreas_seg")
class PatchConv2DTranspose(layers.Conv2DTranspose):
    """A Conv2DTranspose whose kernel size equals its stride, computed as one matrix product.

    With kernel == stride the output patches do not overlap: each input pixel (B, h, w, C) becomes its
    own (s_h, s_w, filters) patch, ``x @ kernel``, placed at (s_h * h, s_w * w). That is one
    (B*H*W, C) x (C, s_h*s_w*filters) matmul and a pixel shuffle, instead of the dilated
    convolution that backends lower Conv2DTranspose to (XLA on the CPU spent ~2x longer on it).
    Same weights, same config and the same output as :class:`keras.layers.Conv2DTranspose` (tested);
    other settings fall back to the parent's implementation.
    """

    def call(self, inputs):  # noqa: D102 - see the class docstring
        stride_h, stride_w = self.strides
        _, height, width, channels = inputs.shape
        if (tuple(self.kernel_size) != (stride_h, stride_w) or self.data_format != "channels_last"
                or tuple(self.dilation_rate) != (1, 1) or self.output_padding is not None
                or height is None or width is None):
            return super().call(inputs)
        ops = keras.ops
        # kernel (s_h, s_w, filters, C) -> (C, s_h * s_w * filters)
        kernel = ops.reshape(ops.transpose(self.kernel, (3, 0, 1, 2)), (channels, -1))
        patches = ops.matmul(ops.reshape(inputs, (-1, channels)), kernel)
        patches = ops.reshape(patches, (-1, height, width, stride_h, stride_w, self.filters))
        outputs = ops.reshape(ops.transpose(patches, (0, 1, 3, 2, 4, 5)),
                              (-1, height * stride_h, width * stride_w, self.filters))
        if self.use_bias:
            outputs = outputs + self.bias
        return outputs if self.activation is None else self.activation(outputs)


def up_transpose(
    x: keras.KerasTensor,
    filters: int,
    *,
    l2_weight: float = 0.0,
    name: str = "up",
    stride: int = 2,
) -> keras.KerasTensor:
    """Learned upsampling by ``stride`` ('same' padding, linear): (B, H, W, C) -> (B, sH, sW, filters).

    A stride x stride Conv2DTranspose with non-overlapping kernels (see :class:`PatchConv2DTranspose`).
    """
    return PatchConv2DTranspose(
        filters,
        stride,
        strides=stride,
        padding="same",
        kernel_regularizer=l2_regulariser(l2_weight),
        name=name,
    )(x)


def final_activation(x: keras.KerasTensor, label_mode: str) -> keras.KerasTensor:
    """Apply the label mode's output activation in float32 (layer name ``"probabilities"``)."""
    return layers.Activation(output_activation(label_mode), dtype="float32", name="probabilities")(
        x
    )


def segmentation_head(
    x: keras.KerasTensor, label_mode: str, *, l2_weight: float = 0.0
) -> keras.KerasTensor:
    """1x1 convolution to :func:`output_channels` logits, then :func:`final_activation`.

    (B, H, W, C) -> float32 probabilities (B, H, W, 3) softmax or (B, H, W, 1) sigmoid.
    """
    logits = layers.Conv2D(
        output_channels(label_mode),
        1,
        padding="same",
        kernel_regularizer=l2_regulariser(l2_weight),
        name="logits",
    )(x)
    return final_activation(logits, label_mode)
