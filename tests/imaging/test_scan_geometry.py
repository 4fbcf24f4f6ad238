"""ScanGeometry on hand-built volumes in all 48 axis orders: forward/inverse and JSON round trips."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from pancreas_seg.imaging.geometry import MODEL_CHUNK_SLICES, ScanGeometry, axial_axis, axial_view
from pancreas_seg.imaging.resize import body_bounding_box, resize_image_slices

#: (permutation, flips): file axis i holds RAS axis perm[i], reversed where flips[i].
AXIS_ORDERS = [(perm, flips) for perm in itertools.permutations(range(3))
               for flips in itertools.product((False, True), repeat=3)]


def _reorient(ras: np.ndarray, ras_affine: np.ndarray, perm: tuple[int, ...],
              flips: tuple[bool, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The same world-space volume stored in another voxel order, with its affine (pure NumPy).

    File index j holds RAS index r with r[perm[i]] = j[i], or n_i - 1 - j[i] where flipped.
    """
    array = np.transpose(ras, perm)
    for axis, flip in enumerate(flips):
        if flip:
            array = np.flip(array, axis)
    index_map = np.zeros((4, 4))   # file voxel index -> RAS voxel index
    index_map[3, 3] = 1.0
    for axis, (source, flip) in enumerate(zip(perm, flips, strict=True)):
        index_map[source, axis] = -1.0 if flip else 1.0
        index_map[source, 3] = array.shape[axis] - 1 if flip else 0.0
    return np.ascontiguousarray(array), ras_affine @ index_map


def _volume(shape=(7, 5, 6)) -> tuple[np.ndarray, np.ndarray]:
    ras = np.arange(np.prod(shape), dtype=np.int32).reshape(shape)
    affine = np.array([[1.5, 0.0, 0.0, -20.0], [0.0, 2.0, 0.0, 7.5], [0.0, 0.0, 4.0, 100.0],
                       [0.0, 0.0, 0.0, 1.0]])
    return ras, affine


@pytest.mark.parametrize(("perm", "flips"), AXIS_ORDERS)
def test_forward_inverse_and_json_round_trips_in_every_axis_order(perm, flips) -> None:
    ras, ras_affine = _volume()
    array, affine = _reorient(ras, ras_affine, perm, flips)
    reference = ScanGeometry.plan(ras.shape, ras_affine, (5, 7))
    geometry = ScanGeometry.plan(array.shape, affine, (5, 7))
    # the same canonical slices, whatever the storage order
    assert geometry.slice_shape == reference.slice_shape == (6, 5, 7)
    assert np.array_equal(geometry.to_slices(array), reference.to_slices(ras))
    assert geometry.grid == reference.grid
    assert geometry.slice_spacing_mm == reference.slice_spacing_mm == (4.0, 2.0, 1.5)
    assert np.allclose(geometry.canonical_affine, reference.canonical_affine, atol=1e-12)
    # the axial axis is the file axis holding RAS axis 2 (S)
    assert geometry.axial_axis == perm.index(2) == axial_axis(affine)
    assert geometry.axcodes[geometry.axial_axis] in "SI"
    # exact inverse at source resolution, and through the (identity) model grid
    assert np.array_equal(geometry.from_slices(geometry.to_slices(array)), array)
    assert geometry.from_slices(geometry.to_slices(array)).flags.c_contiguous
    model_labels = geometry.label_to_model(array)
    assert model_labels.shape == geometry.model_shape
    assert np.array_equal(geometry.label_from_model(model_labels), array)
    channels = np.stack([array, -array], axis=-1).astype(np.float32)
    slices = geometry.probabilities_to_slices(geometry.to_slices(channels))
    assert np.array_equal(geometry.from_slices(slices), channels)
    # JSON round trip is exact
    stored = ScanGeometry.from_dict(json.loads(json.dumps(geometry.to_dict())))
    assert stored == geometry and np.array_equal(stored.affine, affine)
    assert stored.axial_axis == geometry.axial_axis
    assert np.array_equal(stored.from_slices(geometry.to_slices(array)), array)


