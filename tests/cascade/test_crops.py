"""Cascade crops: the pancreas box, the crop geometry and its inverse, in every axis order.

Real arrays and real geometry only. A volume is stored in all 48 axis orders (permutations and
flips of its voxel axes, each with its correct affine): every order must give the same crop
arrays, and crop -> uncrop must give back exactly the original labels on the original grid.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from nibabel import orientations as ornt_lib

from pancreas_seg.cascade.crops import (
    CropConfig,
    CropGeometry,
    PancreasBox,
    extract_window,
    keep_main_components,
    locate_pancreas,
    mask_box,
    tile_starts,
)
from pancreas_seg.imaging.geometry import ScanGeometry
from pancreas_seg.imaging.resize import InPlaneGrid
from pancreas_seg.core.labels import PANCREAS, TUMOUR

SPACING_MM = (0.8, 0.8, 2.5)   # RAS voxel size (x, y, z), mm: in-plane isotropic, thick slices
ORDERS = [(perm, flips) for perm in itertools.permutations(range(3))
          for flips in itertools.product((1, -1), repeat=3)]


def _ras_case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HU (X, Y, Z) = (60, 50, 24) RAS volume, its labels (pancreas blob with a tumour), affine."""
    rng = np.random.default_rng(0)
    hu = rng.normal(40.0, 20.0, size=(60, 50, 24)).astype(np.float32)
    x, y, z = np.meshgrid(*(np.arange(n) for n in hu.shape), indexing="ij")
    pancreas = ((x - 30) / 18) ** 2 + ((y - 22) / 8) ** 2 + ((z - 11) / 5) ** 2 <= 1
    tumour = ((x - 36) / 4) ** 2 + ((y - 22) / 4) ** 2 + ((z - 11) / 2) ** 2 <= 1
    labels = np.where(tumour, TUMOUR, np.where(pancreas, PANCREAS, 0)).astype(np.uint8)
    hu[labels > 0] = 100.0
    affine = np.diag([*SPACING_MM, 1.0])
    affine[:3, 3] = (-20.0, 15.0, -100.0)
    return hu, labels, affine


