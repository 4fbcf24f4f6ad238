"""Training-time augmentation of 2D slices: what is drawn, and how it is applied on the host.

Spatial transforms (flip, rotation, scaling) move image and label together; intensity jitter
touches the image only. Validation and inference never augment.

Augmentation is split in two steps so that the same random draws can be applied on the host
(NumPy/SciPy, here) or on the accelerator inside the training step
(:mod:`pancreas_seg.learning.device_augmentation`, ``keras.ops``):

* :func:`draw_augmentation` consumes a NumPy generator per sample, in a fixed order (flip?,
  spatial?, angle, scale, intensity?, multiplier, shift), and returns :class:`AugmentationDraws`;
* :func:`apply_augmentation_numpy` applies them with ``scipy.ndimage.affine_transform``;
* :meth:`AugmentationDraws.as_array` encodes them as one float32 row per sample for the device.

:func:`augment_batch` (draw + apply on the host) gives byte-for-byte the batches of earlier
versions for the same generator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class AugmentationConfig:
    """``params:training.augmentation``."""

    enabled: bool = True
    flip_probability: float = 0.5          # left-right flip
    spatial_probability: float = 0.5       # chance of a rotation + scaling
    rotation_deg: float = 10.0             # max |rotation|, degrees
    scale_range: tuple[float, float] = (0.9, 1.1)  # zoom factor range
    intensity_probability: float = 0.5     # chance of intensity jitter
    intensity_scale: float = 0.1           # multiplicative jitter: x * U(1 - s, 1 + s)
    intensity_shift: float = 0.05          # additive jitter in normalised units: + U(-s, s)
    on_device: bool = False                # apply the draws in the training step (keras.ops), not on the host

    @classmethod
    def from_params(cls, params: dict[str, Any] | None) -> AugmentationConfig:
        params = dict(params or {})
        if "scale_range" in params:
            params["scale_range"] = tuple(params["scale_range"])
        return cls(**params)


#: The columns of :meth:`AugmentationDraws.as_array`, one row per sample. Output pixel
#: ``o = (row, col)`` of a sample samples its input at ``A @ (o - c) + c`` (``A`` = ``a_rr a_rc;
#: a_cr a_cc``, ``c`` the slice centre ``((H - 1) / 2, (W - 1) / 2)``; the flip is folded into
#: ``A``), then the image becomes ``image * intensity_multiplier + intensity_shift``.
DRAW_COLUMNS = ("a_rr", "a_rc", "a_cr", "a_cc", "intensity_multiplier", "intensity_shift")


@dataclass(frozen=True)
class AugmentationDraws:
    """The random choices of one batch, per sample (arrays of length B)."""

    flip: np.ndarray              # bool: left-right flip
    spatial: np.ndarray           # bool: rotation + scaling
    angle_deg: np.ndarray         # float64 rotation, degrees (0 without spatial)
    scale: np.ndarray             # float64 zoom factor (1 without spatial)
    intensity: np.ndarray         # bool: intensity jitter
    intensity_multiplier: np.ndarray  # float32 (1 without jitter)
    intensity_shift: np.ndarray       # float32 (0 without jitter)

    @classmethod
    def identity(cls, batch_size: int) -> AugmentationDraws:
        """Draws that change nothing."""
        no = np.zeros(batch_size, bool)
        return cls(no, no.copy(), np.zeros(batch_size), np.ones(batch_size), no.copy(),
                   np.ones(batch_size, np.float32), np.zeros(batch_size, np.float32))

    def __len__(self) -> int:
        return len(self.flip)

    def sampling_matrices(self) -> np.ndarray:
        """(B, 2, 2) float64 ``A``: output pixel ``o`` samples the input at ``A @ (o - c) + c``.

        ``scipy.ndimage.affine_transform`` with matrix ``M = R(angle) / scale`` and offset
        ``c - M c`` samples at ``M (o - c) + c``; a preceding left-right flip maps input column
        ``w`` to ``W - 1 - w = -(w - c_w) + c_w``, so ``A = diag(1, -1) @ M``.
        """
        theta = np.deg2rad(self.angle_deg)
        cos, sin = np.cos(theta), np.sin(theta)
        matrices = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2) / self.scale[:, None, None]
        matrices[~self.spatial] = np.eye(2)
        matrices[self.flip, 1, :] *= -1
        return matrices

    def as_array(self) -> np.ndarray:
        """(B, len(DRAW_COLUMNS)) float32: the draws as the device applies them (see DRAW_COLUMNS)."""
        matrices = self.sampling_matrices().reshape(len(self), 4)
        return np.concatenate([matrices, self.intensity_multiplier[:, None], self.intensity_shift[:, None]],
                              axis=1).astype(np.float32)


def draw_augmentation(config: AugmentationConfig, rng: np.random.Generator, batch_size: int) -> AugmentationDraws:
    """The random choices for ``batch_size`` samples; nothing is drawn when ``config`` is disabled.

    Per sample, in this order: ``random()`` (flip), ``random()`` (spatial), if spatial
    ``uniform`` angle and ``uniform`` scale, ``random()`` (intensity), if intensity ``uniform``
    multiplier and ``uniform`` shift.
    """
    draws = AugmentationDraws.identity(batch_size)
    if not config.enabled:
        return draws
    for i in range(batch_size):
        draws.flip[i] = rng.random() < config.flip_probability
        if rng.random() < config.spatial_probability:
            draws.spatial[i] = True
            draws.angle_deg[i] = rng.uniform(-config.rotation_deg, config.rotation_deg)
            draws.scale[i] = rng.uniform(*config.scale_range)
        if rng.random() < config.intensity_probability:
            draws.intensity[i] = True
            draws.intensity_multiplier[i] = np.float32(rng.uniform(1 - config.intensity_scale,
                                                                   1 + config.intensity_scale))
            draws.intensity_shift[i] = np.float32(rng.uniform(-config.intensity_shift, config.intensity_shift))
    return draws


def _rotation_scaling(image: np.ndarray, label: np.ndarray, angle_deg: float,
                      scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Rotate/scale (H, W, C) image (linear) and (H, W) label (nearest) about the slice centre.

    Outside the slice the image takes its own minimum (before intensity jitter), the label 0.
    """
    theta = np.deg2rad(angle_deg)
    matrix = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]]) / scale
    centre = (np.array(label.shape, dtype=np.float64) - 1) / 2
    offset = centre - matrix @ centre
    out_image = np.empty_like(image)
    fill = float(image.min())
    for c in range(image.shape[-1]):
        out_image[..., c] = ndimage.affine_transform(image[..., c], matrix, offset, order=1,
                                                     mode="constant", cval=fill)
    out_label = ndimage.affine_transform(label, matrix, offset, order=0, mode="constant", cval=0)
    return out_image, out_label


