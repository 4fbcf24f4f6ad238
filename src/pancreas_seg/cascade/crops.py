"""The pancreas box of a scan and the stage-2 crop planned around it, with its exact inverse.

Coordinates are those of :class:`~pancreas_seg.imaging.geometry.ScanGeometry`: canonical axial
slices (Z, H, W) at source resolution (slice 0 inferior, row 0 anterior, column 0 the patient's
right). A :class:`CropGeometry` is a ``ScanGeometry`` whose in-plane grid resamples each canonical
slice to ``crop.spacing_mm`` and keeps a region centred on the pancreas box, plus the range of
slices around it. So the crop goes through the same reorientation, resampling and inverse as the
whole-slice model input, and maps stage-2 output back onto the file's own voxel grid.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from pancreas_seg.core.labels import PANCREAS_REGION
from pancreas_seg.imaging.geometry import ScanGeometry
from pancreas_seg.imaging.resize import resize_image_slices, resize_label_slices


@dataclass(frozen=True)
class CropConfig:
    """``params:cascade.crop``: where and how finely stage 2 looks.

    Attributes:
        spacing_mm: isotropic in-plane spacing of the stage-2 input, mm.
        size_px: stage-2 input (H, W), px; at ``spacing_mm`` this is its field of view.
        margin_mm: kept around the pancreas box on every in-plane side, mm.
        z_margin_mm: slices kept above and below the pancreas box, mm.
        tile_overlap: overlap of neighbouring tiles when a region exceeds ``size_px`` (0 to < 1).
        context_mm: extra in-plane margin stored around TRAINING crops, for position jitter, mm.
        min_component_fraction: stage-1 pancreas components smaller than this share of the largest
            one are ignored when placing the box (isolated false positives).
    """

    spacing_mm: float = 1.5
    size_px: tuple[int, int] = (64, 128)
    margin_mm: float = 10.0
    z_margin_mm: float = 10.0
    tile_overlap: float = 0.25
    context_mm: float = 15.0
    min_component_fraction: float = 0.1

    def __post_init__(self) -> None:
        object.__setattr__(self, "size_px", tuple(int(v) for v in self.size_px))
        if self.spacing_mm <= 0 or min(self.size_px) < 8 or len(self.size_px) != 2:
            raise ValueError(f"cascade.crop: spacing_mm must be > 0 and size_px two sizes >= 8 px, "
                             f"got {self.spacing_mm} mm, {self.size_px}")
        if min(self.margin_mm, self.z_margin_mm, self.context_mm) < 0 or not 0 <= self.tile_overlap < 1:
            raise ValueError("cascade.crop: margins must be >= 0 mm and tile_overlap in [0, 1)")
        if not 0 <= self.min_component_fraction <= 1:
            raise ValueError("cascade.crop.min_component_fraction must be in [0, 1]")

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> CropConfig:
        """From the ``cascade.crop`` parameters (``size_px`` may be one number for a square)."""
        params = dict(params)
        size = params.get("size_px", cls.size_px)
        params["size_px"] = (int(size), int(size)) if np.isscalar(size) else tuple(size)
        return cls(**params)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def context_px(self) -> int:
        """Training context margin at the crop spacing, px."""
        return math.ceil(self.context_mm / self.spacing_mm)


@dataclass(frozen=True)
class PancreasBox:
    """A half-open box ``[z0, z1) x [h0, h1) x [w0, w1)`` on a scan's canonical slices, voxels."""

    z0: int
    z1: int
    h0: int
    h1: int
    w0: int
    w1: int

    def __post_init__(self) -> None:
        if not (self.z0 < self.z1 and self.h0 < self.h1 and self.w0 < self.w1):
            raise ValueError(f"empty pancreas box {self}")

    @property
    def in_plane(self) -> tuple[int, int, int, int]:
        return self.h0, self.h1, self.w0, self.w1

    def to_list(self) -> list[int]:
        return [self.z0, self.z1, self.h0, self.h1, self.w0, self.w1]


