"""Per-case segmentation metrics on the original voxel grid: Dice, HD95 (mm), NSD, slice Dice, lesions.

Conventions used throughout this module
---------------------------------------
* A *mask* is a boolean (or 0/1 integer) array of one case, shape (X, Y, Z) (any ndim >= 1 works),
  on the ORIGINAL voxel grid of the CT. ``spacing_mm`` gives the voxel size in mm along each array
  axis, e.g. ``(0.8, 0.8, 2.5)``; surface metrics are in mm and therefore anisotropy-aware.
* A *label map* is an integer array of the same shape with the MSD Task07 labels
  0 = background, 1 = pancreas, 2 = tumour (mass). :data:`CLASS_LABELS` maps the evaluated classes
  to label sets: pancreas = 1 ∪ 2 (the whole organ including its mass), tumour = 2.

Definitions chosen
------------------
Surface
    The surface ``S(M)`` of a mask ``M`` is the set of foreground voxels that have at least one
    6-connected (face) neighbour in the background; everything outside the array counts as
    background, so foreground voxels on the array border are surface voxels. This is exactly
    ``M & ~binary_erosion(M, cross-shaped 3x3x3 structure, border_value=0)``, the same surface that
    ``medpy.metric.binary`` uses with its default ``connectivity=1``.
Directed surface distances
    For every voxel of ``S(P)`` the Euclidean distance in mm between voxel centres to the nearest
    voxel of ``S(T)`` (``scipy.ndimage.distance_transform_edt(~S(T), sampling=spacing_mm)``
    read at ``S(P)``), and vice versa. A voxel lying on both surfaces has distance 0.
HD95
    MONAI / DeepMind-style symmetric robust Hausdorff distance: the maximum of the two *directed*
    95th percentiles, ``max(P95(d(S_P -> S_T)), P95(d(S_T -> S_P)))``, with NumPy's default
    (linear-interpolation) percentile. medpy's ``hd95`` differs: it takes the 95th percentile of
    the *pooled* distances of both directions, which lies between the two directed percentiles
    (up to interpolation effects) and so is usually smaller than ours on asymmetric errors.
NSD (normalised surface Dice) at tolerance ``tau`` mm, voxel-count version
    ``(#{p in S_P : d(p, S_T) <= tau} + #{t in S_T : d(t, S_P) <= tau}) / (|S_P| + |S_T|)``.
    DeepMind's ``surface_distance.compute_surface_dice_at_tolerance`` instead places surface
    elements ("surfels") on the voxel-corner grid and weights each by its surface area in mm², so
    an element on a thick-slice face counts more than one on a thin face. Both give 1 for identical
    masks and 0 for masks further apart than ``tau``; on large smooth shapes they agree to a few
    hundredths, on small or jagged shapes they can differ more.
Surfel-weighted HD95 and NSD (``hd95_surfel_mm``, ``nsd_surfel``): the literature's variant
    Computed with DeepMind's ``surface-distance`` package, which the MSD challenge used for NSD:
    surface elements on the voxel-corner grid, each weighted by its area in mm². HD95 is the
    maximum of the two directed area-weighted 95th percentiles (``compute_robust_hausdorff``), NSD
    the area within tolerance over the total area (``compute_surface_dice_at_tolerance``). Use
    these columns to set numbers beside published ones; the voxel-count columns above are kept
    for continuity. On fragmented masks the two HD95 definitions can differ by tens of mm. The
    empty-mask conventions are the same as below.
Slice Dice (what a 2D study reports)
    The mean over the 2D slices along ``axis`` (axial = 2 for (X, Y, Z) arrays) of the per-slice
    Dice, taken over the slices where the truth OR the prediction of that class is non-empty
    (slices empty in both are skipped, they carry no information; slices with a false positive or
    a miss count as Dice 0). NaN if no slice qualifies.
Empty masks
    Both empty: Dice, HD95 and NSD are NaN (undefined, excluded by ``nan``-aggregation).
    Exactly one empty: Dice 0.0, HD95 ``inf``, NSD 0.0.
Lesions (lesion-level detection, tumour class)
    A *lesion* is a connected component of one class's mask, with full 3D 26-connectivity by
    default (two voxels belong to the same lesion if they share a face, an edge or a corner; see
    :func:`lesion_detection`). Per case: ``lesions_true`` = components of the true mask;
    ``lesions_found`` = true components that share at least one voxel with the predicted mask
    (overlap, not adjacency: a prediction that only touches a lesion from outside does not find
    it); ``lesions_predicted`` = components of the predicted mask; ``fp_components`` = predicted
    components that share no voxel with the true mask; ``lesion_sensitivity`` =
    ``lesions_found / lesions_true``, NaN when the case has no true lesion. One predicted
    component overlapping two true lesions finds both and is no false positive; two predicted
    components on one true lesion find it once and are both true positives.
Lesion aggregation
    :func:`summarise_lesions` pools the counts over cases: sensitivity = ``sum(found) /
    sum(true)`` (each lesion weighs the same, whichever case it is in; NaN if no case has a true
    lesion) and false-positive components per case = ``sum(fp_components) / n_cases`` over ALL
    cases, with or without a true lesion (a tumour predicted in a tumour-free case is a false
    positive too).
Aggregation
    :func:`summarise` reports mean / median / std / min / max over the FINITE values only and
    counts NaN and infinite values separately (``n_nan``, ``n_inf``); an ``inf`` HD95 is therefore
    never averaged in and must be reported through ``n_inf``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage

from pancreas_seg.core.labels import CLASS_LABELS, class_mask

HD_PERCENTILE = 95.0
LESION_CONNECTIVITY = 3
"""Default lesion neighbourhood for :func:`lesion_detection`: 3 = full 26-connectivity in 3D."""
LESION_KEYS = ("lesions_true", "lesions_found", "lesions_predicted", "fp_components", "lesion_sensitivity")
"""The keys of :func:`lesion_detection`'s result, in column order."""


