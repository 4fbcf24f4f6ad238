"""Segmentation losses written with ``keras.ops`` only (backend-agnostic).

Both losses take ``y_true`` and ``y_pred`` of the same shape (B, H, W, K), float32 probabilities:
K = 3 -> one-hot (background, pancreas, tumour) targets and softmax output ("multiclass");
K = 1 -> binary targets and sigmoid output ("pancreas" or "tumour"). The layout is inferred from K.

Soft Dice (the study's loss), per foreground channel k:

    dice_k = (2 * sum(y_k * p_k) + smooth) / (sum(y_k) + sum(p_k) + smooth)

where the sums run over the batch and spatial axes together (one "batch Dice" per channel, not a
per-image Dice). Foreground channels are 1..K-1 when K > 1 (pancreas and tumour; background is
excluded) and channel 0 when K = 1. The loss is ``1 - mean_k dice_k``: a scalar per batch, so
``sample_weight`` is not meaningful for it.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from pancreas_seg.models.blocks import validate_label_mode

#: Probabilities are clipped to [EPSILON, 1 - EPSILON] before taking logarithms.
EPSILON = 1e-7


def soft_dice_loss(y_true: Any, y_pred: Any, smooth: float = 1.0) -> Any:
    """Scalar float32 soft Dice loss of (B, H, W, K) tensors (see the module docstring)."""
    y_true = ops.cast(y_true, "float32")
    y_pred = ops.cast(y_pred, "float32")
    if y_pred.shape[-1] > 1:  # drop the background channel
        y_true, y_pred = y_true[..., 1:], y_pred[..., 1:]
    axes = (0, 1, 2)
    intersection = ops.sum(y_true * y_pred, axis=axes)
    sizes = ops.sum(y_true, axis=axes) + ops.sum(y_pred, axis=axes)
    dice = (2.0 * intersection + smooth) / (sizes + smooth)
    return 1.0 - ops.mean(dice)


def cross_entropy(y_true: Any, y_pred: Any) -> Any:
    """Scalar float32 mean pixel cross-entropy of probabilities (B, H, W, K).

    K = 1: binary CE ``-(y log p + (1-y) log(1-p))``; K > 1: categorical CE ``-sum_k y_k log p_k``.
    Probabilities are clipped to [EPSILON, 1 - EPSILON], so the value is always finite.
    """
    y_true = ops.cast(y_true, "float32")
    p = ops.clip(ops.cast(y_pred, "float32"), EPSILON, 1.0 - EPSILON)
    if y_pred.shape[-1] == 1:
        pixel = -(y_true * ops.log(p) + (1.0 - y_true) * ops.log(1.0 - p))
    else:
        pixel = -ops.sum(y_true * ops.log(p), axis=-1)
    return ops.mean(pixel)


@keras.saving.register_keras_serializable(package="pancreas_seg")
class SoftDiceLoss(keras.losses.Loss):
    """The study's soft Dice loss ``1 - mean_k dice_k`` over foreground channels (batch Dice).

    ``smooth`` is added to numerator and denominator, so empty truth with empty prediction gives
    loss 0. Inputs: float32 (B, H, W, K) targets and probabilities; output: float32 scalar.
    """

    def __init__(self, smooth: float = 1.0, name: str = "soft_dice_loss", **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        self.smooth = float(smooth)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        return soft_dice_loss(y_true, y_pred, self.smooth)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "smooth": self.smooth}


@keras.saving.register_keras_serializable(package="pancreas_seg")
class DiceCrossEntropyLoss(keras.losses.Loss):
    """nnU-Net-style ``dice_weight * soft Dice loss + ce_weight * cross-entropy``.

    Cross-entropy is categorical for K > 1 channels (softmax) and binary for K = 1 (sigmoid),
    computed on clipped probabilities. Inputs: float32 (B, H, W, K); output: float32 scalar.
    """

    def __init__(
        self,
        smooth: float = 1.0,
        dice_weight: float = 1.0,
        ce_weight: float = 1.0,
        name: str = "dice_ce_loss",
        **kwargs: Any,
    ) -> None:
        super().__init__(name=name, **kwargs)
        self.smooth = float(smooth)
        self.dice_weight = float(dice_weight)
        self.ce_weight = float(ce_weight)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        return self.dice_weight * soft_dice_loss(
            y_true, y_pred, self.smooth
        ) + self.ce_weight * cross_entropy(y_true, y_pred)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "smooth": self.smooth,
            "dice_weight": self.dice_weight,
            "ce_weight": self.ce_weight,
        }


LOSSES: dict[str, type[keras.losses.Loss]] = {
    "soft_dice": SoftDiceLoss,
    "dice_ce": DiceCrossEntropyLoss,
}


def make_loss(name: str, label_mode: str, smooth: float = 1.0) -> keras.losses.Loss:
    """Build the loss ``name`` ("soft_dice" or "dice_ce") for ``label_mode``.

    ``label_mode`` is validated; the loss itself infers softmax vs sigmoid from the channel count.
    Raises ValueError for an unknown loss name or label mode.
    """
    validate_label_mode(label_mode)
    if name not in LOSSES:
        raise ValueError(f"Unknown loss {name!r}; known: {sorted(LOSSES)}.")
    return LOSSES[name](smooth=smooth)