def apply_augmentation_numpy(images: np.ndarray, labels: np.ndarray,
                             draws: AugmentationDraws) -> tuple[np.ndarray, np.ndarray]:
    """Apply ``draws`` on the host: ``images`` float32 (B, H, W, C), ``labels`` uint8 (B, H, W); copies."""
    if len(draws) != images.shape[0]:
        raise ValueError(f"{len(draws)} draws for a batch of {images.shape[0]}")
    images, labels = images.copy(), labels.copy()
    for i in range(images.shape[0]):
        if draws.flip[i]:
            images[i], labels[i] = images[i, :, ::-1], labels[i, :, ::-1]
        if draws.spatial[i]:
            images[i], labels[i] = _rotation_scaling(images[i], labels[i], float(draws.angle_deg[i]),
                                                     float(draws.scale[i]))
        if draws.intensity[i]:
            images[i] *= draws.intensity_multiplier[i]
            images[i] += draws.intensity_shift[i]
    return images, labels


def augment_batch(images: np.ndarray, labels: np.ndarray, config: AugmentationConfig,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Augment a batch on the host. ``images`` float32 (B, H, W, C), ``labels`` uint8 (B, H, W); returns
    copies (the inputs themselves when ``config`` is disabled)."""
    if not config.enabled:
        return images, labels
    return apply_augmentation_numpy(images, labels, draw_augmentation(config, rng, images.shape[0]))
