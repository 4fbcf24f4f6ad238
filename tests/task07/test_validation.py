"""Validation of a Task07 folder: one real, broken file per case, built inside each test.

The folders are small SYNTHETIC phantom data sets (``tests/conftest.py``); every bad input is a
real file on disk (truncated gzip, garbage bytes, 4D NIfTI, ...), never a mock.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pancreas_seg.imaging.nifti_io import load_nifti, save_nifti
from pancreas_seg.pipelines.ingestion.nodes import (
    apply_invalid_policy,
    build_case_manifest,
    plan_split,
    validate_raw_dataset,
)
from pancreas_seg.task07.layout import CaseFiles
from pancreas_seg.task07.validation import (
    Finding,
    InvalidDatasetError,
    check_image,
    validate_case,
    validate_task07,
)

ALL_CASES = {"pancreas_001", "pancreas_002", "pancreas_003", "pancreas_004", "pancreas_005"}


def _tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file (and the list of folders) under ``root``."""
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file()
                                       else "<dir>")
            for p in sorted(root.rglob("*"))}


def _validate(root: Path, **kwargs):
    """validate_task07, also asserting that nothing under ``root`` was changed."""
    before = _tree_hashes(root)
    result = validate_task07(root, **kwargs)
    assert _tree_hashes(root) == before, "validation modified the raw files"
    return result


def _only_finding(result, case_id: str) -> Finding:
    found = [f for f in result.findings if f.case_id == case_id]
    assert len(found) == 1, result.findings
    return found[0]


def _assert_others_valid(result, bad: set[str]) -> None:
    assert {c.case_id for c in result.cases} == ALL_CASES - bad
    assert set(result.bad_cases) == bad


def _image(root: Path, n: int) -> Path:
    return root / "imagesTr" / f"pancreas_{n:03d}.nii.gz"


def _label(root: Path, n: int) -> Path:
    return root / "labelsTr" / f"pancreas_{n:03d}.nii.gz"


# ------------------------------------------------------------------------------ valid folder
def test_pristine_folder_is_valid_and_records_are_correct(small_task07: Path) -> None:
    result = _validate(small_task07)
    assert result.findings == []
    assert {c.case_id for c in result.cases} == ALL_CASES
    by_id = {c.case_id: c for c in result.cases}
    test_case = by_id["pancreas_005"]
    assert test_case.subset == "test" and test_case.label_path is None
    assert test_case.voxels_pancreas == 0 and test_case.voxels_tumour == 0
    for n in range(1, 5):
        record = by_id[f"pancreas_{n:03d}"]
        ct, label = load_nifti(_image(small_task07, n)), load_nifti(_label(small_task07, n))
        assert record.subset == "training"
        assert Path(record.image_path) == _image(small_task07, n)
        assert Path(record.label_path) == _label(small_task07, n)
        assert (record.shape_x, record.shape_y, record.shape_z) == ct.array.shape
        assert (record.spacing_x_mm, record.spacing_y_mm, record.spacing_z_mm) == pytest.approx(
            ct.spacing_mm)
        assert record.orientation == ct.orientation
        assert record.hu_min == ct.array.min() and record.hu_max == ct.array.max()
        assert record.voxels_pancreas == int((label.array == 1).sum()) > 0
        assert record.voxels_tumour == int((label.array == 2).sum())
    # the synthetic set stores every 3rd case LPS
    assert by_id["pancreas_003"].orientation == "LPS"
    assert by_id["pancreas_001"].orientation == "RAS"


def test_appledouble_junk_files_are_skipped_silently(fresh_task07: Path) -> None:
    junk = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(200)
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (fresh_task07 / folder / "._pancreas_001.nii.gz").write_bytes(junk)
    (fresh_task07 / "._dataset.json").write_bytes(junk)
    result = _validate(fresh_task07)
    assert result.findings == []
    _assert_others_valid(result, set())


# ------------------------------------------------------------------------------- bad files
def test_truncated_nifti_is_reported(fresh_task07: Path) -> None:
    path = _image(fresh_task07, 2)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    result = _validate(fresh_task07)
    finding = _only_finding(result, "pancreas_002")
    assert finding.file == str(path)
    assert finding.check == "readable_nifti"
    assert "truncated" in finding.message
    assert str(path) in str(finding)
    _assert_others_valid(result, {"pancreas_002"})


