"""``SliceLoader``: a backend-agnostic ``keras.utils.PyDataset`` over per-case ``.npy`` shards.

* Shards are memory-mapped: RAM stays bounded by a batch, whatever the number of cases.
* Training batches are shuffled and at least ``ceil(foreground_fraction * batch_size)`` slices of
  each batch contain foreground (nnU-Net forces a third); validation is sequential, complete and
  never augmented.
* Batch ``i`` of epoch ``e`` depends only on ``(seed, e, i)``: runs are reproducible and a resumed
  run sees exactly the batches an uninterrupted one would.
* Training batches are ``(images, targets)``, augmented on the host; with
  ``augmentation.on_device`` they are ``(images, labels uint8, draws float32)`` instead, the same
  random draws left for the training step to apply (:mod:`pancreas_seg.learning.device_augmentation`;
  ``fit_with_resume`` does it). Validation batches are always ``(images, targets)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import keras
import numpy as np

from pancreas_seg.imaging.preprocess import context_stack
from pancreas_seg.learning.augmentation import AugmentationConfig, apply_augmentation_numpy, draw_augmentation
from pancreas_seg.learning.device_augmentation import DeviceAugmentation


def encode_targets(labels: np.ndarray, label_mode: str) -> np.ndarray:
    """(B, H, W) uint8 targets -> float32 (B, H, W, 3) one-hot (multiclass) or (B, H, W, 1) binary."""
    if label_mode == "multiclass":
        return np.eye(3, dtype=np.float32)[labels]
    return (labels > 0).astype(np.float32)[..., None]


class CaseSliceDataset(keras.utils.PyDataset):
    """Base of the project's loaders: the slices of per-case ``(image, label)`` arrays, indexed globally.

    Holds the cases (sorted by id), the case and slice of every global slice index, the number of
    batches per epoch and the epoch counter that keys every random choice; subclasses choose the
    slices (and windows) of a batch. See :class:`SliceLoader` and
    :class:`pancreas_seg.cascade.sampler.CropLoader`.

    Args:
        cases: per case, image (Z, H, W) float and label (Z, H, W) uint8 arrays (memmaps welcome).
        batch_size: slices per batch.
        label_mode: ``multiclass`` | ``pancreas`` | ``tumour`` (target encoding).
        training: True = sampled, augmented, ``steps_per_epoch`` batches; False = every slice once.
        context_slices: k neighbouring slices stacked as channels (odd).
        augmentation: applied to training batches only (on the host, or drawn here and applied in
            the training step when ``augmentation.on_device``: see :attr:`augments_on_device`).
        seed: base seed of every random choice.
        steps_per_epoch: training batches per epoch (default: enough to see every slice once).
    """

    def __init__(self, cases: Mapping[str, tuple[np.ndarray, np.ndarray]], batch_size: int, label_mode: str,
                 training: bool, *, context_slices: int = 1, augmentation: AugmentationConfig | None = None,
                 seed: int = 0, steps_per_epoch: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        if not cases:
            raise ValueError(f"{type(self).__name__} needs at least one case")
        self.case_ids = sorted(cases)
        self._images = [cases[c][0] for c in self.case_ids]
        self._labels = [cases[c][1] for c in self.case_ids]
        for case_id, image, label in zip(self.case_ids, self._images, self._labels, strict=True):
            if image.shape != label.shape:
                raise ValueError(f"{case_id}: image shape {image.shape} != label shape {label.shape}")
        self.batch_size = int(batch_size)
        self.label_mode = label_mode
        self.training = training
        self.context_slices = int(context_slices)
        self.augmentation = augmentation or AugmentationConfig(enabled=False)
        self.seed = int(seed)
        self.epoch = 0
        self._case_of = np.concatenate([np.full(len(lab), i) for i, lab in enumerate(self._labels)])
        self._z_of = np.concatenate([np.arange(len(lab)) for lab in self._labels])
        self.n_slices = len(self._case_of)
        self._steps = (int(steps_per_epoch) if training and steps_per_epoch
                       else math.ceil(self.n_slices / self.batch_size))

    def __len__(self) -> int:
        return self._steps

    def slices_whose_label(self, test) -> np.ndarray:
        """Global indices of the slices for which ``test(label_slice_max)`` holds (e.g. ``> 0``)."""
        maxima = [np.asarray(lab).reshape(len(lab), -1).max(axis=1) for lab in self._labels]
        return np.flatnonzero(test(np.concatenate(maxima)))

    def _check_index(self, index: int) -> None:
        if index >= len(self):
            raise IndexError(f"batch {index} out of range ({len(self)} batches)")

    @property
    def augments_on_device(self) -> bool:
        """True when training batches are ``(images, labels uint8, draws float32)`` for the training
        step to augment (:meth:`device_augmentation`), not augmented ``(images, targets)``."""
        return self.training and self.augmentation.enabled and self.augmentation.on_device

    def device_augmentation(self) -> DeviceAugmentation | None:
        """What the training step must apply to this loader's batches (None: they are ready)."""
        return DeviceAugmentation(self.label_mode) if self.augments_on_device else None

    def _finish_batch(self, images: np.ndarray, labels: np.ndarray, index: int) -> tuple[np.ndarray, ...]:
        """The batch ``fit`` receives: training batches augmented with the draws keyed on
        (seed, epoch, batch), on the host or (:attr:`augments_on_device`) in the training step."""
        if not self.training or not self.augmentation.enabled:
            return images, encode_targets(labels, self.label_mode)
        draws = draw_augmentation(self.augmentation, np.random.default_rng([self.seed, self.epoch, index, 1]),
                                  images.shape[0])
        if self.augments_on_device:
            return (np.ascontiguousarray(images, np.float32), np.ascontiguousarray(labels, np.uint8),
                    draws.as_array())
        images, labels = apply_augmentation_numpy(images, labels, draws)
        return images, encode_targets(labels, self.label_mode)

    def on_epoch_end(self) -> None:
        self.epoch += 1


