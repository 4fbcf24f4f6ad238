"""Training-time augmentation on the accelerator: the host's draws applied with ``keras.ops`` inside
the model's training step (any Keras backend; jit-compiled with the step; no Kedro imports).

In this mode (``training.augmentation.on_device: true``) a training loader sends
``(images float32 (B, H, W, C), labels uint8 (B, H, W), draws float32 (B, K))``: the slices as
stored, the training targets as class indices and, per sample, the random choices of
:func:`pancreas_seg.learning.augmentation.draw_augmentation` encoded by
:meth:`~pancreas_seg.learning.augmentation.AugmentationDraws.as_array`, drawn from the same
generators as on the host, so the same batches see the same transforms and a resumed run stays
exact. :func:`augmentation_in_train_step` wraps the model's ``train_step`` so that
:class:`DeviceAugmentation` turns that triple into ``(augmented images, one-hot/binary targets)``
before the step's forward pass; evaluation, prediction and the saved model are untouched.

:func:`apply_augmentation` reproduces
:func:`pancreas_seg.learning.augmentation.apply_augmentation_numpy` (``scipy.ndimage.affine_transform``
with ``mode="constant"``): bilinear image sampling (order 1), nearest labels (order 0, half rounds
up), a sample coordinate outside ``[0, n - 1]`` in either axis gives the fill (the sample's own
minimum before jitter for the image, 0 for the label), then ``image * multiplier + shift``. The
sampling coordinates are float32 here and float64 in SciPy: they differ by about 1e-5 px at 256 px,
so values agree to about 1e-5 px times the local image gradient, except at ties (a coordinate within
that distance of an edge of the slice, or of a half pixel for the labels); see
tests/learning/test_device_augmentation.py. Every gather is per sample (``take_along_axis`` along
the pixels of each row of the batch), so a batch split over devices (``keras.distribution``
data parallelism) is augmented where it lies.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import keras
import numpy as np
from keras import ops

from pancreas_seg.learning.augmentation import DRAW_COLUMNS

N_DRAW_COLUMNS = len(DRAW_COLUMNS)
N_CLASSES = 3  # background, pancreas, tumour (multiclass targets)


def _sampling_coordinates(draws, height: int, width: int):
    """(B, H, W) float32 row and column coordinates where each output pixel samples its input."""
    centre_row, centre_col = (height - 1) / 2, (width - 1) / 2
    rows = ops.reshape(ops.arange(height, dtype="float32") - centre_row, (1, height, 1))
    cols = ops.reshape(ops.arange(width, dtype="float32") - centre_col, (1, 1, width))

    def column(k: int):
        return ops.reshape(draws[:, k], (-1, 1, 1))

    source_rows = column(0) * rows + column(1) * cols + centre_row
    source_cols = column(2) * rows + column(3) * cols + centre_col
    return source_rows, source_cols


def _gather_pixels(flat, pixel_index, channels: int):
    """Per sample, ``flat`` (B, H*W*C) at the pixels ``pixel_index`` (B, H, W) int32 -> (B, H, W, C)."""
    batch, height, width = pixel_index.shape[0], pixel_index.shape[1], pixel_index.shape[2]
    if channels == 1:
        index = ops.reshape(pixel_index, (-1, height * width))
    else:
        index = ops.expand_dims(pixel_index, -1) * channels + ops.arange(channels, dtype="int32")
        index = ops.reshape(index, (-1, height * width * channels))
    values = ops.take_along_axis(flat, index, axis=1)
    return ops.reshape(values, (-1 if batch is None else batch, height, width, channels))


def apply_augmentation(images, labels, draws):
    """Augment a batch with ``keras.ops``: ``images`` float32 (B, H, W, C), ``labels`` integer (B, H, W),
    ``draws`` float32 (B, len(DRAW_COLUMNS)); returns (images float32, labels int32)."""
    images = ops.convert_to_tensor(images, "float32")
    labels = ops.cast(labels, "int32")
    draws = ops.convert_to_tensor(draws, "float32")
    _, height, width, channels = images.shape
    if height is None or width is None or channels is None:
        raise ValueError(f"device augmentation needs static H, W and C, got images of shape {images.shape}")
    source_rows, source_cols = _sampling_coordinates(draws, height, width)
    inside = ops.logical_and(
        ops.logical_and(source_rows >= 0.0, source_rows <= float(height - 1)),
        ops.logical_and(source_cols >= 0.0, source_cols <= float(width - 1)))

    # Labels: nearest neighbour (SciPy order 0 rounds half up), 0 outside.
    nearest_rows = ops.clip(ops.cast(ops.floor(source_rows + 0.5), "int32"), 0, height - 1)
    nearest_cols = ops.clip(ops.cast(ops.floor(source_cols + 0.5), "int32"), 0, width - 1)
    flat_labels = ops.reshape(labels, (-1, height * width))
    out_labels = _gather_pixels(flat_labels, nearest_rows * width + nearest_cols, 1)[..., 0]
    out_labels = ops.where(inside, out_labels, ops.zeros_like(out_labels))

    # Image: bilinear (SciPy order 1) between the 4 neighbours, the sample's minimum outside.
    floor_rows, floor_cols = ops.floor(source_rows), ops.floor(source_cols)
    frac_rows = ops.expand_dims(source_rows - floor_rows, -1)
    frac_cols = ops.expand_dims(source_cols - floor_cols, -1)
    row0 = ops.clip(ops.cast(floor_rows, "int32"), 0, height - 1)
    col0 = ops.clip(ops.cast(floor_cols, "int32"), 0, width - 1)
    row1, col1 = ops.minimum(row0 + 1, height - 1), ops.minimum(col0 + 1, width - 1)
    flat_images = ops.reshape(images, (-1, height * width * channels))

    def corner(rows, cols):
        return _gather_pixels(flat_images, rows * width + cols, channels)

    top = corner(row0, col0) * (1.0 - frac_cols) + corner(row0, col1) * frac_cols
    bottom = corner(row1, col0) * (1.0 - frac_cols) + corner(row1, col1) * frac_cols
    interpolated = top * (1.0 - frac_rows) + bottom * frac_rows
    fill = ops.reshape(ops.min(images, axis=(1, 2, 3)), (-1, 1, 1, 1))
    out_images = ops.where(ops.expand_dims(inside, -1), interpolated, fill)

    multiplier = ops.reshape(draws[:, 4], (-1, 1, 1, 1))
    shift = ops.reshape(draws[:, 5], (-1, 1, 1, 1))
    return out_images * multiplier + shift, out_labels


def encode_targets(labels, label_mode: str):
    """``keras.ops`` twin of :func:`pancreas_seg.learning.loader.encode_targets`: (B, H, W) class indices
    -> float32 (B, H, W, 3) one-hot (multiclass) or (B, H, W, 1) binary."""
    if label_mode == "multiclass":
        return ops.one_hot(ops.cast(labels, "int32"), N_CLASSES, dtype="float32")
    return ops.expand_dims(ops.cast(labels > 0, "float32"), -1)


def target_channels(label_mode: str) -> int:
    return N_CLASSES if label_mode == "multiclass" else 1


class DeviceAugmentation:
    """A training batch ``(images, labels, draws)`` -> ``(augmented images, targets)`` with ``keras.ops``."""

    def __init__(self, label_mode: str) -> None:
        self.label_mode = label_mode

    def __call__(self, data: Sequence[Any]) -> tuple[Any, Any]:
        if not isinstance(data, (tuple, list)) or len(data) != 3:
            raise ValueError("device augmentation expects training batches (images, labels, draws); got "
                             f"{type(data).__name__} of length {len(data) if isinstance(data, (tuple, list)) else '?'}")
        images, labels, draws = data
        images, labels = apply_augmentation(images, labels, draws)
        return images, encode_targets(labels, self.label_mode)

    def example_output(self, batch: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Zero arrays shaped like what :meth:`__call__` returns for the host ``batch`` (for Keras' build)."""
        images, labels, _ = batch
        return (np.zeros(np.shape(images), np.float32),
                np.zeros((*np.shape(labels), target_channels(self.label_mode)), np.float32))


