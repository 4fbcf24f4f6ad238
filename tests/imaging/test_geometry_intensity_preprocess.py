"""HU intensity, reorientation and the shared preprocessing path, on hand-built volumes and
small SYNTHETIC phantoms."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from pancreas_seg.imaging.geometry import ScanGeometry, axial_view
from pancreas_seg.imaging.intensity import (
    ForegroundIntensityStats,
    fit_foreground_stats,
    normalise_hu,
    sample_foreground_hu,
    window_hu,
    zscore_hu,
)
from pancreas_seg.imaging.nifti_io import orientation_code
from pancreas_seg.imaging.preprocess import (
    AIR_HU,
    PreprocessingConfig,
    context_stack,
    preprocess_image,
    preprocess_label,
    restore_label_volume,
)
from pancreas_seg.core.labels import probabilities_to_labels, to_training_target
from pancreas_seg.phantoms import PhantomConfig, make_phantom

SMALL = PhantomConfig(shape_xy_px=64, spacing_xy_mm=(5.0, 5.5), slice_thickness_mm=(6.0, 8.0),
                      z_extent_mm=(100.0, 120.0), tumour_probability=1.0)


@pytest.fixture(scope="module")
def phantom():
    case = make_phantom(1, SMALL)
    assert orientation_code(case.affine) == "RAS"
    assert (case.label == 1).any() and (case.label == 2).any()
    return case


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def _reorient(array: np.ndarray, affine: np.ndarray, axcodes: str) -> tuple[np.ndarray, np.ndarray]:
    """Store the same world-space volume in another voxel order (nibabel does the bookkeeping)."""
    ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine),
                                           nib.orientations.axcodes2ornt(tuple(axcodes)))
    out = np.ascontiguousarray(nib.orientations.apply_orientation(array, ornt))
    new_affine = affine @ nib.orientations.inv_ornt_aff(ornt, array.shape)
    assert orientation_code(new_affine) == axcodes
    return out, new_affine


# ------------------------------------------------------------------------------- intensity
def test_window_hu_exact_values_and_float32() -> None:
    hu = np.array([-1000, -100, 70, 240, 3000], dtype=np.int16)
    out = window_hu(hu, (-100.0, 240.0))
    assert out.dtype == np.float32 and out.shape == hu.shape
    assert out.tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]
    assert hu.tolist() == [-1000, -100, 70, 240, 3000]  # input untouched


def test_window_hu_does_not_overflow_on_integer_extremes() -> None:
    extremes = np.array([-32768, -32767, 0, 32766, 32767], dtype=np.int16)
    np.testing.assert_allclose(window_hu(extremes, (-100.0, 240.0)),
                               [0.0, 0.0, 100 / 340, 1.0, 1.0], rtol=0, atol=1e-7)
    # a window spanning the whole int16 range: high - low would overflow in int16
    full = window_hu(extremes, (-32768.0, 32767.0))
    np.testing.assert_allclose(full, [0.0, 1 / 65535, 32768 / 65535, 65534 / 65535, 1.0],
                               rtol=0, atol=1e-6)
    unsigned = window_hu(np.array([0, 100, 65535], dtype=np.uint16), (-100.0, 240.0))
    np.testing.assert_allclose(unsigned, [100 / 340, 200 / 340, 1.0], rtol=0, atol=1e-7)
    assert window_hu(np.array([-2147483648, 2147483647], np.int32), (-100, 240)).tolist() == [0, 1]


def test_window_hu_stays_in_unit_interval_for_many_windows() -> None:
    hu = np.arange(-1100, 3100, 3, dtype=np.float32)
    for low in (-1000.0, -160.0, -125.0, -57.0):
        for high in (101.0, 175.0, 240.0, 313.0, 1000.0):
            out = window_hu(hu, (low, high))
            assert out.min() == 0.0 and 1.0 - 1e-6 <= out.max() <= 1.0


def test_window_hu_rejects_empty_window() -> None:
    with pytest.raises(ValueError, match="low < high"):
        window_hu(np.zeros(3), (100.0, 100.0))


def test_zscore_hu_on_a_hand_example() -> None:
    stats = ForegroundIntensityStats(clip_low_hu=-100.0, clip_high_hu=300.0, mean_hu=50.0,
                                     std_hu=25.0, n_voxels=10)
    out = zscore_hu(np.array([-200, -100, 50, 100, 300, 1000], dtype=np.int16), stats)
    assert out.dtype == np.float32
    assert out.tolist() == [-6.0, -6.0, 0.0, 2.0, 10.0, 10.0]
    assert np.array_equal(normalise_hu(np.array([100]), "zscore", stats=stats), [2.0])
    with pytest.raises(ValueError, match="stats"):
        normalise_hu(np.array([100]), "zscore")
    with pytest.raises(ValueError, match="unknown intensity mode"):
        normalise_hu(np.array([100]), "minmax", window=(0, 1))


def test_fit_foreground_stats_on_a_hand_example() -> None:
    samples = [np.array([0.0, 10.0]), np.array([[20.0], [30.0]]), np.array([40.0], np.float32)]
    full = fit_foreground_stats(samples, percentiles=(0.0, 100.0))
    assert (full.clip_low_hu, full.clip_high_hu, full.n_voxels) == (0.0, 40.0, 5)
    assert full.mean_hu == 20.0
    assert full.std_hu == pytest.approx(np.sqrt(200.0), rel=1e-12)
    # 25th/75th percentiles of 0..40 in steps of 10 are exactly 10 and 30:
    # clipped values 10, 10, 20, 30, 30 -> mean 20, variance (100+100+0+100+100)/5 = 80
    clipped = fit_foreground_stats(samples, percentiles=(25.0, 75.0))
    assert (clipped.clip_low_hu, clipped.clip_high_hu) == (10.0, 30.0)
    assert clipped.mean_hu == 20.0
    assert clipped.std_hu == pytest.approx(np.sqrt(80.0), rel=1e-12)
    assert json.loads(json.dumps(clipped.to_dict()))["std_hu"] == clipped.std_hu
    constant = fit_foreground_stats([np.full(4, 42.0)])
    assert constant.mean_hu == 42.0 and constant.std_hu > 0  # no division by zero later
    with pytest.raises(ValueError, match="no foreground"):
        fit_foreground_stats([np.array([])])


def test_sample_foreground_hu_draws_only_foreground() -> None:
    hu = np.arange(100, dtype=np.int16).reshape(10, 10)
    foreground = hu % 7 == 0
    all_values = sample_foreground_hu(hu, foreground, 1000, np.random.default_rng(0))
    assert all_values.dtype == np.float32 and sorted(all_values.tolist()) == list(range(0, 100, 7))
    some = sample_foreground_hu(hu, foreground, 5, np.random.default_rng(0))
    assert len(some) == 5 and len(set(some.tolist())) == 5
    assert all(v % 7 == 0 for v in some.tolist())


# ------------------------------------------------------------------------------- geometry
def _affine_for(axcodes: str, spacing=(2.0, 3.0, 4.0), origin=(10.0, -20.0, 30.0)) -> np.ndarray:
    """An affine whose array axes point along ``axcodes`` (e.g. "PLS": axis 0 -> posterior)."""
    world_axis = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0),
                  "S": (2, 1.0), "I": (2, -1.0)}
    affine = np.zeros((4, 4))
    for column, code in enumerate(axcodes):
        row, sign = world_axis[code]
        affine[row, column] = sign * spacing[column]
    affine[:3, 3] = origin
    affine[3, 3] = 1.0
    assert orientation_code(affine) == axcodes
    return affine


def _identity_geometry(shape: tuple[int, ...], affine: np.ndarray) -> ScanGeometry:
    """A geometry whose model grid is the canonical slice grid (no resizing)."""
    z_h_w = axial_view(np.empty(shape, np.uint8), affine).shape
    return ScanGeometry.plan(shape, affine, z_h_w[1:])


@pytest.mark.parametrize("axcodes", ["RAS", "LPS", "PLS", "SRA", "LAI", "ASR", "PSL", "ILA"])
def test_canonical_round_trip_and_world_positions(axcodes: str) -> None:
    shape = (5, 6, 7)
    array = np.arange(np.prod(shape), dtype=np.int32).reshape(shape)
    affine = _affine_for(axcodes)
    geometry = _identity_geometry(shape, affine)
    assert geometry.axcodes == axcodes
    slices = geometry.to_slices(array)
    canonical = np.swapaxes(slices, 0, 2)  # (Z, H, W) = (S, P, L) -> LPS volume
    assert orientation_code(geometry.canonical_affine) == "LPS"
    assert slices.shape == geometry.slice_shape
    back = geometry.from_slices(slices)
    assert back.shape == shape and np.array_equal(back, array)
    # every voxel sits at the same world position in both arrays
    index = np.indices(shape).reshape(3, -1)
    world = affine[:3, :3] @ index + affine[:3, 3:4]
    inverse = np.linalg.inv(geometry.canonical_affine)
    canonical_index = inverse[:3, :3] @ world + inverse[:3, 3:4]
    assert np.allclose(canonical_index, np.round(canonical_index), atol=1e-9)
    canonical_index = np.round(canonical_index).astype(int)
    assert np.array_equal(canonical[tuple(canonical_index)], array[tuple(index)])
    # spacing follows the axes; the axial axis is the file axis along S/I
    assert sorted(geometry.slice_spacing_mm) == [2.0, 3.0, 4.0]
    assert axcodes[geometry.axial_axis] in "SI"
    assert geometry.slice_spacing_mm[0] == (2.0, 3.0, 4.0)[geometry.axial_axis]
    # JSON round trip of the geometry
    restored = ScanGeometry.from_dict(json.loads(json.dumps(geometry.to_dict())))
    assert restored == geometry
    assert np.array_equal(restored.from_slices(slices), array)


def test_canonical_slices_are_in_radiological_view() -> None:
    """Row 0 is anterior, column 0 is the patient's right, slice 0 is inferior."""
    shape = (6, 5, 4)
    ras = np.zeros(shape, np.uint8)
    ras[5, 4, 0] = 1  # RAS: largest x = most right, largest y = most anterior, z 0 = inferior
    for axcodes in ("RAS", "LPS", "PLS", "SAR"):
        array, affine = _reorient(ras, _affine_for("RAS", spacing=(1.0, 1.0, 1.0)), axcodes)
        geometry = _identity_geometry(array.shape, affine)
        slices = geometry.to_slices(array)
        assert slices.shape == (4, 5, 6)
        assert tuple(np.argwhere(slices)[0]) == (0, 0, 0), axcodes
        assert np.array_equal(axial_view(array, affine), slices)
        assert np.array_equal(geometry.from_slices(slices), array)


