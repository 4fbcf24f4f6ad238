"""Training-time augmentation of 2D slices (NumPy/SciPy, so it is independent of the Keras backend).

Spatial transforms (flip, rotation, scaling) move image and label together; intensity jitter
touches the image only. Validation and inference never augment.
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

    @classmethod
    def from_params(cls, params: dict[str, Any] | None) -> AugmentationConfig:
        params = dict(params or {})
        if "scale_range" in params:
            params["scale_range"] = tuple(params["scale_range"])
        return cls(**params)


def _rotation_scaling(image: np.ndarray, label: np.ndarray, angle_deg: float,
                      scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Rotate/scale (H, W, C) image (linear) and (H, W) label (nearest) about the slice centre."""
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


def augment_batch(images: np.ndarray, labels: np.ndarray, config: AugmentationConfig,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Augment a batch. ``images`` float32 (B, H, W, C), ``labels`` uint8 (B, H, W); returns copies."""
    if not config.enabled:
        return images, labels
    images, labels = images.copy(), labels.copy()
    for i in range(images.shape[0]):
        if rng.random() < config.flip_probability:
            images[i], labels[i] = images[i, :, ::-1], labels[i, :, ::-1]
        if rng.random() < config.spatial_probability:
            angle = rng.uniform(-config.rotation_deg, config.rotation_deg)
            scale = rng.uniform(*config.scale_range)
            images[i], labels[i] = _rotation_scaling(images[i], labels[i], angle, scale)
        if rng.random() < config.intensity_probability:
            images[i] *= np.float32(rng.uniform(1 - config.intensity_scale, 1 + config.intensity_scale))
            images[i] += np.float32(rng.uniform(-config.intensity_shift, config.intensity_shift))
    return images, labels