@pytest.mark.parametrize("payload", [b"this is not a NIfTI file\n" * 20,
                                     gzip.compress(b"\x01\x02\x03 not nifti either" * 40)],
                         ids=["plain-text", "gzipped-garbage"])
def test_non_nifti_file_named_nii_gz_is_reported(fresh_task07: Path, payload: bytes) -> None:
    path = _label(fresh_task07, 3)
    path.write_bytes(payload)
    result = _validate(fresh_task07)
    finding = _only_finding(result, "pancreas_003")
    assert finding.file == str(path)
    assert finding.check == "readable_nifti"
    assert "NIfTI" in finding.message or "corrupt" in finding.message
    _assert_others_valid(result, {"pancreas_003"})


def test_4d_image_is_reported(fresh_task07: Path) -> None:
    path = _image(fresh_task07, 1)
    ct = load_nifti(path)
    save_nifti(path, np.stack([ct.array, ct.array], axis=-1), ct.affine)
    result = _validate(fresh_task07)
    finding = _only_finding(result, "pancreas_001")
    assert finding.file == str(path) and finding.check == "is_3d"
    assert "3D" in finding.message and "4D" in finding.message
    _assert_others_valid(result, {"pancreas_001"})


def test_shape_mismatch_is_reported(fresh_task07: Path) -> None:
    path = _label(fresh_task07, 4)
    label = load_nifti(path)
    save_nifti(path, label.array[:, :, :-1], label.affine)
    result = _validate(fresh_task07)
    finding = _only_finding(result, "pancreas_004")
    assert finding.file == str(path) and finding.check == "same_shape"
    assert str(label.array.shape) in finding.message
    assert str(label.array[:, :, :-1].shape) in finding.message
    _assert_others_valid(result, {"pancreas_004"})


def test_affine_mismatch_beyond_tolerance_is_reported(fresh_task07: Path) -> None:
    path = _label(fresh_task07, 2)
    label = load_nifti(path)
    shifted = label.affine.copy()
    shifted[0, 3] += 0.5  # half a millimetre
    save_nifti(path, label.array, shifted)
    result = _validate(fresh_task07)
    finding = _only_finding(result, "pancreas_002")
    assert finding.file == str(path) and finding.check == "same_affine"
    assert "affine" in finding.message and "0.5 mm" in finding.message
    _assert_others_valid(result, {"pancreas_002"})
    # a looser tolerance accepts the same files
    assert _validate(fresh_task07, affine_atol_mm=0.6).findings == []


def test_affine_difference_within_tolerance_passes(fresh_task07: Path) -> None:
    path = _label(fresh_task07, 2)
    label = load_nifti(path)
    nudged = label.affine.copy()
    nudged[:3, 3] += 2e-4  # float rounding between tools, below the 1e-3 mm default
    save_nifti(path, label.array, nudged)
    assert not np.array_equal(load_nifti(path).affine, load_nifti(_image(fresh_task07, 2)).affine)
    result = _validate(fresh_task07)
    assert result.findings == []
    _assert_others_valid(result, set())


def test_label_value_7_is_reported(fresh_task07: Path) -> None:
    path = _label(fresh_task07, 1)
    label = load_nifti(path)
    array = label.array.copy()
    array[0, 0, 0] = 7
    save_nifti(path, array, label.affine)
    result = _validate(fresh_task07)
    finding = _only_finding(result, "pancreas_001")
    assert finding.file == str(path) and finding.check == "label_values"
    assert "[7]" in finding.message
    _assert_others_valid(result, {"pancreas_001"})


def test_nan_voxels_in_float_image_are_reported(fresh_task07: Path) -> None:
    path = _image(fresh_task07, 3)
    ct = load_nifti(path)
    array = ct.array.astype(np.float32)
    array[1, 2, 3] = np.nan
    array[2, 2, 3] = np.nan
    array[3, 2, 3] = np.inf
    save_nifti(path, array, ct.affine)
    result = _validate(fresh_task07)
    finding = _only_finding(result, "pancreas_003")
    assert finding.file == str(path) and finding.check == "finite_voxels"
    assert "3 non-finite" in finding.message
    _assert_others_valid(result, {"pancreas_003"})


def test_float_image_without_nan_is_valid(fresh_task07: Path) -> None:
    path = _image(fresh_task07, 3)
    ct = load_nifti(path)
    save_nifti(path, ct.array.astype(np.float32), ct.affine)
    result = _validate(fresh_task07)
    assert result.findings == []