def _stored(array: np.ndarray, affine: np.ndarray, perm: tuple[int, ...],
            flips: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The same world volume stored with voxel axes permuted/flipped (nibabel's orientation maths)."""
    ornt = np.array([[perm.index(axis), flips[axis]] for axis in range(3)], dtype=float)
    stored = ornt_lib.apply_orientation(array, ornt)
    return np.ascontiguousarray(stored), affine @ ornt_lib.inv_ornt_aff(ornt, array.shape)


def _canonical_box(labels: np.ndarray, affine: np.ndarray) -> PancreasBox:
    geometry = ScanGeometry.plan(labels.shape, affine, (1, 1))
    box = mask_box(geometry.to_slices(labels) > 0)
    assert box is not None
    return box


@pytest.mark.parametrize(("perm", "flips"), ORDERS, ids=lambda v: "".join(map(str, v)))
def test_crop_and_uncrop_is_exact_on_the_original_grid_in_every_axis_order(perm, flips) -> None:
    hu_ras, labels_ras, affine_ras = _ras_case()
    hu, affine = _stored(hu_ras, affine_ras, perm, flips)
    labels, _ = _stored(labels_ras, affine_ras, perm, flips)
    # crop spacing = the scan's in-plane spacing: the crop only cuts, so the round trip is exact
    config = CropConfig(spacing_mm=0.8, size_px=(16, 16), margin_mm=4.0, z_margin_mm=5.0, context_mm=0.0)
    box = _canonical_box(labels, affine)
    crop = CropGeometry.plan(labels.shape, affine, box, config)
    cropped = crop.label_to_crop(labels)
    assert cropped.sum() > 0 and crop.crop_shape == cropped.shape
    restored = crop.labels_to_volume(cropped)
    assert restored.shape == labels.shape and restored.dtype == labels.dtype
    np.testing.assert_array_equal(restored, labels)
    # the stored geometry survives JSON and gives the same inverse
    again = CropGeometry.from_dict(crop.to_dict())
    np.testing.assert_array_equal(again.labels_to_volume(cropped), labels)
    # every axis order gives the same crop as the RAS file, voxel for voxel
    reference = CropGeometry.plan(labels_ras.shape, affine_ras, _canonical_box(labels_ras, affine_ras), config)
    np.testing.assert_array_equal(cropped, reference.label_to_crop(labels_ras))
    np.testing.assert_array_equal(crop.image_to_crop(hu, fill_value=-1024.0),
                                  reference.image_to_crop(hu_ras, fill_value=-1024.0))


@pytest.mark.parametrize(("perm", "flips"), ORDERS[::5], ids=lambda v: "".join(map(str, v)))
def test_resampled_crop_maps_back_onto_the_same_voxels_in_every_axis_order(perm, flips) -> None:
    _, labels_ras, affine_ras = _ras_case()
    labels, affine = _stored(labels_ras, affine_ras, perm, flips)
    config = CropConfig(spacing_mm=0.5, size_px=(32, 64), margin_mm=5.0, z_margin_mm=0.0, context_mm=0.0)
    crop = CropGeometry.plan(labels.shape, affine, _canonical_box(labels, affine), config)
    assert crop.region_hw[0] >= 32 and crop.region_hw[1] >= 64
    restored = crop.labels_to_volume(crop.label_to_crop(labels))
    # upsample to 0.5 mm then back with nearest neighbour: the pancreas comes back voxel-exact here
    # (0.8 / 0.5 maps every source pixel centre onto a crop pixel that started in it)
    for value in (PANCREAS, TUMOUR):
        truth, back = labels == value, restored == value
        dice = 2 * np.count_nonzero(truth & back) / (truth.sum() + back.sum())
        assert dice > 0.97, (value, dice)
    reference = CropGeometry.plan(labels_ras.shape, affine_ras, _canonical_box(labels_ras, affine_ras), config)
    np.testing.assert_array_equal(crop.label_to_crop(labels), reference.label_to_crop(labels_ras))


def test_crop_keeps_only_the_pancreas_slices_plus_margin() -> None:
    _, labels, affine = _ras_case()
    box = _canonical_box(labels, affine)
    crop = CropGeometry.plan(labels.shape, affine, box, CropConfig(spacing_mm=0.8, size_px=(16, 16),
                                                                    z_margin_mm=5.0))
    assert crop.z_range == (box.z0 - 2, box.z1 + 2)   # 5 mm at 2.5 mm slices
    wide = CropGeometry.plan(labels.shape, affine, box, CropConfig(spacing_mm=0.8, size_px=(16, 16),
                                                                    z_margin_mm=500.0))
    assert wide.z_range == (0, labels.shape[2])       # clipped to the scan


def test_region_is_the_box_plus_margin_and_at_least_the_model_input() -> None:
    _, labels, affine = _ras_case()
    box = _canonical_box(labels, affine)   # in-plane 15 x 37 voxels of 0.8 mm
    small = CropGeometry.plan(labels.shape, affine, box, CropConfig(spacing_mm=0.8, size_px=(48, 48),
                                                                     margin_mm=2.0))
    assert small.region_hw == (48, 48)
    tight = CropGeometry.plan(labels.shape, affine, box, CropConfig(spacing_mm=0.8, size_px=(8, 8),
                                                                     margin_mm=2.0))
    assert tight.region_hw == (box.h1 - box.h0 + 5, box.w1 - box.w0 + 5)   # ceil((n*0.8 + 4) / 0.8)
    context = CropGeometry.plan(labels.shape, affine, box, CropConfig(spacing_mm=0.8, size_px=(8, 8),
                                                                       margin_mm=2.0), context_px=3)
    assert context.region_hw == (tight.region_hw[0] + 6, tight.region_hw[1] + 6)


def test_output_box_to_source_inverts_the_in_plane_grid() -> None:
    identity = InPlaneGrid((40, 60), (40, 60), (40, 60), (0, 0))
    assert identity.output_box_to_source((3, 10, 5, 50)) == (3, 10, 5, 50)
    # 40 x 60 source px resampled to 20 x 30 and placed at offset (6, -2) on a 32 x 24 grid
    grid = InPlaneGrid((40, 60), (20, 30), (32, 24), (6, -2))
    assert grid.output_box_to_source((6, 16, 0, 10)) == (0, 20, 4, 24)
    assert grid.output_box_to_source((0, 32, 0, 24)) == (0, 40, 4, 52)   # padding is clipped away


def test_locate_pancreas_maps_stage1_labels_to_a_source_box_that_holds_the_pancreas() -> None:
    hu, labels, affine = _ras_case()
    geometry = ScanGeometry.plan(labels.shape, affine, (32, 32))   # whole slice squeezed to 32 px
    model_labels = geometry.label_to_model(labels)
    box = locate_pancreas(model_labels, geometry, min_component_fraction=0.1)
    truth = _canonical_box(labels, affine)
    assert box is not None
    assert box.z0 == truth.z0 and box.z1 == truth.z1
    assert box.h0 <= truth.h0 + 1 and box.h1 >= truth.h1 - 1 and box.w0 <= truth.w0 + 1 and box.w1 >= truth.w1 - 1
    assert box.h1 - box.h0 <= truth.h1 - truth.h0 + 4       # tight: rounded outwards by < 2 source px a side
    # an isolated false-positive speck far away does not stretch the box
    speckled = model_labels.copy()
    speckled[2, 1, 1] = PANCREAS
    assert locate_pancreas(speckled, geometry, min_component_fraction=0.1) == box
    assert locate_pancreas(speckled, geometry, min_component_fraction=0.0) != box
    assert locate_pancreas(np.zeros_like(model_labels), geometry, 0.1) is None
    with pytest.raises(ValueError, match="model grid"):
        locate_pancreas(model_labels[:, :16], geometry, 0.1)


def test_keep_main_components_uses_full_3d_connectivity() -> None:
    mask = np.zeros((5, 5, 5), bool)
    mask[1, 1, 1] = mask[2, 2, 2] = True   # corner neighbours: one 26-connected component
    mask[4, 4, 4] = True
    kept = keep_main_components(mask, 1.0)
    assert kept[1, 1, 1] and kept[2, 2, 2] and not kept[4, 4, 4]


def test_tiles_cover_the_region_with_the_requested_overlap() -> None:
    assert tile_starts(64, 64, 0.25) == [0]
    assert tile_starts(60, 64, 0.25) == [-2]
    starts = tile_starts(150, 64, 0.25)
    assert starts[0] == 0 and starts[-1] == 150 - 64
    covered = np.zeros(150, bool)
    for s in starts:
        covered[s:s + 64] = True
    assert covered.all() and max(np.diff(starts)) <= 48


def test_extract_window_pads_outside_the_array() -> None:
    array = np.arange(2 * 4 * 5, dtype=np.float32).reshape(2, 4, 5)
    window = extract_window(array, -1, 3, (3, 4), fill=-9.0)
    assert window.shape == (2, 3, 4)
    np.testing.assert_array_equal(window[:, 1:, :2], array[:, :2, 3:])
    assert (window[:, 0] == -9).all() and (window[:, :, 2:] == -9).all()


def test_crop_config_rejects_bad_settings() -> None:
    assert CropConfig.from_params({"size_px": 48}).size_px == (48, 48)
    with pytest.raises(ValueError, match="spacing_mm"):
        CropConfig(spacing_mm=0.0)
    with pytest.raises(ValueError, match="tile_overlap"):
        CropConfig(tile_overlap=1.0)
