"""Tests of connected-component post-processing."""

from __future__ import annotations

import numpy as np
import pytest

from pancreas_seg.evaluation.postprocessing import keep_largest_component, keep_largest_foreground


def test_keep_largest_component_two_blobs() -> None:
    mask = np.zeros((20, 20, 10), bool)
    mask[1:8, 1:8, 1:6] = True  # 245 voxels
    mask[12:15, 12:15, 2:5] = True  # 27 voxels
    kept = keep_largest_component(mask)
    assert kept.dtype == bool
    assert kept.sum() == 245 and kept[1:8, 1:8, 1:6].all() and not kept[12:15, 12:15, 2:5].any()


def test_connectivity_diagonal_contact() -> None:
    mask = np.zeros((6, 6, 6), np.uint8)
    mask[0:2, 0:2, 0:2] = 1  # 8 voxels
    mask[2, 2, 2] = 1  # touches only at a corner
    mask[4:6, 4:6, 4:6] = 1  # 8 voxels, separate
    assert keep_largest_component(mask, connectivity=3).sum() == 9  # 26-connected: corner joins
    kept6 = keep_largest_component(mask, connectivity=1)
    assert kept6.sum() == 8 and kept6[0, 0, 0]  # tie -> first in C order


def test_keep_largest_component_empty_and_single() -> None:
    empty = np.zeros((3, 4, 5), bool)
    assert not keep_largest_component(empty).any()
    one = empty.copy()
    one[1, 2, 3] = True
    np.testing.assert_array_equal(keep_largest_component(one), one)
    with pytest.raises(ValueError):
        keep_largest_component(one, connectivity=4)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int64])
def test_keep_largest_foreground(dtype) -> None:
    labels = np.zeros((20, 20, 10), dtype)
    labels[2:10, 2:10, 2:8] = 1
    labels[4:6, 4:6, 3:5] = 2  # tumour inside the kept component
    labels[14:17, 14:17, 2:5] = 2  # a separate small tumour-only island
    labels[14:16, 2:4, 7:9] = 1  # a separate small pancreas island
    out = keep_largest_foreground(labels)
    assert out.dtype == labels.dtype and out.shape == labels.shape
    np.testing.assert_array_equal(out[2:10, 2:10, 2:8], labels[2:10, 2:10, 2:8])
    assert (out == 2).sum() == 2 * 2 * 2
    assert not out[14:17, 14:17, 2:5].any() and not out[14:16, 2:4, 7:9].any()
    assert set(np.unique(out)) == {0, 1, 2}


def test_keep_largest_foreground_counts_tumour_as_pancreas() -> None:
    labels = np.zeros((12, 12, 6), np.uint8)
    labels[1:4, 1:4, 1:3] = 1  # 18 voxels
    labels[6:11, 6:11, 1:5] = 2  # 100 voxels of tumour only, the largest 1 ∪ 2 component
    out = keep_largest_foreground(labels)
    assert (out == 2).sum() == 100 and (out == 1).sum() == 0


def test_remove_small_components_relabels_only_components_below_the_volume() -> None:
    from pancreas_seg.evaluation.postprocessing import remove_small_components

    labels = np.zeros((10, 10, 10), np.uint8)
    labels[1:9, 1:9, 1:9] = 1
    labels[2:5, 2:5, 2:5] = 2        # 27 voxels
    labels[7, 7, 7] = 2              # 1 voxel
    labels[6, 2, 6] = labels[7, 3, 7] = 2   # 2 voxels, diagonal neighbours (one 26-connected component)
    filtered, removed = remove_small_components(labels, 2, min_volume_mm3=4.0, voxel_volume_mm3=2.0, replacement=1)
    assert removed == 1
    assert (filtered[2:5, 2:5, 2:5] == 2).all()            # 54 mm³ kept
    assert filtered[7, 7, 7] == 1 and filtered[6, 2, 6] == 2  # 2 mm³ removed; the 4 mm³ pair is kept (>=)
    assert labels[7, 7, 7] == 2                              # the input is not modified
    unchanged, none = remove_small_components(labels, 2, 0.0, 2.0, 1)
    assert none == 0 and unchanged is labels