def test_check_image_reads_once_and_finds_what_validate_case_finds(fresh_task07: Path, tmp_path: Path) -> None:
    """The MLflow pyfunc model checks an uploaded scan with ``check_image`` and segments the volume
    it returns: same findings as ``validate_case`` on an unlabelled case, same voxels as a fresh read."""
    good = _image(fresh_task07, 1)
    volume, findings = check_image(good, "pancreas_001")
    assert findings == [] and volume is not None
    fresh = load_nifti(good)
    assert np.array_equal(volume.array, fresh.array) and np.array_equal(volume.affine, fresh.affine)
    ct = load_nifti(_image(fresh_task07, 2))
    bad_files = {"nan": tmp_path / "nan.nii.gz", "4d": tmp_path / "4d.nii.gz", "garbage": tmp_path / "garbage.nii.gz"}
    with_nan = ct.array.astype(np.float32)
    with_nan[1, 2, 3] = np.nan
    save_nifti(bad_files["nan"], with_nan, ct.affine)
    save_nifti(bad_files["4d"], np.stack([ct.array, ct.array], axis=-1), ct.affine)
    bad_files["garbage"].write_bytes(b"not a NIfTI file\n" * 20)
    for name, path in bad_files.items():
        volume, findings = check_image(path, name)
        record, expected = validate_case(CaseFiles(name, path, None, "inference"))
        assert volume is None and record is None, name
        assert findings == expected and len(findings) == 1, (name, findings)


def test_image_without_label_entry_is_reported_as_missing_label(fresh_task07: Path) -> None:
    extra = _image(fresh_task07, 99)
    ct = load_nifti(_image(fresh_task07, 1))
    save_nifti(extra, ct.array, ct.affine)  # an image nobody listed, and no label for it
    result = _validate(fresh_task07)
    finding = _only_finding(result, "pancreas_099")
    assert finding.file == str(extra) and finding.check == "file_listed"
    assert "missing label" in finding.message
    _assert_others_valid(result, {"pancreas_099"})


def test_dataset_json_entry_without_file_is_reported(fresh_task07: Path) -> None:
    label = _label(fresh_task07, 4)
    label.unlink()
    meta = json.loads((fresh_task07 / "dataset.json").read_text())
    meta["test"].append("./imagesTs/pancreas_077.nii.gz")
    (fresh_task07 / "dataset.json").write_text(json.dumps(meta))
    result = _validate(fresh_task07)
    missing_label = _only_finding(result, "pancreas_004")
    assert missing_label.file == str(label) and missing_label.check == "listed_file_exists"
    assert "does not exist" in missing_label.message and "label" in missing_label.message
    missing_test = _only_finding(result, "pancreas_077")
    assert missing_test.file == str(fresh_task07 / "imagesTs" / "pancreas_077.nii.gz")
    assert "does not exist" in missing_test.message
    _assert_others_valid(result, {"pancreas_004", "pancreas_077"})


# ----------------------------------------------------------------- policies (ingestion nodes)
def _break_three_cases(root: Path) -> dict[str, Path]:
    """Truncate case 1's image, put label 7 into case 2, and make case 4's label 4D."""
    image1 = _image(root, 1)
    image1.write_bytes(image1.read_bytes()[:1000])
    label2 = _label(root, 2)
    vol = load_nifti(label2)
    arr = vol.array.copy()
    arr[arr == 1] = 7
    save_nifti(label2, arr, vol.affine)
    label4 = _label(root, 4)
    vol = load_nifti(label4)
    save_nifti(label4, vol.array[..., None], vol.affine)
    return {"pancreas_001": image1, "pancreas_002": label2, "pancreas_004": label4}


def test_fail_policy_raises_one_error_listing_every_bad_case(fresh_task07: Path) -> None:
    broken = _break_three_cases(fresh_task07)
    before = _tree_hashes(fresh_task07)
    report, cases = validate_raw_dataset(str(fresh_task07), {"on_invalid": "fail"})
    assert _tree_hashes(fresh_task07) == before
    assert report["on_invalid"] == "fail" and report["synthetic_data"] is True
    assert report["bad_cases"] == sorted(broken) and report["n_bad_cases"] == 3
    with pytest.raises(InvalidDatasetError) as excinfo:
        apply_invalid_policy(report, cases)
    message = str(excinfo.value)
    assert "3 invalid case(s)" in message
    for case_id, path in broken.items():
        assert case_id in message
        assert str(path) in message
    assert "truncated" in message and "[7]" in message and "4D" in message
    assert "on_invalid: skip" in message
    assert _tree_hashes(fresh_task07) == before


