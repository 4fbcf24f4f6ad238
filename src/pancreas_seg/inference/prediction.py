"""Slice-wise prediction and reassembly into label volumes on the original NIfTI grid.

Used by the evaluation pipeline (from preprocessed shards) and the inference pipeline (from raw
files); both go through :func:`pancreas_seg.imaging.preprocess.preprocess_image` and
:func:`pancreas_seg.imaging.preprocess.restore_label_volume` with the scan's one
:class:`pancreas_seg.imaging.geometry.ScanGeometry`, so there is one code path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pancreas_seg.evaluation.postprocessing import keep_largest_foreground
from pancreas_seg.imaging.geometry import ScanGeometry
from pancreas_seg.imaging.intensity import ForegroundIntensityStats
from pancreas_seg.imaging.preprocess import (
    PreprocessingConfig,
    context_stack,
    preprocess_image,
    restore_label_volume,
)


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


def average_probabilities(models: Sequence[Any], image_slices: np.ndarray, context_slices: int,
                          batch_size: int = 16, flip_tta: bool = False) -> np.ndarray:
    """The mean of :func:`predict_slices` over ``models`` (a fold ensemble): float32 (Z, H, W, C).

    The models must share one input shape and label mode (see ``model_card.check_fold_ensemble``).
    Probabilities are summed in place, so memory holds two (Z, H, W, C) arrays whatever the
    number of models.
    """
    if not models:
        raise ValueError("average_probabilities needs at least one model")
    total = predict_slices(models[0], image_slices, context_slices, batch_size, flip_tta)
    for model in models[1:]:
        total += predict_slices(model, image_slices, context_slices, batch_size, flip_tta)
    total /= len(models)
    return total


def labels_from_probabilities(probabilities: np.ndarray, geometry: ScanGeometry, label_mode: str,
                              keep_largest_component: bool = False) -> np.ndarray:
    """(Z, H, W, C) probabilities -> uint8 MSD labels {0,1,2} of exactly ``geometry.shape`` (X, Y, Z).

    Save the result with ``geometry.affine``.
    """
    labels = restore_label_volume(probabilities, geometry, label_mode)
    return keep_largest_foreground(labels) if keep_largest_component else labels


def segment_volume(model: Any | Sequence[Any], hu: np.ndarray, affine: np.ndarray, config: PreprocessingConfig,
                   stats: ForegroundIntensityStats | None = None, batch_size: int = 16,
                   flip_tta: bool = False, keep_largest_component: bool = False) -> np.ndarray:
    """Raw CT (X, Y, Z) HU in file order, any axis order -> uint8 labels of exactly the input's shape.

    ``model`` is one Keras model or a sequence of them (a fold ensemble: softmax averaged). The
    scan's geometry is planned once from ``hu.shape``/``affine`` (and the body when
    ``config.crop_to_body``); the labels belong with ``affine``.
    """
    image, geometry = preprocess_image(hu, affine, config, stats)
    models = list(model) if isinstance(model, Sequence) else [model]
    probabilities = average_probabilities(models, image, config.context_slices, batch_size, flip_tta)
    return labels_from_probabilities(probabilities, geometry, config.label_mode, keep_largest_component)