class SliceLoader(CaseSliceDataset):
    """Batches of 2D (or 2.5D) slices and targets from ``{case_id: (image, label)}`` arrays.

    Args (besides those of :class:`CaseSliceDataset`):
        foreground_fraction: minimum share of each training batch that contains foreground.
    """

    def __init__(self, cases: Mapping[str, tuple[np.ndarray, np.ndarray]], batch_size: int,
                 label_mode: str, training: bool, foreground_fraction: float = 1 / 3, **kwargs) -> None:
        super().__init__(cases, batch_size, label_mode, training, **kwargs)
        if not 0.0 <= foreground_fraction <= 1.0:
            raise ValueError(f"foreground_fraction must be in [0, 1], got {foreground_fraction}")
        self.foreground_fraction = float(foreground_fraction)
        self.foreground_slices = self.slices_whose_label(lambda maxima: maxima > 0)

    @property
    def n_foreground_per_batch(self) -> int:
        """Minimum foreground slices in each training batch."""
        if not self.training or self.foreground_slices.size == 0:
            return 0
        return math.ceil(self.foreground_fraction * self.batch_size)

    def batch_indices(self, index: int) -> np.ndarray:
        """Global slice indices of batch ``index`` in the current epoch."""
        if not self.training:
            return np.arange(index * self.batch_size, min((index + 1) * self.batch_size, self.n_slices))
        rng = np.random.default_rng([self.seed, self.epoch, index])
        chosen = rng.choice(self.n_slices, size=self.batch_size, replace=self.batch_size > self.n_slices)
        missing = self.n_foreground_per_batch - int(np.isin(chosen, self.foreground_slices).sum())
        if missing > 0:
            background_positions = np.flatnonzero(~np.isin(chosen, self.foreground_slices))
            chosen[background_positions[:missing]] = rng.choice(self.foreground_slices, size=missing)
        return chosen

    def __getitem__(self, index: int) -> tuple[np.ndarray, ...]:
        self._check_index(index)
        slices = self.batch_indices(index)
        images = np.stack([context_stack(self._images[self._case_of[s]], np.array([self._z_of[s]]),
                                         self.context_slices)[0] for s in slices])
        labels = np.stack([np.asarray(self._labels[self._case_of[s]][self._z_of[s]]) for s in slices])
        return self._finish_batch(images, labels, index)
