"""Stage-1 localisation errors and the training jitter they set."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pancreas_seg.cascade.crops import CropConfig, CropGeometry, PancreasBox
from pancreas_seg.cascade.localisation import (
    box_coverage,
    crop_footprint,
    jitter_std_mm,
    localisation_error,
    summarise_localisation,
)


def test_localisation_error_in_mm_per_axis() -> None:
    truth_mask = np.zeros((20, 40, 60), bool)
    truth_mask[5:15, 10:20, 20:50] = True
    truth = PancreasBox(5, 15, 10, 20, 20, 50)
    predicted = PancreasBox(6, 15, 12, 22, 20, 46)   # shifted by (0.5, 2, -2) voxels, resized
    affine = np.diag([0.5, 0.5, 2.0, 1.0])            # RAS: W = x 0.5 mm, H = y 0.5 mm, Z = 2 mm
    crop = CropGeometry.plan((60, 40, 20), affine, predicted, CropConfig(spacing_mm=0.5, size_px=(8, 8),
                                                                         margin_mm=0.0, z_margin_mm=0.0))
    error = localisation_error(predicted, truth, truth_mask, (2.0, 0.5, 0.5), crop)
    assert error["found"]
    np.testing.assert_allclose(error["centre_error_mm"], [1.0, 1.0, -1.0])
    np.testing.assert_allclose(error["extent_error_mm"], [-2.0, 0.0, -2.0])
    # the crop (no margins) misses the truth's first slice, two rows and four columns
    assert error["coverage"] == pytest.approx((9 * 8 * 26) / (10 * 10 * 30))
    missed = localisation_error(None, truth, truth_mask, (2.0, 0.5, 0.5), None)
    assert not missed["found"] and missed["coverage"] == 0.0 and math.isnan(missed["centre_error_mm"][0])


def test_summary_rms_and_misses() -> None:
    errors = [{"found": True, "centre_error_mm": [1.0, 3.0, -4.0], "extent_error_mm": [0.0, 2.0, 2.0],
               "coverage": 1.0},
              {"found": True, "centre_error_mm": [-1.0, -3.0, 0.0], "extent_error_mm": [0.0, -2.0, 0.0],
               "coverage": 0.9},
              {"found": False, "centre_error_mm": [math.nan] * 3, "extent_error_mm": [math.nan] * 3,
               "coverage": 0.0}]
    summary = summarise_localisation(errors)
    assert summary["n_cases"] == 3 and summary["n_missed"] == 1
    np.testing.assert_allclose(summary["centre_rms_mm"], [1.0, 3.0, math.sqrt(8.0)])
    np.testing.assert_allclose(summary["centre_max_abs_mm"], [1.0, 3.0, 4.0])
    assert summary["coverage_min"] == 0.0 and summary["coverage_mean"] == pytest.approx(1.9 / 3)


def test_jitter_is_the_measured_error_with_a_floor_and_a_cap() -> None:
    config = CropConfig(context_mm=10.0)
    assert jitter_std_mm({"centre_rms_mm": [9.0, 4.0, 1.0]}, config, 2.0) == (4.0, 2.0)
    assert jitter_std_mm({"centre_rms_mm": [0.0, 40.0, math.nan]}, config, 2.0) == (5.0, 2.0)


def test_crop_footprint_and_coverage() -> None:
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    crop = CropGeometry.plan((50, 40, 10), affine, PancreasBox(2, 5, 10, 20, 10, 30),
                             CropConfig(spacing_mm=2.0, size_px=(8, 8), margin_mm=0.0, z_margin_mm=1.0))
    footprint = crop_footprint(crop)
    assert (footprint.z0, footprint.z1) == (1, 6)
    assert footprint.h0 <= 10 and footprint.h1 >= 20 and footprint.w0 <= 10 and footprint.w1 >= 30
    mask = np.zeros((10, 40, 50), bool)
    mask[3, 15, 15] = mask[9, 0, 0] = True
    assert box_coverage(mask, footprint) == 0.5
    assert math.isnan(box_coverage(np.zeros_like(mask), footprint))
