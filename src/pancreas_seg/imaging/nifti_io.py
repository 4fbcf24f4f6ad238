"""NIfTI reading and writing with explicit geometry and clear errors.

Every reader returns a :class:`NiftiVolume` (array + affine + header); every writer is atomic
(temporary file in the target folder, then ``os.replace``) so an interrupted run never leaves a
half-written file that looks complete.
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np

from pancreas_seg.core.atomic import atomic_write_bytes


class InvalidNiftiError(ValueError):
    """A file is not a usable NIfTI volume; the message names the file and the problem."""


@dataclass(frozen=True)
class NiftiVolume:
    """A NIfTI volume: ``array`` in the file's voxel order (X, Y, Z), ``affine`` voxel -> mm (4x4)."""

    array: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header | None = None

    @property
    def spacing_mm(self) -> tuple[float, ...]:
        """Voxel size along each array axis in mm (from the affine's column norms)."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def orientation(self) -> str:
        """Axis codes such as ``"RAS"`` or ``"LPS"`` (the direction each array axis increases)."""
        return orientation_code(self.affine)


def orientation_code(affine: np.ndarray) -> str:
    """Return the three-letter orientation code of an affine, e.g. ``"RAS"``."""
    return "".join(nib.aff2axcodes(np.asarray(affine, dtype=np.float64)))


def read_nifti_header(path: str | os.PathLike[str]) -> nib.Nifti1Image:
    """Open a NIfTI file lazily (header and affine; voxels are not read). Raises InvalidNiftiError."""
    path = str(path)
    try:
        return nib.load(path)
    except FileNotFoundError as exc:
        raise InvalidNiftiError(f"{path}: file does not exist") from exc
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise InvalidNiftiError(f"{path}: not readable as NIfTI ({type(exc).__name__}: {exc})") from exc


def load_nifti(path: str | os.PathLike[str], dtype: Any = None) -> NiftiVolume:
    """Read a NIfTI file fully into memory.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.
        dtype: if given, the scaled voxel values are returned in this dtype (``float32`` for HU
            arithmetic); otherwise the on-disk dtype is kept when the file has no scaling.

    Returns:
        A :class:`NiftiVolume`; ``array`` has the file's shape, ``affine`` is float64 (4, 4).

    Raises:
        InvalidNiftiError: the file is missing, truncated, or not NIfTI.
    """
    image = read_nifti_header(path)
    try:
        if dtype is None:
            array = np.asanyarray(image.dataobj)
        else:
            array = image.get_fdata(dtype=np.dtype(dtype)) if np.dtype(dtype).kind == "f" else (
                np.asanyarray(image.dataobj).astype(dtype, copy=False)
            )
    except (EOFError, OSError, zlib.error, gzip.BadGzipFile, ValueError) as exc:
        raise InvalidNiftiError(f"{path}: voxel data unreadable, the file looks truncated or corrupt "
                                f"({type(exc).__name__}: {exc})") from exc
    return NiftiVolume(array=np.asarray(array), affine=np.asarray(image.affine, dtype=np.float64),
                       header=image.header)


def to_nifti_image(array: np.ndarray, affine: np.ndarray,
                   header: nib.Nifti1Header | None = None) -> nib.Nifti1Image:
    """Wrap an array and affine in a Nifti1Image whose header dtype matches the array.

    With the ``header`` of the file the array belongs to (same grid, same affine), that file's
    qform and sform are kept as they are, so the output reads back with bit-identical geometry
    (a qform-only input stays qform-only). Otherwise both forms are set from ``affine`` (code 1).
    """
    array = np.asarray(array)
    affine = np.asarray(affine, dtype=np.float64)
    same_grid = (header is not None and tuple(header.get_data_shape()[:3]) == array.shape[:3]
                 and np.array_equal(header.get_best_affine(), affine))
    if same_grid:
        image = nib.Nifti1Image(array, None, header=header.copy())
    else:
        image = nib.Nifti1Image(array, affine, header=header.copy() if header is not None else None)
        image.set_qform(affine, code=1)
        image.set_sform(affine, code=1)
    image.set_data_dtype(array.dtype)
    image.header.set_xyzt_units("mm", "sec")
    # Integer labels and HU must be stored exactly: no scaling.
    image.header.set_slope_inter(1.0, 0.0)
    return image


def nifti_bytes(array: np.ndarray, affine: np.ndarray,
                header: nib.Nifti1Header | None = None, compress: bool = True) -> bytes:
    """Serialise an array + affine to NIfTI bytes (gzip-compressed when ``compress``)."""
    raw = to_nifti_image(array, affine, header).to_bytes()
    return gzip.compress(raw, compresslevel=1, mtime=0) if compress else raw


PROBABILITY_SUFFIX = "_tumour_probability"
"""A tumour probability map is saved as ``<case>_tumour_probability.nii.gz`` next to ``<case>.nii.gz``."""
PROBABILITY_LEVELS = 255
"""A probability map is stored as uint8 ``round(p * 255)`` with ``scl_slope = 1/255``: readers that apply
the NIfTI scaling (nibabel ``get_fdata``, SimpleITK, ITK-SNAP, 3D Slicer) get [0, 1] to within 1/510."""


@dataclass(frozen=True)
class CasePrediction:
    """A case's predicted labels with its tumour probability map on the same grid (None: no tumour output).

    What :class:`pancreas_seg.datasets.PredictionDataset` saves as ``<case>.nii.gz`` and
    ``<case>_tumour_probability.nii.gz``.
    """

    labels: NiftiVolume
    tumour_probability: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.tumour_probability is not None and self.tumour_probability.shape != self.labels.array.shape:
            raise ValueError(f"tumour probability {self.tumour_probability.shape} is not on the labels' grid "
                             f"{self.labels.array.shape}")


def probability_path(label_path: str | os.PathLike[str]) -> str:
    """``<case>.nii.gz`` (or ``.nii``) -> ``<case>_tumour_probability.nii.gz`` (``.nii``) in the same folder."""
    path = os.fspath(label_path)
    for suffix in (".nii.gz", ".nii"):
        if path.endswith(suffix):
            return path[:-len(suffix)] + PROBABILITY_SUFFIX + suffix
    raise ValueError(f"{path}: not a .nii or .nii.gz path")


def quantise_probability(probability: np.ndarray) -> np.ndarray:
    """[0, 1] float -> uint8 ``round(p * 255)`` (the stored form; NaN or values outside [0, 1] refused)."""
    values = np.asarray(probability, dtype=np.float32)
    if values.size and (np.isnan(values).any() or values.min() < 0.0 or values.max() > 1.0):
        raise ValueError("a probability map must lie in [0, 1] without NaN")
    return np.rint(values * PROBABILITY_LEVELS).astype(np.uint8)


def probability_nifti_bytes(probability: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header | None = None,
                            compress: bool = True) -> bytes:
    """A [0, 1] probability map as NIfTI bytes: uint8 with ``scl_slope = 1/255`` (:data:`PROBABILITY_LEVELS`),
    on the grid (and, with the input's ``header``, the qform/sform) of :func:`nifti_bytes`."""
    image = to_nifti_image(quantise_probability(probability), affine, header)
    image.header.set_slope_inter(1.0 / PROBABILITY_LEVELS, 0.0)
    image.header["descrip"] = b"tumour probability (uint8 * scl_slope = [0, 1])"
    raw = image.to_bytes()
    return gzip.compress(raw, compresslevel=1, mtime=0) if compress else raw


def save_nifti(path: str | os.PathLike[str], array: np.ndarray, affine: np.ndarray,
               header: nib.Nifti1Header | None = None) -> None:
    """Atomically write ``array`` with ``affine`` to ``path`` (gzip if it ends in ``.gz``)."""
    compress = str(path).endswith(".gz")
    atomic_write_bytes(path, nifti_bytes(array, affine, header, compress=compress))