@contextmanager
def augmentation_in_train_step(model: keras.Model, transform: DeviceAugmentation,
                               example_batch: Sequence[np.ndarray]) -> Iterator[keras.Model]:
    """While open, ``model.fit`` applies ``transform`` to every training batch inside its (compiled)
    training step; ``example_batch`` is one batch of the training loader.

    The wrapper is an instance attribute over ``train_step`` (JAX: ``train_step(state, data)``,
    TensorFlow/torch: ``train_step(data)``), so it works for a freshly built and a restored model
    alike and is never saved. Keras builds the compiled loss and metrics from the first batch of
    ``fit`` before the step runs (JAX, torch); the loader's triple is not what they see, so they are
    built here from the transform's output shapes (Keras' ``_symbolic_build``, as ``fit`` does).
    """
    if "train_step" in vars(model):
        raise RuntimeError("the model's train_step is already wrapped")
    if keras.config.is_nnx_enabled():  # Keras' JAX trainer then calls type(model).train_step, not ours
        raise RuntimeError("training.augmentation.on_device does not support Keras' Flax NNX mode "
                           "(keras.config.is_nnx_enabled()); set it to false")
    original = model.train_step

    def train_step(*args: Any):
        *state, data = args
        return original(*state, transform(data))

    model._symbolic_build(data_batch=transform.example_output(example_batch))  # noqa: SLF001 - see docstring
    model.train_step = train_step
    model.train_function = None  # a step function made before would not apply the transform
    try:
        yield model
    finally:
        del model.train_step
        model.train_function = None


def train_step_augmentation(model: keras.Model, train_data: keras.utils.PyDataset,
                            fit_data: keras.utils.PyDataset | None = None) -> AbstractContextManager:
    """The context in which ``model.fit(fit_data, ...)`` trains on ``train_data``'s batches: its
    training step augments them when the loader augments on the device (``augmentation.on_device``,
    ``train_data.device_augmentation()``); nothing changes for any other loader.

    ``fit_data`` is what ``fit`` receives when it is not ``train_data`` itself (a per-process share
    of it in multi-process data parallelism). Use it around every ``fit`` of the project's loaders::

        with train_step_augmentation(model, train_loader):
            model.fit(train_loader, validation_data=validation_loader, ...)
    """
    transform_of = getattr(train_data, "device_augmentation", None)
    transform = transform_of() if transform_of is not None else None
    if transform is None:
        return nullcontext(model)
    return augmentation_in_train_step(model, transform, (train_data if fit_data is None else fit_data)[0])