def _as_bool(mask: np.ndarray) -> np.ndarray:
    """Return ``mask != 0`` as a boolean array (no copy if already boolean)."""
    mask = np.asarray(mask)
    return mask if mask.dtype == np.bool_ else mask != 0


def _check_pair(pred: np.ndarray, truth: np.ndarray) -> None:
    """Raise ValueError unless ``pred`` and ``truth`` have the same shape."""
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} != truth shape {truth.shape}")


def _check_spacing(spacing_mm: Sequence[float], ndim: int) -> tuple[float, ...]:
    """Validate voxel spacing (one positive finite value in mm per array axis)."""
    spacing = tuple(float(s) for s in spacing_mm)
    if len(spacing) != ndim:
        raise ValueError(f"spacing_mm has {len(spacing)} values, the masks have {ndim} axes")
    if not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing_mm must be positive and finite, got {spacing}")
    return spacing


def _crop_to_union(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop two boolean masks to the bounding box of their union, padded by 1 background voxel.

    The padding is background on every side (also where the box touches the array border, which
    matches "outside the array is background"), so surfaces and distances are exactly those of
    the full arrays. Both masks must not be empty together.
    """
    union = pred | truth
    box = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        nonzero = np.flatnonzero(union.any(axis=other))
        box.append(slice(int(nonzero[0]), int(nonzero[-1]) + 1))
    box_t = tuple(box)
    return np.pad(pred[box_t], 1), np.pad(truth[box_t], 1)


def surface_voxels(mask: np.ndarray) -> np.ndarray:
    """Boolean surface of a mask: foreground voxels with a face neighbour in background.

    Args:
        mask: boolean/0-1 array, any ndim; outside the array counts as background.

    Returns:
        Boolean array of the same shape.
    """
    mask = _as_bool(mask)
    if not mask.any():
        return np.zeros(mask.shape, dtype=bool)
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Volumetric Dice ``2|P ∩ T| / (|P| + |T|)`` of two masks of equal shape.

    Returns:
        A float in [0, 1]; NaN when both masks are empty, 0.0 when exactly one is empty.
    """
    p, t = _as_bool(pred), _as_bool(truth)
    _check_pair(p, t)
    size_p, size_t = int(np.count_nonzero(p)), int(np.count_nonzero(t))
    if size_p + size_t == 0:
        return float("nan")
    return 2.0 * int(np.count_nonzero(p & t)) / (size_p + size_t)


def surface_distances_mm(pred: np.ndarray, truth: np.ndarray,
                         spacing_mm: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm between two masks (definitions in the module docstring).

    Args:
        pred, truth: boolean/0-1 masks of equal shape (X, Y, Z).
        spacing_mm: voxel size in mm along each array axis.

    Returns:
        ``(d_pred_to_truth, d_truth_to_pred)``: float64 1D arrays with one entry per surface voxel
        of pred (resp. truth), in C order of the voxels. If the *other* mask is empty the
        distances are ``inf``; an empty mask gives an empty array (so both empty -> two empty
        arrays).
    """
    p, t = _as_bool(pred), _as_bool(truth)
    _check_pair(p, t)
    spacing = _check_spacing(spacing_mm, p.ndim)
    has_p, has_t = bool(p.any()), bool(t.any())
    if not (has_p and has_t):
        n_p = int(np.count_nonzero(surface_voxels(p))) if has_p else 0
        n_t = int(np.count_nonzero(surface_voxels(t))) if has_t else 0
        return np.full(n_p, np.inf), np.full(n_t, np.inf)
    p, t = _crop_to_union(p, t)
    surf_p, surf_t = surface_voxels(p), surface_voxels(t)
    dist_to_t = ndimage.distance_transform_edt(~surf_t, sampling=spacing)
    dist_to_p = ndimage.distance_transform_edt(~surf_p, sampling=spacing)
    return (np.asarray(dist_to_t[surf_p], dtype=np.float64),
            np.asarray(dist_to_p[surf_t], dtype=np.float64))


def _hd95_from_distances(d_pt: np.ndarray, d_tp: np.ndarray) -> float:
    """HD95 (max of directed 95th percentiles) from directed distance arrays."""
    if d_pt.size == 0 and d_tp.size == 0:
        return float("nan")
    if d_pt.size == 0 or d_tp.size == 0:
        return float("inf")
    return float(max(np.percentile(d_pt, HD_PERCENTILE), np.percentile(d_tp, HD_PERCENTILE)))


def _nsd_from_distances(d_pt: np.ndarray, d_tp: np.ndarray, tolerance_mm: float) -> float:
    """Voxel-count NSD from directed distance arrays (``inf`` distances never count)."""
    total = d_pt.size + d_tp.size
    if total == 0:
        return float("nan")
    within = int(np.count_nonzero(d_pt <= tolerance_mm)) + int(np.count_nonzero(d_tp <= tolerance_mm))
    return within / total


def hd95_mm(pred: np.ndarray, truth: np.ndarray, spacing_mm: Sequence[float]) -> float:
    """Symmetric robust Hausdorff distance in mm: ``max(P95(d_P->T), P95(d_T->P))``.

    Args:
        pred, truth: boolean/0-1 masks of equal shape (X, Y, Z).
        spacing_mm: voxel size in mm along each array axis.

    Returns:
        HD95 in mm (>= 0); NaN when both masks are empty, ``inf`` when exactly one is empty.
    """
    return _hd95_from_distances(*surface_distances_mm(pred, truth, spacing_mm))


def nsd(pred: np.ndarray, truth: np.ndarray, spacing_mm: Sequence[float],
        tolerance_mm: float) -> float:
    """Normalised surface Dice (voxel-count version) at ``tolerance_mm`` (distance <= tolerance).

    Args:
        pred, truth: boolean/0-1 masks of equal shape (X, Y, Z).
        spacing_mm: voxel size in mm along each array axis.
        tolerance_mm: tolerance in mm (>= 0).

    Returns:
        A float in [0, 1]; NaN when both masks are empty, 0.0 when exactly one is empty.
    """
    if tolerance_mm < 0:
        raise ValueError(f"tolerance_mm must be >= 0, got {tolerance_mm}")
    return _nsd_from_distances(*surface_distances_mm(pred, truth, spacing_mm), tolerance_mm)


def surfel_surface_metrics(pred: np.ndarray, truth: np.ndarray, spacing_mm: Sequence[float],
                           tolerance_mm: float) -> tuple[float, float]:
    """Surfel-weighted ``(HD95 in mm, NSD at tolerance_mm)`` as DeepMind's ``surface-distance`` computes them.

    Args:
        pred, truth: boolean/0-1 masks of equal shape (X, Y, Z), 3D.
        spacing_mm: voxel size in mm along each array axis.
        tolerance_mm: NSD tolerance in mm (>= 0).

    Returns:
        ``(hd95_mm, nsd)``: ``(nan, nan)`` when both masks are empty, ``(inf, 0.0)`` when exactly one is.
    """
    from surface_distance import metrics as surface_distance  # noqa: PLC0415 - optional cost at import

    if tolerance_mm < 0:
        raise ValueError(f"tolerance_mm must be >= 0, got {tolerance_mm}")
    pred, truth = _as_bool(pred), _as_bool(truth)
    _check_pair(pred, truth)
    spacing = _check_spacing(spacing_mm, pred.ndim)
    if pred.ndim != 3:
        raise ValueError(f"surfel-weighted metrics need 3D masks, got {pred.ndim}D")
    has_pred, has_truth = bool(pred.any()), bool(truth.any())
    if not has_pred and not has_truth:
        return float("nan"), float("nan")
    if not has_pred or not has_truth:
        return float("inf"), 0.0
    with warnings.catch_warnings():   # the package calls scipy.ndimage.morphology, deprecated in SciPy 1.x
        warnings.simplefilter("ignore", DeprecationWarning)
        distances = surface_distance.compute_surface_distances(truth, pred, spacing)
    return (float(surface_distance.compute_robust_hausdorff(distances, HD_PERCENTILE)),
            float(surface_distance.compute_surface_dice_at_tolerance(distances, tolerance_mm)))


def case_metrics(pred_labels: np.ndarray, truth_labels: np.ndarray, spacing_mm: Sequence[float],
                 tolerance_mm: float) -> list[dict]:
    """Dice, HD95 (mm) and NSD (voxel-count and surfel-weighted) of every class of one case.

    Args:
        pred_labels, truth_labels: integer label maps (X, Y, Z) on the original grid
            (0 background, 1 pancreas, 2 tumour).
        spacing_mm: voxel size in mm along each array axis.
        tolerance_mm: NSD tolerance in mm.

    Returns:
        One dict per class, in :data:`~pancreas_seg.core.labels.CLASS_LABELS` order:
        ``{"class", "dice", "hd95_mm", "nsd", "hd95_surfel_mm", "nsd_surfel"}``.
    """
    pred_labels, truth_labels = np.asarray(pred_labels), np.asarray(truth_labels)
    _check_pair(pred_labels, truth_labels)
    rows = []
    for name in CLASS_LABELS:
        p = class_mask(pred_labels, name)
        t = class_mask(truth_labels, name)
        d_pt, d_tp = surface_distances_mm(p, t, spacing_mm)
        hd95_surfel, nsd_surfel = surfel_surface_metrics(p, t, spacing_mm, tolerance_mm)
        rows.append({
            "class": name,
            "dice": dice(p, t),
            "hd95_mm": _hd95_from_distances(d_pt, d_tp),
            "nsd": _nsd_from_distances(d_pt, d_tp, tolerance_mm),
            "hd95_surfel_mm": hd95_surfel,
            "nsd_surfel": nsd_surfel,
        })
    return rows


def slice_dice(pred_labels: np.ndarray, truth_labels: np.ndarray, class_name: str, *,
               axis: int) -> float:
    """Mean per-slice Dice over the slices where the truth or the prediction is non-empty.

    Args:
        pred_labels, truth_labels: integer label maps of equal shape (X, Y, Z), file voxel order.
        class_name: a key of :data:`~pancreas_seg.core.labels.CLASS_LABELS` (``"pancreas"`` or ``"tumour"``).
        axis: the slicing array axis, required: for axial slices the file's axial axis,
            :func:`pancreas_seg.imaging.geometry.axial_axis` of its affine (``ScanGeometry.axial_axis``);
            it is axis 2 only for files stored with the third axis inferior-superior.

    Returns:
        Mean of the 2D Dice of the qualifying slices, in [0, 1]; NaN if no slice has that class in
        either map.
    """
    pred_labels, truth_labels = np.asarray(pred_labels), np.asarray(truth_labels)
    _check_pair(pred_labels, truth_labels)
    p = np.moveaxis(class_mask(pred_labels, class_name), axis, 0)
    t = np.moveaxis(class_mask(truth_labels, class_name), axis, 0)
    p = p.reshape(p.shape[0], -1)
    t = t.reshape(t.shape[0], -1)
    size_p = p.sum(axis=1, dtype=np.int64)
    size_t = t.sum(axis=1, dtype=np.int64)
    inter = (p & t).sum(axis=1, dtype=np.int64)
    used = (size_p + size_t) > 0
    if not used.any():
        return float("nan")
    return float(np.mean(2.0 * inter[used] / (size_p[used] + size_t[used])))


def lesion_detection(pred_labels: np.ndarray, truth_labels: np.ndarray, class_name: str = "tumour", *,
                     connectivity: int = LESION_CONNECTIVITY) -> dict[str, int | float]:
    """Lesion-level detection counts of one case: lesions found, missed and falsely predicted.

    Lesions are the connected components of the class mask (definitions in the module docstring).
    Full 26-connectivity (``connectivity=3``) is the default because a lesion counter must not
    split one lesion into several: small, thin or obliquely running masses and nearest-neighbour
    resampled predictions often hold together only through an edge or a corner, and on thick-slice
    CT a mass that shifts in-plane from one slice to the next touches its neighbour slice only
    diagonally. Splitting would inflate both the lesion and the false-positive counts. The
    neighbourhood is on the voxel grid, whatever the spacing.

    Args:
        pred_labels, truth_labels: integer label maps of equal shape (X, Y, Z) on the original grid
            (0 background, 1 pancreas, 2 tumour); any integer dtype.
        class_name: a key of :data:`~pancreas_seg.core.labels.CLASS_LABELS`; ``"tumour"`` (label 2) for
            lesion counting.
        connectivity: neighbourhood of ``scipy.ndimage.generate_binary_structure``, 1..ndim
            (1 = faces only, 6-connectivity in 3D; 2 = faces and edges, 18; 3 = full, 26).

    Returns:
        ``{"lesions_true", "lesions_found", "lesions_predicted", "fp_components"}`` as ints and
        ``"lesion_sensitivity"`` = found / true as a float in [0, 1], NaN when ``lesions_true`` is 0.
    """
    pred_labels, truth_labels = np.asarray(pred_labels), np.asarray(truth_labels)
    _check_pair(pred_labels, truth_labels)
    if not 1 <= connectivity <= max(truth_labels.ndim, 1):
        raise ValueError(f"connectivity must be in 1..{truth_labels.ndim}, got {connectivity}")
    structure = ndimage.generate_binary_structure(truth_labels.ndim, connectivity)
    truth = class_mask(truth_labels, class_name)
    pred = class_mask(pred_labels, class_name)
    truth_components, n_true = ndimage.label(truth, structure=structure)
    pred_components, n_pred = ndimage.label(pred, structure=structure)
    overlap = truth & pred
    n_found = int(np.unique(truth_components[overlap]).size)   # all > 0: truth is set there
    n_pred_hitting = int(np.unique(pred_components[overlap]).size)
    return {
        "lesions_true": int(n_true),
        "lesions_found": n_found,
        "lesions_predicted": int(n_pred),
        "fp_components": int(n_pred) - n_pred_hitting,
        "lesion_sensitivity": n_found / n_true if n_true else float("nan"),
    }


def _lesion_count(case: Mapping[str, float], key: str, index: int) -> int:
    """One non-negative integer count of a per-case lesion record (ints or integral floats)."""
    value = float(case[key])
    if not (np.isfinite(value) and value >= 0 and value == int(value)):
        raise ValueError(f"case {index}: {key} must be a non-negative integer count, got {case[key]!r}")
    return int(value)


def summarise_lesions(cases: Iterable[Mapping[str, float]]) -> dict[str, float | int]:
    """Pooled lesion detection over a set of cases (the per-case results of :func:`lesion_detection`).

    Args:
        cases: one mapping per case with at least ``lesions_true``, ``lesions_found``,
            ``lesions_predicted`` and ``fp_components`` (ints, or integral floats as read back from
            a CSV); every case counts, also the ones without a true lesion.

    Returns:
        ``{"n_cases", "n_cases_with_lesions", "lesions_true", "lesions_found", "lesions_predicted",
        "fp_components"}`` as int sums/counts, ``"lesion_sensitivity"`` = ``sum(found) /
        sum(true)`` (NaN if there is no true lesion) and ``"fp_components_per_case"`` =
        ``sum(fp_components) / n_cases`` (NaN if there are no cases), as floats.

    Raises:
        ValueError: if a count is missing-valued (NaN), negative or fractional, or a case has
            more lesions found than true.
    """
    totals = dict.fromkeys(LESION_KEYS[:4], 0)
    n_cases = n_with_lesions = 0
    for index, case in enumerate(cases):
        counts = {key: _lesion_count(case, key, index) for key in totals}
        if counts["lesions_found"] > counts["lesions_true"]:
            raise ValueError(f"case {index}: lesions_found {counts['lesions_found']} > "
                             f"lesions_true {counts['lesions_true']}")
        for key, value in counts.items():
            totals[key] += value
        n_cases += 1
        n_with_lesions += counts["lesions_true"] > 0
    nan = float("nan")
    return {
        "n_cases": n_cases,
        "n_cases_with_lesions": n_with_lesions,
        **totals,
        "lesion_sensitivity": totals["lesions_found"] / totals["lesions_true"] if totals["lesions_true"] else nan,
        "fp_components_per_case": totals["fp_components"] / n_cases if n_cases else nan,
    }


def summarise(values: Iterable[float]) -> dict[str, float | int]:
    """Summary statistics of per-case values, with NaN and infinities counted, not averaged.

    Args:
        values: per-case metric values (may contain NaN and ``inf``).

    Returns:
        ``{"n", "n_finite", "n_nan", "n_inf", "mean", "median", "std", "min", "max"}``: counts are
        ints; the statistics are floats over the finite values only (NaN if there are none);
        ``std`` is the sample standard deviation (ddof=1; NaN with fewer than two finite values).
    """
    arr = np.asarray(list(values), dtype=np.float64).ravel()
    nan_mask = np.isnan(arr)
    inf_mask = np.isinf(arr)
    finite = arr[~(nan_mask | inf_mask)]
    nan = float("nan")
    return {
        "n": int(arr.size),
        "n_finite": int(finite.size),
        "n_nan": int(np.count_nonzero(nan_mask)),
        "n_inf": int(np.count_nonzero(inf_mask)),
        "mean": float(np.mean(finite)) if finite.size else nan,
        "median": float(np.median(finite)) if finite.size else nan,
        "std": float(np.std(finite, ddof=1)) if finite.size > 1 else nan,
        "min": float(np.min(finite)) if finite.size else nan,
        "max": float(np.max(finite)) if finite.size else nan,
    }