def test_geometry_rejects_wrong_shapes() -> None:
    with pytest.raises(ValueError, match="3D"):
        ScanGeometry.plan((4, 4), np.eye(4), (4, 4))
    geometry = ScanGeometry.plan((4, 5, 6), np.eye(4), (8, 8))
    with pytest.raises(ValueError, match="does not match"):
        geometry.to_slices(np.zeros((4, 6, 5)))
    with pytest.raises(ValueError, match="do not match"):
        geometry.from_slices(np.zeros((6, 4, 5)))
    with pytest.raises(ValueError, match="do not fit"):
        restore_label_volume(np.zeros((5, 8, 8, 3), np.float32), geometry, "multiclass")
    with pytest.raises(ValueError, match="affine"):
        geometry.check_header((4, 5, 6), np.diag([2.0, 1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="degenerate"):
        ScanGeometry.plan((4, 5, 6), np.diag([1.0, 0.0, 1.0, 1.0]), (8, 8))


# -------------------------------------------------------------------------- preprocessing
@pytest.mark.parametrize("axcodes", ["LPS", "PLS", "LAS"])
def test_reoriented_copy_preprocesses_to_identical_arrays(phantom, axcodes: str) -> None:
    config = PreprocessingConfig(image_size_px=(48, 56))
    image, geometry = preprocess_image(phantom.hu, phantom.affine, config)
    hu2, affine2 = _reorient(phantom.hu, phantom.affine, axcodes)
    label2, affine2b = _reorient(phantom.label, phantom.affine, axcodes)
    assert np.array_equal(affine2, affine2b)
    assert not np.array_equal(hu2, phantom.hu) or hu2.shape != phantom.hu.shape
    image2, geometry2 = preprocess_image(hu2, affine2, config)
    assert np.array_equal(image, image2)
    for mode in ("multiclass", "pancreas", "tumour"):
        assert np.array_equal(preprocess_label(phantom.label, geometry, mode),
                              preprocess_label(label2, geometry2, mode))
    # and each copy maps back onto its own grid
    labels = preprocess_label(label2, geometry2, "multiclass")
    restored = restore_label_volume(np.eye(3, dtype=np.float32)[labels], geometry2, "multiclass")
    assert restored.shape == label2.shape
    assert _dice(restored > 0, label2 > 0) > 0.9


def test_shapes_and_dtypes(phantom) -> None:
    n_slices = phantom.hu.shape[2]
    config = PreprocessingConfig(image_size_px=(48, 40))
    image, geometry = preprocess_image(phantom.hu, phantom.affine, config)
    assert image.shape == (n_slices, 48, 40) and image.dtype == np.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    label = preprocess_label(phantom.label, geometry, "multiclass")
    assert label.shape == (n_slices, 48, 40) and label.dtype == np.uint8
    assert set(np.unique(label).tolist()) == {0, 1, 2}
    half = PreprocessingConfig(image_size_px=(48, 40), image_dtype="float16")
    image16, _ = preprocess_image(phantom.hu, phantom.affine, half)
    assert image16.dtype == np.float16 and image16.shape == image.shape
    np.testing.assert_allclose(image16.astype(np.float32), image, atol=1e-3)
    assert config.num_classes == 3
    assert PreprocessingConfig(image_size_px=(8, 8), label_mode="pancreas").num_classes == 1


def test_preprocess_accepts_any_numeric_dtype(phantom) -> None:
    config = PreprocessingConfig(image_size_px=(32, 32))
    reference, _ = preprocess_image(phantom.hu, phantom.affine, config)
    for dtype in (np.int32, np.float64, np.float32):
        image, _ = preprocess_image(phantom.hu.astype(dtype), phantom.affine, config)
        np.testing.assert_allclose(image, reference, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="3D"):
        preprocess_image(phantom.hu[..., None], phantom.affine, config)


def test_zscore_mode_needs_stats_and_uses_them(phantom) -> None:
    config = PreprocessingConfig(image_size_px=(64, 64), intensity_mode="zscore")
    stats = ForegroundIntensityStats(-100.0, 300.0, 100.0, 50.0, 1)
    image, geometry = preprocess_image(phantom.hu, phantom.affine, config, stats)
    assert image.dtype == np.float32
    assert image.min() == pytest.approx(-4.0) and image.max() == pytest.approx(4.0)
    # with no resizing the values are exactly the z-scored HU of the canonical slices
    expected = zscore_hu(geometry.to_slices(phantom.hu), stats)
    np.testing.assert_allclose(image, expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="stats"):
        preprocess_image(phantom.hu, phantom.affine, config)


def test_restore_is_exact_without_resizing(phantom) -> None:
    source = phantom.hu.shape[:2]
    config = PreprocessingConfig(image_size_px=source)
    image, geometry = preprocess_image(phantom.hu, phantom.affine, config)
    label = preprocess_label(phantom.label, geometry, "multiclass")
    restored = restore_label_volume(np.eye(3, dtype=np.float32)[label], geometry, "multiclass")
    assert restored.shape == phantom.label.shape and restored.dtype == np.uint8
    assert np.array_equal(restored, phantom.label)
    # the same through the JSON form the pipeline stores
    stored = ScanGeometry.from_dict(json.loads(json.dumps(geometry.to_dict())))
    assert np.array_equal(restore_label_volume(np.eye(3, dtype=np.float32)[label], stored,
                                               "multiclass"), phantom.label)
    # and the image is exactly the windowed canonical slices
    expected = window_hu(geometry.to_slices(phantom.hu), config.window_hu)
    assert np.array_equal(image, expected)


@pytest.mark.parametrize("size", [(96, 96), (80, 72), (72, 88)])
def test_restore_after_resizing_is_close(phantom, size: tuple[int, int]) -> None:
    config = PreprocessingConfig(image_size_px=size)
    _, geometry = preprocess_image(phantom.hu, phantom.affine, config)
    label = preprocess_label(phantom.label, geometry, "multiclass")
    assert label.shape[1:] == size
    restored = restore_label_volume(np.eye(3, dtype=np.float32)[label], geometry, "multiclass")
    assert restored.shape == phantom.label.shape
    assert set(np.unique(restored).tolist()) <= {0, 1, 2}
    assert _dice(restored > 0, phantom.label > 0) > 0.9
    assert _dice(restored == 2, phantom.label == 2) > 0.85


@pytest.mark.parametrize("mode", ["pancreas", "tumour"])
def test_restore_binary_modes_maps_back_to_msd_values(phantom, mode: str) -> None:
    config = PreprocessingConfig(image_size_px=phantom.hu.shape[:2], label_mode=mode)
    _, geometry = preprocess_image(phantom.hu, phantom.affine, config)
    target = preprocess_label(phantom.label, geometry, mode)
    assert set(np.unique(target).tolist()) == {0, 1}
    restored = restore_label_volume(target[..., None].astype(np.float32), geometry, mode)
    expected = (phantom.label > 0) * 1 if mode == "pancreas" else (phantom.label == 2) * 2
    assert np.array_equal(restored, expected.astype(np.uint8))


@pytest.mark.parametrize(("target_mm", "expect"), [(4.0, "crop"), (10.0, "pad")])
def test_target_spacing_keeps_physical_size(phantom, target_mm: float, expect: str) -> None:
    size = (64, 64)
    config = PreprocessingConfig(image_size_px=size, target_spacing_mm=target_mm)
    image, geometry = preprocess_image(phantom.hu, phantom.affine, config)
    label = preprocess_label(phantom.label, geometry, "pancreas")
    assert image.shape[1:] == size and label.shape[1:] == size
    spacing = geometry.slice_spacing_mm[::-1]  # L, P, S
    source_hw = geometry.grid.source_hw
    fov_mm = np.array([source_hw[0] * spacing[1], source_hw[1] * spacing[0]])
    resampled_mm = np.array(geometry.grid.resampled_hw) * target_mm
    assert np.all(np.abs(resampled_mm - fov_mm) <= target_mm / 2 + 1e-9)
    if expect == "crop":
        assert all(r > o for r, o in zip(geometry.grid.resampled_hw, size, strict=True))
    else:
        assert all(r < o for r, o in zip(geometry.grid.resampled_hw, size, strict=True))
        off_h, off_w = geometry.grid.offset_hw
        # the padding is air: windowed 0, label 0
        assert np.all(image[:, :off_h] == 0.0) and np.all(image[:, :, :off_w] == 0.0)
        assert np.all(label[:, :off_h] == 0) and np.all(label[:, :, :off_w] == 0)
        assert window_hu(np.array([AIR_HU]), config.window_hu)[0] == 0.0
    # pancreas area (mm^2) is preserved
    source_slices = geometry.to_slices(phantom.label > 0)
    area_source = source_slices.sum() * spacing[0] * spacing[1]
    area_model = label.sum() * target_mm ** 2
    assert area_model == pytest.approx(area_source, rel=0.2)
    # the pancreas keeps its position (mm) relative to the slice centre
    centre_source = (np.argwhere(source_slices)[:, 1:].mean(axis=0) + 0.5
                     - np.array(source_hw) / 2) * np.array([spacing[1], spacing[0]])
    centre_model = (np.argwhere(label)[:, 1:].mean(axis=0) + 0.5 - np.array(size) / 2) * target_mm
    assert np.all(np.abs(centre_model - centre_source) < target_mm)
    # and it maps back onto the original grid
    restored = restore_label_volume(label[..., None].astype(np.float32), geometry, "pancreas")
    assert restored.shape == phantom.label.shape
    assert _dice(restored > 0, phantom.label > 0) > (0.9 if expect == "crop" else 0.75)


def test_label_modes_map_msd_values() -> None:
    msd = np.array([0, 1, 2, 2, 1, 0], dtype=np.uint8)
    assert to_training_target(msd, "multiclass").tolist() == [0, 1, 2, 2, 1, 0]
    assert to_training_target(msd, "pancreas").tolist() == [0, 1, 1, 1, 1, 0]
    assert to_training_target(msd, "tumour").tolist() == [0, 0, 1, 1, 0, 0]
    for mode in ("multiclass", "pancreas", "tumour"):
        assert to_training_target(msd, mode).dtype == np.uint8
    assert to_training_target(msd.astype(np.int16), "multiclass").dtype == np.uint8
    with pytest.raises(ValueError, match="label_mode"):
        to_training_target(msd, "organs")


def test_label_modes_through_preprocess_label() -> None:
    label = np.zeros((4, 4, 3), np.uint8)
    label[1, 1, 0], label[2, 2, 1] = 1, 2
    config = PreprocessingConfig(image_size_px=(4, 4))
    _, geometry = preprocess_image(np.zeros(label.shape, np.int16), np.eye(4), config)
    multi = preprocess_label(label, geometry, "multiclass")
    assert sorted(multi[multi > 0].tolist()) == [1, 2]
    assert preprocess_label(label, geometry, "pancreas").sum() == 2
    tumour = preprocess_label(label, geometry, "tumour")
    assert tumour.sum() == 1 and tumour[1].sum() == 1  # the tumour voxel is in slice z=1


def test_probabilities_to_labels() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.2, 0.5, 0.3]], np.float32)
    assert probabilities_to_labels(probs, "multiclass").tolist() == [0, 2, 1]
    binary = np.array([[0.49], [0.5], [0.9]], np.float32)
    assert probabilities_to_labels(binary, "pancreas").tolist() == [0, 1, 1]
    assert probabilities_to_labels(binary, "tumour").tolist() == [0, 2, 2]