def test_skip_policy_keeps_only_valid_cases_and_reports_the_bad_ones(fresh_task07: Path) -> None:
    broken = _break_three_cases(fresh_task07)
    before = _tree_hashes(fresh_task07)
    report, cases = validate_raw_dataset(str(fresh_task07), {"on_invalid": "skip"})
    kept = apply_invalid_policy(report, cases)
    assert _tree_hashes(fresh_task07) == before
    assert isinstance(kept, pd.DataFrame)
    assert sorted(kept["case_id"]) == ["pancreas_003", "pancreas_005"]
    assert set(kept["source"]) == {"synthetic"}
    assert report["n_valid_cases"] == 2
    assert report["bad_cases"] == sorted(broken)
    assert {f["file"] for f in report["findings"]} == {str(p) for p in broken.values()}
    json.dumps(report)  # the report is saved as JSON


def test_skip_policy_with_no_valid_case_left_fails_clearly(fresh_task07: Path) -> None:
    for folder in ("imagesTr", "imagesTs"):
        for path in (fresh_task07 / folder).iterdir():
            path.write_bytes(b"not a NIfTI file")
    report, cases = validate_raw_dataset(str(fresh_task07), {"on_invalid": "skip"})
    assert report["n_valid_cases"] == 0 and len(report["bad_cases"]) == 5
    assert len(cases) == 0
    with pytest.raises(ValueError, match="[Nn]o valid case"):  # before any split or manifest is made
        apply_invalid_policy(report, cases)


def test_unknown_policy_is_rejected(fresh_task07: Path) -> None:
    with pytest.raises(ValueError, match="on_invalid"):
        validate_raw_dataset(str(fresh_task07), {"on_invalid": "ignore"})


def test_skipped_cases_leave_the_persisted_split_without_moving_the_others(fresh_task07: Path) -> None:
    """plan_split + build_case_manifest: first run makes the split, a later run with a broken case
    (on_invalid: skip) removes that case and keeps every other case in its split."""
    split = {"seed": 0, "test_fraction": 0.25, "validation_fraction": 0.34}
    report, cases = validate_raw_dataset(str(fresh_task07), {"on_invalid": "skip"})
    first = plan_split(apply_invalid_policy(report, cases), str(fresh_task07), {}, split)
    assert list(first) == ["Task07_Pancreas"]
    record = first["Task07_Pancreas"]
    manifest = build_case_manifest(cases, first, str(fresh_task07))
    assert set(manifest["dataset"]) == {"Task07_Pancreas"}
    assert manifest.set_index("case_id")["split"].to_dict() == {
        **{c: name for name in ("train", "validation", "test") for c in record[name]},
        "pancreas_005": "unlabelled"}

    label2 = _label(fresh_task07, 2)
    label2.write_bytes(b"not a NIfTI file")
    report, cases = validate_raw_dataset(str(fresh_task07), {"on_invalid": "skip"})
    kept = apply_invalid_policy(report, cases)
    persisted = {"Task07_Pancreas": lambda: json.loads(json.dumps(record))}  # as loaded from JSON
    second = plan_split(kept, str(fresh_task07), persisted, split)
    later = build_case_manifest(kept, second, str(fresh_task07))
    assert "pancreas_002" not in set(later["case_id"])
    assert [d["case_id"] for d in second["Task07_Pancreas"]["dropped"]] == ["pancreas_002"]
    before = manifest.set_index("case_id")["split"].drop("pancreas_002")
    pd.testing.assert_series_equal(later.set_index("case_id")["split"], before)

    with pytest.raises(ValueError, match=r"split\.seed: 0 -> 1"):  # SplitMismatchError
        plan_split(kept, str(fresh_task07), persisted, {**split, "seed": 1})
    remade = plan_split(kept, str(fresh_task07), persisted, {**split, "seed": 1, "recompute": True})
    assert remade["Task07_Pancreas"]["settings"]["seed"] == 1
    assert remade["Task07_Pancreas"]["dropped"] == []
