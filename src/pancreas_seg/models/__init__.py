"""Segmentation architectures (U-Net, simplified U-Net, FCN-8s, 2D V-Net) built from shared blocks.

Use :func:`pancreas_seg.models.registry.build_model` to build one by name. The names below are
loaded lazily, so importing a Keras-free submodule such as ``pancreas_seg.models.names`` does not
import Keras (and TensorFlow).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["ARCHITECTURES", "LABEL_MODES", "build_model", "output_activation", "output_channels"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("pancreas_seg.models.registry"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