def test_context_stack_gathers_neighbours_with_clamped_edges(tmp_path) -> None:
    slices = np.broadcast_to(np.arange(5, dtype=np.float16)[:, None, None], (5, 2, 3)).copy()
    out = context_stack(slices, np.array([0, 2, 4]), 3)
    assert out.shape == (3, 2, 3, 3) and out.dtype == np.float32
    assert out[:, 0, 0, :].tolist() == [[0, 0, 1], [1, 2, 3], [3, 4, 4]]
    assert np.all(out == out[:, :1, :1, :])  # every pixel carries its slice's value
    five = context_stack(slices, np.array([1]), 5)
    assert five[0, 0, 0].tolist() == [0, 0, 1, 2, 3]
    single = context_stack(slices, np.array([3, 1]), 1)
    assert single.shape == (2, 2, 3, 1) and single[:, 0, 0, 0].tolist() == [3, 1]
    # from a read-only memory map, as the loader uses it
    path = tmp_path / "image.npy"
    np.save(path, slices)
    mapped = np.load(path, mmap_mode="r")
    assert np.array_equal(context_stack(mapped, np.array([0, 2, 4]), 3), out)


def test_config_validation_and_from_params() -> None:
    with pytest.raises(ValueError, match="context_slices"):
        PreprocessingConfig(image_size_px=(8, 8), context_slices=2)
    with pytest.raises(ValueError, match="image_dtype"):
        PreprocessingConfig(image_size_px=(8, 8), image_dtype="int8")
    with pytest.raises(ValueError, match="label_mode"):
        PreprocessingConfig(image_size_px=(8, 8), label_mode="liver")
    config = PreprocessingConfig.from_params({
        "image_size_px": 64, "target_spacing_mm": None,
        "intensity": {"mode": "window", "window_hu": [-160, 240]},
        "label_mode": "pancreas", "image_dtype": "float16", "context_slices": 3})
    assert config == PreprocessingConfig(image_size_px=(64, 64), window_hu=(-160.0, 240.0),
                                         label_mode="pancreas", image_dtype="float16",
                                         context_slices=3)
    assert PreprocessingConfig.from_params({"image_size_px": [32, 48],
                                            "target_spacing_mm": 1}).target_spacing_mm == 1.0
