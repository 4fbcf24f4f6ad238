"""Architecture name -> builder registry.

Every builder has the signature ``build_xxx(input_shape, label_mode, base_filters, depth, dropout,
l2_weight, **arch_specific) -> keras.Model`` and names the model after the architecture.
"""

from __future__ import annotations

from collections.abc import Callable

import keras

from pancreas_seg.models.blocks import LABEL_MODES, output_activation, output_channels
from pancreas_seg.models.fcn import build_fcn
from pancreas_seg.models.names import ARCHITECTURE_NAMES
from pancreas_seg.models.unet import build_unet
from pancreas_seg.models.unet_small import build_unet_small
from pancreas_seg.models.vnet2d import build_vnet2d

__all__ = ["ARCHITECTURES", "LABEL_MODES", "build_model", "output_activation", "output_channels"]

ARCHITECTURES: dict[str, Callable[..., keras.Model]] = {
    "unet": build_unet,
    "unet_small": build_unet_small,
    "fcn": build_fcn,
    "vnet2d": build_vnet2d,
}
if tuple(ARCHITECTURES) != ARCHITECTURE_NAMES:  # pragma: no cover - a programming error
    raise ImportError(f"models.registry builders {tuple(ARCHITECTURES)} != models.names {ARCHITECTURE_NAMES}")


def build_model(
    architecture: str,
    input_shape: tuple[int, int, int],
    label_mode: str = "multiclass",
    **params: object,
) -> keras.Model:
    """Build ``architecture`` (a key of :data:`ARCHITECTURES`) with builder keyword ``params``.

    Returns an uncompiled keras.Model: float32 (B, H, W, C) -> probabilities (B, H, W, 3 or 1).
    Raises ValueError for an unknown architecture name (the message lists the known ones).
    """
    try:
        builder = ARCHITECTURES[architecture]
    except KeyError:
        raise ValueError(
            f"Unknown architecture {architecture!r}; known: {sorted(ARCHITECTURES)}."
        ) from None
    return builder(tuple(input_shape), label_mode, **params)
