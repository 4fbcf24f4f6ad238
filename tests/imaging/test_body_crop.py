"""Framing the model input on the patient's body (``preprocessing.crop_to_body``)."""

from __future__ import annotations

import numpy as np
import pytest

from pancreas_seg.imaging.nifti_io import save_nifti
from pancreas_seg.imaging.preprocess import (
    PreprocessingConfig,
    axial_view,
    plan_case_geometry,
    plan_scan_geometry,
    preprocess_image,
    preprocess_label,
    restore_label_volume,
)
from pancreas_seg.imaging.resize import body_bounding_box, plan_in_plane_grid
from pancreas_seg.phantoms import PhantomConfig, make_phantom

# A wide field of view (96 px x 5 mm = 480 mm) around a ~300 x 220 mm body, like a real scan.
WIDE = PhantomConfig(shape_xy_px=96, spacing_xy_mm=(5.0, 5.0), slice_thickness_mm=(6.0, 6.0),
                     z_extent_mm=(90.0, 90.0), tumour_probability=1.0, non_ras_every=0)


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(3, WIDE)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_body_box_ignores_a_table_separated_by_air() -> None:
    slices = np.full((3, 40, 50), -1000.0, np.float32)
    slices[:, 5:25, 10:40] = 40.0      # body: rows 5..24, cols 10..39
    slices[1, 30:32, 0:50] = 300.0     # scanner table below, across the whole width, air gap between
    assert body_bounding_box(slices, -500.0) == (5, 25, 10, 40)
    slices[2, 8:10, 42:45] = 40.0      # a small detached blob (cable) is ignored too
    assert body_bounding_box(slices, -500.0) == (5, 25, 10, 40)


def test_body_box_is_none_without_body() -> None:
    assert body_bounding_box(np.full((2, 8, 8), -1000.0, np.float32), -500.0) is None


def test_grid_fits_the_body_with_margin_and_keeps_pixels_square() -> None:
    # 200 x 300 px source at 1 x 2 mm: body rows 50..149 (100 mm), cols 100..199 (200 mm)
    grid = plan_in_plane_grid((200, 300), (1.0, 2.0), (64, 64), body_box_hw=(50, 150, 100, 200),
                              body_margin_mm=10.0)
    spacing_mm = (200 + 2 * 10) / 64          # the wider extent (W: 200 mm + margins) sets it
    assert grid.resampled_hw == (round(200 * 1.0 / spacing_mm), round(300 * 2.0 / spacing_mm))
    # body centre (row 100, col 150 in source px) lands on the output centre (32, 32)
    centre_out = (100 * 1.0 / spacing_mm + grid.offset_hw[0], 150 * 2.0 / spacing_mm + grid.offset_hw[1])
    assert np.allclose(centre_out, (32, 32), atol=0.5)


def test_target_spacing_with_body_centres_on_the_body() -> None:
    grid = plan_in_plane_grid((100, 100), (2.0, 2.0), (40, 40), target_spacing_mm=4.0,
                              body_box_hw=(10, 50, 60, 100))
    assert grid.resampled_hw == (50, 50)
    assert grid.offset_hw == (20 - 15, 20 - 40)   # body centre (15, 40) resampled px -> (20, 20)
    centred = plan_in_plane_grid((100, 100), (2.0, 2.0), (40, 40), target_spacing_mm=4.0)
    assert centred.offset_hw == (-5, -5)


def test_crop_to_body_enlarges_the_anatomy_and_restores_exactly(phantom) -> None:
    size = (64, 64)
    whole = PreprocessingConfig(image_size_px=size)
    framed = PreprocessingConfig(image_size_px=size, crop_to_body=True, body_margin_mm=10.0)
    _, whole_geometry = preprocess_image(phantom.hu, phantom.affine, whole)
    image, geometry = preprocess_image(phantom.hu, phantom.affine, framed)
    assert image.shape[1:] == size
    label_whole = preprocess_label(phantom.label, whole_geometry, "pancreas")
    label = preprocess_label(phantom.label, geometry, "pancreas")
    # the body (here ~300 of 480 mm wide) fills the frame: the pancreas covers more model pixels
    assert label.sum() > 1.8 * label_whole.sum()
    # a margin of air is left on every side; the body touches none of the borders
    body = image > 0.0  # window-normalised: air is 0
    assert not body[:, 0].any() and not body[:, -1].any()
    assert not body[:, :, 0].any() and not body[:, :, -1].any()
    restored = restore_label_volume(label[..., None].astype(np.float32), geometry, "pancreas")
    assert restored.shape == phantom.label.shape
    assert _dice(restored > 0, phantom.label > 0) > 0.85


def test_crop_to_body_needs_the_voxels(phantom) -> None:
    framed = PreprocessingConfig(image_size_px=(32, 32), crop_to_body=True)
    with pytest.raises(ValueError, match="crop_to_body"):
        plan_scan_geometry(phantom.hu.shape, phantom.affine, framed)


def test_all_air_volume_falls_back_to_the_whole_slice() -> None:
    air = np.full((16, 16, 4), -1000, np.int16)
    framed = PreprocessingConfig(image_size_px=(8, 8), crop_to_body=True)
    image, geometry = preprocess_image(air, np.diag([2.0, 2.0, 3.0, 1.0]), framed)
    assert image.shape == (4, 8, 8)
    assert geometry.grid.resampled_hw == (8, 8) and geometry.grid.offset_hw == (0, 0)


def test_planning_from_the_file_matches_preprocessing(phantom, tmp_path) -> None:
    path = tmp_path / "case.nii.gz"
    save_nifti(path, phantom.hu, phantom.affine)
    for config in (PreprocessingConfig(image_size_px=(48, 48)),
                   PreprocessingConfig(image_size_px=(48, 48), crop_to_body=True)):
        _, geometry = preprocess_image(phantom.hu, phantom.affine, config)
        planned = plan_case_geometry(str(path), config)
        assert planned.grid == geometry.grid   # the file stores the affine as float32: compare loosely
        assert planned.body_box_hw == geometry.body_box_hw
        assert (planned.body_box_hw is not None) == config.crop_to_body
        assert np.array_equal(planned.ornt, geometry.ornt)
        assert np.allclose(planned.affine, geometry.affine, atol=1e-4)
        # and preprocessing with the planned geometry uses it as is (no re-planning)
        image, used = preprocess_image(phantom.hu, phantom.affine, config, geometry=planned)
        assert used is planned


def test_axial_view_is_radiological(phantom) -> None:
    view = axial_view(phantom.label, phantom.affine)
    assert view.shape == (phantom.label.shape[2], phantom.label.shape[1], phantom.label.shape[0])
    # RAS storage: row 0 of the view is the most anterior y, column 0 the patient's right (max x)
    for z in (0, phantom.label.shape[2] // 2):
        assert np.array_equal(view[z], phantom.label[::-1, ::-1, z].T)