def mask_box(mask: np.ndarray) -> PancreasBox | None:
    """The bounding box of a boolean (Z, H, W) mask, or None when it is empty."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return None
    bounds = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        nonzero = np.flatnonzero(mask.any(axis=other))
        bounds += [int(nonzero[0]), int(nonzero[-1]) + 1]
    return PancreasBox(*bounds)


def keep_main_components(mask: np.ndarray, min_fraction: float) -> np.ndarray:
    """Keep the 3D components (26-connected) of ``mask`` of at least ``min_fraction`` of the largest.

    ``min_fraction`` 1 keeps only the largest; 0 keeps everything.
    """
    mask = np.asarray(mask, dtype=bool)
    labelled, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if n <= 1:
        return mask
    sizes = np.bincount(labelled.ravel())[1:]
    keep = np.flatnonzero(sizes >= min_fraction * sizes.max()) + 1
    return np.isin(labelled, keep)


def locate_pancreas(stage1_labels: np.ndarray, geometry: ScanGeometry,
                    min_component_fraction: float) -> PancreasBox | None:
    """Stage-1 labels on the model grid -> the pancreas box on the canonical source slices.

    Args:
        stage1_labels: uint8 MSD labels (Z, *geometry.grid.output_hw) predicted by stage 1.
        geometry: the scan's stage-1 geometry (its model grid).
        min_component_fraction: see :class:`CropConfig`.

    Returns:
        The box (source voxels, rounded outwards), or None when stage 1 found no pancreas.
    """
    if tuple(stage1_labels.shape) != geometry.model_shape:
        raise ValueError(f"stage-1 labels {stage1_labels.shape} are not on the geometry's model grid "
                         f"{geometry.model_shape}")
    mask = keep_main_components(np.isin(stage1_labels, PANCREAS_REGION), min_component_fraction)
    box = mask_box(mask)
    if box is None:
        return None
    h0, h1, w0, w1 = geometry.grid.output_box_to_source(box.in_plane)
    if h0 >= h1 or w0 >= w1:  # the box lies in padding outside the scan
        return None
    return PancreasBox(box.z0, box.z1, h0, h1, w0, w1)


@dataclass(frozen=True, eq=False)
class CropGeometry:
    """Canonical slices ``z_range`` of a scan, resampled and cropped around a pancreas box.

    Attributes:
        scan: the scan's geometry with the crop's in-plane grid (source slice -> region of
            ``scan.grid.output_hw`` px at the crop spacing, centred on ``box``).
        z_range: ``(z0, z1)``, the canonical slices the crop keeps (half-open).
        box: the pancreas box it was planned on (canonical source voxels).
    """

    scan: ScanGeometry
    z_range: tuple[int, int]
    box: PancreasBox

    def __post_init__(self) -> None:
        z0, z1 = (int(v) for v in self.z_range)
        object.__setattr__(self, "z_range", (z0, z1))
        if not 0 <= z0 < z1 <= self.scan.slice_shape[0]:
            raise ValueError(f"crop slices {self.z_range} outside the scan's {self.scan.slice_shape[0]} slices")

    @classmethod
    def plan(cls, shape: tuple[int, ...], affine: np.ndarray, box: PancreasBox, config: CropConfig,
             context_px: int = 0) -> CropGeometry:
        """Plan the crop of a scan (``shape`` (X, Y, Z), ``affine``) around ``box``.

        The region is the box plus ``config.margin_mm`` at ``config.spacing_mm``, at least
        ``config.size_px``, plus ``context_px`` on every in-plane side (training crops); the slices
        are the box's plus ``config.z_margin_mm`` above and below.
        """
        header = ScanGeometry.plan(shape, affine, (1, 1))  # orientation and spacing only
        spacing_z, spacing_h, spacing_w = header.slice_spacing_mm
        extent_mm = ((box.h1 - box.h0) * spacing_h, (box.w1 - box.w0) * spacing_w)
        region = tuple(max(size, math.ceil((extent + 2 * config.margin_mm) / config.spacing_mm)) + 2 * context_px
                       for size, extent in zip(config.size_px, extent_mm, strict=True))
        scan = ScanGeometry.plan(shape, affine, region, target_spacing_mm=config.spacing_mm,
                                 body_box_hw=box.in_plane)
        z_pad = math.ceil(config.z_margin_mm / spacing_z)
        n_slices = header.slice_shape[0]
        return cls(scan, (max(0, box.z0 - z_pad), min(n_slices, box.z1 + z_pad)), box)

    @property
    def region_hw(self) -> tuple[int, int]:
        """The crop region (H, W), px at the crop spacing."""
        return tuple(self.scan.grid.output_hw)  # type: ignore[return-value]

    @property
    def crop_shape(self) -> tuple[int, int, int]:
        """(Z, H, W) of the crop arrays."""
        return self.z_range[1] - self.z_range[0], *self.region_hw

    def _slices(self, volume: np.ndarray) -> np.ndarray:
        z0, z1 = self.z_range
        return self.scan.to_slices(volume)[z0:z1]

    def image_to_crop(self, volume: np.ndarray, fill_value: float) -> np.ndarray:
        """(X, Y, Z) image (e.g. HU) -> float32 crop (Z, H, W); ``fill_value`` outside the scan."""
        return resize_image_slices(np.asarray(self._slices(volume), dtype=np.float32), self.scan.grid,
                                   fill_value=fill_value)

    def label_to_crop(self, volume: np.ndarray) -> np.ndarray:
        """(X, Y, Z) integer labels -> crop (Z, H, W), same dtype, nearest neighbour, 0 outside."""
        return resize_label_slices(self._slices(np.asarray(volume)), self.scan.grid)

    def full_model_grid(self, crop_array: np.ndarray, fill: np.ndarray | float) -> np.ndarray:
        """Put a crop array (Z_crop, H, W[, C]) into the scan's full slice range (Z, H, W[, C]).

        Slices outside ``z_range`` get ``fill`` (e.g. background probabilities); the result is on
        ``self.scan``'s model grid, ready for its inverse
        (:func:`pancreas_seg.imaging.preprocess.restore_label_volume`).
        """
        if tuple(crop_array.shape[:3]) != self.crop_shape:
            raise ValueError(f"crop array {crop_array.shape} does not match the crop {self.crop_shape}")
        full = np.empty((self.scan.slice_shape[0], *crop_array.shape[1:]), dtype=crop_array.dtype)
        full[...] = fill
        full[self.z_range[0]:self.z_range[1]] = crop_array
        return full

    def labels_to_volume(self, crop_labels: np.ndarray) -> np.ndarray:
        """Crop labels (Z_crop, H, W) -> (X, Y, Z) labels on the file grid; 0 outside the crop."""
        return self.scan.label_from_model(self.full_model_grid(np.asarray(crop_labels), 0))

    def to_dict(self) -> dict[str, Any]:
        return {"scan": self.scan.to_dict(), "z_range": list(self.z_range), "box": self.box.to_list()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CropGeometry:
        return cls(ScanGeometry.from_dict(data["scan"]), tuple(data["z_range"]), PancreasBox(*data["box"]))


def tile_starts(extent: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of tiles of ``tile`` px covering ``extent`` px with about ``overlap`` overlap.

    One tile when it fits (centred; a negative start means the tile reaches past both edges).
    """
    if extent <= tile:
        return [(extent - tile) // 2]
    step = max(1, math.floor(tile * (1 - overlap)))
    n = math.ceil((extent - tile) / step) + 1
    return sorted({int(round(v)) for v in np.linspace(0, extent - tile, n)})


def extract_window(array: np.ndarray, top: int, left: int, size_hw: tuple[int, int],
                   fill: float) -> np.ndarray:
    """``array[:, top:top+h, left:left+w, ...]`` of a (N, H, W, ...) array, padded with ``fill``."""
    h, w = size_hw
    out = np.full((array.shape[0], h, w, *array.shape[3:]), fill, dtype=array.dtype)
    src_h0, src_w0 = max(0, top), max(0, left)
    src_h1, src_w1 = min(array.shape[1], top + h), min(array.shape[2], left + w)
    if src_h0 < src_h1 and src_w0 < src_w1:
        out[:, src_h0 - top:src_h1 - top, src_w0 - left:src_w1 - left] = array[:, src_h0:src_h1, src_w0:src_w1]
    return out
