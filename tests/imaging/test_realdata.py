"""Reading, validating and preprocessing one REAL abdominal CT.

Data (``../shared/realdata`` next to the repository, or ``$PANCREAS_SEG_REALDATA``; read-only;
without it these tests are skipped locally and FAIL under ``CI=true``, see ``tests/conftest.py``):

* ``ct_abdomen_3mm.nii.gz``: one real abdominal CT volume, 122 x 101 x 112 voxels, 3.0 mm
  isotropic, RAS, int32 Hounsfield units (about -1207 to 3382). It is the example CT from the
  TotalSegmentator repository (``tests/reference_files/example_ct.nii.gz``, Apache-2.0 licence).
* ``ct_abdomen_3mm_pancreas.nii.gz``: a binary pancreas mask on the same grid (uint8, 695 voxels,
  slices z 81-99), derived from TotalSegmentator's own multi-label prediction for that CT
  (label 7 = pancreas). It is a model's output, not a radiologist's annotation: good for geometry,
  orientation, intensity and plumbing tests, not a ground truth for accuracy claims.

Nothing is ever written next to these files; copies go to ``tmp_path``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pancreas_seg.datasets import NiftiDataset
from pancreas_seg.imaging.intensity import window_hu
from pancreas_seg.imaging.nifti_io import load_nifti
from pancreas_seg.imaging.preprocess import (
    PreprocessingConfig,
    preprocess_case,
    preprocess_image,
    preprocess_label,
    restore_label_volume,
)
from pancreas_seg.task07.layout import CaseFiles
from pancreas_seg.task07.validation import validate_case, validate_task07

CT_NAME, MASK_NAME = "ct_abdomen_3mm.nii.gz", "ct_abdomen_3mm_pancreas.nii.gz"

SHAPE = (122, 101, 112)
PANCREAS_SLICES = list(range(81, 100))  # z 81-99 inclusive


@pytest.fixture(scope="module", autouse=True)
def realdata(require_realdata) -> Path:
    """The real-data folder. Every test here needs it: skipped locally without it, failing in CI."""
    return require_realdata(CT_NAME, MASK_NAME)


@pytest.fixture(scope="module")
def ct_path(realdata: Path) -> Path:
    return realdata / CT_NAME


@pytest.fixture(scope="module")
def mask_path(realdata: Path) -> Path:
    return realdata / MASK_NAME


@pytest.fixture(scope="module")
def reference(ct_path: Path, mask_path: Path):
    """The files as nibabel reads them directly (an independent reader)."""
    ct, mask = nib.load(str(ct_path)), nib.load(str(mask_path))
    return {"hu": np.asanyarray(ct.dataobj), "affine": ct.affine,
            "mask": np.asanyarray(mask.dataobj), "mask_affine": mask.affine}


@pytest.fixture(scope="module")
def ct(ct_path: Path):
    return load_nifti(ct_path)


@pytest.fixture(scope="module")
def mask(mask_path: Path):
    return load_nifti(mask_path)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_load_nifti_keeps_shape_spacing_orientation_and_hu(ct, mask, reference) -> None:
    assert ct.array.shape == SHAPE
    assert ct.spacing_mm == pytest.approx((3.0, 3.0, 3.0))
    assert ct.orientation == "RAS"
    assert ct.array.dtype.kind == "i"  # integer HU kept, not converted to float
    assert ct.array.dtype == reference["hu"].dtype
    assert ct.array.min() == reference["hu"].min() == -1207
    assert ct.array.max() == reference["hu"].max() == 3382
    assert np.array_equal(ct.array, reference["hu"])
    assert np.array_equal(ct.affine, reference["affine"])
    assert mask.array.dtype == np.uint8 and mask.array.shape == SHAPE
    assert np.array_equal(mask.affine, ct.affine)
    assert int(mask.array.sum()) == 695
    z = np.nonzero(mask.array.any(axis=(0, 1)))[0]
    assert z.tolist() == PANCREAS_SLICES


def test_nifti_dataset_loads_the_same_and_round_trips(ct, ct_path: Path, realdata: Path,
                                                     tmp_path: Path) -> None:
    loaded = NiftiDataset(filepath=str(ct_path)).load()
    assert loaded.array.dtype == ct.array.dtype
    assert np.array_equal(loaded.array, ct.array)
    assert np.array_equal(loaded.affine, ct.affine)
    assert loaded.orientation == "RAS" and loaded.spacing_mm == pytest.approx((3.0, 3.0, 3.0))
    copy = NiftiDataset(filepath=str(tmp_path / "ct_copy.nii.gz"))
    copy.save(loaded)
    again = copy.load()
    assert again.array.dtype == ct.array.dtype and np.array_equal(again.array, ct.array)
    assert np.array_equal(again.affine, ct.affine)
    assert sorted(p.name for p in realdata.iterdir()) == [
        "NOTICE.md", "ct_abdomen_3mm.nii.gz", "ct_abdomen_3mm_pancreas.nii.gz"]


def test_validate_case_accepts_the_real_case(ct_path: Path, mask_path: Path) -> None:
    record, findings = validate_case(CaseFiles("ct_abdomen_3mm", ct_path, mask_path, "training"))
    assert findings == []
    assert record is not None
    assert (record.shape_x, record.shape_y, record.shape_z) == SHAPE
    assert (record.spacing_x_mm, record.spacing_y_mm, record.spacing_z_mm) == pytest.approx(
        (3.0, 3.0, 3.0))
    assert record.orientation == "RAS"
    assert (record.hu_min, record.hu_max) == (-1207.0, 3382.0)
    assert record.voxels_pancreas == 695 and record.voxels_tumour == 0


def test_validate_task07_folder_built_from_the_real_case(ct_path: Path, mask_path: Path,
                                                         tmp_path: Path) -> None:
    root = tmp_path / "Task07_Pancreas"
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (root / sub).mkdir(parents=True)
    shutil.copyfile(ct_path, root / "imagesTr" / "pancreas_001.nii.gz")
    shutil.copyfile(mask_path, root / "labelsTr" / "pancreas_001.nii.gz")
    shutil.copyfile(ct_path, root / "imagesTs" / "pancreas_002.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "training": [{"image": "./imagesTr/pancreas_001.nii.gz",
                      "label": "./labelsTr/pancreas_001.nii.gz"}],
        "test": ["./imagesTs/pancreas_002.nii.gz"]}))
    result = validate_task07(root)
    assert result.findings == []
    by_id = {c.case_id: c for c in result.cases}
    assert by_id["pancreas_001"].voxels_pancreas == 695
    assert by_id["pancreas_002"].label_path is None


def test_preprocessed_pancreas_is_on_the_mask_slices_and_lines_up(ct, mask) -> None:
    config = PreprocessingConfig(image_size_px=(128, 128))
    image, geometry = preprocess_image(ct.array, ct.affine, config)
    label = preprocess_label(mask.array, geometry, "pancreas")
    assert image.shape == (112, 128, 128) and image.dtype == np.float32
    assert label.shape == image.shape and label.dtype == np.uint8
    assert geometry.grid.source_hw == (101, 122)  # (P, L) of the canonical slices
    # canonical LPS keeps S increasing, so slice indices are the file's z indices
    assert np.nonzero(label.any(axis=(1, 2)))[0].tolist() == PANCREAS_SLICES
    # intensity inside the preprocessed mask matches the original HU inside the original mask
    original = window_hu(ct.array[mask.array > 0], config.window_hu)
    inside = image[label > 0]
    assert abs(float(inside.mean()) - float(original.mean())) < 0.02
    hu_equivalent = float(inside.mean()) * (config.window_hu[1] - config.window_hu[0]) + \
        config.window_hu[0]
    # parenchyma at 3 mm with partial volume: soft tissue, neither fat/air nor bone/contrast
    assert -50.0 < hu_equivalent < 100.0
    # a misaligned mask (mirrored front-back, or shifted 10 slices) would not match
    assert abs(float(image[label[:, ::-1, :] > 0].mean()) - float(original.mean())) > 0.05
    assert abs(float(image[np.roll(label, 10, axis=0) > 0].mean()) - float(original.mean())) > 0.02
    # one-hot of the preprocessed label maps back onto the file's grid
    one_hot = np.stack([1 - label, label], axis=-1).astype(np.float32)
    restored = restore_label_volume(one_hot, geometry, "multiclass")
    assert restored.shape == SHAPE and restored.dtype == np.uint8
    assert _dice(restored > 0, mask.array > 0) > 0.85
    restored_binary = restore_label_volume(label[..., None].astype(np.float32), geometry,
                                           "pancreas")
    assert _dice(restored_binary > 0, mask.array > 0) > 0.85


def test_without_resizing_pancreas_voxels_are_exactly_the_windowed_hu(ct, mask) -> None:
    config = PreprocessingConfig(image_size_px=(101, 122))
    image, geometry = preprocess_image(ct.array, ct.affine, config)
    label = preprocess_label(mask.array, geometry, "pancreas")
    assert int(label.sum()) == 695
    assert np.array_equal(np.sort(image[label > 0]),
                          np.sort(window_hu(ct.array[mask.array > 0], config.window_hu)))
    restored = restore_label_volume(label[..., None].astype(np.float32), geometry, "pancreas")
    assert np.array_equal(restored, mask.array)


def test_canonical_slices_show_the_real_anatomy_in_radiological_view(ct) -> None:
    """Liver (patient's right) on the image's left columns; spine posterior (bottom rows)."""
    config = PreprocessingConfig(image_size_px=(101, 122))
    image, _ = preprocess_image(ct.array, ct.affine, config)
    upper = image[95:112]
    soft = (upper > (40 + 100) / 340) & (upper < (90 + 100) / 340)  # 40-90 HU: liver, spleen
    half = upper.shape[2] // 2
    assert soft[:, :, :half].sum() > 1.4 * soft[:, :, half:].sum()
    bone = image[85:95] >= 1.0  # >= 240 HU
    rows = np.argwhere(bone)[:, 1]
    assert rows.mean() > upper.shape[1] / 2


def test_preprocess_case_reads_the_files(ct, mask, ct_path: Path, mask_path: Path) -> None:
    config = PreprocessingConfig(image_size_px=(64, 64), label_mode="pancreas")
    case = preprocess_case(str(ct_path), str(mask_path), config)
    direct, _ = preprocess_image(ct.array, ct.affine, config)
    assert np.array_equal(case.image, direct)
    assert case.label.shape == (112, 64, 64) and case.label.dtype == np.uint8
    assert np.nonzero(case.label.any(axis=(1, 2)))[0].tolist() == PANCREAS_SLICES
    assert preprocess_case(str(ct_path), None, config).label is None
