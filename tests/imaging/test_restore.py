"""Mapping model probabilities back to the original grid: skipping all-background slices is exact."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from pancreas_seg.imaging.preprocess import (
    PreprocessingConfig,
    preprocess_image,
    restore_label_volume,
)
from pancreas_seg.imaging.resize import linear_taps, resize_linear, restore_probability_slices
from pancreas_seg.core.labels import probabilities_to_labels


def _every_slice(probs: np.ndarray, geometry, label_mode: str) -> np.ndarray:
    """Reference: interpolate every slice, then decide."""
    labels = probabilities_to_labels(restore_probability_slices(probs, geometry.grid), label_mode)
    return geometry.from_slices(labels)


@pytest.mark.parametrize("label_mode", ["multiclass", "pancreas"])
@pytest.mark.parametrize("crop_to_body", [False, True])
def test_skipping_background_slices_equals_interpolating_all(label_mode: str, crop_to_body: bool) -> None:
    rng = np.random.default_rng(3)
    hu = np.full((40, 36, 12), -1000, np.int16)
    hu[6:34, 5:30] = 40                                   # a "body" for crop_to_body
    affine = np.diag([1.5, 1.2, 3.0, 1.0])
    config = PreprocessingConfig(image_size_px=(16, 16), crop_to_body=crop_to_body, label_mode=label_mode)
    _, geometry = preprocess_image(hu, affine, config)
    channels = 3 if label_mode == "multiclass" else 1
    logits = ndimage.gaussian_filter(rng.normal(size=(12, 16, 16, channels)), (0, 2, 2, 0)) * 6
    if label_mode == "multiclass":
        logits[..., 0] += 0.5
        logits[[0, 1, 5, 11], ..., 0] += 50.0             # these slices are background everywhere
        probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    else:
        logits[[0, 1, 5, 11]] -= 50.0
        probs = 1 / (1 + np.exp(-logits))
    probs = probs.astype(np.float32)
    expected = _every_slice(probs, geometry, label_mode)
    restored = restore_label_volume(probs, geometry, label_mode)
    assert restored.dtype == np.uint8 and restored.shape == hu.shape
    assert np.array_equal(restored, expected)
    assert 0 < np.count_nonzero(expected) < expected.size   # a non-trivial mask was compared
    assert not restored[:, :, [0, 1, 5, 11]].any()


@pytest.mark.parametrize(("in_hw", "out_hw"), [((16, 16), (40, 36)),     # upsampling, anisotropic
                                               ((37, 23), (512, 300)),   # odd, non-integer factors
                                               ((64, 48), (20, 31)),     # downsampling
                                               ((5, 7), (5, 7)),         # identity
                                               ((1, 9), (4, 9))])        # one source row
def test_resize_linear_equals_scipy_zoom_per_slice(in_hw: tuple[int, int], out_hw: tuple[int, int]) -> None:
    """The separable resize is scipy's order-1, pixel-centred, edge-clamped zoom of each 2D slice."""
    rng = np.random.default_rng(7)
    stack = rng.random((3, *in_hw, 2)).astype(np.float32)
    resized = resize_linear(stack, out_hw)
    assert resized.shape == (3, *out_hw, 2) and resized.dtype == np.float32
    zoom = (out_hw[0] / in_hw[0], out_hw[1] / in_hw[1])
    for k in range(3):
        for c in range(2):
            expected = ndimage.zoom(stack[k, :, :, c].astype(np.float64), zoom, order=1, mode="nearest",
                                    grid_mode=True, prefilter=False)
            assert expected.shape == out_hw
            np.testing.assert_allclose(resized[k, :, :, c], expected, rtol=0, atol=1e-6)


def test_linear_taps_are_convex_and_edge_clamped() -> None:
    low, high, weight = linear_taps(4, 10)
    assert low.min() == 0 and high.max() == 3
    assert ((weight >= 0) & (weight <= 1)).all()
    assert weight[0] == 0 and low[0] == 0                # first output centre lies left of input 0
    assert low[-1] == 3 and weight[-1] == 0              # last output clamped to the last input
    probe = np.arange(4, dtype=np.float32)
    interpolated = (1 - weight) * probe[low] + weight * probe[high]
    assert np.all(np.diff(interpolated) >= 0) and interpolated[0] == 0 and interpolated[-1] == 3


@pytest.mark.parametrize("out_hw", [(23, 19), (50, 70)])   # shrink (anti-aliased) and enlarge
def test_image_resize_matches_scipy_stack_zoom(out_hw: tuple[int, int]) -> None:
    """Image slices: Gaussian anti-aliasing when shrinking, then exactly scipy's linear zoom of the
    (Z, H, W) stack with Z left alone (no interpolation across slices)."""
    from pancreas_seg.imaging.resize import InPlaneGrid, resize_image_slices  # noqa: PLC0415

    rng = np.random.default_rng(8)
    stack = (rng.normal(size=(4, 40, 36)) * 300).astype(np.float32)   # HU-like magnitudes
    grid = InPlaneGrid((40, 36), out_hw, out_hw, (0, 0))
    zoom = (1.0, out_hw[0] / 40, out_hw[1] / 36)
    source = stack
    if zoom[1] < 1 or zoom[2] < 1:
        sigma = (0.0, max(0.0, (1 / zoom[1] - 1) / 2), max(0.0, (1 / zoom[2] - 1) / 2))
        source = ndimage.gaussian_filter(stack, sigma=sigma, mode="nearest")
    expected = ndimage.zoom(source.astype(np.float64), zoom, order=1, mode="nearest", grid_mode=True,
                            prefilter=False)
    resized = resize_image_slices(stack, grid, fill_value=-1000.0)
    assert resized.shape == (4, *out_hw) and resized.dtype == np.float32
    np.testing.assert_allclose(resized, expected, rtol=0, atol=1e-3)        # HU, float32 rounding
