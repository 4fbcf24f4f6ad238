"""Voxel geometry: reorientation to the canonical slice layout and back.

Canonical orientation is LPS (the DICOM/ITK convention): after reorientation the array axes
increase towards patient Left, Posterior and Superior. Transposing such a volume to (Z, Y, X)
gives axial slices in the radiological view used everywhere in this project: row 0 is anterior,
column 0 is the patient's right. Every prediction can be mapped back to the original file's voxel
grid with :func:`from_canonical`, using the :class:`CanonicalTransform` recorded on the way in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from nibabel import orientations as ornt_lib

CANONICAL_AXCODES = ("L", "P", "S")


@dataclass(frozen=True)
class CanonicalTransform:
    """What is needed to map canonical (LPS) arrays back onto an original NIfTI grid.

    Attributes:
        original_shape: the file's 3D array shape (X, Y, Z) in its own voxel order.
        original_affine: the file's voxel -> mm affine, float64 (4, 4).
        to_canonical: nibabel orientation transform (3, 2) from the file's axes to LPS.
    """

    original_shape: tuple[int, int, int]
    original_affine: np.ndarray
    to_canonical: np.ndarray

    @property
    def canonical_affine(self) -> np.ndarray:
        """Voxel -> mm affine of the reoriented (LPS) array, float64 (4, 4)."""
        return self.original_affine @ ornt_lib.inv_ornt_aff(self.to_canonical, self.original_shape)

    @property
    def canonical_spacing_mm(self) -> tuple[float, float, float]:
        """Voxel size in mm along the canonical L, P, S axes."""
        return tuple(float(s) for s in np.linalg.norm(self.canonical_affine[:3, :3], axis=0))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (lists of floats/ints)."""
        return {
            "original_shape": list(self.original_shape),
            "original_affine": np.asarray(self.original_affine).tolist(),
            "to_canonical": np.asarray(self.to_canonical).tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CanonicalTransform:
        """Inverse of :meth:`to_dict`."""
        return cls(
            original_shape=tuple(int(s) for s in data["original_shape"]),
            original_affine=np.asarray(data["original_affine"], dtype=np.float64),
            to_canonical=np.asarray(data["to_canonical"], dtype=np.float64),
        )


def canonical_transform(shape: tuple[int, ...], affine: np.ndarray) -> CanonicalTransform:
    """Describe how a volume of ``shape`` with ``affine`` is reoriented to LPS."""
    if len(shape) != 3:
        raise ValueError(f"expected a 3D volume, got shape {tuple(shape)}")
    current = ornt_lib.io_orientation(np.asarray(affine, dtype=np.float64))
    target = ornt_lib.axcodes2ornt(CANONICAL_AXCODES)
    return CanonicalTransform(
        original_shape=tuple(int(s) for s in shape),
        original_affine=np.asarray(affine, dtype=np.float64),
        to_canonical=ornt_lib.ornt_transform(current, target),
    )


def to_canonical(array: np.ndarray, transform: CanonicalTransform) -> np.ndarray:
    """Reorient an (X, Y, Z) array in the file's voxel order to LPS voxel order (a view if possible)."""
    if tuple(array.shape[:3]) != transform.original_shape:
        raise ValueError(f"array shape {array.shape} does not match {transform.original_shape}")
    return ornt_lib.apply_orientation(array, transform.to_canonical)


def from_canonical(array: np.ndarray, transform: CanonicalTransform) -> np.ndarray:
    """Map an LPS-ordered array back to the original file's voxel order and shape."""
    back = ornt_lib.ornt_transform(
        ornt_lib.axcodes2ornt(CANONICAL_AXCODES),
        ornt_lib.io_orientation(transform.original_affine),
    )
    restored = ornt_lib.apply_orientation(array, back)
    if tuple(restored.shape[:3]) != transform.original_shape:
        raise ValueError(f"restored shape {restored.shape} != original {transform.original_shape}")
    return np.ascontiguousarray(restored)


def volume_to_slices(canonical: np.ndarray) -> np.ndarray:
    """(X, Y, Z) LPS volume -> (Z, Y, X) stack of axial slices in radiological view (a view)."""
    return np.moveaxis(canonical, (0, 1, 2), (2, 1, 0))


def slices_to_volume(slices: np.ndarray) -> np.ndarray:
    """(Z, Y, X, ...) slice stack -> (X, Y, Z, ...) LPS volume; inverse of volume_to_slices."""
    return np.swapaxes(slices, 0, 2)
