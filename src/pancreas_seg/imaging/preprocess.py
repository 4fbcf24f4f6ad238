"""The one preprocessing path shared by training, evaluation and inference.

``hu volume (X, Y, Z), affine``  ->  plan the scan's :class:`ScanGeometry` once (header, and the
body box when framing on the body)  ->  reorient to axial slices (Z, H, W), in-plane resample and
crop/pad to the model grid  ->  HU normalisation  ->  float32/float16 model input.

The same :class:`ScanGeometry` maps model output back onto the original file's voxel grid
(:func:`restore_label_volume`); the preprocessing pipeline stores it per case as JSON.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from pancreas_seg.core.labels import (
    check_label_mode,
    output_channels,
    probabilities_to_labels,
    to_training_target,
)
from pancreas_seg.imaging.geometry import ScanGeometry, axial_view
from pancreas_seg.imaging.intensity import ForegroundIntensityStats, normalise_hu
from pancreas_seg.imaging.nifti_io import load_nifti, read_nifti_header
from pancreas_seg.imaging.resize import body_bounding_box

__all__ = ["AIR_HU", "PreprocessedCase", "PreprocessingConfig", "ScanGeometry", "axial_view",
           "context_stack", "intensity_stats_from_dict", "plan_case_geometry", "plan_scan_geometry",
           "preprocess_case", "preprocess_crop_image", "preprocess_image", "preprocess_label",
           "restore_label_volume"]

AIR_HU = -1024.0  # fill value for padding outside the scanned field of view, HU


@dataclass(frozen=True)
class PreprocessingConfig:
    """Preprocessing settings (``params:preprocessing`` in conf/*/parameters_preprocessing.yml)."""

    image_size_px: tuple[int, int]
    intensity_mode: str = "window"
    window_hu: tuple[float, float] = (-100.0, 240.0)
    target_spacing_mm: float | None = None
    crop_to_body: bool = False
    body_threshold_hu: float = -500.0
    body_margin_mm: float = 10.0
    label_mode: str = "multiclass"
    image_dtype: str = "float32"
    context_slices: int = 1

    def __post_init__(self) -> None:
        check_label_mode(self.label_mode)
        if self.image_dtype not in ("float32", "float16"):
            raise ValueError(f"image_dtype must be float32 or float16, got {self.image_dtype!r}")
        if self.context_slices < 1 or self.context_slices % 2 == 0:
            raise ValueError(f"context_slices must be an odd number >= 1, got {self.context_slices}")

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> PreprocessingConfig:
        """Build from the ``preprocessing`` parameter dictionary."""
        size = params["image_size_px"]
        size = (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))
        spacing = params.get("target_spacing_mm")
        return cls(
            image_size_px=size,
            intensity_mode=params.get("intensity", {}).get("mode", "window"),
            window_hu=tuple(float(v) for v in params.get("intensity", {}).get("window_hu", (-100, 240))),
            target_spacing_mm=None if spacing is None else float(spacing),
            crop_to_body=bool(params.get("crop_to_body", False)),
            body_threshold_hu=float(params.get("body_threshold_hu", -500.0)),
            body_margin_mm=float(params.get("body_margin_mm", 10.0)),
            label_mode=params.get("label_mode", "multiclass"),
            image_dtype=params.get("image_dtype", "float32"),
            context_slices=int(params.get("context_slices", 1)),
        )

    @property
    def num_classes(self) -> int:
        """Model output channels: 3 (softmax) for multiclass, 1 (sigmoid) otherwise."""
        return output_channels(self.label_mode)


def plan_scan_geometry(shape: tuple[int, ...], affine: np.ndarray, config: PreprocessingConfig,
                       hu: np.ndarray | None = None) -> ScanGeometry:
    """Plan the :class:`ScanGeometry` of a volume of ``shape`` (X, Y, Z) with ``affine``.

    With ``config.crop_to_body`` the in-plane grid is centred on (and, without a target spacing,
    scaled to) the body, found in ``hu``: the (X, Y, Z) HU volume in file order, required then.
    A volume without any body voxel falls back to the whole slice.
    """
    body_box = None
    if config.crop_to_body:
        if hu is None:
            raise ValueError("crop_to_body needs the HU volume to find the body")
        body_box = body_bounding_box(axial_view(np.asarray(hu), affine), config.body_threshold_hu)
    return ScanGeometry.plan(shape, affine, config.image_size_px,
                             target_spacing_mm=config.target_spacing_mm, body_box_hw=body_box,
                             body_margin_mm=config.body_margin_mm)


def preprocess_image(hu: np.ndarray, affine: np.ndarray, config: PreprocessingConfig,
                     stats: ForegroundIntensityStats | None = None,
                     geometry: ScanGeometry | None = None) -> tuple[np.ndarray, ScanGeometry]:
    """HU volume (X, Y, Z) in file order -> model input (Z, H, W) in ``config.image_dtype``.

    Args:
        hu: Hounsfield units, any numeric dtype (cast to float32 first).
        affine: the file's voxel -> mm affine (4, 4).
        config: preprocessing settings.
        stats: training foreground statistics, required for ``intensity_mode == "zscore"``.
        geometry: the scan's geometry if already planned (the preprocessing pipeline plans it
            once per case); planned here otherwise. Must match ``hu.shape`` and ``affine``.

    Returns:
        The model input and the geometry it was made with.
    """
    if hu.ndim != 3:
        raise ValueError(f"expected a 3D HU volume, got shape {hu.shape}")
    if geometry is None:
        geometry = plan_scan_geometry(hu.shape, affine, config, hu=hu)
    else:
        geometry.check_header(hu.shape, affine, "HU volume")
        if tuple(geometry.grid.output_hw) != tuple(config.image_size_px):
            raise ValueError(f"geometry was planned for {geometry.grid.output_hw} px, the config "
                             f"asks for {config.image_size_px}")
    slices = geometry.image_to_model(hu, fill_value=AIR_HU)
    image = normalise_hu(slices, config.intensity_mode, config.window_hu, stats)
    return image.astype(config.image_dtype, copy=False), geometry


def preprocess_label(label: np.ndarray, geometry: ScanGeometry, label_mode: str) -> np.ndarray:
    """Label volume (X, Y, Z) in file order -> (Z, H, W) uint8 targets on the model grid (nearest)."""
    return to_training_target(geometry.label_to_model(np.asarray(label)), label_mode)


#: Slices restored per step in :func:`restore_label_volume` (bounds its memory, not its result).
_RESTORE_CHUNK_SLICES = 8


def restore_label_volume(probabilities: np.ndarray, geometry: ScanGeometry,
                         label_mode: str) -> np.ndarray:
    """(Z, H, W, C) model probabilities -> uint8 MSD label map on the original (X, Y, Z) grid.

    The result has exactly ``geometry.shape`` and belongs with ``geometry.affine``.

    Slices whose every pixel is strictly background on the model grid are not interpolated: a
    linear interpolation is a convex combination, so it keeps "background wins" strict and these
    slices stay background at source resolution. The result equals interpolating every slice.
    """
    probs = np.asarray(probabilities, dtype=np.float32)
    if probs.ndim != 4 or tuple(probs.shape[:3]) != geometry.model_shape:
        raise ValueError(f"probabilities {probs.shape} do not fit the geometry's model grid "
                         f"(Z, H, W) = {geometry.model_shape}")
    if label_mode == "multiclass":
        background = probs[..., 0] > probs[..., 1:].max(axis=-1)
    else:
        background = probs[..., 0] < 0.5
    active = np.flatnonzero(~background.reshape(len(probs), -1).all(axis=1))
    labels = np.zeros(geometry.slice_shape, dtype=np.uint8)
    for start in range(0, len(active), _RESTORE_CHUNK_SLICES):
        # a few slices at a time: full-volume float32 probabilities at source size would need
        # Z x H x W x C x 4 bytes (~320 MB for 100 slices of 512 x 512 x 3)
        chunk = active[start:start + _RESTORE_CHUNK_SLICES]
        labels[chunk] = probabilities_to_labels(geometry.probabilities_to_slices(probs[chunk]), label_mode)
    return geometry.from_slices(labels)


def _restored_channel_chunks(probabilities: np.ndarray, geometry: ScanGeometry,
                             channel: int) -> Iterator[tuple[int, np.ndarray]]:
    """``(first slice, values)`` of one channel restored to canonical source slices, a few slices at a
    time: :meth:`ScanGeometry.probabilities_to_slices` (linear in-plane, 0 where the scan was cropped
    away on the way in), clipped to [0, 1] (float rounding of the interpolation weights only)."""
    probs = np.asarray(probabilities, dtype=np.float32)
    if probs.ndim != 4 or tuple(probs.shape[:3]) != geometry.model_shape:
        raise ValueError(f"probabilities {probs.shape} do not fit the geometry's model grid "
                         f"(Z, H, W) = {geometry.model_shape}")
    if not 0 <= channel < probs.shape[-1]:
        raise ValueError(f"channel {channel} is not one of the {probs.shape[-1]} output channels")
    for start in range(0, len(probs), _RESTORE_CHUNK_SLICES):   # a few slices at a time, as the labels
        chunk = probs[start:start + _RESTORE_CHUNK_SLICES, :, :, channel:channel + 1]
        yield start, np.clip(geometry.probabilities_to_slices(chunk)[..., 0], 0.0, 1.0)


def restore_channel_volume(probabilities: np.ndarray, geometry: ScanGeometry, channel: int) -> np.ndarray:
    """One channel of (Z, H, W, C) model probabilities -> float32 on the original (X, Y, Z) grid.

    The same inverse as :func:`restore_label_volume` (:meth:`ScanGeometry.probabilities_to_slices`:
    linear in-plane interpolation, 0 where the scan was cropped away on the way in; then
    :meth:`ScanGeometry.from_slices`), applied to every slice, so the labels are the argmax /
    threshold of these values voxel by voxel. The result has exactly ``geometry.shape``, belongs
    with ``geometry.affine`` and stays in [0, 1] (a linear interpolation is a convex combination).
    """
    values = np.zeros(geometry.slice_shape, dtype=np.float32)
    for start, chunk in _restored_channel_chunks(probabilities, geometry, channel):
        values[start:start + len(chunk)] = chunk
    return geometry.from_slices(values)


def restore_channel_max(probabilities: np.ndarray, geometry: ScanGeometry, channel: int) -> float:
    """The maximum of :func:`restore_channel_volume` without holding the volume (a few slices at a time)."""
    return max(float(chunk.max()) for _, chunk in _restored_channel_chunks(probabilities, geometry, channel))


def context_stack(slices: np.ndarray, indices: np.ndarray, context_slices: int) -> np.ndarray:
    """Gather 2.5D inputs: for each index z, slices z-k//2 .. z+k//2 (clamped at the ends) as channels.

    Args:
        slices: (Z, H, W) array (may be a read-only memmap).
        indices: 1D integer slice indices.
        context_slices: k, odd; 1 gives plain 2D input.

    Returns:
        float32 (len(indices), H, W, k).
    """
    half = context_slices // 2
    offsets = np.arange(-half, half + 1)
    rows = np.clip(np.asarray(indices)[:, None] + offsets[None, :], 0, slices.shape[0] - 1)
    gathered = np.asarray(slices[rows.ravel()], dtype=np.float32)
    return gathered.reshape(len(indices), context_slices, *slices.shape[1:]).transpose(0, 2, 3, 1)


@dataclass(frozen=True)
class PreprocessedCase:
    """Model-grid arrays of one case plus the geometry to map predictions back."""

    image: np.ndarray          # (Z, H, W) float32|float16
    label: np.ndarray | None   # (Z, H, W) uint8 targets for config.label_mode, or None
    geometry: ScanGeometry


def plan_case_geometry(image_path: str, config: PreprocessingConfig) -> ScanGeometry:
    """The :class:`ScanGeometry` of the CT file ``image_path`` (pass it on to :func:`preprocess_case`).

    Reads only the header, unless ``config.crop_to_body`` needs the HU voxels to find the body.
    """
    if not config.crop_to_body:
        header = read_nifti_header(image_path)
        return plan_scan_geometry(header.shape, header.affine, config)
    ct = load_nifti(image_path)
    return plan_scan_geometry(ct.array.shape, ct.affine, config, hu=ct.array)


def preprocess_case(image_path: str, label_path: str | None, config: PreprocessingConfig,
                    stats: ForegroundIntensityStats | None = None,
                    geometry: ScanGeometry | None = None) -> PreprocessedCase:
    """Read one case's NIfTI files and preprocess them (at most one case in memory).

    ``geometry``: the case's planned geometry (:func:`plan_case_geometry`); the shards are made
    with exactly that object. Planned from the files when None.
    """
    ct = load_nifti(image_path)
    image, geometry = preprocess_image(ct.array, ct.affine, config, stats, geometry)
    label = None
    if label_path is not None:
        label = preprocess_label(load_nifti(label_path).array, geometry, config.label_mode)
    return PreprocessedCase(image=image, label=label, geometry=geometry)


def preprocess_crop_image(hu: np.ndarray, crop: Any, config: PreprocessingConfig,
                          stats: ForegroundIntensityStats | None = None) -> np.ndarray:
    """HU volume (X, Y, Z) -> stage-2 model input (Z_crop, H, W) of a cascade crop, float32.

    ``crop`` is a :class:`pancreas_seg.cascade.crops.CropGeometry` of this volume; the intensity
    normalisation is the one of :func:`preprocess_image` (same settings and statistics).
    """
    slices = crop.image_to_crop(hu, fill_value=AIR_HU)
    return normalise_hu(slices, config.intensity_mode, config.window_hu, stats).astype(np.float32, copy=False)


def intensity_stats_from_dict(data: dict[str, Any] | None) -> ForegroundIntensityStats | None:
    """Rebuild stats saved by the preprocessing pipeline (None for window mode)."""
    if not data or data.get("foreground") is None:
        return None
    return ForegroundIntensityStats(**data["foreground"])
