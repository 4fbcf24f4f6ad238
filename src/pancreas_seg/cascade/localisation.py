"""How far stage 1's pancreas box is from the true one: measured on validation cases.

These errors decide the position jitter of stage-2 training crops (see
:mod:`pancreas_seg.cascade.sampler`): stage 2 is trained on crops around the TRUE pancreas, shifted
the way stage 1 misplaces its box on cases it was not trained on. Stage-1 predictions on its own
training cases would be optimistic (it has seen them), so they would teach stage 2 a too-precise
crop; the validation cases give the errors it will make on new scans.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from pancreas_seg.cascade.crops import CropConfig, CropGeometry, PancreasBox


def crop_footprint(crop: CropGeometry) -> PancreasBox:
    """The part of the canonical source slices a crop covers (voxels, clipped to the scan)."""
    h0, h1, w0, w1 = crop.scan.grid.output_box_to_source((0, crop.region_hw[0], 0, crop.region_hw[1]))
    return PancreasBox(crop.z_range[0], crop.z_range[1], h0, h1, w0, w1)


def box_coverage(truth_mask: np.ndarray, box: PancreasBox) -> float:
    """Share of the ``truth_mask`` (Z, H, W) voxels inside ``box``; NaN for an empty mask."""
    total = int(np.count_nonzero(truth_mask))
    if total == 0:
        return float("nan")
    inside = int(np.count_nonzero(truth_mask[box.z0:box.z1, box.h0:box.h1, box.w0:box.w1]))
    return inside / total


def localisation_error(predicted: PancreasBox | None, truth: PancreasBox, truth_mask: np.ndarray,
                       spacing_mm: Sequence[float], crop: CropGeometry | None) -> dict[str, Any]:
    """Errors of one case's stage-1 box against the true box.

    Args:
        predicted: stage 1's box (canonical source voxels), None when it found no pancreas.
        truth: the true pancreas box, same coordinates.
        truth_mask: boolean (Z, H, W) true pancreas on the canonical slices.
        spacing_mm: canonical voxel size (Z, H, W), mm.
        crop: the crop planned from ``predicted`` (None when nothing was found).

    Returns:
        ``found``; ``centre_error_mm`` and ``extent_error_mm`` (predicted - true, per axis Z, H, W);
        ``coverage``: share of the true pancreas inside the crop stage 2 would see.
    """
    if predicted is None:
        nan3 = [math.nan] * 3
        return {"found": False, "centre_error_mm": nan3, "extent_error_mm": nan3, "coverage": 0.0}
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    p, t = np.asarray(predicted.to_list(), float), np.asarray(truth.to_list(), float)
    centre = ((p[1::2] + p[0::2]) - (t[1::2] + t[0::2])) / 2 * spacing
    extent = ((p[1::2] - p[0::2]) - (t[1::2] - t[0::2])) * spacing
    coverage = box_coverage(truth_mask, crop_footprint(crop)) if crop is not None else 0.0
    return {"found": True, "centre_error_mm": centre.tolist(), "extent_error_mm": extent.tolist(),
            "coverage": coverage}


def summarise_localisation(errors: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """RMS centre and extent errors per axis (Z, H, W, mm) over the found cases, misses, coverage."""
    found = [e for e in errors if e["found"]]
    centre = np.asarray([e["centre_error_mm"] for e in found], dtype=np.float64).reshape(-1, 3)
    extent = np.asarray([e["extent_error_mm"] for e in found], dtype=np.float64).reshape(-1, 3)
    coverage = np.asarray([e["coverage"] for e in errors], dtype=np.float64)

    def rms(values: np.ndarray) -> list[float]:
        return np.sqrt(np.mean(values ** 2, axis=0)).tolist() if len(values) else [math.nan] * 3

    return {"n_cases": len(errors), "n_missed": len(errors) - len(found),
            "centre_rms_mm": rms(centre), "extent_rms_mm": rms(extent),
            "centre_max_abs_mm": np.abs(centre).max(axis=0).tolist() if found else [math.nan] * 3,
            "coverage_min": float(coverage.min()) if len(coverage) else math.nan,
            "coverage_mean": float(coverage.mean()) if len(coverage) else math.nan}


def jitter_std_mm(summary: dict[str, Any], config: CropConfig, min_std_mm: float) -> tuple[float, float]:
    """In-plane (H, W) position jitter of training crops, mm: the measured RMS centre error.

    At least ``min_std_mm`` (stage 1 will meet scans unlike the few validation cases) and at most
    half the stored training context (``config.context_mm``), so jittered crops stay in the data.
    """
    measured = summary.get("centre_rms_mm", [math.nan] * 3)[1:]
    cap = max(min_std_mm, config.context_mm / 2)
    return tuple(float(min(cap, max(min_std_mm, 0.0 if math.isnan(m) else m))) for m in measured)  # type: ignore[return-value]
