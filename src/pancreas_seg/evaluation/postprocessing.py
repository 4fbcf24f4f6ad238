"""Connected-component post-processing of predicted masks and label maps (pure NumPy/SciPy)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from pancreas_seg.core.labels import PANCREAS_REGION


def keep_largest_component(mask: np.ndarray, connectivity: int = 3) -> np.ndarray:
    """Keep only the largest connected component of a boolean mask.

    Args:
        mask: boolean/0-1 array of any ndim (typically (X, Y, Z)).
        connectivity: neighbourhood passed to ``scipy.ndimage.generate_binary_structure``
            (1 = faces, ..., ``mask.ndim`` = full; 3 in 3D is 26-connectivity).

    Returns:
        Boolean array of the same shape holding the largest component (by voxel count; on a
        tie the component met first in C order). An empty mask gives an empty mask.
    """
    mask = np.asarray(mask) != 0
    if not 1 <= connectivity <= max(mask.ndim, 1):
        raise ValueError(f"connectivity must be in 1..{mask.ndim}, got {connectivity}")
    structure = ndimage.generate_binary_structure(mask.ndim, connectivity)
    components, count = ndimage.label(mask, structure=structure)
    if count <= 1:
        return mask.copy()
    sizes = np.bincount(components.ravel(), minlength=count + 1)
    sizes[0] = 0
    return components == int(np.argmax(sizes))


def keep_largest_foreground(labels: np.ndarray, connectivity: int = 3) -> np.ndarray:
    """Keep the largest connected pancreas region (labels 1 ∪ 2) of a label map.

    Every voxel outside that component becomes 0; inside it labels are kept, so tumour (2)
    survives only where it touches (is part of) the kept pancreas component.

    Args:
        labels: integer label map (X, Y, Z) with values {0, 1, 2}.
        connectivity: as in :func:`keep_largest_component` (default 26-connectivity in 3D).

    Returns:
        A label map of the same shape and dtype.
    """
    labels = np.asarray(labels)
    keep = keep_largest_component(np.isin(labels, PANCREAS_REGION), connectivity=connectivity)
    return np.where(keep, labels, np.zeros((), dtype=labels.dtype)).astype(labels.dtype, copy=False)


def remove_small_components(labels: np.ndarray, value: int, min_volume_mm3: float, voxel_volume_mm3: float,
                            replacement: int, connectivity: int = 3) -> tuple[np.ndarray, int]:
    """Relabel the connected components of ``value`` smaller than ``min_volume_mm3`` as ``replacement``.

    Args:
        labels: integer label map (X, Y, Z).
        value: the label whose components are filtered (e.g. 2, tumour).
        min_volume_mm3: components of at least this volume are kept, mm³ (0 keeps everything).
        voxel_volume_mm3: the volume of one voxel, mm³ (``|det|`` of the affine's 3x3 part).
        replacement: the label the removed voxels get (e.g. 1: a tumour too small to report stays
            pancreas).
        connectivity: as in :func:`keep_largest_component` (default 26-connectivity in 3D).

    Returns:
        The filtered label map (same shape and dtype) and the number of components removed.
    """
    labels = np.asarray(labels)
    if min_volume_mm3 <= 0:
        return labels, 0
    structure = ndimage.generate_binary_structure(labels.ndim, connectivity)
    components, count = ndimage.label(labels == value, structure=structure)
    if count == 0:
        return labels, 0
    volumes = np.bincount(components.ravel(), minlength=count + 1)[1:] * float(voxel_volume_mm3)
    small = np.flatnonzero(volumes < min_volume_mm3) + 1
    if small.size == 0:
        return labels, 0
    out = labels.copy()
    out[np.isin(components, small)] = replacement
    return out, int(small.size)
