"""``CropLoader``: stage-2 batches of fixed-size windows from per-case cascade crops.

Training crops are stored around the TRUE pancreas with a context margin. Each training window is
placed where stage 1 would put it: at the crop centre, shifted by Gaussian position jitter whose
standard deviation is stage 1's measured centre error (:mod:`pancreas_seg.cascade.localisation`),
and, when the pancreas plus margin is wider than a window (inference then tiles), uniformly across
that width. A share ``tumour_fraction`` of every batch (rounded up) is guaranteed to show tumour:
those windows are centred near a random tumour pixel of a tumour slice. Validation windows sit at
the crop centre, every slice, no jitter or augmentation.

Batch ``i`` of epoch ``e`` depends only on ``(seed, e, i)``, as in
:class:`pancreas_seg.learning.loader.SliceLoader`: reproducible and resume-exact.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from pancreas_seg.cascade.crops import extract_window
from pancreas_seg.core.labels import TUMOUR, to_training_target
from pancreas_seg.imaging.preprocess import context_stack
from pancreas_seg.learning.loader import CaseSliceDataset


class CropLoader(CaseSliceDataset):
    """Batches of (B, *window_hw, k) stage-2 inputs and their targets.

    Args (besides those of :class:`~pancreas_seg.learning.loader.CaseSliceDataset`, whose
    ``cases`` are here each case's crop, its labels the MSD values 0/1/2, H and W at least
    ``window_hw``):
        window_hw: stage-2 input (H, W), px.
        slack_px: per case, the (H, W) half-width in px over which a window may slide because the
            pancreas plus margin is wider than the window (0 when it fits).
        jitter_std_px: (H, W) standard deviation of the window position jitter, px.
        tumour_fraction: minimum share of each training batch whose window shows tumour.
        fill_value: model-input value outside the stored crop (normalised air).
    """

    def __init__(self, cases: Mapping[str, tuple[np.ndarray, np.ndarray]], window_hw: tuple[int, int],
                 batch_size: int, label_mode: str, training: bool, *,
                 slack_px: Mapping[str, tuple[int, int]] | None = None,
                 jitter_std_px: tuple[float, float] = (0.0, 0.0), tumour_fraction: float = 0.5,
                 fill_value: float = 0.0, **kwargs) -> None:
        super().__init__(cases, batch_size, label_mode, training, **kwargs)
        if not 0.0 <= tumour_fraction <= 1.0:
            raise ValueError(f"tumour_fraction must be in [0, 1], got {tumour_fraction}")
        self.window_hw = (int(window_hw[0]), int(window_hw[1]))
        for case_id, image in zip(self.case_ids, self._images, strict=True):
            if image.shape[1] < self.window_hw[0] or image.shape[2] < self.window_hw[1]:
                raise ValueError(f"{case_id}: crop {image.shape[1:]} is smaller than the window {self.window_hw}")
        slack = slack_px or {}
        self._slack = [tuple(int(v) for v in slack.get(c, (0, 0))) for c in self.case_ids]
        self.jitter_std_px = (float(jitter_std_px[0]), float(jitter_std_px[1]))
        self.tumour_fraction = float(tumour_fraction)
        self.fill_value = float(fill_value)
        self.tumour_slices = self.slices_whose_label(lambda maxima: maxima == TUMOUR)

    @property
    def n_tumour_per_batch(self) -> int:
        """Windows showing tumour guaranteed in each training batch (0 without tumour slices)."""
        if not self.training or self.tumour_slices.size == 0:
            return 0
        return math.ceil(self.tumour_fraction * self.batch_size)

    def _centred_top_left(self, case: int) -> tuple[int, int]:
        _, height, width = self._images[case].shape
        return (height - self.window_hw[0]) // 2, (width - self.window_hw[1]) // 2

    def window_positions(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Global slice indices (B,) and window top-left corners (B, 2) of batch ``index``."""
        if not self.training:
            slices = np.arange(index * self.batch_size, min((index + 1) * self.batch_size, self.n_slices))
            return slices, np.asarray([self._centred_top_left(int(self._case_of[s])) for s in slices])
        rng = np.random.default_rng([self.seed, self.epoch, index])
        slices = rng.choice(self.n_slices, size=self.batch_size, replace=self.batch_size > self.n_slices)
        n_tumour = self.n_tumour_per_batch
        if n_tumour:
            slices[:n_tumour] = rng.choice(self.tumour_slices, size=n_tumour)
        corners = np.empty((len(slices), 2), dtype=np.int64)
        half = np.asarray(self.window_hw) // 2
        for i, s in enumerate(slices):
            case, z = int(self._case_of[s]), int(self._z_of[s])
            if i < n_tumour:  # centred near a tumour pixel: the window always shows it
                rows, cols = np.nonzero(np.asarray(self._labels[case][z]) == TUMOUR)
                pick = rng.integers(len(rows))
                quarter = half // 2
                centre = (np.array([rows[pick], cols[pick]])
                          + rng.integers(-quarter, quarter + 1, size=2))
                corners[i] = centre - half
            else:
                top_left = np.asarray(self._centred_top_left(case), dtype=np.float64)
                slack = np.asarray(self._slack[case], dtype=np.float64)
                shift = rng.uniform(-slack, slack) + rng.normal(0.0, 1.0, size=2) * self.jitter_std_px
                corners[i] = np.round(top_left + shift).astype(np.int64)
        return slices, corners

    def __getitem__(self, index: int) -> tuple[np.ndarray, ...]:
        self._check_index(index)
        slices, corners = self.window_positions(index)
        images, labels = [], []
        for s, (top, left) in zip(slices, corners, strict=True):
            case, z = int(self._case_of[s]), int(self._z_of[s])
            stack = context_stack(self._images[case], np.array([z]), self.context_slices)
            images.append(extract_window(stack, int(top), int(left), self.window_hw, self.fill_value)[0])
            label = np.asarray(self._labels[case][z])[None]
            labels.append(extract_window(label, int(top), int(left), self.window_hw, 0)[0])
        batch_images = np.stack(images).astype(np.float32, copy=False)
        batch_labels = to_training_target(np.stack(labels), self.label_mode)
        return self._finish_batch(batch_images, batch_labels, index)