@pytest.mark.parametrize(("perm", "flips"), AXIS_ORDERS[::5])
def test_resized_and_framed_grid_is_the_same_in_every_axis_order(perm, flips) -> None:
    """Body box and target spacing are planned on the canonical slices: same grid in any order."""
    shape = (40, 30, 9)
    hu = np.full(shape, -1000.0, np.float32)
    hu[8:31, 4:22, :] = 40.0                                 # a body, off-centre
    affine = np.diag([1.5, 2.0, 5.0, 1.0])
    array, file_affine = _reorient(hu, affine, perm, flips)
    box = body_bounding_box(axial_view(hu, affine), -500.0)
    file_box = body_bounding_box(axial_view(array, file_affine), -500.0)
    assert box == file_box
    for kwargs in ({"body_box_hw": box}, {"target_spacing_mm": 2.5},
                   {"target_spacing_mm": 2.5, "body_box_hw": box}):
        reference = ScanGeometry.plan(shape, affine, (16, 20), **kwargs)
        geometry = ScanGeometry.plan(array.shape, file_affine, (16, 20), **kwargs)
        assert geometry.grid == reference.grid
        assert np.array_equal(geometry.image_to_model(array, -1000.0),
                              reference.image_to_model(hu, -1000.0))
        label = (array > 0).astype(np.uint8)
        back = geometry.label_from_model(geometry.label_to_model(label))
        assert back.shape == array.shape
        ras_back = reference.label_from_model(reference.label_to_model((hu > 0).astype(np.uint8)))
        assert np.array_equal(back, _reorient(ras_back, affine, perm, flips)[0])
        stored = ScanGeometry.from_dict(json.loads(json.dumps(geometry.to_dict())))
        assert stored == geometry and stored.body_box_hw == kwargs.get("body_box_hw")


def test_from_dict_reads_the_old_layout_and_refuses_inconsistent_records() -> None:
    ras, affine = _volume()
    geometry = ScanGeometry.plan(ras.shape, affine, (8, 8))
    old = {"canonical": {"original_shape": list(ras.shape), "original_affine": affine.tolist(),
                         "to_canonical": [[0, -1], [1, -1], [2, 1]]},
           "grid": geometry.grid.to_dict()}
    assert ScanGeometry.from_dict(old) == geometry
    wrong = geometry.to_dict() | {"shape": [5, 7, 6]}     # grid planned for another slice shape
    with pytest.raises(ValueError, match="does not match"):
        ScanGeometry.from_dict(wrong)
    with pytest.raises(ValueError, match="axial_axis"):
        ScanGeometry.from_dict(geometry.to_dict() | {"axial_axis": 0})
    with pytest.raises(ValueError, match="model grid|model-grid"):
        geometry.label_from_model(np.zeros((6, 9, 8), np.uint8))


@pytest.mark.parametrize(("output_px", "body_box"), [((32, 32), None), ((24, 24), (5, 60, 3, 58)),
                                                      ((80, 80), None)])
@pytest.mark.parametrize(("perm", "flips"), [((0, 1, 2), (False, False, False)), ((2, 0, 1), (True, False, True))])
def test_image_to_model_in_chunks_equals_the_whole_stack_at_once(perm, flips, output_px, body_box) -> None:
    """Resampling a few slices at a time (bounded memory) gives exactly the one-pass result:
    area means (64 -> 32 px), Gaussian + linear downsampling and placing (framed on a body box),
    and upsampling; int16 HU in, over a slice count that is not a multiple of the chunk."""
    n_slices = 2 * MODEL_CHUNK_SLICES + 5
    rng = np.random.default_rng(3)
    ras = rng.integers(-1024, 2000, size=(64, 64, n_slices)).astype(np.int16)
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    array, file_affine = _reorient(ras, affine, perm, flips)
    geometry = ScanGeometry.plan(array.shape, file_affine, output_px, body_box_hw=body_box, body_margin_mm=4.0)
    chunked = geometry.image_to_model(array, -1000.0)
    whole = resize_image_slices(geometry.to_slices(array.astype(np.float32)), geometry.grid, fill_value=-1000.0)
    assert chunked.dtype == np.float32 and chunked.shape == (n_slices, *output_px)
    np.testing.assert_array_equal(chunked, whole)
