"""The forward pass over slices and the way back to the file's grid: the predictor's primitives.

:func:`predict_slices` is the one loop that feeds a Keras model, :func:`to_file_grid` the one
map-back of model-grid probabilities onto a scan's voxel grid (:func:`tumour_probability_to_file_grid`
the same inverse for the tumour probability), and :func:`use_xla` the one switch for XLA.
:class:`ModelGridOutput` is what a forward pass hands to the map-back.
:class:`pancreas_seg.inference.predictor.Predictor` and the cascade's two stages
(:mod:`pancreas_seg.inference.cascade`) are built from them; nothing else calls them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pancreas_seg.core.labels import tumour_channel
from pancreas_seg.imaging.geometry import ScanGeometry
from pancreas_seg.imaging.preprocess import (
    context_stack,
    restore_channel_max,
    restore_channel_volume,
    restore_label_volume,
)


@dataclass(frozen=True)
class ModelGridOutput:
    """Probabilities on a model grid with what maps them back to the file's grid.

    Attributes:
        probabilities: (Z, H, W, C) float32 softmax on the model grid of ``geometry``.
        geometry: the scan's geometry (whole slices, or the cascade's crop grid ``CropGeometry.scan``).
        label_mode: the label mode of the model that produced them (``multiclass``, ``pancreas``, ``tumour``).
    """

    probabilities: np.ndarray
    geometry: ScanGeometry
    label_mode: str


def use_xla(model: Any, enabled: bool = True) -> bool:
    """Compile ``model``'s forward pass with XLA for prediction; returns whether XLA is now used.

    Only the TensorFlow backend needs this: Keras leaves XLA off on CPU-only machines by default,
    yet it made U-Net inference 1.2-1.4x faster on the 2-core CPU (see the inference benchmark).
    JAX always compiles with XLA. Layers that XLA cannot compile make Keras warn and stay eager.
    """
    import keras  # noqa: PLC0415

    if not enabled or keras.backend.backend() != "tensorflow":
        return False
    model.jit_compile = True
    model.predict_function = None  # rebuilt on the next predict call, now with XLA
    return bool(model.jit_compile)


def predict_slices(model: Any, image_slices: np.ndarray, context_slices: int, batch_size: int = 16,
                   flip_tta: bool = False) -> np.ndarray:
    """Model probabilities for every slice.

    Args:
        model: a Keras model mapping (B, H, W, k) float32 -> (B, H, W, C) probabilities.
        image_slices: preprocessed (Z, H, W) input (memmap welcome).
        context_slices: k, as used in training.
        batch_size: slices per forward pass.
        flip_tta: also predict the left-right mirrored slices and average (test-time augmentation).

    Returns:
        float32 (Z, H, W, C).
    """
    n_slices = image_slices.shape[0]
    outputs = []
    for start in range(0, n_slices, batch_size):
        # The last batch is padded to ``batch_size`` (repeating its last slice) so every forward
        # pass has one static shape: no retracing or recompiling per volume length.
        indices = np.minimum(np.arange(start, start + batch_size), n_slices - 1)
        n_real = min(batch_size, n_slices - start)
        batch = context_stack(image_slices, indices, context_slices)
        probs = np.asarray(model.predict_on_batch(batch), dtype=np.float32)
        if flip_tta:
            mirrored = np.asarray(model.predict_on_batch(batch[:, :, ::-1].copy()), dtype=np.float32)
            probs = (probs + mirrored[:, :, ::-1]) / 2
        outputs.append(probs[:n_real])
    return np.concatenate(outputs, axis=0)


def mean_probabilities(probabilities: Iterable[np.ndarray]) -> np.ndarray:
    """The element-wise mean of (Z, H, W, C) float32 arrays (an ensemble's softmax average).

    Summed in place one array at a time, so a generator keeps two arrays in memory whatever
    the number of models; the arrays passed in are not modified.
    """
    total, count = None, 0
    for array in probabilities:
        if total is None:
            total = np.array(array, dtype=np.float32, copy=True)
        else:
            total += array
        count += 1
    if total is None:
        raise ValueError("mean_probabilities needs at least one array")
    total /= count
    return total


def to_file_grid(probabilities: np.ndarray, geometry: ScanGeometry, label_mode: str) -> np.ndarray:
    """(Z, H, W, C) model-grid probabilities -> uint8 MSD labels {0,1,2} of exactly ``geometry.shape``.

    The labels are on the scan's file grid (X, Y, Z in file order) and belong with ``geometry.affine``.
    """
    return restore_label_volume(probabilities, geometry, label_mode)


def tumour_probability_to_file_grid(probabilities: np.ndarray, geometry: ScanGeometry,
                                    label_mode: str) -> np.ndarray | None:
    """(Z, H, W, C) model-grid probabilities -> float32 tumour probability in [0, 1] of exactly
    ``geometry.shape`` (the file grid, with ``geometry.affine``); None for a ``pancreas`` model.

    The geometry inverse of :func:`to_file_grid`, interpolated linearly (not nearest), so a voxel is
    labelled tumour by a ``tumour`` model exactly where this is >= 0.5, and by a ``multiclass``
    model only where it is the largest of the three interpolated class probabilities.
    """
    channel = tumour_channel(label_mode)
    return None if channel is None else restore_channel_volume(probabilities, geometry, channel)


def tumour_score_on_file_grid(probabilities: np.ndarray, geometry: ScanGeometry, label_mode: str) -> float | None:
    """The maximum of :func:`tumour_probability_to_file_grid` (the patient tumour score), computed a
    few slices at a time without the file-grid volume; None for a ``pancreas`` model."""
    channel = tumour_channel(label_mode)
    return None if channel is None else restore_channel_max(probabilities, geometry, channel)
