"""Scan geometry: one invertible record of how a CT file's voxels become model slices and back.

The forward mapping of every scan is

    file voxel grid (X, Y, Z), any of the 48 axis orders
      -> canonical LPS voxel order (axes increase towards patient Left, Posterior, Superior)
      -> axial slices (Z, H, W) in radiological view: slice 0 inferior, row 0 anterior,
         column 0 the patient's right (H runs along P, W along L)
      -> in-plane resample and crop/pad onto the model grid (Z, *output_hw), see
         :class:`pancreas_seg.imaging.resize.InPlaneGrid`.

:class:`ScanGeometry` is built ONCE per scan from the file header (shape and affine) and, when the
model input is framed on the body, the body's bounding box (like nnU-Net's ``properties`` dict or
MONAI's ``applied_operations``). It holds the forward steps and their inverse: model-grid
probabilities or labels go back onto the file's own voxel grid with exactly its shape, to be saved
with exactly its affine. It serialises to a JSON dict (``slice_geometry.json`` of the preprocessing
pipeline) and names the file array's axial axis (for slice-wise metrics).

Reorientation only permutes and flips axes (no interpolation), so it is exact; the in-plane resize
is the only lossy step, and it is the identity when the model grid equals the canonical slice grid.
Pure NumPy/nibabel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import nibabel as nib
import numpy as np
from nibabel import orientations as ornt_lib

from pancreas_seg.imaging.resize import (
    InPlaneGrid,
    plan_in_plane_grid,
    resize_image_slices,
    resize_label_slices,
    restore_label_slices,
    restore_probability_slices,
)

CANONICAL_AXCODES = ("L", "P", "S")
#: Tolerance (mm) when checking that a re-read header still describes the planned grid: NIfTI
#: stores affines as float32 (sform) or quaternions (qform), so a re-read can differ in the last bits.
AFFINE_ATOL_MM = 1e-4


def lps_orientation(affine: np.ndarray) -> np.ndarray:
    """nibabel orientation (3, 2) taking a file's voxel axes to canonical LPS.

    Row i is ``[axis, flip]``: the file's array axis i becomes LPS axis ``axis`` (0 L, 1 P, 2 S),
    reversed when ``flip == -1``. Oblique affines use the closest axes.

    Raises:
        ValueError: the affine does not have three independent spatial axes.
    """
    current = ornt_lib.io_orientation(np.asarray(affine, dtype=np.float64))
    if np.isnan(current).any():
        raise ValueError(f"affine has no usable orientation (degenerate axes):\n{np.asarray(affine)}")
    return ornt_lib.ornt_transform(current, ornt_lib.axcodes2ornt(CANONICAL_AXCODES))


def axial_axis(affine: np.ndarray) -> int:
    """The file array axis (0, 1 or 2) that runs inferior-superior: slice along it for axial slices."""
    return _axial_axis(lps_orientation(affine))


def _axial_axis(ornt: np.ndarray) -> int:
    return int(np.flatnonzero(ornt[:, 0] == 2)[0])


def _slice_shape(shape: tuple[int, ...], ornt: np.ndarray) -> tuple[int, int, int]:
    """(Z, H, W) of the canonical slices of a file array of ``shape`` (X, Y, Z)."""
    lps = [0, 0, 0]
    for axis, (lps_axis, _) in enumerate(ornt):  # row i says where FILE axis i goes
        lps[int(lps_axis)] = int(shape[axis])
    return lps[2], lps[1], lps[0]


def _slice_spacing_mm(shape: tuple[int, ...], affine: np.ndarray,
                      ornt: np.ndarray) -> tuple[float, float, float]:
    """(Z, H, W) voxel size in mm of the canonical slices (column norms of the LPS affine)."""
    canonical = np.asarray(affine, dtype=np.float64) @ ornt_lib.inv_ornt_aff(ornt, shape)
    l_mm, p_mm, s_mm = np.linalg.norm(canonical[:3, :3], axis=0)
    return float(s_mm), float(p_mm), float(l_mm)


def _to_slices(volume: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    lps = ornt_lib.apply_orientation(volume, ornt)
    return np.moveaxis(lps, (0, 1, 2), (2, 1, 0))  # (L, P, S, ...) -> (S, P, L, ...) = (Z, H, W, ...)


def axial_view(volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """(X, Y, Z[, ...]) file-order volume -> (Z, H, W[, ...]) radiological axial slices (a view).

    Source resolution, any dtype kept; needs only the affine (display, finding the body).
    """
    if volume.ndim < 3:
        raise ValueError(f"expected a 3D volume, got shape {volume.shape}")
    return _to_slices(volume, lps_orientation(affine))


#: Slices resampled per step by :meth:`ScanGeometry.image_to_model` (bounds its memory, not its result).
MODEL_CHUNK_SLICES = 16


def _as_box(box: Any) -> tuple[int, int, int, int] | None:
    return None if box is None else tuple(int(v) for v in box)  # type: ignore[return-value]


@dataclass(frozen=True, eq=False)
class ScanGeometry:
    """The forward mapping of one scan to model slices, and its inverse.

    Attributes:
        shape: the file's 3D array shape (X, Y, Z), voxels, in the file's own axis order.
        affine: the file's voxel -> world (RAS+, mm) affine, float64 (4, 4).
        grid: canonical slice (H, W) px -> model grid ``grid.output_hw`` px; ``grid.source_hw``
            must equal (H, W) of this scan's canonical slices.
        body_box_hw: the body's in-plane box ``(h0, h1, w0, w1)`` (half-open, canonical px) the
            grid was framed on, or None (recorded so the plan can be audited).
    """

    shape: tuple[int, int, int]
    affine: np.ndarray = field(repr=False)
    grid: InPlaneGrid
    body_box_hw: tuple[int, int, int, int] | None = None

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"expected a 3D volume shape, got {tuple(self.shape)}")
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        affine = np.array(self.affine, dtype=np.float64)
        if affine.shape != (4, 4):
            raise ValueError(f"expected a (4, 4) affine, got {affine.shape}")
        affine.setflags(write=False)
        object.__setattr__(self, "affine", affine)
        object.__setattr__(self, "body_box_hw", _as_box(self.body_box_hw))
        if tuple(self.grid.source_hw) != self.slice_shape[1:]:
            raise ValueError(f"in-plane grid source {self.grid.source_hw} does not match this scan's "
                             f"canonical slices {self.slice_shape[1:]} (stale or foreign geometry?)")

    # ------------------------------------------------------------------ construction
    @classmethod
    def plan(cls, shape: tuple[int, ...], affine: np.ndarray, image_size_px: tuple[int, int], *,
             target_spacing_mm: float | None = None,
             body_box_hw: tuple[int, int, int, int] | None = None,
             body_margin_mm: float = 10.0) -> ScanGeometry:
        """Plan the geometry of a scan from its header and (optionally) its body box.

        Args:
            shape: file array shape (X, Y, Z), voxels.
            affine: file voxel -> mm affine (4, 4).
            image_size_px: model grid (H, W), px.
            target_spacing_mm: isotropic in-plane spacing to resample to (mm), or None.
            body_box_hw: body box on the canonical slices (see
                :func:`pancreas_seg.imaging.resize.body_bounding_box`), or None.
            body_margin_mm: margin kept around the body box when it sets the scale, mm.
        """
        if len(shape) != 3:
            raise ValueError(f"expected a 3D volume, got shape {tuple(shape)}")
        ornt = lps_orientation(affine)
        _, height, width = _slice_shape(shape, ornt)
        _, spacing_h, spacing_w = _slice_spacing_mm(shape, affine, ornt)
        grid = plan_in_plane_grid((height, width), (spacing_h, spacing_w), image_size_px,
                                  target_spacing_mm, body_box_hw=body_box_hw,
                                  body_margin_mm=body_margin_mm)
        return cls(tuple(shape), affine, grid, body_box_hw)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ derived geometry
    @cached_property
    def ornt(self) -> np.ndarray:
        """nibabel orientation (3, 2) from the file's axes to LPS (see :func:`lps_orientation`)."""
        return lps_orientation(self.affine)

    @cached_property
    def _inverse_ornt(self) -> np.ndarray:
        return ornt_lib.ornt_transform(ornt_lib.axcodes2ornt(CANONICAL_AXCODES),
                                       ornt_lib.io_orientation(self.affine))

    @property
    def axcodes(self) -> str:
        """The file's orientation code, e.g. ``"RAS"`` (direction each array axis increases)."""
        return "".join(nib.aff2axcodes(self.affine))

    @property
    def axial_axis(self) -> int:
        """The file array axis that runs inferior-superior (2 for RAS/LPS files, 0 for SRA)."""
        return _axial_axis(self.ornt)

    @property
    def slice_shape(self) -> tuple[int, int, int]:
        """(Z, H, W) of the canonical axial slices at source resolution, voxels."""
        return _slice_shape(self.shape, self.ornt)

    @property
    def model_shape(self) -> tuple[int, int, int]:
        """(Z, H, W) of the model-grid slices, px."""
        return self.slice_shape[0], *self.grid.output_hw

    @property
    def canonical_affine(self) -> np.ndarray:
        """Voxel -> mm affine (4, 4) of the volume in canonical LPS voxel order."""
        return self.affine @ ornt_lib.inv_ornt_aff(self.ornt, self.shape)

    @property
    def slice_spacing_mm(self) -> tuple[float, float, float]:
        """Voxel size (Z, H, W) of the canonical slices at source resolution, mm."""
        return _slice_spacing_mm(self.shape, self.affine, self.ornt)

    def check_header(self, shape: tuple[int, ...], affine: np.ndarray, what: str = "volume") -> None:
        """Raise ValueError unless ``shape``/``affine`` describe this geometry's voxel grid."""
        if tuple(shape[:3]) != self.shape or len(shape) < 3:
            raise ValueError(f"{what} shape {tuple(shape)} does not match the planned geometry {self.shape}")
        if not np.allclose(np.asarray(affine, dtype=np.float64), self.affine, rtol=0, atol=AFFINE_ATOL_MM):
            raise ValueError(f"{what} affine does not match the planned geometry:\n"
                             f"{np.asarray(affine)}\nvs\n{self.affine}")

    # ------------------------------------------------------------------ forward
    def to_slices(self, volume: np.ndarray) -> np.ndarray:
        """(X, Y, Z[, ...]) file-order array -> (Z, H, W[, ...]) canonical slices (a view, dtype kept)."""
        self.check_header(np.shape(volume), self.affine)
        return _to_slices(np.asarray(volume), self.ornt)

    def image_to_model(self, volume: np.ndarray, fill_value: float) -> np.ndarray:
        """(X, Y, Z) image (e.g. HU) -> float32 (Z, *output_hw) on the model grid.

        Area/linear in-plane interpolation; ``fill_value`` (same unit as the image) where the model
        grid extends beyond the scan. Works through :data:`MODEL_CHUNK_SLICES` slices at a time:
        the interpolation is in-plane only, so the result is the same as for the whole stack at
        once, while the float32 copies stay a few slices big instead of the whole scan's size.
        """
        slices = self.to_slices(np.asarray(volume))  # a view, the file's dtype
        out = np.empty(self.model_shape, dtype=np.float32)
        for start in range(0, len(slices), MODEL_CHUNK_SLICES):
            chunk = np.asarray(slices[start:start + MODEL_CHUNK_SLICES], dtype=np.float32)
            out[start:start + MODEL_CHUNK_SLICES] = resize_image_slices(chunk, self.grid, fill_value=fill_value)
        return out

    def label_to_model(self, volume: np.ndarray) -> np.ndarray:
        """(X, Y, Z) integer labels -> (Z, *output_hw), same dtype, nearest neighbour, 0 outside."""
        return resize_label_slices(self.to_slices(np.asarray(volume)), self.grid)

    # ------------------------------------------------------------------ inverse
    def _check_model_slices(self, array: np.ndarray) -> None:
        if tuple(array.shape[:3]) != self.model_shape:
            raise ValueError(f"model-grid array {array.shape} does not match this geometry's "
                             f"(Z, H, W) = {self.model_shape}")

    def from_slices(self, slices: np.ndarray) -> np.ndarray:
        """(Z, H, W[, ...]) canonical slices at source resolution -> (X, Y, Z[, ...]) file order.

        The exact inverse of :meth:`to_slices`; returns a C-contiguous array of exactly ``shape``.
        """
        if tuple(slices.shape[:3]) != self.slice_shape:
            raise ValueError(f"slices {slices.shape} do not match this scan's {self.slice_shape}")
        volume = ornt_lib.apply_orientation(np.swapaxes(slices, 0, 2), self._inverse_ornt)
        if tuple(volume.shape[:3]) != self.shape:  # cannot happen unless nibabel changes
            raise AssertionError(f"restored shape {volume.shape} != original {self.shape}")
        return np.ascontiguousarray(volume)

    def probabilities_to_slices(self, probabilities: np.ndarray) -> np.ndarray:
        """(Z, *output_hw, C) model probabilities -> float32 (Z, H, W, C) canonical slices.

        Linear in-plane interpolation; parts of the scan cropped away on the way in get 0 for
        every class. Call on a subset of slices too (only H, W and C are checked then).
        """
        if tuple(probabilities.shape[1:3]) != tuple(self.grid.output_hw) or probabilities.ndim != 4:
            raise ValueError(f"probabilities {probabilities.shape} are not (Z, {self.grid.output_hw}, C)")
        return restore_probability_slices(probabilities, self.grid)

    def label_from_model(self, labels: np.ndarray) -> np.ndarray:
        """(Z, *output_hw) model-grid labels -> (X, Y, Z) on the file grid (nearest neighbour, 0 outside)."""
        self._check_model_slices(labels)
        return self.from_slices(restore_label_slices(labels, self.grid))

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form; floats are written exactly (``json`` uses ``repr``).

        ``axcodes`` and ``axial_axis`` are informative (and checked by :meth:`from_dict`).
        """
        return {"shape": list(self.shape), "affine": self.affine.tolist(), "axcodes": self.axcodes,
                "axial_axis": self.axial_axis, "grid": self.grid.to_dict(),
                "body_box_hw": None if self.body_box_hw is None else list(self.body_box_hw)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScanGeometry:
        """Inverse of :meth:`to_dict`. Also reads the older ``{"canonical", "grid"}`` layout.

        Raises:
            ValueError: the record is inconsistent (for example its grid does not fit its shape).
        """
        if "canonical" in data:  # written by the SliceGeometry of earlier versions
            data = {"shape": data["canonical"]["original_shape"],
                    "affine": data["canonical"]["original_affine"], "grid": data["grid"]}
        geometry = cls(tuple(int(s) for s in data["shape"]), np.asarray(data["affine"], np.float64),
                       InPlaneGrid.from_dict(data["grid"]), _as_box(data.get("body_box_hw")))
        for key in ("axcodes", "axial_axis"):
            if key in data and data[key] != getattr(geometry, key):
                raise ValueError(f"geometry record says {key}={data[key]!r}, its affine gives "
                                 f"{getattr(geometry, key)!r}")
        return geometry

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ScanGeometry):
            return NotImplemented
        return (self.shape == other.shape and np.array_equal(self.affine, other.affine)
                and self.grid == other.grid and self.body_box_hw == other.body_box_hw)

    __hash__ = None  # type: ignore[assignment]
